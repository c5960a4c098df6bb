//! A VM records its CPU model in its state, and a restore refuses a state whose CPU model this
//! host cannot provide, naming the missing features, before it builds anything. Runs the real
//! test guest under KVM.

use std::time::{Duration, Instant};

use vmm::cpu_model::{CpuModelName, Reg};
use vmm::{ConsoleConfig, Vm, VmConfig};

#[test]
fn restore_refuses_a_cpu_model_this_host_cannot_provide() {
    testbed::require_vms();
    let dir = testbed::Scratch::new("cpu-model").unwrap();
    let console = dir.path("console");
    let config = VmConfig {
        kernel: testbed::testguest_bin(),
        initrd: None,
        cmdline: "-- counter".into(),
        vcpus: 1,
        mem_mib: 32,
        disks: vec![],
        nets: vec![],
        console: ConsoleConfig::File(console.clone()),
        cpu: Some(CpuModelName::X86_64),
    };
    let vm = Vm::create(config.clone()).unwrap();
    vm.start().unwrap();
    let t0 = Instant::now();
    while !std::fs::read_to_string(&console)
        .unwrap_or_default()
        .contains("counter 2")
    {
        assert!(t0.elapsed() < Duration::from_secs(20), "guest did not run");
        std::thread::sleep(Duration::from_millis(5));
    }
    vm.pause().unwrap();
    let state = vm.save_state().unwrap();
    assert_eq!(state.cpu.name, CpuModelName::X86_64);
    assert_eq!(&state.cpu, vm.cpu_model());
    assert!(state.cpu.tsc_khz > 0, "the guest TSC rate is recorded");

    // The same state from a host with every leaf-1 feature (as a newer node would have).
    let mut foreign = state.clone();
    foreign.cpu.name = CpuModelName::Host;
    for w in &mut foreign.cpu.words {
        if (w.leaf, w.reg) == (1, Reg::Ecx) {
            w.value = u32::MAX;
        }
    }
    let err = match Vm::restore(config.clone(), &foreign, |_| Ok(())) {
        Ok(_) => panic!("restore accepted a CPU model this host cannot provide"),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("cannot provide CPU model host") && err.contains("bit 2"),
        "{err}"
    );
    // The recorded model restores.
    let copy = Vm::restore(config, &state, |_| Ok(())).unwrap();
    assert_eq!(copy.cpu_model(), vm.cpu_model());
    vm.stop();
}
