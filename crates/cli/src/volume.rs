//! `ftvm volume` subcommands.

use clap::Subcommand;

/// `ftvm volume` subcommands.
#[derive(Subcommand)]
pub enum VolumeCommand {}

/// Runs one `ftvm volume` subcommand; returns the process exit status.
pub fn run(cmd: VolumeCommand) -> anyhow::Result<i32> {
    match cmd {}
}
