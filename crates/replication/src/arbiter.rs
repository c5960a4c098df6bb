//! The arbiter an FT engine asks before it goes live (a backup taking over) or releases
//! unacknowledged output (a primary degrading).
//!
//! The trait is shaped for the cluster's quorum arbiter: each claim maps to one linearizable
//! compare-and-set on the VM's ownership record (`vm`, `session`, `epoch`), so exactly one side
//! wins and the loser stops its copy. This crate ships the two-node arbiter, which decides from
//! the watch path ([`crate::watch`]): the peer's explicit word, or its silence on both paths.
//! With both paths cut and both nodes alive the two-node arbiter grants both sides (its
//! documented split-brain exposure, shown in the FT status); only a quorum closes that.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::liveness::{PeerState, SessionId};
use crate::watch::WatchPath;

/// What is claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClaimKind {
    /// The backup resumes the guest from its standby.
    TakeOver,
    /// The primary releases output the backup has not acknowledged and runs unprotected.
    Degrade,
}

/// One claim on a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Claim {
    /// The VM's identity (`--ft-vm-id`).
    pub vm: String,
    /// What is claimed.
    pub kind: ClaimKind,
    /// The last committed (backup) or acknowledged (primary) epoch.
    pub epoch: u64,
    /// The A-link session the claim is about.
    pub session: SessionId,
}

/// An arbiter's answer. Anything but `Granted` means no.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    /// Go ahead: the other side is known not to be (or become) live.
    Granted,
    /// No, and why (e.g. the peer is alive).
    Refused(String),
    /// The arbiter cannot tell (unreachable quorum, ...): treated as no.
    Unknown(String),
}

/// Decides claims; asked before a takeover and before a degrade.
pub trait Arbiter: Send + Sync {
    /// Answers `claim`; must not block for long (the engines hold output meanwhile).
    fn claim(&self, claim: &Claim) -> Verdict;
    /// A one-line description for the FT status.
    fn describe(&self) -> String;
    /// The situation in which this arbiter may grant both sides, if any (for the FT status).
    fn split_brain_exposure(&self) -> Option<String>;
}

/// No arbiter (no `--ft-watch`): every claim is refused, so a backup never takes over by
/// itself and a primary holds its output while it reconnects.
pub struct NoArbiter;

impl Arbiter for NoArbiter {
    fn claim(&self, _: &Claim) -> Verdict {
        Verdict::Refused("no arbiter: start both monitors with --ft-watch".into())
    }
    fn describe(&self) -> String {
        "none (no --ft-watch): the backup never takes over by itself, the primary never degrades"
            .into()
    }
    fn split_brain_exposure(&self) -> Option<String> {
        None
    }
}

/// The two-node arbiter: decides from the watch path between the two monitors.
pub struct TwoNodeArbiter {
    watch: Arc<WatchPath>,
    /// This node's dead time: the primary's silence that allows a takeover.
    dead: Duration,
}

impl TwoNodeArbiter {
    /// An arbiter over `watch`, with this node's dead time `dead`.
    pub fn new(watch: Arc<WatchPath>, dead: Duration) -> Self {
        Self { watch, dead }
    }

    /// The margin added to the peer's dead time before its silence counts as its death.
    pub fn peer_dead(&self) -> Duration {
        self.watch.peer_dead_time().unwrap_or(self.dead) * 2
    }
}

impl Arbiter for TwoNodeArbiter {
    fn claim(&self, c: &Claim) -> Verdict {
        let view = self.watch.view();
        let silent = view.silent_for();
        match c.kind {
            ClaimKind::TakeOver => {
                if self.watch.unread() {
                    Verdict::Unknown("watch datagrams wait unread".into())
                } else if silent >= self.dead {
                    Verdict::Granted
                } else {
                    Verdict::Refused(format!(
                        "the primary was heard on the watch path {} ms ago",
                        silent.as_millis()
                    ))
                }
            }
            ClaimKind::Degrade if self.watch.unread() => {
                Verdict::Unknown("watch datagrams wait unread".into())
            }
            ClaimKind::Degrade => {
                let word = view.word.filter(|_| silent < self.peer_dead());
                match word {
                    Some(w)
                        if w.session == c.session
                            && matches!(w.state, PeerState::Released | PeerState::Stopped) =>
                    {
                        Verdict::Granted
                    }
                    Some(w) => Verdict::Refused(format!(
                        "the backup says {:?} for session {:x}",
                        w.state, w.session
                    )),
                    None if silent >= self.peer_dead() => Verdict::Granted,
                    None => Verdict::Unknown("the backup's word is not fresh".into()),
                }
            }
        }
    }

    fn describe(&self) -> String {
        format!("two-node watch path with {}", self.watch.peer())
    }

    fn split_brain_exposure(&self) -> Option<String> {
        Some(
            "two-node arbiter: with the A-link and the watch path both cut and both nodes \
             alive, both copies are granted (a quorum arbiter closes this)"
                .into(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{SocketAddr, UdpSocket};

    fn port() -> SocketAddr {
        UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    }

    fn claim(kind: ClaimKind, session: SessionId) -> Claim {
        Claim {
            vm: "vm".into(),
            kind,
            epoch: 1,
            session,
        }
    }

    fn wait(f: impl Fn() -> bool) {
        let t0 = std::time::Instant::now();
        while !f() {
            assert!(
                t0.elapsed() < Duration::from_secs(5),
                "condition not reached"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn two_node_arbiter_over_two_real_watch_paths() {
        let dead = Duration::from_millis(100);
        let (pa, pb) = (port(), port());
        let secret = b"a cluster secret!";
        let a = WatchPath::start("vm", pa, pb, secret, true, dead).unwrap();
        let b = WatchPath::start("vm", pb, pa, secret, false, dead).unwrap();
        a.set_own(true, PeerState::PrimaryLive, 7, 3);
        b.set_own(false, PeerState::BackupStandby, 7, 3);
        let on_a = TwoNodeArbiter::new(a.clone(), dead);
        let on_b = TwoNodeArbiter::new(b.clone(), dead);
        wait(|| b.view().word.is_some() && a.view().word.is_some());
        // Both alive: neither may go live nor degrade.
        assert!(matches!(
            on_b.claim(&claim(ClaimKind::TakeOver, 7)),
            Verdict::Refused(_)
        ));
        assert!(matches!(
            on_a.claim(&claim(ClaimKind::Degrade, 7)),
            Verdict::Refused(_)
        ));
        // The backup's word "released" for the session is a yes; for another session it is not.
        b.set_own(false, PeerState::Released, 7, 3);
        wait(|| a.view().word.map(|w| w.state) == Some(PeerState::Released));
        assert_eq!(on_a.claim(&claim(ClaimKind::Degrade, 7)), Verdict::Granted);
        assert!(matches!(
            on_a.claim(&claim(ClaimKind::Degrade, 8)),
            Verdict::Refused(_)
        ));
        // The primary goes silent (its watch path ends): the takeover is granted after the
        // dead time, not before.
        b.set_own(false, PeerState::BackupStandby, 7, 3);
        drop(on_a);
        drop(a);
        std::thread::sleep(Duration::from_millis(30));
        assert!(matches!(
            on_b.claim(&claim(ClaimKind::TakeOver, 7)),
            Verdict::Refused(_)
        ));
        wait(|| on_b.claim(&claim(ClaimKind::TakeOver, 7)) == Verdict::Granted);
        assert!(b.view().silent_for() >= dead);
    }

    #[test]
    fn no_arbiter_refuses_everything() {
        for kind in [ClaimKind::TakeOver, ClaimKind::Degrade] {
            assert!(matches!(
                NoArbiter.claim(&claim(kind, 1)),
                Verdict::Refused(_)
            ));
        }
    }
}
