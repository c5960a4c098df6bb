//! The two-node test bed on real network namespaces. Needs root; skipped (with a message)
//! otherwise. Every test uses its own prefix, so they run in parallel.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use testbed::netns::{self, AlinkProxy, Fault, Link};
use testbed::TwoNodeBed;

static N: AtomicU32 = AtomicU32::new(0);

fn prefix() -> String {
    format!(
        "t{}x{}-",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A fresh bed (the test fails when not root).
fn bed() -> TwoNodeBed {
    testbed::require_root();
    let p = prefix();
    TwoNodeBed::cleanup_stale(&p).unwrap();
    TwoNodeBed::up(&p).unwrap()
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

/// A TCP round trip: a server bound to `bind_ip` in `server_ns`, a client in `client_ns`.
fn tcp_round_trip(bed: &TwoNodeBed, server_ns: &str, bind_ip: &str, client_ns: &str) {
    let listener = bed
        .in_ns(server_ns, || TcpListener::bind((bind_ip, 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, peer) = listener.accept().unwrap();
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf).unwrap();
        s.write_all(&buf.map(|b| b.to_ascii_uppercase())).unwrap();
        peer
    });
    let mut c = bed
        .in_ns(client_ns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("{client_ns} -> {server_ns} {addr}: {e}"));
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    c.write_all(b"hello").unwrap();
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"HELLO");
    let peer = server.join().unwrap();
    assert_eq!(peer.ip(), c.local_addr().unwrap().ip());
}

#[test]
fn alink_carries_traffic_both_ways() {
    let bed = bed();
    tcp_round_trip(&bed, bed.node_b(), bed.alink_ip_b(), bed.node_a());
    tcp_round_trip(&bed, bed.node_a(), bed.alink_ip_a(), bed.node_b());
    // The A-link is not reachable from the client: a listener on node-b's A-link address takes
    // node-a's connection, while the client has no way to it at all (not even a refusal, which
    // would mean its SYN reached node-b).
    let listener = bed
        .in_ns(bed.node_b(), || TcpListener::bind((bed.alink_ip_b(), 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let connect_from = |ns: &str| {
        bed.in_ns(ns, || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(300))
        })
        .unwrap()
    };
    assert!(connect_from(bed.node_a()).is_ok(), "node-a reaches node-b");
    let err = connect_from(bed.client()).expect_err("the client must not reach the A-link");
    assert_ne!(
        err.kind(),
        ErrorKind::ConnectionRefused,
        "the client's connection reached node-b: {err}"
    );
}

#[test]
fn lan_joins_client_and_both_node_bridges() {
    let bed = bed();
    // A temporary address on a node's bridge stands in for a guest behind it. (One address
    // per node: the client's ARP cache would still point an address moved to the other node
    // at the first bridge's MAC.)
    for (node, ip) in [
        (bed.node_a(), "192.168.50.20"),
        (bed.node_b(), "192.168.50.21"),
    ] {
        let cidr = format!("{ip}/24");
        bed.run_in(node, "ip", &["addr", "add", &cidr, "dev", "br0"])
            .unwrap();
        tcp_round_trip(&bed, node, ip, bed.client());
        tcp_round_trip(&bed, bed.client(), bed.client_ip(), node);
        bed.run_in(node, "ip", &["addr", "del", &cidr, "dev", "br0"])
            .unwrap();
    }
    // Each node's management address on its bridge reaches the other node's (the FT watch
    // path), and a node has no other LAN address.
    tcp_round_trip(&bed, bed.node_b(), bed.mgmt_ip_b(), bed.node_a());
    tcp_round_trip(&bed, bed.node_a(), bed.mgmt_ip_a(), bed.node_b());
    let out = bed.run_in(bed.node_a(), "ip", &["-br", "addr"]).unwrap();
    assert_eq!(out.matches("192.168.50.").count(), 1, "{out}");
    assert!(out.contains(bed.mgmt_ip_a()), "{out}");
}

#[test]
fn in_ns_sockets_stay_in_their_namespace() {
    let bed = bed();
    // 10.99.0.1 exists only in node-a: binding succeeds only there.
    let here = UdpSocket::bind((bed.alink_ip_a(), 0));
    assert!(
        here.is_err(),
        "10.99.0.1 must not exist in the test's namespace"
    );
    let a = bed
        .in_ns(bed.node_a(), || UdpSocket::bind((bed.alink_ip_a(), 0)))
        .unwrap()
        .unwrap();
    let b = bed
        .in_ns(bed.node_b(), || UdpSocket::bind((bed.alink_ip_b(), 0)))
        .unwrap()
        .unwrap();
    // Used from this thread, which is in the root namespace.
    a.send_to(b"ping", b.local_addr().unwrap()).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = b.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"ping");
    assert_eq!(from, a.local_addr().unwrap());
    // A namespace's interfaces, as seen from inside it.
    let names = bed
        .in_ns(bed.client(), || {
            ["lan", "to-a", "to-b", "br0", "alink"].map(|n| {
                let c = std::ffi::CString::new(n).unwrap();
                // SAFETY: `c` is a valid NUL-terminated string that outlives the call.
                unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
            })
        })
        .unwrap();
    assert_eq!(names, [true, true, true, false, false]);
    // Names not of this bed are refused.
    assert!(bed.in_ns("some-other-ns", || ()).is_err());
}

fn alive(pid: u32) -> bool {
    // Running or sleeping, not a zombie.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn proc_state(pid: u32) -> char {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    s.rsplit(')')
        .next()
        .unwrap()
        .trim_start()
        .chars()
        .next()
        .unwrap()
}

#[test]
fn kill_node_kills_that_node_only() {
    let bed = bed();
    let sleep = Path::new("sleep");
    let args = ["1000".to_string()];
    let mut a1 = bed.spawn_in(bed.node_a(), sleep, &args).unwrap();
    let mut a2 = bed.spawn_in(bed.node_a(), sleep, &args).unwrap();
    let mut b1 = bed.spawn_in(bed.node_b(), sleep, &args).unwrap();
    let t0 = Instant::now();
    // `ip netns exec` execs the program: the child's pid is sleep's, in the namespace.
    while bed.pids(bed.node_a()).unwrap().len() < 2 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "sleeps did not start"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut in_a = bed.pids(bed.node_a()).unwrap();
    in_a.sort();
    let mut expect = vec![a1.id(), a2.id()];
    expect.sort();
    assert_eq!(in_a, expect);
    assert_eq!(bed.kill_node(bed.node_a()).unwrap(), 2);
    assert!(bed.pids(bed.node_a()).unwrap().is_empty());
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(a1.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert_eq!(a2.wait().unwrap().signal(), Some(libc::SIGKILL));
    assert!(alive(b1.id()), "node-b's process must survive");
    assert_eq!(bed.pids(bed.node_b()).unwrap(), vec![b1.id()]);
    // down() kills the rest.
    bed.down().unwrap();
    assert_eq!(b1.wait().unwrap().signal(), Some(libc::SIGKILL));
}

#[test]
fn freeze_and_thaw() {
    let bed = bed();
    let mut child = bed
        .spawn_in(bed.node_b(), Path::new("sleep"), &["1000".to_string()])
        .unwrap();
    let pid = child.id();
    let t0 = Instant::now();
    while !matches!(proc_state(pid), 'S') {
        assert!(t0.elapsed() < Duration::from_secs(5));
        std::thread::sleep(Duration::from_millis(5));
    }
    bed.freeze(pid).unwrap();
    let t0 = Instant::now();
    while proc_state(pid) != 'T' {
        assert!(t0.elapsed() < Duration::from_secs(5), "not stopped");
        std::thread::sleep(Duration::from_millis(5));
    }
    bed.thaw(pid).unwrap();
    let t0 = Instant::now();
    while proc_state(pid) == 'T' {
        assert!(t0.elapsed() < Duration::from_secs(5), "not continued");
        std::thread::sleep(Duration::from_millis(5));
    }
    // A frozen node is still killed by kill_node.
    let frozen = bed.freeze_node(bed.node_b()).unwrap();
    assert_eq!(frozen, vec![pid]);
    bed.kill_node(bed.node_b()).unwrap();
    child.wait().unwrap();
}

#[test]
fn link_down_cuts_and_link_up_restores() {
    let bed = bed();
    let listener = bed
        .in_ns(bed.node_b(), || TcpListener::bind((bed.alink_ip_b(), 0)))
        .unwrap()
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let connect = || {
        bed.in_ns(bed.node_a(), || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
        })
        .unwrap()
    };
    assert!(connect().is_ok());
    bed.link_down(Link::ALink).unwrap();
    assert!(connect().is_err(), "the A-link is down");
    bed.link_up(Link::ALink).unwrap();
    assert!(connect().is_ok(), "the A-link is up again");

    // LAN uplinks: node-a's bridge is cut from the client while node-b's is not.
    bed.run_in(
        bed.node_a(),
        "ip",
        &["addr", "add", "192.168.50.21/24", "dev", "br0"],
    )
    .unwrap();
    bed.run_in(
        bed.node_b(),
        "ip",
        &["addr", "add", "192.168.50.22/24", "dev", "br0"],
    )
    .unwrap();
    bed.link_down(Link::LanA).unwrap();
    let reach = |ip: &str| {
        let l = bed
            .in_ns(bed.client(), || UdpSocket::bind((bed.client_ip(), 0)))
            .unwrap()
            .unwrap();
        let node = if ip.ends_with("21") {
            bed.node_a()
        } else {
            bed.node_b()
        };
        let s = bed
            .in_ns(node, || UdpSocket::bind((ip, 0)))
            .unwrap()
            .unwrap();
        s.send_to(b"x", l.local_addr().unwrap()).unwrap();
        l.set_read_timeout(Some(Duration::from_millis(1500)))
            .unwrap();
        let mut b = [0u8; 4];
        l.recv_from(&mut b).is_ok()
    };
    assert!(!reach("192.168.50.21"), "node-a's uplink is down");
    assert!(reach("192.168.50.22"));
    bed.link_up(Link::LanA).unwrap();
    assert!(reach("192.168.50.21"), "node-a's uplink is up again");
}

#[test]
fn down_and_drop_leave_nothing() {
    testbed::require_root();
    // down()
    let p = prefix();
    let bed = TwoNodeBed::up(&p).unwrap();
    assert_eq!(names_listed(&p).len(), 3);
    let mut child = bed
        .spawn_in(bed.client(), Path::new("sleep"), &["1000".to_string()])
        .unwrap();
    bed.down().unwrap();
    assert!(names_listed(&p).is_empty());
    child.wait().unwrap();
    bed.down().unwrap(); // idempotent
    drop(bed);

    // Drop after a panic.
    let p = prefix();
    let p2 = p.clone();
    let r = std::panic::catch_unwind(move || {
        let _bed = TwoNodeBed::up(&p2).unwrap();
        panic!("deliberate panic: Drop must clean up the bed");
    });
    assert!(r.is_err());
    assert!(names_listed(&p).is_empty(), "Drop must clean up");

    // A bed kept on purpose (like `ftvm testbed up`), then removed as stale.
    let p = prefix();
    TwoNodeBed::up(&p).unwrap().keep();
    assert_eq!(names_listed(&p).len(), 3);
    assert!(
        TwoNodeBed::up(&p).is_err(),
        "must not build over an existing bed"
    );
    let removed = TwoNodeBed::cleanup_stale(&p).unwrap();
    assert_eq!(removed.len(), 3);
    assert!(names_listed(&p).is_empty());
    assert!(TwoNodeBed::existing(&p).is_empty());

    // Nothing was ever created in the root namespace.
    let out = std::process::Command::new("ip")
        .args(["-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&out.stdout);
    // Lines look like "5: name@peer: <FLAGS> ...".
    let names: Vec<&str> = links
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n))
        .collect();
    for name in ["alink", "to-a", "to-b", "uplink", "lan", "br0", "tap0"] {
        assert!(
            !names.contains(&name),
            "{name} in the root namespace:\n{links}"
        );
    }
}

#[test]
fn parallel_beds_do_not_collide() {
    let one = bed();
    let two = bed();
    std::thread::scope(|s| {
        for bed in [&one, &two] {
            s.spawn(move || {
                tcp_round_trip(bed, bed.node_b(), bed.alink_ip_b(), bed.node_a());
                tcp_round_trip(bed, bed.node_a(), bed.alink_ip_a(), bed.node_b());
            });
        }
    });
    let p1 = one.prefix().to_string();
    drop(one);
    assert!(names_listed(&p1).is_empty());
    // The other bed still works.
    tcp_round_trip(&two, two.node_a(), two.alink_ip_a(), two.node_b());
}

/// A server in node-b that collects everything one connection sends, then replies "done".
fn collector(bed: &TwoNodeBed, ip: &str, port: u16) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let listener = bed
        .in_ns(bed.node_b(), || TcpListener::bind((ip, port)))
        .unwrap()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { break };
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let _ = s.write_all(b"done");
            if tx.send(got).is_err() {
                break;
            }
        }
    });
    rx
}

/// Sends `data` from node-a through `addr`, half-closes, and returns the reply.
fn send_through(bed: &TwoNodeBed, addr: SocketAddr, data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = bed
        .in_ns(bed.node_a(), || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        })
        .unwrap()?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(data)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut back = Vec::new();
    s.read_to_end(&mut back)?;
    Ok(back)
}

fn pattern(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i % 251) as u8).collect()
}

#[test]
fn alink_proxy_forwards_and_corrupts_one_byte() {
    let bed = bed();
    let got = collector(&bed, "0.0.0.0", 7000);
    let proxy = AlinkProxy::start(&bed, 7001, 7000, Fault::CorruptByteAt(100)).unwrap();
    assert_eq!(proxy.addr().to_string(), "10.99.0.2:7001");

    let data = pattern(100_000);
    let reply = send_through(&bed, proxy.addr(), &data).unwrap();
    assert_eq!(reply, b"done", "the backup→primary direction is forwarded");
    let recv = got.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(recv.len(), data.len());
    let diff: Vec<usize> = (0..data.len()).filter(|&i| recv[i] != data[i]).collect();
    assert_eq!(diff, vec![100]);
    assert_eq!(recv[100], !data[100]);
    assert_eq!(proxy.bytes_forwarded(), 100_000);
    assert_eq!(proxy.bytes_returned(), 4);
    assert_eq!(proxy.faults_applied(), 1);
    assert!(!proxy.fault_pending());

    // Clean pass, then a fault armed relative to the stream so far (a new connection).
    let recv2 = {
        send_through(&bed, proxy.addr(), &data[..500]).unwrap();
        got.recv_timeout(Duration::from_secs(5)).unwrap()
    };
    assert_eq!(recv2, &data[..500]);
    proxy.corrupt_next_after(10);
    assert!(proxy.fault_pending());
    send_through(&bed, proxy.addr(), &data[..500]).unwrap();
    let recv3 = got.recv_timeout(Duration::from_secs(5)).unwrap();
    let diff: Vec<usize> = (0..500).filter(|&i| recv3[i] != data[i]).collect();
    assert_eq!(diff, vec![10]);
    assert_eq!(proxy.connections(), 3);
    assert_eq!(proxy.faults_applied(), 2);
}

#[test]
fn alink_proxy_truncates_and_reaches_loopback_targets() {
    let bed = bed();
    // A target listening on node-b's loopback only.
    let got = collector(&bed, "127.0.0.1", 7100);
    let proxy = AlinkProxy::start_to(
        &bed,
        "10.99.0.2:0".parse().unwrap(),
        "127.0.0.1:7100".parse().unwrap(),
        Fault::TruncateAt(1234),
    )
    .unwrap();
    assert_ne!(proxy.addr().port(), 0);
    let data = pattern(50_000);
    // The primary sees the connection close without the reply.
    let reply = send_through(&bed, proxy.addr(), &data);
    assert!(
        !matches!(&reply, Ok(r) if r == b"done"),
        "the reply must not arrive: {reply:?}"
    );
    let recv = got.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(recv, &data[..1234]);
    assert_eq!(proxy.bytes_forwarded(), 1234);

    // Armed later: forwards 10 more bytes, then cuts.
    proxy.truncate_after(10);
    let _ = send_through(&bed, proxy.addr(), &data[..100]);
    assert_eq!(
        got.recv_timeout(Duration::from_secs(5)).unwrap(),
        &data[..10]
    );
    // Nothing armed: passes through.
    assert_eq!(
        send_through(&bed, proxy.addr(), &data[..100]).unwrap(),
        b"done"
    );
    assert_eq!(
        got.recv_timeout(Duration::from_secs(5)).unwrap(),
        &data[..100]
    );
    assert_eq!(proxy.faults_applied(), 2);
}

/// Waits until the client's bridge has `mac` behind `port`; returns how long it took.
fn wait_fdb(bed: &TwoNodeBed, mac: &str, port: &str, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if bed.lan_port_of(mac).unwrap().as_deref() == Some(port) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Frames read from a non-blocking tap within `wait` whose destination is `mac`.
fn frames_to(tap: &mut std::fs::File, mac: [u8; 6], wait: Duration) -> usize {
    let t0 = Instant::now();
    let mut n = 0;
    let mut buf = [0u8; 2048];
    while t0.elapsed() < wait {
        match tap.read(&mut buf) {
            Ok(len) if len >= 14 && buf[..6] == mac => n += 1,
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
fn rarp_from_node_b_moves_the_guest_mac() {
    let bed = bed();
    let mac_s = bed.guest_mac();
    let mac = netns::parse_mac(mac_s).unwrap();
    let frame = replication::announce::rarp_frame(mac);

    // Both monitors hold their taps open (the backup opens its tap when it starts).
    let t_attach = Instant::now();
    let mut tap_a = bed.open_tap(bed.node_a(), bed.tap_name()).unwrap();
    let mut tap_b = bed.open_tap(bed.node_b(), bed.tap_name()).unwrap();
    // The guest on node A talks: the LAN learns its MAC behind to-a. Repeat until the freshly
    // attached tap's bridge port forwards.
    let mut learnt = None;
    while learnt.is_none() && t_attach.elapsed() < Duration::from_secs(5) {
        tap_a.write_all(&frame).unwrap();
        learnt = wait_fdb(&bed, mac_s, "to-a", Duration::from_millis(20));
    }
    assert!(
        learnt.is_some(),
        "the lan bridge never learnt the guest MAC behind to-a"
    );
    eprintln!(
        "a frame from a freshly attached tap reached the client's bridge after {:?}",
        t_attach.elapsed()
    );

    // Unicast from the client to the guest goes to node A only.
    bed.run_in(
        bed.client(),
        "ip",
        &[
            "neigh",
            "replace",
            bed.guest_ip(),
            "lladdr",
            mac_s,
            "dev",
            "lan",
        ],
    )
    .unwrap();
    let udp = bed
        .in_ns(bed.client(), || UdpSocket::bind((bed.client_ip(), 0)))
        .unwrap()
        .unwrap();
    let guest: SocketAddr = format!("{}:9", bed.guest_ip()).parse().unwrap();
    frames_to(&mut tap_a, mac, Duration::ZERO);
    frames_to(&mut tap_b, mac, Duration::ZERO);
    udp.send_to(b"to the guest", guest).unwrap();
    assert_eq!(frames_to(&mut tap_a, mac, Duration::from_millis(200)), 1);
    assert_eq!(frames_to(&mut tap_b, mac, Duration::from_millis(50)), 0);

    // Failover: node B announces the guest once; the entry moves at once.
    let t0 = Instant::now();
    tap_b.write_all(&frame).unwrap();
    let moved = wait_fdb(&bed, mac_s, "to-b", Duration::from_secs(2));
    assert!(
        moved.is_some(),
        "the RARP from node-b did not move the FDB entry"
    );
    eprintln!("FDB entry moved to to-b {:?} after the RARP", t0.elapsed());
    let fdb = bed
        .run_in(bed.client(), "bridge", &["fdb", "show", "br", "lan"])
        .unwrap();
    let guest_lines: Vec<&str> = fdb.lines().filter(|l| l.starts_with(mac_s)).collect();
    assert_eq!(guest_lines.len(), 1, "{fdb}");
    assert!(guest_lines[0].contains("dev to-b"), "{fdb}");
    // Node A's own bridge, if node A still lives, now sends the guest's traffic up its uplink.
    let fdb_a = bed
        .run_in(bed.node_a(), "bridge", &["fdb", "show", "br", "br0"])
        .unwrap();
    assert!(
        fdb_a
            .lines()
            .any(|l| l.starts_with(mac_s) && l.contains("dev uplink")),
        "{fdb_a}"
    );

    // Node B's bridge has it behind the tap.
    let fdb_b = bed
        .run_in(bed.node_b(), "bridge", &["fdb", "show", "br", "br0"])
        .unwrap();
    assert!(
        fdb_b
            .lines()
            .any(|l| l.starts_with(mac_s) && l.contains("dev tap0")),
        "{fdb_b}"
    );

    // Unicast from the client now reaches node B only.
    udp.send_to(b"to the guest", guest).unwrap();
    assert_eq!(frames_to(&mut tap_b, mac, Duration::from_millis(200)), 1);
    assert_eq!(frames_to(&mut tap_a, mac, Duration::from_millis(50)), 0);
}

#[test]
fn ftvm_runs_inside_a_node_as_a_monitor() {
    let bed = bed();
    assert!(
        testbed::ftvm_bin().exists(),
        "build ftvm first: cargo build --workspace"
    );
    let scratch = testbed::Scratch::new("netns-mon").unwrap();
    let console = scratch.path("console");
    // `ftvm testbed status` from inside node-a sees the whole bed (and exits 0).
    let args: Vec<String> = ["testbed", "status", "--prefix", bed.prefix()]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut mon = bed
        .spawn_monitor_in(bed.node_a(), &args, &console, None)
        .unwrap();
    let status = mon.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(status.success(), "{status}: {}", mon.stderr_text());
}
