//! Network namespace primitives for the test bed: entering a namespace from a thread, listing
//! and killing a namespace's processes, removing namespaces, attaching to taps, `ip` helpers.
//! The two-node bed itself is [`crate::bed`]; its items are re-exported here.
//! Everything here needs root.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::cleanup::BedLock;

pub use crate::bed::{
    Link, TwoNodeBed, ALINK_IP_A, ALINK_IP_B, BRIDGE_AGEING_SECS, CLIENT_IP, GUEST_IP, GUEST_MAC,
    MGMT_IP_A, MGMT_IP_B, TAP,
};
pub use crate::proxy::{AlinkProxy, Fault};

/// Where `ip netns` keeps its namespace handles.
const NETNS_DIR: &str = "/var/run/netns";
/// Longest accepted prefix (namespace names may have up to 255 bytes).
pub(crate) const MAX_PREFIX: usize = 64;
/// How long killing a namespace's processes may take.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

/// Whether this process runs as root.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

pub(crate) fn require_root(what: &str) -> anyhow::Result<()> {
    if !is_root() {
        bail!("{what} needs root (it manages network namespaces): run it as root, e.g. with sudo");
    }
    Ok(())
}

pub(crate) fn check_prefix(prefix: &str) -> anyhow::Result<()> {
    if prefix.len() > MAX_PREFIX
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        bail!(
            "invalid test bed prefix {prefix:?}: use at most {MAX_PREFIX} characters from [A-Za-z0-9._-]"
        );
    }
    Ok(())
}

/// Runs `ip args...` and returns its standard output.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run `ip`: install iproute2")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip -n ns args...`.
pub(crate) fn ip_in(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all)
}

pub(crate) fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Whether the named network namespace exists.
pub fn netns_exists(ns: &str) -> bool {
    !ns.is_empty() && !ns.contains('/') && netns_path(ns).exists()
}

pub(crate) fn open_netns(ns: &str) -> anyhow::Result<File> {
    if ns.is_empty() || ns.contains('/') {
        bail!("invalid network namespace name {ns:?}");
    }
    File::open(netns_path(ns)).with_context(|| {
        format!("network namespace {ns} does not exist (create the bed with `ftvm testbed up`)")
    })
}

/// Moves the calling thread into the network namespace behind `file`.
fn enter_netns(file: &File) -> std::io::Result<()> {
    // SAFETY: setns only reads the file descriptor, which `file` keeps open; it changes the
    // network namespace of the calling thread alone.
    let ret = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread inside network namespace `ns` and returns its result.
///
/// Sockets created inside `f` belong to `ns` for good: they can be returned and used from any
/// thread afterwards, e.g.
/// `let stream = in_ns(bed.client(), || TcpStream::connect(addr))??;`.
/// Only the network namespace changes: `/sys` and `/proc/net` still show the caller's view.
/// A panic in `f` is resumed in the caller.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    let file = open_netns(ns)?;
    std::thread::scope(|s| {
        let handle = s.spawn(move || -> std::io::Result<T> {
            enter_netns(&file)?;
            Ok(f())
        });
        match handle.join() {
            Ok(r) => {
                r.with_context(|| format!("cannot enter network namespace {ns} (are you root?)"))
            }
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// Starts a named thread that runs `f` inside network namespace `ns`; every socket the thread
/// creates belongs to `ns`. Fails if the namespace cannot be entered (then `f` never runs).
pub fn spawn_thread_in<T: Send + 'static>(
    ns: &str,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> anyhow::Result<JoinHandle<T>> {
    let file = open_netns(ns)?;
    let (tx, rx) = mpsc::sync_channel::<std::io::Result<()>>(1);
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let entered = enter_netns(&file);
            let ok = entered.is_ok();
            let _ = tx.send(entered);
            if !ok {
                // The caller has the error; never run `f` in the wrong namespace.
                panic!("could not enter the network namespace");
            }
            drop(file);
            f()
        })
        .context("cannot start a thread")?;
    rx.recv()
        .context("the namespace thread died")?
        .with_context(|| format!("cannot enter network namespace {ns} (are you root?)"))?;
    Ok(handle)
}

/// `(st_dev, st_ino)` of a namespace file, which identifies the namespace.
fn ns_id(path: &Path) -> Option<(u64, u64)> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// Processes (other than this one) with at least one thread in network namespace `ns`.
/// Zombies are not listed: they have left every namespace.
pub fn pids_in(ns: &str) -> anyhow::Result<Vec<u32>> {
    let id = ns_id(&netns_path(ns)).with_context(|| {
        format!("network namespace {ns} does not exist (create the bed with `ftvm testbed up`)")
    })?;
    let me = std::process::id();
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").context("cannot read /proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(tasks) = std::fs::read_dir(entry.path().join("task")) else {
            continue;
        };
        let inside = tasks
            .flatten()
            .any(|t| ns_id(&t.path().join("ns/net")) == Some(id));
        if inside {
            pids.push(pid);
        }
    }
    Ok(pids)
}

pub(crate) fn signal(pid: u32, sig: libc::c_int) -> anyhow::Result<()> {
    let pid = libc::pid_t::try_from(pid).context("invalid pid")?;
    if pid <= 0 {
        bail!("invalid pid {pid}");
    }
    // SAFETY: kill has no memory-safety preconditions; `pid` is a single positive process id
    // (never 0 or negative, which would signal process groups).
    if unsafe { libc::kill(pid, sig) } != 0 {
        let e = std::io::Error::last_os_error();
        return Err(e).with_context(|| format!("cannot send signal {sig} to process {pid}"));
    }
    Ok(())
}

/// SIGKILLs every process in `ns` (not this one) until none is left; returns how many were
/// killed.
pub(crate) fn kill_all_in(ns: &str) -> anyhow::Result<usize> {
    let t0 = Instant::now();
    let mut killed = std::collections::BTreeSet::new();
    loop {
        let pids = pids_in(ns)?;
        if pids.is_empty() {
            return Ok(killed.len());
        }
        if t0.elapsed() > KILL_TIMEOUT {
            bail!(
                "processes {pids:?} in network namespace {ns} survived SIGKILL for {KILL_TIMEOUT:?} \
                 (stuck in the kernel?); look at /proc/<pid>/stack"
            );
        }
        for pid in pids {
            // It may have exited meanwhile.
            let _ = signal(pid, libc::SIGKILL);
            killed.insert(pid);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until every `(namespace, interface)` is operationally up. A fresh carrier reaches
/// the qdisc and the bridge only through the kernel's link watcher, which batches events for up
/// to a second; until then frames are dropped.
pub(crate) fn wait_oper_up(devs: &[(&str, &str)]) -> anyhow::Result<()> {
    let t0 = Instant::now();
    for (ns, dev) in devs {
        loop {
            let line = ip_in(ns, &["-o", "link", "show", "dev", dev])?;
            if line.contains(" state UP ") {
                break;
            }
            if t0.elapsed() > Duration::from_secs(5) {
                bail!("{dev} in {ns} is not up after 5 s: {}", line.trim());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

/// Deletes a namespace after killing its processes (its interfaces go with it).
pub(crate) fn remove_ns(ns: &str) -> anyhow::Result<()> {
    if !netns_exists(ns) {
        return Ok(());
    }
    kill_all_in(ns)?;
    let _lock = BedLock::take()?;
    if netns_exists(ns) {
        ip(&["netns", "del", ns])?;
    }
    Ok(())
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaches to the existing tap device `name` of the current thread's network namespace
/// (frames without packet information, non-blocking). Writing a frame sends it into the
/// bridge.
pub(crate) fn attach_tap(name: &str) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReq {
        name: [0; 16],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    if name.is_empty() || name.len() > 15 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "tap names have 1 to 15 bytes",
        ));
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a struct ifreq; `req` is a properly sized, initialised
    // ifreq that lives across the call, and `file` is an open /dev/net/tun descriptor.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(file)
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(mac: &str) -> anyhow::Result<[u8; 6]> {
    let parts: Vec<&str> = mac.split(':').collect();
    let mut out = [0u8; 6];
    if parts.len() != 6 {
        bail!("invalid MAC address {mac:?}: use six hex bytes like 52:54:00:f7:00:10");
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16)
            .with_context(|| format!("invalid MAC address {mac:?}: {p:?} is not a hex byte"))?;
    }
    Ok(out)
}
