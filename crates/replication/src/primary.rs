//! The primary's engine: reaches the backup, copies disks and memory while the guest runs,
//! then checkpoints continuously. `Primary::checkpoint` is the whole per-checkpoint path:
//! pause → dirty log → copy → resume → send → ack → release output.
//!
//! When the A-link fails (refused frame, slow or missing ack, broken connection) output stays
//! held and the engine reconnects; what happens meanwhile — asking the backup to release,
//! degrading, stopping this copy — is decided by [`liveness::primary`] and the arbiter only.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::Vm;

use crate::arbiter::{Arbiter, Claim};
use crate::link::{Link, Next};
use crate::liveness::{self, ALink, Observer, PeerState, PrimaryAction, PrimaryView, SessionId};
use crate::pages::Staging;
use crate::protocol::{self, Ack, Checkpoint, NoBackup};
use crate::status::{FtState, FtStatus, PausePhases};
use crate::watch::WatchPath;
use crate::wire::Kind;
use crate::Error;

/// FT settings of a protected VM.
#[derive(Clone)]
pub struct FtOptions {
    /// The backup's A-link address.
    pub peer: std::net::SocketAddr,
    /// The cluster secret (HMAC key material).
    pub secret: Vec<u8>,
    /// Shortest checkpoint interval.
    pub min_interval: Duration,
    /// Longest checkpoint interval.
    pub max_interval: Duration,
    /// The dead time: A-link silence that counts (with the watch path's) as the peer's loss.
    pub timeout: Duration,
    /// How long the A-link may stay without a session before the backup is asked (watch
    /// path) to release its standby.
    pub release_after: Duration,
    /// Copy every disk to the backup during the initial sync (off only when the volumes are
    /// known to be identical, e.g. freshly mirrored and not yet used).
    pub sync_disks: bool,
    /// Send pages written again as deltas against the copy the backup holds.
    pub delta: bool,
    /// The VM's identity in claims.
    pub vm_id: String,
    /// The watch path (None: no arbiter; output stays held while the backup is away).
    pub watch: Option<Arc<WatchPath>>,
    /// Asked before a degrade.
    pub arbiter: Arc<dyn Arbiter>,
}

impl FtOptions {
    /// Defaults: 2–20 ms interval, 100 ms dead time, release asked after 1 s, no arbiter.
    pub fn new(peer: std::net::SocketAddr, secret: Vec<u8>) -> Self {
        Self {
            peer,
            secret,
            min_interval: Duration::from_millis(2),
            max_interval: Duration::from_millis(20),
            timeout: Duration::from_millis(100),
            release_after: Duration::from_secs(1),
            sync_disks: true,
            delta: true,
            vm_id: "vm".into(),
            watch: None,
            arbiter: Arc::new(crate::arbiter::NoArbiter),
        }
    }
}

/// Starts protecting `vm` (already running or about to run) on a new thread. The thread ends
/// when the guest ended (after telling the backup), or when this copy was fenced
/// ([`FtState::Fenced`]: the caller must stop the VM).
///
/// With `sync_disks` off, call this before `vm.start()`: writes are then recorded from the
/// first guest instruction, and the backup's volumes must equal the primary's at start.
pub fn start_primary(
    vm: Arc<Vm>,
    opts: FtOptions,
    status: Arc<FtStatus>,
) -> std::io::Result<JoinHandle<()>> {
    if !opts.sync_disks {
        // The volumes are identical now: every write from here on must reach the backup.
        for log in vm.disk_logs() {
            log.enable();
        }
    }
    status.update(|s| {
        s.arbiter = opts.arbiter.describe();
        s.split_brain_exposure = opts.arbiter.split_brain_exposure();
    });
    // A session of a previous engine of this process (the guest rebooted without the backup
    // hearing of it) may still be standing by: keep its output held as if it were ours.
    let last_session = opts.watch.as_ref().map_or(0, |w| w.own_session());
    std::thread::Builder::new()
        .name("ft-primary".into())
        .spawn(move || {
            let mut p = Primary {
                vm,
                opts,
                status,
                staging: Staging::default(),
                in_flight: Vec::new(),
                held_back: Vec::new(),
                holding: false,
                last_session,
                last_heard: Instant::now(),
                degraded: false,
            };
            if last_session != 0 {
                p.hold();
            }
            p.run();
        })
}

pub(crate) struct Primary {
    pub(crate) vm: Arc<Vm>,
    pub(crate) opts: FtOptions,
    pub(crate) status: Arc<FtStatus>,
    pub(crate) staging: Staging,
    /// Output of the checkpoint awaiting its acknowledgement, per network interface.
    in_flight: Vec<Vec<Vec<u8>>>,
    /// Output of epochs never acknowledged (a lost session), sent with the next session's
    /// first checkpoint, per interface; bounded.
    held_back: Vec<Vec<Vec<u8>>>,
    /// Whether output is held (from the first checkpoint of a session until a degrade).
    holding: bool,
    /// The last session started: a standby of it may exist on the backup (0: none).
    pub(crate) last_session: SessionId,
    /// When the backup was last heard on the A-link.
    last_heard: Instant,
    /// Whether held output was released unacknowledged.
    degraded: bool,
}

/// How a session or a wait ended.
pub(crate) enum Stop {
    /// The guest ended; the backup was told.
    GuestEnded,
    /// The peer is live: this copy stopped.
    Fenced,
}

impl Primary {
    fn run(&mut self) {
        self.announce();
        let mut failures = 0u32;
        loop {
            // Sessions that fail before protection back off (a broken backup is not hammered).
            let protected_before = self.status.get().checkpoints;
            let link = match self.reach(failures) {
                Ok(link) => link,
                Err(_stop) => return,
            };
            let why = match self.session(link) {
                Ok(stop) => {
                    let _ = stop;
                    return;
                }
                Err(e) => e.to_string(),
            };
            if self.status.get().checkpoints > protected_before {
                failures = 0;
            } else {
                failures = (failures + 1).min(5);
            }
            tracing::warn!("FT session lost: {why}; output stays held while reconnecting");
            self.keep_in_flight();
            // The next session copies the disks in full: what the logs hold now is covered by
            // that copy, and they must not grow without bound meanwhile.
            for l in self.vm.disk_logs() {
                l.disable();
            }
            self.status.set_state(
                if self.degraded {
                    FtState::Degraded
                } else {
                    FtState::Reconnecting
                },
                why,
            );
        }
    }

    pub(crate) fn announce(&self) {
        if let Some(w) = &self.opts.watch {
            w.set_own(true, PeerState::PrimaryLive, self.last_session, 0);
        }
    }

    /// Until a session is up: reconnect, and meanwhile do what the liveness rule says.
    fn reach(&mut self, failures: u32) -> Result<Link, Stop> {
        let mut observer = Observer::new(self.opts.timeout / 2);
        let backoff = Duration::from_millis(100) * (1 << failures);
        let mut next_attempt = Instant::now() + backoff - Duration::from_millis(100);
        loop {
            let observed = observer.tick();
            if let Some(reason) = self.vm.wait_exit(Duration::ZERO) {
                return Err(self.end_without_session(reason));
            }
            match self.decide(
                ALink::Down(self.last_heard.elapsed().min(observed)),
                observed,
            ) {
                PrimaryAction::Stop => return Err(self.fence()),
                PrimaryAction::Degrade => self.degrade("the arbiter granted the degrade"),
                PrimaryAction::HoldAndReconnect { .. }
                | PrimaryAction::KeepGoing
                | PrimaryAction::AskArbiter(_) => {}
            }
            if Instant::now() >= next_attempt {
                match self.connect() {
                    Ok(link) => return Ok(link),
                    Err(e) => {
                        tracing::debug!("backup {} not reachable: {e}", self.opts.peer);
                        // The status says why protection does not start (a wrong cluster
                        // secret, a backup that is not listening...), without changing state.
                        let why = format!("no session with the backup at {}: {e}", self.opts.peer);
                        let st = self.status.get();
                        if st.reason != why {
                            self.status.set_state(st.state, why);
                        }
                        next_attempt = Instant::now() + backoff;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Asks [`liveness::primary`] (and the arbiter when it says so) what to do now.
    fn decide(&mut self, alink: ALink, observed: Duration) -> PrimaryAction {
        let Some(watch) = &self.opts.watch else {
            return liveness::primary(&PrimaryView {
                alink,
                watch: liveness::Watch::Off,
                session: self.last_session,
                release_after: self.opts.release_after,
                peer_dead: self.opts.timeout * 2,
                verdict: None,
            });
        };
        let peer_dead = watch.peer_dead_time().unwrap_or(self.opts.timeout) * 2;
        let mut view = PrimaryView {
            alink,
            watch: watch.as_input().observed(observed),
            session: self.last_session,
            release_after: self.opts.release_after,
            peer_dead,
            verdict: None,
        };
        let mut action = liveness::primary(&view);
        if let PrimaryAction::AskArbiter(kind) = action {
            if self.degraded {
                return PrimaryAction::KeepGoing;
            }
            view.verdict = Some(self.opts.arbiter.claim(&Claim {
                vm: self.opts.vm_id.clone(),
                kind,
                epoch: self.status.get().epoch,
                session: self.last_session,
            }));
            action = liveness::primary(&view);
        }
        if !self.degraded {
            let release = match action {
                PrimaryAction::HoldAndReconnect { ask_release: true } => self.last_session,
                _ => 0,
            };
            watch.ask_release(release);
        }
        if action == PrimaryAction::Degrade && self.degraded {
            return PrimaryAction::KeepGoing;
        }
        action
    }

    /// One session: handshake, initial sync, then checkpoints until it fails or the guest ends.
    fn session(&mut self, mut link: Link) -> Result<Stop, Error> {
        self.last_session = link.id;
        self.announce();
        self.status.update(|s| s.sessions += 1);
        if self.opts.sync_disks {
            self.status.set_state(FtState::Syncing, "copying disks");
            // Writes from here on reach the backup with the first checkpoint, after the copy
            // (which covers everything recorded before it).
            for log in self.vm.disk_logs() {
                log.disable();
                log.enable();
            }
            self.sync_disks(&mut link)?;
        }
        // Whatever the backup's volumes were, a later session may find them behind ours.
        self.opts.sync_disks = true;
        self.status.set_state(FtState::Syncing, "copying memory");
        self.precopy(&mut link)?;

        // The first checkpoint is the final stop of the initial sync; from here output is held.
        let mut epoch = 1;
        let mut due = Instant::now();
        let mut window = (Instant::now(), 0u64);
        loop {
            let stats = match self.checkpoint(&mut link, epoch)? {
                Ok(stats) => stats,
                Err(stop) => return Ok(stop),
            };
            if epoch == 1 {
                self.degraded = false;
                self.status
                    .set_state(FtState::Protected, "first checkpoint acknowledged");
            }
            // Adaptive interval: the pause at most ~10% of the guest's time and the A-link busy at
            // most half of it, within the configured bounds; output waiting cuts it short below.
            let interval = (stats.pause * 10)
                .max(stats.busy * 2)
                .clamp(self.opts.min_interval, self.opts.max_interval);
            window.1 += 1;
            let rate = if window.0.elapsed() >= Duration::from_secs(1) {
                let r = window.1 as f64 / window.0.elapsed().as_secs_f64();
                window = (Instant::now(), 0);
                Some(r)
            } else {
                None
            };
            self.status.update(|s| {
                s.epoch = epoch;
                s.checkpoints += 1;
                s.last_pause_us = stats.pause.as_micros() as u64;
                s.last_phases = stats.phases;
                s.record_pause(stats.pause.as_micros() as u32);
                s.last_pages = stats.pages as u64;
                s.last_bytes = stats.bytes as u64;
                s.total_bytes += stats.bytes as u64;
                if let Some(r) = rate {
                    s.checkpoints_per_s = r;
                }
            });
            epoch += 1;
            // Due times follow a grid, so wake-up jitter does not lower the rate; after a long
            // checkpoint the grid restarts instead of catching up in a burst.
            let started = due;
            due += interval;
            let now = Instant::now();
            if due + interval < now {
                due = now;
            }
            self.wait_next(started, due);
            // A peer that says it is live wins even while acks flow (when unsure, stop a copy).
            if self.decide(ALink::Ok, Duration::MAX) == PrimaryAction::Stop {
                return Ok(self.fence());
            }
            if let Some(reason) = self.vm.wait_exit(Duration::ZERO) {
                return Ok(self.end_in_session(&mut link, epoch - 1, reason));
            }
        }
    }

    /// The per-checkpoint path. `Ok(Err(stop))`: this copy must stop (the peer is live).
    fn checkpoint(
        &mut self,
        link: &mut Link,
        epoch: u64,
    ) -> Result<Result<EpochStats, Stop>, Error> {
        let t0 = Instant::now();
        // 1. pause (each vCPU saves its registers on the way out)
        self.vm.pause_and_capture()?;
        let t_stopped = Instant::now();
        // 2. dirty log: pages written by vCPUs and by the monitor since the last checkpoint
        let dirty = self.vm.take_dirty_pages();
        let t_dirty = Instant::now();
        // 3. copy pages, vCPU/device state, the epoch's disk writes and network output
        let copied = dirty.and_then(|d| {
            self.staging
                .copy(self.vm.memory(), &d)
                .map_err(|e| vmm::Error::State(e.to_string()))
        });
        let t_copied = Instant::now();
        let copied = copied.and_then(|()| self.vm.save_state());
        let disk_writes: Vec<_> = self.vm.disk_logs().iter().map(|l| l.seal()).collect();
        self.in_flight = self.vm.net_outputs().iter().map(|o| o.seal()).collect();
        if epoch == 1 {
            // Output of a lost session goes first; from here every frame waits for its ack.
            for (f, held) in self
                .in_flight
                .iter_mut()
                .zip(std::mem::take(&mut self.held_back))
            {
                let new = std::mem::replace(f, held);
                f.extend(new);
            }
            self.hold();
        }
        let t_state = Instant::now();
        // 4. resume at once; the network is not waited for with the guest stopped
        self.vm.resume()?;
        let pause = t0.elapsed();
        let us = |a: Instant, b: Instant| (b - a).as_micros() as u32;
        let phases = PausePhases {
            stop_us: us(t0, t_stopped),
            dirty_log_us: us(t_stopped, t_dirty),
            copy_us: us(t_dirty, t_copied),
            state_us: us(t_copied, t_state),
            resume_us: us(t_state, Instant::now()),
        };
        let state = copied?;

        // 5. send
        let msg = Checkpoint {
            epoch,
            pages: self.staging.to_batch(),
            state,
            disk_writes,
            output: self.in_flight.clone(),
        };
        let payload = protocol::encode(&msg)?;
        link.send(Kind::Checkpoint, &payload)?;
        let sent = Instant::now();

        // 6. ack: a slow one is waited for (output stays held); the peer's word decides
        if let Err(stop) = self.wait_ack(link, epoch, sent)? {
            return Ok(Err(stop));
        }

        // 7. release the output the checkpoint covers
        for (o, frames) in self
            .vm
            .net_outputs()
            .iter()
            .zip(std::mem::take(&mut self.in_flight))
        {
            o.release(frames);
        }
        Ok(Ok(EpochStats {
            pause,
            phases,
            busy: t0.elapsed(),
            pages: self.staging.len(),
            bytes: payload.len(),
        }))
    }

    /// Waits for the acknowledgement of `epoch`; `Err`: the session is lost (not a death).
    fn wait_ack(
        &mut self,
        link: &mut Link,
        epoch: u64,
        sent: Instant,
    ) -> Result<Result<(), Stop>, Error> {
        let mut observer = Observer::new(self.opts.timeout / 2);
        loop {
            // An ack read late (this process stalled) is still an ack: the backup committed
            // the epoch, so its output may go even if the backup took over meanwhile (it
            // sends the same frames again, TCP drops the duplicates). Unacknowledged output
            // is only ever released by a degrade, which the arbiter decides.
            match link.next(Duration::from_millis(5)) {
                Next::Frame(f) if f.kind == Kind::Ack => {
                    let ack: Ack = protocol::decode(&f.payload)?;
                    if ack.epoch != epoch {
                        return Err(Error::Protocol(format!(
                            "ack for epoch {} while {epoch} is outstanding",
                            ack.epoch
                        )));
                    }
                    self.last_heard = Instant::now();
                    return Ok(Ok(()));
                }
                Next::Frame(f) if f.kind == Kind::NoBackup => {
                    let nb: NoBackup = protocol::decode(&f.payload)?;
                    return Err(Error::Protocol(format!(
                        "the backup is no backup: {}",
                        nb.reason
                    )));
                }
                Next::Frame(f) => {
                    return Err(Error::Protocol(format!("expected Ack, got {:?}", f.kind)));
                }
                Next::Failed(e) => return Err(e.into()),
                Next::Nothing => {}
            }
            // After the blocking wait, so a stall during it restarts observation.
            let observed = observer.tick();
            let silent = sent.elapsed();
            let alink = if silent < self.opts.timeout {
                ALink::Ok
            } else {
                ALink::Silent(silent)
            };
            match self.decide(alink, observed) {
                PrimaryAction::Stop => return Ok(Err(self.fence())),
                _ if silent >= self.opts.release_after && !self.backup_applying(epoch) => {
                    return Err(Error::Protocol(format!(
                        "no ack for checkpoint {epoch} in {} ms",
                        silent.as_millis()
                    )))
                }
                _ => {}
            }
        }
    }

    /// Whether the backup says (fresh, on the watch path) that it is applying `epoch`, or that
    /// it received A-link bytes lately: the A-link works and the backup is slow, so the
    /// session is worth waiting for (a slow ack is no death).
    fn backup_applying(&self, epoch: u64) -> bool {
        self.opts.watch.as_ref().is_some_and(|w| {
            let v = w.view();
            let recent =
                |t: Option<Instant>| t.is_some_and(|t| t.elapsed() < self.opts.release_after);
            recent(v.heard)
                && (v.applying == epoch || v.applying == u64::MAX || recent(v.progressed))
        })
    }

    /// Sleeps until the next checkpoint is `due`, or sooner (but not before the minimum interval
    /// after `last`) when the guest has output waiting.
    fn wait_next(&self, last: Instant, due: Instant) {
        let min_due = last + self.opts.min_interval;
        let outputs = self.vm.net_outputs();
        loop {
            let now = Instant::now();
            if now >= due {
                return;
            }
            if now >= min_due && outputs.iter().any(|o| o.has_pending()) {
                return;
            }
            let until = if now < min_due { min_due } else { due };
            match outputs.first() {
                Some(o) if now >= min_due => {
                    o.wait_pending(until - now);
                }
                _ => std::thread::sleep(until - now),
            }
        }
    }

    fn hold(&mut self) {
        if !self.holding {
            for o in self.vm.net_outputs() {
                o.hold();
            }
            self.holding = true;
        }
    }

    /// A lost session's unacknowledged output waits for the next session (bounded).
    fn keep_in_flight(&mut self) {
        let n = self.vm.net_outputs().len();
        self.held_back.resize_with(n, Vec::new);
        for (h, f) in self
            .held_back
            .iter_mut()
            .zip(std::mem::take(&mut self.in_flight))
        {
            h.extend(f);
            let over = h
                .len()
                .saturating_sub(vmm::devices::virtio::output::MAX_HELD_FRAMES);
            h.drain(..over);
        }
    }

    /// The arbiter said yes: release held output unacknowledged and run unprotected.
    fn degrade(&mut self, why: &str) {
        if self.degraded {
            return;
        }
        self.degraded = true;
        if self.last_session == 0 {
            // Nothing was ever held: the start of protection runs unprotected until the first
            // checkpoint, as before any session.
            return;
        }
        tracing::warn!("FT degraded: {why}");
        self.status.set_state(FtState::Degraded, why.to_string());
        self.release_all();
        // Output beyond the backup's standby is out: that standby must never be resumed. Say
        // so on the watch path (no session held any more, and please release the old one),
        // for a backup that was only slow and wakes up later.
        let old = std::mem::replace(&mut self.last_session, 0);
        self.announce();
        if let Some(w) = &self.opts.watch {
            w.ask_release(old);
        }
    }

    pub(crate) fn release_all(&mut self) {
        self.keep_in_flight();
        for (o, frames) in self
            .vm
            .net_outputs()
            .iter()
            .zip(std::mem::take(&mut self.held_back))
        {
            o.release(frames);
        }
        for o in self.vm.net_outputs() {
            o.pass_through();
        }
        self.holding = false;
        // Unprotected: the next session copies the disks again.
        for l in self.vm.disk_logs() {
            l.disable();
        }
    }

    /// The peer is live: stop this copy at once. Its held output is never released.
    fn fence(&mut self) -> Stop {
        let _ = self.vm.pause();
        if let Some(w) = &self.opts.watch {
            w.set_own(true, PeerState::Stopped, self.last_session, 0);
        }
        tracing::error!("the peer runs this VM: stopping this copy");
        self.status.set_state(
            FtState::Fenced,
            "the peer is live: this copy stopped (it never released unacknowledged output)",
        );
        Stop::Fenced
    }
}

pub(crate) struct EpochStats {
    pause: Duration,
    phases: PausePhases,
    busy: Duration,
    pages: usize,
    bytes: usize,
}
