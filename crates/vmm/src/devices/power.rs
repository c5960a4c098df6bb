//! The ACPI hardware-reduced sleep control, sleep status and reset registers (FADT points here).

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::{ACPI_RESET_VALUE, SLEEP_ENABLE, SLEEP_TYPE_S5};

/// Registers at `ACPI_SLEEP_CONTROL_PORT` (offset 0), sleep status (1) and reset (2).
pub struct AcpiPower {
    exit: Arc<ExitSignal>,
}

impl AcpiPower {
    /// A power device that reports power-off and reset to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiPower {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            0 if value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == SLEEP_TYPE_S5 => {
                self.exit.set(ExitReason::PowerOff)
            }
            2 if value == ACPI_RESET_VALUE => self.exit.set(ExitReason::Reboot),
            _ => {}
        }
    }
}
