//! The guest-physical memory map and the fixed resources every ftvm guest sees.
//!
//! Both guests (the stock Linux kernel and the test guest) rely on this layout, and the ACPI
//! tables describe it, so it is the single source of truth.

/// Where the GDT used for 64-bit entry lives.
pub const BOOT_GDT_START: u64 = 0x500;
/// Where the (empty) IDT used for 64-bit entry lives.
pub const BOOT_IDT_START: u64 = 0x520;
/// The Linux zero page (`struct boot_params`); RSI points here at entry.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Boot page tables: PML4, then PDPT, then four page directories (identity map of 0..4 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
/// PDPT of the boot page tables.
pub const PDPTE_START: u64 = 0xa000;
/// First of the four page directories of the boot page tables.
pub const PDE_START: u64 = 0xb000;
/// Initial stack pointer at entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line we accept (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area; memory from here to 1 MiB is reserved in e820.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables (RSDP first, then the others), inside the BIOS area the kernel scans.
pub const ACPI_START: u64 = 0xe0000;
/// Size reserved for the ACPI tables.
pub const ACPI_SIZE: u64 = 0x20000;
/// Kernels are loaded from here (bzImage protected-mode code, test-guest ELF segments).
pub const HIMEM_START: u64 = 0x100000;

/// Start of the 32-bit MMIO hole (no RAM between here and 4 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio window; device `i` sits at `VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE`.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// Most virtio-mmio devices one VM can have.
pub const VIRTIO_MMIO_MAX_DEVICES: usize = 8;
/// GSI of virtio-mmio device `i` is `VIRTIO_IRQ_BASE + i`.
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// IOAPIC MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO address.
pub const APIC_ADDR: u32 = 0xfee0_0000;

/// COM1: the 16550 serial console.
pub const SERIAL_PORT: u16 = 0x3f8;
/// GSI of COM1.
pub const SERIAL_IRQ: u32 = 4;
/// ACPI hardware-reduced sleep control register (I/O port, 1 byte).
/// Writing `SLP_EN | (SLEEP_TYPE_S5 << 2)` powers the guest off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x3c0;
/// ACPI hardware-reduced sleep status register (I/O port, 1 byte).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x3c1;
/// ACPI reset register (I/O port, 1 byte); writing `ACPI_RESET_VALUE` reboots.
pub const ACPI_RESET_PORT: u16 = 0x3c2;
/// Value the guest writes to `ACPI_RESET_PORT` to reboot.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// SLP_TYP value of S5 (soft off) as declared by the DSDT's `\_S5` package.
pub const SLEEP_TYPE_S5: u8 = 5;
/// SLP_EN bit of the sleep control register.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// i8042 command port; writing 0xfe here also reboots (legacy reset path).
pub const I8042_COMMAND_PORT: u16 = 0x64;

/// COM1's registers also appear here as MMIO (register `i` at offset `i`): guest code at CPL 3
/// cannot use port I/O on pagetable-based KVM (IOPL is forced to 0), MMIO works at any CPL.
pub const SERIAL_MMIO_BASE: u64 = 0xd000_8000;
/// The ACPI sleep control (offset 0), sleep status (1) and reset (2) registers as MMIO, for the
/// same reason.
pub const ACPI_MMIO_BASE: u64 = 0xd000_9000;

/// Page size used for dirty tracking and snapshots.
pub const PAGE_SIZE: u64 = 4096;
