//! Internal snapshots: listed by `qemu-img snapshot -l`, revert restores bytes, refcounts stay
//! consistent (`qemu-img check` clean) through random create/revert/delete sequences.

mod common;

use std::path::Path;

use common::{assert_check_clean, qemu_img, Rng};
use storage::qcow2::{CreateOptions, Qcow2};
use storage::BlockBackend;

const MIB: u64 = 1 << 20;

fn read_all(q: &mut Qcow2) -> Vec<u8> {
    let mut v = vec![0u8; q.size() as usize];
    q.read_at(&mut v, 0).unwrap();
    v
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn snapshots_listed_by_qemu_and_revert_restores() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("s.qcow2");
    Qcow2::create(&img, 8 * MIB, &CreateOptions::default()).unwrap();
    let mut q = Qcow2::open(&img, false).unwrap();
    q.write_at(&[1u8; 100_000 / 512 * 512], 0).unwrap();
    q.create_snapshot("first").unwrap();
    let before = read_all(&mut q);
    q.write_at(&[2u8; 4096], 4096).unwrap();
    q.write_at(&[3u8; 4096], 5 * MIB).unwrap();
    q.create_snapshot("second").unwrap();
    q.write_at(&[4u8; 8192], 0).unwrap();
    q.flush().unwrap();
    drop(q);
    assert_check_clean(&img);
    let (c, list) = qemu_img(&["snapshot", "-l", s(&img)]);
    assert_eq!(c, 0, "{list}");
    assert!(list.contains("first") && list.contains("second"), "{list}");

    let mut q = Qcow2::open(&img, false).unwrap();
    assert!(q
        .create_snapshot("first")
        .unwrap_err()
        .to_string()
        .contains("already exists"));
    q.revert_snapshot("first").unwrap();
    assert!(read_all(&mut q) == before, "revert must restore the bytes");
    q.write_at(&[5u8; 4096], 0).unwrap();
    drop(q);
    assert_check_clean(&img);
    let mut q = Qcow2::open(&img, false).unwrap();
    q.delete_snapshot("second").unwrap();
    q.delete_snapshot("first").unwrap();
    assert!(q
        .revert_snapshot("first")
        .unwrap_err()
        .to_string()
        .contains("no snapshot"));
    drop(q);
    assert_check_clean(&img);
    // A snapshot made by qemu-img, reverted by us; and one of ours applied by qemu-img.
    let (c, o) = qemu_img(&["snapshot", "-c", "qsnap", s(&img)]);
    assert_eq!(c, 0, "{o}");
    let mut q = Qcow2::open(&img, false).unwrap();
    let at_qsnap = read_all(&mut q);
    q.write_at(&[6u8; 65536], 65536).unwrap();
    q.create_snapshot("ours").unwrap();
    let at_ours = read_all(&mut q);
    q.revert_snapshot("qsnap").unwrap();
    assert!(read_all(&mut q) == at_qsnap);
    drop(q);
    assert_check_clean(&img);
    let (c, o) = qemu_img(&["snapshot", "-a", "ours", s(&img)]);
    assert_eq!(c, 0, "{o}");
    let mut q = Qcow2::open(&img, false).unwrap();
    assert!(
        read_all(&mut q) == at_ours,
        "qemu-img snapshot -a of our snapshot"
    );
    drop(q);
    let (c, o) = qemu_img(&["snapshot", "-d", "ours", s(&img)]);
    assert_eq!(c, 0, "{o}");
    assert_check_clean(&img);
}

#[test]
fn random_snapshot_operations_keep_refcounts_consistent() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("m.qcow2");
    let size = 4 * MIB;
    Qcow2::create(
        &img,
        size,
        &CreateOptions {
            cluster_bits: Some(12),
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = Rng(0x5eed);
    let mut model = vec![0u8; size as usize];
    let mut snaps: Vec<(String, Vec<u8>)> = Vec::new();
    let mut q = Qcow2::open(&img, false).unwrap();
    for step in 0..300 {
        match rng.below(20) {
            0..=11 => {
                let len = 512 * (1 + rng.below(40)) as usize;
                let off = (rng.below((size - len as u64) / 512) * 512) as usize;
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                q.write_at(&buf, off as u64).unwrap();
                model[off..off + len].copy_from_slice(&buf);
            }
            12..=13 => {
                let name = format!("s{step}");
                q.create_snapshot(&name).unwrap();
                snaps.push((name, model.clone()));
            }
            14..=15 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                q.revert_snapshot(&snaps[i].0).unwrap();
                model = snaps[i].1.clone();
            }
            16 if !snaps.is_empty() => {
                let i = rng.below(snaps.len() as u64) as usize;
                let (name, _) = snaps.remove(i);
                q.delete_snapshot(&name).unwrap();
            }
            17 => {
                drop(q);
                assert_check_clean(&img);
                q = Qcow2::open(&img, false).unwrap();
            }
            _ => q.flush().unwrap(),
        }
        if step % 25 == 0 {
            assert!(read_all(&mut q) == model, "contents differ at step {step}");
        }
    }
    drop(q);
    assert_check_clean(&img);
    let (_, list) = qemu_img(&["snapshot", "-l", s(&img)]);
    for (name, _) in &snaps {
        assert!(list.contains(name.as_str()), "{name} missing from {list}");
    }
    let mut q = Qcow2::open(&img, false).unwrap();
    for (name, bytes) in &snaps {
        q.revert_snapshot(name).unwrap();
        assert!(&read_all(&mut q) == bytes, "snapshot {name}");
    }
    drop(q);
    assert_check_clean(&img);
}
