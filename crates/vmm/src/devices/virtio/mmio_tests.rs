//! Tests of the virtio-mmio transport against a real virtio-blk device on a raw file: register
//! reads and writes, feature negotiation, queue setup, bad accesses, a request end to end
//! through the disk's I/O path, reset and snapshot/restore.

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::virtio::block::{Block, SharedBackend};
use crate::devices::virtio::block_request::{BlockIo, S_OK, T_OUT};
use crate::devices::virtio::block_worker::BlockWorker;
use crate::devices::BusDevice;

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 8;
const DISK: usize = 64 << 10;

struct Rig {
    t: Arc<Mutex<MmioTransport>>,
    mem: GuestMemory,
    irq: EventFd,
    worker: BlockWorker,
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
}

fn rig() -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk.raw");
    std::fs::write(&path, vec![0u8; DISK]).unwrap();
    let backend: SharedBackend = Arc::new(Mutex::new(
        storage::open_disk(&path, false, Some(storage::ImageFormat::Raw)).unwrap(),
    ));
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let dev = Block::new(&backend, notify.try_clone().unwrap());
    let t = Arc::new(Mutex::new(MmioTransport::new(
        Box::new(dev),
        mem.clone(),
        irq.try_clone().unwrap(),
    )));
    let worker = BlockWorker {
        transport: t.clone(),
        io: BlockIo::new(backend, Arc::default(), "t"),
        mem: mem.clone(),
        notify,
        gate: Arc::default(),
    };
    Rig {
        t,
        mem,
        irq,
        worker,
        _dir: dir,
        path,
    }
}

fn r32(t: &Mutex<MmioTransport>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.lock().unwrap().read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w32(t: &Mutex<MmioTransport>, off: u64, v: u32) {
    t.lock().unwrap().write(off, &v.to_le_bytes());
}

/// Negotiates VERSION_1 and sets queue 0 up (size 8 at DESC/AVAIL/USED), DRIVER_OK.
fn setup(t: &Mutex<MmioTransport>) {
    w32(t, 0x070, 1 | 2); // ACKNOWLEDGE | DRIVER
    w32(t, 0x024, 1);
    w32(t, 0x020, 1); // VERSION_1 (bit 32)
    w32(t, 0x070, 1 | 2 | 8); // FEATURES_OK
    w32(t, 0x030, 0);
    w32(t, 0x038, u32::from(QSIZE));
    for (off, addr) in [(0x080, DESC), (0x090, AVAIL), (0x0a0, USED)] {
        w32(t, off, addr as u32);
        w32(t, off + 4, (addr >> 32) as u32);
    }
    w32(t, 0x044, 1);
    w32(t, 0x070, 1 | 2 | 8 | 4); // DRIVER_OK
}

/// Puts a write request (header, 512 bytes of `fill` for `sector`, status) on the avail ring.
fn post_write(mem: &GuestMemory, avail_idx: u16, sector: u64, fill: u8) {
    let hdr = GuestAddress(0x5000);
    let data = GuestAddress(0x6000);
    let status = GuestAddress(0x7000);
    mem.write_obj(T_OUT, hdr).unwrap();
    mem.write_obj(sector, GuestAddress(hdr.0 + 8)).unwrap();
    mem.write_slice(&[fill; 512], data).unwrap();
    mem.write_obj(0xffu8, status).unwrap();
    // Descriptors 0 → 1 → 2 (VIRTQ_DESC_F_NEXT = 1, F_WRITE = 2).
    for (i, (addr, len, flags, next)) in [
        (hdr.0, 16u32, 1u16, 1u16),
        (data.0, 512, 1, 2),
        (status.0, 1, 2, 0),
    ]
    .into_iter()
    .enumerate()
    {
        let d = GuestAddress(DESC + 16 * i as u64);
        mem.write_obj(addr, d).unwrap();
        mem.write_obj(len, GuestAddress(d.0 + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(d.0 + 12)).unwrap();
        mem.write_obj(next, GuestAddress(d.0 + 14)).unwrap();
    }
    let slot = u64::from((avail_idx - 1) % QSIZE);
    mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * slot))
        .unwrap();
    mem.write_obj(avail_idx, GuestAddress(AVAIL + 2)).unwrap();
}

fn used_idx(mem: &GuestMemory) -> u16 {
    mem.read_obj(GuestAddress(USED + 2)).unwrap()
}

#[test]
fn identification_and_config_registers() {
    let r = rig();
    assert_eq!(r32(&r.t, 0x000), 0x7472_6976);
    assert_eq!(r32(&r.t, 0x004), 2);
    assert_eq!(r32(&r.t, 0x008), super::super::TYPE_BLOCK);
    assert_eq!(r32(&r.t, 0x00c), VENDOR_ID);
    // Byte reads of a register see its little-endian bytes.
    let mut b = [0u8; 1];
    r.t.lock().unwrap().read(0x001, &mut b);
    assert_eq!(b[0], b'i');
    // Configuration space: capacity in sectors, then zeros past its end.
    let mut cap = [0u8; 8];
    r.t.lock().unwrap().read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK / 512) as u64);
    let mut past = [0xffu8; 4];
    r.t.lock().unwrap().read(0x100 + 4096, &mut past);
    assert_eq!(past, [0; 4]);
    assert_eq!(r32(&r.t, 0x0f0), 0, "unknown registers read as zero");
}

#[test]
fn feature_negotiation_acks_only_offered_features() {
    let r = rig();
    let offered = r.t.lock().unwrap().device.features();
    w32(&r.t, 0x014, 0);
    assert_eq!(r32(&r.t, 0x010), offered as u32);
    w32(&r.t, 0x014, 1);
    assert_eq!(r32(&r.t, 0x010), (offered >> 32) as u32);
    assert_eq!(r32(&r.t, 0x010) & 1, 1, "VERSION_1 is offered");
    w32(&r.t, 0x014, 7);
    assert_eq!(r32(&r.t, 0x010), 0, "no feature words beyond the second");
    // The driver asks for everything: only what is offered is acknowledged.
    for sel in [0, 1, 2] {
        w32(&r.t, 0x024, sel);
        w32(&r.t, 0x020, u32::MAX);
    }
    assert_eq!(r.t.lock().unwrap().acked_features, offered);
}

#[test]
fn queue_setup_and_bad_accesses() {
    let r = rig();
    w32(&r.t, 0x030, 0);
    assert_eq!(r32(&r.t, 0x034), 256, "QueueNumMax");
    setup(&r.t);
    assert_eq!(r32(&r.t, 0x044), 1, "QueueReady");
    let q = r.t.lock().unwrap().snapshot().queues[0];
    assert_eq!(
        (q.size, q.desc_table, q.avail_ring, q.used_ring),
        (QSIZE, DESC, AVAIL, USED)
    );
    // Layout registers are frozen while the queue is ready.
    w32(&r.t, 0x080, 0x9000);
    assert_eq!(r.t.lock().unwrap().snapshot().queues[0].desc_table, DESC);
    // A queue that does not exist: reads zero, writes go nowhere.
    w32(&r.t, 0x030, 5);
    assert_eq!(r32(&r.t, 0x034), 0);
    w32(&r.t, 0x038, 4);
    w32(&r.t, 0x044, 1);
    assert_eq!(r32(&r.t, 0x044), 0);
    w32(&r.t, 0x050, 5); // notify of a queue that does not exist
                         // Accesses other than 32 bits to registers and writes to the configuration are ignored.
    r.t.lock().unwrap().write(0x070, &[0u8; 2]);
    assert_eq!(
        r32(&r.t, 0x070),
        15,
        "a 16-bit write did not reset the device"
    );
    r.t.lock().unwrap().write(0x100, &[1, 2, 3, 4]);
    let mut cap = [0u8; 8];
    r.t.lock().unwrap().read(0x100, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), (DISK / 512) as u64);
    // Reset (status 0) clears everything.
    w32(&r.t, 0x070, 0);
    assert_eq!(r32(&r.t, 0x070), 0);
    w32(&r.t, 0x030, 0);
    assert_eq!(r32(&r.t, 0x044), 0, "queue not ready after reset");
    assert_eq!(r.t.lock().unwrap().acked_features, 0);
}

#[test]
fn a_request_goes_through_the_io_path_and_interrupts() {
    let mut r = rig();
    post_write(&r.mem, 1, 3, 0x5a);
    // Before DRIVER_OK a notify does nothing and nothing is served.
    w32(&r.t, 0x050, 0);
    assert!(
        r.worker.notify.read().is_err(),
        "no wakeup before DRIVER_OK"
    );
    setup(&r.t);
    // A notify that reaches the transport (no ioeventfd here) wakes the I/O thread.
    w32(&r.t, 0x050, 0);
    assert_eq!(r.worker.notify.read().unwrap(), 1);
    assert!(r.worker.drain());
    assert_eq!(used_idx(&r.mem), 1);
    let used_len: u32 = r.mem.read_obj(GuestAddress(USED + 4 + 4)).unwrap();
    assert_eq!(used_len, 1, "a write returns the status byte only");
    assert_eq!(r.mem.read_obj::<u8>(GuestAddress(0x7000)).unwrap(), S_OK);
    let disk = std::fs::read(&r.path).unwrap();
    assert!(disk[3 * 512..4 * 512].iter().all(|&b| b == 0x5a));
    assert!(disk[..3 * 512].iter().all(|&b| b == 0));
    // Interrupt: irqfd signalled, status bit set until acknowledged.
    assert_eq!(r.irq.read().unwrap(), 1);
    assert_eq!(r32(&r.t, 0x060), 1);
    w32(&r.t, 0x064, 1);
    assert_eq!(r32(&r.t, 0x060), 0);
    // Nothing more to do: the ring is drained.
    assert!(r.worker.drain());
    assert_eq!(used_idx(&r.mem), 1);
}

#[test]
fn a_chain_popped_before_a_reset_is_not_completed_into_the_new_queue() {
    let r = rig();
    setup(&r.t);
    post_write(&r.mem, 1, 0, 1);
    let chain = r.t.lock().unwrap().pop_chain(0).unwrap();
    assert_eq!(chain.descs.len(), 3);
    w32(&r.t, 0x070, 0);
    setup(&r.t);
    r.t.lock().unwrap().complete(chain, 1);
    assert_eq!(used_idx(&r.mem), 0);
    assert!(r.irq.read().is_err(), "no interrupt for a dropped chain");
}

#[test]
fn snapshot_and_restore_carry_registers_and_queue_positions() {
    let r = rig();
    setup(&r.t);
    post_write(&r.mem, 1, 0, 1);
    let chain = r.t.lock().unwrap().pop_chain(0).unwrap();
    r.t.lock().unwrap().complete(chain, 1);
    let snap = r.t.lock().unwrap().snapshot();
    let other = rig();
    other.t.lock().unwrap().restore(&snap).unwrap();
    let again = other.t.lock().unwrap().snapshot();
    assert_eq!(format!("{snap:?}"), format!("{again:?}"));
    assert_eq!(
        (again.queues[0].next_avail, again.queues[0].next_used),
        (1, 1)
    );
    assert_eq!(r32(&other.t, 0x070), 15);
    assert_eq!(r32(&other.t, 0x060), 1, "the pending interrupt is restored");
    assert_eq!(other.irq.read().unwrap(), 1, "and raised again");
    // A snapshot of another device kind is refused.
    let mut bad = snap.clone();
    bad.device = DeviceSnapshot::Net {
        mac: [0; 6],
        rx_pending: None,
    };
    assert!(other.t.lock().unwrap().restore(&bad).is_err());
    let mut bad = snap;
    bad.queues.push(bad.queues[0]);
    assert!(other.t.lock().unwrap().restore(&bad).is_err());
}
