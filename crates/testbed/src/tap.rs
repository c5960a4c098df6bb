//! Host tap devices with an address, deleted on drop.

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context};

/// A tap device on the host with `host_ip`/24; the guest should use `guest_ip`.
pub struct TapDevice {
    /// Interface name.
    pub name: String,
    /// The host's address on the link.
    pub host_ip: String,
    /// An address for the guest on the same /24.
    pub guest_ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl TapDevice {
    /// Creates a tap named `ftt<pid><n>` on a /24 unique to this process and call.
    pub fn new() -> anyhow::Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = format!("ftt{}x{}", pid % 100_000, n);
        // 10.(200..=254).(0..=255).0/24 from pid and counter.
        let a = 200 + (pid % 55);
        let b = (pid / 55 + n * 7) % 256;
        let host_ip = format!("10.{a}.{b}.1");
        let guest_ip = format!("10.{a}.{b}.2");
        let _ = ip(&["link", "del", &name]);
        ip(&["tuntap", "add", "dev", &name, "mode", "tap"])?;
        let tap = TapDevice {
            name,
            host_ip,
            guest_ip,
        };
        ip(&[
            "addr",
            "add",
            &format!("{}/24", tap.host_ip),
            "dev",
            &tap.name,
        ])?;
        ip(&["link", "set", &tap.name, "up"])?;
        Ok(tap)
    }

    /// The guest command-line option giving the guest its address.
    pub fn guest_cmdline(&self) -> String {
        format!("ftvm.ip={}/24", self.guest_ip)
    }
}

impl Drop for TapDevice {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.name]);
    }
}
