//! FT role and state, shared between the engine and the control API.

use std::sync::Mutex;

use serde::Serialize;

/// Protection state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FtState {
    /// Connecting to the peer or copying memory before the first checkpoint.
    Syncing,
    /// Checkpoints are acknowledged.
    Protected,
    /// The primary lost its backup and runs unprotected.
    Degraded,
    /// The backup resumed the guest after losing the primary.
    FailedOver,
    /// Protection ended (orderly shutdown or a failure before the first checkpoint).
    Stopped,
}

/// Figures and state of an FT engine.
#[derive(Debug, Clone, Serialize)]
pub struct FtSnapshot {
    /// `primary` or `backup`.
    pub role: &'static str,
    /// The state.
    pub state: FtState,
    /// Last committed epoch.
    pub epoch: u64,
    /// Checkpoints committed.
    pub checkpoints: u64,
    /// Checkpoints per second over the last second.
    pub checkpoints_per_s: f64,
    /// Pause of the last checkpoint, µs.
    pub last_pause_us: u64,
    /// Pages in the last checkpoint.
    pub last_pages: u64,
    /// Bytes of the last checkpoint frame.
    pub last_bytes: u64,
    /// Frames refused (bad checksum, authentication, sequence).
    pub rejected_frames: u64,
    /// Why the state last changed.
    pub reason: String,
}

/// Thread-safe FT status.
pub struct FtStatus(Mutex<FtSnapshot>);

impl FtStatus {
    /// Initial status for `role`.
    pub fn new(role: &'static str) -> Self {
        FtStatus(Mutex::new(FtSnapshot {
            role,
            state: FtState::Syncing,
            epoch: 0,
            checkpoints: 0,
            checkpoints_per_s: 0.0,
            last_pause_us: 0,
            last_pages: 0,
            last_bytes: 0,
            rejected_frames: 0,
            reason: String::new(),
        }))
    }

    /// Applies `f` to the status.
    pub fn update(&self, f: impl FnOnce(&mut FtSnapshot)) {
        f(&mut self.0.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Sets the state and why.
    pub fn set_state(&self, state: FtState, reason: impl Into<String>) {
        let reason = reason.into();
        tracing::info!(?state, %reason, "FT state");
        self.update(|s| {
            s.state = state;
            s.reason = reason;
        });
    }

    /// A copy of the status.
    pub fn get(&self) -> FtSnapshot {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
