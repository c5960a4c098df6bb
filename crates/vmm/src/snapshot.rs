//! The snapshot file: a complete VM (state + memory) in a versioned, checksummed format.
//!
//! Layout (integers little-endian):
//! ```text
//! "FTVMSNAP" | version u32 | flags u32
//! state_len u64 | state_crc32 u32 | state (postcard-encoded VmState)
//! per RAM region: page map (1 bit per 4 KiB page, 1 = stored) | the stored pages
//! memory_crc32 u32 (over every page map and page) | "FTVMEND\0"
//! ```
//! All-zero pages are not stored. The file is written to a new temporary file (O_EXCL,
//! O_NOFOLLOW, mode 0600) and linked to its final name only if nothing (not even a symlink)
//! is there, so a crash never leaves a partial snapshot under the final name and a snapshot
//! never overwrites or writes through anything. A reader checks everything before it changes
//! anything.

use std::fs::{File, OpenOptions};
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::layout::PAGE_SIZE;
use crate::memory::{ram_regions, GuestMemory};
use crate::vm::{Vm, VmState};
use crate::Error;

const MAGIC: &[u8; 8] = b"FTVMSNAP";
const END_MAGIC: &[u8; 8] = b"FTVMEND\0";
/// Current format version (2: the state carries a network device's pending received frame).
pub const VERSION: u32 = 2;
/// Largest state section we accept (guards against a corrupt length).
const MAX_STATE_LEN: u64 = 64 << 20;

/// What was written.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotInfo {
    /// The file.
    pub path: PathBuf,
    /// Its size in bytes.
    pub bytes: u64,
    /// Pages stored (non-zero pages).
    pub pages: u64,
    /// How long the VM was paused, in milliseconds.
    pub paused_ms: f64,
}

fn io_err(path: &Path, what: &str) -> impl FnOnce(std::io::Error) -> Error {
    let msg = format!("{what} {}", path.display());
    move |e| Error::Snapshot(format!("{msg}: {e}"))
}

/// Writes a snapshot of `vm` to `path`, pausing it for the duration (a paused VM stays paused).
pub fn write_snapshot(vm: &Vm, path: &Path) -> Result<SnapshotInfo, Error> {
    refuse_existing(path)?;
    let t0 = std::time::Instant::now();
    vm.pause()?;
    let result = write_paused(vm, path);
    let paused_ms = t0.elapsed().as_secs_f64() * 1e3;
    // Pauses nest: a VM paused before the snapshot stays paused.
    vm.resume()?;
    let (bytes, pages) = result?;
    Ok(SnapshotInfo {
        path: path.to_path_buf(),
        bytes,
        pages,
        paused_ms,
    })
}

/// Refuses a destination that exists in any form (a symlink included, dangling or not).
fn refuse_existing(path: &Path) -> Result<(), Error> {
    match std::fs::symlink_metadata(path) {
        Ok(m) => Err(Error::Snapshot(format!(
            "snapshot destination {} already exists{}: give a new file name \
             (a snapshot never replaces or writes through anything)",
            path.display(),
            if m.file_type().is_symlink() {
                " as a symlink"
            } else {
                ""
            }
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path, "cannot check snapshot destination")(e)),
    }
}

/// Creates a fresh temporary file beside `path`: O_EXCL and O_NOFOLLOW, mode 0600.
fn create_temp(path: &Path) -> Result<(File, PathBuf), Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let name = path
        .file_name()
        .ok_or_else(|| {
            Error::Snapshot(format!("snapshot path {} has no file name", path.display()))
        })?
        .to_string_lossy()
        .into_owned();
    let mut last = None;
    for attempt in 0..16u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let tmp = path.with_file_name(format!(
            ".{name}.{}.{nanos:x}.{attempt}.partial",
            std::process::id()
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(io_err(&tmp, "cannot create snapshot file")(e)),
        }
    }
    Err(io_err(path, "cannot create a temporary file for snapshot")(
        last.unwrap_or_else(|| std::io::Error::other("name collisions")),
    ))
}

fn write_paused(vm: &Vm, path: &Path) -> Result<(u64, u64), Error> {
    let state = vm.save_state()?;
    let encoded = postcard::to_allocvec(&state)
        .map_err(|e| Error::Snapshot(format!("cannot encode VM state: {e}")))?;
    let (file, tmp) = create_temp(path)?;
    let result = write_file(vm, file, &tmp, &encoded).and_then(|(bytes, stored)| {
        // link(2) fails if anything, a symlink included, appeared at `path`; it never follows.
        std::fs::hard_link(&tmp, path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                Error::Snapshot(format!(
                    "snapshot destination {} appeared while writing: give a new file name",
                    path.display()
                ))
            } else {
                io_err(path, "cannot link the snapshot to")(e)
            }
        })?;
        Ok((bytes, stored))
    });
    let _ = std::fs::remove_file(&tmp);
    result
}

fn write_file(vm: &Vm, file: File, tmp: &Path, encoded: &[u8]) -> Result<(u64, u64), Error> {
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let write =
        |w: &mut BufWriter<File>, b: &[u8]| w.write_all(b).map_err(io_err(tmp, "cannot write"));
    write(&mut w, MAGIC)?;
    write(&mut w, &VERSION.to_le_bytes())?;
    write(&mut w, &0u32.to_le_bytes())?;
    write(&mut w, &(encoded.len() as u64).to_le_bytes())?;
    write(&mut w, &crc32fast::hash(encoded).to_le_bytes())?;
    write(&mut w, encoded)?;

    let mut crc = crc32fast::Hasher::new();
    let mut stored = 0u64;
    for region in vm.memory().iter() {
        let pages = (region.len() / PAGE_SIZE) as usize;
        let mut map = vec![0u8; pages.div_ceil(8)];
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for p in 0..pages {
            read_page(
                vm.memory(),
                region.start_addr().0 + p as u64 * PAGE_SIZE,
                &mut page,
            )?;
            if !is_zero(&page) {
                map[p / 8] |= 1 << (p % 8);
            }
        }
        crc.update(&map);
        write(&mut w, &map)?;
        for p in 0..pages {
            if map[p / 8] & (1 << (p % 8)) != 0 {
                read_page(
                    vm.memory(),
                    region.start_addr().0 + p as u64 * PAGE_SIZE,
                    &mut page,
                )?;
                crc.update(&page);
                write(&mut w, &page)?;
                stored += 1;
            }
        }
    }
    write(&mut w, &crc.finalize().to_le_bytes())?;
    write(&mut w, END_MAGIC)?;
    let file = w
        .into_inner()
        .map_err(|e| Error::Snapshot(format!("cannot write {}: {e}", tmp.display())))?;
    file.sync_all().map_err(io_err(tmp, "cannot sync"))?;
    let bytes = file.metadata().map_err(io_err(tmp, "cannot stat"))?.len();
    Ok((bytes, stored))
}

fn read_page(mem: &GuestMemory, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(|e| Error::Snapshot(format!("cannot read guest page {addr:#x}: {e}")))
}

/// Whether a page holds only zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8).all(|c| c == [0u8; 8])
}

/// A snapshot file whose header and state have been read and checked.
pub struct SnapshotFile {
    path: PathBuf,
    /// The VM state it holds.
    pub state: VmState,
    memory_offset: u64,
}

fn corrupt(path: &Path, what: &str) -> Error {
    Error::Snapshot(format!(
        "snapshot {} is corrupted: {what}; it cannot be restored (take a new snapshot)",
        path.display()
    ))
}

fn truncated(path: &Path) -> Error {
    Error::Snapshot(format!(
        "snapshot {} is truncated (the file ends early); it cannot be restored (take a new snapshot)",
        path.display()
    ))
}

fn read_exact_or(r: &mut impl Read, buf: &mut [u8], path: &Path) -> Result<(), Error> {
    r.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => truncated(path),
        _ => Error::Snapshot(format!("cannot read snapshot {}: {e}", path.display())),
    })
}

impl SnapshotFile {
    /// Opens `path` and verifies the whole file (header, state and memory checksums).
    pub fn open(path: &Path) -> Result<SnapshotFile, Error> {
        let file = File::open(path).map_err(|e| {
            Error::Snapshot(format!(
                "cannot open snapshot {}: {e} (check --snapshot)",
                path.display()
            ))
        })?;
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut head = [0u8; 16];
        read_exact_or(&mut r, &mut head, path)?;
        if &head[0..8] != MAGIC {
            return Err(Error::Snapshot(format!(
                "{} is not an ftvm snapshot (bad magic)",
                path.display()
            )));
        }
        let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
        if version != VERSION {
            return Err(Error::Snapshot(format!(
                "snapshot {} has format version {version}; this ftvm reads version {VERSION}",
                path.display()
            )));
        }
        let mut lens = [0u8; 12];
        read_exact_or(&mut r, &mut lens, path)?;
        let state_len = u64::from_le_bytes(lens[0..8].try_into().unwrap_or_default());
        let state_crc = u32::from_le_bytes(lens[8..12].try_into().unwrap_or_default());
        if state_len > MAX_STATE_LEN {
            return Err(corrupt(path, "impossible state length"));
        }
        let mut encoded = vec![0u8; state_len as usize];
        read_exact_or(&mut r, &mut encoded, path)?;
        if crc32fast::hash(&encoded) != state_crc {
            return Err(corrupt(path, "state checksum mismatch"));
        }
        let state: VmState = postcard::from_bytes(&encoded)
            .map_err(|e| corrupt(path, &format!("state does not decode ({e})")))?;
        let memory_offset = 28 + state_len;

        // Verify the memory section without keeping it.
        let mut crc = crc32fast::Hasher::new();
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for (_, len) in ram_regions(state.config.mem_mib << 20) {
            let pages = len / PAGE_SIZE as usize;
            let mut map = vec![0u8; pages.div_ceil(8)];
            read_exact_or(&mut r, &mut map, path)?;
            crc.update(&map);
            let stored: u32 = map.iter().map(|b| b.count_ones()).sum();
            for _ in 0..stored {
                read_exact_or(&mut r, &mut page, path)?;
                crc.update(&page);
            }
        }
        let mut tail = [0u8; 12];
        read_exact_or(&mut r, &mut tail, path)?;
        if u32::from_le_bytes(tail[0..4].try_into().unwrap_or_default()) != crc.finalize() {
            return Err(corrupt(path, "memory checksum mismatch"));
        }
        if &tail[4..12] != END_MAGIC {
            return Err(corrupt(path, "bad end marker"));
        }
        let mut extra = [0u8; 1];
        if r.read(&mut extra).map_err(io_err(path, "cannot read"))? != 0 {
            return Err(corrupt(path, "trailing bytes after the end marker"));
        }
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            state,
            memory_offset,
        })
    }

    /// Copies the memory image into `mem` (a fresh guest memory of the snapshot's size).
    pub fn load_memory(&self, mem: &GuestMemory) -> Result<(), Error> {
        use std::io::Seek;
        let path = &self.path;
        let mut file = File::open(path).map_err(io_err(path, "cannot open snapshot"))?;
        file.seek(std::io::SeekFrom::Start(self.memory_offset))
            .map_err(io_err(path, "cannot seek in"))?;
        let mut r = BufReader::with_capacity(1 << 20, file);
        let mut page = vec![0u8; PAGE_SIZE as usize];
        for region in mem.iter() {
            let pages = (region.len() / PAGE_SIZE) as usize;
            let mut map = vec![0u8; pages.div_ceil(8)];
            read_exact_or(&mut r, &mut map, path)?;
            for p in 0..pages {
                if map[p / 8] & (1 << (p % 8)) != 0 {
                    read_exact_or(&mut r, &mut page, path)?;
                    let addr = GuestAddress(region.start_addr().0 + p as u64 * PAGE_SIZE);
                    mem.write_slice(&page, addr).map_err(|e| {
                        Error::Snapshot(format!("cannot write guest page {addr:?}: {e}"))
                    })?;
                }
            }
        }
        Ok(())
    }
}

/// CRC32 of all guest memory (used to compare a VM before and after a restore).
pub fn memory_checksum(mem: &GuestMemory) -> Result<u32, Error> {
    let mut crc = crc32fast::Hasher::new();
    let mut page = vec![0u8; PAGE_SIZE as usize];
    for region in mem.iter() {
        for p in 0..region.len() / PAGE_SIZE {
            read_page(mem, region.start_addr().0 + p * PAGE_SIZE, &mut page)?;
            crc.update(&page);
        }
    }
    Ok(crc.finalize())
}
