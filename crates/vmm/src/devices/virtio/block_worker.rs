//! The I/O thread of one virtio-blk disk. The guest's queue notify reaches it through an
//! ioeventfd (KVM signals the eventfd without a userspace exit), it serves requests outside the
//! transport lock (the lock is held only to pop a chain and to add it to the used ring) and
//! interrupts the guest through the transport's irqfd. Pause quiesces it at a request
//! boundary: no request is popped but not yet used when the VM state is captured, so the
//! queue indices, the used ring, guest memory and the FT disk log agree.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use super::block_request::BlockIo;
use super::mmio::MmioTransport;
use crate::devices::lock;
use crate::memory::GuestMemory;

/// The only queue of a virtio-blk device.
const REQUEST_QUEUE: usize = 0;

#[derive(Default)]
struct GateState {
    paused: bool,
    busy: bool,
    stopped: bool,
}

/// Lets the monitor stop an I/O thread between requests.
#[derive(Default)]
pub struct IoGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

/// Held by the I/O thread while it serves one request.
pub struct Busy<'a>(&'a IoGate);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        lock(&self.0.state).busy = false;
        self.0.changed.notify_all();
    }
}

impl IoGate {
    /// Waits until the thread is between requests and keeps it there until `resume`.
    pub fn pause(&self) {
        let mut s = lock(&self.state);
        s.paused = true;
        while s.busy {
            s = self
                .changed
                .wait(s)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }

    /// Lets the thread serve requests again.
    pub fn resume(&self) {
        lock(&self.state).paused = false;
        self.changed.notify_all();
    }

    /// Ends the thread at its next request boundary.
    pub fn stop(&self) {
        lock(&self.state).stopped = true;
        self.changed.notify_all();
    }

    /// Waits while paused; `None` once stopped, else the right to serve one request.
    pub fn enter(&self) -> Option<Busy<'_>> {
        let mut s = lock(&self.state);
        while s.paused && !s.stopped {
            s = self
                .changed
                .wait(s)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        if s.stopped {
            return None;
        }
        s.busy = true;
        Some(Busy(self))
    }
}

/// What the I/O thread of one disk works with.
pub struct BlockWorker {
    /// The disk's transport (queues, interrupt).
    pub transport: Arc<Mutex<MmioTransport>>,
    /// Serves the requests.
    pub io: BlockIo,
    /// Guest memory.
    pub mem: GuestMemory,
    /// Signalled by the guest's queue notify (ioeventfd) or by the transport.
    pub notify: EventFd,
    /// Pause and stop.
    pub gate: Arc<IoGate>,
}

impl BlockWorker {
    /// Serves every request available now; false once the gate says stop.
    pub fn drain(&mut self) -> bool {
        loop {
            let Some(_busy) = self.gate.enter() else {
                return false;
            };
            let Some(chain) = lock(&self.transport).pop_chain(REQUEST_QUEUE) else {
                return true;
            };
            let used = self.io.serve(&self.mem, &chain.descs);
            lock(&self.transport).complete(chain, used);
        }
    }

    /// Starts the thread; it ends when `stop` is signalled or the gate stops.
    pub fn spawn(mut self, name: String, stop: EventFd) -> std::io::Result<JoinHandle<()>> {
        std::thread::Builder::new().name(name).spawn(move || loop {
            let mut fds = [
                libc::pollfd {
                    fd: stop.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.notify.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 {
                continue;
            }
            if fds[0].revents != 0 {
                return;
            }
            let _ = self.notify.read();
            if !self.drain() {
                return;
            }
        })
    }
}
