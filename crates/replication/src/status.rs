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
    /// The primary is trying to reach its backup again, output held.
    Reconnecting,
    /// Protection ended (the guest powered off or rebooted).
    Stopped,
    /// This copy stopped because its peer is live (it never released unacknowledged output).
    Fenced,
}

/// Where the time of one checkpoint pause went, µs.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct PausePhases {
    /// Stopping the vCPUs and device threads.
    pub stop_us: u32,
    /// Collecting the dirty set.
    pub dirty_log_us: u32,
    /// Copying dirty pages.
    pub copy_us: u32,
    /// Saving vCPU and device state, sealing disk writes and output.
    pub state_us: u32,
    /// Resuming.
    pub resume_us: u32,
}

/// Pauses kept for percentiles.
const PAUSE_WINDOW: usize = 2048;

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
    /// Bytes of all checkpoint frames.
    pub total_bytes: u64,
    /// Phases of the last pause.
    pub last_phases: PausePhases,
    /// Median pause over the recent window, µs.
    pub pause_p50_us: u32,
    /// 99th-percentile pause over the recent window, µs.
    pub pause_p99_us: u32,
    #[serde(skip)]
    recent_pauses: Vec<u32>,
    #[serde(skip)]
    recent_next: usize,
    /// Frames refused (bad checksum, authentication, sequence).
    pub rejected_frames: u64,
    /// Why the state last changed.
    pub reason: String,
    /// Who is asked before a takeover or a degrade.
    pub arbiter: String,
    /// When the arbiter may grant both sides (the two-node arbiter: both paths cut, both
    /// nodes alive), for the console to show.
    pub split_brain_exposure: Option<String>,
    /// Sessions started (primary) or accepted (backup).
    pub sessions: u64,
    /// Backup: standbys poisoned because a checkpoint could not be applied.
    pub poisoned: u64,
}

impl FtSnapshot {
    /// Adds a pause to the window and refreshes the percentiles (every 64 pauses).
    pub fn record_pause(&mut self, us: u32) {
        if self.recent_pauses.len() < PAUSE_WINDOW {
            self.recent_pauses.push(us);
        } else {
            self.recent_pauses[self.recent_next] = us;
        }
        self.recent_next = (self.recent_next + 1) % PAUSE_WINDOW;
        if self.recent_next.is_multiple_of(64) || self.recent_pauses.len() < 64 {
            let mut v = self.recent_pauses.clone();
            v.sort_unstable();
            let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
            self.pause_p50_us = at(0.5);
            self.pause_p99_us = at(0.99);
        }
    }

    /// Forgets the pause window (e.g. between benchmark phases).
    pub fn reset_pauses(&mut self) {
        self.recent_pauses.clear();
        self.recent_next = 0;
    }
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
            total_bytes: 0,
            last_phases: PausePhases::default(),
            pause_p50_us: 0,
            pause_p99_us: 0,
            recent_pauses: Vec::new(),
            recent_next: 0,
            rejected_frames: 0,
            reason: String::new(),
            arbiter: String::new(),
            split_brain_exposure: None,
            sessions: 0,
            poisoned: 0,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_percentiles() {
        let st = FtStatus::new("primary");
        st.update(|s| (1..=128).for_each(|us| s.record_pause(us)));
        let s = st.get();
        assert_eq!((s.pause_p50_us, s.pause_p99_us), (65, 127));
    }
}
