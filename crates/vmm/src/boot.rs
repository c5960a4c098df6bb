//! Direct kernel boot: loads a bzImage (stock Linux) or an ELF (the test guest), the initrd and the
//! command line, writes the zero page with the e820 map and the boot page tables, and computes the
//! boot vCPU's registers for the Linux 64-bit boot protocol.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{bzimage::BzImage, elf::Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
use crate::memory::GuestMemory;

/// e820 type of usable RAM.
const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
const E820_RESERVED: u32 = 2;

/// Errors while loading the guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("cannot read kernel {path}: {error} (check --kernel)")]
    KernelFile {
        /// The path given.
        path: String,
        /// Why.
        error: std::io::Error,
    },
    /// The kernel is neither a bzImage nor an ELF we can load.
    #[error("cannot load kernel {path}: {reason}")]
    KernelLoad {
        /// The path given.
        path: String,
        /// What the loader said.
        reason: String,
    },
    /// The initrd cannot be read or does not fit.
    #[error("cannot load initrd {path}: {reason} (check --initrd and --mem)")]
    Initrd {
        /// The path given.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// The command line is too long.
    #[error("kernel command line is {0} bytes; the limit is {max} bytes", max = CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write boot structures to guest memory: {0}")]
    Memory(String),
}

/// What kind of kernel was loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum KernelKind {
    /// A Linux bzImage entered at its 64-bit entry point.
    BzImage,
    /// A 64-bit ELF entered at `e_entry` (the test guest).
    Elf,
}

/// The result of loading: where the boot vCPU starts.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// Guest-physical entry point.
    pub entry: u64,
}

fn mem_err(e: impl std::fmt::Display) -> BootError {
    BootError::Memory(e.to_string())
}

/// Whether the file at `path` starts with the ELF magic.
pub fn is_elf(path: &Path) -> Result<bool, BootError> {
    let mut f = File::open(path).map_err(|error| BootError::KernelFile {
        path: path.display().to_string(),
        error,
    })?;
    let mut magic = [0u8; 4];
    match f.read_exact(&mut magic) {
        Ok(()) => Ok(&magic == b"\x7fELF"),
        Err(error) => Err(BootError::KernelFile {
            path: path.display().to_string(),
            error,
        }),
    }
}

/// Loads kernel, initrd and command line into `mem` and writes the zero page, the GDT and the
/// boot page tables. `kind` is what [`is_elf`] said of `kernel`; `rsdp` is the ACPI RSDP address,
/// if tables were written.
pub fn load_guest(
    mem: &GuestMemory,
    kernel: &Path,
    kind: KernelKind,
    initrd: Option<&Path>,
    cmdline: &str,
    rsdp: Option<GuestAddress>,
) -> Result<BootInfo, BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    let kpath = kernel.display().to_string();
    let mut file = File::open(kernel).map_err(|error| BootError::KernelFile {
        path: kpath.clone(),
        error,
    })?;
    let load_err = |e: linux_loader::loader::Error| BootError::KernelLoad {
        path: kpath.clone(),
        reason: e.to_string(),
    };

    let mut params = boot_params::default();
    let info = if kind == KernelKind::Elf {
        let res =
            Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))).map_err(load_err)?;
        BootInfo {
            entry: res.kernel_load.raw_value(),
        }
    } else {
        let res = BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START)))
            .map_err(load_err)?;
        let hdr = res.setup_header.ok_or_else(|| BootError::KernelLoad {
            path: kpath.clone(),
            reason: "no setup header: not a bzImage".into(),
        })?;
        if hdr.version < 0x020c || hdr.xloadflags & 1 == 0 {
            return Err(BootError::KernelLoad {
                path: kpath.clone(),
                reason: "the kernel has no 64-bit entry point (boot protocol 2.12+ with XLF_KERNEL_64 needed)".into(),
            });
        }
        params.hdr = hdr;
        // The 64-bit entry point is 0x200 bytes into the protected-mode code.
        BootInfo {
            entry: res.kernel_load.raw_value() + 0x200,
        }
    };

    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;
    params.hdr.kernel_alignment = 0x0100_0000;

    let mut cmd = cmdline.as_bytes().to_vec();
    cmd.push(0);
    mem.write_slice(&cmd, GuestAddress(CMDLINE_START))
        .map_err(mem_err)?;

    let low_end = low_ram_end(mem);
    if let Some(initrd) = initrd {
        let (addr, size) = load_initrd(mem, initrd, low_end, params.hdr.initrd_addr_max)?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if let Some(rsdp) = rsdp {
        params.acpi_rsdp_addr = rsdp.raw_value();
    }

    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, low_end - HIMEM_START, E820_RAM),
    ];
    for region in mem.iter() {
        use vm_memory::GuestMemoryRegion;
        if region.start_addr().raw_value() >= MMIO_GAP_END {
            e820.push((region.start_addr().raw_value(), region.len(), E820_RAM));
        }
    }
    for (i, (addr, size, type_)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *type_,
        };
    }
    params.e820_entries = e820.len() as u8;
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(mem_err)?;

    write_gdt(mem)?;
    write_page_tables(mem)?;
    Ok(info)
}

/// End of the RAM below the MMIO gap.
fn low_ram_end(mem: &GuestMemory) -> u64 {
    use vm_memory::GuestMemoryRegion;
    mem.iter()
        .map(|r| r.start_addr().raw_value() + r.len())
        .filter(|end| *end <= MMIO_GAP_START)
        .max()
        .unwrap_or(0)
}

/// Places the initrd page-aligned at the top of low RAM (below `addr_max`).
fn load_initrd(
    mem: &GuestMemory,
    path: &Path,
    low_end: u64,
    addr_max: u32,
) -> Result<(u64, u64), BootError> {
    let ipath = path.display().to_string();
    let err = |reason: String| BootError::Initrd {
        path: ipath.clone(),
        reason,
    };
    let mut f = File::open(path).map_err(|e| err(e.to_string()))?;
    let size = f.seek(SeekFrom::End(0)).map_err(|e| err(e.to_string()))?;
    f.rewind().map_err(|e| err(e.to_string()))?;
    let top = low_end.min(u64::from(addr_max) + 1);
    let addr = top
        .checked_sub(size)
        .map(|a| a & !(PAGE_SIZE - 1))
        .filter(|a| *a >= HIMEM_START + (16 << 20));
    let Some(addr) = addr else {
        return Err(err(format!(
            "{size} bytes do not fit in guest RAM below {top:#x}"
        )));
    };
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, size as usize)
        .map_err(|e| err(e.to_string()))?;
    Ok((addr, size))
}

/// Encodes one GDT descriptor.
fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT: null, null, 64-bit code (0x10), data (0x18), TSS (0x20).
const GDT: [(u16, u32, u32); 5] = [
    (0, 0, 0),
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];

fn segment(index: usize) -> kvm_segment {
    let (flags, base, limit) = GDT[index];
    let g = (flags >> 15) & 1;
    kvm_segment {
        base: u64::from(base),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: (index * 8) as u16,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: g as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: if flags & 0x80 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

fn write_gdt(mem: &GuestMemory) -> Result<(), BootError> {
    for (i, (flags, base, limit)) in GDT.iter().enumerate() {
        mem.write_obj(
            gdt_entry(*flags, *base, *limit),
            GuestAddress(BOOT_GDT_START + i as u64 * 8),
        )
        .map_err(mem_err)?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(mem_err)
}

/// Identity-maps 0..4 GiB with 2 MiB pages.
fn write_page_tables(mem: &GuestMemory) -> Result<(), BootError> {
    mem.write_obj(PDPTE_START | 0x3, GuestAddress(PML4_START))
        .map_err(mem_err)?;
    for pd in 0..4u64 {
        let pd_addr = PDE_START + pd * 0x1000;
        mem.write_obj(pd_addr | 0x3, GuestAddress(PDPTE_START + pd * 8))
            .map_err(mem_err)?;
        let mut entries = [0u64; 512];
        for (i, e) in entries.iter_mut().enumerate() {
            *e = (((pd << 9) + i as u64) << 21) | 0x83;
        }
        // SAFETY: `entries` is a plain array of u64; viewing it as bytes is valid.
        let bytes = unsafe { std::slice::from_raw_parts(entries.as_ptr().cast::<u8>(), 4096) };
        mem.write_slice(bytes, GuestAddress(pd_addr))
            .map_err(mem_err)?;
    }
    Ok(())
}

/// Special registers for 64-bit entry: paging with the boot page tables, the boot GDT loaded.
pub fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(2);
    let data = segment(3);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(4);
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    sregs.cr3 = PML4_START;
    const CR4_PAE: u64 = 1 << 5;
    const CR4_OSFXSR: u64 = 1 << 9;
    const CR4_OSXMMEXCPT: u64 = 1 << 10;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    const CR0_PE: u64 = 1;
    const CR0_MP: u64 = 1 << 1;
    const CR0_ET: u64 = 1 << 4;
    const CR0_NE: u64 = 1 << 5;
    const CR0_PG: u64 = 1 << 31;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_PG;
    const EFER_LME: u64 = 1 << 8;
    const EFER_LMA: u64 = 1 << 10;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers at entry: RIP at the entry point, RSI at the zero page.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_code_segment_is_64_bit() {
        let cs = segment(2);
        assert_eq!(cs.selector, 0x10);
        assert_eq!(cs.l, 1);
        assert_eq!(cs.db, 0);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
    }
}
