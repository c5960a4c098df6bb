//! A newc ("SVR4 new ASCII") cpio archive builder for Linux initramfs images, and a reader used
//! to check them.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::path::Path;

use cpio::newc::{self, ModeFileType};

/// What an initramfs entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content {
    /// A directory.
    Dir,
    /// A regular file with these bytes.
    File(Vec<u8>),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device node (major, minor).
    CharDev(u32, u32),
}

/// One entry of an initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Permission bits (e.g. 0o755); the file type comes from `content`.
    pub perm: u32,
    /// What the entry is.
    pub content: Content,
}

/// An initramfs under construction: entries by path (relative, no leading `/`), parents created
/// as needed, written in path order so every directory precedes its contents.
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

/// Errors adding entries.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// The path is empty, has `..` or `.` components, or is not valid in an archive.
    #[error("invalid initramfs path {0:?}")]
    BadPath(String),
    /// Two different entries for one path.
    #[error("initramfs path {0:?} added twice")]
    Duplicate(String),
    /// A file is larger than newc can hold (4 GiB).
    #[error("initramfs file {0:?} is too large for a newc archive")]
    TooLarge(String),
}

fn normalize(path: &str) -> Result<String, InitramfsError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    if parts.is_empty() || parts.iter().any(|p| *p == "." || *p == "..") || path.contains('\0') {
        return Err(InitramfsError::BadPath(path.to_string()));
    }
    Ok(parts.join("/"))
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, path: &str, entry: Entry) -> Result<(), InitramfsError> {
        let path = normalize(path)?;
        let mut parent = String::new();
        let components: Vec<&str> = path.split('/').collect();
        for c in &components[..components.len() - 1] {
            if !parent.is_empty() {
                parent.push('/');
            }
            parent.push_str(c);
            match self.entries.get(&parent) {
                None => {
                    self.entries.insert(
                        parent.clone(),
                        Entry {
                            perm: 0o755,
                            content: Content::Dir,
                        },
                    );
                }
                Some(e) if e.content == Content::Dir => {}
                Some(_) => return Err(InitramfsError::BadPath(path.clone())),
            }
        }
        match self.entries.get(&path) {
            // Re-adding a directory (e.g. explicitly after it was implied) just sets its mode.
            Some(old) if old.content == Content::Dir && entry.content == Content::Dir => {}
            Some(_) => return Err(InitramfsError::Duplicate(path)),
            None => {}
        }
        if let Content::File(data) = &entry.content {
            if u32::try_from(data.len()).is_err() {
                return Err(InitramfsError::TooLarge(path));
            }
        }
        self.entries.insert(path, entry);
        Ok(())
    }

    /// Adds a directory (and its parents).
    pub fn dir(&mut self, path: &str, perm: u32) -> Result<(), InitramfsError> {
        self.add(
            path,
            Entry {
                perm,
                content: Content::Dir,
            },
        )
    }

    /// Adds a regular file.
    pub fn file(&mut self, path: &str, data: Vec<u8>, perm: u32) -> Result<(), InitramfsError> {
        self.add(
            path,
            Entry {
                perm,
                content: Content::File(data),
            },
        )
    }

    /// Adds a symbolic link `path` → `target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), InitramfsError> {
        self.add(
            path,
            Entry {
                perm: 0o777,
                content: Content::Symlink(target.to_string()),
            },
        )
    }

    /// Adds a character device node.
    pub fn char_dev(
        &mut self,
        path: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitramfsError> {
        self.add(
            path,
            Entry {
                perm,
                content: Content::CharDev(major, minor),
            },
        )
    }

    /// The entries, in archive order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Writes the uncompressed newc archive (with its trailer) to `w`. Owner root, mtime 0 and
    /// sequential inode numbers make the output reproducible.
    pub fn write_cpio<W: Write>(&self, mut w: W) -> io::Result<W> {
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (ftype, data, rdev): (ModeFileType, &[u8], (u32, u32)) = match &entry.content {
                Content::Dir => (ModeFileType::Directory, &[], (0, 0)),
                Content::File(d) => (ModeFileType::Regular, d, (0, 0)),
                Content::Symlink(t) => (ModeFileType::Symlink, t.as_bytes(), (0, 0)),
                Content::CharDev(ma, mi) => (ModeFileType::Char, &[], (*ma, *mi)),
            };
            let nlink = if entry.content == Content::Dir { 2 } else { 1 };
            let size = u32::try_from(data.len())
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "entry too large"))?;
            let mut writer = newc::Builder::new(path)
                .ino(ino as u32 + 1)
                .mode(entry.perm & 0o7777)
                .set_mode_file_type(ftype)
                .uid(0)
                .gid(0)
                .nlink(nlink)
                .mtime(0)
                .rdev_major(rdev.0)
                .rdev_minor(rdev.1)
                .write(w, size);
            writer.write_all(data)?;
            w = writer.finish()?;
        }
        newc::trailer(w)
    }

    /// Writes the archive gzip-compressed to `w`.
    pub fn write_gzip<W: Write>(&self, w: W) -> io::Result<W> {
        let enc = flate2::write::GzEncoder::new(w, flate2::Compression::best());
        self.write_cpio(enc)?.finish()
    }
}

/// One entry as read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadEntry {
    /// Path inside the archive.
    pub name: String,
    /// Full mode (file type and permission bits).
    pub mode: u32,
    /// Data (file contents or symlink target).
    pub data: Vec<u8>,
    /// Device numbers of a device node.
    pub rdev: (u32, u32),
}

impl ReadEntry {
    /// The file-type bits of `mode`.
    pub fn file_type(&self) -> u32 {
        self.mode & 0o170000
    }
}

/// Reads every entry of a newc archive, gzip-compressed or not (until the trailer).
pub fn read_archive<R: Read>(mut r: R) -> io::Result<Vec<ReadEntry>> {
    let mut magic = [0u8; 2];
    r.read_exact(&mut magic)?;
    let chained = io::Cursor::new(magic).chain(r);
    let mut reader: Box<dyn Read> = if magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(chained))
    } else {
        Box::new(chained)
    };
    let mut out = Vec::new();
    loop {
        let mut entry = newc::Reader::new(reader)?;
        if entry.entry().is_trailer() {
            return Ok(out);
        }
        let name = entry.entry().name().to_string();
        let mode = entry.entry().mode();
        let rdev = (entry.entry().rdev_major(), entry.entry().rdev_minor());
        let mut data = Vec::new();
        entry.read_to_end(&mut data)?;
        out.push(ReadEntry {
            name,
            mode,
            data,
            rdev,
        });
        reader = entry.finish()?;
    }
}

/// Reads the archive at `path` (see [`read_archive`]).
pub fn read_archive_file(path: &Path) -> io::Result<Vec<ReadEntry>> {
    read_archive(io::BufReader::new(std::fs::File::open(path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Initramfs {
        let mut fs = Initramfs::new();
        fs.file("init", b"#!/bin/sh\necho hi\n".to_vec(), 0o755)
            .unwrap();
        fs.file("bin/busybox", vec![0x7f, b'E', b'L', b'F', 1, 2, 3], 0o755)
            .unwrap();
        fs.symlink("bin/sh", "busybox").unwrap();
        fs.char_dev("dev/console", 0o600, 5, 1).unwrap();
        fs.file("lib/modules/6.1.0/kernel/a.ko", vec![1; 4097], 0o644)
            .unwrap();
        fs
    }

    #[test]
    fn parents_come_first_and_paths_are_normalised() {
        let fs = sample();
        let names: Vec<&str> = fs.entries().map(|(n, _)| n).collect();
        for (i, n) in names.iter().enumerate() {
            if let Some((parent, _)) = n.rsplit_once('/') {
                let p = names.iter().position(|x| *x == parent).unwrap();
                assert!(p < i, "{parent} must precede {n}");
            }
        }
        assert!(names.contains(&"lib/modules/6.1.0/kernel"));
        let mut fs = Initramfs::new();
        assert!(fs.file("/a/../b", vec![], 0o644).is_err());
        assert!(fs.file("", vec![], 0o644).is_err());
        fs.file("//x//y", vec![], 0o644).unwrap();
        assert!(fs.entries().any(|(n, _)| n == "x/y"));
        assert!(matches!(
            fs.file("x/y", vec![], 0o644),
            Err(InitramfsError::Duplicate(_))
        ));
        assert!(fs.file("x/y/z", vec![], 0o644).is_err());
    }

    #[test]
    fn round_trip_plain_and_gzip() {
        let fs = sample();
        let plain = fs.write_cpio(Vec::new()).unwrap();
        assert_eq!(&plain[..6], b"070701");
        assert_eq!(plain.len() % 4, 0);
        let gz = fs.write_gzip(Vec::new()).unwrap();
        assert_eq!(&gz[..2], &[0x1f, 0x8b]);
        for bytes in [&plain, &gz] {
            let entries = read_archive(&bytes[..]).unwrap();
            let by_name = |n: &str| -> &ReadEntry { entries.iter().find(|e| e.name == n).unwrap() };
            assert_eq!(entries.len(), fs.entries().count());
            let init = by_name("init");
            assert_eq!(init.mode, 0o100755);
            assert_eq!(init.data, b"#!/bin/sh\necho hi\n");
            let sh = by_name("bin/sh");
            assert_eq!(sh.file_type(), 0o120000);
            assert_eq!(sh.data, b"busybox");
            let console = by_name("dev/console");
            assert_eq!(console.mode, 0o020600);
            assert_eq!(console.rdev, (5, 1));
            assert_eq!(by_name("bin").mode, 0o040755);
            assert_eq!(by_name("lib/modules/6.1.0/kernel/a.ko").data, vec![1; 4097]);
        }
        // Reproducible.
        assert_eq!(fs.write_cpio(Vec::new()).unwrap(), plain);
    }

    /// The archive is also readable by the system's cpio, if there is one.
    #[test]
    fn system_cpio_lists_it() {
        let Ok(out) = std::process::Command::new("cpio").arg("--version").output() else {
            eprintln!("no cpio on this host: skipping the cross-check");
            return;
        };
        assert!(out.status.success());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.cpio");
        std::fs::write(&path, sample().write_cpio(Vec::new()).unwrap()).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        let listing = String::from_utf8_lossy(&out.stdout);
        for n in ["init", "bin/busybox", "bin/sh", "dev/console"] {
            assert!(listing.lines().any(|l| l == n), "{n} not in {listing}");
        }
    }
}
