//! The mirror wire protocol: versioned, length-prefixed, crc32-checksummed frames over TCP.
//!
//! Frame: a 32-byte header, then `len` payload bytes.
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `FTM1` |
//! | 4 | protocol version (1) |
//! | 5 | kind |
//! | 6..8 | flags (reserved, 0) |
//! | 8..16 | sequence number (a reply carries its request's) |
//! | 16..24 | disk offset |
//! | 24..28 | payload length |
//! | 28..32 | crc32 of bytes 0..28 and the payload |

use std::io::{self, Read, Write};

/// Frame magic.
pub const MAGIC: [u8; 4] = *b"FTM1";
/// Protocol version spoken.
pub const VERSION: u8 = 1;
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 64 << 20;
const HEADER: usize = 32;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Client → target: JSON [`Hello`].
    Hello = 1,
    /// Target → client: JSON [`HelloOk`].
    HelloOk = 2,
    /// Write the payload at `offset`; acked once applied.
    Write = 3,
    /// Make every applied write durable (fsync); acked after.
    Flush = 4,
    /// Read `u32` (payload) bytes at `offset`; answered with `Data`.
    Read = 5,
    /// Checksums of `count` regions of `region` bytes from `offset` (payload: two u32).
    Checksums = 6,
    /// Reply payload (read data or checksums).
    Data = 7,
    /// Success.
    Ack = 8,
    /// Failure; payload is the message.
    Error = 9,
    /// A resync starts: the target's replica is inconsistent until `SyncDone`.
    SyncStart = 10,
    /// The target's replica is consistent again.
    SyncDone = 11,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloOk,
            3 => Write,
            4 => Flush,
            5 => Read,
            6 => Checksums,
            7 => Data,
            8 => Ack,
            9 => Error,
            10 => SyncStart,
            11 => SyncDone,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone)]
pub struct Frame {
    /// What it is.
    pub kind: Kind,
    /// Request sequence number.
    pub seq: u64,
    /// Disk offset (when meaningful).
    pub offset: u64,
    /// Payload.
    pub payload: Vec<u8>,
}

/// The client's greeting.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Hello {
    /// Volume name the client mirrors.
    pub volume: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The target's answer.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct HelloOk {
    /// The target replica's size.
    pub size: u64,
    /// The target replica's identity (new for a new or replaced replica).
    pub replica_id: u64,
    /// False while a resync into it is unfinished.
    pub consistent: bool,
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Writes one frame.
pub fn write_frame<W: Write>(
    w: &mut W,
    kind: Kind,
    seq: u64,
    offset: u64,
    payload: &[u8],
) -> io::Result<()> {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC);
    h[4] = VERSION;
    h[5] = kind as u8;
    h[8..16].copy_from_slice(&seq.to_be_bytes());
    h[16..24].copy_from_slice(&offset.to_be_bytes());
    h[24..28].copy_from_slice(&(payload.len() as u32).to_be_bytes());
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..28]);
    c.update(payload);
    h[28..32].copy_from_slice(&c.finalize().to_be_bytes());
    if payload.len() <= 64 * 1024 {
        let mut v = Vec::with_capacity(HEADER + payload.len());
        v.extend_from_slice(&h);
        v.extend_from_slice(payload);
        w.write_all(&v)?;
    } else {
        w.write_all(&h)?;
        w.write_all(payload)?;
    }
    w.flush()
}

/// Reads one frame, checking magic, version, length and checksum.
pub fn read_frame<R: Read>(r: &mut R) -> io::Result<Frame> {
    let mut h = [0u8; HEADER];
    r.read_exact(&mut h).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the mirror peer closed the connection",
            )
        } else {
            e
        }
    })?;
    if h[0..4] != MAGIC {
        return Err(bad(
            "mirror peer sent a frame with a bad magic (not an ftvm mirror?)".into(),
        ));
    }
    if h[4] != VERSION {
        return Err(bad(format!(
            "mirror peer speaks protocol version {} (we speak {VERSION}); run the same ftvm on both nodes",
            h[4]
        )));
    }
    let kind =
        Kind::from_u8(h[5]).ok_or_else(|| bad(format!("unknown mirror frame kind {}", h[5])))?;
    let len = u32::from_be_bytes([h[24], h[25], h[26], h[27]]) as usize;
    if len > MAX_PAYLOAD {
        return Err(bad(format!(
            "mirror frame of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
        )));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..28]);
    c.update(&payload);
    let want = u32::from_be_bytes([h[28], h[29], h[30], h[31]]);
    if c.finalize() != want {
        return Err(bad(
            "mirror frame failed its crc32 check (corrupted on the link)".into(),
        ));
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&h[8..16]);
    let mut off = [0u8; 8];
    off.copy_from_slice(&h[16..24]);
    Ok(Frame {
        kind,
        seq: u64::from_be_bytes(seq),
        offset: u64::from_be_bytes(off),
        payload,
    })
}

/// crc32 checksums of consecutive `region`-byte pieces of `data`.
pub fn region_checksums(data: &[u8], region: usize) -> Vec<u32> {
    data.chunks(region).map(crc32fast::hash).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_corruption() {
        let mut v = Vec::new();
        write_frame(&mut v, Kind::Write, 7, 4096, b"hello").unwrap();
        let f = read_frame(&mut &v[..]).unwrap();
        assert_eq!(
            (f.kind, f.seq, f.offset, &f.payload[..]),
            (Kind::Write, 7, 4096, &b"hello"[..])
        );
        let mut bad = v.clone();
        bad[33] ^= 1;
        assert!(read_frame(&mut &bad[..])
            .unwrap_err()
            .to_string()
            .contains("crc32"));
        let mut ver = v.clone();
        ver[4] = 9;
        assert!(read_frame(&mut &ver[..])
            .unwrap_err()
            .to_string()
            .contains("version"));
    }
}
