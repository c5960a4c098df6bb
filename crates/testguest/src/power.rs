//! Power off through the ACPI sleep-control register.

/// The sleep-control register as MMIO (the monitor's `layout::ACPI_MMIO_BASE`); port 0x3c0 is
/// out of reach at CPL 3.
const SLEEP_CONTROL_MMIO: usize = 0xd000_9000;
/// SLP_EN | SLP_TYP(S5) << 2.
const SLEEP_S5: u8 = 0x34;

/// Asks the monitor to power the VM off; spins if it does not.
pub fn off() -> ! {
    // SAFETY: the ACPI MMIO window is identity mapped device memory; the write only reaches
    // the monitor's power device.
    unsafe { core::ptr::write_volatile(SLEEP_CONTROL_MMIO as *mut u8, SLEEP_S5) };
    loop {
        core::hint::spin_loop();
    }
}

/// The ACPI reset register as MMIO (offset 2 of the window).
const RESET_MMIO: usize = SLEEP_CONTROL_MMIO + 2;
/// The value the FADT names for a reset.
const RESET_VALUE: u8 = 1;

/// Asks the monitor to reset (reboot) the VM; spins if it does not.
pub fn reboot() -> ! {
    // SAFETY: as in `off`: a write to the monitor's power device.
    unsafe { core::ptr::write_volatile(RESET_MMIO as *mut u8, RESET_VALUE) };
    loop {
        core::hint::spin_loop();
    }
}
