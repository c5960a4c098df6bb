//! `ftvm demo`: the two-node FT cluster in one command. Builds the test bed, runs the test
//! guest's key-value service under FT protection with a client writing to it, shows live
//! checkpoint figures, kills node A with SIGKILL and shows the client carrying on against node B
//! with every acknowledged write intact. Cleans up on exit or Ctrl-C.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use testbed::ft::{self, FtSetup};
use testbed::TwoNodeBed;

/// Runs the demo; `seconds` of protected running before node A is killed.
///
/// The bed's namespaces are `{prefix}node-a`, `{prefix}node-b`, `{prefix}client`; SIGINT, SIGTERM
/// and SIGHUP remove them (the test bed's signal watcher) before the process ends.
pub fn run(seconds: u64, prefix: &str) -> anyhow::Result<i32> {
    if !testbed::can_run_vms() {
        bail!("ftvm demo needs root and /dev/kvm: run it with sudo");
    }
    crate::vm::testguest_path()?;
    TwoNodeBed::cleanup_stale(prefix)?;
    println!("ftvm demo: building the two-node test bed (network namespaces)…");
    let bed = TwoNodeBed::up(prefix).context("cannot build the test bed")?;
    println!("{}", bed.describe());
    let dir = testbed::Scratch::new("demo")?;
    let result = demo(&bed, &dir, seconds);
    println!("ftvm demo: cleaning up");
    drop(bed);
    result
}

fn demo(bed: &TwoNodeBed, dir: &testbed::Scratch, seconds: u64) -> anyhow::Result<i32> {
    println!(
        "starting the backup on {} and the FT-protected guest (kv service) on {}…",
        bed.node_b(),
        bed.node_a()
    );
    let mut pair = ft::start_pair(
        bed,
        &dir.0,
        &FtSetup {
            timeout_ms: 100,
            ..FtSetup::new("kv 7000")
        },
    )?;
    ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(30))?;
    println!(
        "protected. A client in {} writes keys to {}:{}",
        bed.client(),
        bed.guest_ip(),
        ft::KV_PORT
    );

    // Phase 1: a writer and live figures.
    let acked = Arc::new(Mutex::new(0usize));
    let stop = Arc::new(AtomicBool::new(false));
    let mut client = ft::kv_client(bed, Duration::from_secs(10))?;
    let writer = {
        let (acked, stop) = (acked.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let mut i = 0;
            while !stop.load(Ordering::Acquire) {
                if client.set(&format!("demo{i}"), &format!("value{i}"))? {
                    *acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = i + 1;
                }
                i += 1;
            }
            Ok(())
        })
    };
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(seconds) {
        std::thread::sleep(Duration::from_millis(500));
        let st = pair.primary.api("GET", "/status", None)?;
        let f = &st["ft"];
        println!(
            "[{:>4.1}s] {:<9} checkpoints {:>6} ({:>5.0}/s)  pause p50 {:>4} µs p99 {:>5} µs  {:>6} B/checkpoint  writes acknowledged {}",
            t0.elapsed().as_secs_f64(),
            f["state"].as_str().unwrap_or("?"),
            f["checkpoints"],
            f["checkpoints_per_s"].as_f64().unwrap_or(0.0),
            f["pause_p50_us"],
            f["pause_p99_us"],
            f["last_bytes"],
            acked.lock().map(|a| *a).unwrap_or(0),
        );
    }
    stop.store(true, Ordering::Release);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))??;
    let phase1 = *acked.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;

    // Phase 2: SIGKILL node A while writing.
    println!(
        "killing every process of {} with SIGKILL while the client writes…",
        bed.node_a()
    );
    let r = ft::kv_failover_round(bed, &mut pair, Duration::from_millis(300), 50)?;
    let backup = pair.backup.as_ref().context("no backup")?;
    let st = backup.api("GET", "/status", None)?;
    println!(
        "node B took over: state {}, resumed checkpoint {}, first reply {:.0} ms after the kill, same TCP connection: {}",
        st["ft"]["state"], st["ft"]["epoch"], r.failover_ms, r.same_connection
    );
    let mut client = ft::kv_client(bed, Duration::from_secs(10))?;
    let mut missing = r.lost.len();
    for i in 0..phase1 {
        if client.get(&format!("demo{i}"))?.as_deref() != Some(&format!("value{i}")) {
            missing += 1;
        }
    }
    println!(
        "checked every acknowledged write on node B: {} acknowledged, {} lost",
        phase1 + r.acked,
        missing
    );
    Ok(if missing == 0 { 0 } else { 1 })
}
