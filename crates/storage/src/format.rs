//! Which format a disk is opened as, and bounded, loop-free qcow2 backing chains.
//!
//! A disk's format is never guessed into qcow2: a guest can write a qcow2 header into its own
//! raw disk, and opening that as qcow2 would let it name any host file as its backing file.
//! So the format is the caller's (`format=raw|qcow2`), else the pool volume's metadata, else a
//! file that looks like qcow2 is refused and anything else is raw.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::{detect_format, BlockBackend, ImageFormat, OpenError, Qcow2, RawFile};

/// Most backing files below an image.
pub const MAX_BACKING_DEPTH: usize = 16;

/// The images of a backing chain opened so far, top first: (device, inode, path).
pub(crate) type Chain = Vec<(u64, u64, PathBuf)>;

/// Opens the disk at `path` (see the module docs for how its format is decided).
pub fn open_disk(
    path: &Path,
    read_only: bool,
    format: Option<ImageFormat>,
) -> Result<Box<dyn BlockBackend>, OpenError> {
    let format = match format.or_else(|| pool_volume_format(path)) {
        Some(f) => f,
        None => {
            let probed = detect_format(path).map_err(|source| OpenError::Open {
                path: path.display().to_string(),
                source,
            })?;
            if probed == ImageFormat::Qcow2 {
                return Err(OpenError::Format {
                    path: path.display().to_string(),
                    reason: "it looks like a qcow2 image but no format was given: pass \
                             format=qcow2 to use it as qcow2 (only for an image you made), or \
                             format=raw to give the guest its bytes"
                        .into(),
                });
            }
            ImageFormat::Raw
        }
    };
    Ok(match format {
        ImageFormat::Raw => Box::new(RawFile::open(path, read_only)?),
        ImageFormat::Qcow2 => Box::new(Qcow2::open(path, read_only)?),
    })
}

/// The format recorded for `path` when it is a pool volume's data file (its metadata
/// `NAME.volume.json` beside it names this file).
pub fn pool_volume_format(path: &Path) -> Option<ImageFormat> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    let file = path.file_name()?.to_str()?;
    let name = path.file_stem()?.to_str()?;
    let meta = crate::pool::Pool::open(dir).ok()?.load(name).ok()?;
    (meta.file == file).then_some(meta.format)
}

fn identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Records `path` (opened as `file`) as the next image of `chain`.
pub(crate) fn enter(chain: &mut Chain, file: &std::fs::File, path: &Path) -> std::io::Result<()> {
    let m = file.metadata()?;
    chain.push((m.dev(), m.ino(), path.to_path_buf()));
    Ok(())
}

/// Opens `full`, the backing file of the last image in `chain`, read-only as `format` (probed
/// when the image records none: the image's header is the operator's, not the guest's).
/// Refuses a chain deeper than [`MAX_BACKING_DEPTH`] and one that loops.
pub(crate) fn open_backing(
    full: &Path,
    format: Option<&str>,
    chain: &mut Chain,
) -> std::io::Result<Box<dyn BlockBackend>> {
    let names = || {
        chain
            .iter()
            .map(|(_, _, p)| p.display().to_string())
            .collect::<Vec<_>>()
            .join(" -> ")
    };
    if chain.len() > MAX_BACKING_DEPTH {
        return Err(std::io::Error::other(format!(
            "backing chain deeper than {MAX_BACKING_DEPTH} images ({} -> {}): flatten it with \
             qemu-img convert",
            names(),
            full.display()
        )));
    }
    let id = identity(full)
        .map_err(|e| std::io::Error::other(format!("backing file {}: {e}", full.display())))?;
    if chain.iter().any(|(d, i, _)| (*d, *i) == id) {
        return Err(std::io::Error::other(format!(
            "backing chain loops: {} -> {}; fix the backing file names (qemu-img rebase)",
            names(),
            full.display()
        )));
    }
    let format = match format {
        Some("raw") => ImageFormat::Raw,
        Some("qcow2") => ImageFormat::Qcow2,
        Some(other) => {
            return Err(std::io::Error::other(format!(
                "backing file {} has format {other:?}; only raw and qcow2 are supported",
                full.display()
            )))
        }
        None => detect_format(full)?,
    };
    let b: Box<dyn BlockBackend> = match format {
        ImageFormat::Raw => Box::new(RawFile::open(full, true).map_err(std::io::Error::other)?),
        ImageFormat::Qcow2 => {
            Box::new(Qcow2::open_in_chain(full, true, chain).map_err(std::io::Error::other)?)
        }
    };
    Ok(b)
}
