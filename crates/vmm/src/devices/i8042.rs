//! The part of the i8042 keyboard controller a guest uses to reset the machine (command 0xfe).

use std::sync::Arc;

use super::BusDevice;
use crate::exit::{ExitReason, ExitSignal};

/// Status register offset within the 0x60..0x65 range.
const COMMAND_OFFSET: u64 = 4;
/// "Pulse output line 0": the CPU reset line.
const CMD_RESET_CPU: u8 = 0xfe;

/// A minimal i8042: no keyboard, no buffered data, reset through command 0xfe.
pub struct I8042 {
    exit: Arc<ExitSignal>,
}

impl I8042 {
    /// An i8042 that reports a reset to `exit`.
    pub fn new(exit: Arc<ExitSignal>) -> Self {
        Self { exit }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            self.exit.set(ExitReason::Reboot);
        }
    }
}
