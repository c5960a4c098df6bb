//! FT disk replication: the writes a guest made during a checkpoint epoch, recorded so they
//! travel with the checkpoint and the backup applies them when it commits that epoch.

use std::sync::Mutex;

use crate::devices::lock;

/// One guest write: byte offset and data.
pub type DiskWrite = (u64, Vec<u8>);

/// A per-disk log of writes, active only while FT protection is on.
#[derive(Default)]
pub struct DiskLog {
    inner: Mutex<Option<Vec<DiskWrite>>>,
}

impl DiskLog {
    /// Starts recording writes.
    pub fn enable(&self) {
        let mut g = lock(&self.inner);
        if g.is_none() {
            *g = Some(Vec::new());
        }
    }

    /// Stops recording and drops what was recorded.
    pub fn disable(&self) {
        *lock(&self.inner) = None;
    }

    /// Records a completed write if recording.
    pub fn record(&self, offset: u64, data: &[u8]) {
        if let Some(log) = lock(&self.inner).as_mut() {
            log.push((offset, data.to_vec()));
        }
    }

    /// Takes the writes of the epoch that ends now (call while the VM is paused).
    pub fn seal(&self) -> Vec<DiskWrite> {
        lock(&self.inner)
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }
}
