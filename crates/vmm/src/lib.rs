//! ftvm's KVM virtual machine monitor: boots a stock Linux bzImage or the ELF test guest with a
//! serial console, virtio-mmio block and net devices, ACPI tables; pauses and resumes; collects
//! dirty pages; captures and restores the complete VM state.

pub mod acpi;
pub mod boot;
pub mod config;
pub mod cpu_model;
pub mod devices;
pub mod dirty;
pub mod exit;
pub mod layout;
pub mod memory;
pub mod snapshot;
pub mod vcpu;
pub mod vm;

pub use config::{ConsoleConfig, DiskConfig, NetConfig, VmConfig};
pub use exit::ExitReason;
pub use vm::{Vm, VmState, VmStatus};

/// Monitor errors; each message names the problem and, where there is one, the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration.
    #[error("{0}")]
    Config(String),
    /// Loading the guest failed.
    #[error("{0}")]
    Boot(String),
    /// A device (disk, tap, console) could not be set up.
    #[error("{0}")]
    Device(String),
    /// Guest memory could not be set up.
    #[error("{0}")]
    Memory(String),
    /// A KVM operation failed.
    #[error("KVM: {0}")]
    Kvm(String),
    /// The VM is not in the state the operation needs.
    #[error("{0}")]
    State(String),
    /// A snapshot is unusable.
    #[error("{0}")]
    Snapshot(String),
}
