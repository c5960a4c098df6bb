//! What keeps test beds from outliving the process that built them, or from being removed by
//! another process:
//!
//! - every bed a process builds is registered here, and the first registration starts a thread
//!   that, on SIGINT, SIGTERM or SIGHUP (Ctrl-C, `timeout`, systemd, a closed terminal), removes
//!   every registered bed and exits with 128 + the signal number;
//! - a bed's owner is recorded under [`OWNER_DIR`] (pid and process start time), so that a
//!   stale-bed cleanup elsewhere never removes a bed whose builder still runs;
//! - building and removing namespaces holds one machine-wide lock: iproute2 turns `/run/netns`
//!   into a mount point on its first `ip netns add`, and concurrent first calls stack mounts that
//!   hide each other's namespace files.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, Once};

use anyhow::Context;

/// Where bed owner records live (one file per prefix).
pub const OWNER_DIR: &str = "/run/ftvm-testbed";

/// Namespaces of the beds this process built and has not removed, by prefix.
static LIVE: Mutex<Vec<(String, Vec<String>)>> = Mutex::new(Vec::new());
static WATCHER: Once = Once::new();
/// Set when a terminating signal arrived and its cleanup runs.
static TERMINATING: AtomicBool = AtomicBool::new(false);

/// The machine-wide bed lock, held while namespaces are created or deleted.
pub struct BedLock {
    _file: File,
}

impl BedLock {
    /// Waits for the lock.
    pub fn take() -> anyhow::Result<Self> {
        std::fs::create_dir_all(OWNER_DIR)
            .with_context(|| format!("cannot create {OWNER_DIR} (are you root?)"))?;
        let path = PathBuf::from(OWNER_DIR).join(".lock");
        let file =
            File::create(&path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: flock only operates on the descriptor, which `file` keeps open.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot lock {}", path.display()));
        }
        Ok(Self { _file: file })
    }
}

/// The start time of process `pid` (clock ticks since boot), which tells a live process from a
/// later one that reuses its pid.
fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields count from the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn owner_path(prefix: &str) -> PathBuf {
    PathBuf::from(OWNER_DIR).join(format!("{prefix}owner"))
}

/// Records this process as the owner of the bed `prefix`.
pub(crate) fn record_owner(prefix: &str) -> anyhow::Result<()> {
    let me = std::process::id();
    let start = start_time(me).unwrap_or(0);
    let path = owner_path(prefix);
    std::fs::write(&path, format!("{me} {start}\n"))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Forgets the owner of the bed `prefix` (removed, or kept on purpose for anyone to remove).
pub(crate) fn clear_owner(prefix: &str) {
    let _ = std::fs::remove_file(owner_path(prefix));
}

/// The pid of the live process (not this one) that built the bed `prefix`, if there is one.
pub fn live_owner(prefix: &str) -> Option<u32> {
    let text = std::fs::read_to_string(owner_path(prefix)).ok()?;
    let mut it = text.split_whitespace();
    let pid: u32 = it.next()?.parse().ok()?;
    let start: u64 = it.next()?.parse().ok()?;
    (pid != std::process::id() && start_time(pid) == Some(start)).then_some(pid)
}

/// Registers a bed this process built, so a terminating signal removes it.
pub(crate) fn register(prefix: &str, namespaces: &[&str]) {
    WATCHER.call_once(start_watcher);
    let mut live = LIVE.lock().unwrap_or_else(|p| p.into_inner());
    live.retain(|(p, _)| p != prefix);
    live.push((
        prefix.to_string(),
        namespaces.iter().map(|s| s.to_string()).collect(),
    ));
}

/// Forgets a bed (removed, or kept on purpose).
pub(crate) fn unregister(prefix: &str) {
    LIVE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(p, _)| p != prefix);
}

/// Blocks for good when a terminating signal is being handled: its cleanup removes this
/// process's beds and exits with 128 + the signal. Call it before exiting on your own.
pub fn wait_if_terminating() {
    if TERMINATING.load(Ordering::SeqCst) {
        loop {
            std::thread::park();
        }
    }
}

fn start_watcher() {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!(
                "testbed: cannot watch for signals ({e}); a killed run leaves its bed behind"
            );
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("testbed-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                TERMINATING.store(true, Ordering::SeqCst);
                let beds: Vec<(String, Vec<String>)> =
                    std::mem::take(&mut *LIVE.lock().unwrap_or_else(|p| p.into_inner()));
                for (prefix, namespaces) in &beds {
                    eprintln!("testbed: signal {sig}: removing the test bed {prefix}*");
                    for ns in namespaces {
                        if let Err(e) = crate::netns::remove_ns(ns) {
                            eprintln!("testbed: {e:#}");
                        }
                    }
                    clear_owner(prefix);
                }
                std::process::exit(128 + sig);
            }
        });
    if let Err(e) = spawned {
        eprintln!(
            "testbed: cannot start the signal thread ({e}); a killed run leaves its bed behind"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_tells_processes_apart() {
        let me = std::process::id();
        assert!(start_time(me).is_some());
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        assert_eq!(start_time(pid), None, "a reaped process has no start time");
    }
}
