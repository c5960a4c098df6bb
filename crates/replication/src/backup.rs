//! The backup's engine: holds a standby copy of the VM, commits each checkpoint atomically,
//! acknowledges it, and resumes the guest from the last committed checkpoint when the primary
//! is lost.

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::time::Duration;

use vmm::devices::lock;
use vmm::{ConsoleConfig, DiskConfig, NetConfig, Vm, VmState};

use crate::announce::rarp_frame;
use crate::pages;
use crate::protocol::{self, Ack, Checkpoint, Hello};
use crate::status::{FtState, FtStatus};
use crate::wire::{self, Kind, WireError};
use crate::Error;

/// How the backup is set up.
#[derive(Debug, Clone)]
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
    /// Silence on the A-link after which the primary is declared lost.
    pub timeout: Duration,
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
    /// The primary ended protection in order (guest shut down).
    PrimaryStopped,
}

struct Standby {
    vm: Vm,
    state: Option<VmState>,
    epoch: u64,
    /// Frames of the last committed epoch (resent after a failover).
    output: Vec<Vec<Vec<u8>>>,
}

/// Waits for a primary on `opts.listen` and stands by until it is lost or stops.
pub fn run_backup(opts: &BackupOptions, status: Arc<FtStatus>) -> Result<BackupOutcome, Error> {
    let listener = TcpListener::bind(opts.listen).map_err(|e| {
        Error::Io(format!(
            "cannot listen on {}: {e} (is the address on this node?)",
            opts.listen
        ))
    })?;
    status.set_state(
        FtState::Syncing,
        format!("waiting for the primary on {}", opts.listen),
    );
    let (stream, peer) = listener
        .accept()
        .map_err(|e| Error::Io(format!("accept: {e}")))?;
    drop(listener);
    tracing::info!("primary connected from {peer}");
    stream
        .set_nodelay(true)
        .map_err(|e| Error::Io(e.to_string()))?;
    let mut r = BufReader::with_capacity(
        1 << 20,
        stream.try_clone().map_err(|e| Error::Io(e.to_string()))?,
    );
    let mut w = BufWriter::new(stream);
    // Key exchange, then the authenticated Hello.
    r.get_ref()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| Error::Io(e.to_string()))?;
    let (mut tx, mut rx) = wire::handshake(&mut r, &mut w, &opts.secret, wire::Role::Responder)?;
    let hello = rx.recv(&mut r)?;
    if hello.kind != Kind::Hello {
        return Err(Error::Protocol(format!(
            "expected Hello, got {:?}",
            hello.kind
        )));
    }
    let hello: Hello = protocol::decode(&hello.payload)?;
    let mut standby = Standby {
        vm: build_standby(opts, hello)?,
        state: None,
        epoch: 0,
        output: Vec::new(),
    };
    tx.send(&mut w, Kind::Ready, &[])?;
    r.get_ref()
        .set_read_timeout(Some(opts.timeout))
        .map_err(|e| Error::Io(e.to_string()))?;

    let reason = loop {
        let frame = match rx.recv(&mut r) {
            Ok(f) => f,
            Err(WireError::Io(e)) => break format!("A-link silent or broken: {e}"),
            Err(e) => {
                // Refused frame: nothing of it is applied; the stream can no longer be trusted.
                status.update(|s| s.rejected_frames += 1);
                tracing::warn!("{e}");
                break format!("refused a frame ({e})");
            }
        };
        match frame.kind {
            Kind::Pages => {
                let batch: pages::PageBatch = protocol::decode(&frame.payload)?;
                batch.check_addresses(standby.vm.memory())?;
                let data = batch.decode(standby.vm.memory())?;
                pages::apply(standby.vm.memory(), &batch.addrs, &data)?;
            }
            Kind::Disk => apply_disk_chunk(&standby, &frame.payload)?,
            Kind::Checkpoint => match commit(&mut standby, &frame.payload) {
                Ok(epoch) => {
                    tx.send(&mut w, Kind::Ack, &protocol::encode(&Ack { epoch })?)?;
                    if epoch == 1 {
                        status.set_state(FtState::Protected, "first checkpoint committed");
                    }
                    status.update(|s| {
                        s.epoch = epoch;
                        s.checkpoints += 1;
                        s.last_bytes = frame.payload.len() as u64;
                    });
                }
                Err(e) => {
                    status.update(|s| s.rejected_frames += 1);
                    tracing::warn!("checkpoint refused: {e}");
                    break format!("refused a checkpoint ({e})");
                }
            },
            Kind::Heartbeat => {}
            Kind::Bye => {
                status.set_state(FtState::Stopped, "the primary ended protection");
                return Ok(BackupOutcome::PrimaryStopped);
            }
            other => break format!("unexpected {other:?} frame"),
        }
    };
    failover(standby, reason, &status)
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

/// Verifies a checkpoint completely, then applies it: pages, disk writes, state.
fn commit(standby: &mut Standby, payload: &[u8]) -> Result<u64, Error> {
    let cp: Checkpoint = protocol::decode(payload)?;
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
    let data = cp.pages.decode(standby.vm.memory())?;
    // Everything is verified: apply.
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
    Ok(cp.epoch)
}

/// Resumes the guest from the last committed checkpoint and announces its MACs.
fn failover(standby: Standby, reason: String, status: &FtStatus) -> Result<BackupOutcome, Error> {
    let Some(state) = standby.state else {
        status.set_state(
            FtState::Stopped,
            format!("primary lost before the first checkpoint: {reason}"),
        );
        return Err(Error::Protocol(format!(
            "the primary was lost before the first checkpoint ({reason}); there is no state to resume"
        )));
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
