//! Storage pools and volumes.
//!
//! A pool is a directory. Each volume `N` in it has:
//!
//! - `N.volume.json`: versioned, crc32-checksummed metadata, replaced atomically
//!   (temp file, fsync, rename, fsync of the directory);
//! - `N.raw` or `N.qcow2`: the data;
//! - while an import is unfinished, `N.import.partial`; mirroring adds `N.mirror-bitmap`
//!   and `N.mirror-state.json`.
//!
//! An optional `pool.json` gives the pool a capacity. A volume reserves a *container* of
//! `2 × size + (snapshots retained + 1) × snapshot size` bytes; a create, resize, import or
//! snapshot that does not fit in the pool (its capacity, and the file system's free space
//! less what existing volumes may still claim) is refused.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::qcow2::{CreateOptions, Qcow2, SnapshotInfo, QCOW2_MAGIC};
use crate::size::human;
use crate::{BlockBackend, ImageFormat, RawFile};

const META_VERSION: u32 = 1;
const POOL_FILE: &str = "pool.json";
/// Import progress is made durable at least this often.
const IMPORT_CHECKPOINT_BYTES: u64 = 64 << 20;

/// Errors from pool and volume operations; messages name the fix.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A problem the user can fix, explained.
    #[error("{0}")]
    Invalid(String),
    /// The pool lacks room; the message shows the numbers.
    #[error("{0}")]
    NoRoom(String),
    /// An I/O error with what was being done.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The error.
        source: io::Error,
    },
}

/// Result of pool operations.
pub type Result<T> = std::result::Result<T, PoolError>;

trait Ctx<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T>;
}
impl<T> Ctx<T> for io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| PoolError::Io {
            context: f(),
            source,
        })
    }
}

/// An unfinished import, recorded so it can be resumed.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImportState {
    /// Where the bytes came from (a path or `-`).
    pub source: String,
    /// The source's length when known.
    pub source_len: Option<u64>,
    /// Bytes durably copied so far.
    pub bytes_done: u64,
    /// crc32 of those bytes (identifies the source on resume).
    pub prefix_crc: u32,
}

/// Everything recorded about a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VolumeMeta {
    /// Volume name (unique in the pool).
    pub name: String,
    /// Data file format.
    pub format: ImageFormat,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Snapshots the container is sized for.
    pub snapshots_retained: u32,
    /// Bytes reserved per snapshot.
    pub snapshot_size: u64,
    /// Data file name inside the pool.
    pub file: String,
    /// Creation time (Unix seconds).
    pub created_unix: u64,
    /// Random identity of this replica; a new or replaced replica gets a new one.
    pub replica_id: u64,
    /// Set while an import is unfinished.
    #[serde(default)]
    pub import: Option<ImportState>,
}

impl VolumeMeta {
    /// Bytes reserved in the pool: 2 × size + (snapshots retained + 1) × snapshot size.
    pub fn container_size(&self) -> u64 {
        container_size(self.size, self.snapshots_retained, self.snapshot_size)
    }
}

/// 2 × size + (retained + 1) × snapshot size.
pub fn container_size(size: u64, retained: u32, snapshot_size: u64) -> u64 {
    size.saturating_mul(2)
        .saturating_add((retained as u64 + 1).saturating_mul(snapshot_size))
}

fn container_formula(size: u64, retained: u32, snapshot_size: u64) -> String {
    format!(
        "{} = 2 × {} + ({} + 1) × {}",
        human(container_size(size, retained, snapshot_size)),
        human(size),
        retained,
        human(snapshot_size)
    )
}

#[derive(Serialize, Deserialize)]
struct MetaFile {
    version: u32,
    crc32: String,
    volume: VolumeMeta,
}

#[derive(Serialize, Deserialize)]
struct PoolConfig {
    version: u32,
    capacity: Option<u64>,
}

/// How much room a pool has, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Room {
    /// The pool's configured capacity, if any.
    pub capacity: Option<u64>,
    /// Sum of the containers of all volumes.
    pub reserved: u64,
    /// Volumes counted.
    pub volumes: usize,
    /// Free bytes on the file system (for unprivileged users).
    pub fs_free: u64,
    /// Bytes existing volumes have reserved but not yet written.
    pub unclaimed: u64,
    /// What a new reservation may use.
    pub available: u64,
}

impl Room {
    fn explain(&self) -> String {
        let mut s = String::new();
        if let Some(c) = self.capacity {
            s += &format!(
                "pool capacity {}, {} reserved by {} volume(s); ",
                human(c),
                human(self.reserved),
                self.volumes
            );
        }
        s += &format!(
            "file system free {}, of which {} is still claimable by existing volumes",
            human(self.fs_free),
            human(self.unclaimed)
        );
        s
    }
}

/// A storage pool: a directory of volumes.
#[derive(Debug, Clone)]
pub struct Pool {
    dir: PathBuf,
}

/// Where import bytes come from.
pub enum ImportSource<'a> {
    /// A file (seekable: resume re-reads the prefix to check it is the same).
    File(&'a Path),
    /// A stream such as stdin (resume consumes and checks the prefix).
    Stream(&'a mut (dyn Read + Send)),
}

/// Checks a volume name: letters, digits, `.`, `_`, `-`; 1 to 64 characters.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(PoolError::Invalid(format!(
            "invalid volume name {name:?}: use 1-64 letters, digits, '.', '_' or '-', not starting with '.'"
        )))
    }
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random 64-bit id from the kernel.
pub fn random_id() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: getrandom writes at most `b.len()` bytes into the valid buffer `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        // Fall back on time and pid; uniqueness, not secrecy, is what matters here.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        return t ^ ((std::process::id() as u64) << 32);
    }
    u64::from_le_bytes(b)
}

/// Writes `bytes` to `path` atomically: temp file, fsync, rename, fsync of the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// An exclusive advisory lock held until dropped.
pub struct LockGuard(#[allow(dead_code)] File);

fn lock_file(path: &Path) -> Result<LockGuard> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .ctx(|| format!("opening lock file {}", path.display()))?;
    // SAFETY: flock on a descriptor owned by `f`, which the guard keeps open.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
    if r != 0 {
        return Err(io::Error::last_os_error()).ctx(|| format!("locking {}", path.display()));
    }
    Ok(LockGuard(f))
}

impl Pool {
    /// Opens an existing pool directory.
    pub fn open(dir: &Path) -> Result<Pool> {
        if !dir.is_dir() {
            return Err(PoolError::Invalid(format!(
                "pool directory {} does not exist; create it (mkdir -p, or `ftvm volume pool-init --pool {}`)",
                dir.display(),
                dir.display()
            )));
        }
        Ok(Pool {
            dir: dir.to_path_buf(),
        })
    }

    /// Creates (if needed) a pool directory and records its capacity (`None`: the file system's).
    pub fn init(dir: &Path, capacity: Option<u64>) -> Result<Pool> {
        fs::create_dir_all(dir).ctx(|| format!("creating pool directory {}", dir.display()))?;
        let cfg = PoolConfig {
            version: META_VERSION,
            capacity,
        };
        let bytes =
            serde_json::to_vec_pretty(&cfg).map_err(|e| PoolError::Invalid(e.to_string()))?;
        write_atomic(&dir.join(POOL_FILE), &bytes)
            .ctx(|| format!("writing {}/{POOL_FILE}", dir.display()))?;
        Ok(Pool {
            dir: dir.to_path_buf(),
        })
    }

    /// The pool directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn capacity(&self) -> Result<Option<u64>> {
        let p = self.dir.join(POOL_FILE);
        match fs::read(&p) {
            Ok(b) => {
                let cfg: PoolConfig = serde_json::from_slice(&b).map_err(|e| {
                    PoolError::Invalid(format!(
                        "{} is corrupt ({e}); rewrite it with `ftvm volume pool-init`",
                        p.display()
                    ))
                })?;
                Ok(cfg.capacity)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).ctx(|| format!("reading {}", p.display())),
        }
    }

    fn meta_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.volume.json"))
    }

    /// Path of the volume's data file.
    pub fn data_path(&self, meta: &VolumeMeta) -> PathBuf {
        self.dir.join(&meta.file)
    }

    /// Path of a volume's side file with the given suffix (e.g. `mirror-bitmap`).
    pub fn side_path(&self, name: &str, suffix: &str) -> PathBuf {
        self.dir.join(format!("{name}.{suffix}"))
    }

    fn partial_path(&self, name: &str) -> PathBuf {
        self.side_path(name, "import.partial")
    }

    fn lock(&self) -> Result<LockGuard> {
        lock_file(&self.dir.join(".pool.lock"))
    }

    /// Reads and verifies a volume's metadata.
    pub fn load(&self, name: &str) -> Result<VolumeMeta> {
        validate_name(name)?;
        let p = self.meta_path(name);
        let bytes = match fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(PoolError::Invalid(format!(
                    "no volume {name:?} in pool {}; see `ftvm volume list --pool {}`",
                    self.dir.display(),
                    self.dir.display()
                )))
            }
            Err(e) => return Err(e).ctx(|| format!("reading {}", p.display())),
        };
        let mf: MetaFile = serde_json::from_slice(&bytes).map_err(|e| {
            PoolError::Invalid(format!(
                "metadata {} is unreadable ({e}); restore it from a backup or delete the volume",
                p.display()
            ))
        })?;
        if mf.version != META_VERSION {
            return Err(PoolError::Invalid(format!(
                "metadata {} has version {} (this ftvm knows {META_VERSION}); use a matching ftvm",
                p.display(),
                mf.version
            )));
        }
        let crc = format!(
            "{:08x}",
            crc32fast::hash(&serde_json::to_vec(&mf.volume).unwrap_or_default())
        );
        if crc != mf.crc32 {
            return Err(PoolError::Invalid(format!(
                "metadata {} fails its checksum (stored {}, computed {crc}): it was edited or damaged; restore it",
                p.display(),
                mf.crc32
            )));
        }
        Ok(mf.volume)
    }

    /// Writes a volume's metadata atomically.
    pub fn save(&self, meta: &VolumeMeta) -> Result<()> {
        let body = serde_json::to_vec(meta).map_err(|e| PoolError::Invalid(e.to_string()))?;
        let mf = MetaFile {
            version: META_VERSION,
            crc32: format!("{:08x}", crc32fast::hash(&body)),
            volume: meta.clone(),
        };
        let bytes =
            serde_json::to_vec_pretty(&mf).map_err(|e| PoolError::Invalid(e.to_string()))?;
        let p = self.meta_path(&meta.name);
        write_atomic(&p, &bytes).ctx(|| format!("writing {}", p.display()))
    }

    /// Names of all volumes (from their metadata files), sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        for e in fs::read_dir(&self.dir).ctx(|| format!("listing {}", self.dir.display()))? {
            let e = e.ctx(|| format!("listing {}", self.dir.display()))?;
            let n = e.file_name().to_string_lossy().into_owned();
            if let Some(name) = n.strip_suffix(".volume.json") {
                v.push(name.to_string());
            }
        }
        v.sort();
        Ok(v)
    }

    /// Every volume's metadata (or the error reading it).
    pub fn list(&self) -> Result<Vec<(String, Result<VolumeMeta>)>> {
        Ok(self
            .names()?
            .into_iter()
            .map(|n| {
                let m = self.load(&n);
                (n, m)
            })
            .collect())
    }

    /// Bytes of the file system actually used by a volume's data (and partial import).
    pub fn allocated(&self, meta: &VolumeMeta) -> u64 {
        let used = |p: &Path| fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0);
        used(&self.data_path(meta)) + used(&self.partial_path(&meta.name))
    }

    /// The room left in the pool, ignoring volume `except` (for resizes).
    pub fn room(&self, except: Option<&str>) -> Result<Room> {
        let capacity = self.capacity()?;
        let mut reserved = 0u64;
        let mut unclaimed = 0u64;
        let mut volumes = 0;
        for (name, m) in self.list()? {
            let Ok(m) = m else { continue };
            if Some(name.as_str()) == except {
                continue;
            }
            volumes += 1;
            reserved = reserved.saturating_add(m.container_size());
            unclaimed =
                unclaimed.saturating_add(m.container_size().saturating_sub(self.allocated(&m)));
        }
        let fs_free = statvfs_free(&self.dir).ctx(|| format!("statvfs {}", self.dir.display()))?;
        let mut available = fs_free.saturating_sub(unclaimed);
        if let Some(c) = capacity {
            available = available.min(c.saturating_sub(reserved));
        }
        Ok(Room {
            capacity,
            reserved,
            volumes,
            fs_free,
            unclaimed,
            available,
        })
    }

    fn check_room(
        &self,
        name: &str,
        size: u64,
        retained: u32,
        snap: u64,
        except: Option<&str>,
        what: &str,
    ) -> Result<()> {
        let room = self.room(except)?;
        let need = container_size(size, retained, snap);
        if need > room.available {
            return Err(PoolError::NoRoom(format!(
                "pool {} has no room to {what} volume {name:?}: its container needs {} ({need} bytes) but only {} ({} bytes) is available ({}); free space, give the pool more capacity, or use a smaller size or fewer retained snapshots",
                self.dir.display(),
                container_formula(size, retained, snap),
                human(room.available),
                room.available,
                room.explain()
            )));
        }
        Ok(())
    }

    /// Creates an empty volume.
    pub fn create(
        &self,
        name: &str,
        size: u64,
        format: ImageFormat,
        snapshots_retained: u32,
        snapshot_size: u64,
    ) -> Result<VolumeMeta> {
        validate_name(name)?;
        check_size(size)?;
        if !snapshot_size.is_multiple_of(512) {
            return Err(PoolError::Invalid(format!(
                "snapshot size {snapshot_size} is not a multiple of 512 bytes"
            )));
        }
        if format == ImageFormat::Raw && snapshots_retained > 0 {
            return Err(PoolError::Invalid(
                "raw volumes cannot have snapshots (raw has no snapshot metadata); use --format qcow2".into(),
            ));
        }
        let _lock = self.lock()?;
        if self.meta_path(name).exists() {
            return Err(PoolError::Invalid(format!(
                "volume {name:?} already exists in pool {}; delete it first or pick another name",
                self.dir.display()
            )));
        }
        self.check_room(
            name,
            size,
            snapshots_retained,
            snapshot_size,
            None,
            "create",
        )?;
        let meta = VolumeMeta {
            name: name.to_string(),
            format,
            size,
            snapshots_retained,
            snapshot_size,
            file: format!("{name}.{format}"),
            created_unix: now_unix(),
            replica_id: random_id(),
            import: None,
        };
        let data = self.data_path(&meta);
        if data.exists() {
            return Err(PoolError::Invalid(format!(
                "{} exists without volume metadata (a crashed create?); remove it and retry",
                data.display()
            )));
        }
        match format {
            ImageFormat::Raw => {
                let f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&data)
                    .ctx(|| format!("creating {}", data.display()))?;
                f.set_len(size)
                    .ctx(|| format!("sizing {}", data.display()))?;
                f.sync_all().ctx(|| format!("syncing {}", data.display()))?;
            }
            ImageFormat::Qcow2 => Qcow2::create(&data, size, &CreateOptions::default())
                .ctx(|| format!("creating {}", data.display()))?,
        }
        if let Err(e) = self.save(&meta) {
            let _ = fs::remove_file(&data);
            return Err(e);
        }
        Ok(meta)
    }

    /// Opens a volume's data as a block device.
    pub fn open_volume(&self, name: &str, read_only: bool) -> Result<Box<dyn BlockBackend>> {
        let meta = self.load(name)?;
        self.check_complete(&meta)?;
        let p = self.data_path(&meta);
        let b: Box<dyn BlockBackend> = match meta.format {
            ImageFormat::Raw => Box::new(RawFile::open(&p, read_only).map_err(open_err)?),
            ImageFormat::Qcow2 => Box::new(Qcow2::open(&p, read_only).map_err(open_err)?),
        };
        Ok(b)
    }

    fn open_qcow2(&self, meta: &VolumeMeta, read_only: bool, what: &str) -> Result<Qcow2> {
        self.check_complete(meta)?;
        if meta.format != ImageFormat::Qcow2 {
            return Err(PoolError::Invalid(format!(
                "volume {:?} is raw and cannot {what}: raw has no snapshot metadata; convert it to qcow2 (qemu-img convert -O qcow2, then `ftvm volume import`)",
                meta.name
            )));
        }
        Qcow2::open(&self.data_path(meta), read_only).map_err(open_err)
    }

    fn check_complete(&self, meta: &VolumeMeta) -> Result<()> {
        if let Some(st) = &meta.import {
            return Err(PoolError::Invalid(format!(
                "volume {:?} is an unfinished import ({} of {} bytes); rerun the import to resume or delete the volume",
                meta.name,
                st.bytes_done,
                st.source_len.map(|l| l.to_string()).unwrap_or_else(|| "?".into())
            )));
        }
        Ok(())
    }

    /// Grows a volume to `new_size` bytes.
    pub fn resize(&self, name: &str, new_size: u64) -> Result<VolumeMeta> {
        check_size(new_size)?;
        let _lock = self.lock()?;
        let mut meta = self.load(name)?;
        self.check_complete(&meta)?;
        if new_size < meta.size && meta.format == ImageFormat::Raw {
            let p = self.data_path(&meta);
            if let Some(at) =
                first_nonzero(&p, new_size, meta.size).ctx(|| format!("reading {}", p.display()))?
            {
                return Err(PoolError::Invalid(format!(
                    "cannot shrink {name:?} to {}: data lies at byte {at} (past the new end); discard it in the guest first (fstrim) or keep the size",
                    human(new_size)
                )));
            }
        }
        self.check_room(
            name,
            new_size,
            meta.snapshots_retained,
            meta.snapshot_size,
            Some(name),
            "resize",
        )?;
        let p = self.data_path(&meta);
        match meta.format {
            ImageFormat::Raw => {
                let f = OpenOptions::new()
                    .write(true)
                    .open(&p)
                    .ctx(|| format!("opening {}", p.display()))?;
                f.set_len(new_size)
                    .ctx(|| format!("resizing {}", p.display()))?;
                f.sync_all().ctx(|| format!("syncing {}", p.display()))?;
            }
            ImageFormat::Qcow2 => {
                let mut q = Qcow2::open(&p, false).map_err(open_err)?;
                q.resize(new_size)
                    .ctx(|| format!("resizing {}", p.display()))?;
            }
        }
        meta.size = new_size;
        self.save(&meta)?;
        Ok(meta)
    }

    /// Deletes a volume and its side files.
    pub fn delete(&self, name: &str) -> Result<()> {
        validate_name(name)?;
        let _lock = self.lock()?;
        let meta = self.load(name)?;
        for p in [
            self.data_path(&meta),
            self.partial_path(name),
            self.side_path(name, "mirror-bitmap"),
            self.side_path(name, "mirror-state.json"),
            self.side_path(name, "mirror-target.json"),
            self.dir.join(format!(".{name}.import.lock")),
        ] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).ctx(|| format!("removing {}", p.display())),
            }
        }
        let mp = self.meta_path(name);
        fs::remove_file(&mp).ctx(|| format!("removing {}", mp.display()))?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .ctx(|| format!("syncing {}", self.dir.display()))
    }

    /// How a qcow2 volume's clusters are stored (`None` for raw volumes).
    pub fn cluster_counts(&self, name: &str) -> Result<Option<crate::qcow2::ClusterCounts>> {
        let meta = self.load(name)?;
        if meta.format != ImageFormat::Qcow2 {
            return Ok(None);
        }
        let mut q = self.open_qcow2(&meta, true, "be inspected")?;
        let c = q
            .cluster_counts()
            .ctx(|| format!("reading the tables of volume {name:?}"))?;
        Ok(Some(c))
    }

    /// Rewrites a qcow2 volume's compressed clusters as plain ones; returns how many.
    pub fn decompress(&self, name: &str) -> Result<u64> {
        let _lock = self.lock()?;
        let meta = self.load(name)?;
        let mut q = self.open_qcow2(&meta, false, "be decompressed")?;
        q.decompress_all()
            .ctx(|| format!("decompressing volume {name:?}"))
    }

    /// Lists a qcow2 volume's snapshots.
    pub fn snapshots(&self, name: &str) -> Result<Vec<SnapshotInfo>> {
        let meta = self.load(name)?;
        let q = self.open_qcow2(&meta, true, "have snapshots")?;
        Ok(q.snapshots().to_vec())
    }

    /// Creates an internal snapshot, if the container has room for one more.
    pub fn snapshot_create(&self, name: &str, snapshot: &str) -> Result<()> {
        let _lock = self.lock()?;
        let meta = self.load(name)?;
        let mut q = self.open_qcow2(&meta, false, "take snapshots")?;
        let count = q.snapshots().len() as u32;
        if count >= meta.snapshots_retained {
            return Err(PoolError::NoRoom(format!(
                "volume {name:?} has {count} snapshot(s) and its container ({}) is sized for {} retained; delete a snapshot first, or recreate the volume with more --snapshots-retained",
                container_formula(meta.size, meta.snapshots_retained, meta.snapshot_size),
                meta.snapshots_retained
            )));
        }
        let fs_free = statvfs_free(&self.dir).ctx(|| format!("statvfs {}", self.dir.display()))?;
        if fs_free < meta.snapshot_size {
            return Err(PoolError::NoRoom(format!(
                "pool {} has {} free on its file system but a snapshot of {name:?} needs {} (its snapshot size); free space first",
                self.dir.display(),
                human(fs_free),
                human(meta.snapshot_size)
            )));
        }
        q.create_snapshot(snapshot)
            .ctx(|| format!("creating snapshot {snapshot:?} of {name:?}"))
    }

    /// Reverts a volume to a snapshot.
    pub fn snapshot_revert(&self, name: &str, snapshot: &str) -> Result<()> {
        let _lock = self.lock()?;
        let meta = self.load(name)?;
        let mut q = self.open_qcow2(&meta, false, "revert to snapshots")?;
        q.revert_snapshot(snapshot)
            .ctx(|| format!("reverting {name:?} to snapshot {snapshot:?}"))?;
        let size = q.size();
        drop(q);
        if size != meta.size {
            let mut m = meta;
            m.size = size;
            self.save(&m)?;
        }
        Ok(())
    }

    /// Deletes a snapshot.
    pub fn snapshot_delete(&self, name: &str, snapshot: &str) -> Result<()> {
        let _lock = self.lock()?;
        let meta = self.load(name)?;
        let mut q = self.open_qcow2(&meta, false, "delete snapshots")?;
        q.delete_snapshot(snapshot)
            .ctx(|| format!("deleting snapshot {snapshot:?} of {name:?}"))
    }

    /// Imports an image (raw or qcow2, detected) as volume `name`, resuming an interrupted
    /// import of the same bytes. `progress(done, total)` is called as bytes arrive.
    pub fn import(
        &self,
        name: &str,
        source: ImportSource<'_>,
        snapshots_retained: u32,
        snapshot_size: u64,
        progress: &mut dyn FnMut(u64, Option<u64>),
    ) -> Result<VolumeMeta> {
        validate_name(name)?;
        let _vlock = lock_file(&self.dir.join(format!(".{name}.import.lock")))?;
        let (label, mut reader, source_len): (String, Box<dyn Read + Send + '_>, Option<u64>) =
            match source {
                ImportSource::File(p) => {
                    let f =
                        File::open(p).ctx(|| format!("opening import source {}", p.display()))?;
                    let len = f.metadata().ctx(|| format!("stat {}", p.display()))?.len();
                    (p.display().to_string(), Box::new(f), Some(len))
                }
                ImportSource::Stream(r) => ("-".to_string(), Box::new(r), None),
            };
        let partial = self.partial_path(name);
        let existing = if self.meta_path(name).exists() {
            Some(self.load(name)?)
        } else {
            None
        };
        let mut meta;
        let mut done;
        let mut hasher;
        match existing {
            Some(m) => {
                let Some(st) = m.import.clone() else {
                    return Err(PoolError::Invalid(format!(
                        "volume {name:?} already exists in pool {}; delete it first or import under another name",
                        self.dir.display()
                    )));
                };
                if let (Some(a), Some(b)) = (st.source_len, source_len) {
                    if a != b {
                        return Err(PoolError::Invalid(format!(
                            "the interrupted import of {name:?} was from a {a}-byte source, this one has {b} bytes; delete the volume to start over"
                        )));
                    }
                }
                // Check the source starts with the bytes already imported.
                let mut h = crc32fast::Hasher::new();
                let mut left = st.bytes_done;
                let mut buf = vec![0u8; 1 << 20];
                while left > 0 {
                    let n = read_full(&mut reader, &mut buf[..left.min(1 << 20) as usize])
                        .ctx(|| format!("reading import source {label}"))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                    left -= n as u64;
                }
                if left > 0 || h.finalize() != st.prefix_crc {
                    return Err(PoolError::Invalid(format!(
                        "this source does not start with the {} bytes already imported into {name:?}; delete the volume (`ftvm volume delete`) to start over",
                        st.bytes_done
                    )));
                }
                let f = OpenOptions::new()
                    .write(true)
                    .open(&partial)
                    .ctx(|| format!("opening {}", partial.display()))?;
                f.set_len(st.bytes_done)
                    .ctx(|| format!("truncating {}", partial.display()))?;
                done = st.bytes_done;
                hasher = crc32fast::Hasher::new_with_initial_len(st.prefix_crc, st.bytes_done);
                meta = m;
            }
            None => {
                // Peek the start to detect the format and size.
                let mut head = vec![0u8; 512];
                let n = read_full(&mut reader, &mut head)
                    .ctx(|| format!("reading import source {label}"))?;
                head.truncate(n);
                let format = if n >= 4 && head[..4] == QCOW2_MAGIC {
                    ImageFormat::Qcow2
                } else {
                    ImageFormat::Raw
                };
                let size = match format {
                    ImageFormat::Qcow2 if n >= 32 => {
                        u64::from_be_bytes(head[24..32].try_into().unwrap_or([0; 8]))
                    }
                    ImageFormat::Qcow2 => {
                        return Err(PoolError::Invalid(format!(
                            "import source {label} is a truncated qcow2 image ({n} bytes)"
                        )))
                    }
                    ImageFormat::Raw => source_len.unwrap_or(0),
                };
                if format == ImageFormat::Raw {
                    if let Some(len) = source_len {
                        if len == 0 || !len.is_multiple_of(512) {
                            return Err(PoolError::Invalid(format!(
                                "import source {label} has {len} bytes, not a positive multiple of 512: it looks truncated; check the file (or pad it with truncate -s)"
                            )));
                        }
                    }
                }
                if format == ImageFormat::Raw && snapshots_retained > 0 {
                    return Err(PoolError::Invalid(
                        "raw images cannot have snapshots (raw has no snapshot metadata); convert to qcow2 first".into(),
                    ));
                }
                {
                    let _lock = self.lock()?;
                    self.check_room(
                        name,
                        size,
                        snapshots_retained,
                        snapshot_size,
                        None,
                        "import",
                    )?;
                    meta = VolumeMeta {
                        name: name.to_string(),
                        format,
                        size,
                        snapshots_retained,
                        snapshot_size,
                        file: format!("{name}.{format}"),
                        created_unix: now_unix(),
                        replica_id: random_id(),
                        import: Some(ImportState {
                            source: label.clone(),
                            source_len,
                            bytes_done: 0,
                            prefix_crc: 0,
                        }),
                    };
                    if self.data_path(&meta).exists() {
                        return Err(PoolError::Invalid(format!(
                            "{} exists without volume metadata; remove it and retry",
                            self.data_path(&meta).display()
                        )));
                    }
                    self.save(&meta)?;
                }
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&partial)
                    .ctx(|| format!("creating {}", partial.display()))?;
                f.write_all_at(&head, 0)
                    .ctx(|| format!("writing {}", partial.display()))?;
                done = head.len() as u64;
                hasher = crc32fast::Hasher::new();
                hasher.update(&head);
            }
        }
        let out = OpenOptions::new()
            .write(true)
            .open(&partial)
            .ctx(|| format!("opening {}", partial.display()))?;
        let total = source_len;
        progress(done, total);
        // A reader thread feeds chunks; progress is made durable every 64 MiB, every second,
        // and whenever the source stalls (so a killed import of a stalled pipe resumes).
        let streamed: Result<()> = std::thread::scope(|sc| {
            let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
            sc.spawn(move || loop {
                let mut b = vec![0u8; 1 << 20];
                let got = loop {
                    match reader.read(&mut b) {
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        r => break r,
                    }
                };
                match got {
                    Ok(0) => break,
                    Ok(n) => {
                        b.truncate(n);
                        if tx.send(Ok(b)).is_err() {
                            break;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        break;
                    }
                }
            });
            let mut last_cp = done;
            let mut last_cp_time = std::time::Instant::now();
            loop {
                let (eof, due) = match rx.recv_timeout(std::time::Duration::from_millis(300)) {
                    Ok(Ok(chunk)) => {
                        out.write_all_at(&chunk, done)
                            .ctx(|| format!("writing {}", partial.display()))?;
                        hasher.update(&chunk);
                        done += chunk.len() as u64;
                        progress(done, total);
                        (
                            false,
                            done - last_cp >= IMPORT_CHECKPOINT_BYTES
                                || last_cp_time.elapsed().as_secs() >= 1,
                        )
                    }
                    Ok(Err(e)) => return Err(e).ctx(|| format!("reading import source {label}")),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => (false, done != last_cp),
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => (true, true),
                };
                if due {
                    out.sync_data()
                        .ctx(|| format!("syncing {}", partial.display()))?;
                    if let Some(st) = meta.import.as_mut() {
                        st.bytes_done = done;
                        st.prefix_crc = hasher.clone().finalize();
                    }
                    self.save(&meta)?;
                    last_cp = done;
                    last_cp_time = std::time::Instant::now();
                }
                if eof {
                    return Ok(());
                }
            }
        });
        streamed?;
        drop(out);
        // Validate; a bad image is removed (it cannot be resumed into something good).
        let fail = |msg: String| -> PoolError {
            let _ = fs::remove_file(&partial);
            let _ = fs::remove_file(self.dir.join(format!(".{name}.import.lock")));
            let _ = fs::remove_file(self.meta_path(name));
            PoolError::Invalid(msg)
        };
        if let Some(len) = source_len {
            if done != len {
                return Err(fail(format!(
                    "import source {label} changed while importing ({done} of {len} bytes read); retry"
                )));
            }
        }
        let size = match meta.format {
            ImageFormat::Raw => {
                if done == 0 || !done.is_multiple_of(512) {
                    return Err(fail(format!(
                        "imported {done} bytes, not a positive multiple of 512: the source looks truncated; nothing was created"
                    )));
                }
                done
            }
            ImageFormat::Qcow2 => match Qcow2::open_unbacked(&partial) {
                Err(crate::OpenError::Unsupported { reason, .. }) => {
                    return Err(fail(format!(
                        "the image uses a qcow2 feature ftvm does not support: {reason}; nothing was created"
                    )))
                }
                Err(e) => {
                    return Err(fail(format!(
                        "the imported qcow2 image is unusable ({e}); the source looks truncated or corrupt; nothing was created"
                    )))
                }
                Ok(q) if q.backing_file().is_some() => {
                    return Err(fail(format!(
                        "the imported qcow2 image has a backing file ({:?}); a volume must stand alone: flatten it first with `qemu-img convert -O qcow2 SOURCE FLAT.qcow2`; nothing was created",
                        q.backing_file().unwrap_or("")
                    )))
                }
                Ok(mut q) => {
                    // Read the last sector: catches data clusters cut off by truncation.
                    let sz = q.size();
                    if let Err(e) = check_all_mapped_in_file(&mut q, done) {
                        return Err(fail(format!(
                            "the imported qcow2 image is unusable ({e}); the source looks truncated; nothing was created"
                        )));
                    }
                    sz
                }
            },
        };
        let _lock = self.lock()?;
        if meta.size != size {
            // Stdin raw imports learn their size at the end.
            if let Err(e) = self.check_room(
                name,
                size,
                snapshots_retained,
                snapshot_size,
                Some(name),
                "import",
            ) {
                return Err(fail(e.to_string()));
            }
        }
        let data = self.data_path(&meta);
        fs::rename(&partial, &data)
            .ctx(|| format!("renaming {} to {}", partial.display(), data.display()))?;
        meta.size = size;
        meta.import = None;
        self.save(&meta)?;
        let _ = fs::remove_file(self.dir.join(format!(".{name}.import.lock")));
        Ok(meta)
    }
}

/// The offset of the first nonzero byte of `path` in `[from, to)`, skipping holes.
fn first_nonzero(path: &Path, from: u64, to: u64) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let f = File::open(path)?;
    let mut off = from;
    let mut buf = vec![0u8; 1 << 20];
    while off < to {
        // SAFETY: lseek only reads its integer arguments on a descriptor `f` keeps open.
        let data = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
        if data >= 0 {
            off = (data as u64).max(off);
        } else if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
            return Ok(None); // no data past `off`
        } // else: no SEEK_DATA here; read everything
        if off >= to {
            return Ok(None);
        }
        let n = (buf.len() as u64).min(to - off) as usize;
        let got = f.read_at(&mut buf[..n], off)?;
        if got == 0 {
            return Ok(None);
        }
        if let Some(i) = buf[..got].iter().position(|&b| b != 0) {
            return Ok(Some(off + i as u64));
        }
        off += got as u64;
    }
    Ok(None)
}

/// Checks that every allocated cluster of `q` lies inside its `file_len`-byte file.
fn check_all_mapped_in_file(q: &mut Qcow2, file_len: u64) -> io::Result<()> {
    let size = q.size();
    let mut off = 0;
    while off < size {
        let (m, run) = q.map(off, size - off)?;
        if let crate::qcow2::Mapping::Data(host) = m {
            if host + run > file_len {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("data for guest offset {off} lies beyond the end of the {file_len}-byte file"),
                ));
            }
        }
        off += run;
    }
    Ok(())
}

fn check_size(size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) {
        return Err(PoolError::Invalid(format!(
            "size {size} is not a positive multiple of 512 bytes; round it (e.g. {})",
            size.div_ceil(512).max(1) * 512
        )));
    }
    Ok(())
}

fn open_err(e: crate::OpenError) -> PoolError {
    PoolError::Invalid(e.to_string())
}

fn read_full<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Free bytes for unprivileged users on the file system holding `dir`.
pub fn statvfs_free(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))?;
    // SAFETY: statvfs is plain data; all-zero is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a valid out-pointer for the call.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}
