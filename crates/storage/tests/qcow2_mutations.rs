//! The qcow2 parser against damaged metadata: valid images (ours and qemu-img's, with
//! snapshots, compressed clusters and backing files) have bytes of their header, L1, L2,
//! refcount and snapshot tables flipped, thousands of times, deterministically (a replayable
//! corpus: the seed and the mutation are printed on failure). Opening, reading everything,
//! writing and flushing must never panic, and never allocate in proportion to a header field:
//! the process runs with its address space capped at 4 GiB, so an allocation sized by a
//! damaged length field aborts the test.

mod common;

use std::path::{Path, PathBuf};

use common::{convert_compressed, qemu_img, Rng};
use storage::qcow2::{CreateOptions, Qcow2};
use storage::BlockBackend;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Seed images of several shapes.
fn seeds(d: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    let ours = d.join("ours.qcow2");
    Qcow2::create(
        &ours,
        2 << 20,
        &CreateOptions {
            cluster_bits: Some(12),
            ..Default::default()
        },
    )
    .unwrap();
    {
        let mut q = Qcow2::open(&ours, false).unwrap();
        q.write_at(&[1u8; 8192], 4096).unwrap();
        q.create_snapshot("s1").unwrap();
        q.write_at(&[2u8; 4096], 0).unwrap();
        q.flush().unwrap();
    }
    v.push(ours);
    let raw = d.join("src.raw");
    let data: Vec<u8> = (0..1u32 << 20).map(|i| ((i / 700) % 9) as u8).collect();
    std::fs::write(&raw, data).unwrap();
    for (name, extra) in [
        ("zlib.qcow2", "cluster_size=4096"),
        ("zstd.qcow2", "cluster_size=4096,compression_type=zstd"),
    ] {
        let img = d.join(name);
        convert_compressed(&raw, &img, extra);
        v.push(img);
    }
    let overlay = d.join("overlay.qcow2");
    let (code, out) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "zlib.qcow2",
        "-F",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&overlay),
    ]);
    assert_eq!(code, 0, "{out}");
    v.push(overlay);
    v
}

/// Opens, reads all, writes a little and flushes; errors are fine, panics are not.
fn exercise(path: &Path) {
    if let Ok(mut q) = Qcow2::open(path, true) {
        let size = q.size().min(4 << 20);
        let mut buf = vec![0u8; 64 << 10];
        let mut off = 0;
        while off < size {
            let n = (buf.len() as u64).min(size - off) as usize;
            let _ = q.read_at(&mut buf[..n], off);
            off += n as u64;
        }
        let _ = q.snapshots().len();
    }
    if let Ok(mut q) = Qcow2::open(path, false) {
        let size = q.size();
        if size >= 16384 {
            let _ = q.write_at(&[9u8; 4096], size / 2 / 512 * 512);
            let _ = q.write_at(&[8u8; 512], 0);
        }
        let _ = q.flush();
        let _ = q.cluster_counts();
    }
}

#[test]
fn damaged_metadata_never_panics() {
    let cap = libc::rlimit {
        rlim_cur: 4 << 30,
        rlim_max: 4 << 30,
    };
    // SAFETY: setrlimit only reads the struct, which lives across the call.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &cap) }, 0);
    let d = tempfile::tempdir().unwrap();
    let seeds = seeds(d.path());
    let work = d.path().join("work.qcow2");
    let mut rng = Rng(0x5eed);
    let rounds = 400;
    for seed in &seeds {
        let original = std::fs::read(seed).unwrap();
        // Metadata lives in the first clusters (4 KiB clusters): header, tables.
        let hot = original.len().min(64 << 10);
        for round in 0..rounds {
            let mut bytes = original.clone();
            let flips = 1 + rng.below(4) as usize;
            let mut what = Vec::new();
            for _ in 0..flips {
                let at = if rng.below(2) == 0 {
                    rng.below(112) as usize // the header itself
                } else {
                    rng.below(hot as u64) as usize
                };
                let v = match rng.below(4) {
                    0 => 0,
                    1 => 0xff,
                    _ => (rng.next_u64() & 0xff) as u8,
                };
                what.push((at, v));
                bytes[at] = v;
            }
            std::fs::write(&work, &bytes).unwrap();
            // A backing file of the overlay is looked for next to it.
            let result = std::panic::catch_unwind(|| exercise(&work));
            assert!(
                result.is_ok(),
                "panic on {} round {round}, bytes set: {what:?}",
                seed.display()
            );
        }
        // Truncations at every 512-byte boundary of the metadata area.
        for cut in (0..hot).step_by(512) {
            std::fs::write(&work, &original[..cut]).unwrap();
            let result = std::panic::catch_unwind(|| exercise(&work));
            assert!(result.is_ok(), "panic on {} cut at {cut}", seed.display());
        }
    }
    // Restored, the image opens again (the damage was confined to the copies).
    std::fs::write(&work, std::fs::read(&seeds[0]).unwrap()).unwrap();
    assert!(Qcow2::open(&work, false).is_ok());
}
