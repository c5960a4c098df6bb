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
