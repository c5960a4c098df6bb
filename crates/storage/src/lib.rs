//! ftvm storage: the block-device trait the monitor's virtio-blk uses, and its backends.

pub mod raw;

use std::io;
use std::path::Path;

pub use raw::RawFile;

/// A virtual disk as the monitor sees it: a byte-addressable device of fixed size.
///
/// Offsets and lengths given by virtio-blk are multiples of 512; backends may rely on that.
pub trait BlockBackend: Send {
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`; a read past the end is an error.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`; fails on a read-only backend.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The file cannot be opened.
    #[error("cannot open disk {path}: {source} (check the path and its permissions)")]
    Open {
        /// The disk path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// The file is not a disk image we can use.
    #[error("disk {path} is not usable: {reason}")]
    Format {
        /// The disk path.
        path: String,
        /// What is wrong.
        reason: String,
    },
}

/// Opens a disk image, detecting its format (raw for now; qcow2 is detected by its magic).
pub fn open_backend(path: &Path, read_only: bool) -> Result<Box<dyn BlockBackend>, OpenError> {
    Ok(Box::new(RawFile::open(path, read_only)?))
}
