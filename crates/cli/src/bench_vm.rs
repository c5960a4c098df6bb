//! Monitor benchmarks: boot time, memory overhead, pause cost.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;
use vmm::{ConsoleConfig, Vm, VmConfig};

use crate::vm::testguest_path;

/// Median and 99th percentile of `v` (sorted in place).
pub fn percentiles(v: &mut [f64]) -> (f64, f64) {
    if v.is_empty() {
        return (0.0, 0.0);
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn scratch_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("ftvm-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

fn wait_for_text(path: &Path, needle: &str, timeout: Duration) -> anyhow::Result<()> {
    let t0 = Instant::now();
    loop {
        if std::fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).contains(needle))
            .unwrap_or(false)
        {
            return Ok(());
        }
        if t0.elapsed() > timeout {
            bail!(
                "{needle:?} did not appear in {} within {timeout:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// RSS of process `pid` outside mappings of exactly `guest_kib` KiB (the guest memory), in KiB.
fn rss_beyond_guest(pid: u32, guest_kib: u64) -> anyhow::Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let mut total = 0;
    let mut in_guest = false;
    for line in smaps.lines() {
        let mut f = line.split_whitespace();
        match (f.next(), f.next()) {
            (Some("Size:"), Some(kib)) => in_guest = kib.parse::<u64>().ok() == Some(guest_kib),
            (Some("Rss:"), Some(kib)) if !in_guest => total += kib.parse::<u64>().unwrap_or(0),
            _ => {}
        }
    }
    Ok(total)
}

/// `ftvm bench boot`.
pub fn boot(runs: usize, as_json: bool) -> anyhow::Result<i32> {
    let dir = scratch_dir()?;
    let exe = std::env::current_exe().context("cannot locate ftvm")?;
    let mem_mib = 256u64;
    let mut times = Vec::new();
    let mut rss = Vec::new();
    for i in 0..runs.max(1) {
        let console = dir.join(format!("boot{i}.console"));
        let _ = std::fs::remove_file(&console);
        let t0 = Instant::now();
        let mut child = Command::new(&exe)
            .args([
                "vm",
                "run",
                "--image",
                "testguest",
                "--mem",
                &mem_mib.to_string(),
            ])
            .args(["--cmdline", "-- counter", "--console"])
            .arg(format!("file:{}", console.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start the monitor")?;
        let waited = wait_for_text(&console, "job counter running", Duration::from_secs(30));
        let elapsed = t0.elapsed();
        let r = rss_beyond_guest(child.id(), mem_mib * 1024);
        let _ = child.kill();
        let _ = child.wait();
        waited?;
        times.push(elapsed.as_secs_f64() * 1e3);
        rss.push(r? as f64 / 1024.0);
        println!(
            "boot {}: {:.1} ms to workload, monitor RSS beyond guest memory {:.1} MiB",
            i + 1,
            times[i],
            rss[i]
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    let (boot_p50, _) = percentiles(&mut times);
    let (rss_p50, _) = percentiles(&mut rss);
    println!(
        "median boot (start → test-guest workload running): {boot_p50:.1} ms over {} runs",
        times.len()
    );
    println!("median monitor RSS beyond guest memory: {rss_p50:.1} MiB (target < 30 MiB)");
    if as_json {
        println!(
            "{}",
            json!({ "boot_ms_p50": boot_p50, "rss_beyond_guest_mib": rss_p50, "runs": times.len() })
        );
    }
    Ok(0)
}

/// `ftvm bench pause`.
pub fn pause(cycles: usize, as_json: bool) -> anyhow::Result<i32> {
    let dir = scratch_dir()?;
    let mut results = Vec::new();
    for rate in [0u64, 10_000, 100_000] {
        let console = dir.join(format!("pause{rate}.console"));
        let config = VmConfig {
            kernel: testguest_path()?,
            initrd: None,
            cmdline: format!("-- dirty {rate} 64"),
            vcpus: 1,
            mem_mib: 256,
            disks: vec![],
            nets: vec![],
            console: ConsoleConfig::File(console.clone()),
            cpu: None,
        };
        let vm = Arc::new(Vm::create(config)?);
        vm.start()?;
        wait_for_text(&console, "job dirty running", Duration::from_secs(30))?;
        std::thread::sleep(Duration::from_millis(300));
        vm.take_dirty_pages()?;
        let mut us = Vec::with_capacity(cycles);
        let mut pages = 0usize;
        for _ in 0..cycles {
            std::thread::sleep(Duration::from_millis(5));
            let t0 = Instant::now();
            vm.pause()?;
            let dirty = vm.take_dirty_pages()?;
            vm.resume()?;
            us.push(t0.elapsed().as_secs_f64() * 1e6);
            pages += dirty.count();
        }
        vm.request_shutdown();
        vm.stop();
        let (p50, p99) = percentiles(&mut us);
        let avg_pages = pages as f64 / cycles as f64;
        println!(
            "dirty rate {rate:>6} pages/s: pause+dirty-set+resume p50 {p50:.0} µs, p99 {p99:.0} µs ({avg_pages:.0} dirty pages per 5 ms cycle, {cycles} cycles)"
        );
        results.push(json!({ "dirty_pages_per_s": rate, "p50_us": p50, "p99_us": p99, "dirty_pages_per_cycle": avg_pages }));
    }
    let _ = std::fs::remove_dir_all(&dir);
    if as_json {
        println!("{}", json!({ "pause": results }));
    }
    Ok(0)
}
