//! The backup's standby gate: one lock around the standby's fate, so that Standby -> Live and
//! Standby -> Released are single atomic transitions and never both. The watch path's receiver
//! (a release request) and the engine (commit, takeover) both go through it, and every
//! transition is announced on the watch path at once.

use std::sync::{Arc, Mutex, MutexGuard};

use crate::liveness::{PeerState, SessionId};
use crate::watch::WatchPath;
use crate::Error;

/// Where the standby is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No standby; `last` was the last session held (0: none).
    Empty {
        /// The last session.
        last: SessionId,
    },
    /// Initial sync of `session`: nothing committed, nothing to resume.
    Syncing {
        /// The session.
        session: SessionId,
    },
    /// A committed standby of `session` at `epoch`.
    Standby {
        /// The session.
        session: SessionId,
        /// The committed epoch.
        epoch: u64,
    },
    /// The guest runs here.
    Live {
        /// The session taken over.
        session: SessionId,
    },
    /// The standby of `session` was released or poisoned: never resumed.
    Released {
        /// The session.
        session: SessionId,
    },
    /// The guest ended: nothing to resume, ever.
    Ended,
}

impl Phase {
    /// Whether a standby of `session` (syncing or committed) is still valid.
    pub fn holds(&self, s: SessionId) -> bool {
        matches!(*self, Phase::Syncing { session } | Phase::Standby { session, .. } if session == s)
    }
}

struct Inner {
    phase: Phase,
    /// Sessions never to be accepted or committed again.
    released: Vec<SessionId>,
    /// Sessions begun here.
    seen: Vec<SessionId>,
}

/// The gate.
pub struct Gate {
    inner: Mutex<Inner>,
    watch: Option<Arc<WatchPath>>,
}

impl Gate {
    /// An empty gate announcing on `watch`.
    pub fn new(watch: Option<Arc<WatchPath>>) -> Self {
        let g = Gate {
            inner: Mutex::new(Inner {
                phase: Phase::Empty { last: 0 },
                released: Vec::new(),
                seen: Vec::new(),
            }),
            watch,
        };
        g.announce(&g.lock());
        g
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn announce(&self, i: &Inner) {
        let Some(w) = &self.watch else { return };
        let (state, session, epoch) = match i.phase {
            Phase::Empty { last } => (PeerState::Released, last, 0),
            // Nothing committed yet: this node cannot go live for the new session, and the
            // previous one was discarded when it began.
            Phase::Syncing { .. } => (
                PeerState::Released,
                i.released.last().copied().unwrap_or(0),
                0,
            ),
            Phase::Standby { session, epoch } => (PeerState::BackupStandby, session, epoch),
            Phase::Live { session } => (PeerState::BackupLive, session, 0),
            Phase::Released { session } => (PeerState::Released, session, 0),
            Phase::Ended => (
                PeerState::Stopped,
                i.released.last().copied().unwrap_or(0),
                0,
            ),
        };
        w.set_own(false, state, session, epoch);
    }

    /// Says on the watch path that a checkpoint is being decoded and verified (before
    /// [`Gate::commit`] names its epoch), or that it is done.
    pub fn busy(&self, on: bool) {
        if let Some(w) = &self.watch {
            w.set_applying(if on { u64::MAX } else { 0 });
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.lock().phase
    }

    /// A new session begins (its standby VM is being built); false if it was released.
    pub fn begin(&self, session: SessionId) -> bool {
        let mut i = self.lock();
        if i.released.contains(&session) || matches!(i.phase, Phase::Live { .. } | Phase::Ended) {
            return false;
        }
        i.phase = Phase::Syncing { session };
        i.seen.push(session);
        self.announce(&i);
        true
    }

    /// Applies checkpoint `epoch` of `session` with `apply` under the gate. `Ok(false)`: the
    /// session was released meanwhile and nothing was applied; `Err`: `apply` failed half-way
    /// and the standby is poisoned (released, never resumed).
    pub fn commit(
        &self,
        session: SessionId,
        epoch: u64,
        apply: impl FnOnce() -> Result<(), Error>,
    ) -> Result<bool, Error> {
        let mut i = self.lock();
        if !i.phase.holds(session) {
            return Ok(false);
        }
        if let Some(w) = &self.watch {
            w.set_applying(epoch);
        }
        let applied = apply();
        if let Some(w) = &self.watch {
            w.set_applying(0);
        }
        match applied {
            Ok(()) => {
                i.phase = Phase::Standby { session, epoch };
                self.announce(&i);
                Ok(true)
            }
            Err(e) => {
                i.phase = Phase::Released { session };
                i.released.push(session);
                self.announce(&i);
                Err(e)
            }
        }
    }

    /// The primary asks (watch path) for `session` to be released. A request for an older
    /// session than the one held is stale and ignored; one for a session never seen here
    /// means the primary moved on, so whatever standby is not live is released with it.
    pub fn release(&self, session: SessionId) {
        let mut i = self.lock();
        if matches!(i.phase, Phase::Live { .. } | Phase::Ended) {
            return;
        }
        let current = match i.phase {
            Phase::Syncing { session } | Phase::Standby { session, .. } => Some(session),
            _ => None,
        };
        if current.is_some_and(|c| c != session) && i.seen.contains(&session) {
            return;
        }
        if !i.released.contains(&session) {
            tracing::warn!("the primary asked to release session {session:x}");
            i.released.push(session);
        }
        if let Some(c) = current.filter(|&c| c != session) {
            i.released.push(c);
        }
        i.phase = Phase::Released { session };
        self.announce(&i);
    }

    /// The primary moved on: drop the standby of `session` (if still held).
    pub fn discard(&self, session: SessionId) {
        let mut i = self.lock();
        if i.phase.holds(session) {
            i.released.push(session);
            i.phase = Phase::Released { session };
            self.announce(&i);
        }
    }

    /// The one step to go live: Standby(session) -> Live; false if no longer a standby.
    pub fn go_live(&self, session: SessionId) -> bool {
        let mut i = self.lock();
        match i.phase {
            Phase::Standby { session: s, .. } if s == session => {
                i.phase = Phase::Live { session };
                self.announce(&i);
                true
            }
            _ => false,
        }
    }

    /// The guest ended: nothing to resume, ever.
    pub fn end(&self) {
        let mut i = self.lock();
        if !matches!(i.phase, Phase::Live { .. }) {
            i.phase = Phase::Ended;
            self.announce(&i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standby_goes_live_or_is_released_never_both() {
        let g = Gate::new(None);
        assert!(g.begin(7));
        assert!(!g.go_live(7), "went live before any commit");
        assert!(g.commit(7, 1, || Ok(())).unwrap());
        g.release(7);
        assert!(!g.go_live(7), "live after release");
        assert!(!g
            .commit(7, 2, || panic!("applied a released session"))
            .unwrap());
        assert!(!g.begin(7), "a released session was accepted again");

        let g = Gate::new(None);
        assert!(g.begin(8));
        assert!(g.commit(8, 1, || Ok(())).unwrap());
        assert!(g.go_live(8));
        g.release(8);
        assert_eq!(g.phase(), Phase::Live { session: 8 });
    }

    #[test]
    fn a_stale_release_request_does_not_touch_a_newer_session() {
        let g = Gate::new(None);
        assert!(g.begin(1));
        assert!(g.commit(1, 1, || Ok(())).unwrap());
        g.discard(1);
        assert!(g.begin(2));
        assert!(g.commit(2, 1, || Ok(())).unwrap());
        g.release(1);
        assert_eq!(
            g.phase(),
            Phase::Standby {
                session: 2,
                epoch: 1
            }
        );
        // A session never seen here: the primary moved on past ours.
        g.release(3);
        assert_eq!(g.phase(), Phase::Released { session: 3 });
        assert!(!g.go_live(2));
        assert!(!g.begin(2) && !g.begin(3));
    }

    #[test]
    fn a_failed_apply_poisons_the_standby() {
        let g = Gate::new(None);
        assert!(g.begin(9));
        assert!(g.commit(9, 1, || Ok(())).unwrap());
        assert!(g
            .commit(9, 2, || Err(Error::Io("disk full".into())))
            .is_err());
        assert_eq!(g.phase(), Phase::Released { session: 9 });
        assert!(!g.go_live(9));
    }

    #[test]
    fn concurrent_release_and_takeover_have_exactly_one_winner() {
        for _ in 0..200 {
            let g = Arc::new(Gate::new(None));
            assert!(g.begin(5));
            assert!(g.commit(5, 1, || Ok(())).unwrap());
            let g2 = g.clone();
            let t = std::thread::spawn(move || g2.release(5));
            let live = g.go_live(5);
            t.join().unwrap();
            let p = g.phase();
            assert_eq!(live, p == Phase::Live { session: 5 }, "{p:?}");
            assert!(live || p == Phase::Released { session: 5 });
        }
    }
}
