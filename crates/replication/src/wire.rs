//! The A-link wire format: FT frames on the authenticated, encrypted channel of crate `link`.
//!
//! [`handshake`] derives a key per direction from the cluster secret and both sides' nonces
//! (HKDF) and confirms them (a peer with another secret is refused at once). Every frame is then
//! ChaCha20-Poly1305-sealed with its direction's frame counter as nonce, its clear header (kind,
//! length) authenticated and bounded before the payload is read, so a tampered, replayed,
//! dropped, reordered or reflected frame is refused and an unauthenticated peer makes the node
//! allocate nothing. A frame is returned only when all of it arrived and verified.

use std::io::{self, Read, Write};

pub use link::Role;
use link::{Direction, LinkError, Secret};

/// Wire format version (of the frames, see `link::VERSION`).
pub const VERSION: u16 = 2;
/// Largest payload accepted (a checkpoint of 1 GiB of dirty memory is far beyond any epoch).
pub const MAX_PAYLOAD: usize = 1 << 30;
/// The channel's service name (keys of the A-link never open mirror frames and back).
const SERVICE: &str = "a-link";

/// Bytes each side's handshake hello takes before its first frame (a proxy skips them).
pub const HELLO_LEN: usize = link::HELLO_LEN;

/// A frame's total length on the wire from its first `link::HEADER_LEN` (16) bytes, or `None`
/// when that is not a frame header (for proxies that drop exactly one frame; unauthenticated).
/// Each direction starts with a [`HELLO_LEN`]-byte hello, then frames (the first one is the
/// handshake's key confirmation).
pub fn frame_len(header: &[u8]) -> Option<usize> {
    link::frame_len(header)
}

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Unused since wire version 2 (the key exchange is [`handshake`]); refused on receipt.
    Challenge = 1,
    /// Primary → backup: the VM description.
    Hello = 2,
    /// Backup → primary: standby VM ready.
    Ready = 3,
    /// Primary → backup: memory pages of the initial (pre-copy) sync.
    Pages = 4,
    /// Primary → backup: one complete checkpoint.
    Checkpoint = 5,
    /// Backup → primary: checkpoint committed.
    Ack = 6,
    /// Primary → backup: still alive, nothing else to send.
    Heartbeat = 7,
    /// Either side: orderly end of protection.
    Bye = 8,
    /// Primary → backup: a chunk of a disk during the initial sync.
    Disk = 9,
    /// Primary → backup: the guest ended (power-off or reboot); the backup commits it.
    End = 10,
    /// Backup → primary: this node is no backup any more (its standby is poisoned), and why.
    NoBackup = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            2 => Kind::Hello,
            3 => Kind::Ready,
            4 => Kind::Pages,
            5 => Kind::Checkpoint,
            6 => Kind::Ack,
            7 => Kind::Heartbeat,
            8 => Kind::Bye,
            9 => Kind::Disk,
            10 => Kind::End,
            11 => Kind::NoBackup,
            _ => return None,
        })
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The connection failed or closed.
    #[error("A-link: {0}")]
    Io(#[from] io::Error),
    /// Wrong magic, version or kind, or a bad secret.
    #[error("A-link frame refused: {0}")]
    Format(String),
    /// Authentication failure (or a peer with another cluster secret).
    #[error("A-link frame refused: {0}")]
    Integrity(String),
}

impl From<LinkError> for WireError {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Io(e) => WireError::Io(e),
            LinkError::Format(_) | LinkError::Secret(_) | LinkError::TooLarge { .. } => {
                WireError::Format(e.to_string())
            }
            LinkError::Auth(_) | LinkError::WrongSecret => WireError::Integrity(e.to_string()),
        }
    }
}

/// One verified frame.
#[derive(Debug)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Its sequence number in its direction (1 is the first after the handshake).
    pub seq: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Establishes the A-link session with the cluster `secret` (the primary is
/// [`Role::Initiator`], the backup [`Role::Responder`]); returns the (send, receive) channels.
/// Set the stream's read timeout first.
pub fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    secret: &[u8],
    role: Role,
) -> Result<(Channel, Channel), WireError> {
    let (tx, rx, _) = handshake_session(r, w, secret, role)?;
    Ok((tx, rx))
}

/// Like [`handshake`], also returning the session's id: the same on both nodes, fresh per
/// handshake, never 0.
pub fn handshake_session<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    secret: &[u8],
    role: Role,
) -> Result<(Channel, Channel, u64), WireError> {
    let secret = Secret::new(secret)?;
    let s = link::handshake(r, w, &secret, role, SERVICE, MAX_PAYLOAD)?;
    let mut b = [0u8; 8];
    b.copy_from_slice(&s.id[..8]);
    let id = u64::from_le_bytes(b).max(1);
    Ok((Channel { dir: Some(s.tx) }, Channel { dir: Some(s.rx) }, id))
}

/// Frame encoder/decoder state of one direction.
pub struct Channel {
    dir: Option<Direction>,
}

fn no_session() -> WireError {
    WireError::Integrity("no A-link session established yet (handshake first)".into())
}

impl Channel {
    /// A channel without a key yet: it sends and accepts nothing until [`handshake`] or
    /// `set_key`.
    pub fn new() -> Self {
        Self { dir: None }
    }

    /// Keys the channel directly (tests; sessions come from [`handshake`]); counter at 0.
    pub fn set_key(&mut self, key: [u8; 32]) {
        self.dir = Some(Direction::new(key, MAX_PAYLOAD));
    }

    /// Seals a frame ready to write.
    pub fn encode(&mut self, kind: Kind, payload: &[u8]) -> Result<Vec<u8>, WireError> {
        let d = self.dir.as_mut().ok_or_else(no_session)?;
        Ok(d.seal(kind as u8, &[payload])?)
    }

    /// Writes a frame.
    pub fn send(
        &mut self,
        w: &mut impl Write,
        kind: Kind,
        payload: &[u8],
    ) -> Result<(), WireError> {
        let d = self.dir.as_mut().ok_or_else(no_session)?;
        Ok(d.send(w, kind as u8, payload)?)
    }

    /// Reads and verifies one frame.
    pub fn recv(&mut self, r: &mut impl Read) -> Result<Frame, WireError> {
        let d = self.dir.as_mut().ok_or_else(no_session)?;
        let f = d.recv(r)?;
        let kind = Kind::from_u8(f.kind)
            .ok_or_else(|| WireError::Format(format!("unknown frame kind {}", f.kind)))?;
        Ok(Frame {
            kind,
            seq: f.counter,
            payload: f.payload,
        })
    }
}

impl Default for Channel {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn pair() -> (Channel, Channel) {
        let (mut a, mut b) = (Channel::new(), Channel::new());
        a.set_key([9; 32]);
        b.set_key([9; 32]);
        (a, b)
    }

    type Handshaken = Result<(Channel, Channel), WireError>;

    /// A real primary/backup handshake over loopback TCP.
    fn sessions(primary: &'static [u8], backup: &'static [u8]) -> (Handshaken, Handshaken) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            handshake(&mut &s, &mut &s, backup, Role::Responder)
        });
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let p = handshake(&mut &s, &mut &s, primary, Role::Initiator);
        (p, t.join().unwrap())
    }

    #[test]
    fn round_trip() {
        let (mut tx, mut rx) = pair();
        let bytes = tx.encode(Kind::Checkpoint, b"hello").unwrap();
        assert_eq!(frame_len(&bytes), Some(bytes.len()));
        let f = rx.recv(&mut &bytes[..]).unwrap();
        assert_eq!(
            (f.kind, f.seq, &f.payload[..]),
            (Kind::Checkpoint, 0, &b"hello"[..])
        );
    }

    #[test]
    fn every_corrupted_byte_is_refused() {
        let (mut tx, _) = pair();
        let bytes = tx
            .encode(Kind::Checkpoint, b"some checkpoint payload")
            .unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            let (_, mut rx) = pair();
            assert!(
                rx.recv(&mut &bad[..]).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn truncated_replayed_and_foreign_frames_are_refused() {
        let (mut tx, mut rx) = pair();
        let bytes = tx.encode(Kind::Ack, b"1").unwrap();
        assert!(rx.recv(&mut &bytes[..bytes.len() - 1]).is_err());
        let (_, mut rx) = pair();
        rx.recv(&mut &bytes[..]).unwrap();
        assert!(rx.recv(&mut &bytes[..]).is_err(), "replay accepted");
        let mut other = Channel::new();
        other.set_key([10; 32]);
        let foreign = other.encode(Kind::Ack, b"1").unwrap();
        let (_, mut rx) = pair();
        assert!(matches!(
            rx.recv(&mut &foreign[..]),
            Err(WireError::Integrity(_))
        ));
        assert!(
            Channel::new().recv(&mut &bytes[..]).is_err(),
            "keyless accepted"
        );
    }

    #[test]
    fn session_carries_frames_and_refuses_reflection() {
        let (p, b) = sessions(b"0123456789abcdef", b"0123456789abcdef");
        let ((mut ptx, mut prx), (mut btx, mut brx)) = (p.unwrap(), b.unwrap());
        let hello = ptx.encode(Kind::Hello, b"vm").unwrap();
        assert_eq!(brx.recv(&mut &hello[..]).unwrap().seq, 1);
        let ready = btx.encode(Kind::Ready, b"").unwrap();
        // The backup's own frame, reflected back to it, does not open under the other key.
        let mut brx2 = brx;
        assert!(
            brx2.recv(&mut &ready[..]).is_err(),
            "reflected frame accepted"
        );
        assert_eq!(prx.recv(&mut &ready[..]).unwrap().kind, Kind::Ready);
    }

    #[test]
    fn wrong_secret_refused_at_handshake() {
        let (p, b) = sessions(b"0123456789abcdef", b"another secret!!");
        for r in [p, b] {
            let e = r.err().expect("wrong secret accepted").to_string();
            assert!(e.contains("cluster secret differs"), "{e}");
        }
    }

    #[test]
    fn forged_huge_frame_is_refused_before_its_payload() {
        let mut forged = [0u8; 32];
        forged[0..4].copy_from_slice(b"FTLK");
        forged[4] = link::VERSION;
        forged[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
        // Exactly header + header tag: reading any payload would hit end of input (an Io error).
        let (_, mut rx) = pair();
        assert!(matches!(
            rx.recv(&mut &forged[..]),
            Err(WireError::Integrity(_))
        ));
    }
}
