//! `ftvm volume` subcommands: volumes in pools, snapshots, import, mirroring.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};
use storage::mirror::{self, MirrorConfig, MirrorStatus, MirroredBackend};
use storage::pool::{ImportSource, Pool, VolumeMeta};
use storage::size::{human, parse_size};
use storage::{BlockBackend, ImageFormat};

/// `ftvm volume` subcommands.
#[derive(Subcommand)]
pub enum VolumeCommand {
    /// Create a pool directory, optionally with a capacity (default: the file system's room).
    PoolInit {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Capacity, e.g. 100G.
        #[arg(long, value_parser = parse_size)]
        capacity: Option<u64>,
    },
    /// Create an empty volume.
    Create {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Volume name.
        #[arg(long)]
        name: String,
        /// Virtual disk size, e.g. 10G, 512M, 4096 (a multiple of 512).
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// raw or qcow2.
        #[arg(long, default_value = "qcow2")]
        format: ImageFormat,
        /// Snapshots the container is sized for (qcow2 only).
        #[arg(long, default_value_t = 0)]
        snapshots_retained: u32,
        /// Bytes reserved per snapshot (required with --snapshots-retained).
        #[arg(long, value_parser = parse_size)]
        snapshot_size: Option<u64>,
    },
    /// List the volumes of a pool.
    List {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one volume: sizes, container, snapshots, import and mirror state.
    Info {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Volume name.
        #[arg(long)]
        name: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Grow a volume.
    Resize {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Volume name.
        #[arg(long)]
        name: String,
        /// New size (larger than the current one).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// Delete a volume and its files.
    Delete {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Volume name.
        #[arg(long)]
        name: String,
    },
    /// Import a raw or qcow2 image (detected) from FILE or `-` (stdin); rerun to resume.
    Import {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Volume name.
        #[arg(long)]
        name: String,
        /// Snapshots the container is sized for (qcow2 only).
        #[arg(long, default_value_t = 0)]
        snapshots_retained: u32,
        /// Bytes reserved per snapshot.
        #[arg(long, value_parser = parse_size)]
        snapshot_size: Option<u64>,
        /// Expand compressed clusters (e.g. of a distribution's cloud image) after the import:
        /// faster guest I/O, more space used.
        #[arg(long)]
        decompress: bool,
        /// Image file, or `-` for stdin.
        source: String,
    },
    /// Internal snapshots of qcow2 volumes.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Serve a volume as the mirror target (the peer replica) on ADDR:PORT.
    MirrorServe {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Volume name.
        #[arg(long)]
        name: String,
        /// Listen address, e.g. 0.0.0.0:7800.
        #[arg(long)]
        listen: String,
    },
    /// Write a deterministic pattern through the mirror (tests and demos).
    MirrorExercise {
        #[command(flatten)]
        m: MirrorArgs,
        /// Writes to issue.
        #[arg(long, default_value_t = 1000)]
        writes: u64,
        /// Pattern seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Largest write in 512-byte sectors.
        #[arg(long, default_value_t = 64)]
        max_sectors: u64,
        /// Flush every N writes.
        #[arg(long, default_value_t = 8)]
        flush_every: u64,
        /// Pause between writes, in milliseconds.
        #[arg(long, default_value_t = 0)]
        pause_ms: u64,
        /// Afterwards wait up to this many seconds for the replicas to be in sync.
        #[arg(long, default_value_t = 0)]
        wait_sync: u64,
    },
    /// Resync the regions recorded as dirty (all of them with --full) to the peer, with progress.
    Resync {
        #[command(flatten)]
        m: MirrorArgs,
        /// Compare and copy every region, not only dirty ones.
        #[arg(long)]
        full: bool,
    },
    /// Compare the local replica with the peer's by checksum and name differing regions.
    Verify {
        #[command(flatten)]
        m: MirrorArgs,
        /// Region size compared.
        #[arg(long, value_parser = parse_size, default_value = "1M")]
        region_size: u64,
    },
}

/// Options shared by the mirror commands.
#[derive(clap::Args)]
pub struct MirrorArgs {
    /// Pool directory.
    #[arg(long)]
    pool: PathBuf,
    /// Volume name.
    #[arg(long)]
    name: String,
    /// Peer ADDR:PORT (where `ftvm volume mirror-serve` listens).
    #[arg(long)]
    peer: String,
    /// Peer I/O timeout in milliseconds.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// `ftvm volume snapshot` subcommands.
#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot.
    Create(SnapArgs),
    /// List snapshots.
    List {
        /// Pool directory.
        #[arg(long)]
        pool: PathBuf,
        /// Volume name.
        #[arg(long)]
        name: String,
    },
    /// Make the volume's contents those of a snapshot.
    Revert(SnapArgs),
    /// Delete a snapshot.
    Delete(SnapArgs),
}

/// Which snapshot of which volume.
#[derive(clap::Args)]
pub struct SnapArgs {
    /// Pool directory.
    #[arg(long)]
    pool: PathBuf,
    /// Volume name.
    #[arg(long)]
    name: String,
    /// Snapshot name.
    #[arg(long)]
    snapshot: String,
}

fn container_line(m: &VolumeMeta) -> String {
    format!(
        "{} = 2 × {} + ({} + 1) × {}",
        human(m.container_size()),
        human(m.size),
        m.snapshots_retained,
        human(m.snapshot_size)
    )
}

fn bar(len: u64, bytes: bool) -> ProgressBar {
    let pb = ProgressBar::new(len);
    let tmpl = if bytes {
        "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
    } else {
        "{bar:40} {pos}/{len} regions eta {eta}"
    };
    if let Ok(style) = ProgressStyle::with_template(tmpl) {
        pb.set_style(style);
    }
    pb
}

fn mirror_cfg(pool: &Pool, m: &MirrorArgs) -> MirrorConfig {
    let mut c = MirrorConfig::new(&m.peer, &m.name, pool.side_path(&m.name, "mirror-bitmap"));
    c.state_path = Some(pool.side_path(&m.name, "mirror-state.json"));
    c.io_timeout = Duration::from_millis(m.timeout_ms.max(1));
    c
}

fn open_mirror(m: &MirrorArgs) -> anyhow::Result<(Pool, MirroredBackend)> {
    let pool = Pool::open(&m.pool)?;
    let local = pool.open_volume(&m.name, false)?;
    let cfg = mirror_cfg(&pool, m);
    let mb = MirroredBackend::open(local, cfg)
        .with_context(|| format!("opening the mirror of volume {:?}", m.name))?;
    Ok((pool, mb))
}

fn load_status(path: &Path) -> Option<MirrorStatus> {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
}

/// Runs one `ftvm volume` subcommand; returns the process exit status.
pub fn run(cmd: VolumeCommand) -> anyhow::Result<i32> {
    match cmd {
        VolumeCommand::PoolInit { pool, capacity } => {
            let p = Pool::init(&pool, capacity)?;
            let room = p.room(None)?;
            println!(
                "pool {}: capacity {}, available {}",
                pool.display(),
                capacity.map(human).unwrap_or_else(|| "file system".into()),
                human(room.available)
            );
            Ok(0)
        }
        VolumeCommand::Create {
            pool,
            name,
            size,
            format,
            snapshots_retained,
            snapshot_size,
        } => {
            if snapshots_retained > 0 && snapshot_size.is_none() {
                bail!("--snapshots-retained needs --snapshot-size (bytes reserved per snapshot, e.g. 1G)");
            }
            let p = Pool::open(&pool)?;
            let m = p.create(
                &name,
                size,
                format,
                snapshots_retained,
                snapshot_size.unwrap_or(0),
            )?;
            println!(
                "created {} volume {name:?}: size {}, container {}",
                m.format,
                human(m.size),
                container_line(&m)
            );
            Ok(0)
        }
        VolumeCommand::List { pool, json } => {
            let p = Pool::open(&pool)?;
            let vols = p.list()?;
            if json {
                let v: Vec<_> = vols
                    .iter()
                    .map(|(n, m)| match m {
                        Ok(m) => serde_json::json!({"name": n, "meta": m, "container": m.container_size(), "allocated": p.allocated(m)}),
                        Err(e) => serde_json::json!({"name": n, "error": e.to_string()}),
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&v)?);
                return Ok(0);
            }
            println!(
                "{:<24} {:<6} {:>12} {:>12} {:>12}  STATUS",
                "NAME", "FORMAT", "SIZE", "CONTAINER", "ALLOCATED"
            );
            for (n, m) in &vols {
                match m {
                    Ok(m) => {
                        let status = match &m.import {
                            Some(st) => format!(
                                "importing ({} of {})",
                                human(st.bytes_done),
                                st.source_len.map(human).unwrap_or_else(|| "?".into())
                            ),
                            None => "ready".into(),
                        };
                        println!(
                            "{:<24} {:<6} {:>12} {:>12} {:>12}  {status}",
                            n,
                            m.format.to_string(),
                            human(m.size),
                            human(m.container_size()),
                            human(p.allocated(m))
                        );
                    }
                    Err(e) => println!("{n:<24} error: {e}"),
                }
            }
            let room = p.room(None)?;
            println!(
                "pool {}: {} volume(s), {} reserved, {} available",
                pool.display(),
                room.volumes,
                human(room.reserved),
                human(room.available)
            );
            Ok(0)
        }
        VolumeCommand::Info { pool, name, json } => info(&pool, &name, json),
        VolumeCommand::Resize { pool, name, size } => {
            let p = Pool::open(&pool)?;
            let m = p.resize(&name, size)?;
            println!(
                "resized {name:?} to {}; container {}",
                human(m.size),
                container_line(&m)
            );
            Ok(0)
        }
        VolumeCommand::Delete { pool, name } => {
            Pool::open(&pool)?.delete(&name)?;
            println!("deleted volume {name:?}");
            Ok(0)
        }
        VolumeCommand::Import {
            pool,
            name,
            snapshots_retained,
            snapshot_size,
            decompress,
            source,
        } => {
            let p = Pool::open(&pool)?;
            if let Ok(VolumeMeta {
                import: Some(st), ..
            }) = p.load(&name)
            {
                println!("resuming the import of {name:?} at {} bytes", st.bytes_done);
            }
            let pb = bar(0, true);
            let mut progress = |done: u64, total: Option<u64>| {
                if let Some(t) = total {
                    pb.set_length(t);
                }
                pb.set_position(done);
            };
            let m = if source == "-" {
                let mut stdin = std::io::stdin();
                p.import(
                    &name,
                    ImportSource::Stream(&mut stdin),
                    snapshots_retained,
                    snapshot_size.unwrap_or(0),
                    &mut progress,
                )?
            } else {
                p.import(
                    &name,
                    ImportSource::File(Path::new(&source)),
                    snapshots_retained,
                    snapshot_size.unwrap_or(0),
                    &mut progress,
                )?
            };
            pb.finish_and_clear();
            println!(
                "imported {source} as {} volume {name:?}: size {}, container {}",
                m.format,
                human(m.size),
                container_line(&m)
            );
            if let Some(c) = p.cluster_counts(&name)? {
                if decompress && c.compressed > 0 {
                    let n = p.decompress(&name)?;
                    println!("expanded {n} compressed clusters");
                } else if c.compressed > 0 {
                    println!(
                        "{} of {} allocated clusters are compressed (kept; writes to them are stored uncompressed; --decompress expands them)",
                        c.compressed,
                        c.compressed + c.data
                    );
                }
            }
            Ok(0)
        }
        VolumeCommand::Snapshot(s) => snapshot(s),
        VolumeCommand::MirrorServe { pool, name, listen } => {
            let p = Pool::open(&pool)?;
            let meta = p.load(&name)?;
            let disk = p.open_volume(&name, false)?;
            let l = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("listening on {listen} (is the port in use?)"))?;
            let t = mirror::MirrorTarget::spawn(
                l,
                disk,
                &name,
                meta.replica_id,
                &p.side_path(&name, "mirror-target.json"),
            )?;
            println!("mirror target for {name:?} listening on {}", t.local_addr());
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        VolumeCommand::MirrorExercise {
            m,
            writes,
            seed,
            max_sectors,
            flush_every,
            pause_ms,
            wait_sync,
        } => exercise(
            &m,
            writes,
            seed,
            max_sectors,
            flush_every,
            pause_ms,
            wait_sync,
        ),
        VolumeCommand::Resync { m, full } => {
            let (pool, mb) = open_mirror(&m)?;
            if full {
                let mut bm = storage::mirror::DirtyBitmap::open(
                    &pool.side_path(&m.name, "mirror-bitmap"),
                    mb.size(),
                    1 << 20,
                )?;
                bm.set_all()?;
                drop(bm);
                drop(mb);
                return run(VolumeCommand::Resync { m, full: false });
            }
            let before = mb.out_of_sync();
            let pb = bar(before, false);
            mb.resync_now(&mut |done, total| {
                pb.set_length(total);
                pb.set_position(done);
            })
            .with_context(|| format!("resyncing {:?} to {}", m.name, m.peer))?;
            pb.finish_and_clear();
            let st = mb.status();
            println!(
                "resynced {before} of {} region(s) ({} sent) to {}; {} region(s) still dirty",
                st.regions,
                human(st.resync_bytes),
                m.peer,
                mb.out_of_sync()
            );
            Ok(0)
        }
        VolumeCommand::Verify { m, region_size } => {
            let pool = Pool::open(&m.pool)?;
            let mut local = pool.open_volume(&m.name, true)?;
            let cfg = mirror_cfg(&pool, &m);
            let pb = bar(local.size(), true);
            let diffs = mirror::verify(local.as_mut(), &cfg, region_size, &mut |d, t| {
                pb.set_length(t);
                pb.set_position(d);
            })
            .with_context(|| format!("verifying {:?} against {}", m.name, m.peer))?;
            pb.finish_and_clear();
            if diffs.is_empty() {
                println!(
                    "replicas of {:?} are identical ({} compared in {} regions)",
                    m.name,
                    human(local.size()),
                    local.size().div_ceil(region_size)
                );
                Ok(0)
            } else {
                println!(
                    "replicas of {:?} differ in {} range(s):",
                    m.name,
                    diffs.len()
                );
                for d in &diffs {
                    println!(
                        "  bytes {}..{} ({})",
                        d.offset,
                        d.offset + d.len,
                        human(d.len)
                    );
                }
                println!("run `ftvm volume resync --full` to repair");
                Ok(2)
            }
        }
    }
}

fn info(pool: &Path, name: &str, json: bool) -> anyhow::Result<i32> {
    let p = Pool::open(pool)?;
    let m = p.load(name)?;
    let snaps = if m.format == ImageFormat::Qcow2 && m.import.is_none() {
        p.snapshots(name).unwrap_or_default()
    } else {
        Vec::new()
    };
    let clusters = if m.import.is_none() {
        p.cluster_counts(name).ok().flatten()
    } else {
        None
    };
    let mirror = load_status(&p.side_path(name, "mirror-state.json"));
    let target = std::fs::read(p.side_path(name, "mirror-target.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<storage::mirror::TargetState>(&b).ok());
    if json {
        let v = serde_json::json!({
            "meta": m,
            "container": m.container_size(),
            "allocated": p.allocated(&m),
            "data_file": p.data_path(&m),
            "snapshots": snaps.iter().map(|s| serde_json::json!({"id": s.id, "name": s.name, "date": s.date_sec, "disk_size": s.disk_size})).collect::<Vec<_>>(),
            "clusters": clusters,
            "mirror": mirror,
            "mirror_target": target,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(0);
    }
    println!("volume:     {}", m.name);
    println!("format:     {}", m.format);
    println!("size:       {} ({} bytes)", human(m.size), m.size);
    println!("container:  {}", container_line(&m));
    println!("allocated:  {}", human(p.allocated(&m)));
    if let Some(c) = clusters {
        let allocated = (c.data + c.compressed).max(1);
        println!(
            "clusters:   {} data, {} compressed ({:.0}% of allocated), {} zero, {} unallocated",
            c.data,
            c.compressed,
            100.0 * c.compressed as f64 / allocated as f64,
            c.zero,
            c.unallocated
        );
    }
    println!("data file:  {}", p.data_path(&m).display());
    println!("replica id: {:016x}", m.replica_id);
    if let Some(st) = &m.import {
        println!(
            "import:     unfinished, {} of {} from {} (rerun the import to resume)",
            human(st.bytes_done),
            st.source_len.map(human).unwrap_or_else(|| "?".into()),
            st.source
        );
    }
    if m.format == ImageFormat::Qcow2 {
        println!(
            "snapshots:  {} of {} retained",
            snaps.len(),
            m.snapshots_retained
        );
        for s in &snaps {
            println!("  {:>4} {}", s.id, s.name);
        }
    }
    if let Some(ms) = mirror {
        println!(
            "mirror:     peer {} ({} as of unix time {}, pid {})",
            ms.peer,
            if ms.connected {
                "connected"
            } else {
                "disconnected"
            },
            ms.updated_unix,
            ms.pid
        );
        println!(
            "            {} of {} region(s) of {} dirty{}",
            ms.dirty_regions,
            ms.regions,
            human(ms.region_size),
            if ms.resync_active {
                format!(", resync {} of {}", ms.resync_done, ms.resync_total)
            } else {
                String::new()
            }
        );
        match &ms.local_failed {
            Some(why) => println!("local replica: FAILED ({why}); I/O is served by the peer"),
            None => println!("local replica: ok"),
        }
        for f in ms.faults.iter().rev().take(5) {
            println!("  event: {f}");
        }
    }
    if let Some(t) = target {
        println!(
            "mirror target: replica {}",
            if t.consistent {
                "consistent"
            } else {
                "INCONSISTENT (resync unfinished)"
            }
        );
    }
    Ok(0)
}

fn snapshot(s: SnapshotCommand) -> anyhow::Result<i32> {
    match s {
        SnapshotCommand::Create(a) => {
            Pool::open(&a.pool)?.snapshot_create(&a.name, &a.snapshot)?;
            println!("created snapshot {:?} of {:?}", a.snapshot, a.name);
        }
        SnapshotCommand::List { pool, name } => {
            let snaps = Pool::open(&pool)?.snapshots(&name)?;
            println!("{:<6} {:<24} {:>12} DATE (unix)", "ID", "NAME", "DISK SIZE");
            for s in snaps {
                println!(
                    "{:<6} {:<24} {:>12} {}",
                    s.id,
                    s.name,
                    human(s.disk_size),
                    s.date_sec
                );
            }
        }
        SnapshotCommand::Revert(a) => {
            Pool::open(&a.pool)?.snapshot_revert(&a.name, &a.snapshot)?;
            println!("reverted {:?} to snapshot {:?}", a.name, a.snapshot);
        }
        SnapshotCommand::Delete(a) => {
            Pool::open(&a.pool)?.snapshot_delete(&a.name, &a.snapshot)?;
            println!("deleted snapshot {:?} of {:?}", a.snapshot, a.name);
        }
    }
    Ok(0)
}

/// Deterministic data for write `i` of pattern `seed` (tests recompute it).
fn pattern(seed: u64, i: u64, size: u64, max_sectors: u64) -> (u64, Vec<u8>) {
    let mut x =
        seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i.wrapping_mul(0xd1b5_4a32_d192_ed03) ^ 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let sectors = 1 + next() % max_sectors.max(1);
    let len = (sectors * 512).min(size);
    let off = (next() % ((size - len) / 512 + 1)) * 512;
    let mut buf = vec![0u8; len as usize];
    for c in buf.chunks_mut(8) {
        let v = next().to_le_bytes();
        c.copy_from_slice(&v[..c.len()]);
    }
    (off, buf)
}

fn exercise(
    m: &MirrorArgs,
    writes: u64,
    seed: u64,
    max_sectors: u64,
    flush_every: u64,
    pause_ms: u64,
    wait_sync: u64,
) -> anyhow::Result<i32> {
    use std::io::Write;
    let (_pool, mut mb) = open_mirror(m)?;
    let size = mb.size();
    let mut out = std::io::stdout();
    for i in 0..writes {
        let (off, buf) = pattern(seed, i, size, max_sectors);
        mb.write_at(&buf, off)
            .with_context(|| format!("write {i} at {off}"))?;
        if flush_every > 0 && (i + 1) % flush_every == 0 {
            mb.flush().context("flush")?;
            let st = mb.status();
            writeln!(
                out,
                "flushed {} connected={} dirty={}",
                i + 1,
                st.connected,
                st.dirty_regions
            )?;
            out.flush()?;
        }
        if pause_ms > 0 {
            std::thread::sleep(Duration::from_millis(pause_ms));
        }
    }
    mb.flush().context("final flush")?;
    writeln!(out, "done {writes}")?;
    out.flush()?;
    if wait_sync > 0 {
        if mb.wait_in_sync(Duration::from_secs(wait_sync)) {
            mb.flush().context("flush")?;
            writeln!(out, "in-sync")?;
        } else {
            writeln!(out, "not-in-sync {:?}", mb.status())?;
            return Ok(1);
        }
    }
    Ok(0)
}
