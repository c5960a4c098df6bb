//! The mirror wire protocol: requests and replies on the authenticated, encrypted channel of
//! crate `link` (service `"mirror"`, the volume's owner is the initiator), so only a node with
//! the cluster secret reads or writes a replica.
//!
//! Each link frame's kind byte is a [`Kind`]; its payload is `seq u64 BE | offset u64 BE | data`
//! (a reply carries its request's `seq`). Link frames are versioned (the link's version covers
//! this layout too), authenticated (a tampered, replayed or reordered frame is refused) and
//! bounded before their payload is read.

use std::io::{self, BufReader, BufWriter};
use std::net::TcpStream;
use std::time::Duration;

use link::{Direction, LinkError, Role, Secret};

/// Largest data accepted in one frame.
pub const MAX_PAYLOAD: usize = 64 << 20;
const PREFIX: usize = 16;
const SERVICE: &str = "mirror";
/// How long either side waits for the other's handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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

fn io_err(e: LinkError) -> io::Error {
    match e {
        LinkError::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the mirror peer closed the connection",
        ),
        LinkError::Io(e) => e,
        LinkError::WrongSecret => io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("mirror peer refused: {e}"),
        ),
        e => io::Error::new(io::ErrorKind::InvalidData, format!("mirror peer: {e}")),
    }
}

/// An authenticated mirror connection.
pub struct Conn {
    rd: BufReader<TcpStream>,
    wr: BufWriter<TcpStream>,
    tx: Direction,
    rx: Direction,
}

impl Conn {
    /// Runs the link handshake on `stream` with `secret` as `role` (initiator: the volume's
    /// owner), waiting at most [`HANDSHAKE_TIMEOUT`] (or the shorter `read_timeout`) for the
    /// peer, then sets `read_timeout`.
    pub fn establish(
        stream: TcpStream,
        secret: &Secret,
        role: Role,
        read_timeout: Option<Duration>,
    ) -> io::Result<Conn> {
        stream.set_nodelay(true)?;
        let wait = read_timeout.map_or(HANDSHAKE_TIMEOUT, |t| t.min(HANDSHAKE_TIMEOUT));
        stream.set_read_timeout(Some(wait))?;
        let mut rd = BufReader::with_capacity(1 << 20, stream.try_clone()?);
        let mut wr = BufWriter::with_capacity(1 << 20, stream);
        let s = link::handshake(
            &mut rd,
            &mut wr,
            secret,
            role,
            SERVICE,
            PREFIX + MAX_PAYLOAD,
        )
        .map_err(io_err)?;
        rd.get_ref().set_read_timeout(read_timeout)?;
        Ok(Conn {
            rd,
            wr,
            tx: s.tx,
            rx: s.rx,
        })
    }

    /// Seals and writes one frame.
    pub fn write_frame(
        &mut self,
        kind: Kind,
        seq: u64,
        offset: u64,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut prefix = [0u8; PREFIX];
        prefix[..8].copy_from_slice(&seq.to_be_bytes());
        prefix[8..].copy_from_slice(&offset.to_be_bytes());
        self.tx
            .send_parts(&mut self.wr, kind as u8, &[&prefix, payload])
            .map_err(io_err)
    }

    /// Reads and authenticates one frame.
    pub fn read_frame(&mut self) -> io::Result<Frame> {
        let f = self.rx.recv(&mut self.rd).map_err(io_err)?;
        let kind = Kind::from_u8(f.kind).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unknown mirror frame kind {}", f.kind),
            )
        })?;
        let mut payload = f.payload;
        if payload.len() < PREFIX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "mirror frame too short for its header",
            ));
        }
        let seq = u64::from_be_bytes(payload[..8].try_into().unwrap_or_default());
        let offset = u64::from_be_bytes(payload[8..16].try_into().unwrap_or_default());
        payload.drain(..PREFIX);
        Ok(Frame {
            kind,
            seq,
            offset,
            payload,
        })
    }
}

/// crc32 checksums of consecutive `region`-byte pieces of `data`.
pub fn region_checksums(data: &[u8], region: usize) -> Vec<u32> {
    data.chunks(region).map(crc32fast::hash).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn secret(s: &str) -> Secret {
        Secret::new(s.as_bytes()).unwrap()
    }

    fn pair(a: &'static str, b: &'static str) -> (io::Result<Conn>, io::Result<Conn>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            Conn::establish(s, &secret(b), Role::Responder, None)
        });
        let c = Conn::establish(
            TcpStream::connect(addr).unwrap(),
            &secret(a),
            Role::Initiator,
            None,
        );
        (c, t.join().unwrap())
    }

    #[test]
    fn roundtrip_both_ways() {
        let (c, t) = pair("0123456789abcdef", "0123456789abcdef");
        let (mut c, mut t) = (c.unwrap(), t.unwrap());
        c.write_frame(Kind::Write, 7, 4096, b"hello").unwrap();
        let f = t.read_frame().unwrap();
        assert_eq!(
            (f.kind, f.seq, f.offset, &f.payload[..]),
            (Kind::Write, 7, 4096, &b"hello"[..])
        );
        t.write_frame(Kind::Ack, 7, 4096, &[]).unwrap();
        assert_eq!(c.read_frame().unwrap().kind, Kind::Ack);
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (c, t) = pair("0123456789abcdef", "some other key!!");
        for r in [c, t] {
            let e = r.err().expect("wrong secret accepted");
            assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
            assert!(e.to_string().contains("cluster secret differs"), "{e}");
        }
    }
}
