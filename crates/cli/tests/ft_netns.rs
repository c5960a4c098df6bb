//! FT on the two-node test bed (network namespaces node-a, node-b, client; A-link veth; bridged
//! LAN): TCP connections survive a failover, and no acknowledged write is ever lost.
//! Needs root and /dev/kvm.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use testbed::ft::{self, FtSetup};
use testbed::{Scratch, TwoNodeBed};

fn bed(tag: &str) -> (TwoNodeBed, Scratch) {
    testbed::require_vms();
    let prefix = format!("{tag}{}-", std::process::id() % 100_000);
    let _ = TwoNodeBed::cleanup_stale(&prefix);
    (
        TwoNodeBed::up(&prefix).expect("test bed"),
        Scratch::new(tag).unwrap(),
    )
}

#[test]
fn tcp_connection_survives_failover() {
    let (bed, dir) = bed("fte");
    let mut pair = ft::start_pair(&bed, &dir.0, &FtSetup::new("tcp-echo 7000")).unwrap();
    ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(30)).unwrap();
    let addr = ft::kv_addr(&bed);
    let stream = bed
        .in_ns(bed.client(), move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })
        .unwrap()
        .expect("connect to the guest");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    let mut exchange = |i: usize| {
        let msg = format!("message {i}\n");
        stream.write_all(msg.as_bytes()).unwrap();
        let mut back = String::new();
        reader.read_line(&mut back).unwrap();
        assert_eq!(back, msg, "echo {i}");
    };
    for i in 0..50 {
        exchange(i);
    }
    bed.kill_node(bed.node_a()).unwrap();
    pair.primary.kill9();
    let t0 = Instant::now();
    for i in 50..100 {
        exchange(i);
    }
    let backup = pair.backup.as_ref().unwrap();
    let st = ft::wait_ft_state(backup, "failed-over", Duration::from_secs(5)).unwrap();
    eprintln!(
        "50 exchanges after the kill took {:?}; backup status {st}",
        t0.elapsed()
    );
}

#[test]
fn no_acknowledged_write_is_lost_across_20_failovers() {
    let (bed, dir) = bed("ftk");
    let mut failover_ms = Vec::new();
    for round in 0..20u64 {
        let round_dir = dir.path(&format!("round{round}"));
        std::fs::create_dir_all(&round_dir).unwrap();
        let mut pair = ft::start_pair(&bed, &round_dir, &FtSetup::new("kv 7000")).unwrap();
        // A different moment in the write stream each round.
        let kill_after = Duration::from_millis(100 + (round * 7919) % 900);
        let r = ft::kv_failover_round(&bed, &mut pair, kill_after, 20).unwrap_or_else(|e| {
            panic!(
                "round {round}: {e:#}\nbackup console: {}",
                pair.backup
                    .as_ref()
                    .map(|b| b.console_text())
                    .unwrap_or_default()
            )
        });
        assert!(
            r.acked > 20,
            "round {round}: only {} writes acknowledged",
            r.acked
        );
        assert!(
            r.lost.is_empty(),
            "round {round}: acknowledged writes lost: {:?}",
            r.lost
        );
        assert!(
            r.same_connection,
            "round {round}: the client had to reconnect"
        );
        failover_ms.push(r.failover_ms);
        // Clean slate for the next round: stop the guest now running on node B.
        bed.kill_node(bed.node_b()).unwrap();
    }
    eprintln!("failover times (ms): {failover_ms:?}");
}

/// Writes `pre{i}` keys until `stop`; returns the acknowledged ones.
fn background_writer(
    mut client: testbed::kv::KvClient,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<usize>> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut i = 0;
        while !stop.load(std::sync::atomic::Ordering::Acquire) {
            match client.set(&format!("pre{i}"), &format!("v{i}")) {
                Ok(true) => acked.push(i),
                other => panic!("SET pre{i}: {other:?}"),
            }
            i += 1;
        }
        acked
    })
}

fn check_keys(bed: &TwoNodeBed, keys: &[usize]) {
    let mut c = ft::kv_client(bed, Duration::from_secs(10)).unwrap();
    let lost: Vec<_> = keys
        .iter()
        .filter(|&&i| c.get(&format!("pre{i}")).unwrap().as_deref() != Some(&format!("v{i}")))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

#[test]
fn corrupted_alink_frame_is_no_failover_and_no_acknowledged_write_is_lost() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (bed, dir) = bed("ftc");
    let proxy =
        testbed::netns::AlinkProxy::start(&bed, 0, ft::ALINK_PORT, testbed::netns::Fault::None)
            .unwrap();
    let setup = FtSetup {
        alink_via: Some(proxy.addr()),
        ..FtSetup::new("kv 7000")
    };
    let mut pair = ft::start_pair(&bed, &dir.0, &setup).unwrap();
    ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(30)).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = background_writer(
        ft::kv_client(&bed, Duration::from_secs(20)).unwrap(),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(300));
    proxy.corrupt_next_after(2000);
    let backup = pair.backup.as_ref().unwrap();
    let t0 = Instant::now();
    loop {
        let st = backup.api("GET", "/status", None).unwrap();
        assert_ne!(st["ft"]["state"], "failed-over", "{st}");
        if st["ft"]["sessions"].as_u64() >= Some(2) && st["ft"]["state"] == "protected" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not re-protected: {st}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(proxy.faults_applied(), 1);
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Release);
    let acked = writer.join().unwrap();
    assert!(acked.len() > 10, "only {} writes acknowledged", acked.len());
    // The new session's standby holds every acknowledged write: lose node A now.
    let r = ft::kv_failover_round(&bed, &mut pair, Duration::from_millis(200), 20).unwrap();
    assert!(r.lost.is_empty(), "lost after the failover: {:?}", r.lost);
    check_keys(&bed, &acked);
    eprintln!(
        "{} writes across the corrupted frame, {} across the failover ({:.0} ms)",
        acked.len(),
        r.acked,
        r.failover_ms
    );
}

#[test]
fn a_cut_alink_with_the_watch_path_alive_never_makes_two_live_copies() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let (bed, dir) = bed("ftw");
    let mut pair = ft::start_pair(&bed, &dir.0, &FtSetup::new("kv 7000")).unwrap();
    ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(30)).unwrap();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let writer = background_writer(
        ft::kv_client(&bed, Duration::from_secs(30)).unwrap(),
        stop.clone(),
    );
    std::thread::sleep(Duration::from_millis(200));
    // The cable is pulled: the A-link is gone, the management network (watch path) is not.
    bed.link_down(testbed::netns::Link::ALink).unwrap();
    let backup = pair.backup.as_ref().unwrap();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let st = backup.api("GET", "/status", None).unwrap();
        assert_ne!(st["ft"]["state"], "failed-over", "two live copies: {st}");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The primary asked the backup to release and, with its word, runs on alone.
    ft::wait_ft_state(&pair.primary, "degraded", Duration::from_secs(10)).unwrap();
    bed.link_up(testbed::netns::Link::ALink).unwrap();
    // The A-link is back: protection resumes by itself with a new session.
    ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(30)).unwrap();
    ft::wait_ft_state(backup, "protected", Duration::from_secs(10)).unwrap();
    stop.store(true, Ordering::Release);
    let acked = writer.join().unwrap();
    let r = ft::kv_failover_round(&bed, &mut pair, Duration::from_millis(200), 20).unwrap();
    assert!(r.lost.is_empty(), "lost after the failover: {:?}", r.lost);
    check_keys(&bed, &acked);
}
