//! ftvm storage: the block-device trait the monitor's virtio-blk uses, its backends (raw,
//! qcow2), volumes in pools, and synchronous two-node mirroring.

pub mod fault;
pub mod mirror;
pub mod pool;
pub mod qcow2;
pub mod raw;
pub mod size;

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub use qcow2::Qcow2;
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
    /// Makes `len` bytes at `offset` read as zeros, freeing their space where the format can
    /// (a guest's TRIM, virtio-blk DISCARD and WRITE_ZEROES). The default writes zeros.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(&zeros[..n as usize], offset + done)?;
            done += n;
        }
        Ok(())
    }
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
    /// The image uses a feature ftvm does not implement (the image itself may be fine).
    #[error("disk {path} uses a feature ftvm does not support: {reason}")]
    Unsupported {
        /// The disk path.
        path: String,
        /// Which feature, and what to do.
        reason: String,
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

/// On-disk image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Byte `n` of the disk is byte `n` of the file.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl std::fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

impl std::str::FromStr for ImageFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            _ => Err(format!("unknown format {s:?}; use raw or qcow2")),
        }
    }
}

/// Detects the format of the image at `path` by its magic (anything not qcow2 is raw).
pub fn detect_format(path: &Path) -> io::Result<ImageFormat> {
    let f = File::open(path)?;
    let mut magic = [0u8; 4];
    let n = f.read_at(&mut magic, 0)?;
    Ok(if n == 4 && magic == qcow2::QCOW2_MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Opens a disk image, detecting its format: qcow2 by its magic, anything else as raw.
pub fn open_backend(path: &Path, read_only: bool) -> Result<Box<dyn BlockBackend>, OpenError> {
    let format = detect_format(path).map_err(|source| OpenError::Open {
        path: path.display().to_string(),
        source,
    })?;
    Ok(match format {
        ImageFormat::Qcow2 => Box::new(Qcow2::open(path, read_only)?),
        ImageFormat::Raw => Box::new(RawFile::open(path, read_only)?),
    })
}
