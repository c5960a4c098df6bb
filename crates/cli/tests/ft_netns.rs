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
