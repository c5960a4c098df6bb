//! Who may be live: the one place that turns what an FT engine knows (its A-link, the watch
//! path, the peer's explicit word, the arbiter's verdict) into what it does. Pure functions, no
//! I/O; the engines call them and nothing else decides to go live or to release output that
//! the peer has not acknowledged.
//!
//! The rule: a backup goes live only when the primary is silent on BOTH the A-link and the
//! watch path for the dead time and the arbiter grants the takeover; a primary releases
//! unacknowledged output (degrades) only when the arbiter says yes — the backup's word that it
//! released its standby, or the backup's silence on both paths beyond its dead time plus a
//! margin. A copy that hears its peer is live stops. Without a watch path there is no arbiter:
//! nothing goes live and nothing is released by itself.

use std::time::Duration;

use crate::arbiter::{ClaimKind, Verdict};

/// A session id: fresh and random per A-link session; 0 means none.
pub type SessionId = u64;

/// The A-link as an engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ALink {
    /// A session is up and the peer was heard within the dead time.
    Ok,
    /// A session is up but nothing arrived for this long (at least the dead time).
    Silent(Duration),
    /// No session (refused frame, closed, never connected) for this long.
    Down(Duration),
}

impl ALink {
    /// How long the peer has not been heard on the A-link (zero when it is fine).
    pub fn silent_for(&self) -> Duration {
        match *self {
            ALink::Ok => Duration::ZERO,
            ALink::Silent(d) | ALink::Down(d) => d,
        }
    }
}

/// What a monitor says about its copy of the VM on the watch path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PeerState {
    /// The primary runs the guest (protected, reconnecting or degraded).
    PrimaryLive,
    /// The backup holds a committed standby of `session` and may take over.
    BackupStandby,
    /// The backup runs the guest.
    BackupLive,
    /// The backup holds no standby of `session` and never will: it may not go live for it.
    Released,
    /// The copy ended (the guest powered off, or the copy was stopped).
    Stopped,
}

/// The peer's latest word on the watch path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerWord {
    /// Its state.
    pub state: PeerState,
    /// The session the state refers to.
    pub session: SessionId,
}

/// The watch path as an engine sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watch {
    /// No `--ft-watch`: there is no arbiter.
    Off,
    /// Configured; the peer was last heard `silent_for` ago saying `word` (None: never heard).
    On {
        /// Time since the last authenticated datagram from the peer.
        silent_for: Duration,
        /// What it said last.
        word: Option<PeerWord>,
    },
}

impl Watch {
    /// Caps the peer's silence at `observed`, how long this engine has been running without a
    /// stall of its own: a frozen process (SIGSTOP, a host hang) heard nothing because it did
    /// not listen, which proves nothing about its peer.
    pub fn observed(self, observed: Duration) -> Watch {
        match self {
            Watch::On { silent_for, word } => Watch::On {
                silent_for: silent_for.min(observed),
                word,
            },
            Watch::Off => Watch::Off,
        }
    }

    /// The peer's word if it was heard within `dead`.
    fn fresh(&self, dead: Duration) -> Option<PeerWord> {
        match *self {
            Watch::On { silent_for, word } if silent_for < dead => word,
            _ => None,
        }
    }

    /// Whether the peer has been silent on the watch path for at least `d`.
    fn silent(&self, d: Duration) -> bool {
        matches!(*self, Watch::On { silent_for, .. } if silent_for >= d)
    }
}

/// What the backup knows.
#[derive(Debug, Clone)]
pub struct BackupView {
    /// The A-link from the primary.
    pub alink: ALink,
    /// The watch path.
    pub watch: Watch,
    /// The session whose committed standby this backup holds (None: no standby).
    pub standby: Option<SessionId>,
    /// The dead time (`--ft-timeout-ms`).
    pub dead: Duration,
    /// The arbiter's answer to a takeover claim, once asked.
    pub verdict: Option<Verdict>,
}

/// What the backup does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackupAction {
    /// Stand by: keep applying checkpoints or waiting for them.
    KeepGoing,
    /// Drop the stream if any, keep the standby, keep listening for the primary to reconnect.
    WaitReconnect,
    /// Ask the arbiter for a takeover before acting.
    AskArbiter,
    /// Resume the guest from the standby.
    TakeOver,
    /// The standby is obsolete: discard it and wait for a new session.
    DiscardStandby,
    /// The guest ended on the primary: discard the standby and end this backup.
    Stop,
}

/// The backup's decision.
pub fn backup(v: &BackupView) -> BackupAction {
    use BackupAction::*;
    let Some(standby) = v.standby else {
        // Nothing to resume: nothing can go live here.
        return match v.watch.fresh(v.dead) {
            Some(PeerWord {
                state: PeerState::Stopped,
                ..
            }) => Stop,
            _ if matches!(v.alink, ALink::Down(_)) => WaitReconnect,
            _ => KeepGoing,
        };
    };
    match v.watch.fresh(v.dead) {
        Some(PeerWord {
            state: PeerState::Stopped,
            ..
        }) => return Stop,
        // The primary has moved on to another session (or is a new process): ours is stale.
        Some(PeerWord {
            state: PeerState::PrimaryLive,
            session,
        }) if session != standby => return DiscardStandby,
        // A second live copy elsewhere: never a third.
        Some(PeerWord {
            state: PeerState::BackupLive,
            ..
        }) => return DiscardStandby,
        _ => {}
    }
    if v.alink == ALink::Ok {
        return KeepGoing;
    }
    if v.alink.silent_for() < v.dead || matches!(v.watch, Watch::Off) || !v.watch.silent(v.dead) {
        // A slow or broken A-link alone is not a death; without a watch path nothing proves one.
        return if matches!(v.alink, ALink::Silent(_)) {
            KeepGoing
        } else {
            WaitReconnect
        };
    }
    match &v.verdict {
        None => AskArbiter,
        Some(Verdict::Granted) => TakeOver,
        Some(Verdict::Refused(_) | Verdict::Unknown(_)) => WaitReconnect,
    }
}

/// What the primary knows.
#[derive(Debug, Clone)]
pub struct PrimaryView {
    /// The A-link to the backup.
    pub alink: ALink,
    /// The watch path.
    pub watch: Watch,
    /// The last session this process started (0: none ever, nothing held anywhere).
    pub session: SessionId,
    /// How long the A-link may stay down before the primary asks the backup to release.
    pub release_after: Duration,
    /// The backup's dead time plus the margin: its silence beyond this counts as its death.
    pub peer_dead: Duration,
    /// The arbiter's answer to a degrade claim, once asked.
    pub verdict: Option<Verdict>,
}

/// What the primary does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrimaryAction {
    /// Keep checkpointing.
    KeepGoing,
    /// Keep output held and try to reach the backup again; with `ask_release`, also ask it
    /// over the watch path to release its standby of the session.
    HoldAndReconnect {
        /// Ask the backup to release.
        ask_release: bool,
    },
    /// Ask the arbiter before degrading.
    AskArbiter(ClaimKind),
    /// Release held output unacknowledged and run unprotected (re-protect when possible).
    Degrade,
    /// The peer runs the guest: stop this copy at once.
    Stop,
}

/// The primary's decision.
pub fn primary(v: &PrimaryView) -> PrimaryAction {
    use PrimaryAction::*;
    // The watch word counts while fresh; the backup's own dead time bounds freshness.
    let word = v.watch.fresh(v.peer_dead);
    if let Some(PeerWord {
        state: PeerState::BackupLive | PeerState::PrimaryLive,
        ..
    }) = word
    {
        return Stop;
    }
    if v.alink == ALink::Ok {
        return KeepGoing;
    }
    if v.session == 0 {
        // No session was ever started: no standby of ours exists anywhere.
        return Degrade;
    }
    let released = matches!(word, Some(PeerWord { state: PeerState::Released | PeerState::Stopped, session }) if session == v.session);
    let peer_gone = v.watch.silent(v.peer_dead) && v.alink.silent_for() >= v.peer_dead;
    if matches!(v.watch, Watch::Off) || !(released || peer_gone) {
        return HoldAndReconnect {
            ask_release: !matches!(v.watch, Watch::Off) && v.alink.silent_for() >= v.release_after,
        };
    }
    match &v.verdict {
        None => AskArbiter(ClaimKind::Degrade),
        Some(Verdict::Granted) => Degrade,
        Some(Verdict::Refused(_) | Verdict::Unknown(_)) => HoldAndReconnect {
            ask_release: v.alink.silent_for() >= v.release_after,
        },
    }
}

/// Measures how long an engine has observed without a stall of its own; silences are only
/// believed up to that (see [`Watch::observed`]).
#[derive(Debug)]
pub struct Observer {
    since: std::time::Instant,
    last: std::time::Instant,
    max_gap: Duration,
}

impl Observer {
    /// Starts observing; a gap longer than `max_gap` between two [`Observer::tick`]s restarts.
    pub fn new(max_gap: Duration) -> Self {
        let now = std::time::Instant::now();
        Self {
            since: now,
            last: now,
            max_gap,
        }
    }

    /// Called every loop iteration; returns how long observation has been continuous.
    pub fn tick(&mut self) -> Duration {
        let now = std::time::Instant::now();
        if now - self.last > self.max_gap {
            tracing::debug!(
                "this engine stalled for {} ms; peer silences count from now",
                (now - self.last).as_millis()
            );
            self.since = now;
        }
        self.last = now;
        now - self.since
    }
}

#[cfg(test)]
mod tests;
