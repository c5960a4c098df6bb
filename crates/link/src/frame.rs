//! Sealing and opening frames of one direction (see the crate docs for the format).

use std::io::{Read, Write};

use chacha20poly1305::aead::AeadInOut;
use chacha20poly1305::{ChaCha20Poly1305, Key, KeyInit, Nonce, Tag};

use crate::LinkError;

const MAGIC: &[u8; 4] = b"FTLK";
/// Frame format version.
pub const VERSION: u8 = 1;
/// Clear header length.
pub const HEADER_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Bytes a frame adds to its payload on the wire (header, header tag, payload tag).
pub const FRAME_OVERHEAD: usize = HEADER_LEN + 2 * TAG_LEN;

/// A frame's total length on the wire from (at least) its first [`HEADER_LEN`] bytes, or `None`
/// when they are too few or not a frame header. Unauthenticated: for proxies and tests only.
pub fn frame_len(header: &[u8]) -> Option<usize> {
    let h = header.get(..HEADER_LEN)?;
    if &h[0..4] != MAGIC || h[4] != VERSION {
        return None;
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
    Some(FRAME_OVERHEAD + len)
}

/// One verified frame.
#[derive(Debug)]
pub struct Received {
    /// The sender's kind byte.
    pub kind: u8,
    /// Its position in the direction (0 is the handshake's key confirmation).
    pub counter: u64,
    /// Its decrypted payload.
    pub payload: Vec<u8>,
}

/// The state of one direction of a channel: its key and frame counter. Use one `Direction` for
/// sending or for receiving, never both.
pub struct Direction {
    aead: ChaCha20Poly1305,
    counter: u64,
    max_payload: usize,
    broken: bool,
    /// Reused sealing buffer (a fresh multi-MiB buffer per frame costs page faults).
    scratch: Vec<u8>,
}

/// Largest sealing buffer kept between frames.
const KEEP_SCRATCH: usize = 32 << 20;

fn nonce(counter: u64, part: u8) -> Nonce {
    let mut n = [0u8; 12];
    n[..8].copy_from_slice(&counter.to_le_bytes());
    n[8] = part;
    Nonce::from(n)
}

fn header(kind: u8, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = kind;
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

fn auth_failed() -> LinkError {
    LinkError::Auth(
        "frame failed authentication (tampered with, replayed, reordered, reflected or from \
         another session): the connection is dropped"
            .into(),
    )
}

impl Direction {
    /// A direction keyed with `key`, its counter at 0, accepting payloads up to `max_payload`.
    pub fn new(key: [u8; 32], max_payload: usize) -> Direction {
        Direction {
            aead: ChaCha20Poly1305::new(&Key::from(key)),
            counter: 0,
            max_payload: max_payload.min(u32::MAX as usize),
            broken: false,
            scratch: Vec::new(),
        }
    }

    /// The counter of the next frame.
    pub fn counter(&self) -> u64 {
        self.counter
    }

    /// The largest payload this direction sends or accepts.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    fn next(&mut self) -> Result<u64, LinkError> {
        if self.broken {
            return Err(LinkError::Auth(
                "the channel refused a frame earlier and is unusable: reconnect".into(),
            ));
        }
        if self.counter == u64::MAX {
            return Err(LinkError::Auth("frame counter exhausted: reconnect".into()));
        }
        Ok(self.counter)
    }

    /// Seals a frame whose payload is the concatenation of `parts`; returns its wire bytes.
    pub fn seal(&mut self, kind: u8, parts: &[&[u8]]) -> Result<Vec<u8>, LinkError> {
        let mut out = Vec::new();
        self.seal_into(kind, parts, &mut out)?;
        Ok(out)
    }

    /// Seals a frame into `out` (cleared first).
    #[inline(never)]
    fn seal_into(&mut self, kind: u8, parts: &[&[u8]], out: &mut Vec<u8>) -> Result<(), LinkError> {
        out.clear();
        let len: usize = parts.iter().map(|p| p.len()).sum();
        if len > self.max_payload {
            return Err(LinkError::TooLarge {
                len,
                max: self.max_payload,
            });
        }
        let counter = self.next()?;
        let h = header(kind, len);
        out.reserve(FRAME_OVERHEAD + len);
        out.extend_from_slice(&h);
        let htag = self
            .aead
            .encrypt_inout_detached(&nonce(counter, 0), &h, (&mut [][..]).into())
            .map_err(|_| LinkError::Auth("cannot seal the frame header".into()))?;
        out.extend_from_slice(&htag);
        for p in parts {
            out.extend_from_slice(p);
        }
        let body = &mut out[HEADER_LEN + TAG_LEN..];
        let tag = self
            .aead
            .encrypt_inout_detached(&nonce(counter, 1), &h, body.into())
            .map_err(|_| LinkError::Auth("cannot seal the frame".into()))?;
        out.extend_from_slice(&tag);
        self.counter += 1;
        Ok(())
    }

    /// Seals and writes one frame (then flushes `w`).
    pub fn send(&mut self, w: &mut impl Write, kind: u8, payload: &[u8]) -> Result<(), LinkError> {
        self.send_parts(w, kind, &[payload])
    }

    /// Seals and writes one frame made of `parts` (then flushes `w`).
    pub fn send_parts(
        &mut self,
        w: &mut impl Write,
        kind: u8,
        parts: &[&[u8]],
    ) -> Result<(), LinkError> {
        let mut buf = std::mem::take(&mut self.scratch);
        let sealed = self.seal_into(kind, parts, &mut buf);
        let written = sealed.and_then(|()| {
            w.write_all(&buf)?;
            w.flush()?;
            Ok(())
        });
        if buf.capacity() <= KEEP_SCRATCH {
            self.scratch = buf;
        }
        written
    }

    /// Reads, authenticates and decrypts one frame. The header and its length are
    /// authenticated and bounded before the payload is allocated or read.
    pub fn recv(&mut self, r: &mut impl Read) -> Result<Received, LinkError> {
        let counter = self.next()?;
        let mut head = [0u8; HEADER_LEN + TAG_LEN];
        r.read_exact(&mut head)?;
        let len = self.check(self.open_header(counter, &head))?;
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        let mut tag = [0u8; TAG_LEN];
        r.read_exact(&mut tag)?;
        self.check(self.open_payload(counter, &head, &mut payload, &tag))?;
        self.counter += 1;
        Ok(Received {
            kind: head[5],
            counter,
            payload,
        })
    }

    /// Marks the direction unusable after a refused frame.
    fn check<T>(&mut self, r: Result<T, LinkError>) -> Result<T, LinkError> {
        if matches!(r, Err(LinkError::Auth(_) | LinkError::Format(_))) {
            self.broken = true;
        }
        r
    }

    // The cipher work stays out of the generic `recv` so that it is compiled (optimised) here,
    // not in each caller.
    #[inline(never)]
    fn open_header(
        &self,
        counter: u64,
        head: &[u8; HEADER_LEN + TAG_LEN],
    ) -> Result<usize, LinkError> {
        let (h, htag) = head.split_at(HEADER_LEN);
        if &h[0..4] != MAGIC {
            return Err(LinkError::Format(
                "the peer sent something that is not an ftvm link frame (bad magic)".into(),
            ));
        }
        if h[4] != VERSION {
            return Err(LinkError::Format(format!(
                "the peer speaks link version {}, this node {VERSION}: run the same ftvm on both nodes",
                h[4]
            )));
        }
        let htag = Tag::try_from(htag).map_err(|_| auth_failed())?;
        self.aead
            .decrypt_inout_detached(&nonce(counter, 0), h, (&mut [][..]).into(), &htag)
            .map_err(|_| auth_failed())?;
        // From here the header is authentic.
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if len > self.max_payload {
            return Err(LinkError::TooLarge {
                len,
                max: self.max_payload,
            });
        }
        Ok(len)
    }

    #[inline(never)]
    fn open_payload(
        &self,
        counter: u64,
        head: &[u8; HEADER_LEN + TAG_LEN],
        payload: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), LinkError> {
        self.aead
            .decrypt_inout_detached(
                &nonce(counter, 1),
                &head[..HEADER_LEN],
                payload.into(),
                &Tag::from(*tag),
            )
            .map_err(|_| auth_failed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Direction, Direction) {
        (
            Direction::new([7; 32], 1 << 20),
            Direction::new([7; 32], 1 << 20),
        )
    }

    #[test]
    fn round_trip_and_frame_len() {
        let (mut tx, mut rx) = pair();
        let bytes = tx.seal(5, &[b"hel", b"lo"]).unwrap();
        assert_eq!(frame_len(&bytes), Some(bytes.len()));
        assert!(!bytes.windows(5).any(|w| w == b"hello"), "payload in clear");
        let f = rx.recv(&mut &bytes[..]).unwrap();
        assert_eq!((f.kind, f.counter, &f.payload[..]), (5, 0, &b"hello"[..]));
    }

    #[test]
    fn every_corrupted_byte_is_refused() {
        let (mut tx, _) = pair();
        let bytes = tx.seal(3, &[b"some checkpoint payload"]).unwrap();
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            let (_, mut rx) = pair();
            assert!(
                rx.recv(&mut &bad[..]).is_err(),
                "byte {i} flipped unnoticed"
            );
        }
    }

    #[test]
    fn replay_truncation_and_reorder_refused() {
        let (mut tx, mut rx) = pair();
        let a = tx.seal(1, &[b"a"]).unwrap();
        let b = tx.seal(1, &[b"b"]).unwrap();
        assert!(
            rx.recv(&mut &a[..a.len() - 1]).is_err(),
            "truncated accepted"
        );
        let (_, mut rx) = pair();
        rx.recv(&mut &a[..]).unwrap();
        assert!(rx.recv(&mut &a[..]).is_err(), "replay accepted");
        let (_, mut rx) = pair();
        assert!(rx.recv(&mut &b[..]).is_err(), "reordered frame accepted");
    }

    #[test]
    fn oversized_send_refused() {
        let mut tx = Direction::new([1; 32], 4);
        assert!(matches!(
            tx.seal(1, &[b"12345"]),
            Err(LinkError::TooLarge { len: 5, max: 4 })
        ));
    }
}
