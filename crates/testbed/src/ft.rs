//! FT scenarios on the two-node bed, shared by the tests, `ftvm bench ft` and `ftvm demo`:
//! a primary on node A and a backup on node B, a kv client in the client namespace, failover by
//! SIGKILL of everything on node A.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::kv::KvClient;
use crate::netns::TwoNodeBed;
use crate::Monitor;

/// A-link port the backup listens on.
pub const ALINK_PORT: u16 = 7400;
/// Port of the guest's kv (or echo) service.
pub const KV_PORT: u16 = 7000;
/// UDP port of the FT watch path on both nodes' management addresses.
pub const WATCH_PORT: u16 = 7401;

/// How an FT pair is started.
#[derive(Debug, Clone)]
pub struct FtSetup {
    /// The test guest's job, e.g. `kv 7000`.
    pub job: String,
    /// Guest memory, MiB.
    pub mem_mib: u64,
    /// A-link silence that declares the peer lost, ms.
    pub timeout_ms: u64,
    /// Run without FT (primary only, no backup) for baselines.
    pub unprotected: bool,
    /// More options for the primary's `ftvm vm run`.
    pub primary_args: Vec<String>,
    /// The backup's `--reprotect-to`: after a failover it protects the guest again with a
    /// backup there.
    pub reprotect_to: Option<SocketAddr>,
    /// The primary's `--disk` options.
    pub primary_disks: Vec<String>,
    /// The backup's `--disk` options (its copies of the primary's disks).
    pub backup_disks: Vec<String>,
    /// Run the watch path (the two-node arbiter) between the nodes' management addresses.
    pub watch: bool,
    /// The primary connects here instead of the backup's A-link address (e.g. an
    /// [`crate::proxy::AlinkProxy`] in node B).
    pub alink_via: Option<SocketAddr>,
}

impl FtSetup {
    /// An FT guest running `job`, with the default 100 ms dead time and the watch path: a
    /// slow A-link alone never makes a second live copy.
    pub fn new(job: &str) -> Self {
        Self {
            job: job.to_string(),
            mem_mib: 128,
            timeout_ms: 100,
            unprotected: false,
            primary_args: Vec::new(),
            reprotect_to: None,
            primary_disks: Vec::new(),
            backup_disks: Vec::new(),
            watch: true,
            alink_via: None,
        }
    }
}

/// The monitors of one FT guest.
pub struct FtPair {
    /// The primary (node A).
    pub primary: Monitor,
    /// The backup (node B), absent when unprotected.
    pub backup: Option<Monitor>,
    /// Where consoles and sockets live.
    pub dir: PathBuf,
}

/// The secret all scenario monitors share.
pub const SECRET: &str = "ftvm-testbed-cluster-secret";

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// Starts backup (unless unprotected) and primary for `setup` in `bed`; files go to `dir`.
pub fn start_pair(bed: &TwoNodeBed, dir: &Path, setup: &FtSetup) -> anyhow::Result<FtPair> {
    std::env::set_var("FTVM_FT_SECRET", SECRET);
    let timeout = setup.timeout_ms.to_string();
    let backup = if setup.unprotected {
        None
    } else {
        let (con, sock) = (dir.join("b.console"), dir.join("b.sock"));
        let _ = std::fs::remove_file(&con);
        let listen = format!("{}:{ALINK_PORT}", bed.alink_ip_b());
        let mut args = s(&[
            "vm",
            "backup",
            "--listen",
            &listen,
            "--net",
            &format!("tap={}", bed.tap_name()),
        ]);
        args.extend(s(&[
            "--console",
            &format!("file:{}", con.display()),
            "--api-sock",
            &sock.display().to_string(),
        ]));
        args.extend(s(&["--ft-timeout-ms", &timeout]));
        if let Some(r) = setup.reprotect_to {
            args.extend(s(&["--reprotect-to", &r.to_string()]));
        }
        for d in &setup.backup_disks {
            args.extend(s(&["--disk", d]));
        }
        if setup.watch {
            args.extend(watch_args(bed.mgmt_ip_a(), bed.mgmt_ip_b()));
        }
        let mut m = bed.spawn_monitor_in(bed.node_b(), &args, &con, Some(&sock))?;
        wait_sock(&mut m, &sock)?;
        Some(m)
    };
    let (con, sock) = (dir.join("a.console"), dir.join("a.sock"));
    let _ = std::fs::remove_file(&con);
    let cmdline = format!("{} -- {}", bed.guest_cmdline(), setup.job);
    let mut args = s(&[
        "vm",
        "run",
        "--image",
        "testguest",
        "--mem",
        &setup.mem_mib.to_string(),
    ]);
    args.extend(s(&["--cmdline", &cmdline, "--net", &bed.net_arg()]));
    args.extend(s(&[
        "--console",
        &format!("file:{}", con.display()),
        "--api-sock",
        &sock.display().to_string(),
    ]));
    for d in &setup.primary_disks {
        args.extend(s(&["--disk", d]));
    }
    if !setup.unprotected {
        let peer = setup
            .alink_via
            .map(|a| a.to_string())
            .unwrap_or_else(|| format!("{}:{ALINK_PORT}", bed.alink_ip_b()));
        args.extend(s(&["--ft-peer", &peer, "--ft-timeout-ms", &timeout]));
        if setup.watch {
            args.extend(watch_args(bed.mgmt_ip_b(), bed.mgmt_ip_a()));
        }
    }
    args.extend(setup.primary_args.iter().cloned());
    let mut primary = bed.spawn_monitor_in(bed.node_a(), &args, &con, Some(&sock))?;
    wait_sock(&mut primary, &sock)?;
    Ok(FtPair {
        primary,
        backup,
        dir: dir.to_path_buf(),
    })
}

/// `--ft-watch PEER --ft-watch-bind OWN` on the watch port.
fn watch_args(peer_ip: &str, own_ip: &str) -> Vec<String> {
    s(&[
        "--ft-watch",
        &format!("{peer_ip}:{WATCH_PORT}"),
        "--ft-watch-bind",
        &format!("{own_ip}:{WATCH_PORT}"),
    ])
}

/// Waits for a monitor's API socket; fails at once, with its stderr, if the monitor exits.
fn wait_sock(m: &mut Monitor, sock: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !sock.exists() {
        if let Ok(status) = m.wait_exit(Duration::ZERO) {
            bail!(
                "the monitor exited ({status}) before {} appeared: {}",
                sock.display(),
                m.stderr_text()
            );
        }
        if t0.elapsed() > Duration::from_secs(20) {
            bail!("{} did not appear within 20 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits for a file to exist.
pub fn wait_path(p: &Path, timeout: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    while !p.exists() {
        if t0.elapsed() > timeout {
            bail!("{} did not appear within {timeout:?}", p.display());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Waits until the monitor's FT state is `state`; returns its status.
pub fn wait_ft_state(
    m: &Monitor,
    state: &str,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let t0 = Instant::now();
    loop {
        let v = m.api("GET", "/status", None);
        if let Ok(v) = &v {
            if v["ft"]["state"] == state {
                return Ok(v.clone());
            }
        }
        if t0.elapsed() > timeout {
            bail!("FT state {state:?} not reached within {timeout:?}; last status: {v:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The guest's kv address.
pub fn kv_addr(bed: &TwoNodeBed) -> SocketAddr {
    SocketAddr::from((
        bed.guest_ip()
            .parse::<std::net::Ipv4Addr>()
            .unwrap_or(std::net::Ipv4Addr::LOCALHOST),
        KV_PORT,
    ))
}

/// Connects a kv client from the client namespace.
pub fn kv_client(bed: &TwoNodeBed, timeout: Duration) -> anyhow::Result<KvClient> {
    let addr = kv_addr(bed);
    bed.in_ns(bed.client(), move || {
        KvClient::connect(addr, timeout, Duration::from_secs(20))
    })?
}

/// What one kv failover round showed.
#[derive(Debug, Clone)]
pub struct KvFailover {
    /// Writes acknowledged with OK (before and after the failover).
    pub acked: usize,
    /// Acknowledged keys that node B does not have (must be empty).
    pub lost: Vec<String>,
    /// SIGKILL of node A → first reply from node B, ms.
    pub failover_ms: f64,
    /// Whether the client kept its TCP connection through the failover.
    pub same_connection: bool,
}

/// Runs a kv writer against the FT guest of `pair`, SIGKILLs node A after `kill_after`, keeps
/// writing until node B has answered `after_writes` more writes, then checks every acknowledged
/// key on node B.
pub fn kv_failover_round(
    bed: &TwoNodeBed,
    pair: &mut FtPair,
    kill_after: Duration,
    after_writes: usize,
) -> anyhow::Result<KvFailover> {
    wait_ft_state(&pair.primary, "protected", Duration::from_secs(30))?;
    let mut client = kv_client(bed, Duration::from_secs(10))?;
    let acked: Arc<Mutex<Vec<usize>>> = Arc::default();
    let killed_at: Arc<Mutex<Option<Instant>>> = Arc::default();
    let first_after: Arc<Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (acked, killed_at, first_after, stop) = (
            acked.clone(),
            killed_at.clone(),
            first_after.clone(),
            stop.clone(),
        );
        std::thread::spawn(move || -> anyhow::Result<KvClient> {
            let mut i = 0usize;
            let mut after = 0usize;
            while !stop.load(Ordering::Acquire) || after < after_writes {
                let ok = client
                    .set(&format!("k{i}"), &format!("v{i}"))
                    .with_context(|| format!("SET k{i}"))?;
                if !ok {
                    bail!("SET k{i} was not acknowledged");
                }
                let now = Instant::now();
                acked
                    .lock()
                    .map_err(|_| anyhow::anyhow!("poisoned"))?
                    .push(i);
                if let Some(k) = *killed_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))? {
                    if now > k {
                        after += 1;
                        first_after
                            .lock()
                            .map_err(|_| anyhow::anyhow!("poisoned"))?
                            .get_or_insert(now);
                    }
                }
                i += 1;
            }
            Ok(client)
        })
    };
    // The kill lands `kill_after` into the write stream: counted from the first acknowledged
    // write (connecting through a loaded machine may take a while).
    let t0 = Instant::now();
    while acked
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .is_empty()
    {
        if t0.elapsed() > Duration::from_secs(20) || writer.is_finished() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(kill_after);
    let t_kill = Instant::now();
    bed.kill_node(bed.node_a())?;
    pair.primary.kill9();
    *killed_at.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = Some(Instant::now());
    stop.store(true, Ordering::Release);
    let client = writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let backup = pair.backup.as_ref().context("no backup")?;
    wait_ft_state(backup, "failed-over", Duration::from_secs(10))?;
    let failover_ms = first_after
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .map(|t| (t - t_kill).as_secs_f64() * 1e3)
        .unwrap_or(f64::NAN);
    let (mut client, same_connection) = match client {
        Ok(c) => (c, true),
        Err(e) => {
            tracing_free_log(&format!("writer ended: {e:#}; reconnecting to verify"));
            (kv_client(bed, Duration::from_secs(10))?, false)
        }
    };
    let keys = acked
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .clone();
    let mut lost = Vec::new();
    for &i in &keys {
        if client.get(&format!("k{i}"))?.as_deref() != Some(&format!("v{i}")) {
            lost.push(format!("k{i}"));
        }
    }
    Ok(KvFailover {
        acked: keys.len(),
        lost,
        failover_ms,
        same_connection,
    })
}

fn tracing_free_log(msg: &str) {
    eprintln!("testbed: {msg}");
}
