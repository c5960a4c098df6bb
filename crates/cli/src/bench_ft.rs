//! `ftvm bench ft`: the FT-protected test guest side by side with the same guest unprotected, on
//! the two-node test bed, at dirty rates of 0, 10k and 100k pages/s.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::{json, Value};
use testbed::ft::{self, FtPair, FtSetup};
use testbed::TwoNodeBed;

use crate::bench_vm::percentiles;

const RATES: [u64; 3] = [0, 10_000, 100_000];
const RTT_SAMPLES: usize = 500;

/// Runs the benchmark; prints one line per figure and, with `as_json`, a JSON object last.
/// The bed's namespaces start with `prefix`; SIGINT, SIGTERM and SIGHUP remove them.
pub fn run(as_json: bool, prefix: &str) -> anyhow::Result<i32> {
    if !testbed::can_run_vms() {
        anyhow::bail!("ftvm bench ft needs root and /dev/kvm (it builds network namespaces)");
    }
    TwoNodeBed::cleanup_stale(prefix)?;
    let bed = TwoNodeBed::up(prefix).context("cannot build the test bed")?;
    let dir = testbed::Scratch::new("bench-ft")?;
    let mut by_rate = serde_json::Map::new();
    for rate in RATES {
        let figures =
            measure(&bed, &dir, rate).with_context(|| format!("at {rate} dirty pages/s"))?;
        println!("--- dirty rate {rate} pages/s");
        for (k, v) in figures.as_object().into_iter().flatten() {
            println!("{k:>22}: {v}");
        }
        by_rate.insert(rate.to_string(), figures);
    }
    let idle = by_rate.get("0").cloned().unwrap_or(Value::Null);
    let mut out = idle.as_object().cloned().unwrap_or_default();
    out.insert("by_dirty_rate".into(), Value::Object(by_rate));
    println!(
        "targets: pause p50 < 300 µs, p99 < 2000 µs; ≥ 500 checkpoints/s idle; added RTT p50 < 3000 µs; \
         CPU ratio ≥ 0.95; failover < 300 ms; 0 acknowledged writes lost"
    );
    if as_json {
        println!("{}", Value::Object(out));
    }
    Ok(0)
}

fn stop(bed: &TwoNodeBed) -> anyhow::Result<()> {
    bed.kill_node(bed.node_a())?;
    bed.kill_node(bed.node_b())?;
    Ok(())
}

/// The figures at one dirty rate.
fn measure(bed: &TwoNodeBed, dir: &testbed::Scratch, rate: u64) -> anyhow::Result<Value> {
    let kv_job = format!("kv {} {rate}", ft::KV_PORT);
    let spin_job = format!("spin {rate}");

    // Unprotected baselines.
    let base_rtt = {
        let mut pair = start(bed, dir, &kv_job, true)?;
        pair.primary
            .wait_for("job kv running", Duration::from_secs(20))?;
        let mut c = ft::kv_client(bed, Duration::from_secs(5))?;
        let v = c.rtt_us(RTT_SAMPLES)?;
        stop(bed)?;
        v
    };
    let base_spin = {
        let mut pair = start(bed, dir, &spin_job, true)?;
        let r = spin_rate(&mut pair)?;
        stop(bed)?;
        r
    };

    // Protected: CPU-bound speed.
    let ft_spin = {
        let mut pair = start(bed, dir, &spin_job, false)?;
        ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(30))?;
        let r = spin_rate(&mut pair)?;
        stop(bed)?;
        r
    };

    // Protected: checkpoints, round trips, then failover with the kv writer.
    // Bytes per checkpoint with every page sent whole, for comparison with delta encoding.
    let bytes_no_delta = if rate == 10_000 {
        let pair = start_with(bed, dir, &kv_job, false, &["--ft-no-delta"])?;
        ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(30))?;
        let (_, _, bytes) = checkpoint_figures(&pair)?;
        stop(bed)?;
        Some(bytes.round())
    } else {
        None
    };
    let mut pair = start(bed, dir, &kv_job, false)?;
    ft::wait_ft_state(&pair.primary, "protected", Duration::from_secs(30))?;
    let (idle, cps, bytes) = checkpoint_figures(&pair)?;
    let mut c = ft::kv_client(bed, Duration::from_secs(5))?;
    let ft_rtt = c.rtt_us(RTT_SAMPLES)?;
    drop(c);
    let during = pair.primary.api("GET", "/status", None)?;
    let failover = ft::kv_failover_round(bed, &mut pair, Duration::from_millis(700), 20)?;
    stop(bed)?;

    let (mut b, mut f) = (base_rtt, ft_rtt);
    let (b50, b99) = percentiles(&mut b);
    let (f50, f99) = percentiles(&mut f);
    Ok(json!({
        "checkpoints_per_s": round1(cps),
        "pause_p50_us": idle["ft"]["pause_p50_us"],
        "pause_p99_us": idle["ft"]["pause_p99_us"],
        "pause_p50_us_under_requests": during["ft"]["pause_p50_us"],
        "bytes_per_checkpoint": bytes.round(),
        "bytes_per_checkpoint_no_delta": bytes_no_delta,
        "rtt_unprotected_p50_us": round1(b50),
        "rtt_protected_p50_us": round1(f50),
        "rtt_added_p50_us": round1(f50 - b50),
        "rtt_added_p99_us": round1(f99 - b99),
        "cpu_ratio": (ft_spin / base_spin.max(1.0) * 1000.0).round() / 1000.0,
        "failover_ms": round1(failover.failover_ms),
        "acked_writes": failover.acked,
        "acked_writes_lost": failover.lost.len(),
    }))
}

/// Over two seconds of protected running: the last status, checkpoints per second and bytes
/// per checkpoint.
fn checkpoint_figures(pair: &FtPair) -> anyhow::Result<(Value, f64, f64)> {
    std::thread::sleep(Duration::from_millis(500));
    let before = pair.primary.api("GET", "/status", None)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    let now = pair.primary.api("GET", "/status", None)?;
    let secs = t0.elapsed().as_secs_f64();
    let delta =
        |k: &str| now["ft"][k].as_f64().unwrap_or(0.0) - before["ft"][k].as_f64().unwrap_or(0.0);
    let cps = delta("checkpoints") / secs;
    let bytes = delta("total_bytes") / delta("checkpoints").max(1.0);
    Ok((now, cps, bytes))
}

fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

fn start(
    bed: &TwoNodeBed,
    dir: &testbed::Scratch,
    job: &str,
    unprotected: bool,
) -> anyhow::Result<FtPair> {
    start_with(bed, dir, job, unprotected, &[])
}

fn start_with(
    bed: &TwoNodeBed,
    dir: &testbed::Scratch,
    job: &str,
    unprotected: bool,
    extra: &[&str],
) -> anyhow::Result<FtPair> {
    let sub = dir.path(&format!(
        "{}-{}{}",
        job.replace(' ', "_"),
        if unprotected { "base" } else { "ft" },
        extra.join("")
    ));
    std::fs::create_dir_all(&sub)?;
    let setup = FtSetup {
        mem_mib: 256,
        unprotected,
        primary_args: extra.iter().map(|a| a.to_string()).collect(),
        ..FtSetup::new(job)
    };
    ft::start_pair(bed, &sub, &setup)
}

/// Iterations per second the `spin` job reports, averaged over three seconds after warm-up.
fn spin_rate(pair: &mut FtPair) -> anyhow::Result<f64> {
    pair.primary.wait_for("spin: ", Duration::from_secs(20))?;
    std::thread::sleep(Duration::from_secs(4));
    let text = pair.primary.console_text();
    let rates: Vec<f64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("spin: "))
        .filter_map(|r| r.split_whitespace().next()?.parse().ok())
        .collect();
    let tail: Vec<f64> = rates.iter().rev().take(3).copied().collect();
    if tail.is_empty() {
        anyhow::bail!("the spin job printed no rate:\n{text}");
    }
    Ok(tail.iter().sum::<f64>() / tail.len() as f64)
}
