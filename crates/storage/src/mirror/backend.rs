//! [`MirroredBackend`]: a block device kept identical on this node and a peer.
//!
//! # Semantics (DRBD protocol C)
//!
//! A guest write completes only when the local replica has applied it *and* the peer has
//! applied it and acknowledged. A guest flush completes only when both replicas have made
//! every completed write durable (local `flush`, peer `fsync` before its ack). So once a
//! flush completes, both nodes hold the data on stable storage; a write that was never
//! flushed may be lost by a power failure on either node, exactly as on a single disk.
//!
//! # Dirty regions and the activity log
//!
//! The disk is divided into regions (1 MiB by default) with one bit each in a persisted
//! bitmap ([`DirtyBitmap`]). Before a write touches either replica, its regions' bits are set
//! and synced (when they were clear), so a crash of this node at any point leaves every
//! region that may differ marked. Regions written while the peer acknowledges stay in a
//! small "hot" set (the activity log) and are cleared once evicted after a successful
//! mirrored flush. While the peer is unreachable, writes continue locally and their regions
//! stay set. When the peer returns (a background thread reconnects), only set regions are
//! copied — with progress in the state file — while guest I/O continues. A new or replaced
//! peer replica (different replica id) gets a full sync, which compares region checksums
//! and copies only what differs.
//!
//! # Local failures
//!
//! An I/O error on the local replica marks it failed (recorded in the state file shown by
//! `ftvm volume info`); reads and writes then go to the peer. A read of a region the peer
//! does not have up to date fails, as does any I/O when neither replica is usable.

use std::collections::{HashSet, VecDeque};
use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::bitmap::DirtyBitmap;
use super::protocol::{region_checksums, Conn, Frame, Hello, HelloOk, Kind};
use crate::BlockBackend;
use link::{Role, Secret};

/// How a [`MirroredBackend`] behaves.
#[derive(Debug, Clone)]
pub struct MirrorConfig {
    /// Peer address (`host:port`) of `ftvm volume mirror-serve`.
    pub peer: String,
    /// Volume name (the target checks it).
    pub volume: String,
    /// The cluster secret the target must share (it authenticates and encrypts the link).
    pub secret: Secret,
    /// Dirty bitmap file.
    pub bitmap_path: PathBuf,
    /// State file for `info` (JSON), if any.
    pub state_path: Option<PathBuf>,
    /// How long to wait for the peer before declaring it unreachable.
    pub io_timeout: Duration,
    /// How often to try reconnecting.
    pub reconnect_interval: Duration,
    /// Region size for a new bitmap.
    pub region_size: u64,
    /// Regions kept in the activity log.
    pub hot_regions: usize,
    /// Run the reconnect/resync thread.
    pub background: bool,
}

impl MirrorConfig {
    /// Defaults: 5 s peer timeout, reconnect every 500 ms, 1 MiB regions, 256 hot regions.
    pub fn new(peer: &str, volume: &str, bitmap_path: PathBuf, secret: Secret) -> Self {
        MirrorConfig {
            peer: peer.to_string(),
            volume: volume.to_string(),
            secret,
            bitmap_path,
            state_path: None,
            io_timeout: Duration::from_secs(5),
            reconnect_interval: Duration::from_millis(500),
            region_size: 1 << 20,
            hot_regions: 256,
            background: true,
        }
    }
}

/// What `ftvm volume info` shows about a mirrored volume.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct MirrorStatus {
    /// Peer address.
    pub peer: String,
    /// Whether the peer is connected.
    pub connected: bool,
    /// The peer replica's id (0: never connected).
    pub peer_replica_id: u64,
    /// Why the local replica was failed, if it was.
    pub local_failed: Option<String>,
    /// Recent faults and link events.
    pub faults: Vec<String>,
    /// Regions that may differ between the replicas (including hot ones).
    pub dirty_regions: u64,
    /// Regions in the disk.
    pub regions: u64,
    /// Bytes per region.
    pub region_size: u64,
    /// A resync is running.
    pub resync_active: bool,
    /// It is a full sync (new replica).
    pub resync_full: bool,
    /// Regions resynced so far in this resync.
    pub resync_done: u64,
    /// Regions to resync when it started.
    pub resync_total: u64,
    /// Bytes sent by resyncs since start.
    pub resync_bytes: u64,
    /// Unix time of this status.
    pub updated_unix: u64,
    /// Process that wrote it.
    pub pid: u32,
}

struct Peer {
    conn: Conn,
    seq: u64,
}

impl Peer {
    fn connect(cfg: &MirrorConfig, size: u64) -> io::Result<(Peer, HelloOk)> {
        let addr = cfg.peer.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                format!("cannot resolve {}", cfg.peer),
            )
        })?;
        let s = TcpStream::connect_timeout(&addr, cfg.io_timeout)?;
        s.set_write_timeout(Some(cfg.io_timeout))?;
        let mut p = Peer {
            conn: Conn::establish(s, &cfg.secret, Role::Initiator, Some(cfg.io_timeout))?,
            seq: 0,
        };
        let hello = serde_json::to_vec(&Hello {
            volume: cfg.volume.clone(),
            size,
        })
        .map_err(io::Error::other)?;
        let f = p.request(Kind::Hello, 0, &hello)?;
        let ok: HelloOk = serde_json::from_slice(&f.payload).map_err(io::Error::other)?;
        Ok((p, ok))
    }

    fn send(&mut self, kind: Kind, offset: u64, payload: &[u8]) -> io::Result<u64> {
        self.seq += 1;
        self.conn.write_frame(kind, self.seq, offset, payload)?;
        Ok(self.seq)
    }

    fn recv(&mut self, seq: u64) -> io::Result<Frame> {
        let f = self.conn.read_frame()?;
        if f.seq != seq {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "mirror peer answered request {} while {seq} was expected",
                    f.seq
                ),
            ));
        }
        if f.kind == Kind::Error {
            return Err(io::Error::other(format!(
                "mirror peer: {}",
                String::from_utf8_lossy(&f.payload)
            )));
        }
        Ok(f)
    }

    fn request(&mut self, kind: Kind, offset: u64, payload: &[u8]) -> io::Result<Frame> {
        let seq = self.send(kind, offset, payload)?;
        self.recv(seq)
    }
}

/// Connects to a mirror target for verification: returns per-region checksums of the peer.
pub struct PeerClient(Peer, HelloOk);

impl PeerClient {
    /// Connects and greets the target serving `cfg.volume`.
    pub fn connect(cfg: &MirrorConfig, size: u64) -> io::Result<PeerClient> {
        let (p, ok) = Peer::connect(cfg, size)?;
        Ok(PeerClient(p, ok))
    }
    /// The target's greeting.
    pub fn hello(&self) -> &HelloOk {
        &self.1
    }
    /// crc32 of `count` regions of `region` bytes starting at `offset`.
    pub fn checksums(&mut self, offset: u64, region: u32, count: u32) -> io::Result<Vec<u32>> {
        let mut p = Vec::with_capacity(8);
        p.extend_from_slice(&region.to_be_bytes());
        p.extend_from_slice(&count.to_be_bytes());
        let f = self.0.request(Kind::Checksums, offset, &p)?;
        Ok(f.payload
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

struct Inner {
    cfg: MirrorConfig,
    local: Box<dyn BlockBackend>,
    size: u64,
    peer: Option<Peer>,
    bitmap: DirtyBitmap,
    /// Activity log: regions whose bit is set only because writes were in flight.
    al: VecDeque<u64>,
    al_set: HashSet<u64>,
    /// Dirty regions copied to the peer, cleared at the next peer flush.
    copied: HashSet<u64>,
    cursor: u64,
    st: MirrorStatus,
    last_attempt: Option<Instant>,
    last_state_write: Instant,
    last_peer_error: Option<String>,
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Inner {
    fn event(&mut self, msg: String) {
        let fault = msg.contains("lost") || msg.contains("failed") || msg.contains("cannot");
        if fault {
            tracing::warn!(volume = %self.cfg.volume, "{msg}");
        } else {
            tracing::info!(volume = %self.cfg.volume, "{msg}");
        }
        self.st.faults.push(format!("{} {msg}", now_unix()));
        if self.st.faults.len() > 20 {
            self.st.faults.remove(0);
        }
        self.write_state(true);
    }

    fn write_state(&mut self, force: bool) {
        if !force && self.last_state_write.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.last_state_write = Instant::now();
        self.st.connected = self.peer.is_some();
        self.st.dirty_regions = self.bitmap.count();
        self.st.regions = self.bitmap.regions();
        self.st.region_size = self.bitmap.region_size();
        self.st.peer_replica_id = self.bitmap.peer_id();
        self.st.updated_unix = now_unix();
        self.st.pid = std::process::id();
        if let Some(p) = &self.cfg.state_path {
            if let Ok(b) = serde_json::to_vec_pretty(&self.st) {
                if let Err(e) = crate::pool::write_atomic(p, &b) {
                    tracing::warn!("cannot write mirror state {}: {e}", p.display());
                }
            }
        }
    }

    fn drop_peer(&mut self, why: &io::Error) {
        if self.peer.take().is_some() {
            // Hot regions may hold writes the peer had not made durable: resync them.
            self.al.clear();
            self.al_set.clear();
            self.copied.clear();
            self.st.resync_active = false;
            self.event(format!(
                "peer {} lost: {why}; continuing on the local replica",
                self.cfg.peer
            ));
        }
    }

    fn fail_local(&mut self, op: &str, e: &io::Error) {
        if self.st.local_failed.is_none() {
            self.st.local_failed = Some(format!("{op}: {e}"));
            self.event(format!(
                "local replica failed ({op}: {e}); I/O continues on the peer's replica — replace the local disk and resync"
            ));
        }
    }

    fn install_peer(&mut self, peer: Peer, hello: HelloOk) {
        if hello.size != self.size {
            let msg = format!(
                "peer replica is {} bytes but the local one is {}; resize one of them to match",
                hello.size, self.size
            );
            if self.last_peer_error.as_deref() != Some(msg.as_str()) {
                self.last_peer_error = Some(msg.clone());
                self.event(msg);
            }
            return;
        }
        if self.bitmap.peer_id() != hello.replica_id {
            // A new or replaced replica: everything must be compared.
            if let Err(e) = self
                .bitmap
                .set_all()
                .and_then(|_| self.bitmap.set_peer_id(hello.replica_id))
            {
                self.event(format!("cannot update the dirty bitmap: {e}"));
                return;
            }
            self.st.resync_full = true;
        }
        self.peer = Some(peer);
        self.last_peer_error = None;
        self.event(format!(
            "peer {} connected ({} region(s) to resync{})",
            self.cfg.peer,
            self.bitmap.count(),
            if self.st.resync_full {
                ", full sync"
            } else {
                ""
            }
        ));
        self.start_resync();
    }

    fn start_resync(&mut self) {
        if self.bitmap.count() == 0 || self.st.resync_active {
            return;
        }
        if let Some(p) = self.peer.as_mut() {
            match p.request(Kind::SyncStart, 0, &[]) {
                Ok(_) => {
                    self.st.resync_active = true;
                    self.st.resync_done = 0;
                    self.st.resync_total = self.bitmap.count();
                    self.cursor = 0;
                    self.write_state(true);
                }
                Err(e) => self.drop_peer(&e),
            }
        }
    }

    /// Marks the regions of a write before it is issued; syncs when a bit was newly set.
    fn mark(&mut self, off: u64, len: u64) -> io::Result<()> {
        let mut newly = false;
        let connected = self.peer.is_some();
        for r in self.bitmap.range(off, len) {
            if self.bitmap.set(r)? {
                newly = true;
                if connected {
                    self.al.push_back(r);
                    self.al_set.insert(r);
                }
            } else if self.al_set.contains(&r) {
                // Touch: move to the back of the activity log.
                if let Some(i) = self.al.iter().rposition(|x| *x == r) {
                    self.al.remove(i);
                }
                self.al.push_back(r);
            }
        }
        if newly {
            self.bitmap.sync()?;
        }
        Ok(())
    }

    fn is_dirty(&self, r: u64) -> bool {
        self.bitmap.is_set(r) && !self.al_set.contains(&r)
    }

    fn write(&mut self, buf: &[u8], off: u64) -> io::Result<()> {
        if self.st.local_failed.is_some() {
            let Some(p) = self.peer.as_mut() else {
                return Err(eio(format!(
                    "write at {off}: the local replica failed ({}) and the peer is unreachable",
                    self.st.local_failed.clone().unwrap_or_default()
                )));
            };
            return match p.request(Kind::Write, off, buf) {
                Ok(_) => Ok(()),
                Err(e) => {
                    self.drop_peer(&e);
                    Err(eio(format!(
                        "write at {off}: both replicas unavailable ({e})"
                    )))
                }
            };
        }
        self.mark(off, buf.len() as u64)?;
        // Send to the peer first so both replicas work at once.
        let mut sent = None;
        if let Some(p) = self.peer.as_mut() {
            match p.send(Kind::Write, off, buf) {
                Ok(seq) => sent = Some(seq),
                Err(e) => self.drop_peer(&e),
            }
        }
        let local = self.local.write_at(buf, off);
        let mut peer_ok = false;
        if let Some(seq) = sent {
            if let Some(p) = self.peer.as_mut() {
                match p.recv(seq) {
                    Ok(_) => peer_ok = true,
                    Err(e) => self.drop_peer(&e),
                }
            }
        }
        if !peer_ok {
            // The regions' bits are set and synced: they stay dirty until resynced.
            for r in self.bitmap.range(off, buf.len() as u64) {
                if self.al_set.remove(&r) {
                    self.al.retain(|x| *x != r);
                }
            }
        }
        match local {
            Ok(()) => Ok(()),
            Err(e) => {
                self.fail_local("write", &e);
                if peer_ok {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn read(&mut self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if self.st.local_failed.is_none() {
            match self.local.read_at(buf, off) {
                Ok(()) => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::InvalidInput => return Err(e),
                Err(e) => self.fail_local("read", &e),
            }
        }
        if let Some(r) = self
            .bitmap
            .range(off, buf.len() as u64)
            .find(|r| self.is_dirty(*r))
        {
            return Err(eio(format!(
                "read at {off}: the local replica failed and the peer's copy of region {r} is not up to date"
            )));
        }
        let Some(p) = self.peer.as_mut() else {
            return Err(eio(format!(
                "read at {off}: the local replica failed and the peer is unreachable"
            )));
        };
        match p.request(Kind::Read, off, &(buf.len() as u32).to_be_bytes()) {
            Ok(f) if f.payload.len() == buf.len() => {
                buf.copy_from_slice(&f.payload);
                Ok(())
            }
            Ok(_) => Err(eio(format!(
                "read at {off}: the peer returned a short read"
            ))),
            Err(e) => {
                self.drop_peer(&e);
                Err(eio(format!(
                    "read at {off}: both replicas unavailable ({e})"
                )))
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        let mut local_err = None;
        if self.st.local_failed.is_none() {
            if let Err(e) = self.local.flush() {
                self.fail_local("flush", &e);
                local_err = Some(e);
            }
        }
        let mut peer_ok = false;
        if let Some(p) = self.peer.as_mut() {
            match p.request(Kind::Flush, 0, &[]) {
                Ok(_) => peer_ok = true,
                Err(e) => self.drop_peer(&e),
            }
        }
        if self.st.local_failed.is_some() && !peer_ok {
            return Err(local_err.unwrap_or_else(|| {
                eio("flush: the local replica failed and the peer is unreachable".into())
            }));
        }
        if peer_ok && self.st.local_failed.is_none() {
            // Both replicas are durable: cold activity-log regions are in sync.
            while self.al.len() > self.cfg.hot_regions {
                if let Some(r) = self.al.pop_front() {
                    self.al_set.remove(&r);
                    self.bitmap.clear(r)?;
                }
            }
            self.clear_copied()?;
        }
        Ok(())
    }

    fn clear_copied(&mut self) -> io::Result<()> {
        for r in std::mem::take(&mut self.copied) {
            self.bitmap.clear(r)?;
            self.st.resync_done += 1;
        }
        Ok(())
    }

    /// Copies up to 16 dirty regions to the peer; returns whether work remains.
    fn resync_step(&mut self) -> bool {
        if self.peer.is_none() || self.st.local_failed.is_some() {
            return false;
        }
        let skip = |r: u64| self.al_set.contains(&r) || self.copied.contains(&r);
        let Some(first) = self.bitmap.next_set(self.cursor, &skip) else {
            if self.st.resync_active || !self.copied.is_empty() {
                let res = self.peer.as_mut().map(|p| {
                    p.request(Kind::Flush, 0, &[])
                        .and_then(|_| p.request(Kind::SyncDone, 0, &[]))
                });
                match res {
                    Some(Ok(_)) => {
                        if let Err(e) = self.clear_copied() {
                            self.event(format!("cannot update the dirty bitmap: {e}"));
                        }
                        if self.st.resync_active {
                            self.st.resync_active = false;
                            self.st.resync_full = false;
                            let n = self.st.resync_done;
                            self.event(format!("resync complete ({n} region(s))"));
                        }
                    }
                    Some(Err(e)) => self.drop_peer(&e),
                    None => {}
                }
            }
            return false;
        };
        if !self.st.resync_active {
            self.start_resync();
            if self.peer.is_none() {
                return false;
            }
        }
        let rs = self.bitmap.region_size();
        let mut count = 1u64;
        while count < 16
            && first + count < self.bitmap.regions()
            && self.bitmap.is_set(first + count)
            && !self.al_set.contains(&(first + count))
            && !self.copied.contains(&(first + count))
        {
            count += 1;
        }
        let off = first * rs;
        let len = (count * rs).min(self.size - off);
        let mut buf = vec![0u8; len as usize];
        if let Err(e) = self.local.read_at(&mut buf, off) {
            self.fail_local("read during resync", &e);
            return false;
        }
        let full = self.st.resync_full;
        let res: io::Result<u64> = (|| {
            let p = self.peer.as_mut().ok_or_else(|| eio("peer gone".into()))?;
            let mut sent = 0;
            if full {
                let mut q = Vec::with_capacity(8);
                q.extend_from_slice(&(rs as u32).to_be_bytes());
                q.extend_from_slice(&(count as u32).to_be_bytes());
                let f = p.request(Kind::Checksums, off, &q)?;
                let theirs: Vec<u32> = f
                    .payload
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let ours = region_checksums(&buf, rs as usize);
                for (i, c) in ours.iter().enumerate() {
                    if theirs.get(i) != Some(c) {
                        let a = i * rs as usize;
                        let b = (a + rs as usize).min(buf.len());
                        p.request(Kind::Write, off + a as u64, &buf[a..b])?;
                        sent += (b - a) as u64;
                    }
                }
            } else {
                p.request(Kind::Write, off, &buf)?;
                sent = len;
            }
            Ok(sent)
        })();
        match res {
            Ok(sent) => {
                self.st.resync_bytes += sent;
                for r in first..first + count {
                    self.copied.insert(r);
                }
                self.cursor = first + count;
                if self.copied.len() >= 64 {
                    let flushed = self.peer.as_mut().map(|p| p.request(Kind::Flush, 0, &[]));
                    match flushed {
                        Some(Ok(_)) => {
                            if let Err(e) = self.clear_copied() {
                                self.event(format!("cannot update the dirty bitmap: {e}"));
                            }
                        }
                        Some(Err(e)) => self.drop_peer(&e),
                        None => {}
                    }
                }
                self.write_state(false);
                true
            }
            Err(e) => {
                self.drop_peer(&e);
                false
            }
        }
    }
}

struct Shared {
    inner: Mutex<Inner>,
    stop: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock aborts the process (panic = "abort"), so poisoning
        // cannot be observed; recover the guard anyway.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn try_connect(&self) {
        let (cfg, size) = {
            let mut g = self.lock();
            if g.peer.is_some() {
                return;
            }
            if g.last_attempt
                .is_some_and(|t| t.elapsed() < g.cfg.reconnect_interval)
            {
                return;
            }
            g.last_attempt = Some(Instant::now());
            (g.cfg.clone(), g.size)
        };
        match Peer::connect(&cfg, size) {
            Ok((p, hello)) => self.lock().install_peer(p, hello),
            Err(e) => {
                let mut g = self.lock();
                let msg = e.to_string();
                if g.last_peer_error.as_deref() != Some(msg.as_str()) {
                    g.last_peer_error = Some(msg.clone());
                    g.event(format!("cannot reach peer {}: {msg}", cfg.peer));
                }
            }
        }
    }
}

/// A block device mirrored synchronously to a peer (see the module documentation).
pub struct MirroredBackend {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl MirroredBackend {
    /// Wraps the local replica `local`; tries the peer once now, then (with
    /// `cfg.background`) keeps reconnecting and resyncing from a background thread.
    pub fn open(local: Box<dyn BlockBackend>, cfg: MirrorConfig) -> io::Result<Self> {
        let size = local.size();
        let bitmap = DirtyBitmap::open(&cfg.bitmap_path, size, cfg.region_size)?;
        let st = MirrorStatus {
            peer: cfg.peer.clone(),
            ..Default::default()
        };
        let background = cfg.background;
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                cfg,
                local,
                size,
                peer: None,
                bitmap,
                al: VecDeque::new(),
                al_set: HashSet::new(),
                copied: HashSet::new(),
                cursor: 0,
                st,
                last_attempt: None,
                last_state_write: Instant::now(),
                last_peer_error: None,
            }),
            stop: AtomicBool::new(false),
        });
        shared.try_connect();
        shared.lock().write_state(true);
        let thread = if background {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("mirror-resync".into())
                    .spawn(move || {
                        while !s.stop.load(Ordering::SeqCst) {
                            s.try_connect();
                            let more = s.lock().resync_step();
                            if !more {
                                s.lock().write_state(false);
                                std::thread::sleep(Duration::from_millis(50));
                            }
                        }
                    })?,
            )
        } else {
            None
        };
        Ok(MirroredBackend { shared, thread })
    }

    /// The current mirror status.
    pub fn status(&self) -> MirrorStatus {
        let mut g = self.shared.lock();
        g.st.connected = g.peer.is_some();
        g.st.dirty_regions = g.bitmap.count();
        g.st.regions = g.bitmap.regions();
        g.st.region_size = g.bitmap.region_size();
        g.st.peer_replica_id = g.bitmap.peer_id();
        g.st.clone()
    }

    /// Regions that need copying to the peer (dirty, not just hot).
    pub fn out_of_sync(&self) -> u64 {
        let g = self.shared.lock();
        (0..g.bitmap.regions()).filter(|r| g.is_dirty(*r)).count() as u64
    }

    /// Tries to connect now (when disconnected) and resyncs in the calling thread until
    /// nothing is dirty or the peer is lost. `progress(done, total)` reports regions.
    pub fn resync_now(&self, progress: &mut dyn FnMut(u64, u64)) -> io::Result<()> {
        self.shared.try_connect();
        loop {
            let mut g = self.shared.lock();
            if g.peer.is_none() {
                return Err(eio(format!(
                    "peer {} is unreachable: {}",
                    g.cfg.peer,
                    g.last_peer_error.clone().unwrap_or_default()
                )));
            }
            let more = g.resync_step();
            let total = g.st.resync_total.max(1);
            progress(g.st.resync_done + g.copied.len() as u64, total);
            if !more && g.copied.is_empty() && !g.st.resync_active {
                g.write_state(true);
                return Ok(());
            }
        }
    }

    /// Waits (up to `timeout`) until the peer is connected and nothing is out of sync.
    pub fn wait_in_sync(&self, timeout: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            {
                let g = self.shared.lock();
                let dirty = (0..g.bitmap.regions()).any(|r| g.is_dirty(r));
                if g.peer.is_some() && !dirty && !g.st.resync_active && g.copied.is_empty() {
                    return true;
                }
            }
            if t0.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for MirroredBackend {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.shared.lock().write_state(true);
    }
}

impl BlockBackend for MirroredBackend {
    fn size(&self) -> u64 {
        self.shared.lock().size
    }
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.shared.lock().read(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.shared.lock().write(buf, offset)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.shared.lock().flush()
    }
    fn read_only(&self) -> bool {
        self.shared.lock().local.read_only()
    }
}

/// A region whose checksums differ between the replicas.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    /// Byte offset.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
}

/// Compares `local` with the peer replica region by region (crc32 per region).
pub fn verify(
    local: &mut dyn BlockBackend,
    cfg: &MirrorConfig,
    region: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> io::Result<Vec<Difference>> {
    let size = local.size();
    let mut peer = PeerClient::connect(cfg, size)?;
    if peer.hello().size != size {
        return Err(eio(format!(
            "peer replica is {} bytes, local is {size}: they differ in size",
            peer.hello().size
        )));
    }
    let batch = 32u64;
    let mut diffs: Vec<Difference> = Vec::new();
    let mut off = 0u64;
    let mut buf = Vec::new();
    while off < size {
        let len = (region * batch).min(size - off);
        buf.resize(len as usize, 0);
        local.read_at(&mut buf, off)?;
        let ours = region_checksums(&buf, region as usize);
        let theirs = peer.checksums(off, region as u32, ours.len() as u32)?;
        for (i, c) in ours.iter().enumerate() {
            if theirs.get(i) != Some(c) {
                let o = off + i as u64 * region;
                let l = region.min(size - o);
                match diffs.last_mut() {
                    Some(d) if d.offset + d.len == o => d.len += l,
                    _ => diffs.push(Difference { offset: o, len: l }),
                }
            }
        }
        off += len;
        progress(off, size);
    }
    Ok(diffs)
}
