//! `ftvm volume` as a user runs it: real files, real processes, real qemu-img.

mod volume_util;

use std::fs;
use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use testbed::Scratch;
use volume_util::*;

#[test]
fn create_list_info_resize_delete_and_sizing() {
    let d = Scratch::new("vol-basic").unwrap();
    let pool = d.path("pool");
    let pl = p(&pool);
    ok(&["volume", "pool-init", "--pool", pl, "--capacity", "10G"]);
    let out = ok(&[
        "volume",
        "create",
        "--pool",
        pl,
        "--name",
        "db",
        "--size",
        "1G",
        "--format",
        "qcow2",
        "--snapshots-retained",
        "2",
        "--snapshot-size",
        "512M",
    ]);
    assert!(
        out.contains("3.50 GiB = 2 × 1 GiB + (2 + 1) × 512 MiB"),
        "{out}"
    );
    ok(&[
        "volume", "create", "--pool", pl, "--name", "scratch", "--size", "512M", "--format", "raw",
    ]);
    let list = ok(&["volume", "list", "--pool", pl]);
    assert!(
        list.contains("db") && list.contains("scratch") && list.contains("ready"),
        "{list}"
    );
    let info = ok(&["volume", "info", "--pool", pl, "--name", "db"]);
    assert!(
        info.contains("container:  3.50 GiB = 2 × 1 GiB + (2 + 1) × 512 MiB"),
        "{info}"
    );
    assert!(info.contains("snapshots:  0 of 2"), "{info}");
    let (c, o) = qemu_img(&["check", p(&pool.join("db.qcow2"))]);
    assert_eq!(c, 0, "{o}");
    // Resize: grow ok, shrink of the empty tail ok, and a grow beyond the pool refused with
    // numbers.
    ok(&[
        "volume", "resize", "--pool", pl, "--name", "db", "--size", "2G",
    ]);
    let (_, info) = qemu_img(&["info", p(&pool.join("db.qcow2"))]);
    assert!(info.contains("virtual size: 2 GiB"), "{info}");
    ok(&[
        "volume", "resize", "--pool", pl, "--name", "db", "--size", "1G",
    ]);
    let (_, info) = qemu_img(&["info", p(&pool.join("db.qcow2"))]);
    assert!(info.contains("virtual size: 1 GiB"), "{info}");
    ok(&[
        "volume", "resize", "--pool", pl, "--name", "db", "--size", "2G",
    ]);
    let err = fails(&[
        "volume", "resize", "--pool", pl, "--name", "db", "--size", "8G",
    ]);
    assert!(
        err.contains("no room") && err.contains("available"),
        "{err}"
    );
    ok(&[
        "volume", "resize", "--pool", pl, "--name", "scratch", "--size", "1G",
    ]);
    assert_eq!(
        fs::metadata(pool.join("scratch.raw")).unwrap().len(),
        1 << 30
    );
    ok(&["volume", "delete", "--pool", pl, "--name", "scratch"]);
    assert!(!pool.join("scratch.raw").exists());
    assert!(!ok(&["volume", "list", "--pool", pl]).contains("scratch"));
    let j: serde_json::Value = serde_json::from_str(&ok(&[
        "volume", "info", "--pool", pl, "--name", "db", "--json",
    ]))
    .unwrap();
    assert_eq!(j["meta"]["size"], 2u64 << 30);
}

#[test]
fn bad_input_gives_clear_errors_and_leaves_volumes_untouched() {
    let d = Scratch::new("vol-bad").unwrap();
    let pool = d.path("pool");
    let pl = p(&pool);
    ok(&["volume", "pool-init", "--pool", pl, "--capacity", "4G"]);
    ok(&[
        "volume", "create", "--pool", pl, "--name", "keep", "--size", "1G", "--format", "qcow2",
    ]);
    // Write something recognisable into "keep".
    let keep = pool.join("keep.qcow2");
    let (c, o) = qemu_img(&["check", p(&keep)]);
    assert_eq!(c, 0, "{o}");
    let before_meta = fs::read(pool.join("keep.volume.json")).unwrap();
    let before_data = fs::read(&keep).unwrap();

    // Size not a multiple of 512.
    let e = fails(&[
        "volume", "create", "--pool", pl, "--name", "x", "--size", "1000",
    ]);
    assert!(e.contains("not a multiple of 512"), "{e}");
    // A pool without room: the error shows the numbers.
    let e = fails(&[
        "volume", "create", "--pool", pl, "--name", "big", "--size", "3G",
    ]);
    assert!(
        e.contains("no room") && e.contains("6 GiB = 2 × 3 GiB") && e.contains("capacity 4 GiB"),
        "{e}"
    );
    // A corrupt qcow2 header.
    let bad = d.path("bad.qcow2");
    let (c, o) = qemu_img(&["create", "-f", "qcow2", p(&bad), "64M"]);
    assert_eq!(c, 0, "{o}");
    let mut b = fs::read(&bad).unwrap();
    b[20..24].copy_from_slice(&77u32.to_be_bytes());
    fs::write(&bad, &b).unwrap();
    let e = fails(&["volume", "import", "--pool", pl, "--name", "bad", p(&bad)]);
    assert!(
        e.contains("cluster_bits") && e.contains("nothing was created"),
        "{e}"
    );
    // A truncated raw file and a truncated qcow2 file.
    let tr = d.path("trunc.raw");
    fs::write(&tr, vec![1u8; 1_000_000]).unwrap();
    let e = fails(&["volume", "import", "--pool", pl, "--name", "t1", p(&tr)]);
    assert!(e.contains("truncated"), "{e}");
    let full = d.path("full.qcow2");
    assert_eq!(qemu_img(&["create", "-f", "qcow2", p(&full), "64M"]).0, 0);
    let o = std::process::Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write -P 0x44 0 8M", p(&full)])
        .output()
        .unwrap();
    assert!(o.status.success());
    let tq = d.path("trunc.qcow2");
    fs::write(&tq, &fs::read(&full).unwrap()[..600_000]).unwrap();
    let e = fails(&["volume", "import", "--pool", pl, "--name", "t2", p(&tq)]);
    assert!(
        e.contains("truncated") && e.contains("nothing was created"),
        "{e}"
    );
    // Raw volumes refuse snapshots, saying why.
    ok(&[
        "volume", "create", "--pool", pl, "--name", "r", "--size", "64M", "--format", "raw",
    ]);
    let e = fails(&[
        "volume",
        "snapshot",
        "create",
        "--pool",
        pl,
        "--name",
        "r",
        "--snapshot",
        "s",
    ]);
    assert!(
        e.contains("raw has no snapshot metadata") && e.contains("qcow2"),
        "{e}"
    );
    // Snapshot beyond what the container is sized for.
    let e = fails(&[
        "volume",
        "snapshot",
        "create",
        "--pool",
        pl,
        "--name",
        "keep",
        "--snapshot",
        "s",
    ]);
    assert!(e.contains("sized for 0 retained"), "{e}");
    // Damaged metadata is detected by its checksum.
    let mut m = fs::read_to_string(pool.join("r.volume.json")).unwrap();
    m = m.replace("67108864", "67109376");
    fs::write(pool.join("r.volume.json"), m).unwrap();
    let e = fails(&["volume", "info", "--pool", pl, "--name", "r"]);
    assert!(e.contains("checksum"), "{e}");
    // Nothing was created by the failures; "keep" is untouched.
    let list = ok(&["volume", "list", "--pool", pl]);
    for n in ["bad ", "t1 ", "t2 ", "big ", "x "] {
        assert!(!list.lines().any(|l| l.starts_with(n)), "{n} in {list}");
    }
    assert_eq!(
        fs::read(pool.join("keep.volume.json")).unwrap(),
        before_meta
    );
    assert!(fs::read(&keep).unwrap() == before_data);
}

#[test]
fn snapshots_via_cli_are_qemu_visible_and_revert_restores() {
    let d = Scratch::new("vol-snap").unwrap();
    let pool = d.path("pool");
    let pl = p(&pool);
    fs::create_dir_all(&pool).unwrap();
    ok(&[
        "volume",
        "create",
        "--pool",
        pl,
        "--name",
        "v",
        "--size",
        "64M",
        "--format",
        "qcow2",
        "--snapshots-retained",
        "3",
        "--snapshot-size",
        "64M",
    ]);
    let img = pool.join("v.qcow2");
    let io = |cmd: &str| {
        let o = std::process::Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", cmd, p(&img)])
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(o.status.success() && !s.contains("failed"), "{cmd}: {s}");
    };
    io("write -P 0x11 0 1M");
    ok(&[
        "volume",
        "snapshot",
        "create",
        "--pool",
        pl,
        "--name",
        "v",
        "--snapshot",
        "before-upgrade",
    ]);
    io("write -P 0x22 512k 1M");
    ok(&[
        "volume",
        "snapshot",
        "create",
        "--pool",
        pl,
        "--name",
        "v",
        "--snapshot",
        "after",
    ]);
    let (c, l) = qemu_img(&["snapshot", "-l", p(&img)]);
    assert_eq!(c, 0);
    assert!(l.contains("before-upgrade") && l.contains("after"), "{l}");
    let ours = ok(&["volume", "snapshot", "list", "--pool", pl, "--name", "v"]);
    assert!(ours.contains("before-upgrade"), "{ours}");
    ok(&[
        "volume",
        "snapshot",
        "revert",
        "--pool",
        pl,
        "--name",
        "v",
        "--snapshot",
        "before-upgrade",
    ]);
    io("read -P 0x11 0 1M");
    io("read -P 0 1M 1M");
    ok(&[
        "volume",
        "snapshot",
        "delete",
        "--pool",
        pl,
        "--name",
        "v",
        "--snapshot",
        "after",
    ]);
    let (c, o) = qemu_img(&["check", p(&img)]);
    assert_eq!(c, 0, "{o}");
    let (_, l) = qemu_img(&["snapshot", "-l", p(&img)]);
    assert!(!l.contains("after") && l.contains("before-upgrade"), "{l}");
    let e = fails(&[
        "volume",
        "snapshot",
        "revert",
        "--pool",
        pl,
        "--name",
        "v",
        "--snapshot",
        "nope",
    ]);
    assert!(e.contains("no snapshot named"), "{e}");
}

#[test]
fn import_is_detected_resumable_after_kill9_and_exact() {
    let d = Scratch::new("vol-import").unwrap();
    let pool = d.path("pool");
    let pl = p(&pool);
    fs::create_dir_all(&pool).unwrap();
    // An 8 MiB raw image with varied content.
    let src = d.path("disk.raw");
    let data: Vec<u8> = (0..8u32 << 20)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    fs::write(&src, &data).unwrap();
    // Feed 5 MiB through stdin, wait until the import recorded it, kill -9 it.
    let mut child = ftvm()
        .args(["volume", "import", "--pool", pl, "--name", "img", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(&data[..5 << 20]).unwrap();
    stdin.flush().unwrap();
    let t0 = std::time::Instant::now();
    loop {
        let (_, out, _) = run(&["volume", "info", "--pool", pl, "--name", "img", "--json"]);
        if let Ok(j) = serde_json::from_str::<serde_json::Value>(&out) {
            if j["meta"]["import"]["bytes_done"].as_u64() == Some(5 << 20) {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "import progress never recorded: {out}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    let _ = child.wait();
    drop(stdin);
    let list = ok(&["volume", "list", "--pool", pl]);
    assert!(list.contains("importing"), "{list}");
    assert!(
        fails(&["volume", "snapshot", "list", "--pool", pl, "--name", "img"])
            .contains("unfinished import")
    );
    // A different source is refused; the same bytes resume.
    let other = d.path("other.raw");
    fs::write(&other, vec![9u8; 8 << 20]).unwrap();
    let e = fails(&["volume", "import", "--pool", pl, "--name", "img", p(&other)]);
    assert!(e.contains("does not start with"), "{e}");
    let out = ok(&["volume", "import", "--pool", pl, "--name", "img", p(&src)]);
    assert!(
        out.contains("resuming the import") && out.contains("5242880"),
        "{out}"
    );
    assert!(out.contains("raw volume"), "{out}");
    assert!(fs::read(pool.join("img.raw")).unwrap() == data);
    // qcow2 is detected and kept as qcow2; qemu-img agrees with the contents.
    let q = d.path("disk.qcow2");
    assert_eq!(
        qemu_img(&["convert", "-f", "raw", "-O", "qcow2", p(&src), p(&q)]).0,
        0
    );
    let out = ok(&["volume", "import", "--pool", pl, "--name", "q", p(&q)]);
    assert!(out.contains("qcow2 volume"), "{out}");
    let (c, o) = qemu_img(&["compare", p(&pool.join("q.qcow2")), p(&src)]);
    assert_eq!(c, 0, "{o}");
    assert!(
        fails(&["volume", "import", "--pool", pl, "--name", "q", p(&q)]).contains("already exists")
    );
}

#[test]
fn compressed_cloud_style_images_import_kept_or_expanded() {
    let d = Scratch::new("vol-compressed").unwrap();
    let pool = d.path("pool");
    let pl = p(&pool);
    fs::create_dir_all(&pool).unwrap();
    ok(&["volume", "pool-init", "--pool", pl]);
    // A compressible 8 MiB disk, compressed the way distributions ship cloud images.
    let raw = d.path("disk.raw");
    let data: Vec<u8> = (0..8u32 << 20).map(|i| ((i / 4096) % 13) as u8).collect();
    fs::write(&raw, &data).unwrap();
    let img = d.path("cloud.qcow2");
    let out = std::process::Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            p(&raw),
            p(&img),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let said = ok(&["volume", "import", "--pool", pl, "--name", "kept", p(&img)]);
    assert!(said.contains("compressed (kept"), "{said}");
    let info: serde_json::Value = serde_json::from_str(&ok(&[
        "volume", "info", "--pool", pl, "--name", "kept", "--json",
    ]))
    .unwrap();
    assert!(
        info["clusters"]["compressed"].as_u64().unwrap() > 0,
        "{info}"
    );
    let text = ok(&["volume", "info", "--pool", pl, "--name", "kept"]);
    assert!(text.contains("compressed ("), "{text}");

    let said = ok(&[
        "volume",
        "import",
        "--pool",
        pl,
        "--name",
        "flat",
        "--decompress",
        p(&img),
    ]);
    assert!(said.contains("expanded"), "{said}");
    let info: serde_json::Value = serde_json::from_str(&ok(&[
        "volume", "info", "--pool", pl, "--name", "flat", "--json",
    ]))
    .unwrap();
    assert_eq!(info["clusters"]["compressed"], 0, "{info}");
    assert!(info["clusters"]["data"].as_u64().unwrap() > 0, "{info}");
    // Both volumes hold the source's bytes, and qemu-img finds them clean.
    for v in ["kept", "flat"] {
        let info: serde_json::Value = serde_json::from_str(&ok(&[
            "volume", "info", "--pool", pl, "--name", v, "--json",
        ]))
        .unwrap();
        let file = info["data_file"].as_str().unwrap().to_string();
        let check = std::process::Command::new("qemu-img")
            .args(["check", &file])
            .output()
            .unwrap();
        assert!(check.status.success(), "{v}: {check:?}");
        let cmp = std::process::Command::new("qemu-img")
            .args(["compare", "-f", "qcow2", "-F", "raw", &file, p(&raw)])
            .output()
            .unwrap();
        assert!(cmp.status.success(), "{v}: {cmp:?}");
    }
}

#[test]
fn shrinking_keeps_every_stored_byte() {
    let d = Scratch::new("vol-shrink").unwrap();
    let pool = d.path("pool");
    let pl = p(&pool);
    ok(&["volume", "pool-init", "--pool", pl]);
    ok(&[
        "volume", "create", "--pool", pl, "--name", "r", "--size", "8M", "--format", "raw",
    ]);
    let file = pool.join("r.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = fs::OpenOptions::new().write(true).open(&file).unwrap();
        f.write_all_at(b"keep me", 6 << 20).unwrap();
    }
    let err = fails(&[
        "volume", "resize", "--pool", pl, "--name", "r", "--size", "4M",
    ]);
    assert!(
        err.contains("cannot shrink") && err.contains(&(6u64 << 20).to_string()),
        "{err}"
    );
    assert_eq!(
        fs::metadata(&file).unwrap().len(),
        8 << 20,
        "refused, yet resized"
    );
    // Past the data, shrinking is fine.
    ok(&[
        "volume", "resize", "--pool", pl, "--name", "r", "--size", "7M",
    ]);
    let bytes = fs::read(&file).unwrap();
    assert_eq!(bytes.len(), 7 << 20);
    assert_eq!(&bytes[6 << 20..(6 << 20) + 7], b"keep me");
}
