//! `ftvm vm` subcommands.

use clap::Subcommand;

/// `ftvm vm` subcommands.
#[derive(Subcommand)]
pub enum VmCommand {}

/// Runs one `ftvm vm` subcommand; returns the process exit status.
pub fn run(cmd: VmCommand) -> anyhow::Result<i32> {
    match cmd {}
}
