//! Dirty-page tracking covers the monitor's own writes: data a virtio-blk read put into guest
//! memory shows up in the dirty set. Runs the real test guest under KVM (root, /dev/kvm).

use std::collections::HashSet;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress};
use vmm::{ConsoleConfig, DiskConfig, Vm, VmConfig};

fn pattern_word(sector: u64, word: u64) -> u64 {
    sector.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ word
}

#[test]
fn virtio_blk_reads_into_guest_memory_are_in_the_dirty_set() {
    testbed::require_vms();
    let dir = testbed::Scratch::new("dirty").unwrap();
    let disk = dir.path("disk.img");
    std::fs::write(&disk, vec![0u8; 2 << 20]).unwrap();
    let console = dir.path("console");
    let vm = Vm::create(VmConfig {
        kernel: testbed::testguest_bin(),
        initrd: None,
        cmdline: "-- blk-pattern 1024".into(),
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
    })
    .unwrap();
    // Start from a clean set: only what happens after boot counts.
    vm.take_dirty_pages().unwrap();
    vm.start().unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("blk-pattern ok")
    {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "guest did not finish: {:?}",
            std::fs::read_to_string(&console)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().unwrap();
    let (by_vcpu, by_monitor) = vm.take_dirty_pages_by_source().unwrap();
    assert!(
        by_monitor.count() > 0,
        "the monitor wrote guest memory but no page is marked"
    );

    let words: HashSet<u64> = (0..1024)
        .flat_map(|s| (0..64).map(move |w| pattern_word(s, w)))
        .collect();
    let holds_disk_data = |page: u64| {
        let mut buf = vec![0u8; 4096];
        vm.memory()
            .read_slice(&mut buf, GuestAddress(page))
            .unwrap();
        buf.chunks_exact(8)
            .filter(|c| words.contains(&u64::from_le_bytes((*c).try_into().unwrap())))
            .count()
            >= 64
    };
    let read_pages: Vec<u64> = by_monitor.iter().filter(|&p| holds_disk_data(p)).collect();
    assert!(
        !read_pages.is_empty(),
        "no monitor-dirtied page holds data read from the disk"
    );
    // The merged set used by checkpoints contains them too, whatever the vCPU log says.
    let mut merged = by_vcpu.clone();
    merged.merge(&by_monitor);
    assert!(read_pages.iter().all(|&p| merged.contains(p)));
    // After collection the set starts empty again while the guest is paused.
    assert_eq!(vm.take_dirty_pages().unwrap().count(), 0);
    vm.stop();
}
