//! COM1 console (a polled 16550) and the `print!`/`println!` macros.
//!
//! The UART is reached through the monitor's MMIO window for COM1 (register `i` at
//! `COM1_MMIO + i`): the nested KVM here forces IOPL to 0 at CPL 3, so `in`/`out` would fault.
//! (Only the CPL-0 exception stub in [`crate::boot`] uses the I/O ports.)
//!
//! Every register access is a VM exit (≈65 µs on nested KVM), so with the FIFOs enabled the
//! line status is polled once per 16 bytes (an empty transmit holding register means an empty
//! 16-byte FIFO). The guest is single-threaded and never takes interrupts: no lock is needed.

use core::fmt::{self, Write};

/// COM1's registers as MMIO (the monitor's `layout::SERIAL_MMIO_BASE`), byte accesses.
const COM1_MMIO: usize = 0xd000_8000;

/// Transmit holding register.
const THR: usize = 0;
/// FIFO control register: enable and clear both FIFOs.
const FCR: usize = 2;
const FCR_ENABLE_CLEAR: u8 = 0x07;
/// Line status register; bit 5 = transmit holding register (and FIFO) empty.
const LSR: usize = 5;
const LSR_THR_EMPTY: u8 = 1 << 5;
/// Transmit FIFO depth of a 16550A.
const FIFO_LEN: usize = 16;

fn read_reg(reg: usize) -> u8 {
    // SAFETY: the COM1 MMIO window is identity mapped (user accessible) device memory; a byte
    // read of a UART register has no effect on guest memory.
    unsafe { core::ptr::read_volatile((COM1_MMIO + reg) as *const u8) }
}

fn write_reg(reg: usize, value: u8) {
    // SAFETY: as for `read_reg`.
    unsafe { core::ptr::write_volatile((COM1_MMIO + reg) as *mut u8, value) }
}

fn write_bytes(bytes: &[u8]) {
    for chunk in bytes.chunks(FIFO_LEN) {
        while read_reg(LSR) & LSR_THR_EMPTY == 0 {
            core::hint::spin_loop();
        }
        chunk.iter().for_each(|&b| write_reg(THR, b));
    }
}

/// Enables the UART FIFOs.
pub fn init() {
    write_reg(FCR, FCR_ENABLE_CLEAR);
}

/// `fmt::Write` sink that gathers output and writes it in FIFO-sized bursts.
struct Buffered {
    buf: [u8; 256],
    len: usize,
}

impl Buffered {
    fn flush(&mut self) {
        write_bytes(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for Buffered {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for &b in s.as_bytes() {
            if self.len == self.buf.len() {
                self.flush();
            }
            self.buf[self.len] = b;
            self.len += 1;
        }
        Ok(())
    }
}

/// Writes formatted text (what the macros use).
pub fn write_fmt(args: fmt::Arguments) {
    let mut out = Buffered {
        buf: [0; 256],
        len: 0,
    };
    let _ = out.write_fmt(args);
    out.flush();
}

/// Prints to the serial console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the serial console.
#[macro_export]
macro_rules! println {
    () => { $crate::print!("\n") };
    ($($arg:tt)*) => { $crate::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}

/// Prints `testguest: error: ...` and powers off.
#[macro_export]
macro_rules! fatal {
    ($($arg:tt)*) => {{
        $crate::println!("testguest: error: {}", format_args!($($arg)*));
        $crate::power::off()
    }};
}

/// Receive buffer register (with DLAB clear).
const RBR: usize = 0;

/// Reads one byte of host input from the receive buffer; 0 when the FIFO is empty (the UART
/// returns 0 then). Every call is one MMIO read exit with a side effect (it pops the FIFO).
pub fn read_input() -> u8 {
    read_reg(RBR)
}
