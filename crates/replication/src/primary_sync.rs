//! The primary's side of starting a session: connect, key exchange and Hello, then the initial
//! sync (disks, iterative memory pre-copy) while the guest runs.

use std::io::{BufReader, BufWriter};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::link::Link;
use crate::pages::PageBatch;
use crate::primary::Primary;
use crate::protocol::{self, Hello};
use crate::wire::{self, Kind};
use crate::Error;

/// Pages per pre-copy frame.
const PRECOPY_BATCH: usize = 4096;
/// Pre-copy stops iterating when fewer pages than this are dirty.
const PRECOPY_DONE_PAGES: usize = 4096;
/// Most pre-copy rounds after the full copy.
const PRECOPY_ROUNDS: usize = 8;
/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// A send blocked this long means the A-link is stuck.
const SEND_STUCK: Duration = Duration::from_secs(10);
/// How long the backup may take to build its standby VM.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

impl Primary {
    /// Connects and runs the handshake; the session id comes from the handshake.
    pub(crate) fn connect(&mut self) -> Result<Link, Error> {
        let io = |e: std::io::Error| Error::Io(e.to_string());
        let stream = TcpStream::connect_timeout(&self.opts.peer, CONNECT_TIMEOUT).map_err(|e| {
            Error::Io(format!(
                "cannot reach the backup at {}: {e}",
                self.opts.peer
            ))
        })?;
        stream.set_nodelay(true).map_err(io)?;
        // A stuck A-link must not block this engine forever in a send (a guard, not a death
        // detector: a backup applying slowly under load drains far sooner).
        stream.set_write_timeout(Some(SEND_STUCK)).map_err(io)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io)?;
        let mut r = BufReader::with_capacity(1 << 16, stream.try_clone().map_err(io)?);
        let mut w = BufWriter::with_capacity(1 << 20, stream.try_clone().map_err(io)?);
        let (mut tx, mut rx, session) =
            wire::handshake_session(&mut r, &mut w, &self.opts.secret, wire::Role::Initiator)?;
        // A new session: the backup's memory is what this session sends it.
        self.staging.set_delta(self.opts.delta);
        // From the Hello on, the backup may come to hold a standby of this session.
        self.last_session = session;
        if let Some(wp) = &self.opts.watch {
            wp.ask_release(0);
            wp.set_own(true, crate::liveness::PeerState::PrimaryLive, session, 0);
        }
        let hello = Hello {
            config: self.vm.config().clone(),
            kind: self.vm.kind(),
            cpu: self.vm.cpu_model().clone(),
        };
        tx.send(&mut w, Kind::Hello, &protocol::encode(&hello)?)?;
        let ready = rx.recv(&mut r)?;
        if ready.kind != Kind::Ready {
            return Err(Error::Protocol(format!(
                "expected Ready, got {:?}",
                ready.kind
            )));
        }
        Link::new(stream, r, w, tx, rx, session, None).map_err(io)
    }

    /// Copies every disk while the guest runs; its writes meanwhile are in the disk logs (enabled
    /// before this) and reach the backup with the first checkpoint.
    pub(crate) fn sync_disks(&mut self, link: &mut Link) -> Result<(), Error> {
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
                link.send(Kind::Disk, &protocol::encode(&chunk)?)?;
                offset += n as u64;
            }
        }
        Ok(())
    }

    /// Iterative pre-copy: all memory, then what was dirtied meanwhile, while the guest runs.
    pub(crate) fn precopy(&mut self, link: &mut Link) -> Result<(), Error> {
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
        // A new session's standby starts zeroed too: zero pages are skipped only in the full copy.
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
                // Long runs of zero pages send nothing: keep the backup's A-link alive.
                if last_sent.elapsed() > self.opts.timeout / 4 {
                    link.send(Kind::Heartbeat, &[])?;
                    last_sent = Instant::now();
                }
                continue;
            }
            let batch = PageBatch::compress(keep, &data);
            link.send(Kind::Pages, &protocol::encode(&batch)?)?;
            last_sent = Instant::now();
        }
        Ok(())
    }
}
