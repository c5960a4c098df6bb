//! `kv PORT [RATE]`: a line-oriented key-value service over TCP, optionally dirtying RATE pages
//! per second meanwhile (a memory load for benchmarks).
//!
//! `SET key value` → `OK` (sent only after the value is in the map), `GET key` →
//! `VALUE value` | `NOTFOUND`, anything else → `ERR reason`. Keys are one word; the value is
//! the rest of the line. Keys and values are at most 256 bytes.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use smoltcp::socket::tcp;

use crate::cmdline::Args;
use crate::net::{Net, TcpServer};

const BUF: usize = 16 * 1024;
const MAX_KEY: usize = 256;
const MAX_VALUE: usize = 256;
/// Longest accepted line (`SET ` + key + space + value).
const MAX_LINE: usize = 4 + MAX_KEY + 1 + MAX_VALUE;
/// Stop reading a connection while this much output is waiting for send room.
const MAX_PENDING_OUT: usize = 8 * 1024;

type Store = BTreeMap<Vec<u8>, Vec<u8>>;

/// Per-connection state.
#[derive(Default)]
struct Conn {
    line: Vec<u8>,
    /// The current line was too long: drop input up to the next newline.
    discarding: bool,
    out: Vec<u8>,
}

pub fn run(args: &Args, port: u16, dirty_rate: u64) -> ! {
    let mut dirtier = super::dirty::Dirtier::new(dirty_rate, super::dirty::DEFAULT_WORKING_SET_MIB);
    let mut net = Net::up(args);
    let mut server = TcpServer::<Conn>::new(&mut net, port, super::TCP_SLOTS, BUF);
    let mut store = Store::new();
    super::running("kv");
    loop {
        net.poll();
        server.service(&mut net, |sock, conn| serve(sock, conn, &mut store));
        dirtier.poll();
    }
}

fn serve(sock: &mut tcp::Socket, conn: &mut Conn, store: &mut Store) {
    flush(sock, conn);
    let mut tmp = [0u8; 2048];
    while conn.out.len() < MAX_PENDING_OUT && sock.can_recv() {
        let n = sock.recv_slice(&mut tmp).unwrap_or(0);
        if n == 0 {
            break;
        }
        for &b in &tmp[..n] {
            if b == b'\n' {
                if !core::mem::take(&mut conn.discarding) {
                    answer(&conn.line, store, &mut conn.out);
                }
                conn.line.clear();
            } else if conn.discarding {
            } else if conn.line.len() == MAX_LINE {
                conn.out.extend_from_slice(b"ERR line too long\n");
                conn.line.clear();
                conn.discarding = true;
            } else {
                conn.line.push(b);
            }
        }
        flush(sock, conn);
    }
}

fn flush(sock: &mut tcp::Socket, conn: &mut Conn) {
    if !conn.out.is_empty() && sock.can_send() {
        let n = sock.send_slice(&conn.out).unwrap_or(0);
        conn.out.drain(..n);
    }
}

/// Executes one command line and appends the answer to `out`.
fn answer(line: &[u8], store: &mut Store, out: &mut Vec<u8>) {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut reply = |parts: &[&[u8]]| {
        parts.iter().for_each(|p| out.extend_from_slice(p));
        out.push(b'\n');
    };
    if let Some(rest) = line.strip_prefix(b"SET ") {
        let Some(space) = rest.iter().position(|&b| b == b' ') else {
            return reply(&[b"ERR usage: SET key value"]);
        };
        let (key, value) = (&rest[..space], &rest[space + 1..]);
        match check_key(key) {
            Err(e) => reply(&[e]),
            Ok(()) if value.len() > MAX_VALUE => reply(&[b"ERR value longer than 256 bytes"]),
            Ok(()) => {
                store.insert(key.to_vec(), value.to_vec());
                reply(&[b"OK"]);
            }
        }
    } else if let Some(key) = line.strip_prefix(b"GET ") {
        match check_key(key) {
            Err(e) => reply(&[e]),
            Ok(()) => match store.get(key) {
                Some(v) => reply(&[b"VALUE ", v]),
                None => reply(&[b"NOTFOUND"]),
            },
        }
    } else if line.is_empty() {
        reply(&[b"ERR empty line"]);
    } else {
        reply(&[b"ERR unknown command (use SET key value | GET key)"]);
    }
}

fn check_key(key: &[u8]) -> Result<(), &'static [u8]> {
    if key.is_empty() {
        Err(b"ERR empty key")
    } else if key.len() > MAX_KEY {
        Err(b"ERR key longer than 256 bytes")
    } else if key.contains(&b' ') {
        Err(b"ERR key contains a space")
    } else {
        Ok(())
    }
}
