//! ftvm FT protection: a guest runs on the primary, its complete state is checkpointed to the
//! backup hundreds of times a second, network output is released only when the checkpoint that
//! covers it is acknowledged, and the backup resumes the guest from the last committed
//! checkpoint when the primary is lost.
//!
//! - [`wire`]: authenticated, checksummed frames on the A-link.
//! - [`protocol`]: what the frames carry.
//! - [`pages`]: copying, compressing and applying guest pages.
//! - [`primary`]: the primary's engine; the per-checkpoint path is `Primary::checkpoint`.
//! - [`backup`]: the backup's engine and failover.
//! - [`liveness`]: the one place that decides who may be live.
//! - [`arbiter`]: the arbiter asked before a takeover or a degrade.
//! - [`watch`]: the watch path, the second heartbeat the two-node arbiter decides from.

pub mod announce;
pub mod arbiter;
pub mod backup;
pub mod gate;
pub mod link;
pub mod liveness;
pub mod pages;
pub mod primary;
mod primary_end;
mod primary_sync;
pub mod protocol;
pub mod status;
pub mod watch;
pub mod wire;

pub use backup::{run_backup, BackupOptions, BackupOutcome};
pub use primary::{start_primary, FtOptions};
pub use status::{FtState, FtStatus};

/// Replication errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A-link trouble.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// The monitor failed.
    #[error(transparent)]
    Vmm(#[from] vmm::Error),
    /// The peer sent something we cannot use.
    #[error("FT protocol: {0}")]
    Protocol(String),
    /// Local I/O.
    #[error("{0}")]
    Io(String),
}
