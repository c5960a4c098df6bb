//! A raw image file: byte `n` of the disk is byte `n` of the file.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{BlockBackend, OpenError};

/// A raw disk image backed by a regular file (or block device).
#[derive(Debug)]
pub struct RawFile {
    file: File,
    size: u64,
    read_only: bool,
}

impl RawFile {
    /// Opens `path`; with `read_only` the file is opened O_RDONLY and writes are refused.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, OpenError> {
        let open_err = |source| OpenError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        if size % 512 != 0 {
            return Err(OpenError::Format {
                path: path.display().to_string(),
                reason: format!("size {size} is not a multiple of 512 bytes; resize it (truncate -s) to a multiple of 512"),
            });
        }
        Ok(Self {
            file,
            size,
            read_only,
        })
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(offset, buf.len(), self.size)?;
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        check_range(offset, buf.len(), self.size)?;
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    /// Punches a hole: the range reads as zeros and its blocks return to the file system.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "disk is read-only",
            ));
        }
        check_range(
            offset,
            usize::try_from(len).unwrap_or(usize::MAX),
            self.size,
        )?;
        // SAFETY: fallocate only reads its integer arguments; `self.file` owns the descriptor
        // for the duration of the call.
        let r = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // A file system without hole punching: write the zeros.
        let mut done = 0;
        let zeros = vec![0u8; (1u64 << 20).min(len) as usize];
        while done < len {
            let n = (zeros.len() as u64).min(len - done) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Fails when `[offset, offset + len)` does not lie inside a device of `size` bytes.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("access of {len} bytes at {offset} is beyond the end of a {size}-byte disk"),
        )),
    }
}
