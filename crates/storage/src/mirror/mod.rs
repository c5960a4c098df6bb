//! Synchronous two-node mirroring (DRBD protocol C semantics) with a persisted dirty-region
//! bitmap and incremental resync. See [`backend`] for the guarantees.

pub mod backend;
pub mod bitmap;
pub mod protocol;
pub mod target;

pub use backend::{verify, Difference, MirrorConfig, MirrorStatus, MirroredBackend, PeerClient};
pub use bitmap::DirtyBitmap;
pub use link::Secret;
pub use target::{load_target_state, MirrorTarget, TargetState};
