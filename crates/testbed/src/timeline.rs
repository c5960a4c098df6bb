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
//! **Period with two copies emitting.** Every run after the second one: its port had already
//! been left for the other one, so the copy on it was still (or again) emitting while the other
//! copy was live — `A… B… A…` is one such period (the old primary spoke after the backup took
//! over), `A… B… A… B…` two. [`two_live_copies`] counts them: `max(0, runs − 2)`.
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

/// Periods with two copies emitting (see the module docs): runs beyond the second.
pub fn two_live_copies(frames: &[Frame]) -> usize {
    runs(frames).len().saturating_sub(2)
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

/// A compact JSON description of the runs, for reports: `[["A", first_ms, last_ms, n], ...]`.
pub fn runs_json(frames: &[Frame]) -> Value {
    Value::Array(
        runs(frames)
            .iter()
            .map(|r| json!([format!("{:?}", r.port), ms(r.first), ms(r.last), r.frames]))
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
    fn interleaved_copies_count_every_return() {
        let f = tl(&[(0, A), (1, B), (2, A), (3, B), (4, A)]);
        assert_eq!(two_live_copies(&f), 3);
        // A brief second copy that stops again still counts.
        let f = tl(&[(0, A), (100, B), (200, A), (300, A)]);
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
    fn runs_json_lists_port_times_and_counts() {
        let f = tl(&[(0, A), (10, A), (150, B)]);
        assert_eq!(
            runs_json(&f),
            json!([["A", 0.0, 10.0, 2], ["B", 150.0, 150.0, 1]])
        );
    }
}
