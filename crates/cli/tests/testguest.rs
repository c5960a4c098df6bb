//! The monitor running ftvm's test guest for real: console, disk, network, snapshot/restore.
//! Needs root and /dev/kvm (the suite's `.ci/run` runs as root).

use std::time::Duration;

use serde_json::json;
use testbed::args as s;
use testbed::counter_values as counts;
use testbed::ft::wait_path;
use testbed::kv::KvClient;
use testbed::{require_vms, Monitor, Scratch, TapDevice};

const BOOT: Duration = Duration::from_secs(20);

/// Starts the test guest with `job`, extra args, console in `dir`.
fn start(dir: &Scratch, name: &str, cmdline: &str, extra: &[String]) -> Monitor {
    let console = dir.path(&format!("{name}.console"));
    let sock = dir.path(&format!("{name}.sock"));
    let mut args = s(&[
        "vm",
        "run",
        "--image",
        "testguest",
        "--mem",
        "128",
        "--cmdline",
        cmdline,
    ]);
    args.extend(s(&["--console", &format!("file:{}", console.display())]));
    args.extend(s(&["--api-sock", &sock.display().to_string()]));
    args.extend_from_slice(extra);
    Monitor::spawn(&args, &console, Some(&sock)).expect("start monitor")
}

#[test]
fn counter_continues_after_snapshot_and_restore_in_new_process() {
    require_vms();
    let dir = Scratch::new("snap").unwrap();
    // Two vCPUs: the second waits for a SIPI that never comes; its state must survive too.
    let mut vm = start(&dir, "a", "-- counter", &s(&["--vcpus", "2"]));
    vm.wait_for("counter 30\n", BOOT).unwrap();
    wait_path(vm.api_sock.as_deref().unwrap(), Duration::from_secs(5)).unwrap();
    vm.api("POST", "/pause", None).unwrap();
    let before = vm.api("GET", "/memory-checksum", None).unwrap()["crc32"]
        .as_u64()
        .unwrap();
    let snap = dir.path("counter.snap");
    let info = vm
        .api("POST", "/snapshot", Some(json!({ "path": snap })))
        .unwrap();
    assert!(info["bytes"].as_u64().unwrap() > 0);
    // The snapshot leaves the VM paused as it was: no output after it (the guest may be in the
    // middle of a line; the restored guest finishes it).
    let text_a = vm.console_text();
    let last_before = *counts(&text_a).last().unwrap();
    vm.kill9();

    let console_b = dir.path("b.console");
    let sock_b = dir.path("b.sock");
    let mut args = s(&[
        "vm",
        "restore",
        "--snapshot",
        &snap.display().to_string(),
        "--paused",
    ]);
    args.extend(s(&["--console", &format!("file:{}", console_b.display())]));
    args.extend(s(&["--api-sock", &sock_b.display().to_string()]));
    let mut restored = Monitor::spawn(&args, &console_b, Some(&sock_b)).unwrap();
    wait_path(&sock_b, Duration::from_secs(5)).unwrap();
    let after = restored.api("GET", "/memory-checksum", None).unwrap()["crc32"]
        .as_u64()
        .unwrap();
    assert_eq!(before, after, "guest memory differs after restore");
    restored.api("POST", "/resume", None).unwrap();
    let target = format!("counter {}\n", last_before + 20);
    let text_b = restored.wait_for(&target, BOOT).unwrap();
    // Both consoles together read as one run: 1, 2, 3, … with nothing repeated or skipped.
    let seq = counts(&format!("{text_a}{text_b}"));
    assert_eq!(seq[0], 1);
    assert!(
        seq.windows(2).all(|w| w[1] == w[0] + 1),
        "the count did not continue where it was: {seq:?}"
    );
    assert!(
        counts(&text_b)[0] <= last_before + 2,
        "restored guest skipped ahead"
    );
    restored.api("POST", "/shutdown", None).unwrap();
    assert!(restored
        .wait_exit(Duration::from_secs(10))
        .unwrap()
        .success());
}

#[test]
fn guest_writes_pattern_the_host_reads_from_the_disk_file() {
    require_vms();
    let dir = Scratch::new("blk").unwrap();
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 4 << 20]).unwrap();
    let mut vm = start(
        &dir,
        "blk",
        "-- blk-pattern 2048",
        &s(&["--disk", &disk.display().to_string()]),
    );
    vm.wait_for("blk-pattern ok sectors=2048", BOOT).unwrap();
    vm.kill9();
    let bytes = std::fs::read(&disk).unwrap();
    for sector in 0..2048u64 {
        for word in 0..64u64 {
            let off = (sector * 512 + word * 8) as usize;
            let got = u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
            let want = sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ word;
            assert_eq!(got, want, "sector {sector} word {word}");
        }
    }
    assert!(
        bytes[2048 * 512..].iter().all(|&b| b == 0),
        "bytes past the pattern were written"
    );
}

#[test]
fn read_only_disk_refuses_guest_writes() {
    require_vms();
    let dir = Scratch::new("ro").unwrap();
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut vm = start(
        &dir,
        "ro",
        "-- blk-pattern 64",
        &s(&["--disk", &format!("{},readonly", disk.display())]),
    );
    // The guest sees the read-only flag, writes anyway, and the monitor answers with an I/O
    // error status (1): the job reports the refused write and powers off.
    vm.wait_for("read-only (VIRTIO_BLK_F_RO); writing anyway", BOOT)
        .unwrap();
    vm.wait_for("blk-pattern: write at sector 0: Status(1)", BOOT)
        .unwrap();
    let text = vm.console_text();
    assert!(
        !text.contains("blk-pattern ok"),
        "a read-only disk accepted writes:\n{text}"
    );
    vm.kill9();
    assert!(std::fs::read(&disk).unwrap().iter().all(|&b| b == 0));
}

fn line_client(addr: &str) -> KvClient {
    KvClient::connect(
        addr.parse().unwrap(),
        Duration::from_secs(10),
        Duration::from_secs(10),
    )
    .unwrap()
}

#[test]
fn tcp_echo_over_a_tap() {
    require_vms();
    let dir = Scratch::new("echo").unwrap();
    let tap = TapDevice::new().unwrap();
    let cmdline = format!("{} -- tcp-echo 7000", tap.guest_cmdline());
    let mut vm = start(
        &dir,
        "echo",
        &cmdline,
        &s(&["--net", &format!("tap={}", tap.name)]),
    );
    vm.wait_for("job tcp-echo running", BOOT).unwrap();
    let mut c = line_client(&format!("{}:7000", tap.guest_ip));
    for i in 0..50 {
        let msg = format!("hello {i}:{}", "x".repeat(i * 20));
        assert_eq!(c.ask(&msg).unwrap(), msg);
    }
    // Several connections at once.
    let mut conns: Vec<_> = (0..4)
        .map(|_| line_client(&format!("{}:7000", tap.guest_ip)))
        .collect();
    for (i, c) in conns.iter_mut().enumerate() {
        assert_eq!(c.ask(&format!("conn {i}")).unwrap(), format!("conn {i}"));
    }
}

#[test]
fn kv_data_survives_snapshot_and_restore() {
    require_vms();
    let dir = Scratch::new("kv").unwrap();
    let tap = TapDevice::new().unwrap();
    let cmdline = format!("{} -- kv 7001", tap.guest_cmdline());
    let net = format!("tap={}", tap.name);
    let mut vm = start(&dir, "kv", &cmdline, &s(&["--net", &net]));
    vm.wait_for("job kv running", BOOT).unwrap();
    let addr = format!("{}:7001", tap.guest_ip);
    {
        let mut c = line_client(&addr);
        assert_eq!(c.ask("GET nothing").unwrap(), "NOTFOUND");
        for i in 0..100 {
            assert_eq!(c.ask(&format!("SET key{i} value-{i}")).unwrap(), "OK");
        }
        assert!(c.ask("BOGUS").unwrap().starts_with("ERR"));
    }
    let snap = dir.path("kv.snap");
    vm.api("POST", "/snapshot", Some(json!({ "path": snap })))
        .unwrap();
    vm.kill9();

    let console_b = dir.path("kv-b.console");
    let mut args = s(&[
        "vm",
        "restore",
        "--snapshot",
        &snap.display().to_string(),
        "--net",
        &net,
    ]);
    args.extend(s(&["--console", &format!("file:{}", console_b.display())]));
    let _restored = Monitor::spawn(&args, &console_b, None).unwrap();
    let mut c = line_client(&addr);
    for i in 0..100 {
        assert_eq!(
            c.ask(&format!("GET key{i}")).unwrap(),
            format!("VALUE value-{i}")
        );
    }
}

/// Runs `ftvm args` expecting failure: exactly one error line, non-zero status.
fn expect_one_line_error(args: &[String], needle: &str) {
    let out = std::process::Command::new(testbed::ftvm_bin())
        .args(args)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "ftvm {args:?} succeeded");
    assert_eq!(
        err.lines().count(),
        1,
        "expected one error line, got:\n{err}"
    );
    assert!(err.starts_with("ftvm: error: "), "{err}");
    assert!(
        err.contains(needle),
        "error {err:?} does not mention {needle:?}"
    );
}

#[test]
fn bad_input_gives_one_clear_error_and_writes_nothing() {
    require_vms();
    let dir = Scratch::new("bad").unwrap();
    let console = dir.path("console");
    let con = format!("file:{}", console.display());
    let tg = testbed::testguest_bin().display().to_string();
    expect_one_line_error(
        &s(&[
            "vm",
            "run",
            "--kernel",
            "/nonexistent/vmlinuz",
            "--console",
            &con,
        ]),
        "check --kernel",
    );
    let disk_dir = dir.path("a-directory");
    std::fs::create_dir(&disk_dir).unwrap();
    expect_one_line_error(
        &s(&[
            "vm",
            "run",
            "--kernel",
            &tg,
            "--disk",
            &disk_dir.display().to_string(),
            "--console",
            &con,
        ]),
        "disk",
    );
    expect_one_line_error(
        &s(&[
            "vm",
            "run",
            "--kernel",
            &tg,
            "--disk",
            "/nonexistent.img",
            "--console",
            &con,
        ]),
        "/nonexistent.img",
    );
    expect_one_line_error(
        &s(&[
            "vm",
            "run",
            "--kernel",
            &tg,
            "--net",
            "tap=ftvmnosuch0",
            "--console",
            &con,
        ]),
        "ip tuntap add",
    );
    expect_one_line_error(
        &s(&[
            "vm",
            "run",
            "--kernel",
            &tg,
            "--vcpus",
            "0",
            "--console",
            &con,
        ]),
        "--vcpus 0",
    );
    expect_one_line_error(
        &s(&[
            "vm",
            "run",
            "--kernel",
            &tg,
            "--mem",
            "100000000",
            "--console",
            &con,
        ]),
        "--mem",
    );
    assert!(!console.exists(), "a failed start created the console file");

    // A good snapshot, then damaged copies of it.
    let mut vm = start(&dir, "src", "-- counter", &[]);
    vm.wait_for("counter 3\n", BOOT).unwrap();
    let snap = dir.path("good.snap");
    vm.api("POST", "/snapshot", Some(json!({ "path": snap })))
        .unwrap();
    vm.kill9();
    let good = std::fs::read(&snap).unwrap();
    let truncated = dir.path("truncated.snap");
    std::fs::write(&truncated, &good[..good.len() / 2]).unwrap();
    let corrupt = dir.path("corrupt.snap");
    let mut bad = good.clone();
    let mid = bad.len() * 3 / 4;
    bad[mid] ^= 0x55;
    std::fs::write(&corrupt, &bad).unwrap();
    for (file, what) in [(&truncated, "truncated"), (&corrupt, "corrupted")] {
        expect_one_line_error(
            &s(&[
                "vm",
                "restore",
                "--snapshot",
                &file.display().to_string(),
                "--console",
                &con,
            ]),
            what,
        );
    }
    assert!(
        !console.exists(),
        "a failed restore created the console file"
    );
    assert_eq!(
        std::fs::read(&snap).unwrap(),
        good,
        "restore attempts must not modify snapshots"
    );
}

#[test]
fn guest_power_off_ends_the_monitor_and_reboot_boots_again() {
    require_vms();
    let dir = Scratch::new("power").unwrap();
    let mut off = start(&dir, "off", "-- poweroff", &[]);
    let status = off.wait_exit(BOOT).unwrap();
    assert!(status.success(), "power-off exit status {status}");
    assert!(off.console_text().contains("testguest: powering off"));

    let mut rb = start(&dir, "reboot", "-- reboot", &[]);
    let t0 = std::time::Instant::now();
    while rb.console_text().matches("testguest: rebooting").count() < 3 {
        assert!(
            t0.elapsed() < BOOT,
            "guest did not reboot three times:\n{}",
            rb.console_text()
        );
        assert!(
            rb.wait_exit(Duration::from_millis(20)).is_err(),
            "monitor exited on a reboot"
        );
    }
    rb.kill9();
}
