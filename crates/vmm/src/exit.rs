//! How a running VM ends, and the signal the monitor's main thread waits on.

use std::sync::{Condvar, Mutex};
use std::time::Duration;

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5); carries no status.
    PowerOff,
    /// The guest asked for a reboot (ACPI reset register, i8042, triple fault).
    Reboot,
    /// The control API asked for a shutdown.
    Shutdown,
    /// A vCPU hit an error the monitor cannot continue from.
    Error(String),
}

/// A one-shot, first-writer-wins exit notification.
#[derive(Default)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    cond: Condvar,
}

impl ExitSignal {
    /// Records `reason` unless an earlier one was recorded, and wakes the waiter.
    pub fn set(&self, reason: ExitReason) {
        let mut r = crate::devices::lock(&self.reason);
        if r.is_none() {
            *r = Some(reason);
            self.cond.notify_all();
        }
    }

    /// The recorded reason, if any.
    pub fn get(&self) -> Option<ExitReason> {
        crate::devices::lock(&self.reason).clone()
    }

    /// Waits until a reason is recorded, or `timeout` passes.
    pub fn wait_timeout(&self, timeout: Duration) -> Option<ExitReason> {
        let r = crate::devices::lock(&self.reason);
        let (r, _) = self
            .cond
            .wait_timeout_while(r, timeout, |r| r.is_none())
            .unwrap_or_else(|p| p.into_inner());
        r.clone()
    }
}
