//! FT protection between two monitor processes on this host (A-link over loopback): the counter
//! continues on the backup after SIGKILL of the primary; a lost backup leaves the primary
//! running, degraded, with its output flowing. Needs root and /dev/kvm.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testbed::args as s;
use testbed::counter_values as counts;
use testbed::ft::{wait_ft_state, wait_path};
use testbed::kv::KvClient;
use testbed::{Monitor, Scratch, TapDevice};

const SECRET: &str = "ftvm-test-secret-0123456789";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Pair {
    primary: Monitor,
    backup: Monitor,
}

/// A-link silence that declares the peer lost. Generous: CI machines are busy, and a false
/// failover would make two copies of the guest run.
const TIMEOUT_MS: &str = "2000";

fn start_pair(dir: &Scratch, job: &str, primary_net: &[String], backup_net: &[String]) -> Pair {
    let port = free_port();
    start_pair_via(dir, job, primary_net, backup_net, port, port)
}

/// Starts a backup listening on `backup_port` and a primary sending to `primary_port` (a proxy
/// may sit between them).
fn start_pair_via(
    dir: &Scratch,
    job: &str,
    primary_net: &[String],
    backup_net: &[String],
    backup_port: u16,
    primary_port: u16,
) -> Pair {
    std::env::set_var("FTVM_FT_SECRET", SECRET);
    let listen = format!("127.0.0.1:{backup_port}");
    let peer = format!("127.0.0.1:{primary_port}");
    let (bcon, bsock) = (dir.path("b.console"), dir.path("b.sock"));
    let mut bargs = s(&[
        "vm",
        "backup",
        "--listen",
        &listen,
        "--ft-timeout-ms",
        TIMEOUT_MS,
        "--console",
        &format!("file:{}", bcon.display()),
    ]);
    bargs.extend(s(&["--api-sock", &bsock.display().to_string()]));
    bargs.extend_from_slice(backup_net);
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
        &peer,
        "--ft-timeout-ms",
        TIMEOUT_MS,
    ]);
    aargs.extend(s(&[
        "--console",
        &format!("file:{}", acon.display()),
        "--api-sock",
        &asock.display().to_string(),
    ]));
    aargs.extend_from_slice(primary_net);
    let primary = Monitor::spawn(&aargs, &acon, Some(&asock)).unwrap();
    wait_path(&asock, Duration::from_secs(10)).unwrap();
    Pair { primary, backup }
}

#[test]
fn counter_continues_on_the_backup_after_sigkill_of_the_primary() {
    testbed::require_vms();
    let dir = Scratch::new("ft-counter").unwrap();
    let mut pair = start_pair(&dir, "-- counter", &[], &[]);
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    pair.primary
        .wait_for("counter 50\n", Duration::from_secs(20))
        .unwrap();
    // Let protection run for a while: many checkpoints committed.
    let t0 = Instant::now();
    loop {
        let st = pair.primary.api("GET", "/status", None).unwrap();
        if st["ft"]["checkpoints"].as_u64().unwrap() > 50 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "checkpoints too slow: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    pair.primary.kill9();
    let last_primary = *counts(&pair.primary.console_text()).last().unwrap();

    wait_ft_state(&pair.backup, "failed-over", Duration::from_secs(5)).unwrap();
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
        &s(&["--net", &format!("tap={}", tap_a.name)]),
        &s(&["--net", &format!("tap={}", tap_b.name)]),
    );
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    let mut c = KvClient::connect(
        format!("{}:7100", tap_a.guest_ip).parse().unwrap(),
        Duration::from_secs(5),
        Duration::from_secs(20),
    )
    .unwrap();
    for i in 0..20 {
        assert_eq!(c.ask(&format!("SET a{i} {i}")).unwrap(), "OK");
    }
    pair.backup.kill9();
    let st = wait_ft_state(&pair.primary, "degraded", Duration::from_secs(5)).unwrap();
    assert_eq!(st["state"], "running");
    // Output keeps flowing, on the same connection.
    for i in 0..20 {
        assert_eq!(c.ask(&format!("GET a{i}")).unwrap(), format!("VALUE {i}"));
        assert_eq!(c.ask(&format!("SET b{i} {i}")).unwrap(), "OK");
    }
}

/// How the proxy damages the primary → backup stream once armed.
#[derive(Clone, Copy)]
enum Damage {
    /// Flip one byte `n` bytes after arming.
    Corrupt(u64),
    /// Close both directions `n` bytes after arming.
    Truncate(u64),
}

/// A TCP proxy on loopback between primary and backup that damages the stream on demand.
struct Proxy {
    port: u16,
    arm: std::sync::Arc<std::sync::Mutex<Option<Damage>>>,
}

impl Proxy {
    fn start(target: u16) -> Proxy {
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let arm: Arc<Mutex<Option<Damage>>> = Arc::default();
        let armed = arm.clone();
        std::thread::spawn(move || {
            let Ok((inbound, _)) = listener.accept() else {
                return;
            };
            let outbound = TcpStream::connect(("127.0.0.1", target)).unwrap();
            let (mut in_r, mut out_w) =
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            let (mut out_r, mut in_w) = (outbound, inbound);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut out_r, &mut in_w);
            });
            let mut buf = vec![0u8; 65536];
            let mut countdown: Option<(Damage, u64)> = None;
            loop {
                let n = match std::io::Read::read(&mut in_r, &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if countdown.is_none() {
                    if let Some(d) = armed.lock().unwrap().take() {
                        countdown = Some((
                            d,
                            match d {
                                Damage::Corrupt(n) | Damage::Truncate(n) => n,
                            },
                        ));
                    }
                }
                let mut chunk = &mut buf[..n];
                if let Some((damage, left)) = countdown.as_mut() {
                    if (*left as usize) < chunk.len() {
                        match *damage {
                            Damage::Corrupt(_) => chunk[*left as usize] ^= 0x5a,
                            Damage::Truncate(_) => {
                                chunk = &mut chunk[..*left as usize];
                                let _ = out_w.write_all(chunk);
                                let _ = out_w.shutdown(std::net::Shutdown::Both);
                                let _ = in_r.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                        }
                        *left = u64::MAX;
                    } else if *left != u64::MAX {
                        *left -= chunk.len() as u64;
                    }
                }
                if out_w.write_all(chunk).is_err() {
                    return;
                }
            }
        });
        Proxy { port, arm }
    }

    fn damage(&self, d: Damage) {
        *self.arm.lock().unwrap() = Some(d);
    }
}

fn damaged_stream_is_refused_and_the_backup_resumes_its_last_good_state(damage: Damage, tag: &str) {
    testbed::require_vms();
    let dir = Scratch::new(tag).unwrap();
    let backup_port = free_port();
    let proxy = Proxy::start(backup_port);
    let mut pair = start_pair_via(&dir, "-- dirty 2000 4", &[], &[], backup_port, proxy.port);
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = pair.backup.api("GET", "/status", None).unwrap()["ft"]["epoch"]
        .as_u64()
        .unwrap();
    assert!(before > 0);
    proxy.damage(damage);
    let st = wait_ft_state(&pair.backup, "failed-over", Duration::from_secs(5)).unwrap();
    let epoch = st["ft"]["epoch"].as_u64().unwrap();
    assert!(
        epoch >= before,
        "the backup went back from epoch {before} to {epoch}"
    );
    if let Damage::Corrupt(_) = damage {
        assert_eq!(st["ft"]["rejected_frames"], 1, "{st}");
    }
    // The resumed guest is consistent: it keeps running its job from the committed state.
    pair.backup
        .wait_for("dirty: total=", Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        pair.backup.api("GET", "/status", None).unwrap()["state"],
        "running"
    );
    let primary = wait_ft_state(&pair.primary, "degraded", Duration::from_secs(5)).unwrap();
    assert_eq!(primary["state"], "running");
}

#[test]
fn corrupted_frame_is_refused_and_never_applied() {
    damaged_stream_is_refused_and_the_backup_resumes_its_last_good_state(
        Damage::Corrupt(5000),
        "ft-corrupt",
    );
}

#[test]
fn truncated_frame_is_refused_and_never_applied() {
    damaged_stream_is_refused_and_the_backup_resumes_its_last_good_state(
        Damage::Truncate(3000),
        "ft-trunc",
    );
}

#[test]
fn silent_primary_is_declared_lost_after_the_timeout() {
    testbed::require_vms();
    let dir = Scratch::new("ft-frozen").unwrap();
    let mut pair = start_pair(&dir, "-- counter", &[], &[]);
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    // SIGSTOP: the A-link stays open but nothing arrives any more, as when a host hangs.
    // SAFETY: kill(2) on a child process we own.
    unsafe { libc::kill(pair.primary.pid() as i32, libc::SIGSTOP) };
    let t0 = Instant::now();
    wait_ft_state(&pair.backup, "failed-over", Duration::from_secs(10)).unwrap();
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_millis(1500),
        "failed over after {waited:?}, before the 2 s timeout"
    );
    let last = *counts(&pair.primary.console_text()).last().unwrap();
    let text = pair
        .backup
        .wait_for(&format!("counter {}\n", last + 10), Duration::from_secs(10))
        .unwrap();
    assert!(counts(&text)[0] <= last + 1);
    // SAFETY: as above.
    unsafe { libc::kill(pair.primary.pid() as i32, libc::SIGCONT) };
    pair.primary.kill9();
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
        &s(&["--disk", &disk_a.display().to_string()]),
        &s(&["--disk", &disk_b.display().to_string()]),
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
    let mut pair = start_pair(&dir, "-- counter", &[], &[]);
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
    let mut pair = start_pair(&dir, "-- counter", &[], &s(&["--reprotect-to", &reprotect]));
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
