//! `ftvm testbed`: the two-node network-namespace test bed on this machine.

use clap::Subcommand;
use testbed::TwoNodeBed;

/// `ftvm testbed` subcommands (all need root).
#[derive(Subcommand)]
pub enum TestbedCommand {
    /// Build namespaces node-a, node-b and client: the A-link, the bridged business LAN and a
    /// guest tap on each node.
    Up {
        /// Prefix of the namespace names.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Kill every process in the bed's namespaces and remove them.
    Down {
        /// Prefix of the namespace names.
        #[arg(long, default_value = "")]
        prefix: String,
    },
    /// Show what exists of the bed; exit status 0 only if it is complete.
    Status {
        /// Prefix of the namespace names.
        #[arg(long, default_value = "")]
        prefix: String,
    },
}

/// Runs one `ftvm testbed` subcommand; returns the process exit status.
pub fn run(cmd: TestbedCommand) -> anyhow::Result<i32> {
    if !testbed::netns::is_root() {
        anyhow::bail!(
            "ftvm testbed needs root (it creates network namespaces, bridges and taps): run it as root, e.g. `sudo ftvm testbed up`"
        );
    }
    match cmd {
        TestbedCommand::Up { prefix } => {
            let bed = TwoNodeBed::up(&prefix)?;
            let text = bed.describe();
            // Keep it before printing: a closed stdout must not take the bed down.
            bed.keep();
            out(&format!(
                "{text}\nremove it with: ftvm testbed down{}\n",
                prefix_arg(&prefix)
            ));
            Ok(0)
        }
        TestbedCommand::Down { prefix } => {
            let removed = TwoNodeBed::cleanup_stale(&prefix)?;
            if removed.is_empty() {
                out(&format!(
                    "no test bed with prefix {prefix:?}: nothing to remove\n"
                ));
            } else {
                out(&format!("removed {}\n", removed.join(" ")));
            }
            Ok(0)
        }
        TestbedCommand::Status { prefix } => {
            out(&TwoNodeBed::status(&prefix)?);
            let complete = TwoNodeBed::existing(&prefix).len() == TwoNodeBed::names(&prefix).len();
            if !complete {
                out(&format!(
                    "the test bed is not (completely) up: ftvm testbed up{}\n",
                    prefix_arg(&prefix)
                ));
            }
            Ok(if complete { 0 } else { 1 })
        }
    }
}

/// Prints to stdout, ignoring a closed pipe (e.g. `| head`).
fn out(text: &str) {
    use std::io::Write;
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn prefix_arg(prefix: &str) -> String {
    if prefix.is_empty() {
        String::new()
    } else {
        format!(" --prefix {prefix}")
    }
}
