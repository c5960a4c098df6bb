//! A disk's format is explicit: a raw disk carrying a qcow2 header (written by its guest) is
//! never opened as qcow2 and never reaches the host file that header names; backing chains are
//! bounded and loop-free. Real files, real qcow2 images.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;

use storage::pool::Pool;
use storage::qcow2::{CreateOptions, Qcow2};
use storage::{open_disk, ImageFormat};

const MIB: u64 = 1 << 20;

/// Whether this process holds `path` open (the backends keep their files open).
fn holds_open(path: &Path) -> bool {
    let want = fs::canonicalize(path).unwrap();
    fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| fs::read_link(e.ok()?.path()).ok())
        .any(|p| p == want)
}

fn qcow2(path: &Path, size: u64, backing: Option<(&Path, &str)>) {
    let opts = CreateOptions {
        backing_file: backing.map(|(p, _)| p.display().to_string()),
        backing_format: backing.map(|(_, f)| f.to_string()),
        ..Default::default()
    };
    Qcow2::create(path, size, &opts).unwrap();
}

/// A raw disk whose first bytes are a qcow2 header naming `host` as its backing file, as a
/// guest could write it.
fn hostile_raw_disk(dir: &Path, host: &Path) -> std::path::PathBuf {
    let header = dir.join("header.qcow2");
    qcow2(&header, 16 * MIB, Some((host, "raw")));
    let bytes = fs::read(&header).unwrap();
    let disk = dir.join("guest.img");
    let f = fs::File::create(&disk).unwrap();
    f.set_len(4 * MIB).unwrap();
    f.write_all_at(&bytes, 0).unwrap();
    disk
}

#[test]
fn raw_disk_with_a_qcow2_header_never_opens_the_named_host_file() {
    let d = tempfile::tempdir().unwrap();
    let host = d.path().join("host-secret");
    fs::write(&host, vec![0x5au8; MIB as usize]).unwrap();
    let disk = hostile_raw_disk(d.path(), &host);

    // format=raw: the guest sees its own bytes, the host file is never opened.
    let mut raw = open_disk(&disk, false, Some(ImageFormat::Raw)).unwrap();
    assert_eq!(raw.size(), 4 * MIB);
    assert!(
        !holds_open(&host),
        "the host file was opened for a raw disk"
    );
    let mut buf = vec![0u8; 4096];
    raw.read_at(&mut buf, 0).unwrap();
    assert_eq!(&buf[..4], b"QFI\xfb");
    raw.read_at(&mut buf, 2 * MIB).unwrap();
    assert!(
        buf.iter().all(|b| *b == 0),
        "host bytes leaked into the raw disk"
    );
    drop(raw);

    // No format: refused with the fix named, nothing opened.
    let e = open_disk(&disk, false, None)
        .err()
        .expect("qcow2-looking disk accepted")
        .to_string();
    assert!(
        e.contains("format=qcow2") && e.contains("format=raw"),
        "{e}"
    );
    assert!(!holds_open(&host));

    // Control: the check above does see a backing file when qcow2 is asked for explicitly.
    let q = open_disk(&disk, true, Some(ImageFormat::Qcow2)).unwrap();
    assert!(holds_open(&host), "the fd check cannot see backing files");
    drop(q);

    // A plain file without a format is raw.
    let plain = d.path().join("plain.img");
    fs::write(&plain, vec![7u8; MIB as usize]).unwrap();
    assert_eq!(open_disk(&plain, false, None).unwrap().size(), MIB);
}

#[test]
fn a_pool_volume_is_opened_as_its_metadata_says() {
    let d = tempfile::tempdir().unwrap();
    let pool = Pool::init(d.path(), None).unwrap();
    let host = d.path().join("host-secret");
    fs::write(&host, vec![0x5au8; MIB as usize]).unwrap();
    let meta = pool.create("v", 4 * MIB, ImageFormat::Raw, 0, 0).unwrap();
    let path = pool.data_path(&meta);
    // The guest writes a qcow2 header into its raw volume.
    let header = d.path().join("h.qcow2");
    qcow2(&header, 16 * MIB, Some((&host, "raw")));
    let f = fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.write_all_at(&fs::read(&header).unwrap(), 0).unwrap();
    let disk = open_disk(&path, false, None).unwrap();
    assert_eq!(disk.size(), 4 * MIB, "the raw volume was not opened as raw");
    assert!(!holds_open(&host));

    let meta = pool.create("q", 4 * MIB, ImageFormat::Qcow2, 0, 0).unwrap();
    let disk = open_disk(&pool.data_path(&meta), false, None).unwrap();
    assert_eq!(disk.size(), 4 * MIB);
}

#[test]
fn backing_chain_loops_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let (a, b) = (d.path().join("a.qcow2"), d.path().join("b.qcow2"));
    qcow2(&b, 4 * MIB, None);
    qcow2(&a, 4 * MIB, Some((&b, "qcow2")));
    assert!(open_disk(&a, true, Some(ImageFormat::Qcow2)).is_ok());
    fs::remove_file(&b).unwrap();
    qcow2(&b, 4 * MIB, Some((&a, "qcow2")));
    let e = open_disk(&a, true, Some(ImageFormat::Qcow2))
        .err()
        .expect("loop accepted")
        .to_string();
    assert!(e.contains("backing chain loops"), "{e}");
    // A self-reference too.
    let s = d.path().join("self.qcow2");
    qcow2(&s, 4 * MIB, Some((&s, "qcow2")));
    let e = open_disk(&s, true, Some(ImageFormat::Qcow2))
        .err()
        .expect("loop accepted")
        .to_string();
    assert!(e.contains("backing chain loops"), "{e}");
}

#[test]
fn backing_chains_are_at_most_16_deep() {
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("0.raw");
    fs::write(&base, vec![3u8; MIB as usize]).unwrap();
    let mut prev = (base, "raw");
    for i in 1..=17 {
        let p = d.path().join(format!("{i}.qcow2"));
        qcow2(&p, MIB, Some((&prev.0, prev.1)));
        prev = (p, "qcow2");
    }
    // 16.qcow2 has 16 images below it: allowed, and it reads through to the base.
    let mut q = open_disk(&d.path().join("16.qcow2"), true, Some(ImageFormat::Qcow2)).unwrap();
    let mut buf = vec![0u8; 512];
    q.read_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|b| *b == 3));
    // 17.qcow2 has 17.
    let e = open_disk(&d.path().join("17.qcow2"), true, Some(ImageFormat::Qcow2))
        .err()
        .expect("17-deep chain accepted")
        .to_string();
    assert!(e.contains("deeper than 16"), "{e}");
}
