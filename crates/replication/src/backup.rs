//! The backup's engine: listens for the primary (always: one bad connection never blocks
//! protection), holds a standby copy of the VM per session, commits each checkpoint all or
//! nothing, acknowledges it, and goes live only when [`liveness::backup`] and the arbiter say
//! so. A refused frame, an epoch mismatch or a slow primary drop the stream, never the guest.

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm::devices::lock;
use vmm::{ConsoleConfig, DiskConfig, NetConfig, Vm, VmState};

use crate::announce::rarp_frame;
use crate::arbiter::{Arbiter, Claim, ClaimKind};
use crate::gate::{Gate, Phase};
use crate::link::{Link, Next};
use crate::liveness::{self, ALink, BackupAction, BackupView, SessionId, Watch};
use crate::pages;
use crate::protocol::{self, Ack, Checkpoint, End, EndReason, Hello, NoBackup};
use crate::status::{FtState, FtStatus};
use crate::watch::WatchPath;
use crate::wire::{self, Kind};
use crate::Error;

/// How the backup is set up.
#[derive(Clone)]
pub struct BackupOptions {
    /// A-link address to listen on.
    pub listen: SocketAddr,
    /// The cluster secret.
    pub secret: Vec<u8>,
    /// This node's copies of the VM's disks, in the primary's order.
    pub disks: Vec<DiskConfig>,
    /// This node's taps, in the primary's order (the guest keeps its MACs).
    pub taps: Vec<String>,
    /// Where the guest's console goes after failover.
    pub console: ConsoleConfig,
    /// The dead time: the primary's silence on both paths after which a takeover is claimed.
    pub timeout: Duration,
    /// The VM's identity in claims.
    pub vm_id: String,
    /// The watch path (None: no arbiter, the backup never takes over by itself).
    pub watch: Option<Arc<WatchPath>>,
    /// Asked before a takeover.
    pub arbiter: Arc<dyn Arbiter>,
}

/// How the backup's watch ended.
pub enum BackupOutcome {
    /// The primary was lost; the guest now runs here from the last committed checkpoint.
    FailedOver {
        /// The running VM.
        vm: Arc<Vm>,
        /// The epoch it resumed from.
        epoch: u64,
        /// Why the primary was declared lost.
        reason: String,
    },
    /// The guest ended on the primary (power-off): nothing to resume, ever.
    PrimaryStopped,
}

struct Standby {
    vm: Vm,
    session: SessionId,
    state: Option<VmState>,
    epoch: u64,
    /// Frames of the last committed epoch (resent after a failover).
    output: Vec<Vec<Vec<u8>>>,
}

/// How often the engine looks at its inputs when nothing arrives.
const TICK: Duration = Duration::from_millis(5);

/// Waits for primaries on `opts.listen` and stands by until the guest is taken over or ends.
pub fn run_backup(opts: &BackupOptions, status: Arc<FtStatus>) -> Result<BackupOutcome, Error> {
    let listener = TcpListener::bind(opts.listen).map_err(|e| {
        Error::Io(format!(
            "cannot listen on {}: {e} (is the address on this node?)",
            opts.listen
        ))
    })?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Io(e.to_string()))?;
    status.update(|s| {
        s.arbiter = opts.arbiter.describe();
        s.split_brain_exposure = opts.arbiter.split_brain_exposure();
    });
    status.set_state(
        FtState::Syncing,
        format!("waiting for the primary on {}", opts.listen),
    );
    let gate = Arc::new(Gate::new(opts.watch.clone()));
    if let Some(w) = &opts.watch {
        let g = gate.clone();
        w.set_hook(Box::new(move |beat| {
            if beat.primary && beat.release != 0 {
                g.release(beat.release);
            }
        }));
    }
    let mut standby: Option<Standby> = None;
    let mut link: Option<Link> = None;
    let mut last_heard = Instant::now();
    let mut observer = liveness::Observer::new(opts.timeout / 2);
    loop {
        // A new connection replaces the current one: the primary reconnects.
        match listener.accept() {
            Ok((stream, peer)) => {
                tracing::info!("primary connected from {peer}");
                link = None;
                match accept_session(opts, stream, &gate, &mut standby, &status) {
                    Ok(l) => {
                        link = Some(l);
                        last_heard = Instant::now();
                    }
                    Err(e) => {
                        status.update(|s| s.rejected_frames += 1);
                        tracing::warn!("session from {peer} refused: {e}");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => tracing::warn!("accept: {e}"),
        }
        if let Some(l) = link.as_mut() {
            match l.next(TICK) {
                Next::Frame(f) => {
                    last_heard = Instant::now();
                    match handle(f, l, &gate, &mut standby, &status) {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Ended) => {
                            status.set_state(FtState::Stopped, "the guest powered off");
                            return Ok(BackupOutcome::PrimaryStopped);
                        }
                        Ok(Flow::DropStream(why)) => {
                            tracing::warn!("dropping the A-link stream: {why}");
                            link = None;
                        }
                        Err(e) => {
                            status.update(|s| s.rejected_frames += 1);
                            tracing::warn!("dropping the A-link stream: {e}");
                            link = None;
                        }
                    }
                }
                Next::Nothing => {}
                Next::Failed(e) => {
                    if !matches!(e, wire::WireError::Io(_)) {
                        status.update(|s| s.rejected_frames += 1);
                    }
                    tracing::warn!(
                        "A-link stream lost ({e}); waiting for the primary to reconnect"
                    );
                    link = None;
                }
            }
        } else {
            std::thread::sleep(TICK);
        }

        // The standby may have been released meanwhile (the primary asked on the watch path).
        let phase = gate.phase();
        if standby.as_ref().is_some_and(|s| !phase.holds(s.session)) {
            tracing::warn!("standby released ({phase:?}); waiting for a new session");
            standby = None;
            link = None;
            status.set_state(
                FtState::Syncing,
                "standby released; waiting for a new session",
            );
        }
        // Ticked after every blocking call of the iteration: a stall of this process (or of
        // the whole machine) during them restarts observation instead of counting as the
        // primary's silence.
        let observed = observer.tick();
        let silent = last_heard.elapsed().min(observed);
        let alink = match &link {
            Some(l) if silent < opts.timeout || l.unread() => ALink::Ok,
            Some(_) => ALink::Silent(silent),
            None => ALink::Down(silent),
        };
        let committed = match phase {
            Phase::Standby { session, .. } => Some(session),
            _ => None,
        };
        let mut view = BackupView {
            alink,
            watch: opts
                .watch
                .as_ref()
                .map_or(Watch::Off, |w| w.as_input().observed(observed)),
            standby: committed,
            dead: opts.timeout,
            verdict: None,
        };
        let mut action = liveness::backup(&view);
        if action == BackupAction::AskArbiter {
            let epoch = standby.as_ref().map_or(0, |s| s.epoch);
            view.verdict = Some(opts.arbiter.claim(&Claim {
                vm: opts.vm_id.clone(),
                kind: ClaimKind::TakeOver,
                epoch,
                session: committed.unwrap_or(0),
            }));
            action = liveness::backup(&view);
        }
        match action {
            BackupAction::KeepGoing | BackupAction::AskArbiter => {}
            BackupAction::WaitReconnect => {
                if matches!(alink, ALink::Down(_)) {
                    link = None;
                }
            }
            BackupAction::TakeOver => {
                let Some(s) = standby.take() else { continue };
                // The one atomic step: Standby -> Live, unless it was released meanwhile.
                if !gate.go_live(s.session) {
                    continue;
                }
                drop(link.take());
                let reason = format!(
                    "primary silent on the A-link and the watch path for {} ms",
                    silent.as_millis()
                );
                return failover(s, reason, &status);
            }
            BackupAction::DiscardStandby => {
                if let Some(s) = standby.take() {
                    tracing::warn!(
                        "the primary moved on; discarding the standby of session {:x}",
                        s.session
                    );
                    gate.discard(s.session);
                    status.set_state(
                        FtState::Syncing,
                        "standby discarded; waiting for a new session",
                    );
                }
            }
            BackupAction::Stop => {
                drop(standby.take());
                gate.end();
                status.set_state(FtState::Stopped, "the primary says the guest ended");
                return Ok(BackupOutcome::PrimaryStopped);
            }
        }
    }
}

enum Flow {
    Continue,
    Ended,
    DropStream(String),
}

/// Key exchange, Hello, a fresh standby VM for the new session, Ready.
fn accept_session(
    opts: &BackupOptions,
    stream: TcpStream,
    gate: &Gate,
    standby: &mut Option<Standby>,
    status: &FtStatus,
) -> Result<Link, Error> {
    let io = |e: std::io::Error| Error::Io(e.to_string());
    stream.set_nonblocking(false).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(io)?;
    let mut r = BufReader::with_capacity(1 << 20, stream.try_clone().map_err(io)?);
    let mut w = BufWriter::new(stream.try_clone().map_err(io)?);
    let (mut tx, mut rx, session) =
        wire::handshake_session(&mut r, &mut w, &opts.secret, wire::Role::Responder)?;
    let hello = rx.recv(&mut r)?;
    if hello.kind != Kind::Hello {
        return Err(Error::Protocol(format!(
            "expected Hello, got {:?}",
            hello.kind
        )));
    }
    let hello: Hello = protocol::decode(&hello.payload)?;
    // The primary started a new session: whatever standby we hold is obsolete.
    if let Some(old) = standby.take() {
        gate.discard(old.session);
    }
    if !gate.begin(session) {
        let why = NoBackup {
            reason: format!("session {session:x} was released"),
        };
        let _ = tx.send(&mut w, Kind::NoBackup, &protocol::encode(&why)?);
        return Err(Error::Protocol(why.reason));
    }
    status.update(|s| s.sessions += 1);
    status.set_state(FtState::Syncing, format!("syncing session {session:x}"));
    *standby = Some(Standby {
        vm: build_standby(opts, hello)?,
        session,
        state: None,
        epoch: 0,
        output: Vec::new(),
    });
    tx.send(&mut w, Kind::Ready, &[])?;
    let progress = opts.watch.as_ref().map(|w| w.progress_counter());
    Link::new(stream, r, w, tx, rx, session, progress).map_err(io)
}

fn handle(
    frame: wire::Frame,
    link: &mut Link,
    gate: &Gate,
    standby: &mut Option<Standby>,
    status: &FtStatus,
) -> Result<Flow, Error> {
    let Some(sb) = standby.as_mut().filter(|s| s.session == link.id) else {
        return Ok(Flow::DropStream("no standby for this session".into()));
    };
    match frame.kind {
        Kind::Pages => {
            let batch: pages::PageBatch = protocol::decode(&frame.payload)?;
            batch.check_addresses(sb.vm.memory())?;
            let data = batch.decode(sb.vm.memory())?;
            pages::apply(sb.vm.memory(), &batch.addrs, &data)?;
        }
        Kind::Disk => apply_disk_chunk(sb, &frame.payload)?,
        Kind::Checkpoint => {
            // Everything is verified before the gate is taken; applying happens under it, and
            // a failure half-way poisons the standby (never resumed) and tells the primary.
            gate.busy(true);
            let checked = protocol::decode::<Checkpoint>(&frame.payload)
                .and_then(|cp| verify(sb, &cp).map(|()| cp));
            gate.busy(false);
            let cp = checked?;
            let session = sb.session;
            let applied = gate.commit(session, cp.epoch, || apply(sb, cp));
            match applied {
                Ok(true) => {
                    let epoch = sb.epoch;
                    link.send(Kind::Ack, &protocol::encode(&Ack { epoch })?)?;
                    if epoch == 1 {
                        status.set_state(FtState::Protected, "first checkpoint committed");
                    }
                    status.update(|s| {
                        s.epoch = epoch;
                        s.checkpoints += 1;
                        s.last_bytes = frame.payload.len() as u64;
                    });
                }
                Ok(false) => return Ok(Flow::DropStream("the session was released".into())),
                Err(e) => {
                    let reason = format!("cannot apply checkpoint {}: {e}", cp_epoch(sb));
                    tracing::error!("{reason}; this node is no backup any more");
                    let _ = link.send(
                        Kind::NoBackup,
                        &protocol::encode(&NoBackup {
                            reason: reason.clone(),
                        })?,
                    );
                    *standby = None;
                    status.update(|s| s.poisoned += 1);
                    status.set_state(FtState::Syncing, format!("standby poisoned: {reason}"));
                    return Ok(Flow::DropStream(reason));
                }
            }
        }
        Kind::End => {
            let end: End = protocol::decode(&frame.payload)?;
            match end.reason {
                EndReason::PowerOff => gate.end(),
                EndReason::Reboot => gate.discard(sb.session),
            }
            link.send(Kind::Ack, &protocol::encode(&Ack { epoch: end.epoch })?)?;
            *standby = None;
            if end.reason == EndReason::PowerOff {
                return Ok(Flow::Ended);
            }
            status.set_state(
                FtState::Syncing,
                "the guest rebooted; waiting for the new session",
            );
            return Ok(Flow::DropStream("the guest rebooted".into()));
        }
        Kind::Heartbeat => {}
        Kind::Bye => return Ok(Flow::DropStream("the primary ended the session".into())),
        other => return Ok(Flow::DropStream(format!("unexpected {other:?} frame"))),
    }
    Ok(Flow::Continue)
}

fn cp_epoch(sb: &Standby) -> u64 {
    sb.epoch + 1
}

fn build_standby(opts: &BackupOptions, hello: Hello) -> Result<Vm, Error> {
    vmm::cpu_model::check_peer(&hello.cpu).map_err(Error::Protocol)?;
    let mut config = hello.config;
    if opts.disks.len() != config.disks.len() {
        return Err(Error::Protocol(format!(
            "the primary's VM has {} disks but this backup was given {} (--disk)",
            config.disks.len(),
            opts.disks.len()
        )));
    }
    if opts.taps.len() != config.nets.len() {
        return Err(Error::Protocol(format!(
            "the primary's VM has {} network interfaces but this backup was given {} (--net)",
            config.nets.len(),
            opts.taps.len()
        )));
    }
    config.disks = opts.disks.clone();
    config.nets = config
        .nets
        .iter()
        .zip(&opts.taps)
        .map(|(n, tap)| NetConfig {
            tap: tap.clone(),
            mac: n.mac,
        })
        .collect();
    config.console = opts.console.clone();
    Ok(Vm::create_standby(config, hello.kind)?)
}

/// Writes one chunk of the initial disk sync (made durable by the first commit).
fn apply_disk_chunk(standby: &Standby, payload: &[u8]) -> Result<(), Error> {
    let chunk: protocol::DiskChunk = protocol::decode(payload)?;
    let backend = standby
        .vm
        .disk_backends()
        .get(chunk.disk as usize)
        .ok_or_else(|| Error::Protocol(format!("disk {} does not exist here", chunk.disk)))?;
    let data = lz4_flex::block::decompress_size_prepended(&chunk.lz4)
        .map_err(|e| Error::Protocol(format!("disk chunk does not decompress: {e}")))?;
    let mut b = lock(backend);
    let end = chunk.offset.checked_add(data.len() as u64);
    if end.is_none_or(|e| e > b.size()) {
        return Err(Error::Protocol(format!(
            "disk {} here is {} bytes, smaller than the primary's (give a copy of the same size)",
            chunk.disk,
            b.size()
        )));
    }
    b.write_at(&data, chunk.offset).map_err(|e| {
        Error::Io(format!(
            "backup disk {} write at {}: {e}",
            chunk.disk, chunk.offset
        ))
    })
}

/// Checks a checkpoint completely before anything of it is applied.
fn verify(standby: &Standby, cp: &Checkpoint) -> Result<(), Error> {
    if cp.epoch != standby.epoch + 1 {
        return Err(Error::Protocol(format!(
            "epoch {} after {}",
            cp.epoch, standby.epoch
        )));
    }
    if cp.disk_writes.len() != standby.vm.disk_backends().len() {
        return Err(Error::Protocol(
            "disk write lists do not match the disks".into(),
        ));
    }
    cp.pages.check_addresses(standby.vm.memory())?;
    Ok(())
}

/// Applies a verified checkpoint: pages, disk writes (durable), then the new state.
fn apply(standby: &mut Standby, cp: Checkpoint) -> Result<(), Error> {
    let data = cp.pages.decode(standby.vm.memory())?;
    pages::apply(standby.vm.memory(), &cp.pages.addrs, &data)?;
    for (backend, writes) in standby.vm.disk_backends().iter().zip(&cp.disk_writes) {
        // The first commit also makes the initial disk sync durable.
        if writes.is_empty() && cp.epoch > 1 {
            continue;
        }
        let mut b = lock(backend);
        for (offset, bytes) in writes {
            b.write_at(bytes, *offset)
                .map_err(|e| Error::Io(format!("backup disk write at {offset}: {e}")))?;
        }
        b.flush()
            .map_err(|e| Error::Io(format!("backup disk flush: {e}")))?;
    }
    standby.state = Some(cp.state);
    standby.epoch = cp.epoch;
    standby.output = cp.output;
    Ok(())
}

/// Resumes the guest from the last committed checkpoint and announces its MACs.
fn failover(standby: Standby, reason: String, status: &FtStatus) -> Result<BackupOutcome, Error> {
    let Some(state) = standby.state else {
        return Err(Error::Protocol(
            "internal: a standby without a committed checkpoint went live".into(),
        ));
    };
    tracing::warn!("primary lost ({reason}); resuming epoch {}", standby.epoch);
    let vm = Arc::new(standby.vm);
    vm.load_state(&state)?;
    vm.start()?;
    for ((out, net), frames) in vm
        .net_outputs()
        .iter()
        .zip(&vm.config().nets)
        .zip(standby.output)
    {
        for _ in 0..3 {
            out.inject(&rarp_frame(net.mac));
        }
        // The last committed epoch's output may never have left the primary.
        for f in frames {
            out.inject(&f);
        }
    }
    status.set_state(FtState::FailedOver, reason.clone());
    Ok(BackupOutcome::FailedOver {
        vm,
        epoch: standby.epoch,
        reason,
    })
}
