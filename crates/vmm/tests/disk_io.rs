//! Disk I/O runs on the disk's I/O thread and pause quiesces it at a request boundary: a guest
//! writing and reading back a pattern through virtio-blk is moved from VM to VM by pause,
//! save_state and restore (same disk file) many times while its requests are in flight. A state
//! captured with a request taken from the queue but not yet completed would leave the restored
//! guest waiting forever for that request (or with a wrong pattern); the job must finish with
//! `blk-pattern ok`. Runs the real test guest under KVM.

use std::path::Path;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vmm::{ConsoleConfig, DiskConfig, Vm, VmConfig};

fn console_text(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

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

#[test]
fn disk_requests_in_flight_survive_pause_save_and_restore() {
    testbed::require_vms();
    let dir = testbed::Scratch::new("disk-io").unwrap();
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 32 << 20]).unwrap();
    let console = dir.path("console");
    let config = VmConfig {
        kernel: testbed::testguest_bin(),
        initrd: None,
        // 32 MiB: 512 writes of 64 KiB, a flush, 512 reads.
        cmdline: "-- blk-pattern 65536".into(),
        vcpus: 1,
        mem_mib: 64,
        disks: vec![DiskConfig {
            path: disk.clone(),
            read_only: false,
            format: None,
            mirror: None,
            secret: None,
        }],
        nets: vec![],
        console: ConsoleConfig::File(console.clone()),
        cpu: None,
    };
    let mut vm = Vm::create(config.clone()).unwrap();
    vm.start().unwrap();
    let t0 = Instant::now();
    while !console_text(&console).contains("job blk-pattern running") {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "guest did not start"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let mut rounds = 0;
    let mut longest_pause = Duration::ZERO;
    // At most MOVES moves; then the guest finishes on its own. A request lost in a move leaves
    // it waiting forever, which the deadline catches (the job takes well under a second alone;
    // the deadline only bounds a hang on a loaded machine).
    const MOVES: u64 = 40;
    let mut t0 = Instant::now();
    loop {
        let text = console_text(&console);
        if text.contains("blk-pattern ok") {
            break;
        }
        assert!(
            !text.contains("error") && !text.contains("FAULT"),
            "guest failed after {rounds} moves: {text}"
        );
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "guest did not finish after {rounds} moves (a request lost in a move?): {text}"
        );
        if rounds == MOVES {
            std::thread::sleep(Duration::from_millis(10));
            continue;
        }
        std::thread::sleep(Duration::from_millis(2 + rounds % 5));
        let paused = vm.pause().unwrap();
        longest_pause = longest_pause.max(paused);
        let state = vm.save_state().unwrap();
        let old = vm;
        let restored = Vm::restore(config.clone(), &state, |mem| copy_memory(&old, mem)).unwrap();
        old.stop();
        drop(old);
        restored.start().unwrap();
        vm = restored;
        rounds += 1;
        if rounds == MOVES {
            t0 = Instant::now();
        }
    }
    vm.stop();
    eprintln!("{rounds} moves; longest pause {longest_pause:?}");
    assert!(
        rounds >= 5,
        "the job ended after {rounds} moves: too few to test requests in flight"
    );
}
