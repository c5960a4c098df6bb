//! Boot parameters: the Linux zero page (`struct boot_params`) and the kernel command line.

use alloc::vec::Vec;
use core::net::Ipv4Addr;

/// Offsets into `struct boot_params`.
const E820_ENTRIES: usize = 0x1e8;
const CMD_LINE_PTR: usize = 0x228;
const E820_TABLE: usize = 0x2d0;
/// Capacity of `e820_table`.
const E820_MAX: usize = 128;
/// E820 type of usable RAM.
pub const E820_RAM: u32 = 1;

/// Longest command line read.
const CMDLINE_MAX: usize = 4096;

/// The zero page handed over by the monitor.
#[derive(Clone, Copy)]
pub struct BootParams(usize);

/// One E820 memory-map entry.
#[derive(Clone, Copy, Debug)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: u32,
}

impl BootParams {
    /// Wraps the zero page at `addr` (RSI at entry).
    pub fn at(addr: usize) -> Self {
        Self(addr)
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        // SAFETY: the monitor places a full 4 KiB `struct boot_params` at `self.0`; every offset
        // used here lies inside it, and `read_unaligned` copes with the packed layout.
        unsafe { core::ptr::read_unaligned((self.0 + offset) as *const T) }
    }

    /// The memory map.
    pub fn e820(&self) -> impl Iterator<Item = E820Entry> + '_ {
        let n = (self.read::<u8>(E820_ENTRIES) as usize).min(E820_MAX);
        (0..n).map(move |i| {
            let base = E820_TABLE + i * 20;
            E820Entry {
                addr: self.read(base),
                size: self.read(base + 8),
                kind: self.read(base + 16),
            }
        })
    }

    /// The NUL-terminated command line (empty if absent or not UTF-8).
    pub fn cmdline(&self) -> &'static str {
        let ptr = self.read::<u32>(CMD_LINE_PTR) as usize;
        if ptr == 0 {
            return "";
        }
        // SAFETY: the monitor wrote a NUL-terminated string at `cmd_line_ptr` in low memory,
        // which nothing in the guest overwrites; the scan stops at the first NUL or after
        // CMDLINE_MAX bytes, all inside the identity-mapped RAM.
        let bytes = unsafe {
            let base = ptr as *const u8;
            let mut len = 0;
            while len < CMDLINE_MAX && *base.add(len) != 0 {
                len += 1;
            }
            core::slice::from_raw_parts(base, len)
        };
        core::str::from_utf8(bytes).unwrap_or("")
    }
}

/// An IPv4 address with prefix length (`ftvm.ip=A.B.C.D/N`).
#[derive(Clone, Copy, Debug)]
pub struct IpCidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

/// What the command line asks for.
#[derive(Debug, Default)]
pub struct Args {
    /// `ftvm.tsc_khz`.
    pub tsc_khz: Option<u64>,
    /// `ftvm.ip`.
    pub ip: Option<IpCidr>,
    /// `ftvm.gw`.
    pub gw: Option<Ipv4Addr>,
    /// The job: every word after ` -- `.
    pub job: Vec<&'static str>,
}

impl Args {
    /// Parses `key=value ... -- job args...`; unknown keys are ignored.
    pub fn parse(cmdline: &'static str) -> Result<Self, &'static str> {
        let mut args = Args::default();
        let mut words = cmdline.split_ascii_whitespace();
        for word in words.by_ref() {
            if word == "--" {
                break;
            }
            let Some((key, value)) = word.split_once('=') else {
                continue;
            };
            match key {
                "ftvm.tsc_khz" => {
                    let khz = value.parse().map_err(|_| "bad ftvm.tsc_khz")?;
                    args.tsc_khz = (khz > 0).then_some(khz);
                }
                "ftvm.ip" => {
                    args.ip = Some(parse_cidr(value).ok_or("bad ftvm.ip (want A.B.C.D/N)")?)
                }
                "ftvm.gw" => args.gw = Some(value.parse().map_err(|_| "bad ftvm.gw")?),
                _ => {}
            }
        }
        args.job = words.collect();
        Ok(args)
    }
}

fn parse_cidr(s: &str) -> Option<IpCidr> {
    let (addr, prefix) = s.split_once('/').unwrap_or((s, "24"));
    let prefix: u8 = prefix.parse().ok()?;
    (prefix <= 32).then_some(IpCidr {
        addr: addr.parse().ok()?,
        prefix,
    })
}
