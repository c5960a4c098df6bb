//! The captured VM state is taken at a consistent point and applied completely: a guest reading
//! COM1's receive buffer (an MMIO read with a side effect: it pops the FIFO) is moved from VM to
//! VM by save/restore dozens of times while the host feeds it a known byte sequence; no byte may
//! be lost or repeated. Without completing the pending MMIO exit before saving (KVM_RUN with
//! `immediate_exit`), a state saved right after the read's exit has the byte gone from the FIFO
//! but the read not yet retired, and the restored guest reads the next byte instead.
//! Runs the real test guest under KVM.

use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::{ConsoleConfig, Vm, VmConfig};

/// How many times the guest moves to a new VM.
const ROUNDS: usize = 60;

fn next(b: u8) -> u8 {
    if b >= 250 {
        1
    } else {
        b + 1
    }
}

fn console_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn wait_for(path: &Path, what: &str, timeout: Duration) {
    let t0 = Instant::now();
    while !console_text(path).contains(what) {
        assert!(
            t0.elapsed() < timeout,
            "guest did not print {what:?}: {}",
            console_text(path)
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Copies all of `from`'s guest memory into the VM being restored.
fn copy_memory(from: &Vm, to: &vmm::memory::GuestMemory) -> Result<(), vmm::Error> {
    let mut buf = vec![0u8; 1 << 20];
    for region in from.memory().iter() {
        let start = region.start_addr().0;
        let mut off = 0;
        while off < region.len() {
            let n = (region.len() - off).min(buf.len() as u64) as usize;
            from.memory()
                .read_slice(&mut buf[..n], GuestAddress(start + off))
                .map_err(|e| vmm::Error::Memory(e.to_string()))?;
            to.write_slice(&buf[..n], GuestAddress(start + off))
                .map_err(|e| vmm::Error::Memory(e.to_string()))?;
            off += n as u64;
        }
    }
    Ok(())
}

/// How the guest moves to the next VM.
#[derive(Clone, Copy)]
enum Move {
    /// `Vm::restore` (a snapshot restore).
    Restore,
    /// A standby VM filled with memory, then `load_state` (an FT backup's failover).
    Standby,
}

#[test]
fn serial_input_survives_save_restore_while_the_guest_reads_it() {
    run_rounds(Move::Restore);
}

#[test]
fn serial_input_survives_failover_to_a_standby_while_the_guest_reads_it() {
    run_rounds(Move::Standby);
}

fn run_rounds(how: Move) {
    testbed::require_vms();
    let dir = testbed::Scratch::new("state-consistency").unwrap();
    let console = dir.path("console");
    let config = VmConfig {
        kernel: testbed::testguest_bin(),
        initrd: None,
        cmdline: "-- serial-rx".into(),
        vcpus: 1,
        mem_mib: 32,
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File(console.clone()),
        cpu: None,
    };
    let mut vm = Vm::create(config.clone()).unwrap();
    vm.start().unwrap();
    wait_for(&console, "job serial-rx running", Duration::from_secs(20));

    let mut next_byte = 1u8;
    let mut sent: u64 = 0;
    // Feeds the sequence for `for_time`; returns how many bytes the UART took.
    let mut feed = |vm: &Vm, for_time: Duration| -> u64 {
        let mut taken = 0;
        let t0 = Instant::now();
        while t0.elapsed() < for_time {
            let mut chunk = [0u8; 16];
            let mut b = next_byte;
            for c in &mut chunk {
                *c = b;
                b = next(b);
            }
            let n = vm.serial_input(&chunk);
            for _ in 0..n {
                next_byte = next(next_byte);
            }
            taken += n as u64;
            std::thread::sleep(Duration::from_micros(300));
        }
        taken
    };
    let mut rips = Vec::new();
    for round in 0..ROUNDS {
        // Vary the pause point against the guest's read loop.
        sent += feed(&vm, Duration::from_millis(5 + (round as u64 * 7) % 20));
        // Both pause paths: plain (state saved on request) and the checkpoint's fast path
        // (each vCPU saves on its way out, with the registers KVM synced at the exit).
        if round % 2 == 0 {
            vm.pause().unwrap();
        } else {
            vm.pause_and_capture().unwrap();
        }
        let state = vm.save_state().unwrap();
        rips.push(state.vcpus[0].rip());
        let old = vm;
        let restored = match how {
            Move::Restore => {
                Vm::restore(config.clone(), &state, |mem| copy_memory(&old, mem)).unwrap()
            }
            Move::Standby => {
                let standby = Vm::create_standby(config.clone(), old.kind()).unwrap();
                copy_memory(&old, standby.memory()).unwrap();
                standby.load_state(&state).unwrap();
                standby
            }
        };
        old.stop();
        drop(old);
        restored.start().unwrap();
        vm = restored;
    }
    // Feed until the guest has taken at least 2000 bytes (the FIFO only takes what it reads:
    // on a loaded machine that is slow), then let it drain the FIFO and report the last full
    // thousand. The deadlines only bound a hang.
    let t0 = Instant::now();
    while sent < 2000 {
        if t0.elapsed() > Duration::from_secs(120) {
            vm.pause().unwrap();
            let rip = vm.save_state().unwrap().vcpus[0].rip();
            panic!(
                "the guest stopped reading input: {sent} bytes taken; RIP {rip:#x}; exit {:?}; rips at moves {rips:x?}; console: {}",
                vm.wait_exit(Duration::ZERO),
                console_text(&console)
            );
        }
        sent += feed(&vm, Duration::from_millis(50));
    }
    let last = sent / 1000 * 1000;
    wait_for(
        &console,
        &format!("serial-rx {last}\n"),
        Duration::from_secs(120),
    );
    vm.stop();
    let text = console_text(&console);
    let broken: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("sequence broken"))
        .collect();
    assert!(
        broken.is_empty(),
        "serial input was lost or repeated across {ROUNDS} save/restore rounds ({sent} bytes sent): {broken:?}"
    );
}
