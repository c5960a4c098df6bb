//! The A-link wire format: versioned, length-prefixed frames with a CRC32 and an HMAC-SHA256
//! tag under a per-session key.
//!
//! ```text
//! header (28 bytes): "FTRP" | version u16 | kind u8 | flags u8 | seq u64 | len u32
//!                    | payload crc32 u32 | header crc32 u32 (over the 24 bytes before it)
//! payload (len bytes)
//! tag (32 bytes): HMAC-SHA256(session key, header || payload)
//! ```
//! The session key is HMAC(cluster secret, "ftvm-session" || backup nonce || primary nonce), so a
//! frame from another session never verifies, and `seq` must grow by one per frame in each
//! direction, so a replayed or dropped frame is refused. A frame is returned only when all of it
//! arrived and verified; nothing of a bad frame is ever used.

use std::io::{self, Read, Write};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

const MAGIC: &[u8; 4] = b"FTRP";
/// Wire format version.
pub const VERSION: u16 = 1;
const HEADER_LEN: usize = 28;
const TAG_LEN: usize = 32;
/// Largest payload accepted (a checkpoint of 1 GiB of dirty memory is far beyond any epoch).
pub const MAX_PAYLOAD: usize = 1 << 30;

type HmacSha256 = Hmac<Sha256>;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Backup → primary: the backup's nonce (unauthenticated; it only seeds the session key).
    Challenge = 1,
    /// Primary → backup: the primary's nonce and the VM description.
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
            1 => Kind::Challenge,
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
    /// Wrong magic or version.
    #[error("A-link frame refused: {0}")]
    Format(String),
    /// Checksum or authentication failure.
    #[error("A-link frame refused: {0}")]
    Integrity(String),
}

/// One verified frame.
#[derive(Debug)]
pub struct Frame {
    /// Its kind.
    pub kind: Kind,
    /// Its sequence number.
    pub seq: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Derives the session key from the cluster secret and both nonces.
pub fn session_key(secret: &[u8], backup_nonce: &[u8; 16], primary_nonce: &[u8; 16]) -> [u8; 32] {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"ftvm-session");
    mac.update(backup_nonce);
    mac.update(primary_nonce);
    mac.finalize().into_bytes().into()
}

/// A random 16-byte nonce.
pub fn nonce() -> io::Result<[u8; 16]> {
    let mut n = [0u8; 16];
    getrandom::fill(&mut n).map_err(|e| io::Error::other(format!("no randomness: {e}")))?;
    Ok(n)
}

/// Frame encoder/decoder state of one direction.
pub struct Channel {
    key: Option<[u8; 32]>,
    next_seq: u64,
}

impl Channel {
    /// A channel without a key yet (only Challenge frames until `set_key`).
    pub fn new() -> Self {
        Self {
            key: None,
            next_seq: 0,
        }
    }

    /// Sets the session key; sequence numbers restart at 1.
    pub fn set_key(&mut self, key: [u8; 32]) {
        self.key = Some(key);
        self.next_seq = 1;
    }

    fn tag(&self, header: &[u8], payload: &[u8]) -> [u8; 32] {
        match &self.key {
            Some(k) => {
                let mut mac = <HmacSha256 as KeyInit>::new_from_slice(k)
                    .expect("HMAC takes keys of any length");
                mac.update(header);
                mac.update(payload);
                mac.finalize().into_bytes().into()
            }
            None => [0u8; 32],
        }
    }

    /// Encodes a frame (header, payload, tag) ready to write.
    pub fn encode(&mut self, kind: Kind, payload: &[u8]) -> Vec<u8> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len() + TAG_LEN);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.push(kind as u8);
        out.push(0);
        out.extend_from_slice(&seq.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
        let header_crc = crc32fast::hash(&out);
        out.extend_from_slice(&header_crc.to_le_bytes());
        let tag = self.tag(&out, payload);
        out.extend_from_slice(payload);
        out.extend_from_slice(&tag);
        out
    }

    /// Writes a frame.
    pub fn send(
        &mut self,
        w: &mut impl Write,
        kind: Kind,
        payload: &[u8],
    ) -> Result<(), WireError> {
        let bytes = self.encode(kind, payload);
        w.write_all(&bytes)?;
        w.flush()?;
        Ok(())
    }

    /// Reads and verifies one frame.
    pub fn recv(&mut self, r: &mut impl Read) -> Result<Frame, WireError> {
        let mut header = [0u8; HEADER_LEN];
        r.read_exact(&mut header)?;
        // A damaged header (a wrong length above all) is refused before anything else is read.
        if crc32fast::hash(&header[..24])
            != u32::from_le_bytes(header[24..28].try_into().unwrap_or_default())
        {
            return Err(WireError::Integrity("header checksum mismatch".into()));
        }
        if &header[0..4] != MAGIC {
            return Err(WireError::Format("bad magic".into()));
        }
        let version = u16::from_le_bytes([header[4], header[5]]);
        if version != VERSION {
            return Err(WireError::Format(format!(
                "peer speaks version {version}, we speak {VERSION}"
            )));
        }
        let kind = Kind::from_u8(header[6])
            .ok_or_else(|| WireError::Format(format!("unknown kind {}", header[6])))?;
        let seq = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
        let len = u32::from_le_bytes(header[16..20].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(header[20..24].try_into().unwrap_or_default());
        if len > MAX_PAYLOAD {
            return Err(WireError::Format(format!("impossible length {len}")));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        let mut tag = [0u8; TAG_LEN];
        r.read_exact(&mut tag)?;
        if crc32fast::hash(&payload) != crc {
            return Err(WireError::Integrity("checksum mismatch".into()));
        }
        if let Some(k) = &self.key {
            let mut mac =
                <HmacSha256 as KeyInit>::new_from_slice(k).expect("HMAC takes keys of any length");
            mac.update(&header);
            mac.update(&payload);
            mac.verify_slice(&tag).map_err(|_| {
                WireError::Integrity(
                    "authentication failed (wrong cluster secret or tampered frame)".into(),
                )
            })?;
            if seq != self.next_seq {
                return Err(WireError::Integrity(format!(
                    "sequence {seq} where {} was due (replayed or lost frame)",
                    self.next_seq
                )));
            }
            self.next_seq += 1;
        } else if kind != Kind::Challenge && kind != Kind::Hello {
            return Err(WireError::Integrity(format!(
                "{kind:?} before the session was established"
            )));
        }
        Ok(Frame { kind, seq, payload })
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

    fn pair() -> (Channel, Channel) {
        let key = session_key(b"secret", &[1; 16], &[2; 16]);
        let (mut a, mut b) = (Channel::new(), Channel::new());
        a.set_key(key);
        b.set_key(key);
        (a, b)
    }

    #[test]
    fn round_trip() {
        let (mut tx, mut rx) = pair();
        let bytes = tx.encode(Kind::Checkpoint, b"hello");
        let f = rx.recv(&mut &bytes[..]).unwrap();
        assert_eq!(
            (f.kind, f.seq, &f.payload[..]),
            (Kind::Checkpoint, 1, &b"hello"[..])
        );
    }

    #[test]
    fn every_corrupted_byte_is_refused() {
        let (mut tx, _) = pair();
        let bytes = tx.encode(Kind::Checkpoint, b"some checkpoint payload");
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
        let bytes = tx.encode(Kind::Ack, b"1");
        assert!(rx.recv(&mut &bytes[..bytes.len() - 1]).is_err());
        let (_, mut rx) = pair();
        rx.recv(&mut &bytes[..]).unwrap();
        assert!(rx.recv(&mut &bytes[..]).is_err(), "replay accepted");
        let mut other = Channel::new();
        other.set_key(session_key(b"other secret", &[1; 16], &[2; 16]));
        let foreign = other.encode(Kind::Ack, b"1");
        let (_, mut rx) = pair();
        assert!(matches!(
            rx.recv(&mut &foreign[..]),
            Err(WireError::Integrity(_))
        ));
    }
}
