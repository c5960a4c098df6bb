//! `ftvm bench` subcommands: measurements printed as figures (never asserted in tests).

use clap::Subcommand;

/// `ftvm bench` subcommands.
#[derive(Subcommand)]
pub enum BenchCommand {
    /// Test-guest boot time (start → workload running) and the monitor's memory overhead.
    Boot {
        /// Boots to measure.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// Print one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// Cost of pause + dirty-set collection + resume, idle and at 10k and 100k dirty pages/s.
    Pause {
        /// Pause cycles per dirty rate.
        #[arg(long, default_value_t = 300)]
        cycles: usize,
        /// Print one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
    /// FT protection vs unprotected on the two-node test bed: checkpoint rate and pause, bytes,
    /// added round trip, CPU-bound speed, failover time, acknowledged writes lost.
    Ft {
        /// Print one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// Prefix of the test bed's network namespaces.
        #[arg(long, default_value = "ftbench-")]
        bed_prefix: String,
    },
    /// The FT fault matrix on the two-node test bed: each fault scenario N times (acknowledged
    /// writes lost, periods with two live copies, resurrections, failover time, protection at
    /// the end), then false failovers under a CPU and disk hog.
    Faults {
        /// Rounds per scenario.
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// Run only this scenario (repeat for more; default: all).
        #[arg(long = "scenario")]
        scenarios: Vec<String>,
        /// Seconds of `stress-ng` hog for the false-failover run (0 skips it).
        #[arg(long, default_value_t = 60)]
        hog_secs: u64,
        /// Print one JSON object on the last line.
        #[arg(long)]
        json: bool,
        /// Prefix of the test bed's network namespaces.
        #[arg(long, default_value = "ftfaults-")]
        bed_prefix: String,
    },
    /// Storage: mirrored vs local writes, resync vs a raw copy, qcow2 vs raw random reads.
    Storage {
        /// Disk size used by each measurement, e.g. 256M.
        #[arg(long, value_parser = storage::size::parse_size, default_value = "256M")]
        size: u64,
        /// Directory for the scratch files (default: a temporary directory).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
        /// Print one JSON object on the last line.
        #[arg(long)]
        json: bool,
    },
}

/// Runs one `ftvm bench` subcommand; returns the process exit status.
pub fn run(cmd: BenchCommand) -> anyhow::Result<i32> {
    match cmd {
        BenchCommand::Boot { runs, json } => crate::bench_vm::boot(runs, json),
        BenchCommand::Pause { cycles, json } => crate::bench_vm::pause(cycles, json),
        BenchCommand::Ft { json, bed_prefix } => crate::bench_ft::run(json, &bed_prefix),
        BenchCommand::Faults {
            rounds,
            scenarios,
            hog_secs,
            json,
            bed_prefix,
        } => crate::bench_faults::run(crate::bench_faults::FaultsArgs {
            rounds,
            scenarios,
            hog_secs,
            json,
            bed_prefix,
        }),
        BenchCommand::Storage { size, dir, json } => crate::bench_storage::run(size, dir, json),
    }
}
