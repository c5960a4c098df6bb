//! What a LAN capture of the guest's frames says about how many copies of the guest ran.
//!
//! The input is every frame with the guest's source MAC that entered the client's bridge, with
//! the port it came through: [`Port::A`] (`to-a`, sent by a copy on node A) or [`Port::B`]
//! (`to-b`, a copy on node B), sorted by time.
//!
//! **Runs.** A *run* is a maximal sequence of consecutive frames (in time order) on the same
//! port. The live copy is the one whose port carries the current run.
//!
//! **Hand-over.** A run that follows a run on the other port is a hand-over of the guest to the
//! other node. A scenario of the fault matrix has at most one legitimate hand-over (a failover):
//! the timeline is `A…` (no failover) or `A… B…` (one failover).
//!
//! **Return.** Every run after the second one: its port had already been left for the other
//! one, so the copy on it was still (or again) emitting while the other copy was live —
//! `A… B… A…` has one return (the old primary spoke after the backup took over).
//!
//! **Period with two copies emitting.** A maximal sequence of returns in which each return
//! starts at most [`PERIOD_GAP`] after the previous one ended. Two copies answering the same
//! probes interleave their frames (`A B A B A …`): that is one period however many returns it
//! has; a second copy that falls silent and speaks again more than [`PERIOD_GAP`] later makes
//! a second period. [`two_live_copies`] counts the periods, [`two_live_periods`] lists them.
//!
//! **Resurrection.** After the guest powered off (the primary's monitor exited), any frame from
//! the guest's MAC shows a copy alive again; [`resurrected_ports`] lists the ports that carried
//! one.

use std::time::Duration;

use serde_json::{json, Value};

/// A client bridge port, named by the node behind it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Port {
    /// `to-a`: node A's uplink.
    A,
    /// `to-b`: node B's uplink.
    B,
}

impl Port {
    /// The other port.
    pub fn other(self) -> Port {
        match self {
            Port::A => Port::B,
            Port::B => Port::A,
        }
    }
}

/// One captured guest frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Arrival time since the capture started.
    pub t: Duration,
    /// The port it entered through.
    pub port: Port,
    /// Length in bytes (Ethernet header included).
    pub len: usize,
    /// Ethertype (0x0800 IPv4, 0x0806 ARP, 0x8035 RARP).
    pub ethertype: u16,
}

/// A maximal sequence of consecutive frames on one port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    /// The port.
    pub port: Port,
    /// Time of its first frame.
    pub first: Duration,
    /// Time of its last frame.
    pub last: Duration,
    /// Number of frames.
    pub frames: usize,
}

/// The runs of `frames` (which must be sorted by time).
pub fn runs(frames: &[Frame]) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for f in frames {
        match out.last_mut() {
            Some(r) if r.port == f.port => {
                r.last = f.t;
                r.frames += 1;
            }
            _ => out.push(Run {
                port: f.port,
                first: f.t,
                last: f.t,
                frames: 1,
            }),
        }
    }
    out
}

/// Returns further apart than this start a new period with two copies emitting.
pub const PERIOD_GAP: Duration = Duration::from_secs(1);

/// A period with two copies emitting (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period {
    /// First frame of its first return.
    pub first: Duration,
    /// Last frame of its last return.
    pub last: Duration,
    /// Returns (runs back on a port already left) in it.
    pub returns: usize,
}

/// The periods with two copies emitting in `frames` (sorted by time).
pub fn two_live_periods(frames: &[Frame]) -> Vec<Period> {
    let mut out: Vec<Period> = Vec::new();
    for r in runs(frames).iter().skip(2) {
        match out.last_mut() {
            Some(p) if r.first.saturating_sub(p.last) <= PERIOD_GAP => {
                p.last = r.last;
                p.returns += 1;
            }
            _ => out.push(Period {
                first: r.first,
                last: r.last,
                returns: 1,
            }),
        }
    }
    out
}

/// Number of periods with two copies emitting (see the module docs).
pub fn two_live_copies(frames: &[Frame]) -> usize {
    two_live_periods(frames).len()
}

/// The first hand-over: the time of the first frame on the port other than the first frame's.
pub fn first_handover(frames: &[Frame]) -> Option<(Port, Duration)> {
    let first = frames.first()?;
    frames
        .iter()
        .find(|f| f.port != first.port)
        .map(|f| (f.port, f.t))
}

/// The ports that carried a guest frame strictly after `off` (the power-off).
pub fn resurrected_ports(frames: &[Frame], off: Duration) -> Vec<Port> {
    let mut ports: Vec<Port> = frames
        .iter()
        .filter(|f| f.t > off)
        .map(|f| f.port)
        .collect();
    ports.sort();
    ports.dedup();
    ports
}

/// The port of the last frame (the copy live at the end), if any.
pub fn live_port(frames: &[Frame]) -> Option<Port> {
    frames.last().map(|f| f.port)
}

/// Runs shown by [`runs_json`].
pub const RUNS_SHOWN: usize = 12;

/// A compact JSON description of the runs, for reports: `[["A", first_ms, last_ms, n], ...]`,
/// the first [`RUNS_SHOWN`] of them, then `["more", count]` if there are more.
pub fn runs_json(frames: &[Frame]) -> Value {
    let all = runs(frames);
    let mut v: Vec<Value> = all
        .iter()
        .take(RUNS_SHOWN)
        .map(|r| json!([format!("{:?}", r.port), ms(r.first), ms(r.last), r.frames]))
        .collect();
    if all.len() > RUNS_SHOWN {
        v.push(json!(["more", all.len() - RUNS_SHOWN]));
    }
    Value::Array(v)
}

/// The periods with two copies emitting as JSON: `[[first_ms, last_ms, returns], ...]`.
pub fn periods_json(frames: &[Frame]) -> Value {
    Value::Array(
        two_live_periods(frames)
            .iter()
            .map(|p| json!([ms(p.first), ms(p.last), p.returns]))
            .collect(),
    )
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e4).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tl(spec: &[(u64, Port)]) -> Vec<Frame> {
        spec.iter()
            .map(|&(ms, port)| Frame {
                t: Duration::from_millis(ms),
                port,
                len: 60,
                ethertype: 0x0806,
            })
            .collect()
    }

    use Port::{A, B};

    #[test]
    fn one_copy_all_along_is_no_period() {
        let f = tl(&[(0, A), (10, A), (20, A)]);
        assert_eq!(runs(&f).len(), 1);
        assert_eq!(two_live_copies(&f), 0);
        assert_eq!(first_handover(&f), None);
        assert_eq!(live_port(&f), Some(A));
    }

    #[test]
    fn a_clean_failover_is_no_period() {
        let f = tl(&[(0, A), (10, A), (150, B), (160, B)]);
        assert_eq!(two_live_copies(&f), 0);
        assert_eq!(first_handover(&f), Some((B, Duration::from_millis(150))));
        assert_eq!(live_port(&f), Some(B));
    }

    #[test]
    fn the_old_primary_speaking_after_the_takeover_is_one_period() {
        let f = tl(&[(0, A), (150, B), (160, B), (5000, A), (5001, A)]);
        assert_eq!(two_live_copies(&f), 1);
        let r = runs(&f);
        assert_eq!(r[2].port, A);
        assert_eq!(r[2].first, Duration::from_millis(5000));
        assert_eq!(r[2].frames, 2);
    }

    #[test]
    fn interleaved_copies_are_one_period_however_long() {
        let f = tl(&[(0, A), (1, B), (2, A), (3, B), (4, A), (900, B), (1800, A)]);
        assert_eq!(
            two_live_periods(&f),
            vec![Period {
                first: Duration::from_millis(2),
                last: Duration::from_millis(1800),
                returns: 5
            }]
        );
        assert_eq!(two_live_copies(&f), 1);
        // A brief second copy that stops again still counts.
        let f = tl(&[(0, A), (100, B), (200, A), (300, A)]);
        assert_eq!(two_live_copies(&f), 1);
    }

    #[test]
    fn a_second_copy_speaking_again_later_is_a_new_period() {
        // Returns at 200, 300, 400 and 450 ms (one period), then one at 2500 ms, 2 s later.
        let f = tl(&[
            (0, A),
            (100, B),
            (200, A),
            (300, B),
            (400, A),
            (450, B),
            (2500, A),
        ]);
        let p = two_live_periods(&f);
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p[0].returns, 4);
        assert_eq!(p[1].first, Duration::from_millis(2500));
        // Exactly PERIOD_GAP apart still belongs to the same period.
        let f = tl(&[(0, A), (100, B), (200, A), (1200, B)]);
        assert_eq!(two_live_copies(&f), 1);
    }

    #[test]
    fn a_timeline_starting_on_b_is_judged_the_same() {
        let f = tl(&[(0, B), (10, A), (20, B)]);
        assert_eq!(two_live_copies(&f), 1);
        assert_eq!(first_handover(&f), Some((A, Duration::from_millis(10))));
    }

    #[test]
    fn empty_timelines_have_nothing() {
        assert_eq!(two_live_copies(&[]), 0);
        assert_eq!(live_port(&[]), None);
        assert!(resurrected_ports(&[], Duration::ZERO).is_empty());
    }

    #[test]
    fn resurrections_are_frames_after_the_power_off() {
        let f = tl(&[(0, A), (90, A), (300, B), (310, B)]);
        assert!(resurrected_ports(&f, Duration::from_millis(400)).is_empty());
        assert_eq!(resurrected_ports(&f, Duration::from_millis(100)), vec![B]);
        assert_eq!(resurrected_ports(&f, Duration::from_millis(50)), vec![A, B]);
        // A frame exactly at the power-off instant is not after it.
        assert!(resurrected_ports(&f, Duration::from_millis(310)).is_empty());
    }

    #[test]
    fn runs_json_shows_the_first_runs_and_counts_the_rest() {
        let spec: Vec<(u64, Port)> = (0..20)
            .map(|i| (i * 10, if i % 2 == 0 { A } else { B }))
            .collect();
        let v = runs_json(&tl(&spec));
        let a = v.as_array().unwrap();
        assert_eq!(a.len(), RUNS_SHOWN + 1);
        assert_eq!(a[RUNS_SHOWN], json!(["more", 20 - RUNS_SHOWN]));
        assert_eq!(periods_json(&tl(&spec)), json!([[20.0, 190.0, 18]]));
    }

    #[test]
    fn runs_json_lists_port_times_and_counts() {
        let f = tl(&[(0, A), (10, A), (150, B)]);
        assert_eq!(
            runs_json(&f),
            json!([["A", 0.0, 10.0, 2], ["B", 150.0, 150.0, 1]])
        );
    }
}
