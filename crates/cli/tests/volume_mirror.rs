//! Mirroring between real processes: `ftvm volume mirror-serve` as the peer, a writer
//! (`ftvm volume mirror-exercise`), kill -9 of either side, restart, resync, verify.

mod volume_util;

use std::fs;
use std::path::Path;
use std::time::Duration;

use testbed::Scratch;
use volume_util::*;

const T: Duration = Duration::from_secs(60);

fn setup(d: &Scratch, local_format: &str) -> (String, String, String) {
    let a = d.path("node-a");
    let b = d.path("node-b");
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    ok(&[
        "volume",
        "create",
        "--pool",
        p(&a),
        "--name",
        "v",
        "--size",
        "64M",
        "--format",
        local_format,
    ]);
    ok(&[
        "volume",
        "create",
        "--pool",
        p(&b),
        "--name",
        "v",
        "--size",
        "64M",
        "--format",
        "raw",
    ]);
    let addr = format!("127.0.0.1:{}", free_port());
    (p(&a).to_string(), p(&b).to_string(), addr)
}

fn serve(pool: &str, addr: &str) -> Proc {
    let mut s = Proc::spawn(&[
        "volume",
        "mirror-serve",
        "--pool",
        pool,
        "--name",
        "v",
        "--listen",
        addr,
    ]);
    s.wait_line("target listening", T, |l| l.contains("listening on"));
    s
}

fn flushed(l: &str) -> Option<(u64, bool)> {
    let mut it = l.split_whitespace();
    if it.next()? != "flushed" {
        return None;
    }
    let n = it.next()?.parse().ok()?;
    let connected = it.next()? == "connected=true";
    Some((n, connected))
}

fn assert_identical(a: &str, b: &str, addr: &str, local_format: &str) {
    let out = ok(&[
        "volume", "verify", "--pool", a, "--name", "v", "--peer", addr,
    ]);
    assert!(out.contains("identical"), "{out}");
    let la = Path::new(a).join(format!("v.{local_format}"));
    let lb = Path::new(b).join("v.raw");
    let (c, o) = qemu_img(&["compare", "-f", local_format, "-F", "raw", p(&la), p(&lb)]);
    assert_eq!(c, 0, "qemu-img compare: {o}");
    if local_format == "qcow2" {
        let (c, o) = qemu_img(&["check", p(&la)]);
        assert_eq!(c, 0, "{o}");
    }
}

#[test]
fn kill9_of_the_peer_mid_stream_then_restart_resyncs_to_identical() {
    let d = Scratch::new("mirror-peer-kill").unwrap();
    let (a, b, addr) = setup(&d, "qcow2");
    let mut peer = serve(&b, &addr);
    let mut w = Proc::spawn(&[
        "volume",
        "mirror-exercise",
        "--pool",
        &a,
        "--name",
        "v",
        "--peer",
        &addr,
        "--writes",
        "3000",
        "--pause-ms",
        "2",
        "--flush-every",
        "10",
        "--wait-sync",
        "60",
        "--timeout-ms",
        "2000",
    ]);
    w.wait_line("connected writes", T, |l| {
        flushed(l).is_some_and(|(n, c)| n >= 300 && c)
    });
    peer.kill9();
    // The writer carries on locally.
    let l = w.wait_line("writes while disconnected", T, |l| {
        flushed(l).is_some_and(|(_, c)| !c)
    });
    let (n0, _) = flushed(&l).unwrap();
    w.wait_line("more local writes", T, |l| {
        flushed(l).is_some_and(|(n, _)| n >= n0 + 300)
    });
    let info = ok(&["volume", "info", "--pool", &a, "--name", "v"]);
    assert!(info.contains("mirror:") && info.contains("lost"), "{info}");
    let _peer2 = serve(&b, &addr);
    assert_eq!(w.wait_exit(Duration::from_secs(120)), 0, "{:?}", w.seen);
    assert!(w.seen.iter().any(|l| l == "in-sync"), "{:?}", w.seen);
    assert!(
        w.seen
            .iter()
            .any(|l| flushed(l).is_some_and(|(n, c)| n > n0 + 300 && c)),
        "reconnected mid-stream: {:?}",
        w.seen
    );
    assert_identical(&a, &b, &addr, "qcow2");
}

#[test]
fn kill9_of_the_writer_then_bitmap_resync_to_identical() {
    let d = Scratch::new("mirror-writer-kill").unwrap();
    let (a, b, addr) = setup(&d, "raw");
    let mut peer = serve(&b, &addr);
    // 1. The writer dies while connected: in-flight regions are in the activity log.
    let mut w = Proc::spawn(&[
        "volume",
        "mirror-exercise",
        "--pool",
        &a,
        "--name",
        "v",
        "--peer",
        &addr,
        "--writes",
        "1000000",
        "--pause-ms",
        "1",
        "--flush-every",
        "7",
        "--timeout-ms",
        "2000",
    ]);
    w.wait_line("connected writes", T, |l| {
        flushed(l).is_some_and(|(n, c)| n >= 200 && c)
    });
    w.kill9();
    let out = ok(&[
        "volume", "resync", "--pool", &a, "--name", "v", "--peer", &addr,
    ]);
    assert!(out.contains("resynced"), "{out}");
    assert_identical(&a, &b, &addr, "raw");

    // 2. The peer dies, the writer continues locally, then the writer dies too: only the
    //    persisted bitmap knows what changed.
    let mut w = Proc::spawn(&[
        "volume",
        "mirror-exercise",
        "--pool",
        &a,
        "--name",
        "v",
        "--peer",
        &addr,
        "--writes",
        "1000000",
        "--seed",
        "2",
        "--pause-ms",
        "1",
        "--flush-every",
        "7",
        "--timeout-ms",
        "2000",
    ]);
    w.wait_line("connected writes", T, |l| {
        flushed(l).is_some_and(|(n, c)| n >= 100 && c)
    });
    peer.kill9();
    let l = w.wait_line("writes while disconnected", T, |l| {
        flushed(l).is_some_and(|(_, c)| !c)
    });
    let (n0, _) = flushed(&l).unwrap();
    w.wait_line("more local writes", T, |l| {
        flushed(l).is_some_and(|(n, _)| n >= n0 + 100)
    });
    w.kill9();
    let _peer2 = serve(&b, &addr);
    let out = ok(&[
        "volume", "resync", "--pool", &a, "--name", "v", "--peer", &addr,
    ]);
    // "resynced N of 64 region(s)": some, not all, regions.
    let n: u64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("unexpected resync output {out}"));
    assert!(n > 0 && n <= 64, "{out}");
    assert_identical(&a, &b, &addr, "raw");
    let info = ok(&["volume", "info", "--pool", &a, "--name", "v"]);
    assert!(info.contains("local replica: ok"), "{info}");
}

#[test]
fn verify_names_differing_regions() {
    let d = Scratch::new("mirror-verify").unwrap();
    let (a, b, addr) = setup(&d, "raw");
    let _peer = serve(&b, &addr);
    let out = ok(&[
        "volume", "verify", "--pool", &a, "--name", "v", "--peer", &addr,
    ]);
    assert!(out.contains("identical"), "{out}");
    // Damage the peer replica behind the mirror's back.
    let pb = Path::new(&b).join("v.raw");
    let f = fs::OpenOptions::new().write(true).open(&pb).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xff; 100], (17 << 20) + 5).unwrap();
    let (c, out, _) = run(&[
        "volume", "verify", "--pool", &a, "--name", "v", "--peer", &addr,
    ]);
    assert_eq!(c, 2, "{out}");
    assert!(out.contains("bytes 17825792..18874368"), "{out}");
    let out = ok(&[
        "volume", "resync", "--pool", &a, "--name", "v", "--peer", &addr, "--full",
    ]);
    assert!(out.contains("resynced"), "{out}");
    assert_identical(&a, &b, &addr, "raw");
}

#[test]
fn kill9_of_a_qcow2_writer_leaves_a_consistent_image_that_resyncs() {
    let d = Scratch::new("mirror-qcow2-kill").unwrap();
    let (a, b, addr) = setup(&d, "qcow2");
    let _peer = serve(&b, &addr);
    for round in 0..3 {
        let seed = (round + 10).to_string();
        let mut w = Proc::spawn(&[
            "volume",
            "mirror-exercise",
            "--pool",
            &a,
            "--name",
            "v",
            "--peer",
            &addr,
            "--writes",
            "1000000",
            "--seed",
            &seed,
            "--max-sectors",
            "256",
            "--pause-ms",
            "1",
            "--flush-every",
            "13",
            "--timeout-ms",
            "2000",
        ]);
        w.wait_line("connected writes", T, |l| {
            flushed(l).is_some_and(|(n, c)| n >= 150 && c)
        });
        w.kill9();
        // Crash-consistent: qemu-img finds no corruption (leaked clusters are allowed).
        let img = Path::new(&a).join("v.qcow2");
        let (c, o) = qemu_img(&["check", p(&img)]);
        assert!(
            c == 0 || c == 3,
            "qemu-img check after kill -9 (round {round}): {o}"
        );
        assert!(!o.contains("ERROR") && !o.contains("corrupt"), "{o}");
        let out = ok(&[
            "volume", "resync", "--pool", &a, "--name", "v", "--peer", &addr,
        ]);
        assert!(out.contains("resynced"), "{out}");
        let out = ok(&[
            "volume", "verify", "--pool", &a, "--name", "v", "--peer", &addr,
        ]);
        assert!(out.contains("identical"), "round {round}: {out}");
    }
}

#[test]
fn mirror_serve_needs_the_secret_and_a_wrong_secret_gets_nothing() {
    let d = Scratch::new("mirror-secret").unwrap();
    let (a, b, addr) = setup(&d, "raw");
    let serve_args = [
        "volume",
        "mirror-serve",
        "--pool",
        &b,
        "--name",
        "v",
        "--listen",
        &addr,
    ];
    let (code, _, err) = run_with_secret(&serve_args, None);
    assert_ne!(code, 0);
    assert!(
        err.contains("cluster secret") && err.contains("--secret-file") && err.contains("urandom"),
        "{err}"
    );
    let (code, _, err) = run_with_secret(&serve_args, Some("short"));
    assert_ne!(code, 0);
    assert!(err.contains("at least 16"), "{err}");

    let mut s = serve(&b, &addr);
    fs::write(Path::new(&b).join("v.raw"), vec![0x33u8; 64 << 20]).unwrap();
    let exercise = [
        "volume",
        "mirror-exercise",
        "--pool",
        &a,
        "--name",
        "v",
        "--peer",
        &addr,
        "--writes",
        "50",
        "--timeout-ms",
        "2000",
    ];
    let (_, out, err) = run_with_secret(&exercise, Some("a different cluster secret"));
    assert!(
        out.contains("connected=false") && !out.contains("connected=true"),
        "{out}{err}"
    );
    let (code, out, err) = run_with_secret(
        &[
            "volume", "verify", "--pool", &a, "--name", "v", "--peer", &addr,
        ],
        Some("a different cluster secret"),
    );
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("cluster secret differs"), "{err}");
    let peer = fs::read(Path::new(&b).join("v.raw")).unwrap();
    assert!(
        peer.iter().all(|x| *x == 0x33),
        "the wrong node wrote to the peer replica"
    );
    // The target still serves the right node afterwards (here: a difference to report).
    let (code, out, err) = run(&[
        "volume", "verify", "--pool", &a, "--name", "v", "--peer", &addr,
    ]);
    assert!(
        out.contains("differ") || err.contains("differ"),
        "{code} {out} {err}"
    );
    s.kill9();
}
