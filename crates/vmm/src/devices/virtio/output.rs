//! Output commit for FT: the guest's transmitted frames can be held back per checkpoint epoch
//! and released only when the checkpoint covering them is acknowledged by the backup.

use std::fs::File;
use std::io::Write;
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use crate::devices::lock;

struct Gate {
    holding: bool,
    current: Vec<Vec<u8>>,
}

/// Most frames held at once (per interface) while no checkpoint takes them, e.g. while FT
/// reconnects: beyond this the oldest are dropped, as a congested link would; TCP recovers.
pub const MAX_HELD_FRAMES: usize = 4096;

/// The transmit side of a network device: straight to the tap, or held for output commit.
pub struct NetOutput {
    tap: Mutex<File>,
    gate: Mutex<Gate>,
    held: Condvar,
}

impl NetOutput {
    /// Output written to `tap` (a duplicate of the device's tap descriptor).
    pub fn new(tap: File) -> Self {
        Self {
            tap: Mutex::new(tap),
            gate: Mutex::new(Gate {
                holding: false,
                current: Vec::new(),
            }),
            held: Condvar::new(),
        }
    }

    /// Sends `frame` now, or holds it if output commit is on.
    pub fn transmit(&self, frame: &[u8]) {
        let mut g = lock(&self.gate);
        if g.holding {
            if g.current.len() >= MAX_HELD_FRAMES {
                g.current.remove(0);
            }
            g.current.push(frame.to_vec());
            self.held.notify_all();
        } else {
            drop(g);
            // A full tap drops the frame, as a NIC would; TCP retransmits.
            let _ = lock(&self.tap).write(frame);
        }
    }

    /// Starts holding output (FT protected).
    pub fn hold(&self) {
        lock(&self.gate).holding = true;
    }

    /// Stops holding: everything held so far is sent now (FT degraded or off).
    pub fn pass_through(&self) {
        let frames = {
            let mut g = lock(&self.gate);
            g.holding = false;
            std::mem::take(&mut g.current)
        };
        self.release(frames);
    }

    /// Whether frames are waiting for the next checkpoint.
    pub fn has_pending(&self) -> bool {
        !lock(&self.gate).current.is_empty()
    }

    /// Waits up to `timeout` for held frames; returns whether some are waiting.
    pub fn wait_pending(&self, timeout: Duration) -> bool {
        let g = lock(&self.gate);
        let (g, _) = self
            .held
            .wait_timeout_while(g, timeout, |g| g.current.is_empty())
            .unwrap_or_else(|p| p.into_inner());
        !g.current.is_empty()
    }

    /// Takes the frames of the epoch that ends now (call while the VM is paused).
    pub fn seal(&self) -> Vec<Vec<u8>> {
        std::mem::take(&mut lock(&self.gate).current)
    }

    /// Sends frames of an acknowledged epoch.
    pub fn release(&self, frames: Vec<Vec<u8>>) {
        let mut tap = lock(&self.tap);
        for f in frames {
            let _ = tap.write(&f);
        }
    }

    /// Writes a frame directly (e.g. a RARP announcement after failover).
    pub fn inject(&self, frame: &[u8]) {
        let _ = lock(&self.tap).write(frame);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::OwnedFd;
    use std::os::unix::net::UnixDatagram;
    use std::sync::Arc;

    /// An output whose "tap" is one end of a datagram socket pair (frame boundaries kept).
    fn output() -> (NetOutput, UnixDatagram) {
        let (a, b) = UnixDatagram::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        (NetOutput::new(File::from(OwnedFd::from(a))), b)
    }

    fn sent(peer: &UnixDatagram) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut buf = [0u8; 2048];
        while let Ok(n) = peer.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        out
    }

    #[test]
    fn passes_through_until_held() {
        let (out, peer) = output();
        out.transmit(b"one");
        out.transmit(b"two");
        assert_eq!(sent(&peer), vec![b"one".to_vec(), b"two".to_vec()]);
        assert!(!out.has_pending());
    }

    #[test]
    fn held_frames_leave_only_when_released() {
        let (out, peer) = output();
        out.hold();
        out.transmit(b"a");
        out.transmit(b"b");
        assert!(sent(&peer).is_empty(), "held output must not leave");
        assert!(out.has_pending());
        let epoch = out.seal();
        assert_eq!(epoch, vec![b"a".to_vec(), b"b".to_vec()]);
        assert!(!out.has_pending());
        out.transmit(b"c");
        assert!(sent(&peer).is_empty());
        out.release(epoch);
        assert_eq!(sent(&peer), vec![b"a".to_vec(), b"b".to_vec()]);
        // An injected frame (RARP after failover) bypasses holding.
        out.inject(b"rarp");
        assert_eq!(sent(&peer), vec![b"rarp".to_vec()]);
        // pass_through sends what the open epoch holds and stops holding.
        out.pass_through();
        out.transmit(b"d");
        assert_eq!(sent(&peer), vec![b"c".to_vec(), b"d".to_vec()]);
    }

    #[test]
    fn wait_pending_wakes_on_a_held_frame() {
        let (out, _peer) = output();
        let out = Arc::new(out);
        out.hold();
        assert!(!out.wait_pending(Duration::from_millis(10)));
        let o = out.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            o.transmit(b"x");
        });
        assert!(out.wait_pending(Duration::from_secs(10)));
        t.join().unwrap();
    }
}
