//! The decision tables: one row per situation, including every row that must NOT go live.

use super::*;

/// name, A-link, watch path, standby session, verdict, expected action.
type BackupRow = (
    &'static str,
    ALink,
    Watch,
    Option<SessionId>,
    Option<Verdict>,
    BackupAction,
);
/// name, A-link, watch path, last session, verdict, expected action.
type PrimaryRow = (
    &'static str,
    ALink,
    Watch,
    SessionId,
    Option<Verdict>,
    PrimaryAction,
);

const DEAD: Duration = Duration::from_millis(100);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn heard(silent: u64, state: PeerState, session: SessionId) -> Watch {
    Watch::On {
        silent_for: ms(silent),
        word: Some(PeerWord { state, session }),
    }
}

fn never_heard(silent: u64) -> Watch {
    Watch::On {
        silent_for: ms(silent),
        word: None,
    }
}

fn refused() -> Option<Verdict> {
    Some(Verdict::Refused("no".into()))
}

#[test]
fn backup_table() {
    use BackupAction::*;
    use PeerState::*;
    let granted = Some(Verdict::Granted);
    #[rustfmt::skip]
    let rows: Vec<BackupRow> = vec![
        ("protected, all fine", ALink::Ok, heard(5, PrimaryLive, 7), Some(7), None, KeepGoing),
        ("slow primary, watch alive: not a death", ALink::Silent(ms(500)), heard(5, PrimaryLive, 7), Some(7), None, KeepGoing),
        ("refused frame / broken link, watch alive", ALink::Down(ms(500)), heard(5, PrimaryLive, 7), Some(7), None, WaitReconnect),
        ("broken link, watch silent less than the dead time", ALink::Down(ms(500)), heard(60, PrimaryLive, 7), Some(7), None, WaitReconnect),
        ("A-link silent less than the dead time, watch silent", ALink::Silent(ms(60)), heard(500, PrimaryLive, 7), Some(7), None, KeepGoing),
        ("both silent: ask the arbiter first", ALink::Down(ms(150)), heard(150, PrimaryLive, 7), Some(7), None, AskArbiter),
        ("both silent, never heard on the watch", ALink::Down(ms(150)), never_heard(150), Some(7), None, AskArbiter),
        ("both silent, arbiter grants", ALink::Down(ms(150)), heard(150, PrimaryLive, 7), Some(7), granted.clone(), TakeOver),
        ("both silent, arbiter refuses", ALink::Down(ms(150)), heard(150, PrimaryLive, 7), Some(7), refused(), WaitReconnect),
        ("both silent, arbiter cannot tell", ALink::Down(ms(150)), heard(150, PrimaryLive, 7), Some(7), Some(Verdict::Unknown("?".into())), WaitReconnect),
        ("no watch path: never takes over", ALink::Down(ms(10_000)), Watch::Off, Some(7), granted.clone(), WaitReconnect),
        ("no watch path, silent link", ALink::Silent(ms(10_000)), Watch::Off, Some(7), granted.clone(), KeepGoing),
        ("no standby: nothing to resume", ALink::Down(ms(10_000)), never_heard(10_000), None, granted.clone(), WaitReconnect),
        ("no standby, syncing and slow", ALink::Silent(ms(500)), heard(5, PrimaryLive, 7), None, None, KeepGoing),
        ("primary moved to another session", ALink::Down(ms(500)), heard(5, PrimaryLive, 8), Some(7), None, DiscardStandby),
        ("primary is a new process (no session)", ALink::Down(ms(500)), heard(5, PrimaryLive, 0), Some(7), None, DiscardStandby),
        ("guest ended on the primary", ALink::Down(ms(500)), heard(5, Stopped, 7), Some(7), granted.clone(), Stop),
        ("guest ended, no standby", ALink::Down(ms(500)), heard(5, Stopped, 7), None, None, Stop),
        ("someone else is live", ALink::Down(ms(500)), heard(5, BackupLive, 7), Some(7), granted.clone(), DiscardStandby),
        ("stale word of a stopped primary does not count", ALink::Down(ms(150)), heard(150, Stopped, 7), Some(7), granted, TakeOver),
    ];
    for (name, alink, watch, standby, verdict, want) in rows {
        let got = backup(&BackupView {
            alink,
            watch,
            standby,
            dead: DEAD,
            verdict,
        });
        assert_eq!(got, want, "row {name:?}");
    }
}

#[test]
fn primary_table() {
    use PeerState::*;
    use PrimaryAction::*;
    let granted = Some(Verdict::Granted);
    let hold = HoldAndReconnect { ask_release: false };
    let ask = HoldAndReconnect { ask_release: true };
    #[rustfmt::skip]
    let rows: Vec<PrimaryRow> = vec![
        ("protected", ALink::Ok, heard(5, BackupStandby, 7), 7, None, KeepGoing),
        ("slow ack, backup alive", ALink::Silent(ms(300)), heard(5, BackupStandby, 7), 7, None, hold.clone()),
        ("link down briefly", ALink::Down(ms(300)), heard(5, BackupStandby, 7), 7, None, hold.clone()),
        ("link down long: ask the backup to release", ALink::Down(ms(1500)), heard(5, BackupStandby, 7), 7, None, ask.clone()),
        ("backup released our session: ask the arbiter", ALink::Down(ms(1500)), heard(5, Released, 7), 7, None, AskArbiter(ClaimKind::Degrade)),
        ("backup released, granted", ALink::Down(ms(1500)), heard(5, Released, 7), 7, granted.clone(), Degrade),
        ("backup released, refused", ALink::Down(ms(1500)), heard(5, Released, 7), 7, refused(), ask.clone()),
        ("backup released an OLDER session: not ours", ALink::Down(ms(1500)), heard(5, Released, 6), 7, granted.clone(), ask.clone()),
        ("backup ended (stopped) for our session", ALink::Down(ms(300)), heard(5, Stopped, 7), 7, None, AskArbiter(ClaimKind::Degrade)),
        ("backup silent on both beyond its dead time + margin", ALink::Down(ms(250)), heard(250, BackupStandby, 7), 7, None, AskArbiter(ClaimKind::Degrade)),
        ("backup silent on both, granted", ALink::Down(ms(250)), heard(250, BackupStandby, 7), 7, granted.clone(), Degrade),
        ("backup silent on the watch only", ALink::Down(ms(50)), heard(250, BackupStandby, 7), 7, granted.clone(), hold.clone()),
        ("backup silent on the A-link only", ALink::Silent(ms(5000)), heard(5, BackupStandby, 7), 7, granted.clone(), ask.clone()),
        ("no watch path: never degrades", ALink::Down(ms(60_000)), Watch::Off, 7, granted.clone(), hold.clone()),
        ("the backup is live: stop at once", ALink::Down(ms(300)), heard(5, BackupLive, 7), 7, None, Stop),
        ("the backup is live even with acks flowing", ALink::Ok, heard(5, BackupLive, 7), 7, None, Stop),
        ("another primary is live", ALink::Down(ms(300)), heard(5, PrimaryLive, 9), 7, None, Stop),
        ("never had a session: nothing held anywhere", ALink::Down(ms(300)), never_heard(300), 0, None, Degrade),
    ];
    for (name, alink, watch, session, verdict, want) in rows {
        let got = primary(&PrimaryView {
            alink,
            watch,
            session,
            release_after: ms(1000),
            peer_dead: ms(200),
            verdict,
        });
        assert_eq!(got, want, "row {name:?}");
    }
}

#[test]
fn no_row_goes_live_or_degrades_without_a_grant() {
    // Exhaustive over a grid of inputs: TakeOver and Degrade only ever follow Granted (or, for
    // a primary that never started a session, nothing held anywhere).
    let links = [
        ALink::Ok,
        ALink::Silent(ms(50)),
        ALink::Silent(ms(5000)),
        ALink::Down(ms(50)),
        ALink::Down(ms(5000)),
    ];
    let states = [
        PeerState::PrimaryLive,
        PeerState::BackupStandby,
        PeerState::BackupLive,
        PeerState::Released,
        PeerState::Stopped,
    ];
    let mut watches = vec![Watch::Off, never_heard(5), never_heard(5000)];
    for s in states {
        for silent in [5, 5000] {
            for session in [0, 7, 8] {
                watches.push(heard(silent, s, session));
            }
        }
    }
    let verdicts = [None, refused(), Some(Verdict::Unknown("?".into()))];
    for &alink in &links {
        for &watch in &watches {
            for verdict in &verdicts {
                for standby in [None, Some(7)] {
                    let a = backup(&BackupView {
                        alink,
                        watch,
                        standby,
                        dead: DEAD,
                        verdict: verdict.clone(),
                    });
                    assert_ne!(
                        a,
                        BackupAction::TakeOver,
                        "{alink:?} {watch:?} {standby:?} {verdict:?}"
                    );
                }
                for session in [7, 8] {
                    let a = primary(&PrimaryView {
                        alink,
                        watch,
                        session,
                        release_after: ms(1000),
                        peer_dead: ms(200),
                        verdict: verdict.clone(),
                    });
                    assert_ne!(
                        a,
                        PrimaryAction::Degrade,
                        "{alink:?} {watch:?} {session} {verdict:?}"
                    );
                }
            }
        }
    }
}
