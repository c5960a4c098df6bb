//! `ftvm bench` subcommands.

use clap::Subcommand;

/// `ftvm bench` subcommands.
#[derive(Subcommand)]
pub enum BenchCommand {}

/// Runs one `ftvm bench` subcommand; returns the process exit status.
pub fn run(cmd: BenchCommand) -> anyhow::Result<i32> {
    match cmd {}
}
