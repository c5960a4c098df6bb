//! virtio-net over a host tap device. Transmit is served when the guest notifies the TX queue;
//! receive runs when the tap has frames (the VM's receive thread polls the tap and calls
//! `poll_backend` through the transport).

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::output::NetOutput;
use super::tap::Tap;
use super::{read_config_bytes, DeviceSnapshot, VirtioDevice, TYPE_NET, VIRTIO_F_VERSION_1};
use crate::memory::GuestMemory;

const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_STATUS: u64 = 1 << 16;
/// Size of `virtio_net_hdr_v1` (with VIRTIO_F_VERSION_1).
const NET_HDR_LEN: usize = 12;
/// Largest frame we move (no offloads: MTU 1500 + Ethernet header + VLAN tag).
const MAX_FRAME: usize = 1518;

const RX: usize = 0;
const TX: usize = 1;
const QUEUE_SIZES: &[u16] = &[256, 256];

/// A virtio network device.
pub struct Net {
    tap: Tap,
    output: Arc<NetOutput>,
    mac: [u8; 6],
    config: Vec<u8>,
    /// Signalled when the guest adds receive buffers, so the receive thread retries.
    rx_kick: EventFd,
    /// Length of a received frame waiting in `frame` for a guest buffer.
    pending: Option<usize>,
    frame: Vec<u8>,
}

impl Net {
    /// A network device attached to `tap` with MAC `mac`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> std::io::Result<Self> {
        let mut config = vec![0u8; 10];
        config[0..6].copy_from_slice(&mac);
        config[6..8].copy_from_slice(&1u16.to_le_bytes()); // VIRTIO_NET_S_LINK_UP
        config[8..10].copy_from_slice(&1u16.to_le_bytes());
        let rx_kick = EventFd::new(libc::EFD_NONBLOCK)?;
        let output = Arc::new(NetOutput::new(tap.try_clone_file()?));
        Ok(Self {
            tap,
            output,
            mac,
            config,
            rx_kick,
            pending: None,
            frame: vec![0; NET_HDR_LEN + MAX_FRAME],
        })
    }

    /// The transmit side (for output commit).
    pub fn output(&self) -> Arc<NetOutput> {
        self.output.clone()
    }

    /// The file descriptors the receive thread waits on: the tap and the receive kick.
    pub fn rx_fds(&self) -> std::io::Result<(RawFd, EventFd)> {
        Ok((self.tap.as_raw_fd(), self.rx_kick.try_clone()?))
    }

    fn transmit(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let mut packet = Vec::with_capacity(NET_HDR_LEN + MAX_FRAME);
            for d in chain.filter(|d| !d.is_write_only()) {
                let start = packet.len();
                let len = (d.len() as usize).min(NET_HDR_LEN + 65536 - start);
                packet.resize(start + len, 0);
                if mem.read_slice(&mut packet[start..], d.addr()).is_err() {
                    packet.truncate(start);
                    break;
                }
            }
            if packet.len() > NET_HDR_LEN {
                self.output.transmit(&packet[NET_HDR_LEN..]);
            }
            let _ = queue.add_used(mem, head, 0);
            used = true;
        }
        used
    }

    /// Moves frames from the tap into receive buffers until either runs out.
    fn receive(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        loop {
            let len = match self.pending {
                Some(n) => n,
                None => match self.tap.read_frame(&mut self.frame[NET_HDR_LEN..]) {
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return used, // WouldBlock: nothing more to receive.
                },
            };
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                // Keep the frame until the guest posts buffers.
                self.pending = Some(len);
                return used;
            };
            self.pending = None;
            let head = chain.head_index();
            let buffers: Vec<(GuestAddress, usize)> = chain
                .filter(|d| d.is_write_only())
                .map(|d| (d.addr(), d.len() as usize))
                .collect();
            let total = NET_HDR_LEN + len;
            // virtio_net_hdr_v1: no offloads, num_buffers = 1.
            self.frame[..NET_HDR_LEN].fill(0);
            self.frame[10] = 1;
            let mut copied = 0;
            for (addr, cap) in buffers {
                if copied == total {
                    break;
                }
                let n = cap.min(total - copied);
                if mem
                    .write_slice(&self.frame[copied..copied + n], addr)
                    .is_err()
                {
                    break;
                }
                copied += n;
            }
            // A frame larger than the buffers is truncated, as a NIC would drop it.
            let _ = queue.add_used(mem, head, copied as u32);
            used = true;
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &'static [u16] {
        QUEUE_SIZES
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        match index {
            RX => {
                let _ = self.rx_kick.write(1);
                queues.get_mut(RX).is_some_and(|q| self.receive(q, mem))
            }
            TX => queues.get_mut(TX).is_some_and(|q| self.transmit(q, mem)),
            _ => false,
        }
    }

    fn poll_backend(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        queues.get_mut(RX).is_some_and(|q| self.receive(q, mem))
    }

    fn backend_blocked(&self) -> bool {
        self.pending.is_some()
    }

    fn snapshot(&self) -> DeviceSnapshot {
        DeviceSnapshot::Net {
            mac: self.mac,
            rx_pending: self
                .pending
                .map(|n| self.frame[NET_HDR_LEN..NET_HDR_LEN + n].to_vec()),
        }
    }

    fn restore(&mut self, s: &DeviceSnapshot) -> Result<(), String> {
        let DeviceSnapshot::Net { mac, rx_pending } = s else {
            return Err(format!("a network device cannot load {s:?}"));
        };
        if *mac != self.mac {
            return Err(format!(
                "the snapshot's network interface has MAC {mac:02x?}, this one {:02x?}",
                self.mac
            ));
        }
        match rx_pending {
            Some(f) if f.len() > MAX_FRAME => {
                return Err(format!(
                    "pending received frame of {} bytes is larger than {MAX_FRAME}",
                    f.len()
                ))
            }
            Some(f) => {
                self.frame[NET_HDR_LEN..NET_HDR_LEN + f.len()].copy_from_slice(f);
                self.pending = Some(f.len());
            }
            None => self.pending = None,
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;
