//! A TCP proxy on the A-link that injects faults: it can corrupt one byte, cut the connection,
//! drop exactly one whole A-link frame, and delay everything in both directions.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::netns::{spawn_thread_in, TwoNodeBed};

/// A fault the [`AlinkProxy`] applies once to the primary→backup byte stream. Offsets count
/// the bytes the primary sent in that direction, over all connections through the proxy, from 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward unchanged.
    None,
    /// Invert every bit of the byte at this offset.
    CorruptByteAt(u64),
    /// Forward the bytes before this offset, then close the connection (both directions).
    TruncateAt(u64),
    /// Drop the first whole A-link frame (header, payload and tag, as [`frame_len`] measures
    /// it) that starts at or after this offset; everything else is forwarded.
    DropFrameFrom(u64),
}

/// Length of the clear A-link frame header that gives a frame's length.
pub const FRAME_HEADER_LEN: usize = link::HEADER_LEN;

/// The on-wire length of the A-link frame whose first bytes are `header` (header, tags and
/// payload), or None if it is not a frame header: the link's own [`link::frame_len`].
pub fn frame_len(header: &[u8]) -> Option<usize> {
    link::frame_len(header)
}

/// Follows A-link frame boundaries in one connection's primary→backup stream (a
/// [`link::HELLO_LEN`]-byte handshake hello, then frames) and drops whole frames on request.
/// Bytes of a frame header are held back until the header is complete.
#[derive(Default)]
pub struct FrameFilter {
    /// Hello bytes still to pass before the first frame.
    hello_left: usize,
    header: Vec<u8>,
    /// Bytes of the current frame after its header still to come.
    body_left: usize,
    /// Whether the current frame is being dropped.
    dropping: bool,
    /// An invalid header was seen: frame boundaries are unknown, forward everything.
    lost: bool,
    /// Stream offset of the next input byte.
    pos: u64,
}

impl FrameFilter {
    /// A filter for a stream whose first byte has offset `pos` (counted as [`Fault`] does).
    pub fn new(pos: u64) -> Self {
        Self {
            pos,
            hello_left: link::HELLO_LEN,
            ..Self::default()
        }
    }

    /// Appends to `out` what of `input` is to be forwarded. `drop_frame(start)` is asked for
    /// each frame whose header completes, with the stream offset of its first byte; when it
    /// says true, the whole frame is dropped. Returns the number of frames dropped.
    pub fn process(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        mut drop_frame: impl FnMut(u64) -> bool,
    ) -> usize {
        let mut dropped = 0;
        let mut i = 0;
        while i < input.len() {
            if self.lost {
                out.extend_from_slice(&input[i..]);
                self.pos += (input.len() - i) as u64;
                break;
            }
            if self.hello_left > 0 {
                let k = self.hello_left.min(input.len() - i);
                out.extend_from_slice(&input[i..i + k]);
                self.hello_left -= k;
                self.pos += k as u64;
                i += k;
                continue;
            }
            if self.body_left > 0 {
                let k = self.body_left.min(input.len() - i);
                if !self.dropping {
                    out.extend_from_slice(&input[i..i + k]);
                }
                self.body_left -= k;
                self.pos += k as u64;
                i += k;
                continue;
            }
            let k = (FRAME_HEADER_LEN - self.header.len()).min(input.len() - i);
            self.header.extend_from_slice(&input[i..i + k]);
            self.pos += k as u64;
            i += k;
            if self.header.len() < FRAME_HEADER_LEN {
                continue;
            }
            match frame_len(&self.header) {
                Some(total) => {
                    let start = self.pos - FRAME_HEADER_LEN as u64;
                    self.dropping = drop_frame(start);
                    if self.dropping {
                        dropped += 1;
                    } else {
                        out.extend_from_slice(&self.header);
                    }
                    self.body_left = total - FRAME_HEADER_LEN;
                }
                None => {
                    out.extend_from_slice(&self.header);
                    self.lost = true;
                }
            }
            self.header.clear();
        }
        dropped
    }

    /// At the end of the stream: appends the bytes of an incomplete header held back so far.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.header);
    }
}

#[derive(Default)]
struct ProxyShared {
    stop: AtomicBool,
    /// The armed fault and the primary→backup offset reached so far (bytes read from the
    /// primary by a forwarder).
    state: Mutex<(Option<Fault>, u64)>,
    /// Delay applied to every chunk in both directions, µs.
    delay_us: AtomicU64,
    forwarded: AtomicU64,
    returned: AtomicU64,
    connections: AtomicU64,
    faults_applied: AtomicU64,
    /// Clones of each open connection's sockets, by connection number, for `stop`.
    streams: Mutex<std::collections::HashMap<u64, [TcpStream; 2]>>,
}

impl ProxyShared {
    /// Called by each of a connection's two forwarders when it ends; the second one forgets
    /// the connection.
    fn finished(&self, conn: u64, done: &AtomicU64) {
        if done.fetch_add(1, Ordering::SeqCst) == 1 {
            if let Ok(mut s) = self.streams.lock() {
                s.remove(&conn);
            }
        }
    }

    fn delay(&self) -> Duration {
        Duration::from_micros(self.delay_us.load(Ordering::SeqCst))
    }
}

/// A TCP proxy on the A-link, running in this process inside node B's namespace: the primary
/// connects to it instead of the backup, and it can corrupt, cut or drop a frame of the
/// primary→backup stream, and delay both directions. Stops on drop.
///
/// It lives in the test process, so `kill_node(node_b)` does not kill it; its connections
/// break when the backup dies.
pub struct AlinkProxy {
    shared: Arc<ProxyShared>,
    addr: SocketAddr,
    accept: Option<JoinHandle<()>>,
}

impl AlinkProxy {
    /// Listens on node B's A-link address `10.99.0.2:listen_port` (0: any free port, see
    /// [`AlinkProxy::addr`]) and forwards each connection to `10.99.0.2:target_port`.
    pub fn start(
        bed: &TwoNodeBed,
        listen_port: u16,
        target_port: u16,
        fault: Fault,
    ) -> anyhow::Result<Self> {
        let listen = SocketAddr::from(([10, 99, 0, 2], listen_port));
        let target = SocketAddr::from(([10, 99, 0, 2], target_port));
        Self::start_to(bed, listen, target, fault)
    }

    /// Like [`AlinkProxy::start`] with any listen and target address inside node B's
    /// namespace (e.g. a target on 127.0.0.1).
    pub fn start_to(
        bed: &TwoNodeBed,
        listen: SocketAddr,
        target: SocketAddr,
        fault: Fault,
    ) -> anyhow::Result<Self> {
        let listener = bed
            .in_ns(bed.node_b(), || TcpListener::bind(listen))?
            .with_context(|| format!("cannot listen on {listen} in {}", bed.node_b()))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(ProxyShared::default());
        shared.lock_state().0 = Some(fault);
        let sh = shared.clone();
        // The accept loop runs inside node B so that its connections to the target do too.
        let accept = spawn_thread_in(bed.node_b(), "alink-proxy", move || {
            accept_loop(listener, target, sh)
        })?;
        Ok(Self {
            shared,
            addr,
            accept: Some(accept),
        })
    }

    /// The address the primary should connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Arms `fault` (replacing any armed one); offsets are absolute (see [`Fault`]).
    pub fn arm(&self, fault: Fault) {
        self.shared.lock_state().0 = Some(fault);
    }

    /// Corrupts the byte `bytes_from_now` bytes after the last one the primary sent
    /// (0: the next byte).
    pub fn corrupt_next_after(&self, bytes_from_now: u64) {
        let mut st = self.shared.lock_state();
        st.0 = Some(Fault::CorruptByteAt(st.1 + bytes_from_now));
    }

    /// Forwards `bytes_from_now` more bytes, then closes the connection.
    pub fn truncate_after(&self, bytes_from_now: u64) {
        let mut st = self.shared.lock_state();
        st.0 = Some(Fault::TruncateAt(st.1 + bytes_from_now));
    }

    /// Drops the next whole frame the primary starts sending.
    pub fn drop_next_frame(&self) {
        let mut st = self.shared.lock_state();
        st.0 = Some(Fault::DropFrameFrom(st.1));
    }

    /// Holds every chunk, in both directions, for `delay` before forwarding it (order kept);
    /// zero forwards at once again. Applies to chunks read from now on.
    pub fn set_delay(&self, delay: Duration) {
        self.shared
            .delay_us
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }

    /// Whether a fault is still armed (not yet applied).
    pub fn fault_pending(&self) -> bool {
        matches!(
            self.shared.lock_state().0,
            Some(Fault::CorruptByteAt(_) | Fault::TruncateAt(_) | Fault::DropFrameFrom(_))
        )
    }

    /// Bytes forwarded primary→backup so far.
    pub fn bytes_forwarded(&self) -> u64 {
        self.shared.forwarded.load(Ordering::SeqCst)
    }

    /// Bytes forwarded backup→primary so far.
    pub fn bytes_returned(&self) -> u64 {
        self.shared.returned.load(Ordering::SeqCst)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Faults applied so far.
    pub fn faults_applied(&self) -> u64 {
        self.shared.faults_applied.load(Ordering::SeqCst)
    }

    /// Stops accepting and closes every connection.
    pub fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        if let Ok(mut streams) = self.shared.streams.lock() {
            for (_, pair) in streams.drain() {
                for s in pair {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
        }
    }
}

impl ProxyShared {
    fn lock_state(&self) -> std::sync::MutexGuard<'_, (Option<Fault>, u64)> {
        // A forwarder never panics while holding the lock; recover the data if one did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for AlinkProxy {
    fn drop(&mut self) {
        self.stop();
    }
}

fn accept_loop(listener: TcpListener, target: SocketAddr, shared: Arc<ProxyShared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let conn = shared.connections.fetch_add(1, Ordering::SeqCst);
        // Connect from this thread: it is inside node B's namespace.
        let Ok(server) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        let clones = (
            client.try_clone(),
            server.try_clone(),
            client.try_clone(),
            server.try_clone(),
        );
        let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = clones else {
            continue;
        };
        if let Ok(mut s) = shared.streams.lock() {
            s.insert(conn, [c3, s3]);
        }
        let done = Arc::new(AtomicU64::new(0));
        let (sh, d) = (shared.clone(), done.clone());
        std::thread::spawn(move || {
            pump(client, server, &sh, true);
            sh.finished(conn, &d);
        });
        let sh = shared.clone();
        std::thread::spawn(move || {
            pump(s2, c2, &sh, false);
            sh.finished(conn, &done);
        });
    }
}

/// What a reader hands its writer.
enum Chunk {
    /// Bytes to write once the instant has come.
    Data(Instant, Vec<u8>),
    /// The reader saw the end of its stream: pass it on after the bytes before it.
    End(Instant),
    /// The fault cut the connection: close both directions after the bytes before it.
    Cut(Instant),
}

/// One direction of a connection: a reader (this thread) that applies the armed fault when
/// `faulty` (primary→backup) and a writer thread that forwards each chunk when its delay is up.
fn pump(mut from: TcpStream, to: TcpStream, shared: &Arc<ProxyShared>, faulty: bool) {
    let (tx, rx) = mpsc::channel::<Chunk>();
    let writer = {
        let shared = shared.clone();
        let from = from.try_clone();
        std::thread::spawn(move || write_loop(to, from.ok(), rx, &shared, faulty))
    };
    let mut filter = faulty.then(|| FrameFilter::new(shared.lock_state().1));
    let mut buf = vec![0u8; 64 * 1024];
    let end = loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let due = Instant::now() + shared.delay();
                let mut rest = Vec::new();
                if let Some(f) = filter.as_mut() {
                    f.finish(&mut rest);
                }
                if !rest.is_empty() {
                    let _ = tx.send(Chunk::Data(due, rest));
                }
                break Chunk::End(due);
            }
            Ok(n) => n,
        };
        let due = Instant::now() + shared.delay();
        let Some(filter) = filter.as_mut() else {
            if tx.send(Chunk::Data(due, buf[..n].to_vec())).is_err() {
                return;
            }
            continue;
        };
        let (out, cut) = apply_fault(shared, filter, &mut buf[..n]);
        if !out.is_empty() && tx.send(Chunk::Data(due, out)).is_err() {
            return;
        }
        if cut {
            break Chunk::Cut(due);
        }
    };
    let _ = tx.send(end);
    let _ = writer.join();
}

/// Applies the armed fault to one chunk read from the primary; returns the bytes to forward and
/// whether the connection is to be cut after them.
fn apply_fault(shared: &ProxyShared, filter: &mut FrameFilter, buf: &mut [u8]) -> (Vec<u8>, bool) {
    let n = buf.len();
    let mut st = shared.lock_state();
    let pos = st.1;
    let end = pos + n as u64;
    let mut keep = n;
    let mut cut = false;
    match st.0 {
        Some(Fault::CorruptByteAt(at)) if at >= pos && at < end => {
            buf[(at - pos) as usize] ^= 0xff;
            st.0 = Some(Fault::None);
            shared.faults_applied.fetch_add(1, Ordering::SeqCst);
        }
        Some(Fault::TruncateAt(at)) if at <= end => {
            keep = at.saturating_sub(pos) as usize;
            cut = true;
            st.0 = Some(Fault::None);
            shared.faults_applied.fetch_add(1, Ordering::SeqCst);
        }
        _ => {}
    }
    let mut out = Vec::with_capacity(keep);
    let mut armed = st.0;
    let dropped = filter.process(&buf[..keep], &mut out, |start| match armed {
        Some(Fault::DropFrameFrom(at)) if start >= at => {
            armed = Some(Fault::None);
            true
        }
        _ => false,
    });
    if dropped > 0 {
        st.0 = armed;
        shared.faults_applied.fetch_add(1, Ordering::SeqCst);
    }
    st.1 = end;
    (out, cut)
}

fn write_loop(
    mut to: TcpStream,
    from: Option<TcpStream>,
    rx: mpsc::Receiver<Chunk>,
    shared: &ProxyShared,
    faulty: bool,
) {
    let counter = if faulty {
        &shared.forwarded
    } else {
        &shared.returned
    };
    let wait = |due: Instant| {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
    };
    while let Ok(chunk) = rx.recv() {
        match chunk {
            Chunk::Data(due, bytes) => {
                wait(due);
                if to.write_all(&bytes).is_err() {
                    // The reader stops when its own socket closes; make sure it does.
                    if let Some(f) = &from {
                        let _ = f.shutdown(Shutdown::Both);
                    }
                    return;
                }
                counter.fetch_add(bytes.len() as u64, Ordering::SeqCst);
            }
            Chunk::End(due) => {
                wait(due);
                // Pass the end of stream on; the other direction finishes by itself.
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Chunk::Cut(due) => {
                wait(due);
                let _ = to.shutdown(Shutdown::Both);
                if let Some(f) = &from {
                    let _ = f.shutdown(Shutdown::Both);
                }
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of the link's layout (contents unsealed: the filter only reads the header).
    fn frame(kind: u8, _seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut f = b"FTLK".to_vec();
        f.extend_from_slice(&[link::VERSION, kind, 0, 0]);
        f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        f.extend_from_slice(&[0; 4]);
        f.extend_from_slice(&[0xbb; 16]); // header tag
        f.extend_from_slice(payload);
        f.extend_from_slice(&[0xaa; 16]); // payload tag
        f
    }

    #[test]
    fn frame_len_reads_the_header_and_refuses_damaged_ones() {
        let f = frame(5, 7, &[1, 2, 3]);
        assert_eq!(frame_len(&f[..16]), Some(16 + 16 + 3 + 16));
        let mut bad = f.clone();
        bad[0] ^= 1; // the magic
        assert_eq!(frame_len(&bad[..16]), None);
        assert_eq!(frame_len(&f[..15]), None);
    }

    /// Feeds `stream` to a filter in chunks of `chunk` bytes, dropping the first frame that
    /// starts at or after `from`.
    fn filtered(stream: &[u8], chunk: usize, from: u64) -> (Vec<u8>, usize) {
        let mut f = FrameFilter::new(0);
        f.hello_left = 0;
        let mut out = Vec::new();
        let mut armed = true;
        let mut dropped = 0;
        for c in stream.chunks(chunk) {
            dropped += f.process(c, &mut out, |start| {
                let d = armed && start >= from;
                if d {
                    armed = false;
                }
                d
            });
        }
        (out, dropped)
    }

    #[test]
    fn exactly_one_whole_frame_is_dropped_at_any_chunking() {
        let frames: Vec<Vec<u8>> = (1..=4)
            .map(|i| frame(5, i, &vec![i as u8; 100 * i as usize]))
            .collect();
        let stream: Vec<u8> = frames.concat();
        let second_start = frames[0].len() as u64;
        let expected: Vec<u8> = [&frames[0][..], &frames[2][..], &frames[3][..]].concat();
        for chunk in [1, 7, 28, 29, 100, 4096] {
            // Any offset inside frame 1 or at frame 2's first byte selects frame 2.
            for from in [1, second_start - 1, second_start] {
                let (out, dropped) = filtered(&stream, chunk, from);
                assert_eq!(dropped, 1, "chunk {chunk} from {from}");
                assert_eq!(out, expected, "chunk {chunk} from {from}");
            }
        }
        // Nothing armed within the stream: everything passes.
        let (out, dropped) = filtered(&stream, 13, stream.len() as u64);
        assert_eq!((out, dropped), (stream.clone(), 0));
    }

    #[test]
    fn a_damaged_header_stops_frame_tracking_but_loses_no_byte() {
        let mut stream = [frame(5, 1, &[9; 10]), frame(5, 2, &[8; 10])].concat();
        let second = frame(5, 1, &[9; 10]).len();
        stream[second + 3] ^= 0xff; // second frame's magic
        let (out, dropped) = filtered(&stream, 5, second as u64);
        assert_eq!(dropped, 0);
        assert_eq!(out, stream);
    }
}
