//! `ftvm`: the fault-tolerant virtualization cluster's command-line tool.

mod bench;
mod bench_faults;
mod bench_ft;
mod bench_storage;
mod bench_vm;
mod demo;
mod image;
mod testbed_cmd;
mod vm;
mod volume;

use clap::{Parser, Subcommand};

/// ftvm: fault-tolerant KVM virtual machines on a two-node cluster.
#[derive(Parser)]
#[command(name = "ftvm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run, restore and control virtual machines.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Build guest images.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// Manage volumes in storage pools.
    #[command(subcommand)]
    Volume(volume::VolumeCommand),
    /// The two-node FT demo: a protected guest, a writing client, node A killed, nothing lost.
    Demo {
        /// Seconds of protected running before node A is killed.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Prefix of the test bed's network namespaces.
        #[arg(long, default_value = "demo-")]
        bed_prefix: String,
    },
    /// Benchmarks that print figures.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// The two-node network-namespace test bed on this machine (root).
    #[command(subcommand)]
    Testbed(testbed_cmd::TestbedCommand),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Vm(cmd) => vm::run(cmd),
        Command::Image(cmd) => image::run(cmd),
        Command::Volume(cmd) => volume::run(cmd),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Demo {
            seconds,
            bed_prefix,
        } => demo::run(seconds, &bed_prefix),
        Command::Testbed(cmd) => testbed_cmd::run(cmd),
    };
    // A terminating signal's bed cleanup ends the process itself (status 128 + signal), even
    // when this thread got here first because the bed went away under it.
    testbed::cleanup::wait_if_terminating();
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            // One line: the error and its causes, outermost first.
            eprintln!("ftvm: error: {err:#}");
            std::process::exit(1);
        }
    }
}
