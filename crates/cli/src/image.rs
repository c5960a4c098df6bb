//! `ftvm image` subcommands.

use clap::Subcommand;

/// `ftvm image` subcommands.
#[derive(Subcommand)]
pub enum ImageCommand {}

/// Runs one `ftvm image` subcommand; returns the process exit status.
pub fn run(cmd: ImageCommand) -> anyhow::Result<i32> {
    match cmd {}
}
