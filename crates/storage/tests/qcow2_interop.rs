//! qcow2 interoperability with QEMU's own tools: every image we write passes `qemu-img check`,
//! `qemu-img compare` agrees with our contents, and we read what qemu-img/qemu-io write.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use common::{assert_check_clean, assert_same, qemu_img, Rng};
use storage::qcow2::{CreateOptions, Qcow2};
use storage::{open_backend, BlockBackend};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn qemu_io(img: &Path, cmd: &str) -> String {
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", cmd, s(img)])
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qemu-io {cmd}: {text}");
    assert!(
        !text.contains("Pattern verification failed"),
        "qemu-io {cmd}: {text}"
    );
    text
}

/// Random writes through our backend mirrored into a raw reference file.
fn random_writes(img: &mut dyn BlockBackend, reference: &std::fs::File, rng: &mut Rng, n: usize) {
    let size = img.size();
    for _ in 0..n {
        let len = 512 * (1 + rng.below(300)) as usize;
        let off = rng.below((size - len as u64) / 512) * 512;
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        img.write_at(&buf, off).unwrap();
        reference.write_all_at(&buf, off).unwrap();
        if rng.below(10) == 0 {
            img.flush().unwrap();
        }
    }
}

fn reference_file(p: &Path, size: u64) -> std::fs::File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(p)
        .unwrap();
    f.set_len(size).unwrap();
    f
}

#[test]
fn our_writes_pass_qemu_check_and_compare() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("a.qcow2");
    let refp = d.path().join("ref.raw");
    let size = 64 * MIB;
    Qcow2::create(&img, size, &CreateOptions::default()).unwrap();
    assert_check_clean(&img);
    let reference = reference_file(&refp, size);
    {
        let mut q = open_backend(&img, false).unwrap();
        assert_eq!(q.size(), size);
        random_writes(q.as_mut(), &reference, &mut Rng(7), 400);
        q.flush().unwrap();
    }
    assert_check_clean(&img);
    assert_same(&img, &refp);
    // qemu-io reads a pattern we wrote, and we read one qemu-io wrote.
    {
        let mut q = open_backend(&img, false).unwrap();
        q.write_at(&vec![0x5a; 128 * 1024], 3 * MIB).unwrap();
        q.flush().unwrap();
    }
    qemu_io(&img, "read -P 0x5a 3M 128k");
    qemu_io(&img, "write -P 0xc3 10M 200k");
    qemu_io(&img, "write -z 20M 1M");
    let mut q = open_backend(&img, true).unwrap();
    let mut buf = vec![0u8; 200 * 1024];
    q.read_at(&mut buf, 10 * MIB).unwrap();
    assert!(buf.iter().all(|b| *b == 0xc3));
    let mut z = vec![1u8; MIB as usize];
    q.read_at(&mut z, 20 * MIB).unwrap();
    assert!(z.iter().all(|b| *b == 0));
}

#[test]
fn we_read_qemu_img_convert_output_and_write_into_it() {
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("src.raw");
    let size = 32 * MIB;
    let f = reference_file(&raw, size);
    let mut rng = Rng(99);
    for i in 0..40u64 {
        let mut buf = vec![0u8; 64 * 1024];
        rng.fill(&mut buf);
        f.write_all_at(&buf, (i * 7919 * 512) % (size - buf.len() as u64))
            .unwrap();
    }
    let img = d.path().join("conv.qcow2");
    let (c, o) = qemu_img(&["convert", "-f", "raw", "-O", "qcow2", s(&raw), s(&img)]);
    assert_eq!(c, 0, "{o}");
    let mut q = open_backend(&img, false).unwrap();
    let mut a = vec![0u8; size as usize];
    q.read_at(&mut a, 0).unwrap();
    let mut b = vec![0u8; size as usize];
    f.read_exact_at(&mut b, 0).unwrap();
    assert!(a == b, "contents differ from qemu-img convert source");
    random_writes(q.as_mut(), &f, &mut rng, 200);
    drop(q);
    assert_check_clean(&img);
    assert_same(&img, &raw);
}

#[test]
fn backing_files_read_through_and_copy_on_write() {
    let d = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    // A qcow2 base made by qemu-img with data, and an overlay made by qemu-img.
    let base = d.path().join("base.qcow2");
    assert_eq!(qemu_img(&["create", "-f", "qcow2", s(&base), "16M"]).0, 0);
    qemu_io(&base, "write -P 0x11 0 16M");
    let overlay = d.path().join("overlay.qcow2");
    let (c, o) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    assert_eq!(c, 0, "{o}");
    let refp = d.path().join("ref.raw");
    let reference = reference_file(&refp, size);
    reference
        .write_all_at(&vec![0x11; size as usize], 0)
        .unwrap();
    {
        let mut q = open_backend(&overlay, false).unwrap();
        let mut buf = vec![0u8; 4096];
        q.read_at(&mut buf, 5 * MIB).unwrap();
        assert!(
            buf.iter().all(|b| *b == 0x11),
            "read-through to the backing file"
        );
        random_writes(q.as_mut(), &reference, &mut Rng(3), 150);
    }
    assert_check_clean(&overlay);
    assert_same(&overlay, &refp);
    // Base unchanged.
    qemu_io(&base, "read -P 0x11 0 16M");

    // Our own overlay over a raw base, smaller than the overlay (reads past it are zeros).
    let rawbase = d.path().join("base.raw");
    let rb = reference_file(&rawbase, 4 * MIB);
    rb.write_all_at(&vec![0x22; 4 * MIB as usize], 0).unwrap();
    let ov2 = d.path().join("ov2.qcow2");
    Qcow2::create(
        &ov2,
        size,
        &CreateOptions {
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            ..Default::default()
        },
    )
    .unwrap();
    assert_check_clean(&ov2);
    let (c, info) = qemu_img(&["info", s(&ov2)]);
    assert_eq!(c, 0);
    assert!(info.contains("backing file: base.raw"), "{info}");
    let mut q = open_backend(&ov2, false).unwrap();
    q.write_at(&[0x33; 512], 4 * MIB - 512).unwrap();
    q.flush().unwrap();
    let mut buf = vec![0u8; 2 * 4096];
    q.read_at(&mut buf, 4 * MIB - 4096).unwrap();
    assert!(buf[..4096 - 512].iter().all(|b| *b == 0x22));
    assert!(buf[4096 - 512..4096].iter().all(|b| *b == 0x33));
    assert!(buf[4096..].iter().all(|b| *b == 0));
    drop(q);
    assert_check_clean(&ov2);
    let (c, o) = qemu_img(&["compare", s(&ov2), s(&ov2)]);
    assert_eq!(c, 0, "{o}");
}

#[test]
fn corrupt_header_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("bad.qcow2");
    Qcow2::create(&img, 8 * MIB, &CreateOptions::default()).unwrap();
    let f = OpenOptions::new().write(true).open(&img).unwrap();
    f.write_all_at(&40u32.to_be_bytes(), 20).unwrap(); // cluster_bits 40
    let err = open_backend(&img, false).err().unwrap().to_string();
    assert!(err.contains("cluster_bits"), "{err}");
    f.write_all_at(&16u32.to_be_bytes(), 20).unwrap();
    f.write_all_at(&(1u64 << 40).to_be_bytes(), 40).unwrap(); // L1 beyond the file
    let err = open_backend(&img, false).err().unwrap().to_string();
    assert!(
        err.contains("L1 table") && err.contains("truncated"),
        "{err}"
    );
    // Truncated image: the refcount block is cut off.
    let img2 = d.path().join("trunc.qcow2");
    Qcow2::create(&img2, 8 * MIB, &CreateOptions::default()).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&img2)
        .unwrap()
        .set_len(100_000)
        .unwrap();
    let err = open_backend(&img2, false).err().unwrap().to_string();
    assert!(
        err.contains("beyond the end") || err.contains("outside"),
        "{err}"
    );
}

#[test]
fn resize_grows_and_keeps_data() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("r.qcow2");
    Qcow2::create(&img, 8 * MIB, &CreateOptions::default()).unwrap();
    let mut q = Qcow2::open(&img, false).unwrap();
    q.write_at(&[9u8; 4096], 4096).unwrap();
    q.resize(3 << 30).unwrap(); // L1 must grow past one table
    q.write_at(&[8u8; 4096], (3 << 30) - 4096).unwrap();
    let err = q.resize(1 << 20).unwrap_err().to_string();
    assert!(
        err.contains("cannot shrink") && err.contains("data lies at"),
        "{err}"
    );
    drop(q);
    assert_check_clean(&img);
    let (_, info) = qemu_img(&["info", s(&img)]);
    assert!(info.contains("virtual size: 3 GiB"), "{info}");
    qemu_io(&img, "read -P 9 4k 4k");
    qemu_io(&img, "read -P 8 3145724k 4k");
}

#[test]
fn small_clusters_grow_the_refcount_table() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("small.qcow2");
    // 512-byte clusters: one refcount block covers 128 KiB, one table cluster 8 MiB.
    Qcow2::create(
        &img,
        32 * MIB,
        &CreateOptions {
            cluster_bits: Some(9),
            ..Default::default()
        },
    )
    .unwrap();
    let refp = d.path().join("ref.raw");
    let reference = reference_file(&refp, 32 * MIB);
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        let mut rng = Rng(5);
        for i in 0..40u64 {
            let mut buf = vec![0u8; 256 * 1024];
            rng.fill(&mut buf);
            let off = (i * 797 * 512) % (31 * MIB);
            q.write_at(&buf, off).unwrap();
            reference.write_all_at(&buf, off).unwrap();
        }
    }
    assert_check_clean(&img);
    assert_same(&img, &refp);
}
