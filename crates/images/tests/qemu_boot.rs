//! The built image boots to init under QEMU's software CPU (TCG, no KVM), so the initramfs,
//! its init script and the module set are proven on any host, including one whose KVM cannot
//! run a stock kernel to init: modules load, the virtio-mmio disk and network (found through
//! ACPI `LNRO0005` devices, as ftvm describes them) appear, eth0 gets its static address,
//! `ftvm.exec` runs and its status line is printed, and the guest powers off through ACPI.
//! Skipped, saying why, where qemu-system-x86_64 or apt-get is absent.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn have(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

/// The host's TSC rate in kHz, from /proc/cpuinfo's "cpu MHz".
fn host_tsc_khz() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = info
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0) as u64)
}

#[test]
fn image_boots_to_exec_under_qemu_tcg() {
    assert!(
        have("qemu-system-x86_64"),
        "this test needs qemu-system-x86_64 (Debian: qemu-system-x86); `sudo ./scripts/setup` installs it"
    );
    assert!(
        have("apt-get"),
        "this test needs apt-get: the image builder runs on Debian or Ubuntu hosts"
    );
    let image = images::ensure_image(images::DEFAULT_IMAGE, true).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk.raw");
    std::fs::write(&disk, vec![0u8; 8 << 20]).unwrap();

    let token = format!("TOKEN_{}", std::process::id());
    let exec = format!(
        "echo {token}; nproc; grep -w vda /proc/partitions; ip -o -4 addr show dev eth0; \
         ip route; lsmod; exit 3"
    );
    let exec_b64 = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(exec.as_bytes())
    };
    // Under TCG on a busy machine the kernel's TSC calibration against the PIT can fail and
    // leave it without a usable clock; TCG's TSC is the host's, so tell the kernel its rate.
    let tsc = host_tsc_khz()
        .map(|khz| format!(" tsc_early_khz={khz}"))
        .unwrap_or_default();
    let append = format!(
        "console=ttyS0 panic=-1 ftvm.ip=10.0.2.15/24 ftvm.gw=10.0.2.2 ftvm.exec={exec_b64}{tsc}"
    );
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-M", "microvm,acpi=on,rtc=off,isa-serial=on"])
        .args(["-accel", "tcg", "-cpu", "max", "-smp", "2", "-m", "512"])
        .args([
            "-nographic",
            "-no-reboot",
            "-nodefaults",
            "-serial",
            "stdio",
        ])
        .arg("-kernel")
        .arg(&image.kernel)
        .arg("-initrd")
        .arg(&image.initrd)
        .args(["-append", &append])
        .arg("-drive")
        .arg(format!(
            "id=d0,file={},format=raw,if=none",
            disk.to_string_lossy()
        ))
        .args(["-device", "virtio-blk-device,drive=d0"])
        // User-mode networking, restricted: the guest reaches nothing outside.
        .args(["-netdev", "user,id=n0,restrict=on"])
        .args(["-device", "virtio-net-device,netdev=n0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        let _ = stdout.read_to_end(&mut s);
        String::from_utf8_lossy(&s).replace('\r', "")
    });
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if start.elapsed() > Duration::from_secs(240) {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let console = reader.join().unwrap();
    let mut stderr = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut stderr);
    eprintln!(
        "qemu (TCG) run: {:.1} s, status {status:?}\n{console}\n{stderr}",
        start.elapsed().as_secs_f64()
    );
    assert!(status.is_some(), "the guest did not power off within 240 s");

    let lines: Vec<&str> = console.lines().collect();
    let at = lines
        .iter()
        .position(|l| *l == token)
        .expect("init ran the ftvm.exec command");
    let out = &lines[at..];
    assert_eq!(out.get(1).copied(), Some("2"), "nproc");
    assert!(
        out.iter()
            .any(|l| l.split_whitespace().last() == Some("vda")),
        "virtio-blk disk vda"
    );
    assert!(
        out.iter()
            .any(|l| l.contains("eth0") && l.contains("inet 10.0.2.15/24")),
        "eth0 with its static address"
    );
    assert!(
        out.iter().any(|l| l.starts_with("default via 10.0.2.2")),
        "default route"
    );
    for m in [
        "virtio_mmio",
        "virtio_blk",
        "virtio_net",
        "net_failover",
        "failover",
        "virtio_ring",
        "virtio ",
    ] {
        assert!(
            out.iter().any(|l| l.starts_with(m)),
            "module {m} is not loaded"
        );
    }
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.starts_with("ftvm-exit-status:"))
            .collect::<Vec<_>>(),
        [&"ftvm-exit-status: 3"]
    );
    assert!(console.contains("reboot: Power down"), "ACPI power-off");
}
