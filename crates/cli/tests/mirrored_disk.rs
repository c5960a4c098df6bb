//! HA storage under a running guest: the test guest writes through a virtio-blk disk that the
//! monitor mirrors synchronously to `ftvm volume mirror-serve` on the peer; both replicas end
//! identical. Needs root and /dev/kvm.

mod volume_util;

use std::path::Path;
use std::time::Duration;

use testbed::{Monitor, Scratch};
use volume_util::*;

#[test]
fn guest_writes_reach_the_peer_replica_synchronously() {
    testbed::require_vms();
    let d = Scratch::new("mirrored-disk").unwrap();
    let (a, b) = (d.path("node-a"), d.path("node-b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    let (pa, pb) = (a.display().to_string(), b.display().to_string());
    ok(&[
        "volume", "create", "--pool", &pa, "--name", "v", "--size", "8M", "--format", "qcow2",
    ]);
    ok(&[
        "volume", "create", "--pool", &pb, "--name", "v", "--size", "8M", "--format", "raw",
    ]);
    let addr = format!("127.0.0.1:{}", free_port());
    // The monitor gets the secret by file, the target by FTVM_FT_SECRET (volume_util).
    let secret_file = d.path("secret");
    std::fs::write(&secret_file, SECRET).unwrap();
    let mut target = Proc::spawn(&[
        "volume",
        "mirror-serve",
        "--pool",
        &pb,
        "--name",
        "v",
        "--listen",
        &addr,
    ]);
    target.wait_line("target listening", Duration::from_secs(30), |l| {
        l.contains("listening on")
    });

    let console = d.path("console");
    let disk = format!("{}/v.qcow2,mirror={addr}", pa);
    let args: Vec<String> = [
        "vm",
        "run",
        "--image",
        "testguest",
        "--mem",
        "128",
        "--cmdline",
        "-- blk-pattern 4096",
        "--disk",
        &disk,
        "--secret-file",
        &secret_file.display().to_string(),
        "--console",
        &format!("file:{}", console.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut vm = Monitor::spawn(&args, &console, None).unwrap();
    vm.wait_for("blk-pattern ok sectors=4096", Duration::from_secs(30))
        .unwrap();
    // Every completed write is on both replicas already: kill the monitor without a flush.
    vm.kill9();

    let out = ok(&[
        "volume", "verify", "--pool", &pa, "--name", "v", "--peer", &addr,
    ]);
    assert!(out.contains("identical"), "{out}");
    let raw = std::fs::read(Path::new(&pb).join("v.raw")).unwrap();
    for sector in [0u64, 1, 2047, 4095] {
        let off = (sector * 512) as usize;
        let got = u64::from_le_bytes(raw[off..off + 8].try_into().unwrap());
        assert_eq!(
            got,
            sector.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            "peer sector {sector}"
        );
    }
    let (code, msg) = qemu_img(&["check", &format!("{pa}/v.qcow2")]);
    assert_eq!(code, 0, "qemu-img check: {msg}");
    target.kill9();
}
