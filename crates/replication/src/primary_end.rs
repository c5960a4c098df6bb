//! The end of protection when the guest ends: power-off is told to the backup with an
//! acknowledged `End` (it discards its standby for good: never a resurrection), a reboot too
//! (protection restarts with a new session); without a session, the watch path says so.

use std::time::{Duration, Instant};

use vmm::ExitReason;

use crate::link::{Link, Next};
use crate::liveness::PeerState;
use crate::primary::{Primary, Stop};
use crate::protocol::{self, End, EndReason};
use crate::status::FtState;
use crate::wire::Kind;

impl Primary {
    /// The guest ended during a session: tell the backup (an acknowledged End), then Bye.
    pub(crate) fn end_in_session(
        &mut self,
        link: &mut Link,
        epoch: u64,
        reason: ExitReason,
    ) -> Stop {
        let end = End {
            reason: end_reason(&reason),
            epoch,
        };
        let acked = protocol::encode(&end)
            .ok()
            .and_then(|p| link.send(Kind::End, &p).ok())
            .is_some()
            && {
                let t0 = Instant::now();
                loop {
                    match link.next(Duration::from_millis(20)) {
                        Next::Frame(f) if f.kind == Kind::Ack => break true,
                        Next::Failed(_) => break false,
                        _ if t0.elapsed() > Duration::from_secs(3) => break false,
                        _ => {}
                    }
                }
            };
        if acked {
            let _ = link.send(Kind::Bye, &[]);
            // The backup will never resume this guest: its last words may go out.
            self.release_all();
            if end.reason == EndReason::Reboot {
                self.last_session = 0;
                self.announce();
            }
            self.status
                .set_state(FtState::Stopped, format!("the guest ended ({reason:?})"));
            if end.reason == EndReason::PowerOff {
                self.say_stopped();
            }
            Stop::GuestEnded
        } else {
            self.end_without_session(reason)
        }
    }

    /// The guest ended while no session is up: say so on the watch path for long enough that
    /// the backup hears it (it discards its standby); output of a possible standby stays held.
    pub(crate) fn end_without_session(&mut self, reason: ExitReason) -> Stop {
        self.status
            .set_state(FtState::Stopped, format!("the guest ended ({reason:?})"));
        if end_reason(&reason) == EndReason::PowerOff {
            self.say_stopped();
        }
        Stop::GuestEnded
    }

    fn say_stopped(&self) {
        if let Some(w) = &self.opts.watch {
            w.set_own(true, PeerState::Stopped, self.last_session, 0);
            let dead = w.peer_dead_time().unwrap_or(self.opts.timeout) * 3;
            std::thread::sleep(dead.min(Duration::from_secs(2)));
        }
    }
}

fn end_reason(r: &ExitReason) -> EndReason {
    match r {
        ExitReason::Reboot => EndReason::Reboot,
        _ => EndReason::PowerOff,
    }
}
