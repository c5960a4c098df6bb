//! Running one scenario of the fault matrix, and the false-failover run under a host hog.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::writer::{self, Acked, KvWriter};
use super::{describe_runs, runs_guest, status_of, wait_state, Outcome, Scenario};
use crate::capture::{ArpProber, LanCapture};
use crate::ft::{self, FtPair, FtSetup, ALINK_PORT};
use crate::netns::{self, Link, TwoNodeBed};
use crate::proxy::{AlinkProxy, Fault};
use crate::timeline::{self, Port};
use crate::Monitor;

/// The product's default A-link timeout, ms: every scenario runs at it.
pub const DEFAULT_TIMEOUT_MS: u64 = 100;
/// How often the prober asks for the guest's address.
const PROBE_INTERVAL: Duration = Duration::from_millis(20);
/// The port the A-link proxy listens on in node B (it forwards to the backup's port).
const PROXY_PORT: u16 = 7401;
/// How long the live copy may take to be protected again after the repair.
const REPROTECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Delay of the power-off and reboot jobs: the pair is protected long before.
const POWER_JOB_DELAY_MS: u64 = 6000;

fn alink_addr(ip: &str) -> anyhow::Result<SocketAddr> {
    format!("{ip}:{ALINK_PORT}")
        .parse()
        .with_context(|| format!("invalid A-link address {ip}"))
}

fn ns_of(bed: &TwoNodeBed, port: Port) -> &str {
    match port {
        Port::A => bed.node_a(),
        Port::B => bed.node_b(),
    }
}

/// Starts a fresh `ftvm vm backup` in the namespace of `node`, listening on that node's A-link
/// address (the replaced node of the repair).
fn spawn_backup(
    bed: &TwoNodeBed,
    dir: &Path,
    node: Port,
    disks: &[String],
) -> anyhow::Result<Monitor> {
    let ip = match node {
        Port::A => bed.alink_ip_a(),
        Port::B => bed.alink_ip_b(),
    };
    let tag = format!("{node:?}").to_lowercase();
    let (con, sock) = (
        dir.join(format!("{tag}2.console")),
        dir.join(format!("{tag}2.sock")),
    );
    let _ = std::fs::remove_file(&sock);
    let mut args = crate::args(&[
        "vm",
        "backup",
        "--listen",
        &alink_addr(ip)?.to_string(),
        "--net",
        &format!("tap={}", bed.tap_name()),
        "--console",
        &format!("file:{}", con.display()),
        "--api-sock",
        &sock.display().to_string(),
        "--ft-timeout-ms",
        &DEFAULT_TIMEOUT_MS.to_string(),
    ]);
    for d in disks {
        args.extend(crate::args(&["--disk", d]));
    }
    let m = bed.spawn_monitor_in(ns_of(bed, node), &args, &con, Some(&sock))?;
    ft::wait_path(&sock, Duration::from_secs(10))?;
    Ok(m)
}

/// Polls both nodes' API sockets every 100 ms and counts the samples in which both run the
/// guest. Stops on drop.
struct CopySampler {
    stop: Arc<AtomicBool>,
    both: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CopySampler {
    fn start(socks: [PathBuf; 2]) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let both = Arc::new(AtomicUsize::new(0));
        let (st, b) = (stop.clone(), both.clone());
        let thread = std::thread::Builder::new()
            .name("copy-sampler".into())
            .spawn(move || {
                while !st.load(Ordering::SeqCst) {
                    let running = socks
                        .iter()
                        .filter(|s| status_of(s).is_some_and(|v| runs_guest(&v)))
                        .count();
                    if running == 2 {
                        b.fetch_add(1, Ordering::SeqCst);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
            .context("cannot start the copy sampler")?;
        Ok(Self {
            stop,
            both,
            thread: Some(thread),
        })
    }

    /// Stops sampling; returns the samples with both copies running.
    fn finish(&mut self) -> usize {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.both.load(Ordering::SeqCst)
    }
}

impl Drop for CopySampler {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A scenario in progress: the pair, its instruments and what was seen.
struct Run<'a> {
    bed: &'a TwoNodeBed,
    dir: PathBuf,
    scenario: Scenario,
    cap: LanCapture,
    _prober: ArpProber,
    sampler: CopySampler,
    pair: FtPair,
    proxy: Option<AlinkProxy>,
    writer: Option<KvWriter>,
    /// The backup's disks, and the tmpfs they live on (disk-error scenario).
    backup_disks: Vec<String>,
    tmpfs: Option<PathBuf>,
    /// The monitor started by the repair.
    replacement: Option<Monitor>,
    /// Pairs that never reached protection before this one did.
    start_failures: usize,
    notes: Vec<String>,
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        for ns in [self.bed.node_a(), self.bed.node_b()] {
            let _ = self.bed.kill_node(ns);
        }
        if let Some(t) = &self.tmpfs {
            super::unmount(t);
        }
    }
}

/// Runs `scenario` once on `bed` (which must have no monitor running), files in `dir`.
pub fn run(bed: &TwoNodeBed, dir: &Path, scenario: Scenario) -> anyhow::Result<Outcome> {
    std::fs::create_dir_all(dir)?;
    let mut r = Run::start(bed, dir, scenario)
        .with_context(|| format!("{}: cannot start the FT pair", scenario.name()))?;
    r.measure()
        .with_context(|| format!("scenario {}", scenario.name()))
}

impl<'a> Run<'a> {
    fn start(bed: &'a TwoNodeBed, dir: &Path, scenario: Scenario) -> anyhow::Result<Self> {
        let mut setup = FtSetup::new(&format!("kv {}", ft::KV_PORT));
        setup.timeout_ms = DEFAULT_TIMEOUT_MS;
        setup.reprotect_to = Some(alink_addr(bed.alink_ip_a())?);
        let mut proxy = None;
        let mut tmpfs = None;
        match scenario {
            Scenario::AlinkDelay150ms
            | Scenario::AlinkDelay2s
            | Scenario::CorruptFrame
            | Scenario::DropFrame => {
                let p = AlinkProxy::start(bed, PROXY_PORT, ALINK_PORT, Fault::None)?;
                setup.alink_via = Some(p.addr());
                proxy = Some(p);
            }
            Scenario::GuestPowerOff => setup.job = format!("poweroff {POWER_JOB_DELAY_MS}"),
            Scenario::GuestReboot => setup.job = format!("reboot {POWER_JOB_DELAY_MS}"),
            Scenario::BackupDiskError => {
                let (a, b, t) = disk_error_disks(dir)?;
                setup.primary_disks = vec![a];
                setup.backup_disks = vec![b];
                tmpfs = Some(t);
            }
            _ => {}
        }
        let mac = netns::parse_mac(bed.guest_mac())?;
        let cap = LanCapture::start(bed, mac)?;
        let prober = ArpProber::start(bed, PROBE_INTERVAL)?;
        let mut notes = Vec::new();
        let protect = scenario != Scenario::BackupDiskError;
        let (pair, start_failures) = start_protected(bed, dir, &setup, protect, &mut notes)?;
        let sampler = CopySampler::start([dir.join("a.sock"), dir.join("b.sock")])?;
        Ok(Self {
            bed,
            dir: dir.to_path_buf(),
            scenario,
            cap,
            _prober: prober,
            sampler,
            pair,
            proxy,
            writer: None,
            backup_disks: setup.backup_disks.clone(),
            tmpfs,
            replacement: None,
            start_failures,
            notes,
        })
    }

    fn sock(&self, node: Port) -> PathBuf {
        self.dir.join(match node {
            Port::A => "a.sock",
            Port::B => "b.sock",
        })
    }

    fn proxy(&self) -> anyhow::Result<&AlinkProxy> {
        self.proxy
            .as_ref()
            .context("this scenario has no A-link proxy")
    }

    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }

    fn ft_state(&self, node: Port) -> String {
        status_of(&self.sock(node))
            .map(|v| v["ft"]["state"].as_str().unwrap_or("?").to_string())
            .unwrap_or_else(|| "no answer".into())
    }

    fn measure(&mut self) -> anyhow::Result<Outcome> {
        let bed = self.bed;
        if self.scenario.has_writer() {
            self.writer = Some(KvWriter::start(bed)?);
            std::thread::sleep(Duration::from_secs(1));
        }
        let t_fault = Instant::now();
        let mut t_off = None;
        let s = |ms: u64| std::thread::sleep(Duration::from_millis(ms));
        match self.scenario {
            Scenario::KillPrimary => {
                bed.kill_node(bed.node_a())?;
                self.pair.primary.kill9();
                self.wait_b_frame(t_fault);
                s(2000);
            }
            Scenario::SilentLinksDown => {
                bed.link_down(Link::ALink)?;
                bed.link_down(Link::LanA)?;
                s(5000);
                bed.link_up(Link::ALink)?;
                bed.link_up(Link::LanA)?;
                s(3000);
            }
            Scenario::SilentFrozen => {
                bed.freeze_node(bed.node_a())?;
                s(5000);
                // The node never comes back: SIGKILL ends stopped processes too.
                bed.kill_node(bed.node_a())?;
                self.pair.primary.kill9();
                s(2000);
            }
            Scenario::AlinkCut => {
                bed.link_down(Link::ALink)?;
                s(5000);
                bed.link_up(Link::ALink)?;
                s(3000);
            }
            Scenario::AlinkDelay150ms | Scenario::AlinkDelay2s => {
                let (d, hold) = if self.scenario == Scenario::AlinkDelay2s {
                    (2000, 8000)
                } else {
                    (150, 5000)
                };
                self.proxy()?.set_delay(Duration::from_millis(d));
                s(hold);
                self.proxy()?.set_delay(Duration::ZERO);
                s(d + 3000);
            }
            Scenario::CorruptFrame | Scenario::DropFrame => {
                let p = self.proxy()?;
                if self.scenario == Scenario::CorruptFrame {
                    p.corrupt_next_after(100);
                } else {
                    p.drop_next_frame();
                }
                let t0 = Instant::now();
                while p.fault_pending() && t0.elapsed() < Duration::from_secs(5) {
                    s(5);
                }
                if p.fault_pending() {
                    bail!("the proxy did not apply the fault within 5 s (no A-link traffic?)");
                }
                s(5000);
            }
            Scenario::BackupDiskError => {
                self.writer = Some(KvWriter::start(bed)?);
                let exited = self
                    .pair
                    .backup
                    .as_mut()
                    .context("no backup")?
                    .wait_exit(Duration::from_secs(30));
                let err = self
                    .pair
                    .backup
                    .as_mut()
                    .map(|b| b.stderr_text())
                    .unwrap_or_default();
                self.note(format!(
                    "backup: {exited:?}; stderr: {}",
                    err.lines().last().unwrap_or("")
                ));
                s(3000);
            }
            Scenario::KillBackup => {
                bed.kill_node(bed.node_b())?;
                if let Some(b) = self.pair.backup.as_mut() {
                    b.kill9();
                }
                s(3000);
            }
            Scenario::GuestPowerOff => {
                // The power-off lies between the last moment the primary was seen running and
                // its exit: count from that last moment (polled every 2 ms).
                let mut off = Instant::now();
                let st = loop {
                    if let Ok(st) = self.pair.primary.wait_exit(Duration::ZERO) {
                        break st;
                    }
                    if off.elapsed() > Duration::from_secs(30) {
                        bail!("the guest did not power off within 30 s");
                    }
                    off = Instant::now();
                    s(2);
                };
                if !self.pair.primary.console_text().contains("powering off") {
                    bail!(
                        "the primary exited ({st}) without the guest powering off: {}",
                        self.pair.primary.stderr_text()
                    );
                }
                self.note(format!("primary exited: {st}"));
                t_off = Some(off);
                s(3000);
            }
            Scenario::GuestReboot => {
                self.pair
                    .primary
                    .wait_for("testguest: rebooting", Duration::from_secs(30))?;
                s(POWER_JOB_DELAY_MS + 2000);
            }
            Scenario::PrimaryFrozen5s => {
                let pids = bed.freeze_node(bed.node_a())?;
                s(5000);
                bed.thaw_all(&pids);
                s(4000);
            }
        }
        self.finish(t_fault, t_off)
    }

    /// Waits (up to 10 s) for node B's port to carry a guest frame after `t`.
    fn wait_b_frame(&self, t: Instant) {
        let _ = self
            .cap
            .wait_frame(Port::B, self.cap.at(t), Duration::from_secs(10));
    }

    /// Nodes whose monitor runs the guest (by their API; a stopped or dead one does not answer).
    fn running_copies(&self) -> Vec<Port> {
        [Port::A, Port::B]
            .into_iter()
            .filter(|&n| status_of(&self.sock(n)).is_some_and(|v| runs_guest(&v)))
            .collect()
    }

    fn finish(&mut self, t_fault: Instant, t_off: Option<Instant>) -> anyhow::Result<Outcome> {
        let states = format!(
            "ft states at the end: A {}, B {}",
            self.ft_state(Port::A),
            self.ft_state(Port::B)
        );
        self.note(states);
        let both_running_samples = self.sampler.finish();
        let running = self.running_copies();
        let acked: Vec<Acked> = self.writer.take().map(KvWriter::stop).unwrap_or_default();
        let frames = self.cap.frames();
        self.note(format!("LAN runs: {}", describe_runs(&frames)));
        let two = timeline::two_live_copies(&frames);

        // Failover: fault → first OK after node B's port carried the guest.
        let fault_at = self.cap.at(t_fault);
        let b_at = frames
            .iter()
            .find(|f| f.port == Port::B && f.t >= fault_at)
            .map(|f| self.cap.start_time() + f.t);
        let failover_ms = b_at.and_then(|b| {
            acked
                .iter()
                .find(|a| a.at >= b)
                .map(|a| (a.at - t_fault).as_secs_f64() * 1e3)
        });

        let lost = if acked.is_empty() {
            0
        } else {
            writer::verify(self.bed, &acked)?.len()
        };

        let mut resurrections = 0;
        if let Some(off) = t_off {
            let mut nodes = timeline::resurrected_ports(&frames, self.cap.at(off));
            nodes.extend(running.iter().copied());
            nodes.sort();
            nodes.dedup();
            resurrections = nodes.len();
        }

        // The live copy: the one running by its API; with two, the one the LAN heard last.
        let live = match running.as_slice() {
            [one] => Some(*one),
            [] => None,
            _ => timeline::live_port(&frames).or(Some(Port::A)),
        };
        let protected_at_end = if self.scenario == Scenario::GuestPowerOff {
            None
        } else {
            Some(match live {
                Some(node) => self.repair_and_check(node),
                None => {
                    self.note("no copy of the guest runs at the end");
                    false
                }
            })
        };
        Ok(Outcome {
            scenario: self.scenario,
            acked_writes: acked.len(),
            acked_writes_lost: lost,
            two_live_copies: two,
            copies_running_at_end: running.len(),
            both_running_samples,
            resurrections,
            start_failures: self.start_failures,
            failover_ms,
            protected_at_end,
            live_node: live.or_else(|| timeline::live_port(&frames)),
            runs: timeline::runs_json(&frames),
            periods: timeline::periods_json(&frames),
            notes: std::mem::take(&mut self.notes),
        })
    }

    /// Replaces the node not running the guest (SIGKILL, fresh backup there) and waits for the
    /// live copy on `live` to report `protected`.
    fn repair_and_check(&mut self, live: Port) -> bool {
        let other = live.other();
        if let Err(e) = self.bed.kill_node(ns_of(self.bed, other)) {
            self.note(format!("repair: cannot clear node {other:?}: {e:#}"));
            return false;
        }
        match other {
            Port::A => self.pair.primary.kill9(),
            Port::B => {
                if let Some(b) = self.pair.backup.as_mut() {
                    b.kill9();
                }
            }
        }
        let mut disks = Vec::new();
        if other == Port::B {
            disks = self.backup_disks.clone();
            if let Some(t) = &self.tmpfs {
                if let Err(e) = super::resize_tmpfs(t, "16M") {
                    self.note(format!("repair: {e:#}"));
                }
            }
        }
        match spawn_backup(self.bed, &self.dir, other, &disks) {
            Ok(m) => self.replacement = Some(m),
            Err(e) => {
                self.note(format!("repair: cannot start a backup on {other:?}: {e:#}"));
                return false;
            }
        }
        let ok = wait_state(&self.sock(live), "protected", REPROTECT_TIMEOUT);
        let ft = status_of(&self.sock(live)).map(|v| v["ft"].clone());
        let state = ft.as_ref().map(|f| f["state"].clone());
        let reason = ft.as_ref().map(|f| f["reason"].clone());
        let replacement = self
            .replacement
            .as_mut()
            .map(|m| match m.wait_exit(Duration::ZERO) {
                Ok(st) => format!("exited {st}: {}", m.stderr_text().trim()),
                Err(_) => "running".to_string(),
            });
        self.note(format!(
            "after the repair ({other:?} replaced): live copy on {live:?} is {state:?} \
             ({reason:?}); new backup {replacement:?}"
        ));
        ok
    }
}

/// Pairs started before giving up on reaching protection.
const START_ATTEMPTS: usize = 3;

/// Starts the pair of `setup`; with `protect`, waits until the primary is protected, starting
/// a new pair (up to [`START_ATTEMPTS`]) when one never gets there. Returns the pair and how
/// many attempts failed (each noted with the backup's last words in `notes`).
fn start_protected(
    bed: &TwoNodeBed,
    dir: &Path,
    setup: &FtSetup,
    protect: bool,
    notes: &mut Vec<String>,
) -> anyhow::Result<(FtPair, usize)> {
    let mut failures = 0;
    loop {
        let mut pair = ft::start_pair(bed, dir, setup)?;
        if !protect {
            return Ok((pair, failures));
        }
        let Err(e) = ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(40)) else {
            return Ok((pair, failures));
        };
        let backup = pair.backup.as_mut().map(|b| {
            let exited = b.wait_exit(Duration::ZERO).ok();
            let err = if exited.is_some() {
                b.stderr_text()
            } else {
                String::new()
            };
            format!("backup exit {exited:?}: {}", err.trim())
        });
        let primary = status_of(&dir.join("a.sock")).map(|v| v["ft"]["reason"].clone());
        notes.push(format!(
            "attempt {failures}: never protected (primary: {primary:?}; {backup:?})"
        ));
        failures += 1;
        for ns in [bed.node_a(), bed.node_b()] {
            bed.kill_node(ns)?;
        }
        if failures == START_ATTEMPTS {
            return Err(e.context(format!(
                "{START_ATTEMPTS} FT pairs never reached protection: {notes:?}"
            )));
        }
    }
}

/// The disk-error scenario's disks: the primary's 4 MiB raw disk with 2 MiB of random data, the
/// backup's sparse 4 MiB copy on a 1 MiB tmpfs (so its writes fail with ENOSPC). Returns the
/// primary's and the backup's `--disk` options and the tmpfs mount point.
fn disk_error_disks(dir: &Path) -> anyhow::Result<(String, String, PathBuf)> {
    let a = dir.join("a-disk.raw");
    let mut data = vec![0u8; 2 << 20];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut data))
        .context("cannot read /dev/urandom")?;
    let mut f =
        std::fs::File::create(&a).with_context(|| format!("cannot create {}", a.display()))?;
    f.write_all(&data)?;
    f.set_len(4 << 20)?;
    let t = dir.join("b-tmpfs");
    super::mount_tmpfs(&t, "1M")?;
    let b = t.join("disk.raw");
    std::fs::File::create(&b)
        .and_then(|f| f.set_len(4 << 20))
        .with_context(|| format!("cannot create the sparse {}", b.display()))?;
    Ok((a.display().to_string(), b.display().to_string(), t))
}

/// Runs a protected kv guest at the default timeout while `stress-ng --cpu 2 --io 1 --hdd 1`
/// loads the host for `hog`; counts failovers (node B taking the guest over although node A
/// never failed) and reports the FT states and writes.
pub fn false_failovers(bed: &TwoNodeBed, dir: &Path, hog: Duration) -> anyhow::Result<Value> {
    std::fs::create_dir_all(dir)?;
    let mut setup = FtSetup::new(&format!("kv {}", ft::KV_PORT));
    setup.timeout_ms = DEFAULT_TIMEOUT_MS;
    let mac = netns::parse_mac(bed.guest_mac())?;
    let cap = LanCapture::start(bed, mac)?;
    let _prober = ArpProber::start(bed, PROBE_INTERVAL)?;
    let mut notes = Vec::new();
    let (pair, start_failures) = start_protected(bed, dir, &setup, true, &mut notes)?;
    let result = (|| -> anyhow::Result<Value> {
        let writer = KvWriter::start(bed)?;
        let t0 = Instant::now();
        let secs = hog.as_secs().max(1).to_string();
        let out = std::process::Command::new("stress-ng")
            .args(["--cpu", "2", "--io", "1", "--hdd", "1", "--timeout", &secs])
            .arg("--temp-path")
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .output()
            .context("cannot run stress-ng (Debian package stress-ng)")?;
        if !out.status.success() {
            bail!(
                "stress-ng failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let hog_s = t0.elapsed().as_secs_f64();
        std::thread::sleep(Duration::from_secs(2));
        let a = status_of(&dir.join("a.sock"));
        let b = status_of(&dir.join("b.sock"));
        let acked = writer.stop();
        let lost = writer::verify(bed, &acked)?.len();
        let frames = cap.frames();
        let b_state = b.as_ref().map(|v| v["ft"]["state"].clone());
        let took_over = timeline::first_handover(&frames).is_some()
            || b_state.as_ref().is_some_and(|s| s == "failed-over");
        Ok(json!({
            "hog_s": (hog_s * 10.0).round() / 10.0,
            "false_failovers": usize::from(took_over),
            "primary_state": a.as_ref().map(|v| v["ft"]["state"].clone()),
            "backup_state": b_state,
            "primary_rejected_frames": a.as_ref().map(|v| v["ft"]["rejected_frames"].clone()),
            "two_live_copies": timeline::two_live_copies(&frames),
            "two_live_periods": timeline::periods_json(&frames),
            "acked_writes": acked.len(),
            "acked_writes_lost": lost,
            "runs": timeline::runs_json(&frames),
            "start_failures": start_failures,
            "notes": notes,
        }))
    })();
    for ns in [bed.node_a(), bed.node_b()] {
        let _ = bed.kill_node(ns);
    }
    drop(pair);
    result
}
