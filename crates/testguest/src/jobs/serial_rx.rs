//! `serial-rx`: reads host input from COM1's receive buffer, one MMIO read per byte, and checks
//! it is the sequence 1, 2, ..., 250, 1, 2, ... the host sends (0 means "FIFO empty"). A read
//! whose result is lost or repeated (e.g. a state saved before the read's exit completed) shows
//! as `serial-rx: sequence broken`. Prints `serial-rx N` every 1000 bytes received.

use crate::println;

/// The byte that follows `b` in the host's sequence.
fn next(b: u8) -> u8 {
    if b >= 250 {
        1
    } else {
        b + 1
    }
}

pub fn run() -> ! {
    super::running("serial-rx");
    let mut expected: u8 = 1;
    let mut received: u64 = 0;
    loop {
        let b = crate::serial::read_input();
        if b == 0 {
            continue;
        }
        if b != expected {
            println!(
                "serial-rx: sequence broken after {} bytes: expected {} got {}",
                received, expected, b
            );
        }
        expected = next(b);
        received += 1;
        if received % 1000 == 0 {
            println!("serial-rx {}", received);
        }
    }
}
