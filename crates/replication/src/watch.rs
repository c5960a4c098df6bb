//! The watch path: a second heartbeat between the two monitors of an FT VM, independent of
//! the A-link (UDP over the management network, its own threads), carrying what each copy is.
//!
//! ```text
//! datagram: "FTWB" | version u8 | body (postcard Beat) | tag (32 bytes)
//! tag = HMAC-SHA256(watch key, everything before it)
//! watch key = HMAC-SHA256(cluster secret, "ftvm-watch-v1")
//! ```
//! The domain string keeps watch keys apart from A-link session keys. `ts_ns` grows strictly
//! per sender and must exceed the last accepted one (and lie within [`MAX_SKEW`] of this
//! node's clock), so a replayed datagram is refused.

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::liveness::{PeerState, PeerWord, SessionId, Watch};

const MAGIC: &[u8; 4] = b"FTWB";
const VERSION: u8 = 1;
const TAG_LEN: usize = 32;
/// Heartbeat period.
pub const INTERVAL: Duration = Duration::from_millis(10);
/// Largest accepted difference between a datagram's timestamp and this node's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(30);

type HmacSha256 = Hmac<Sha256>;

/// One heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Beat {
    /// The VM's identity.
    pub vm: String,
    /// Random per watch path instance (a monitor never listens to itself).
    pub instance: u64,
    /// `true` when the sender runs as primary.
    pub primary: bool,
    /// What the sender's copy is.
    pub state: PeerState,
    /// The session `state` refers to.
    pub session: SessionId,
    /// The sender's last committed/acknowledged epoch.
    pub epoch: u64,
    /// Primary only: please release your standby of this session (0: no request).
    pub release: SessionId,
    /// Backup only: the epoch it is applying right now (0: none), so a primary waiting for
    /// the ack knows the A-link works and the backup is slow, not gone.
    pub applying: u64,
    /// Backup only: bytes received on the A-link so far (progress shows the link works).
    pub progress: u64,
    /// The sender's dead time, ms.
    pub dead_ms: u32,
    /// Sender clock, ns since the epoch, strictly growing.
    pub ts_ns: u64,
}

/// The watch key derived from the cluster secret.
pub fn watch_key(secret: &[u8]) -> [u8; 32] {
    let mut mac =
        <HmacSha256 as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(b"ftvm-watch-v1");
    mac.finalize().into_bytes().into()
}

/// Encodes and signs a beat.
pub fn encode(key: &[u8; 32], beat: &Beat) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(VERSION);
    out.extend_from_slice(&postcard::to_allocvec(beat).unwrap_or_default());
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(&out);
    out.extend_from_slice(&mac.finalize().into_bytes());
    out
}

/// Verifies and decodes a datagram.
pub fn decode(key: &[u8; 32], d: &[u8]) -> Result<Beat, String> {
    if d.len() < MAGIC.len() + 1 + TAG_LEN || &d[..4] != MAGIC {
        return Err("not a watch datagram".into());
    }
    if d[4] != VERSION {
        return Err(format!("watch version {} (we speak {VERSION})", d[4]));
    }
    let (signed, tag) = d.split_at(d.len() - TAG_LEN);
    let mut mac = <HmacSha256 as KeyInit>::new_from_slice(key).expect("any key length");
    mac.update(signed);
    mac.verify_slice(tag)
        .map_err(|_| "authentication failed (wrong cluster secret or tampered)".to_string())?;
    postcard::from_bytes(&signed[5..]).map_err(|e| format!("undecodable beat: {e}"))
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// What this node says.
#[derive(Debug, Clone, Copy)]
struct Own {
    primary: bool,
    state: PeerState,
    session: SessionId,
    epoch: u64,
    release: SessionId,
    applying: u64,
}

/// What was last heard from the peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerView {
    /// When the last authenticated beat arrived.
    pub heard: Option<Instant>,
    /// What it said.
    pub word: Option<PeerWord>,
    /// The release it asked for (primary → backup), 0 for none.
    pub release: SessionId,
    /// The peer's dead time.
    pub dead: Option<Duration>,
    /// The peer's epoch.
    pub epoch: u64,
    /// The epoch the peer (a backup) is applying, 0 for none.
    pub applying: u64,
    /// The peer's A-link receive progress, and when it last moved.
    pub progress: u64,
    /// When `progress` last changed.
    pub progressed: Option<Instant>,
    /// Datagrams refused (authentication, replay, foreign VM).
    pub refused: u64,
    /// When this watch path started.
    started: Option<Instant>,
    last_ts: u64,
    instance: u64,
}

impl PeerView {
    /// Time since the peer was last heard (since the start if never).
    pub fn silent_for(&self) -> Duration {
        self.heard
            .or(self.started)
            .map(|t| t.elapsed())
            .unwrap_or(Duration::MAX)
    }
}

/// A hook run on the receiver thread for every accepted beat.
pub type BeatHook = Box<dyn Fn(&Beat) + Send + Sync>;

/// A running watch path. Its threads end when it is dropped.
pub struct WatchPath {
    vm: String,
    instance: u64,
    key: [u8; 32],
    dead: Duration,
    /// Heartbeats go to every address here; the first is the current peer.
    peers: Mutex<Vec<SocketAddr>>,
    /// Instances of former peers, no longer listened to.
    former: Mutex<Vec<u64>>,
    own: Mutex<Own>,
    view: Mutex<PeerView>,
    hook: Mutex<Option<BeatHook>>,
    stop: AtomicBool,
    /// The socket (for the unread-datagram check).
    sock: UdpSocket,
    /// Bytes received on the A-link (backup), announced in every beat.
    progress: Arc<std::sync::atomic::AtomicU64>,
}

/// JSON view of the watch path for the FT status.
#[derive(Debug, Clone, Serialize)]
pub struct WatchStatus {
    /// The peer's watch address.
    pub peer: String,
    /// Milliseconds since the peer was last heard (None: never).
    pub peer_heard_ms_ago: Option<u64>,
    /// What the peer says.
    pub peer_state: Option<PeerState>,
    /// Datagrams refused.
    pub refused: u64,
    /// What this node says.
    pub own_state: PeerState,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WatchPath {
    /// Binds `bind` and starts heartbeats to `peer` for `vm`; `primary` is this node's role.
    pub fn start(
        vm: &str,
        bind: SocketAddr,
        peer: SocketAddr,
        secret: &[u8],
        primary: bool,
        dead: Duration,
    ) -> std::io::Result<Arc<WatchPath>> {
        let sock = UdpSocket::bind(bind).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("cannot bind the watch path on {bind}: {e} (give --ft-watch-bind ADDR:PORT on this node)"),
            )
        })?;
        sock.set_read_timeout(Some(Duration::from_millis(50)))?;
        let mut inst = [0u8; 8];
        getrandom::fill(&mut inst).map_err(|e| std::io::Error::other(e.to_string()))?;
        let w = Arc::new(WatchPath {
            vm: vm.to_string(),
            instance: u64::from_le_bytes(inst),
            key: watch_key(secret),
            dead,
            peers: Mutex::new(vec![peer]),
            former: Mutex::new(Vec::new()),
            own: Mutex::new(Own {
                primary,
                state: if primary {
                    PeerState::PrimaryLive
                } else {
                    PeerState::Released
                },
                session: 0,
                epoch: 0,
                release: 0,
                applying: 0,
            }),
            view: Mutex::new(PeerView {
                started: Some(Instant::now()),
                ..PeerView::default()
            }),
            hook: Mutex::new(None),
            stop: AtomicBool::new(false),
            sock: sock.try_clone()?,
            progress: Arc::default(),
        });
        let tx = sock.try_clone()?;
        let weak = Arc::downgrade(&w);
        std::thread::Builder::new()
            .name("ft-watch-tx".into())
            .spawn(move || {
                raise_priority();
                let mut last_ts = 0;
                let mut last_sent = Instant::now();
                while let Some(w) = weak.upgrade() {
                    if w.stop.load(Ordering::Acquire) {
                        break;
                    }
                    let gap = last_sent.elapsed();
                    if gap > w.dead / 2 {
                        tracing::warn!(
                            "watch path: no heartbeat for {} ms (this node starved of CPU?)",
                            gap.as_millis()
                        );
                    }
                    last_sent = Instant::now();
                    last_ts = now_ns().max(last_ts + 1);
                    let d = encode(&w.key, &w.beat(last_ts));
                    let peers = lock(&w.peers).clone();
                    drop(w);
                    // A cut path is what the watch is for: keep sending.
                    for p in peers {
                        let _ = tx.send_to(&d, p);
                    }
                    std::thread::sleep(INTERVAL);
                }
            })?;
        let weak = Arc::downgrade(&w);
        std::thread::Builder::new()
            .name("ft-watch-rx".into())
            .spawn(move || {
                raise_priority();
                let mut buf = [0u8; 1024];
                loop {
                    let got = sock.recv_from(&mut buf);
                    let Some(w) = weak.upgrade() else { break };
                    if w.stop.load(Ordering::Acquire) {
                        break;
                    }
                    if let Ok((n, _)) = got {
                        w.receive(&buf[..n]);
                    }
                }
            })?;
        Ok(w)
    }

    fn beat(&self, ts_ns: u64) -> Beat {
        let o = *lock(&self.own);
        Beat {
            vm: self.vm.clone(),
            instance: self.instance,
            primary: o.primary,
            state: o.state,
            session: o.session,
            epoch: o.epoch,
            release: o.release,
            applying: o.applying,
            progress: self.progress.load(Ordering::Relaxed),
            dead_ms: self.dead.as_millis().min(u32::MAX as u128) as u32,
            ts_ns,
        }
    }

    fn receive(&self, d: &[u8]) {
        let beat = match decode(&self.key, d) {
            Ok(b) if b.vm == self.vm && b.instance != self.instance => b,
            Ok(b) if b.instance == self.instance => return,
            Ok(b) => {
                tracing::debug!("watch: beat for VM {:?}, not ours", b.vm);
                lock(&self.view).refused += 1;
                return;
            }
            Err(e) => {
                tracing::debug!("watch: refused datagram: {e}");
                lock(&self.view).refused += 1;
                return;
            }
        };
        if lock(&self.former).contains(&beat.instance) {
            return;
        }
        {
            let mut v = lock(&self.view);
            let now = now_ns();
            let skew = MAX_SKEW.as_nanos() as u64;
            if beat.ts_ns <= v.last_ts || beat.ts_ns.abs_diff(now) > skew {
                v.refused += 1;
                return;
            }
            v.last_ts = beat.ts_ns;
            v.instance = beat.instance;
            v.heard = Some(Instant::now());
            v.word = Some(PeerWord {
                state: beat.state,
                session: beat.session,
            });
            v.release = beat.release;
            v.epoch = beat.epoch;
            v.applying = beat.applying;
            if beat.progress != v.progress {
                v.progress = beat.progress;
                v.progressed = Some(Instant::now());
            }
            v.dead = Some(Duration::from_millis(beat.dead_ms as u64));
        }
        if let Some(h) = lock(&self.hook).as_ref() {
            h(&beat);
        }
    }

    /// Sets what this node says.
    pub fn set_own(&self, primary: bool, state: PeerState, session: SessionId, epoch: u64) {
        let mut o = lock(&self.own);
        o.primary = primary;
        o.state = state;
        o.session = session;
        o.epoch = epoch;
    }

    /// The counter of A-link bytes received that every beat announces (backup).
    pub fn progress_counter(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.progress.clone()
    }

    /// Says which epoch this backup is applying (0: none).
    pub fn set_applying(&self, epoch: u64) {
        lock(&self.own).applying = epoch;
    }

    /// Asks the backup (primary only) to release its standby of `session` (0: stop asking).
    pub fn ask_release(&self, session: SessionId) {
        lock(&self.own).release = session;
    }

    /// The session this node last claimed.
    pub fn own_session(&self) -> SessionId {
        lock(&self.own).session
    }

    /// Installs the hook run for every accepted beat.
    pub fn set_hook(&self, hook: BeatHook) {
        *lock(&self.hook) = Some(hook);
    }

    /// Listens to another peer from now on (e.g. a new backup after a failover). The former
    /// peer is still told what this node is (so a copy of it that comes back hears that this
    /// one is live and stops) but no longer listened to.
    pub fn set_peer(&self, peer: SocketAddr) {
        let mut v = lock(&self.view);
        if v.instance != 0 {
            lock(&self.former).push(v.instance);
        }
        lock(&self.peers).insert(0, peer);
        *v = PeerView {
            started: Some(Instant::now()),
            ..PeerView::default()
        };
    }

    /// The peer's watch address.
    pub fn peer(&self) -> SocketAddr {
        lock(&self.peers)[0]
    }

    /// What was last heard from the peer.
    pub fn view(&self) -> PeerView {
        *lock(&self.view)
    }

    /// Whether datagrams wait unread (the receiver thread is behind): the view is stale and
    /// nothing may be concluded from the peer's silence now.
    pub fn unread(&self) -> bool {
        crate::link::pending_bytes(&self.sock) > 0
    }

    /// The peer's dead time, once heard.
    pub fn peer_dead_time(&self) -> Option<Duration> {
        lock(&self.view).dead
    }

    /// The liveness input.
    pub fn as_input(&self) -> Watch {
        let v = self.view();
        Watch::On {
            silent_for: v.silent_for(),
            word: v.word,
        }
    }

    /// For the FT status.
    pub fn status(&self) -> WatchStatus {
        let v = self.view();
        WatchStatus {
            peer: self.peer().to_string(),
            peer_heard_ms_ago: v.heard.map(|t| t.elapsed().as_millis() as u64),
            peer_state: v.word.map(|w| w.state),
            refused: v.refused,
            own_state: lock(&self.own).state,
        }
    }
}

impl Drop for WatchPath {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
    }
}

/// Heartbeats must not starve behind guest and checkpoint work on a loaded host.
fn raise_priority() {
    // SAFETY: setpriority on this thread (tid from gettid) only changes its nice value.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, -10)
    };
    if r != 0 {
        tracing::debug!("watch: cannot raise thread priority (not root?)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(ts: u64) -> Beat {
        Beat {
            vm: "vm".into(),
            instance: 7,
            primary: true,
            state: PeerState::PrimaryLive,
            session: 3,
            epoch: 9,
            release: 0,
            applying: 0,
            progress: 0,
            dead_ms: 100,
            ts_ns: ts,
        }
    }

    #[test]
    fn round_trip_and_every_corrupted_byte_is_refused() {
        let key = watch_key(b"a cluster secret!");
        let d = encode(&key, &beat(5));
        assert_eq!(decode(&key, &d).unwrap(), beat(5));
        for i in 0..d.len() {
            let mut bad = d.clone();
            bad[i] ^= 0x20;
            assert!(decode(&key, &bad).is_err(), "byte {i} flipped unnoticed");
        }
        assert!(decode(&watch_key(b"another secret!!"), &d).is_err());
    }

    #[test]
    fn replays_and_foreign_vms_are_refused_between_two_real_sockets() {
        let secret = b"a cluster secret!";
        let a_addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let probe = UdpSocket::bind(a_addr).unwrap();
        let b = WatchPath::start(
            "vm",
            a_addr,
            probe.local_addr().unwrap(),
            secret,
            false,
            Duration::from_millis(100),
        )
        .unwrap();
        // Find b's port from what it sends to the probe.
        let mut buf = [0u8; 1024];
        let (_, b_addr) = probe.recv_from(&mut buf).unwrap();
        let key = watch_key(secret);
        let fresh = encode(&key, &beat(now_ns()));
        probe.send_to(&fresh, b_addr).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let v = b.view();
        assert_eq!(v.word.map(|w| w.session), Some(3));
        assert_eq!(v.refused, 0);
        probe.send_to(&fresh, b_addr).unwrap(); // replay
        let mut other = beat(now_ns());
        other.vm = "other".into();
        probe.send_to(&encode(&key, &other), b_addr).unwrap();
        probe
            .send_to(
                &encode(&key, &beat(now_ns() - 3600 * 1_000_000_000)),
                b_addr,
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(b.view().refused, 3);
    }
}
