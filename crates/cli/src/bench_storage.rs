//! `ftvm bench storage`: figures for the storage layer, each a ratio measured in one run.
//!
//! - mirrored (to a target on loopback TCP) vs local raw writes: throughput and latency;
//! - resync rate vs a plain file copy of the same bytes;
//! - qcow2 vs raw random-read throughput.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use storage::mirror::{DirtyBitmap, MirrorConfig, MirrorTarget, MirroredBackend};
use storage::qcow2::{CreateOptions, Qcow2};
use storage::size::human;
use storage::{BlockBackend, RawFile};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

struct WriteFigures {
    mib_s: f64,
    p50_us: f64,
    p99_us: f64,
}

fn sparse_file(p: &Path, size: u64) -> anyhow::Result<()> {
    let f = File::create(p).with_context(|| format!("creating {}", p.display()))?;
    f.set_len(size)?;
    Ok(())
}

/// 4 KiB random writes with a flush every 32; throughput and per-write latency.
fn write_run(b: &mut dyn BlockBackend, seconds: f64) -> anyhow::Result<WriteFigures> {
    let size = b.size();
    let mut rng = Rng(0x1234_5678);
    let mut buf = vec![0u8; 4096];
    rng.fill(&mut buf);
    let mut lat = Vec::new();
    let t0 = Instant::now();
    let mut bytes = 0u64;
    let mut i = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        let off = (rng.next() % (size / 4096)) * 4096;
        let t = Instant::now();
        b.write_at(&buf, off)?;
        i += 1;
        if i.is_multiple_of(32) {
            b.flush()?;
        }
        lat.push(t.elapsed());
        bytes += 4096;
    }
    b.flush()?;
    let el = t0.elapsed().as_secs_f64();
    lat.sort();
    let pct = |q: f64| lat[((lat.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Ok(WriteFigures {
        mib_s: bytes as f64 / el / (1 << 20) as f64,
        p50_us: pct(0.5),
        p99_us: pct(0.99),
    })
}

fn random_reads(b: &mut dyn BlockBackend, seconds: f64) -> anyhow::Result<f64> {
    let size = b.size();
    let mut rng = Rng(0x9999);
    let mut buf = vec![0u8; 4096];
    let t0 = Instant::now();
    let mut bytes = 0u64;
    while t0.elapsed().as_secs_f64() < seconds {
        let off = (rng.next() % (size / 4096)) * 4096;
        b.read_at(&mut buf, off)?;
        bytes += 4096;
    }
    Ok(bytes as f64 / t0.elapsed().as_secs_f64() / (1 << 20) as f64)
}

fn copy_file(src: &Path, dst: &Path) -> anyhow::Result<f64> {
    let t0 = Instant::now();
    let mut s = File::open(src)?;
    let mut d = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        d.write_all(&buf[..n])?;
    }
    d.sync_all()?;
    Ok(t0.elapsed().as_secs_f64())
}

/// Runs the storage benchmark in `dir` (or a temporary directory).
pub fn run(size: u64, dir: Option<PathBuf>, json: bool) -> anyhow::Result<i32> {
    let dir = match dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("ftvm-bench-storage-{}", std::process::id())),
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = measure(&dir, size, json);
    let _ = fs::remove_dir_all(&dir);
    result
}

fn measure(dir: &Path, size: u64, json: bool) -> anyhow::Result<i32> {
    let secs = 3.0;
    println!(
        "ftvm bench storage: {} disks in {}",
        human(size),
        dir.display()
    );

    // 1. Mirrored vs local writes.
    let local_p = dir.join("local.raw");
    let peer_p = dir.join("peer.raw");
    sparse_file(&local_p, size)?;
    sparse_file(&peer_p, size)?;
    let mut local = RawFile::open(&local_p, false)?;
    let local_w = write_run(&mut local, secs)?;
    drop(local);
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    // Both ends live in this process: a fixed secret is enough for the measurement.
    let secret = storage::mirror::Secret::new(&b"ftvm bench storage (loopback only)"[..])?;
    let _target = MirrorTarget::spawn(
        listener,
        Box::new(RawFile::open(&peer_p, false)?),
        "bench",
        1,
        &dir.join("peer.target.json"),
        secret.clone(),
    )?;
    let bm = dir.join("local.bitmap");
    // Start from a known, identical pair: no initial full sync in the measurement.
    let mut b = DirtyBitmap::open(&bm, size, 1 << 20)?;
    b.set_peer_id(1)?;
    drop(b);
    let mut cfg = MirrorConfig::new(&addr, "bench", bm.clone(), secret);
    cfg.background = false;
    let mut m = MirroredBackend::open(Box::new(RawFile::open(&local_p, false)?), cfg.clone())?;
    anyhow::ensure!(
        m.status().connected,
        "mirror target on {addr} did not accept the connection"
    );
    // Bring the replicas in line (the local run above wrote only locally).
    m.resync_now(&mut |_, _| {})?;
    let mirror_w = write_run(&mut m, secs)?;
    drop(m);
    println!(
        "writes 4 KiB random, flush every 32 ({secs:.0} s each):\n  local    {:8.1} MiB/s  p50 {:7.1} µs  p99 {:7.1} µs\n  mirrored {:8.1} MiB/s  p50 {:7.1} µs  p99 {:7.1} µs\n  mirrored/local throughput {:.2}, p50 latency ×{:.2}",
        local_w.mib_s, local_w.p50_us, local_w.p99_us, mirror_w.mib_s, mirror_w.p50_us, mirror_w.p99_us,
        mirror_w.mib_s / local_w.mib_s,
        mirror_w.p50_us / local_w.p50_us
    );

    // 2. Resync of every region vs a raw copy of the same bytes.
    {
        let mut f = RawFile::open(&local_p, false)?;
        let mut rng = Rng(77);
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            rng.fill(&mut buf);
            let n = (size - off).min(buf.len() as u64) as usize;
            f.write_at(&buf[..n], off)?;
            off += n as u64;
        }
        f.flush()?;
    }
    let mut b = DirtyBitmap::open(&bm, size, 1 << 20)?;
    b.set_all()?;
    drop(b);
    let m = MirroredBackend::open(Box::new(RawFile::open(&local_p, false)?), cfg.clone())?;
    let t0 = Instant::now();
    m.resync_now(&mut |_, _| {})?;
    let resync_s = t0.elapsed().as_secs_f64();
    drop(m);
    let copy_s = copy_file(&local_p, &dir.join("copy.raw"))?;
    let mib = size as f64 / (1 << 20) as f64;
    println!(
        "resync of {} (all regions dirty) over loopback: {:.1} MiB/s; raw file copy + fsync: {:.1} MiB/s; resync/copy {:.2}",
        human(size),
        mib / resync_s,
        mib / copy_s,
        copy_s / resync_s
    );
    let identical = fs::read(&local_p)? == fs::read(&peer_p)?;
    anyhow::ensure!(identical, "replicas differ after the resync");

    // 3. qcow2 vs raw random reads of the same data.
    let q = dir.join("read.qcow2");
    Qcow2::create(&q, size, &CreateOptions::default())?;
    {
        let mut src = RawFile::open(&local_p, true)?;
        let mut dst = Qcow2::open(&q, false)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < size {
            let n = (size - off).min(buf.len() as u64) as usize;
            src.read_at(&mut buf[..n], off)?;
            dst.write_at(&buf[..n], off)?;
            off += n as u64;
        }
        dst.flush()?;
    }
    let raw_r = random_reads(&mut RawFile::open(&local_p, true)?, secs)?;
    let q_r = random_reads(&mut Qcow2::open(&q, true)?, secs)?;
    println!(
        "random 4 KiB reads (page cache warm, {secs:.0} s each): raw {raw_r:.1} MiB/s, qcow2 {q_r:.1} MiB/s; qcow2/raw {:.2}",
        q_r / raw_r
    );
    if json {
        let v = serde_json::json!({
            "size": size,
            "local_write_mib_s": local_w.mib_s, "local_write_p50_us": local_w.p50_us, "local_write_p99_us": local_w.p99_us,
            "mirrored_write_mib_s": mirror_w.mib_s, "mirrored_write_p50_us": mirror_w.p50_us, "mirrored_write_p99_us": mirror_w.p99_us,
            "mirrored_over_local_throughput": mirror_w.mib_s / local_w.mib_s,
            "resync_mib_s": mib / resync_s, "copy_mib_s": mib / copy_s, "resync_over_copy": copy_s / resync_s,
            "raw_read_mib_s": raw_r, "qcow2_read_mib_s": q_r, "qcow2_over_raw_read": q_r / raw_r,
        });
        println!("{v}");
    }
    Ok(0)
}
