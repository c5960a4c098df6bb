//! The fault matrix's measuring instruments on real namespaces: the LAN capture sees frames
//! injected with the guest's MAC on the right port (and nothing else), the ARP prober reaches
//! the nodes, the A-link proxy delays both directions and drops exactly one frame, and two beds
//! brought up and down concurrently never remove each other's namespaces. Needs root.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use testbed::capture::{ArpProber, LanCapture};
use testbed::netns::{self, AlinkProxy, Fault};
use testbed::timeline::{self, Port};
use testbed::TwoNodeBed;

static N: AtomicU32 = AtomicU32::new(0);

fn prefix(tag: &str) -> String {
    format!(
        "{tag}{}x{}-",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn bed() -> TwoNodeBed {
    testbed::require_root();
    let p = prefix("tf");
    TwoNodeBed::cleanup_stale(&p).unwrap();
    TwoNodeBed::up(&p).unwrap()
}

/// An Ethernet frame from `src` to broadcast with a private ethertype.
fn frame_from(src: [u8; 6], tag: u8) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x88, 0xb5, tag]);
    f.resize(60, 0);
    f
}

/// Writes `frame` to `tap` until the capture has a frame on `port` after `after` (a freshly
/// attached tap forwards only once the kernel saw its carrier); returns its time.
fn inject_until_seen(
    tap: &mut std::fs::File,
    frame: &[u8],
    cap: &LanCapture,
    port: Port,
    after: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        tap.write_all(frame).unwrap();
        if let Some(t) = cap.wait_frame(port, after, Duration::from_millis(50)) {
            return Some(t);
        }
    }
    None
}

#[test]
fn capture_sees_guest_frames_on_the_port_of_the_node_that_sent_them() {
    let bed = bed();
    let mac = netns::parse_mac(bed.guest_mac()).unwrap();
    let other = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let cap = LanCapture::start(&bed, mac).unwrap();
    let mut tap_a = bed.open_tap(bed.node_a(), bed.tap_name()).unwrap();
    let mut tap_b = bed.open_tap(bed.node_b(), bed.tap_name()).unwrap();

    // Frames from another MAC are never captured (sent first, so they would be seen).
    for _ in 0..20 {
        tap_a.write_all(&frame_from(other, 1)).unwrap();
        tap_b.write_all(&frame_from(other, 1)).unwrap();
        std::thread::sleep(Duration::from_millis(50));
    }
    let t_a = inject_until_seen(
        &mut tap_a,
        &frame_from(mac, 2),
        &cap,
        Port::A,
        Duration::ZERO,
    )
    .expect("a guest frame sent from node A's tap reaches to-a");
    // Node A's broadcast is flooded out of to-b as well: that copy is outgoing and not counted.
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        cap.frames().iter().all(|f| f.port == Port::A),
        "{:?}",
        cap.frames()
    );
    let t_b = inject_until_seen(&mut tap_b, &frame_from(mac, 3), &cap, Port::B, t_a)
        .expect("a guest frame sent from node B's tap reaches to-b");
    assert!(t_b > t_a);
    std::thread::sleep(Duration::from_millis(200));
    let frames = cap.frames();
    assert!(frames.iter().all(|f| f.ethertype == 0x88b5 && f.len >= 60));
    // A then B: one hand-over, no period with two copies.
    assert_eq!(timeline::runs(&frames).len(), 2, "{frames:?}");
    assert_eq!(timeline::two_live_copies(&frames), 0);
    // Node A speaking again after node B took over is one period with two copies.
    let t_a2 = inject_until_seen(&mut tap_a, &frame_from(mac, 4), &cap, Port::A, t_b)
        .expect("node A's frame again");
    assert!(t_a2 > t_b);
    assert_eq!(timeline::two_live_copies(&cap.frames()), 1);
    assert_eq!(
        timeline::resurrected_ports(&cap.frames(), t_b),
        vec![Port::A]
    );
}

#[test]
fn capture_keeps_seeing_a_port_that_went_down_and_up() {
    let bed = bed();
    let mac = netns::parse_mac(bed.guest_mac()).unwrap();
    let cap = LanCapture::start(&bed, mac).unwrap();
    let mut tap_a = bed.open_tap(bed.node_a(), bed.tap_name()).unwrap();
    let t1 = inject_until_seen(
        &mut tap_a,
        &frame_from(mac, 1),
        &cap,
        Port::A,
        Duration::ZERO,
    )
    .expect("a guest frame from node A");
    bed.link_down(testbed::netns::Link::LanA).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    tap_a.write_all(&frame_from(mac, 2)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        cap.frames()
            .iter()
            .all(|f| f.t <= t1 + Duration::from_millis(100)),
        "nothing passes a port that is down"
    );
    bed.link_up(testbed::netns::Link::LanA).unwrap();
    let t2 = inject_until_seen(
        &mut tap_a,
        &frame_from(mac, 3),
        &cap,
        Port::A,
        t1 + Duration::from_millis(400),
    )
    .expect("the capture sees node A's port again once it is up");
    assert!(t2 > t1);
}

/// ARP requests for the guest's address read from `tap` within `wait`.
fn arp_requests(tap: &mut std::fs::File, target: [u8; 4], wait: Duration) -> usize {
    let t0 = Instant::now();
    let mut n = 0;
    let mut buf = [0u8; 2048];
    while t0.elapsed() < wait {
        match tap.read(&mut buf) {
            Ok(len) if len >= 42 && buf[12..14] == [0x08, 0x06] && buf[38..42] == target => n += 1,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(2))
            }
            Err(e) => panic!("tap read: {e}"),
        }
    }
    n
}

#[test]
fn arp_prober_asks_both_nodes_for_the_guest() {
    let bed = bed();
    let target: std::net::Ipv4Addr = bed.guest_ip().parse().unwrap();
    let mut tap_a = bed.open_tap(bed.node_a(), bed.tap_name()).unwrap();
    let mut tap_b = bed.open_tap(bed.node_b(), bed.tap_name()).unwrap();
    // Let the freshly attached taps' bridge ports come up.
    std::thread::sleep(Duration::from_millis(1500));
    let _prober = ArpProber::start(&bed, Duration::from_millis(20)).unwrap();
    let a = arp_requests(&mut tap_a, target.octets(), Duration::from_millis(500));
    let b = arp_requests(&mut tap_b, target.octets(), Duration::from_millis(500));
    assert!(a >= 5, "node A saw {a} ARP requests in 500 ms");
    assert!(b >= 5, "node B saw {b} ARP requests in 500 ms");
}

/// A frame in the link's layout (magic, version, kind, length; header tag, payload, payload
/// tag) with `len` payload bytes; its contents are not sealed: the proxy only reads headers.
fn alink_frame(seq: u64, len: usize) -> Vec<u8> {
    let mut f = b"FTLK".to_vec();
    f.extend_from_slice(&[link::VERSION, 5, 0, 0]);
    f.extend_from_slice(&(len as u32).to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&[0x11; 16]);
    f.extend_from_slice(&vec![seq as u8; len]);
    f.extend_from_slice(&[0x5a; 16]);
    assert_eq!(testbed::proxy::frame_len(&f), Some(f.len()));
    f
}

/// An echo server in node B: returns every byte it reads.
fn echo_server(bed: &TwoNodeBed, port: u16) {
    let listener = bed
        .in_ns(bed.node_b(), || TcpListener::bind((bed.alink_ip_b(), port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { break };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

fn connect_from_a(bed: &TwoNodeBed, addr: SocketAddr) -> TcpStream {
    let s = bed
        .in_ns(bed.node_a(), || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        })
        .unwrap()
        .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

#[test]
fn alink_proxy_delays_both_directions_and_drops_exactly_one_frame() {
    let bed = bed();
    echo_server(&bed, 7200);
    let proxy = AlinkProxy::start(&bed, 7201, 7200, Fault::None).unwrap();
    let mut s = connect_from_a(&bed, proxy.addr());
    let mut echo = |data: &[u8]| -> (Vec<u8>, Duration) {
        let t0 = Instant::now();
        s.write_all(data).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
        (back, t0.elapsed())
    };
    let (back, fast) = echo(b"ping");
    assert_eq!(back, b"ping");

    // 150 ms each way: a round trip takes at least 300 ms, and bytes keep their order.
    proxy.set_delay(Duration::from_millis(150));
    let data: Vec<u8> = (0..3000u32).map(|i| (i % 256) as u8).collect();
    let (back, slow) = echo(&data);
    assert_eq!(back, data);
    assert!(
        slow >= Duration::from_millis(300),
        "round trip {slow:?} with 150 ms each way (undelayed {fast:?})"
    );
    proxy.set_delay(Duration::ZERO);
    drop(s);

    // A connection carrying A-link frames: frames 1..=4 sent; the one starting next after
    // arming (frame 2) never arrives.
    let mut s = connect_from_a(&bed, proxy.addr());
    let mut s2 = s.try_clone().unwrap();
    let mut echo = |data: &[u8]| -> Vec<u8> {
        s.write_all(data).unwrap();
        let mut back = vec![0u8; data.len()];
        s.read_exact(&mut back).unwrap();
        back
    };
    // Each direction starts with the handshake's hello, which the proxy passes as it is.
    let hello = vec![0x42u8; link::HELLO_LEN];
    assert_eq!(echo(&hello), hello);
    let f: Vec<Vec<u8>> = (1..=4).map(|i| alink_frame(i, 100 * i as usize)).collect();
    assert_eq!(echo(&f[0]), f[0]);
    proxy.drop_next_frame();
    assert!(proxy.fault_pending());
    // Frames 2 and 3 in one write: only frame 3 comes back, whole.
    let two = [&f[1][..], &f[2][..]].concat();
    let mut back = vec![0u8; f[2].len()];
    s2.write_all(&two).unwrap();
    s2.read_exact(&mut back).unwrap();
    assert_eq!(
        back, f[2],
        "frame 3 arrives whole right after the dropped one"
    );
    assert_eq!(echo(&f[3]), f[3]);
    assert!(!proxy.fault_pending());
    assert_eq!(proxy.faults_applied(), 1);
}

fn names_listed(prefix: &str) -> Vec<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(prefix))
        .map(str::to_string)
        .collect()
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

#[test]
fn beds_brought_up_and_down_concurrently_never_remove_each_other() {
    testbed::require_root();
    // A bed that stays up, with a process in each namespace, while two others cycle.
    let steady = bed();
    let mut sleepers: Vec<std::process::Child> = steady
        .namespaces()
        .iter()
        .map(|ns| {
            steady
                .spawn_in(ns, std::path::Path::new("sleep"), &["600".into()])
                .unwrap()
        })
        .collect();
    let prefixes = [prefix("tc"), prefix("tc")];
    std::thread::scope(|s| {
        for p in &prefixes {
            let steady = &steady;
            s.spawn(move || {
                for round in 0..4 {
                    let _ = TwoNodeBed::cleanup_stale(p);
                    let b = TwoNodeBed::up(p)
                        .unwrap_or_else(|e| panic!("bed {p} round {round}: {e:#}"));
                    assert_eq!(names_listed(p).len(), 3, "bed {p} round {round}");
                    // It works while the other one comes and goes.
                    let listener = b
                        .in_ns(b.node_b(), || TcpListener::bind((b.alink_ip_b(), 0)))
                        .unwrap()
                        .unwrap();
                    let addr = listener.local_addr().unwrap();
                    let c = b
                        .in_ns(b.node_a(), || {
                            TcpStream::connect_timeout(&addr, Duration::from_secs(3))
                        })
                        .unwrap();
                    assert!(c.is_ok(), "bed {p} round {round}: A-link connect {c:?}");
                    assert_eq!(
                        TwoNodeBed::existing(steady.prefix()).len(),
                        3,
                        "bed {p} removed a namespace of the steady bed"
                    );
                    drop(b);
                    assert!(names_listed(p).is_empty(), "bed {p} round {round} left");
                }
            });
        }
    });
    assert_eq!(TwoNodeBed::existing(steady.prefix()).len(), 3);
    for c in &sleepers {
        assert!(alive(c.id()), "a process of the steady bed was killed");
    }
    for p in &prefixes {
        assert!(names_listed(p).is_empty());
    }
    drop(steady);
    for c in &mut sleepers {
        let _ = c.wait();
    }
}
