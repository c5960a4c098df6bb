//! ftvm's KVM virtual machine monitor.

pub mod acpi;
pub mod layout;
pub mod memory;
