//! What a VM is made of, as given on the command line, with validation that names the fix.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = 8;
/// Least guest memory, in MiB.
pub const MIN_MEM_MIB: u64 = 16;

/// A virtio-blk disk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskConfig {
    /// Image file (raw or qcow2).
    pub path: PathBuf,
    /// Refuse guest writes.
    pub read_only: bool,
    /// The image's format; `None`: the pool volume's metadata, else raw (an image that looks
    /// like qcow2 is then refused: a guest may have written that header into a raw disk).
    #[serde(default)]
    pub format: Option<storage::ImageFormat>,
    /// Mirror every write synchronously to `ftvm volume mirror-serve` at this ADDR:PORT (HA).
    #[serde(default)]
    pub mirror: Option<String>,
    /// The cluster secret `mirror` authenticates with; never serialized (snapshots and the
    /// A-link's Hello carry no secret), so each node attaches its own.
    #[serde(skip)]
    pub secret: Option<storage::mirror::Secret>,
}

/// A virtio-net interface.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NetConfig {
    /// Host tap device name (must exist).
    pub tap: String,
    /// Guest MAC address.
    pub mac: [u8; 6],
}

/// Where the serial console goes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// The monitor's stdin/stdout.
    Stdio,
    /// Appended to a file.
    File(PathBuf),
    /// Discarded.
    Null,
}

/// A VM's complete configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmConfig {
    /// Kernel image: a bzImage or an ELF.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Number of vCPUs (1..=8).
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Disks, in order (the first is /dev/vda).
    pub disks: Vec<DiskConfig>,
    /// Network interfaces, in order.
    pub nets: Vec<NetConfig>,
    /// Serial console.
    pub console: ConsoleConfig,
    /// The CPU model the guest sees (`--cpu`); `None`: the default (see `cpu_model`).
    pub cpu: Option<crate::cpu_model::CpuModelName>,
}

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("--vcpus {0} is out of range: use 1 to {MAX_VCPUS}")]
    Vcpus(u8),
    /// Memory too small.
    #[error("--mem {0} MiB is too small: use at least {MIN_MEM_MIB} MiB")]
    MemTooSmall(u64),
    /// Memory larger than the host has.
    #[error(
        "--mem {requested} MiB is more than this host's {host} MiB of memory: use a smaller --mem"
    )]
    MemTooLarge {
        /// Requested MiB.
        requested: u64,
        /// Host MiB.
        host: u64,
    },
    /// Too many devices.
    #[error("{0} disks and network interfaces given; at most {max} fit", max = crate::layout::VIRTIO_MMIO_MAX_DEVICES)]
    TooManyDevices(usize),
    /// An invalid MAC address.
    #[error("invalid MAC address {0:?}: use six hex bytes like 52:54:00:12:34:56")]
    Mac(String),
}

impl VmConfig {
    /// Checks the numbers; files and taps are checked when they are opened.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::Vcpus(self.vcpus));
        }
        if self.mem_mib < MIN_MEM_MIB {
            return Err(ConfigError::MemTooSmall(self.mem_mib));
        }
        if let Some(host) = host_mem_mib() {
            if self.mem_mib > host {
                return Err(ConfigError::MemTooLarge {
                    requested: self.mem_mib,
                    host,
                });
            }
        }
        let n = self.disks.len() + self.nets.len();
        if n > crate::layout::VIRTIO_MMIO_MAX_DEVICES {
            return Err(ConfigError::TooManyDevices(n));
        }
        Ok(())
    }
}

/// The host's total memory in MiB, from /proc/meminfo.
pub fn host_mem_mib() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

/// Parses `52:54:00:12:34:56`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], ConfigError> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(ConfigError::Mac(s.to_string()));
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        *b = u8::from_str_radix(p, 16).map_err(|_| ConfigError::Mac(s.to_string()))?;
    }
    Ok(mac)
}

/// A locally administered MAC derived from the tap name, stable across runs.
pub fn default_mac(tap: &str) -> [u8; 6] {
    let h = crc32fast::hash(tap.as_bytes()).to_be_bytes();
    [0x52, 0x54, 0x00, h[1], h[2], h[3]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:aa:bb:0c").ok(),
            Some([0x52, 0x54, 0, 0xaa, 0xbb, 0x0c])
        );
        assert!(parse_mac("52:54:00:aa:bb").is_err());
        assert!(parse_mac("zz:54:00:aa:bb:cc").is_err());
    }
}
