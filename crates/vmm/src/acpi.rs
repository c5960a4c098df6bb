//! ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) describing the vCPUs, the power/reset registers,
//! the serial port and every virtio-mmio device (`LNRO0005`), so a stock kernel finds them.

use vm_memory::GuestAddress;

use crate::memory::GuestMemory;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Debug, Clone, Copy)]
pub struct VirtioMmioInfo {
    /// Guest-physical base of the device's MMIO window.
    pub addr: u64,
    /// Size of the window.
    pub size: u64,
    /// The GSI (IOAPIC pin) of the device's interrupt.
    pub gsi: u32,
}

/// Errors writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit or cannot be written to guest memory.
    #[error("cannot write ACPI tables to guest memory: {0}")]
    Write(String),
}

/// Writes the tables at `layout::ACPI_START` and returns the RSDP address.
pub fn create_acpi_tables(
    _mem: &GuestMemory,
    _num_vcpus: u8,
    _virtio: &[VirtioMmioInfo],
) -> Result<GuestAddress, AcpiError> {
    Err(AcpiError::Write("not implemented yet".into()))
}
