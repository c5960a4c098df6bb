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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_only_while_enabled() {
        let log = DiskLog::default();
        log.record(0, b"before");
        assert!(log.seal().is_empty(), "nothing is kept before enable");
        log.enable();
        log.record(512, b"one");
        log.enable(); // enabling again keeps what is recorded
        log.record(0, b"two");
        log.disable();
        assert!(log.seal().is_empty(), "disable drops the records");
        log.record(4096, b"after");
        assert!(log.seal().is_empty());
    }

    #[test]
    fn seal_takes_one_epoch_in_order() {
        let log = DiskLog::default();
        log.enable();
        log.record(512, b"a");
        log.record(0, b"bb");
        log.record(512, b"c");
        assert_eq!(
            log.seal(),
            vec![
                (512, b"a".to_vec()),
                (0, b"bb".to_vec()),
                (512, b"c".to_vec())
            ]
        );
        assert!(log.seal().is_empty(), "an epoch's writes are sealed once");
        log.record(1024, b"next");
        assert_eq!(log.seal(), vec![(1024, b"next".to_vec())]);
    }
}
