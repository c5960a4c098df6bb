//! The primary's engine: connects to the backup, copies memory while the guest runs, then
//! checkpoints continuously. `Primary::checkpoint` is the whole per-checkpoint path:
//! pause → dirty log → copy → resume → send → ack → release output.

use std::io::{BufReader, BufWriter};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::Vm;

use crate::pages::{PageBatch, Staging};
use crate::protocol::{self, Ack, Checkpoint, Hello};
use crate::status::{FtState, FtStatus, PausePhases};
use crate::wire::{self, Channel, Kind};
use crate::Error;

/// FT settings of a protected VM.
#[derive(Debug, Clone)]
pub struct FtOptions {
    /// The backup's A-link address.
    pub peer: SocketAddr,
    /// The cluster secret (HMAC key material).
    pub secret: Vec<u8>,
    /// Shortest checkpoint interval.
    pub min_interval: Duration,
    /// Longest checkpoint interval.
    pub max_interval: Duration,
    /// How long the primary waits for an acknowledgement before declaring the backup lost;
    /// also the backup's failover timeout.
    pub timeout: Duration,
    /// How long to keep trying to reach the backup at start.
    pub connect_timeout: Duration,
    /// Copy every disk to the backup during the initial sync (off only when the volumes are
    /// known to be identical, e.g. freshly mirrored and not yet used).
    pub sync_disks: bool,
    /// Send pages written again as deltas against the copy the backup holds.
    pub delta: bool,
}

impl FtOptions {
    /// Defaults: 2–20 ms interval, 100 ms timeout.
    pub fn new(peer: SocketAddr, secret: Vec<u8>) -> Self {
        Self {
            peer,
            secret,
            min_interval: Duration::from_millis(2),
            max_interval: Duration::from_millis(20),
            timeout: Duration::from_millis(100),
            connect_timeout: Duration::from_secs(30),
            sync_disks: true,
            delta: true,
        }
    }
}

/// Pages per pre-copy frame.
const PRECOPY_BATCH: usize = 4096;
/// Pre-copy stops iterating when fewer pages than this are dirty.
const PRECOPY_DONE_PAGES: usize = 4096;
/// Most pre-copy rounds after the full copy.
const PRECOPY_ROUNDS: usize = 8;

/// Starts protecting `vm` (already running or about to run) on a new thread.
///
/// Disks are copied to the backup during the initial sync (writes meanwhile travel with the first
/// checkpoint). With `sync_disks` off, call this before `vm.start()`: writes are then recorded
/// from the first guest instruction, and the backup's volumes must equal the primary's at start.
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
    std::thread::Builder::new()
        .name("ft-primary".into())
        .spawn(move || {
            let mut p = Primary {
                vm,
                opts,
                status,
                staging: Staging::default(),
                tx: Channel::new(),
                rx: Channel::new(),
                in_flight: Vec::new(),
            };
            match p.run() {
                Ok(()) => {}
                Err(e) => p.degrade(&e.to_string()),
            }
        })
}

struct Primary {
    vm: Arc<Vm>,
    opts: FtOptions,
    status: Arc<FtStatus>,
    staging: Staging,
    tx: Channel,
    rx: Channel,
    /// Output of the checkpoint awaiting its acknowledgement, per network interface.
    in_flight: Vec<Vec<Vec<u8>>>,
}

struct Link {
    w: BufWriter<TcpStream>,
    r: BufReader<TcpStream>,
}

impl Primary {
    fn run(&mut self) -> Result<(), Error> {
        self.status.set_state(
            FtState::Syncing,
            format!("connecting to {}", self.opts.peer),
        );
        let mut link = self.connect()?;
        self.handshake(&mut link)?;
        // A new session: the backup's memory is what this session sends it.
        self.staging.set_delta(self.opts.delta);
        if self.opts.sync_disks {
            self.status.set_state(FtState::Syncing, "copying disks");
            // Writes from here on reach the backup with the first checkpoint, after the copy.
            for log in self.vm.disk_logs() {
                log.enable();
            }
            self.sync_disks(&mut link)?;
        }
        self.status.set_state(FtState::Syncing, "copying memory");
        self.precopy(&mut link)?;

        // The first checkpoint is the final stop of the initial sync; from here output is held.
        let mut epoch = 1;
        let mut due = Instant::now();
        let mut window = (Instant::now(), 0u64);
        loop {
            let stats = self.checkpoint(&mut link, epoch)?;
            if epoch == 1 {
                self.status
                    .set_state(FtState::Protected, "first checkpoint acknowledged");
            }
            // Adaptive interval: keep checkpoint work to about a quarter of the time, within bounds.
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
            if self.vm.wait_exit(Duration::ZERO).is_some() {
                let _ = self.tx.send(&mut link.w, Kind::Bye, &[]);
                self.status.set_state(FtState::Stopped, "the guest stopped");
                self.release_all();
                return Ok(());
            }
        }
    }

    /// The per-checkpoint path.
    fn checkpoint(&mut self, link: &mut Link, epoch: u64) -> Result<EpochStats, Error> {
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
            for o in self.vm.net_outputs() {
                o.hold();
            }
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
        self.tx.send(&mut link.w, Kind::Checkpoint, &payload)?;

        // 6. ack
        let frame = self.rx.recv(&mut link.r)?;
        if frame.kind != Kind::Ack {
            return Err(Error::Protocol(format!(
                "expected Ack, got {:?}",
                frame.kind
            )));
        }
        let ack: Ack = protocol::decode(&frame.payload)?;
        if ack.epoch != epoch {
            return Err(Error::Protocol(format!(
                "ack for epoch {} while {epoch} is outstanding",
                ack.epoch
            )));
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
        Ok(EpochStats {
            pause,
            phases,
            busy: t0.elapsed(),
            pages: self.staging.len(),
            bytes: payload.len(),
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

    fn connect(&self) -> Result<Link, Error> {
        let t0 = Instant::now();
        let stream = loop {
            match TcpStream::connect_timeout(&self.opts.peer, Duration::from_millis(500)) {
                Ok(s) => break s,
                Err(e) if t0.elapsed() < self.opts.connect_timeout => {
                    tracing::debug!("backup {} not reachable yet: {e}", self.opts.peer);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => {
                    return Err(Error::Io(format!(
                        "cannot reach the backup at {}: {e}",
                        self.opts.peer
                    )))
                }
            }
        };
        stream
            .set_nodelay(true)
            .map_err(|e| Error::Io(e.to_string()))?;
        stream
            .set_read_timeout(Some(self.opts.timeout))
            .map_err(|e| Error::Io(e.to_string()))?;
        let r = BufReader::with_capacity(
            1 << 16,
            stream.try_clone().map_err(|e| Error::Io(e.to_string()))?,
        );
        Ok(Link {
            w: BufWriter::with_capacity(1 << 20, stream),
            r,
        })
    }

    fn handshake(&mut self, link: &mut Link) -> Result<(), Error> {
        // The backup may take a while to build its standby VM: allow for it.
        link.r
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| Error::Io(e.to_string()))?;
        (self.tx, self.rx) = wire::handshake(
            &mut link.r,
            &mut link.w,
            &self.opts.secret,
            wire::Role::Initiator,
        )?;
        let hello = Hello {
            config: self.vm.config().clone(),
            kind: self.vm.kind(),
            cpu: self.vm.cpu_model().clone(),
        };
        self.tx
            .send(&mut link.w, Kind::Hello, &protocol::encode(&hello)?)?;
        let ready = self.rx.recv(&mut link.r)?;
        if ready.kind != Kind::Ready {
            return Err(Error::Protocol(format!(
                "expected Ready, got {:?}",
                ready.kind
            )));
        }
        link.r
            .get_ref()
            .set_read_timeout(Some(self.opts.timeout))
            .map_err(|e| Error::Io(e.to_string()))?;
        Ok(())
    }

    /// Copies every disk while the guest runs; its writes meanwhile are in the disk logs (enabled
    /// before this) and reach the backup with the first checkpoint.
    fn sync_disks(&mut self, link: &mut Link) -> Result<(), Error> {
        const CHUNK: usize = 1 << 20;
        let mut buf = vec![0u8; CHUNK];
        for (disk, backend) in self.vm.disk_backends().iter().enumerate() {
            let size = vmm::devices::lock(backend).size();
            let mut offset = 0u64;
            while offset < size {
                let n = (size - offset).min(CHUNK as u64) as usize;
                vmm::devices::lock(backend)
                    .read_at(&mut buf[..n], offset)
                    .map_err(|e| Error::Io(format!("cannot read disk {disk} at {offset}: {e}")))?;
                let chunk = protocol::DiskChunk {
                    disk: disk as u32,
                    offset,
                    lz4: lz4_flex::block::compress_prepend_size(&buf[..n]),
                };
                self.tx
                    .send(&mut link.w, Kind::Disk, &protocol::encode(&chunk)?)?;
                offset += n as u64;
            }
        }
        Ok(())
    }

    /// Iterative pre-copy: all memory, then what was dirtied meanwhile, while the guest runs.
    fn precopy(&mut self, link: &mut Link) -> Result<(), Error> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        self.vm.take_dirty_pages()?;
        let mut all = Vec::new();
        for region in self.vm.memory().iter() {
            let base = region.start_addr().0;
            all.extend(
                (0..region.len() / vmm::layout::PAGE_SIZE)
                    .map(|p| base + p * vmm::layout::PAGE_SIZE),
            );
        }
        self.send_pages(link, &all, true)?;
        for _ in 0..PRECOPY_ROUNDS {
            let dirty = self.vm.take_dirty_pages()?;
            let pages: Vec<u64> = dirty.iter().collect();
            if pages.len() < PRECOPY_DONE_PAGES {
                // Few enough: send them and let the first checkpoint carry the rest.
                self.send_pages(link, &pages, false)?;
                break;
            }
            self.send_pages(link, &pages, false)?;
        }
        Ok(())
    }

    fn send_pages(&mut self, link: &mut Link, addrs: &[u64], skip_zero: bool) -> Result<(), Error> {
        use vm_memory::{Bytes, GuestAddress};
        let page = vmm::layout::PAGE_SIZE as usize;
        let mut last_sent = Instant::now();
        for chunk in addrs.chunks(PRECOPY_BATCH) {
            let mut keep = Vec::with_capacity(chunk.len());
            let mut data = Vec::with_capacity(chunk.len() * page);
            let mut buf = vec![0u8; page];
            for &a in chunk {
                self.vm
                    .memory()
                    .read_slice(&mut buf, GuestAddress(a))
                    .map_err(|e| Error::Io(format!("cannot read guest page {a:#x}: {e}")))?;
                if skip_zero && vmm::snapshot::is_zero(&buf) {
                    continue; // the standby's memory starts zeroed
                }
                keep.push(a);
                data.extend_from_slice(&buf);
            }
            if keep.is_empty() {
                // Long runs of zero pages send nothing: keep the backup from timing out.
                if last_sent.elapsed() > self.opts.timeout / 4 {
                    self.tx.send(&mut link.w, Kind::Heartbeat, &[])?;
                    last_sent = Instant::now();
                }
                continue;
            }
            let batch = PageBatch::compress(keep, &data);
            self.tx
                .send(&mut link.w, Kind::Pages, &protocol::encode(&batch)?)?;
            last_sent = Instant::now();
        }
        Ok(())
    }

    /// Lost the backup: run unprotected, let held output go, never stall the guest.
    fn degrade(&mut self, why: &str) {
        tracing::warn!("FT degraded: {why}");
        self.release_all();
        self.status.set_state(FtState::Degraded, why.to_string());
    }

    fn release_all(&mut self) {
        for (o, frames) in self
            .vm
            .net_outputs()
            .iter()
            .zip(std::mem::take(&mut self.in_flight))
        {
            o.release(frames);
        }
        for o in self.vm.net_outputs() {
            o.pass_through();
        }
        for l in self.vm.disk_logs() {
            l.disable();
        }
    }
}

struct EpochStats {
    pause: Duration,
    phases: PausePhases,
    busy: Duration,
    pages: usize,
    bytes: usize,
}
