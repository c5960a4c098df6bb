//! FT protection between two monitor processes on this host (A-link over loopback through a
//! proxy that can damage or stall it, watch path over loopback UDP, default 100 ms dead time):
//! failover only when the primary is silent on both paths, never on a refused frame or a slow
//! link; a copy that finds its peer live stops; the guest's power-off and reboot are followed.
//! Needs root and /dev/kvm.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use testbed::args as s;
use testbed::counter_values as counts;
use testbed::ft::{wait_ft_state, wait_path};
use testbed::kv::KvClient;
use testbed::{Monitor, Scratch, TapDevice};

const SECRET: &str = "ftvm-test-secret-0123456789";

/// The default dead time: what the product ships with.
const TIMEOUT_MS: &str = "100";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pair {
    primary: Monitor,
    backup: Monitor,
    proxy: Proxy,
    /// The backup's watch port.
    watch_b: u16,
}

/// How the backup and the primary are started.
#[derive(Default)]
struct Opts {
    primary_extra: Vec<String>,
    backup_extra: Vec<String>,
}

fn start_pair(dir: &Scratch, job: &str, o: Opts) -> Pair {
    std::env::set_var("FTVM_FT_SECRET", SECRET);
    let backup_port = free_port();
    let proxy = Proxy::start(backup_port);
    let (wa, wb) = (free_udp_port(), free_udp_port());
    let (bcon, bsock) = (dir.path("b.console"), dir.path("b.sock"));
    let mut bargs = s(&[
        "vm",
        "backup",
        "--listen",
        &format!("127.0.0.1:{backup_port}"),
        "--ft-timeout-ms",
        TIMEOUT_MS,
        "--ft-watch",
        &format!("127.0.0.1:{wa}"),
        "--ft-watch-bind",
        &format!("127.0.0.1:{wb}"),
        "--console",
        &format!("file:{}", bcon.display()),
    ]);
    bargs.extend(s(&["--api-sock", &bsock.display().to_string()]));
    bargs.extend(o.backup_extra);
    let backup = Monitor::spawn(&bargs, &bcon, Some(&bsock)).unwrap();
    wait_path(&bsock, Duration::from_secs(10)).unwrap();
    let (acon, asock) = (dir.path("a.console"), dir.path("a.sock"));
    let mut aargs = s(&[
        "vm",
        "run",
        "--image",
        "testguest",
        "--mem",
        "128",
        "--cmdline",
        job,
        "--ft-peer",
        &format!("127.0.0.1:{}", proxy.port),
        "--ft-timeout-ms",
        TIMEOUT_MS,
        "--ft-watch",
        &format!("127.0.0.1:{wb}"),
        "--ft-watch-bind",
        &format!("127.0.0.1:{wa}"),
    ]);
    aargs.extend(s(&[
        "--console",
        &format!("file:{}", acon.display()),
        "--api-sock",
        &asock.display().to_string(),
    ]));
    aargs.extend(o.primary_extra);
    let primary = Monitor::spawn(&aargs, &acon, Some(&asock)).unwrap();
    wait_path(&asock, Duration::from_secs(10)).unwrap();
    Pair {
        primary,
        backup,
        proxy,
        watch_b: wb,
    }
}

fn ft(m: &Monitor) -> serde_json::Value {
    m.api("GET", "/status", None).unwrap()["ft"].clone()
}

/// Waits until `f(ft status)` holds.
fn wait_ft(m: &Monitor, what: &str, timeout: Duration, f: impl Fn(&serde_json::Value) -> bool) {
    let t0 = Instant::now();
    loop {
        let st = ft(m);
        if f(&st) {
            return;
        }
        assert!(
            t0.elapsed() < timeout,
            "{what} not within {timeout:?}: {st}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A TCP proxy on loopback between primary and backup (any number of connections) that can
/// damage the primary → backup stream once, or stall every connection open so far (the
/// A-link goes silent while the sockets stay open; later connections pass).
struct Proxy {
    port: u16,
    arm: Arc<Mutex<Option<Damage>>>,
    /// Connections numbered below this forward nothing any more.
    stalled_below: Arc<AtomicU64>,
    connections: Arc<AtomicU64>,
}

/// How the proxy damages the primary → backup stream once armed.
#[derive(Clone, Copy)]
enum Damage {
    /// Flip one byte `n` bytes after arming.
    Corrupt(u64),
    /// Close both directions `n` bytes after arming.
    Truncate(u64),
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let arm: Arc<Mutex<Option<Damage>>> = Arc::default();
        let stalled_below = Arc::new(AtomicU64::new(0));
        let connections = Arc::new(AtomicU64::new(0));
        let (a, sb, c) = (arm.clone(), stalled_below.clone(), connections.clone());
        std::thread::spawn(move || {
            for inbound in listener.incoming() {
                let Ok(inbound) = inbound else { return };
                let n = c.fetch_add(1, Ordering::SeqCst);
                let Ok(outbound) = TcpStream::connect(("127.0.0.1", target)) else {
                    continue;
                };
                let (in_r, out_w) = (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
                let (out_r, in_w) = (outbound, inbound);
                let (sb1, sb2) = (sb.clone(), sb.clone());
                let a = a.clone();
                std::thread::spawn(move || forward(out_r, in_w, None, n, sb1));
                std::thread::spawn(move || forward(in_r, out_w, Some(a), n, sb2));
            }
        });
        Proxy {
            port,
            arm,
            stalled_below,
            connections,
        }
    }

    fn damage(&self, d: Damage) {
        *self.arm.lock().unwrap() = Some(d);
    }

    /// Every connection open now goes silent for good (sockets stay open).
    fn stall_current(&self) {
        self.stalled_below
            .store(self.connections.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

fn forward(
    mut from: TcpStream,
    mut to: TcpStream,
    arm: Option<Arc<Mutex<Option<Damage>>>>,
    conn: u64,
    stalled_below: Arc<AtomicU64>,
) {
    let stalled = || conn < stalled_below.load(Ordering::SeqCst);
    let mut buf = vec![0u8; 65536];
    let mut countdown: Option<(Damage, u64)> = None;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        while stalled() {
            std::thread::sleep(Duration::from_millis(50));
        }
        if let (None, Some(arm)) = (countdown, &arm) {
            if let Some(d) = arm.lock().unwrap().take() {
                let (Damage::Corrupt(k) | Damage::Truncate(k)) = d;
                countdown = Some((d, k));
            }
        }
        let mut chunk = &mut buf[..n];
        if let Some((damage, left)) = countdown.as_mut() {
            if (*left as usize) < chunk.len() {
                match *damage {
                    Damage::Corrupt(_) => chunk[*left as usize] ^= 0x5a,
                    Damage::Truncate(_) => {
                        chunk = &mut chunk[..*left as usize];
                        let _ = to.write_all(chunk);
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                        return;
                    }
                }
                *left = u64::MAX;
            } else if *left != u64::MAX {
                *left -= chunk.len() as u64;
            }
        }
        if to.write_all(chunk).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Bytes the monitor wrote to `tap` so far (the kernel counts them as received).
fn tap_frames_from_guest(tap: &str) -> u64 {
    std::fs::read_to_string(format!("/sys/class/net/{tap}/statistics/rx_packets"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn counter_continues_on_the_backup_after_sigkill_of_the_primary() {
    testbed::require_vms();
    let dir = Scratch::new("ft-counter").unwrap();
    let mut pair = start_pair(&dir, "-- counter", Opts::default());
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    pair.primary
        .wait_for("counter 50\n", Duration::from_secs(20))
        .unwrap();
    wait_ft(
        &pair.primary,
        "50 checkpoints",
        Duration::from_secs(10),
        |f| f["checkpoints"].as_u64() > Some(50),
    );
    let t_kill = Instant::now();
    pair.primary.kill9();
    let last_primary = *counts(&pair.primary.console_text()).last().unwrap();

    // Both paths are silent at once: the takeover follows the dead time.
    wait_ft_state(&pair.backup, "failed-over", Duration::from_secs(5)).unwrap();
    eprintln!("SIGKILL -> failed-over: {:?}", t_kill.elapsed());
    let target = format!("counter {}\n", last_primary + 20);
    let text = pair
        .backup
        .wait_for(&target, Duration::from_secs(10))
        .unwrap();
    let seq = counts(&text);
    // The backup resumes at the last committed checkpoint: never past what the primary printed,
    // never from zero, and it counts on without gaps.
    assert!(seq[0] > 1, "restarted from zero: {seq:?}");
    assert!(
        seq[0] <= last_primary + 1,
        "backup ran ahead of the primary: {} > {}",
        seq[0],
        last_primary + 1
    );
    assert!(
        last_primary + 1 - seq[0] <= 10,
        "resumed too far back: {} vs {}",
        seq[0],
        last_primary
    );
    assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "gap: {seq:?}");
    let st = ft(&pair.backup);
    assert!(st["split_brain_exposure"].is_string(), "{st}");
}

#[test]
fn lost_backup_leaves_the_primary_running_degraded_with_output_flowing() {
    testbed::require_vms();
    let dir = Scratch::new("ft-degraded").unwrap();
    let tap_a = TapDevice::new().unwrap();
    let tap_b = TapDevice::new().unwrap();
    let job = format!("{} -- kv 7100", tap_a.guest_cmdline());
    let mut pair = start_pair(
        &dir,
        &job,
        Opts {
            primary_extra: s(&["--net", &format!("tap={}", tap_a.name)]),
            backup_extra: s(&["--net", &format!("tap={}", tap_b.name)]),
        },
    );
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    let mut c = KvClient::connect(
        format!("{}:7100", tap_a.guest_ip).parse().unwrap(),
        Duration::from_secs(20),
        Duration::from_secs(20),
    )
    .unwrap();
    for i in 0..20 {
        assert_eq!(c.ask(&format!("SET a{i} {i}")).unwrap(), "OK");
    }
    // Silent on both paths beyond its dead time plus the margin: the arbiter grants.
    pair.backup.kill9();
    let st = wait_ft_state(&pair.primary, "degraded", Duration::from_secs(5)).unwrap();
    assert_eq!(st["state"], "running");
    // Output keeps flowing, on the same connection.
    for i in 0..20 {
        assert_eq!(c.ask(&format!("GET a{i}")).unwrap(), format!("VALUE {i}"));
        assert_eq!(c.ask(&format!("SET b{i} {i}")).unwrap(), "OK");
    }
}

/// A damaged A-link stream is refused, never applied and never a death: the backup drops the
/// stream, the primary reconnects, a new session resyncs, and the new standby is good (a
/// SIGKILL afterwards fails over to a consistent guest).
fn damaged_stream_is_refused_and_protection_resumes(damage: Damage, tag: &str) {
    testbed::require_vms();
    let dir = Scratch::new(tag).unwrap();
    let mut pair = start_pair(&dir, "-- counter", Opts::default());
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = ft(&pair.backup)["epoch"].as_u64().unwrap();
    assert!(before > 0);
    pair.proxy.damage(damage);
    // A new session: the backup accepted a second one and committed in it.
    wait_ft(
        &pair.backup,
        "a second session",
        Duration::from_secs(20),
        |f| f["sessions"].as_u64() >= Some(2) && f["state"] == "protected",
    );
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    let b = ft(&pair.backup);
    assert_ne!(b["state"], "failed-over", "{b}");
    if let Damage::Corrupt(_) = damage {
        assert!(b["rejected_frames"].as_u64() >= Some(1), "{b}");
    }
    // Only the new session's standby is there, and it is good.
    let last_before_kill = {
        std::thread::sleep(Duration::from_millis(300));
        pair.primary.kill9();
        *counts(&pair.primary.console_text()).last().unwrap()
    };
    wait_ft_state(&pair.backup, "failed-over", Duration::from_secs(5)).unwrap();
    let text = pair
        .backup
        .wait_for(
            &format!("counter {}\n", last_before_kill + 10),
            Duration::from_secs(10),
        )
        .unwrap();
    let seq = counts(&text);
    assert!(seq[0] > 1 && seq[0] <= last_before_kill + 1, "{seq:?}");
    assert!(seq.windows(2).all(|w| w[1] == w[0] + 1), "gap: {seq:?}");
}

#[test]
fn corrupted_frame_is_refused_never_applied_and_not_a_failover() {
    damaged_stream_is_refused_and_protection_resumes(Damage::Corrupt(5000), "ft-corrupt");
}

#[test]
fn truncated_frame_is_refused_never_applied_and_not_a_failover() {
    damaged_stream_is_refused_and_protection_resumes(Damage::Truncate(3000), "ft-trunc");
}

#[test]
fn a_silent_alink_with_the_watch_path_alive_is_no_death_and_protection_resumes() {
    testbed::require_vms();
    let dir = Scratch::new("ft-silent").unwrap();
    let mut pair = start_pair(&dir, "-- counter", Opts::default());
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // Acks stop arriving and checkpoints stop leaving, far beyond the 100 ms dead time, while
    // the sockets stay open and both monitors are alive.
    pair.proxy.stall_current();
    let t0 = Instant::now();
    let mut states = Vec::new();
    while t0.elapsed() < Duration::from_secs(3) {
        let b = ft(&pair.backup);
        assert_ne!(b["state"], "failed-over", "the backup went live: {b}");
        states.push(b["state"].as_str().unwrap_or("").to_string());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        pair.backup.api("GET", "/status", None).unwrap()["state"],
        "standby"
    );
    // The primary gave up the silent session and protection resumed on a new one.
    wait_ft(
        &pair.primary,
        "re-protection",
        Duration::from_secs(20),
        |f| f["sessions"].as_u64() >= Some(2) && f["state"] == "protected",
    );
    wait_ft_state(&pair.backup, "protected", Duration::from_secs(10)).unwrap();
    let count = counts(&pair.primary.console_text()).len();
    pair.primary
        .wait_for(
            &format!("counter {}\n", count + 20),
            Duration::from_secs(10),
        )
        .unwrap();
    assert!(pair.primary.api("GET", "/status", None).is_ok());
}

#[test]
fn frozen_primary_fails_over_and_on_sigcont_stops_without_emitting_a_frame() {
    testbed::require_vms();
    let dir = Scratch::new("ft-frozen").unwrap();
    let tap_a = TapDevice::new().unwrap();
    let tap_b = TapDevice::new().unwrap();
    let job = format!("{} -- kv 7100", tap_a.guest_cmdline());
    let mut pair = start_pair(
        &dir,
        &job,
        Opts {
            primary_extra: s(&["--net", &format!("tap={}", tap_a.name)]),
            backup_extra: s(&["--net", &format!("tap={}", tap_b.name)]),
        },
    );
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    let mut c = KvClient::connect(
        format!("{}:7100", tap_a.guest_ip).parse().unwrap(),
        Duration::from_secs(20),
        Duration::from_secs(20),
    )
    .unwrap();
    for i in 0..10 {
        assert_eq!(c.ask(&format!("SET a{i} {i}")).unwrap(), "OK");
    }
    // SIGSTOP: both paths go silent while the sockets stay open, as when a host hangs.
    // SAFETY: kill(2) on a child process we own.
    unsafe { libc::kill(pair.primary.pid() as i32, libc::SIGSTOP) };
    let t0 = Instant::now();
    wait_ft_state(&pair.backup, "failed-over", Duration::from_secs(10)).unwrap();
    eprintln!("SIGSTOP -> failed-over: {:?}", t0.elapsed());
    // A request reaches the frozen primary's guest; its answer must never leave that node.
    let mut raw = c.into_stream();
    raw.write_all(b"SET late 1\n").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let frames_before = tap_frames_from_guest(&tap_a.name);
    // SAFETY: as above.
    unsafe { libc::kill(pair.primary.pid() as i32, libc::SIGCONT) };
    let status = pair.primary.wait_exit(Duration::from_secs(10)).unwrap();
    assert_eq!(
        status.code(),
        Some(3),
        "the old primary did not stop as fenced"
    );
    assert_eq!(
        tap_frames_from_guest(&tap_a.name),
        frames_before,
        "the old primary emitted frames after its peer went live"
    );
    assert_eq!(
        pair.backup.api("GET", "/status", None).unwrap()["state"],
        "running"
    );
}

#[test]
fn guest_power_off_under_ft_ends_both_copies_and_is_never_resumed() {
    testbed::require_vms();
    let dir = Scratch::new("ft-poweroff").unwrap();
    let mut pair = start_pair(&dir, "-- poweroff 8000", Opts::default());
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    pair.primary
        .wait_for("testguest: powering off", Duration::from_secs(20))
        .unwrap();
    let a = pair.primary.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(a.success(), "primary: {a}");
    let b = pair.backup.wait_exit(Duration::from_secs(10)).unwrap();
    assert!(b.success(), "backup: {b}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !pair.backup.console_text().contains("counter"),
        "the backup resumed a powered-off guest:\n{}",
        pair.backup.console_text()
    );
}

#[test]
fn guest_reboot_under_ft_is_protected_again_and_never_resumed_from_before() {
    testbed::require_vms();
    let dir = Scratch::new("ft-reboot").unwrap();
    let mut pair = start_pair(&dir, "-- reboot 6000", Opts::default());
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    pair.primary
        .wait_for("testguest: rebooting", Duration::from_secs(20))
        .unwrap();
    // The monitor boots the guest again and protects it with a new session.
    wait_ft(
        &pair.backup,
        "a second session",
        Duration::from_secs(20),
        |f| f["sessions"].as_u64() >= Some(2) && f["state"] == "protected",
    );
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(10)).unwrap();
    assert_eq!(
        pair.backup.api("GET", "/status", None).unwrap()["state"],
        "standby"
    );
    // The new standby is the rebooted guest: a failover now continues the second boot.
    assert!(pair.primary.console_text().contains("testguest: rebooting"));
    pair.primary.kill9();
    let last_a = *counts(
        pair.primary
            .console_text()
            .rsplit("testguest: rebooting")
            .next()
            .unwrap(),
    )
    .last()
    .unwrap_or(&0);
    wait_ft_state(&pair.backup, "failed-over", Duration::from_secs(5)).unwrap();
    // The resumed guest counts on from the rebooted guest's state (or, resumed at the very end
    // of that boot, reboots at once: the monitor then ends).
    let t0 = Instant::now();
    let b = loop {
        let b = pair.backup.console_text();
        if b.contains("counter") || b.contains("testguest: rebooting") {
            break b;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the backup's guest printed nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    match counts(&b).first() {
        Some(&first) => assert!(
            first <= last_a + 1,
            "resumed {first}, the primary's last boot reached {last_a}"
        ),
        None => assert!(last_a >= 590, "rebooted at once after resuming at {last_a}"),
    }
}

#[test]
fn disks_are_copied_and_writes_travel_with_checkpoints_to_the_backup_disk() {
    testbed::require_vms();
    let dir = Scratch::new("ft-disk").unwrap();
    let (disk_a, disk_b) = (dir.path("a.img"), dir.path("b.img"));
    // The volumes differ at the start: protection copies the primary's disk to the backup.
    let mut initial = vec![0u8; 2 << 20];
    initial[(1 << 20)..].fill(0x11);
    std::fs::write(&disk_a, &initial).unwrap();
    std::fs::write(&disk_b, vec![0xabu8; 2 << 20]).unwrap();
    let mut pair = start_pair(
        &dir,
        "-- blk-pattern 1024",
        Opts {
            primary_extra: s(&["--disk", &disk_a.display().to_string()]),
            backup_extra: s(&["--disk", &disk_b.display().to_string()]),
        },
    );
    pair.primary
        .wait_for("blk-pattern ok sectors=1024", Duration::from_secs(20))
        .unwrap();
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    // Let a checkpoint cover the last writes, then lose the primary.
    let epoch = pair.primary.api("GET", "/status", None).unwrap()["ft"]["epoch"]
        .as_u64()
        .unwrap();
    let t0 = Instant::now();
    while pair.backup.api("GET", "/status", None).unwrap()["ft"]["epoch"]
        .as_u64()
        .unwrap()
        < epoch + 2
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "checkpoints stalled"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    pair.primary.kill9();
    wait_ft_state(&pair.backup, "failed-over", Duration::from_secs(5)).unwrap();
    let a = std::fs::read(&disk_a).unwrap();
    let b = std::fs::read(&disk_b).unwrap();
    assert!(
        a[..1024 * 512].iter().any(|&x| x != 0),
        "the primary wrote nothing"
    );
    assert!(
        a == b,
        "the backup's disk differs from the primary's after the writes were checkpointed"
    );
}

#[test]
fn an_operator_pause_holds_while_checkpoints_continue() {
    testbed::require_vms();
    let dir = Scratch::new("ft-pause").unwrap();
    let mut pair = start_pair(&dir, "-- counter", Opts::default());
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    pair.primary
        .wait_for("counter 20\n", Duration::from_secs(20))
        .unwrap();
    pair.primary.api("POST", "/pause", None).unwrap();
    let before = pair.primary.api("GET", "/status", None).unwrap();
    let count = counts(&pair.primary.console_text()).len();
    std::thread::sleep(Duration::from_millis(500));
    let during = pair.primary.api("GET", "/status", None).unwrap();
    // Checkpoints pause and resume the VM too; they must not end the operator's pause.
    assert_eq!(during["state"], "paused", "{during}");
    assert!(
        during["ft"]["checkpoints"].as_u64() > before["ft"]["checkpoints"].as_u64(),
        "checkpoints stopped while paused: {during}"
    );
    assert_eq!(
        counts(&pair.primary.console_text()).len(),
        count,
        "the guest ran while paused"
    );
    pair.primary.api("POST", "/resume", None).unwrap();
    pair.primary
        .wait_for(
            &format!("counter {}\n", count + 10),
            Duration::from_secs(10),
        )
        .unwrap();
    assert_eq!(
        pair.primary.api("GET", "/status", None).unwrap()["ft"]["state"],
        "protected"
    );
}

#[test]
fn the_surviving_node_protects_the_guest_again_with_a_new_backup() {
    testbed::require_vms();
    let dir = Scratch::new("ft-reprotect").unwrap();
    let new_backup_port = free_port();
    let reprotect = format!("127.0.0.1:{new_backup_port}");
    let watch_c = free_udp_port();
    let mut pair = start_pair(
        &dir,
        "-- counter",
        Opts {
            primary_extra: vec![],
            backup_extra: s(&[
                "--reprotect-to",
                &reprotect,
                "--reprotect-watch",
                &format!("127.0.0.1:{watch_c}"),
            ]),
        },
    );
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    pair.primary
        .wait_for("counter 10\n", Duration::from_secs(20))
        .unwrap();
    pair.primary.kill9();
    // Node B runs the guest and waits for a backup to protect it again.
    let st = wait_ft_state(&pair.backup, "syncing", Duration::from_secs(10)).unwrap();
    assert_eq!(st["ft"]["role"], "primary", "{st}");

    let (ccon, csock) = (dir.path("c.console"), dir.path("c.sock"));
    let mut cargs = s(&[
        "vm",
        "backup",
        "--listen",
        &reprotect,
        "--ft-timeout-ms",
        TIMEOUT_MS,
        "--ft-watch",
        &format!("127.0.0.1:{}", pair.watch_b),
        "--ft-watch-bind",
        &format!("127.0.0.1:{watch_c}"),
    ]);
    cargs.extend(s(&[
        "--console",
        &format!("file:{}", ccon.display()),
        "--api-sock",
        &csock.display().to_string(),
    ]));
    let mut c = Monitor::spawn(&cargs, &ccon, Some(&csock)).unwrap();
    wait_path(&csock, Duration::from_secs(10)).unwrap();
    wait_ft_state(&pair.backup, "protected", Duration::from_secs(20)).unwrap();
    let b_text = pair
        .backup
        .wait_for("counter", Duration::from_secs(5))
        .unwrap();
    let b_seq = counts(&b_text);
    let target = b_seq.last().unwrap() + 30;
    pair.backup
        .wait_for(&format!("counter {target}\n"), Duration::from_secs(20))
        .unwrap();
    pair.backup.kill9();
    wait_ft_state(&c, "failed-over", Duration::from_secs(5)).unwrap();
    let last_b = *counts(&pair.backup.console_text()).last().unwrap();
    let c_text = c
        .wait_for(
            &format!("counter {}\n", last_b + 10),
            Duration::from_secs(10),
        )
        .unwrap();
    let c_seq = counts(&c_text);
    assert!(
        c_seq[0] > target - 30 && c_seq[0] <= last_b + 1,
        "node C resumed at {} (B printed up to {last_b})",
        c_seq[0]
    );
    assert!(c_seq.windows(2).all(|w| w[1] == w[0] + 1), "gap: {c_seq:?}");
}

/// A small tmpfs, unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(path: std::path::PathBuf, size: &str) -> SmallFs {
        std::fs::create_dir_all(&path).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&path)
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs on {}", path.display());
        SmallFs(path)
    }

    /// Fills the file system to the last byte.
    fn fill(&self) {
        let mut f = std::fs::File::create(self.0.join("filler")).unwrap();
        let block = vec![0x55u8; 4096];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_checkpoint_the_backup_cannot_apply_poisons_its_standby_and_is_never_resumed() {
    testbed::require_vms();
    let dir = Scratch::new("ft-poison").unwrap();
    let small = SmallFs::mount(dir.path("small"), "4m");
    let (disk_a, disk_b) = (dir.path("a.img"), small.0.join("b.img"));
    std::fs::write(&disk_a, vec![0u8; 2 << 20]).unwrap();
    std::fs::write(&disk_b, vec![0u8; 2 << 20]).unwrap();
    let mut pair = start_pair(
        &dir,
        "-- blk-pattern 2048 50",
        Opts {
            primary_extra: s(&["--disk", &disk_a.display().to_string()]),
            backup_extra: s(&["--disk", &disk_b.display().to_string()]),
        },
    );
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    pair.primary
        .wait_for("blk-pattern rewrite 5\n", Duration::from_secs(20))
        .unwrap();
    // The backup's volume loses its blocks and its file system is full: the next checkpoint's
    // disk writes fail half-way through applying it (pages already in place).
    let ok = std::process::Command::new("fallocate")
        .args(["--punch-hole", "--offset", "0", "--length", "2MiB"])
        .arg(&disk_b)
        .status()
        .unwrap()
        .success();
    assert!(ok, "fallocate --punch-hole failed");
    small.fill();
    // Under load the session may also have been replaced just before, and then it is the new
    // session's disk copy that fails (refused, nothing committed): either way no good standby.
    let rejected = ft(&pair.backup)["rejected_frames"].as_u64().unwrap_or(0);
    wait_ft(
        &pair.backup,
        "poisoned standby",
        Duration::from_secs(10),
        |f| {
            f["poisoned"].as_u64() >= Some(1)
                || (f["rejected_frames"].as_u64() > Some(rejected) && f["state"] != "protected")
        },
    );
    eprintln!("backup after the disk filled: {}", ft(&pair.backup));
    // The primary heard "I am no backup" (released) and runs on, degraded, by the arbiter's yes.
    wait_ft_state(&pair.primary, "degraded", Duration::from_secs(10)).unwrap();
    let st = pair.primary.api("GET", "/status", None).unwrap();
    assert_eq!(st["state"], "running", "{st}");
    // The poisoned standby is never resumed, not even when the primary is lost.
    pair.primary.kill9();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(2) {
        let b = ft(&pair.backup);
        assert_ne!(
            b["state"], "failed-over",
            "a poisoned standby went live: {b}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!pair.backup.console_text().contains("blk-pattern"));
}
