//! The images users really bring: `qemu-img convert -c` output (zlib and zstd, mixed with plain
//! clusters) read, written and snapshotted with `qemu-img check` clean and `qemu-img compare`
//! identical afterwards; a zero-size image through resize and snapshots; and refusals that name
//! their real cause while leaving the image byte-identical.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::{assert_check_clean, assert_same, convert_compressed, qemu_img, Rng};
use storage::pool::{ImportSource, Pool};
use storage::qcow2::{Compression, Qcow2};
use storage::{BlockBackend, OpenError};

const MIB: u64 = 1 << 20;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A raw file whose clusters compress well (patterns), not at all (random: qemu-img stores
/// those uncompressed) or are zero, so the converted image mixes all three.
fn mixed_raw(p: &Path, size: u64, rng: &mut Rng) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    for (i, chunk) in data.chunks_mut(64 << 10).enumerate() {
        match i % 3 {
            0 => chunk
                .iter_mut()
                .enumerate()
                .for_each(|(j, b)| *b = ((i * 7 + j / 100) % 251) as u8),
            1 => rng.fill(chunk),
            _ => {}
        }
    }
    std::fs::write(p, &data).unwrap();
    data
}

fn images(d: &Path) -> Vec<(PathBuf, PathBuf, Vec<u8>, Compression)> {
    let mut v = Vec::new();
    for (codec, cluster, want) in [
        ("zlib", "64k", Compression::Zlib),
        ("zstd", "64k", Compression::Zstd),
        ("zlib", "4k", Compression::Zlib),
    ] {
        let raw = d.join(format!("{codec}-{cluster}.raw"));
        let img = d.join(format!("{codec}-{cluster}.qcow2"));
        let data = mixed_raw(&raw, 6 * MIB, &mut Rng(cluster.len() as u64 * 31 + 5));
        convert_compressed(
            &raw,
            &img,
            &format!("compression_type={codec},cluster_size={cluster}"),
        );
        // The image really mixes compressed and plain data clusters.
        let (code, map) = qemu_img(&["map", "--output=json", s(&img)]);
        assert_eq!(code, 0, "{map}");
        let extents: Vec<serde_json::Value> = serde_json::from_str(&map).unwrap();
        let kinds = |compressed: bool| {
            extents
                .iter()
                .filter(|e| e["data"] == true && e["compressed"] == compressed)
                .count()
        };
        assert!(kinds(true) > 0 && kinds(false) > 0, "{codec}: {map}");
        v.push((raw, img, data, want));
    }
    v
}

#[test]
fn compressed_images_read_byte_identical() {
    let d = tempfile::tempdir().unwrap();
    for (_, img, data, codec) in images(d.path()) {
        let mut q = Qcow2::open(&img, true).unwrap();
        assert_eq!(q.compression(), codec, "{}", img.display());
        let mut got = vec![0u8; data.len()];
        // Reads in odd pieces that cross cluster and compression boundaries.
        let mut off = 0usize;
        let mut rng = Rng(3);
        while off < got.len() {
            let n = (512 * (1 + rng.below(300)) as usize).min(got.len() - off);
            q.read_at(&mut got[off..off + n], off as u64).unwrap();
            off += n;
        }
        assert!(got == data, "{} reads differently", img.display());
    }
}

#[test]
fn writes_into_compressed_clusters_copy_them_and_stay_clean() {
    let d = tempfile::tempdir().unwrap();
    for (raw, img, _, _) in images(d.path()) {
        let reference = OpenOptions::new().write(true).open(&raw).unwrap();
        {
            let mut q = Qcow2::open(&img, false).unwrap();
            let mut rng = Rng(11);
            for _ in 0..200 {
                let len = 512 * (1 + rng.below(200)) as usize;
                let off = rng.below((q.size() - len as u64) / 512) * 512;
                let mut buf = vec![0u8; len];
                rng.fill(&mut buf);
                q.write_at(&buf, off).unwrap();
                reference.write_all_at(&buf, off).unwrap();
            }
            q.flush().unwrap();
        }
        assert_check_clean(&img);
        assert_same(&img, &raw);
    }
}

#[test]
fn snapshots_of_mixed_images_create_revert_delete_cleanly() {
    let d = tempfile::tempdir().unwrap();
    for (raw, img, data, _) in images(d.path()) {
        {
            let mut q = Qcow2::open(&img, false).unwrap();
            q.create_snapshot("before").unwrap();
        }
        assert_check_clean(&img);
        let (_, list) = qemu_img(&["snapshot", "-l", s(&img)]);
        assert!(list.contains("before"), "{list}");
        {
            let mut q = Qcow2::open(&img, false).unwrap();
            q.write_at(&vec![0xee; 256 << 10], 64 << 10).unwrap();
            q.flush().unwrap();
        }
        assert_check_clean(&img);
        {
            let mut q = Qcow2::open(&img, false).unwrap();
            q.revert_snapshot("before").unwrap();
        }
        assert_check_clean(&img);
        assert_same(&img, &raw);
        {
            let mut q = Qcow2::open(&img, false).unwrap();
            q.delete_snapshot("before").unwrap();
            let mut got = vec![0u8; data.len()];
            q.read_at(&mut got, 0).unwrap();
            assert!(got == data, "{} changed by the delete", img.display());
        }
        assert_check_clean(&img);
    }
}

#[test]
fn a_zero_size_image_survives_resize_and_snapshots() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("z.qcow2");
    assert_eq!(qemu_img(&["create", "-f", "qcow2", s(&img), "0"]).0, 0);
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        assert_eq!(q.size(), 0);
        q.create_snapshot("empty").unwrap();
    }
    assert_check_clean(&img);
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        q.resize(MIB).unwrap();
        q.write_at(&[5u8; 4096], 8192).unwrap();
        q.flush().unwrap();
    }
    assert_check_clean(&img);
    let (_, info) = qemu_img(&["info", s(&img)]);
    assert!(info.contains("virtual size: 1 MiB"), "{info}");
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        q.revert_snapshot("empty").unwrap();
        assert_eq!(q.size(), 0);
    }
    assert_check_clean(&img);
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        q.delete_snapshot("empty").unwrap();
        q.resize(2 * MIB).unwrap();
    }
    assert_check_clean(&img);
    let (code, info) = qemu_img(&["info", s(&img)]);
    assert_eq!(code, 0, "{info}");
    assert!(info.contains("virtual size: 2 MiB"), "{info}");
}

/// Each image ftvm cannot use is refused with its real cause and left byte-identical.
#[test]
fn refusals_name_their_real_cause_and_change_nothing() {
    let d = tempfile::tempdir().unwrap();
    let dp = d.path();
    let base = dp.join("base.qcow2");
    assert_eq!(qemu_img(&["create", "-f", "qcow2", s(&base), "4M"]).0, 0);
    let make = |name: &str, args: &[&str]| -> PathBuf {
        let p = dp.join(name);
        let mut all = vec!["create", "-f", "qcow2"];
        all.extend_from_slice(args);
        all.extend([s(&p), "4M"]);
        let (code, out) = qemu_img(&all);
        assert_eq!(code, 0, "qemu-img create {name}: {out}");
        p
    };
    let secret = "secret,id=sec0,data=ftvm-test-passphrase";
    let data_file = dp.join("external.raw");
    let data_opt = format!("data_file={}", s(&data_file));
    let cases: Vec<(PathBuf, &str)> = vec![
        (
            make("extl2.qcow2", &["-o", "extended_l2=on"]),
            "extended L2",
        ),
        (
            make(
                "enc.qcow2",
                &[
                    "--object",
                    secret,
                    "-o",
                    "encrypt.format=luks,encrypt.key-secret=sec0",
                ],
            ),
            "encrypted",
        ),
        (
            make("datafile.qcow2", &["-o", &data_opt]),
            "external data file",
        ),
        (
            make("rc1.qcow2", &["-o", "refcount_bits=1"]),
            "refcount width",
        ),
    ];
    let pool_dir = dp.join("pool");
    let pool = Pool::init(&pool_dir, None).unwrap();
    for (img, cause) in &cases {
        let before = std::fs::read(img).unwrap();
        match Qcow2::open(img, false) {
            Err(OpenError::Unsupported { reason, .. }) => {
                assert!(reason.contains(cause), "{}: {reason}", img.display())
            }
            Err(e) => panic!("{}: wrong kind of refusal: {e}", img.display()),
            Ok(_) => panic!("{} opened", img.display()),
        }
        let err = pool
            .import("v", ImportSource::File(img), 0, 0, &mut |_, _| {})
            .expect_err("imported an unsupported image")
            .to_string();
        assert!(
            err.contains(cause) && err.contains("does not support") && !err.contains("truncated"),
            "{}: {err}",
            img.display()
        );
        assert_eq!(
            std::fs::read(img).unwrap(),
            before,
            "{} changed",
            img.display()
        );
        assert!(pool.list().unwrap().is_empty(), "a volume was left behind");
    }

    // A relative backing name: the refusal names the backing file, not the pool's path.
    let overlay = dp.join("overlay.qcow2");
    let (code, out) = qemu_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        s(&overlay),
    ]);
    assert_eq!(code, 0, "{out}");
    let err = pool
        .import("v", ImportSource::File(&overlay), 0, 0, &mut |_, _| {})
        .expect_err("imported an image with a backing file")
        .to_string();
    assert!(
        err.contains("base.qcow2") && err.contains("backing file") && err.contains("convert"),
        "{err}"
    );
    // Opened in place, a missing backing file is named with where it was looked for.
    std::fs::rename(&base, dp.join("moved.qcow2")).unwrap();
    let err = Qcow2::open(&overlay, true).err().unwrap().to_string();
    assert!(
        err.contains("backing file \"base.qcow2\"") && err.contains(s(&base)),
        "{err}"
    );
}

/// Allocated bytes of a file (what `qemu-img info` calls the disk size).
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn write_zeroes_frees_clusters_and_keeps_refcounts_exact() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("t.qcow2");
    Qcow2::create(&img, 16 * MIB, &Default::default()).unwrap();
    let data: Vec<u8> = (0..8 * MIB as u32).map(|i| (i % 253) as u8 | 1).collect();
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        q.write_at(&data, 0).unwrap();
        q.flush().unwrap();
    }
    let before = allocated(&img);
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        // Whole clusters, a partial head and a partial tail.
        q.write_zeroes(MIB + 4096, 5 * MIB).unwrap();
        q.flush().unwrap();
        let mut got = vec![0u8; data.len()];
        q.read_at(&mut got, 0).unwrap();
        let mut want = data.clone();
        want[(MIB + 4096) as usize..(6 * MIB + 4096) as usize].fill(0);
        assert!(got == want, "contents after write_zeroes");
    }
    assert_check_clean(&img);
    let after = allocated(&img);
    assert!(
        after + 4 * MIB <= before,
        "discarding 5 MiB freed only {} bytes",
        before - after
    );
    // Shared with a snapshot, discarded data stays for the snapshot.
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        q.create_snapshot("keep").unwrap();
        q.write_zeroes(0, MIB).unwrap();
        q.flush().unwrap();
    }
    assert_check_clean(&img);
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        q.revert_snapshot("keep").unwrap();
        let mut got = vec![0u8; MIB as usize];
        q.read_at(&mut got, 0).unwrap();
        assert!(got == data[..MIB as usize], "the snapshot lost its data");
    }
    assert_check_clean(&img);

    // A raw disk punches a hole.
    let raw = d.path().join("t.raw");
    std::fs::write(&raw, &data).unwrap();
    let before = allocated(&raw);
    {
        let mut r = storage::RawFile::open(&raw, false).unwrap();
        r.write_zeroes(0, 4 * MIB).unwrap();
        let mut got = vec![1u8; 4096];
        r.read_at(&mut got, 8192).unwrap();
        assert!(got.iter().all(|&b| b == 0));
    }
    assert!(allocated(&raw) + 3 * MIB <= before, "no hole was punched");
}
