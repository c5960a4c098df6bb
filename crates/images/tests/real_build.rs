//! The real image build: Debian packages through the host's apt, into a fresh cache, then the
//! idempotency check (a second build downloads nothing) and a damaged cache being rebuilt.
//! Needs apt-get (a Debian-like host); fails saying so elsewhere.

use std::process::Command;
use std::time::Instant;

use images::{initramfs, BuildOptions, DEFAULT_IMAGE};

fn have_apt() -> bool {
    Command::new("apt-get").arg("--version").output().is_ok()
}

#[test]
fn real_build_is_complete_and_idempotent() {
    assert!(
        have_apt(),
        "this test needs apt-get: the image builder runs on Debian or Ubuntu hosts"
    );
    let root = tempfile::tempdir().unwrap();
    let opts = BuildOptions {
        progress: true,
        force: false,
    };

    let t = Instant::now();
    let cold = images::build_in(root.path(), DEFAULT_IMAGE, opts).unwrap();
    eprintln!("cold build: {:.1} s", t.elapsed().as_secs_f64());
    assert!(cold.built);
    let m = &cold.manifest;
    assert!(m.kernel_release.ends_with("-cloud-amd64"), "{m:?}");
    let names: Vec<&str> = m.packages.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names[0], "linux-image-cloud-amd64");
    assert_eq!(names[1], format!("linux-image-{}", m.kernel_release));
    assert_eq!(names[2], "busybox-static");
    eprintln!(
        "vmlinuz {} bytes, initrd.img {} bytes, modules {:?}",
        m.kernel.size, m.initrd.size, m.modules
    );

    // The kernel is a bzImage ("HdrS" at 0x202).
    let kernel = std::fs::read(&cold.paths.kernel).unwrap();
    assert_eq!(&kernel[0x202..0x206], b"HdrS");

    // The initramfs has init, busybox and every virtio module with its dependencies, in order.
    let entries = initramfs::read_archive_file(&cold.paths.initrd).unwrap();
    let get = |n: &str| {
        entries
            .iter()
            .find(|e| e.name == n)
            .unwrap_or_else(|| panic!("{n} missing from the initramfs"))
    };
    assert_eq!(get("init").data, images::INIT_SCRIPT.as_bytes());
    assert!(get("bin/busybox").data.starts_with(b"\x7fELF"));
    let order = String::from_utf8(get("etc/ftvm/modules").data.clone()).unwrap();
    let order: Vec<&str> = order.lines().collect();
    let pos = |m: &str| {
        order
            .iter()
            .position(|l| l.ends_with(&format!("/{m}.ko")))
            .unwrap_or_else(|| panic!("{m} not in the load order {order:?}"))
    };
    for (dep, user) in [
        ("virtio", "virtio_mmio"),
        ("virtio_ring", "virtio_mmio"),
        ("virtio", "virtio_blk"),
        ("failover", "net_failover"),
        ("net_failover", "virtio_net"),
    ] {
        assert!(pos(dep) < pos(user), "{dep} must load before {user}");
    }
    for line in &order {
        let ko = get(line.trim_start_matches('/'));
        assert!(
            ko.data.starts_with(b"\x7fELF"),
            "{line} is not a plain ELF module"
        );
    }

    // The image's own busybox runs the init script's exec path (host-side test mode).
    let dir = tempfile::tempdir().unwrap();
    let bb = dir.path().join("busybox");
    std::fs::write(&bb, &get("bin/busybox").data).unwrap();
    let mut perm = std::fs::metadata(&bb).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&bb, perm).unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    for applet in ["sh", "base64", "tr", "printf", "sync", "cat"] {
        std::os::unix::fs::symlink(&bb, bin.join(applet)).unwrap();
    }
    std::fs::write(dir.path().join("init"), images::INIT_SCRIPT).unwrap();
    // "echo hello from busybox; exit 7"
    let out = Command::new(&bb)
        .arg("sh")
        .arg(dir.path().join("init"))
        .env("PATH", &bin)
        .env("FTVM_INIT_TEST", "1")
        .env(
            "FTVM_CMDLINE",
            "console=ttyS0 ftvm.exec=ZWNobyBoZWxsbyBmcm9tIGJ1c3lib3g7IGV4aXQgNw==",
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(7), "{stdout}");
    assert!(
        stdout.contains("hello from busybox\n\nftvm-exit-status: 7\n"),
        "{stdout}"
    );

    // Second call: valid cache, nothing downloaded, same files.
    let t = Instant::now();
    let warm = images::build_in(root.path(), DEFAULT_IMAGE, opts).unwrap();
    eprintln!("warm build: {:.3} s", t.elapsed().as_secs_f64());
    assert!(!warm.built, "a valid cache must not be rebuilt");
    assert_eq!(warm.manifest, cold.manifest);
    assert!(!root.path().join("images").read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .contains(".build-")));

    // A damaged cache is noticed and rebuilt.
    std::fs::write(&cold.paths.initrd, b"damaged").unwrap();
    let again = images::build_in(root.path(), DEFAULT_IMAGE, opts).unwrap();
    assert!(again.built);
    assert!(
        again
            .rebuild_reason
            .as_deref()
            .unwrap_or_default()
            .contains("does not match"),
        "{:?}",
        again.rebuild_reason
    );
    assert_eq!(
        again.manifest.initrd, cold.manifest.initrd,
        "builds are reproducible"
    );
}
