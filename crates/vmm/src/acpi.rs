//! ACPI tables (RSDP, XSDT, FADT, DSDT, MADT) describing the vCPUs, the power/reset registers,
//! the serial port and every virtio-mmio device (`LNRO0005`), so a stock kernel finds them.
//!
//! The platform is ACPI "hardware-reduced" (no PM timer, no fixed-feature registers, no SCI):
//! power-off and reset go through the sleep control and reset registers of `layout`. Layout in
//! guest memory, from `layout::ACPI_START`: RSDP, DSDT, FADT, MADT, XSDT, each 16-byte aligned.
//! Linux gets the RSDP address from the zero page (`acpi_rsdp_addr`); older kernels also find
//! it by scanning 0xe0000..0x100000.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SIZE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT,
    ACPI_START, APIC_ADDR, IOAPIC_ADDR, SERIAL_IRQ, SERIAL_PORT, SLEEP_TYPE_S5,
    VIRTIO_MMIO_MAX_DEVICES,
};
use crate::memory::GuestMemory;

/// OEM id in every table header (Linux prints it in its `ACPI: XXXX` lines).
pub const OEM_ID: [u8; 6] = *b"FTVM  ";
/// OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"FTVMVM  ";
/// OEM revision of every table.
pub const OEM_REVISION: u32 = 1;
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_VENDOR: [u8; 8] = *b"FTVMKVM ";

/// IA-PC boot architecture flags (FADT): no VGA, no MSI, no ASPM control, no CMOS RTC. The
/// 8042 flag stays clear so the guest does not probe a keyboard controller (ftvm's i8042 only
/// implements the reset command).
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5);

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
    /// The machine cannot be described (bad vCPU count or device window).
    #[error("cannot describe the VM in ACPI tables: {0}")]
    Invalid(String),
}

/// The DSDT's AML: `\_S5` and, in `\_SB`, COM1 and one `LNRO0005` device per virtio window.
fn dsdt_aml(virtio: &[VirtioMmioInfo]) -> Result<Vec<u8>, AcpiError> {
    let mut bytes = Vec::new();
    // SLP_TYPa, SLP_TYPb, reserved, reserved.
    aml::Name::new(
        "\\_S5_".into(),
        &aml::Package::new(vec![&SLEEP_TYPE_S5, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut bytes);

    let mut sb = Vec::new();
    aml::Device::new(
        "COM1".into(),
        vec![
            &aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501")),
            &aml::Name::new("_UID".into(), &1u8),
            &aml::Name::new(
                "_CRS".into(),
                &aml::ResourceTemplate::new(vec![
                    &aml::IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8),
                    // ISA serial: edge-triggered, active high, exclusive.
                    &aml::Interrupt::new(true, true, false, false, SERIAL_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut sb);

    for (i, d) in virtio.iter().enumerate() {
        // Memory32Fixed: the whole window must lie below 4 GiB.
        let (base, size) = match (u32::try_from(d.addr), u32::try_from(d.size)) {
            (Ok(b), Ok(s)) if s > 0 && b.checked_add(s - 1).is_some() => (b, s),
            _ => {
                return Err(AcpiError::Invalid(format!(
                    "virtio-mmio window {:#x}+{:#x} is empty or not below 4 GiB",
                    d.addr, d.size
                )))
            }
        };
        aml::Device::new(
            format!("V{i:03}").as_str().into(),
            vec![
                &aml::Name::new("_HID".into(), &"LNRO0005"),
                &aml::Name::new("_UID".into(), &(i as u32)),
                &aml::Name::new("_CCA".into(), &aml::ONE),
                &aml::Name::new(
                    "_CRS".into(),
                    &aml::ResourceTemplate::new(vec![
                        &aml::Memory32Fixed::new(true, base, size),
                        // Like Firecracker: edge-triggered, active high, exclusive (the monitor
                        // signals these through irqfd, i.e. as edges).
                        &aml::Interrupt::new(true, true, false, false, d.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut sb);
    }
    bytes.extend(aml::Scope::raw("\\_SB_".into(), sb));
    Ok(bytes)
}

fn dsdt(virtio: &[VirtioMmioInfo]) -> Result<Vec<u8>, AcpiError> {
    // Revision 2: 64-bit AML integers.
    let mut sdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.append_slice(&dsdt_aml(virtio)?);
    Ok(sdt.as_slice().to_vec())
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        // No fixed power or sleep button.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    b.reset_reg = io_register(ACPI_RESET_PORT);
    b.reset_value = ACPI_RESET_VALUE;
    b.sleep_control_reg = io_register(ACPI_SLEEP_CONTROL_PORT);
    b.sleep_status_reg = io_register(ACPI_SLEEP_STATUS_PORT);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    let mut bytes = Vec::new();
    b.finalize().to_aml_bytes(&mut bytes);
    bytes
}

/// The MADT: local APIC address, one enabled local APIC per vCPU (APIC id = vCPU index) and
/// the IOAPIC with GSI base 0. No interrupt source overrides: KVM's default GSI routing (which
/// ftvm keeps) wires ISA IRQ n to IOAPIC pin n, IRQ 0 included, so the identity mapping the
/// guest assumes without overrides is the true one. The PC/AT dual-8259 flag stays clear; a
/// hardware-reduced guest ignores the PIC anyway.
fn madt(num_vcpus: u8) -> Vec<u8> {
    let mut sdt = Sdt::new(*b"APIC", 44, 5, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.write_u32(36, APIC_ADDR);
    sdt.write_u32(40, 0);
    let mut entries = Vec::new();
    for i in 0..num_vcpus {
        ProcessorLocalApic::new(i, i, EnabledStatus::Enabled).to_aml_bytes(&mut entries);
    }
    IoApic::new(0, IOAPIC_ADDR, 0).to_aml_bytes(&mut entries);
    sdt.append_slice(&entries);
    sdt.as_slice().to_vec()
}

fn align16(x: u64) -> u64 {
    (x + 15) & !15
}

/// Writes the tables at `layout::ACPI_START` and returns the RSDP address.
pub fn create_acpi_tables(
    mem: &GuestMemory,
    num_vcpus: u8,
    virtio: &[VirtioMmioInfo],
) -> Result<GuestAddress, AcpiError> {
    if num_vcpus == 0 {
        return Err(AcpiError::Invalid("a VM needs at least one vCPU".into()));
    }
    if virtio.len() > VIRTIO_MMIO_MAX_DEVICES {
        return Err(AcpiError::Invalid(format!(
            "{} virtio-mmio devices, at most {VIRTIO_MMIO_MAX_DEVICES} are supported",
            virtio.len()
        )));
    }
    let rsdp_addr = ACPI_START;
    let mut next = align16(rsdp_addr + Rsdp::len() as u64);
    let mut place = |len: usize| {
        let at = next;
        next = align16(at + len as u64);
        at
    };

    let dsdt = dsdt(virtio)?;
    let dsdt_addr = place(dsdt.len());
    let fadt = fadt(dsdt_addr);
    let fadt_addr = place(fadt.len());
    let madt = madt(num_vcpus);
    let madt_addr = place(madt.len());
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let mut xsdt_bytes = Vec::new();
    xsdt.to_aml_bytes(&mut xsdt_bytes);
    let xsdt_addr = place(xsdt_bytes.len());
    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);

    if next > ACPI_START + ACPI_SIZE {
        return Err(AcpiError::Write(format!(
            "the tables need {} bytes, {ACPI_SIZE} are reserved",
            next - ACPI_START
        )));
    }
    for (addr, bytes) in [
        (rsdp_addr, &rsdp),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt_bytes),
    ] {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| AcpiError::Write(format!("at {addr:#x}: {e}")))?;
    }
    Ok(GuestAddress(rsdp_addr))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE};
    use vm_memory::GuestMemoryMmap;

    fn memory(size: usize) -> GuestMemory {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)]).unwrap()
    }

    fn devices(n: usize) -> Vec<VirtioMmioInfo> {
        (0..n)
            .map(|i| VirtioMmioInfo {
                addr: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_IRQ_BASE + i as u32,
            })
            .collect()
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }
    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// A table read back from guest memory, after checking its header.
    fn table(mem: &GuestMemory, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let header = read(mem, addr, 36);
        assert_eq!(&header[..4], sig);
        let t = read(mem, addr, u32_at(&header, 4) as usize);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&t[10..16], &OEM_ID);
        assert_eq!(&t[16..24], &OEM_TABLE_ID);
        t
    }

    struct Tables {
        xsdt_entries: Vec<u64>,
        fadt: Vec<u8>,
        dsdt: Vec<u8>,
        madt: Vec<u8>,
    }

    fn tables(mem: &GuestMemory, rsdp_addr: GuestAddress) -> Tables {
        let rsdp = read(mem, rsdp_addr.0, 36);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "RSDP revision");
        assert_eq!(&rsdp[9..15], &OEM_ID);
        assert_eq!(u32_at(&rsdp, 20), 36);
        let xsdt = table(mem, u64_at(&rsdp, 24), b"XSDT");
        let xsdt_entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        let mut fadt = None;
        let mut madt = None;
        for &e in &xsdt_entries {
            assert!((ACPI_START..ACPI_START + ACPI_SIZE).contains(&e));
            match &read(mem, e, 4)[..] {
                b"FACP" => fadt = Some(table(mem, e, b"FACP")),
                b"APIC" => madt = Some(table(mem, e, b"APIC")),
                other => panic!("unexpected table {other:?}"),
            }
        }
        let fadt = fadt.expect("XSDT lists the FADT");
        let dsdt = table(mem, u64_at(&fadt, 140), b"DSDT");
        Tables {
            xsdt_entries,
            fadt,
            dsdt,
            madt: madt.expect("XSDT lists the MADT"),
        }
    }

    fn contains(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn tables_are_linked_and_checksummed() {
        let mem = memory(64 << 20);
        let rsdp = create_acpi_tables(&mem, 2, &devices(2)).unwrap();
        assert_eq!(rsdp, GuestAddress(ACPI_START));
        assert_eq!(
            rsdp.0 % 16,
            0,
            "the RSDP is where a BIOS-area scan finds it"
        );
        let t = tables(&mem, rsdp);
        assert_eq!(t.xsdt_entries.len(), 2);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_our_registers() {
        let mem = memory(64 << 20);
        let t = tables(&mem, create_acpi_tables(&mem, 1, &[]).unwrap());
        let f = &t.fadt;
        assert_eq!(f.len(), 276);
        assert_eq!(f[8], 6, "FADT major version");
        assert_eq!(u32_at(f, 40), 0, "32-bit DSDT pointer unused");
        assert_eq!(u32_at(f, 76), 0, "no PM timer block");
        let flags = u32_at(f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(u16_at(f, 109), IAPC_BOOT_ARCH);
        assert_eq!(u16_at(f, 109) & (1 << 1), 0, "no 8042");
        // Generic address structures: space 1 = system I/O, 8 bits, byte access.
        let gas = |o: usize| (f[o], f[o + 1], f[o + 3], u64_at(f, o + 4));
        assert_eq!(gas(116), (1, 8, 1, u64::from(ACPI_RESET_PORT)));
        assert_eq!(f[128], ACPI_RESET_VALUE);
        assert_eq!(gas(244), (1, 8, 1, u64::from(ACPI_SLEEP_CONTROL_PORT)));
        assert_eq!(gas(256), (1, 8, 1, u64::from(ACPI_SLEEP_STATUS_PORT)));
        assert_eq!(gas(208).3, 0, "no X_PM_TMR_BLK");
        assert_eq!(&f[268..276], b"FTVMKVM ");
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu_and_the_ioapic() {
        for vcpus in [1u8, 2, 8] {
            let mem = memory(64 << 20);
            let t = tables(&mem, create_acpi_tables(&mem, vcpus, &devices(1)).unwrap());
            let m = &t.madt;
            assert_eq!(u32_at(m, 36), APIC_ADDR);
            let mut lapics = Vec::new();
            let mut ioapics = Vec::new();
            let mut o = 44;
            while o < m.len() {
                let (ty, len) = (m[o], m[o + 1] as usize);
                assert!(len >= 2 && o + len <= m.len());
                match ty {
                    0 => {
                        assert_eq!(len, 8);
                        lapics.push((m[o + 2], m[o + 3], u32_at(m, o + 4)));
                    }
                    1 => {
                        assert_eq!(len, 12);
                        ioapics.push((m[o + 2], u32_at(m, o + 4), u32_at(m, o + 8)));
                    }
                    other => panic!("unexpected MADT entry type {other}"),
                }
                o += len;
            }
            assert_eq!(o, m.len());
            let want: Vec<(u8, u8, u32)> = (0..vcpus).map(|i| (i, i, 1)).collect();
            assert_eq!(lapics, want);
            assert_eq!(ioapics, [(0, IOAPIC_ADDR, 0)]);
        }
    }

    #[test]
    fn dsdt_describes_s5_com1_and_every_virtio_device() {
        let mem = memory(64 << 20);
        let devs = devices(3);
        let t = tables(&mem, create_acpi_tables(&mem, 1, &devs).unwrap());
        let d = &t.dsdt;
        assert_eq!(d[8], 2, "DSDT revision 2");
        assert_eq!(contains(d, b"LNRO0005\0"), 3);
        // Name(\_S5_, Package(4) {5, 0, 0, 0})
        assert_eq!(
            contains(
                d,
                &[
                    0x08,
                    b'\\',
                    b'_',
                    b'S',
                    b'5',
                    b'_',
                    0x12,
                    0x07,
                    4,
                    0x0a,
                    SLEEP_TYPE_S5,
                    0,
                    0,
                    0
                ]
            ),
            1
        );
        let mut pnp0501 = Vec::new();
        aml::EISAName::new("PNP0501").to_aml_bytes(&mut pnp0501);
        assert_eq!(contains(d, &pnp0501), 1);
        // IO(Decode16, 0x3f8, 0x3f8, 1, 8) and Interrupt(consumer, edge, high, exclusive) {4}
        let port = SERIAL_PORT.to_le_bytes();
        assert_eq!(
            contains(d, &[0x47, 1, port[0], port[1], port[0], port[1], 1, 8]),
            1
        );
        assert_eq!(
            contains(d, &[0x89, 6, 0, 0b0011, 1, SERIAL_IRQ as u8, 0, 0, 0]),
            1
        );
        for (i, dev) in devs.iter().enumerate() {
            assert_eq!(contains(d, format!("V{i:03}").as_bytes()), 1);
            let mut mem32 = vec![0x86, 9, 0, 1];
            mem32.extend_from_slice(&(dev.addr as u32).to_le_bytes());
            mem32.extend_from_slice(&(dev.size as u32).to_le_bytes());
            assert_eq!(contains(d, &mem32), 1, "Memory32Fixed of device {i}");
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&dev.gsi.to_le_bytes());
            assert_eq!(contains(d, &irq), 1, "interrupt of device {i}");
        }
    }

    /// ACPICA's disassembler (Debian: acpica-tools, installed by scripts/setup) accepts the DSDT.
    #[test]
    fn iasl_disassembles_the_dsdt() {
        assert!(
            std::process::Command::new("iasl")
                .arg("-v")
                .output()
                .is_ok(),
            "this test needs iasl (Debian: acpica-tools); `sudo ./scripts/setup` installs it"
        );
        let dir = std::env::temp_dir().join(format!("ftvm-acpi-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let aml_path = dir.join("dsdt.dat");
        std::fs::write(&aml_path, dsdt(&devices(2)).unwrap()).unwrap();
        let out = std::process::Command::new("iasl")
            .arg("-d")
            .arg(&aml_path)
            .current_dir(&dir)
            .output()
            .unwrap();
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            dsl.contains("LNRO0005") && dsl.contains("PNP0501") && dsl.contains("_S5_"),
            "{dsl}"
        );
        assert!(
            dsl.contains("Memory32Fixed") && dsl.contains("0xD0001000"),
            "{dsl}"
        );
    }

    #[test]
    fn bad_input_is_refused() {
        let mem = memory(64 << 20);
        assert!(matches!(
            create_acpi_tables(&mem, 0, &[]),
            Err(AcpiError::Invalid(_))
        ));
        assert!(matches!(
            create_acpi_tables(&mem, 1, &devices(VIRTIO_MMIO_MAX_DEVICES + 1)),
            Err(AcpiError::Invalid(_))
        ));
        let high = [VirtioMmioInfo {
            addr: 1 << 33,
            size: 0x1000,
            gsi: 5,
        }];
        assert!(matches!(
            create_acpi_tables(&mem, 1, &high),
            Err(AcpiError::Invalid(_))
        ));
        // Less RAM than the ACPI area.
        let small = memory(0x80000);
        assert!(matches!(
            create_acpi_tables(&small, 1, &[]),
            Err(AcpiError::Write(_))
        ));
    }
}
