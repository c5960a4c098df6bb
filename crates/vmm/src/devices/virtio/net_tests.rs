//! virtio-net on real taps: a received frame no guest buffer has taken yet is part of the
//! device state and comes back on restore. Needs root (taps).

use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vm_memory::GuestAddress;

use super::*;

const MAC: [u8; 6] = [0x52, 0x54, 0, 1, 2, 3];

fn pending_frame(net: &Net) -> Option<Vec<u8>> {
    match net.snapshot() {
        DeviceSnapshot::Net { rx_pending, .. } => rx_pending,
        DeviceSnapshot::Block => panic!("not a net snapshot"),
    }
}

#[test]
fn a_pending_received_frame_is_captured_and_restored() {
    testbed::require_root();
    let tap = testbed::TapDevice::new().unwrap();
    let mut net = Net::new(Tap::open(&tap.name).unwrap(), MAC).unwrap();
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    // The receive queue has no buffers (not even set up): a frame read stays pending.
    let mut queues = vec![Queue::new(256).unwrap(), Queue::new(256).unwrap()];
    assert_eq!(pending_frame(&net), None);
    // Sending to the guest's address makes the host ARP for it through the tap (IPv6 may send
    // its own multicast frames first: any frame will do).
    let sock = std::net::UdpSocket::bind(format!("{}:0", tap.host_ip)).unwrap();
    let t0 = Instant::now();
    while !net.backend_blocked() {
        let _ = sock.send_to(b"x", format!("{}:9", tap.guest_ip));
        std::thread::sleep(Duration::from_millis(20));
        net.poll_backend(&mut queues, &mem);
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no frame came out of the tap"
        );
    }
    let frame = pending_frame(&net).expect("a pending frame in the snapshot");
    assert!(
        frame.len() >= 42 && frame.len() <= MAX_FRAME,
        "{} bytes",
        frame.len()
    );
    assert_eq!(
        frame[0] & 1,
        1,
        "a broadcast or multicast frame: {frame:02x?}"
    );

    let other = testbed::TapDevice::new().unwrap();
    let mut copy = Net::new(Tap::open(&other.name).unwrap(), MAC).unwrap();
    copy.restore(&net.snapshot()).unwrap();
    assert_eq!(pending_frame(&copy), Some(frame.clone()));
    assert!(
        copy.backend_blocked(),
        "the restored frame waits for a guest buffer"
    );
    // Bad states are refused and change nothing.
    let wrong_mac = DeviceSnapshot::Net {
        mac: [0x52, 0x54, 0, 9, 9, 9],
        rx_pending: None,
    };
    assert!(copy.restore(&wrong_mac).is_err());
    let huge = DeviceSnapshot::Net {
        mac: MAC,
        rx_pending: Some(vec![0; MAX_FRAME + 1]),
    };
    assert!(copy.restore(&huge).is_err());
    assert!(copy.restore(&DeviceSnapshot::Block).is_err());
    assert_eq!(pending_frame(&copy), Some(frame));
    // A state without a pending frame clears it.
    copy.restore(&DeviceSnapshot::Net {
        mac: MAC,
        rx_pending: None,
    })
    .unwrap();
    assert!(!copy.backend_blocked());
}
