//! A virtual machine: KVM VM and vCPUs, guest memory, devices and their threads; boot, pause,
//! resume, dirty-page collection and complete-state capture.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, KernelKind};
use crate::config::{ConsoleConfig, VmConfig};
use crate::cpu_model::{self, CpuModel};
use crate::devices::i8042::I8042;
use crate::devices::power::AcpiPower;
use crate::devices::serial::{Console, SerialDevice, SerialSnapshot};
use crate::devices::virtio::block::{Block, SharedBackend};
use crate::devices::virtio::block_request::BlockIo;
use crate::devices::virtio::block_worker::{BlockWorker, IoGate};
use crate::devices::virtio::disk_log::DiskLog;
use crate::devices::virtio::mmio::{MmioSnapshot, MmioTransport, QUEUE_NOTIFY};
use crate::devices::virtio::net::Net;
use crate::devices::virtio::output::NetOutput;
use crate::devices::virtio::tap::Tap;
use crate::devices::{lock, Bus};
use crate::dirty::DirtyPages;
use crate::exit::{ExitReason, ExitSignal};
use crate::layout::*;
use crate::memory::{ram_regions, GuestMemory};
use crate::vcpu::{self, VcpuHandle, VcpuRequest, VcpuResponse, VcpuShared, VcpuState};
use crate::Error;

/// Everything about a VM except its memory: what a snapshot or checkpoint carries.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// The configuration the VM was built from.
    pub config: VmConfig,
    /// Which kind of kernel runs.
    pub kind: KernelKind,
    /// Per-vCPU state.
    pub vcpus: Vec<VcpuState>,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// COM1.
    pub serial: SerialSnapshot,
    /// Virtio devices in configuration order (disks, then nets).
    pub virtio: Vec<MmioSnapshot>,
    /// The CPU model the guest sees (feature words, TSC rate).
    pub cpu: CpuModel,
}

/// Status for the control API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmStatus {
    /// `running`, `paused` or `stopped`.
    pub state: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Memory in MiB.
    pub mem_mib: u64,
    /// Kernel kind.
    pub kernel: KernelKind,
    /// Seconds since start.
    pub uptime_s: f64,
}

struct NetRx {
    transport: Arc<Mutex<MmioTransport>>,
    tap_fd: RawFd,
    kick: EventFd,
}

/// A KVM virtual machine with its devices.
pub struct Vm {
    _kvm: Kvm,
    vm_fd: VmFd,
    mem: GuestMemory,
    config: VmConfig,
    kind: KernelKind,
    cpu: CpuModel,
    shared: Arc<VcpuShared>,
    msr_list: Arc<Vec<u32>>,
    unstarted: Mutex<Vec<VcpuFd>>,
    vcpus: Mutex<Vec<VcpuHandle>>,
    serial: Arc<Mutex<SerialDevice>>,
    virtio: Vec<Arc<Mutex<MmioTransport>>>,
    net_rx: Mutex<Vec<NetRx>>,
    rx_kicks: Vec<EventFd>,
    net_outputs: Vec<Arc<NetOutput>>,
    disk_logs: Vec<Arc<DiskLog>>,
    disk_backends: Vec<SharedBackend>,
    /// Each disk's I/O thread, until `start` runs it.
    disk_workers: Mutex<Vec<BlockWorker>>,
    /// Pause/stop gates of the disks' I/O threads.
    io_gates: Vec<Arc<IoGate>>,
    /// Wakes each disk's I/O thread (its ioeventfd).
    disk_notifies: Vec<EventFd>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_evt: EventFd,
    exit_status: Arc<Mutex<Option<i32>>>,
    paused: AtomicBool,
    /// The vCPUs were asked to capture their state at the last pause and `save_state` has not
    /// collected it yet.
    capture_pending: Mutex<bool>,
    /// Nesting depth of pauses (checkpoints, snapshots and operators may pause at once); the
    /// VM runs only at depth 0. Also serializes pause and resume.
    pause_depth: Mutex<u32>,
    started: Instant,
}

/// The devices a VM is built with, opened before anything else is created so that bad input
/// fails early and leaves nothing behind.
struct OpenedDevices {
    disks: Vec<Box<dyn storage::BlockBackend>>,
    taps: Vec<Tap>,
}

fn open_devices(config: &VmConfig) -> Result<OpenedDevices, Error> {
    let mut disks = Vec::new();
    for d in &config.disks {
        let local = storage::open_disk(&d.path, d.read_only, d.format)
            .map_err(|e| Error::Device(e.to_string()))?;
        disks.push(match &d.mirror {
            Some(peer) => open_mirrored(local, d, peer)?,
            None => local,
        });
    }
    let mut taps = Vec::new();
    for n in &config.nets {
        taps.push(Tap::open(&n.tap).map_err(|e| Error::Device(e.to_string()))?);
    }
    Ok(OpenedDevices { disks, taps })
}

/// Wraps a disk in synchronous mirroring to `peer`. The volume name the peer checks is the
/// file's stem, and the bitmap and state files sit beside it, as in a storage pool.
fn open_mirrored(
    local: Box<dyn storage::BlockBackend>,
    d: &crate::DiskConfig,
    peer: &str,
) -> Result<Box<dyn storage::BlockBackend>, Error> {
    let path = &d.path;
    let secret = d.secret.clone().ok_or_else(|| {
        Error::Device(format!(
            "disk {} mirrors to {peer} but no cluster secret was given: \
             --secret-file PATH or FTVM_FT_SECRET",
            path.display()
        ))
    })?;
    let name = path.file_stem().and_then(|n| n.to_str()).unwrap_or("disk");
    let side = |suffix: &str| path.with_file_name(format!("{name}.{suffix}"));
    let mut cfg = storage::mirror::MirrorConfig::new(peer, name, side("mirror-bitmap"), secret);
    cfg.state_path = Some(side("mirror-state.json"));
    let m = storage::mirror::MirroredBackend::open(local, cfg).map_err(|e| {
        Error::Device(format!(
            "cannot mirror disk {} to {peer}: {e}",
            path.display()
        ))
    })?;
    Ok(Box::new(m))
}

fn open_console(config: &ConsoleConfig) -> Result<Box<dyn Write + Send>, Error> {
    Ok(match config {
        ConsoleConfig::Stdio => Box::new(LineWriter::new(std::io::stdout())),
        ConsoleConfig::Null => Box::new(std::io::sink()),
        ConsoleConfig::File(path) => {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| {
                    Error::Device(format!("cannot open console file {}: {e}", path.display()))
                })?;
            Box::new(LineWriter::new(f))
        }
    })
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(format!("{what}: {e}"))
}

impl Vm {
    /// Builds and boots a new VM from `config` (vCPUs not started yet: call `start`).
    pub fn create(config: VmConfig) -> Result<Vm, Error> {
        config
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        let is_elf = boot::is_elf(&config.kernel).map_err(|e| Error::Boot(e.to_string()))?;
        if let Some(initrd) = &config.initrd {
            std::fs::metadata(initrd).map_err(|e| {
                Error::Boot(format!(
                    "cannot read initrd {}: {e} (check --initrd)",
                    initrd.display()
                ))
            })?;
        }
        let devices = open_devices(&config)?;
        let kind = if is_elf {
            KernelKind::Elf
        } else {
            KernelKind::BzImage
        };
        let vm = Self::build(config.clone(), kind, devices, None)?;

        let mut cmdline = config.cmdline.clone();
        if kind == KernelKind::Elf {
            // The test guest times itself with the TSC; tell it the frequency.
            let khz = lock(&vm.unstarted)
                .first()
                .and_then(|v| v.get_tsc_khz().ok())
                .unwrap_or(0);
            cmdline = format!("ftvm.tsc_khz={khz} {cmdline}");
        }
        let rsdp = match kind {
            KernelKind::BzImage => Some(
                crate::acpi::create_acpi_tables(&vm.mem, config.vcpus, &vm.virtio_infos())
                    .map_err(|e| Error::Boot(e.to_string()))?,
            ),
            KernelKind::Elf => None,
        };
        let info = boot::load_guest(
            &vm.mem,
            &config.kernel,
            kind,
            config.initrd.as_deref(),
            &cmdline,
            rsdp,
        )
        .map_err(|e| Error::Boot(e.to_string()))?;
        {
            let vcpus = lock(&vm.unstarted);
            let bsp = vcpus.first().ok_or_else(|| Error::Kvm("no vCPU".into()))?;
            let sregs = bsp.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
            bsp.set_sregs(&boot::boot_sregs(sregs))
                .map_err(kvm_err("KVM_SET_SREGS"))?;
            bsp.set_regs(&boot::boot_regs(info.entry))
                .map_err(kvm_err("KVM_SET_REGS"))?;
            let fpu = kvm_bindings::kvm_fpu {
                fcw: 0x37f,
                mxcsr: 0x1f80,
                ..Default::default()
            };
            bsp.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
        }
        Ok(vm)
    }

    /// Rebuilds a VM from a captured state and memory image (vCPUs not started: call `start`).
    /// `config` is the snapshot's configuration, possibly with other taps or console.
    pub fn restore(
        config: VmConfig,
        state: &VmState,
        fill_memory: impl FnOnce(&GuestMemory) -> Result<(), Error>,
    ) -> Result<Vm, Error> {
        config
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        if config.disks.len() != state.config.disks.len()
            || config.nets.len() != state.config.nets.len()
        {
            return Err(Error::Snapshot(
                "the restored VM must have the same number of disks and network interfaces as the snapshot".into(),
            ));
        }
        let devices = open_devices(&config)?;
        let vm = Self::build(config, state.kind, devices, Some(&state.cpu))?;
        fill_memory(&vm.mem)?;
        vm.load_state(state)?;
        Ok(vm)
    }

    /// Builds a VM with `config`'s memory, vCPUs and devices but loads nothing: an FT backup's
    /// standby copy, filled by checkpoints and started (after `load_state`) on failover.
    pub fn create_standby(config: VmConfig, kind: KernelKind) -> Result<Vm, Error> {
        config
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        let devices = open_devices(&config)?;
        Self::build(config, kind, devices, None)
    }

    fn build(
        config: VmConfig,
        kind: KernelKind,
        devices: OpenedDevices,
        exact_cpu: Option<&CpuModel>,
    ) -> Result<Vm, Error> {
        vcpu::install_kick_handler().map_err(Error::Kvm)?;
        let kvm = Kvm::new().map_err(|e| {
            Error::Kvm(format!(
                "cannot open /dev/kvm: {e} (is KVM available and are you allowed to use it?)"
            ))
        })?;
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(0xfffb_d000)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let mem_bytes = config.mem_mib << 20;
        let mem = GuestMemory::from_ranges(&ram_regions(mem_bytes)).map_err(|e| {
            Error::Memory(format!(
                "cannot allocate {} MiB of guest memory: {e}",
                config.mem_mib
            ))
        })?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the Vm keeps for as long
            // as the KVM VM exists.
            unsafe { vm_fd.set_user_memory_region(r) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }

        let exit = Arc::new(ExitSignal::default());
        let exit_status = Arc::new(Mutex::new(None));
        let mut io_bus = Bus::default();
        let mut mmio_bus = Bus::default();

        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Kvm(e.to_string()))?;
        vm_fd
            .register_irqfd(&serial_irq, SERIAL_IRQ)
            .map_err(kvm_err("KVM_IRQFD"))?;
        let console = Console::new(open_console(&config.console)?, exit_status.clone());
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, console)));
        io_bus.insert(u64::from(SERIAL_PORT), 8, serial.clone());
        mmio_bus.insert(SERIAL_MMIO_BASE, 8, serial.clone());
        let power = Arc::new(Mutex::new(AcpiPower::new(exit.clone())));
        io_bus.insert(u64::from(ACPI_SLEEP_CONTROL_PORT), 3, power.clone());
        mmio_bus.insert(ACPI_MMIO_BASE, 3, power);
        io_bus.insert(0x60, 5, Arc::new(Mutex::new(I8042::new(exit.clone()))));

        let mut virtio = Vec::new();
        let mut net_rx = Vec::new();
        let mut net_outputs = Vec::new();
        let mut disk_logs = Vec::new();
        let mut disk_backends = Vec::new();
        let slot_of = |i: usize| -> Result<(EventFd, u64), Error> {
            let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Kvm(e.to_string()))?;
            vm_fd
                .register_irqfd(&irq, VIRTIO_IRQ_BASE + i as u32)
                .map_err(kvm_err("KVM_IRQFD"))?;
            Ok((irq, VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE))
        };
        let mut disk_workers = Vec::new();
        let evt = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(e.to_string()));
        for (i, backend) in devices.disks.into_iter().enumerate() {
            let (irq, addr) = slot_of(virtio.len())?;
            let backend: SharedBackend = Arc::new(Mutex::new(backend));
            let log = Arc::<DiskLog>::default();
            // The guest's notify of queue 0 signals the I/O thread inside KVM, without an exit.
            let notify = evt()?;
            vm_fd
                .register_ioevent(&notify, &IoEventAddress::Mmio(addr + QUEUE_NOTIFY), 0u32)
                .map_err(kvm_err("KVM_IOEVENTFD"))?;
            let dev = Block::new(
                &backend,
                notify
                    .try_clone()
                    .map_err(|e| Error::Device(e.to_string()))?,
            );
            let t = Arc::new(Mutex::new(MmioTransport::new(
                Box::new(dev),
                mem.clone(),
                irq,
            )));
            mmio_bus.insert(addr, VIRTIO_MMIO_SIZE, t.clone());
            virtio.push(t.clone());
            disk_logs.push(log.clone());
            disk_backends.push(backend.clone());
            disk_workers.push(BlockWorker {
                transport: t,
                io: BlockIo::new(backend, log, &format!("ftvm-disk{i}")),
                mem: mem.clone(),
                notify,
                gate: Arc::default(),
            });
        }
        for (tap, net) in devices.taps.into_iter().zip(&config.nets) {
            let (irq, addr) = slot_of(virtio.len())?;
            let dev = Net::new(tap, net.mac).map_err(|e| Error::Device(e.to_string()))?;
            let (tap_fd, kick) = dev.rx_fds().map_err(|e| Error::Device(e.to_string()))?;
            net_outputs.push(dev.output());
            let t = Arc::new(Mutex::new(MmioTransport::new(
                Box::new(dev),
                mem.clone(),
                irq,
            )));
            mmio_bus.insert(addr, VIRTIO_MMIO_SIZE, t.clone());
            net_rx.push(NetRx {
                transport: t.clone(),
                tap_fd,
                kick,
            });
            virtio.push(t);
        }

        let mut vcpus = Vec::new();
        for i in 0..config.vcpus {
            let fd = vm_fd
                .create_vcpu(u64::from(i))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpus.push(fd);
        }
        let host = cpu_model::HostCpu {
            supported: vcpu::supported_cpuid(&kvm).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?,
            tsc_khz: vcpus
                .first()
                .and_then(|v| v.get_tsc_khz().ok())
                .unwrap_or(0),
            tsc_control: kvm.check_extension(kvm_ioctls::Cap::TscControl),
        };
        let (cpu, base_cpuid) = match exact_cpu {
            Some(model) => {
                cpu_model::check_provides(model, &host)
                    .map_err(|e| Error::Config(e.to_string()))?;
                (model.clone(), cpu_model::apply(model, &host))
            }
            None => cpu_model::resolve_default(config.cpu, &host)
                .map_err(|e| Error::Config(format!("--cpu: {e}")))?,
        };
        for (i, fd) in (0u8..).zip(&vcpus) {
            fd.set_cpuid2(&vcpu::cpuid_for(&base_cpuid, i, config.vcpus))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            // A fixed guest TSC rate: the model's, which a restore or failover keeps.
            if host.tsc_control && cpu.tsc_khz != 0 {
                if let Err(e) = fd.set_tsc_khz(cpu.tsc_khz) {
                    if !cpu_model::tsc_close(cpu.tsc_khz, host.tsc_khz) {
                        return Err(Error::Config(format!(
                            "cannot run the guest TSC at {} kHz (KVM_SET_TSC_KHZ: {e}); this host's runs at {} kHz",
                            cpu.tsc_khz, host.tsc_khz
                        )));
                    }
                }
            }
            vcpu::set_lint(fd, i).map_err(|e| Error::Kvm(e.to_string()))?;
        }
        let msr_list = Arc::new(
            vcpus
                .first()
                .map(|v| vcpu::saved_msrs(&kvm, v))
                .unwrap_or_default(),
        );

        let shared = Arc::new(VcpuShared {
            pause: AtomicBool::new(false),
            capture_on_pause: AtomicBool::new(false),
            sync_regs: kvm.check_extension(kvm_ioctls::Cap::SyncRegs),
            stop: AtomicBool::new(false),
            exit,
            io_bus,
            mmio_bus,
        });
        Ok(Vm {
            _kvm: kvm,
            vm_fd,
            mem,
            config,
            kind,
            cpu,
            shared,
            msr_list,
            unstarted: Mutex::new(vcpus),
            vcpus: Mutex::new(Vec::new()),
            serial,
            virtio,
            rx_kicks: net_rx
                .iter()
                .filter_map(|r| r.kick.try_clone().ok())
                .collect(),
            net_rx: Mutex::new(net_rx),
            net_outputs,
            disk_logs,
            disk_backends,
            io_gates: disk_workers.iter().map(|w| w.gate.clone()).collect(),
            disk_notifies: disk_workers
                .iter()
                .map(|w| w.notify.try_clone())
                .collect::<Result<_, _>>()
                .map_err(|e| Error::Device(e.to_string()))?,
            disk_workers: Mutex::new(disk_workers),
            threads: Mutex::new(Vec::new()),
            stop_evt: EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Kvm(e.to_string()))?,
            exit_status,
            paused: AtomicBool::new(false),
            capture_pending: Mutex::new(false),
            pause_depth: Mutex::new(0),
            started: Instant::now(),
        })
    }

    fn virtio_infos(&self) -> Vec<crate::acpi::VirtioMmioInfo> {
        (0..self.virtio.len())
            .map(|i| crate::acpi::VirtioMmioInfo {
                addr: VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_SIZE,
                size: VIRTIO_MMIO_SIZE,
                gsi: VIRTIO_IRQ_BASE + i as u32,
            })
            .collect()
    }

    /// Starts the vCPU threads and the device threads.
    pub fn start(&self) -> Result<(), Error> {
        let fds: Vec<VcpuFd> = std::mem::take(&mut *lock(&self.unstarted));
        let mut handles = lock(&self.vcpus);
        for (i, fd) in fds.into_iter().enumerate() {
            let h = vcpu::spawn(fd, i as u8, self.msr_list.clone(), self.shared.clone())
                .map_err(|e| Error::Kvm(format!("cannot start vCPU thread: {e}")))?;
            handles.push(h);
        }
        let mut threads = lock(&self.threads);
        for (i, w) in lock(&self.disk_workers).drain(..).enumerate() {
            let stop = self
                .stop_evt
                .try_clone()
                .map_err(|e| Error::Device(e.to_string()))?;
            let t = w
                .spawn(format!("disk{i}-io"), stop)
                .map_err(|e| Error::Device(format!("cannot start disk I/O thread: {e}")))?;
            threads.push(t);
        }
        for rx in lock(&self.net_rx).drain(..) {
            let stop = self
                .stop_evt
                .try_clone()
                .map_err(|e| Error::Device(e.to_string()))?;
            let t = std::thread::Builder::new()
                .name("net-rx".into())
                .spawn(move || net_rx_loop(rx, stop))
                .map_err(|e| Error::Device(format!("cannot start receive thread: {e}")))?;
            threads.push(t);
        }
        if self.config.console == ConsoleConfig::Stdio && is_tty(0) {
            let serial = self.serial.clone();
            // Blocked in read() until input or process exit; not joined.
            let _ = std::thread::Builder::new()
                .name("stdin".into())
                .spawn(move || stdin_loop(serial));
        }
        Ok(())
    }

    /// Starts the VM paused: threads run but no guest instruction executes until `resume`.
    pub fn start_paused(&self) -> Result<(), Error> {
        let mut depth = lock(&self.pause_depth);
        self.shared.pause.store(true, Ordering::Release);
        for g in &self.io_gates {
            g.pause();
        }
        for t in &self.virtio {
            lock(t).set_paused(true);
        }
        self.start()?;
        for h in lock(&self.vcpus).iter() {
            match h.responses.recv_timeout(Duration::from_secs(5)) {
                Ok(VcpuResponse::Paused) => {}
                _ => return Err(Error::Kvm(format!("vCPU {} did not pause", h.index))),
            }
        }
        self.paused.store(true, Ordering::Release);
        *depth = 1;
        Ok(())
    }

    /// Stops every vCPU at an instruction boundary and device threads from touching memory.
    /// Returns how long the stop took.
    /// Pauses nest: each `pause` needs its own `resume`.
    pub fn pause(&self) -> Result<Duration, Error> {
        self.pause_nested(false)
    }

    fn pause_nested(&self, capture: bool) -> Result<Duration, Error> {
        let mut depth = lock(&self.pause_depth);
        if *depth > 0 {
            *depth += 1;
            return Ok(Duration::ZERO);
        }
        let d = self.pause_locked(capture)?;
        *depth = 1;
        Ok(d)
    }

    /// Pauses and has every vCPU save its state on the way (the next `save_state` uses it):
    /// the fast path of a checkpoint.
    pub fn pause_and_capture(&self) -> Result<Duration, Error> {
        self.pause_nested(true)
    }

    fn pause_locked(&self, capture: bool) -> Result<Duration, Error> {
        let t0 = Instant::now();
        if self.paused.load(Ordering::Acquire) {
            return Ok(Duration::ZERO);
        }
        self.shared
            .capture_on_pause
            .store(capture, Ordering::Release);
        self.shared.pause.store(true, Ordering::Release);
        let handles = lock(&self.vcpus);
        for h in handles.iter() {
            kick(&h.thread);
        }
        for h in handles.iter() {
            loop {
                match h.responses.recv_timeout(Duration::from_millis(100)) {
                    Ok(VcpuResponse::Paused) => break,
                    // Left over from a capture nobody collected: stale.
                    Ok(_) => {}
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => kick(&h.thread),
                    Err(_) => return Err(Error::Kvm(format!("vCPU {} thread has ended", h.index))),
                }
            }
        }
        // Disk I/O threads finish the request they are serving and take no other.
        for g in &self.io_gates {
            g.pause();
        }
        for t in &self.virtio {
            lock(t).set_paused(true);
        }
        *lock(&self.capture_pending) = capture;
        if !capture {
            // Console output so far is visible while paused (snapshots, tests, operators).
            lock(&self.serial).flush();
        }
        self.paused.store(true, Ordering::Release);
        Ok(t0.elapsed())
    }

    /// Lets a paused VM run again.
    /// Ends one `pause`; the VM runs again when every pause has been resumed.
    pub fn resume(&self) -> Result<(), Error> {
        let mut depth = lock(&self.pause_depth);
        match *depth {
            0 => Ok(()),
            1 => {
                self.resume_locked()?;
                *depth = 0;
                Ok(())
            }
            _ => {
                *depth -= 1;
                Ok(())
            }
        }
    }

    fn resume_locked(&self) -> Result<(), Error> {
        if !self.paused.load(Ordering::Acquire) {
            return Ok(());
        }
        if std::mem::take(&mut *lock(&self.capture_pending)) {
            // Collect the captures nobody asked for, so the channels hold no stale answers.
            for h in lock(&self.vcpus).iter() {
                let _ = h.responses.recv_timeout(Duration::from_secs(1));
            }
        }
        for t in &self.virtio {
            lock(t).set_paused(false);
        }
        for g in &self.io_gates {
            g.resume();
        }
        self.shared.pause.store(false, Ordering::Release);
        for h in lock(&self.vcpus).iter() {
            h.requests
                .send(VcpuRequest::Resume)
                .map_err(|_| Error::Kvm(format!("vCPU {} thread has ended", h.index)))?;
        }
        self.paused.store(false, Ordering::Release);
        // Wake receive threads parked while paused.
        for k in &self.rx_kicks {
            let _ = k.write(1);
        }
        Ok(())
    }

    /// Queues `bytes` as serial (COM1) input for the guest; returns how many fit in the UART's
    /// receive FIFO.
    pub fn serial_input(&self, bytes: &[u8]) -> usize {
        lock(&self.serial).enqueue_input(bytes)
    }

    /// Whether the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Captures the complete device and vCPU state. The VM must be paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        if !self.is_paused() {
            return Err(Error::State(
                "the VM must be paused to capture its state".into(),
            ));
        }
        let mut vcpus = Vec::new();
        let handles = lock(&self.vcpus);
        if std::mem::take(&mut *lock(&self.capture_pending)) {
            for h in handles.iter() {
                match h.responses.recv_timeout(Duration::from_secs(5)) {
                    Ok(VcpuResponse::Captured(Ok(s))) => vcpus.push(*s),
                    Ok(VcpuResponse::Captured(Err(e))) => return Err(Error::Kvm(e.to_string())),
                    _ => {
                        return Err(Error::Kvm(format!(
                            "vCPU {} did not send its state",
                            h.index
                        )))
                    }
                }
            }
        }
        for h in handles.iter().skip(vcpus.len()) {
            h.requests
                .send(VcpuRequest::Save)
                .map_err(|_| Error::Kvm(format!("vCPU {} thread has ended", h.index)))?;
            match h.responses.recv() {
                Ok(VcpuResponse::Saved(Ok(s))) => vcpus.push(*s),
                Ok(VcpuResponse::Saved(Err(e))) => return Err(Error::Kvm(e.to_string())),
                _ => return Err(Error::Kvm(format!("vCPU {} did not answer", h.index))),
            }
        }
        let mut irqchips = Vec::new();
        for chip_id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut chip = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.vm_fd
                .get_irqchip(&mut chip)
                .map_err(kvm_err("KVM_GET_IRQCHIP"))?;
            irqchips.push(chip);
        }
        Ok(VmState {
            config: self.config.clone(),
            kind: self.kind,
            vcpus,
            irqchips,
            pit: self.vm_fd.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?,
            clock: self.vm_fd.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?,
            serial: lock(&self.serial).snapshot(),
            virtio: self.virtio.iter().map(|t| lock(t).snapshot()).collect(),
            cpu: self.cpu.clone(),
        })
    }

    /// Loads a captured state into a VM built from the same configuration (before `start`, or
    /// while paused).
    pub fn load_state(&self, state: &VmState) -> Result<(), Error> {
        if state.vcpus.len() != usize::from(self.config.vcpus)
            || state.virtio.len() != self.virtio.len()
        {
            return Err(Error::Snapshot(
                "the state does not match this VM's vCPUs and devices".into(),
            ));
        }
        if state.cpu.words != self.cpu.words {
            // Named models give the same words on every host that can run them; `host` may
            // show this host's extra features (the guest keeps every feature it had).
            tracing::warn!(
                "the state's CPU model ({}) differs from this VM's ({}) in its feature words",
                state.cpu.name,
                self.cpu.name
            );
        }
        self.vm_fd
            .set_pit2(&state.pit)
            .map_err(kvm_err("KVM_SET_PIT2"))?;
        let mut clock = state.clock;
        clock.flags = 0;
        self.vm_fd
            .set_clock(&clock)
            .map_err(kvm_err("KVM_SET_CLOCK"))?;
        for chip in &state.irqchips {
            self.vm_fd
                .set_irqchip(chip)
                .map_err(kvm_err("KVM_SET_IRQCHIP"))?;
        }
        {
            let unstarted = lock(&self.unstarted);
            if !unstarted.is_empty() {
                // A standby built here runs the guest TSC at the rate of the node it came from.
                let khz = state.cpu.tsc_khz;
                if khz != 0 && khz != self.cpu.tsc_khz {
                    for fd in unstarted.iter() {
                        if let Err(e) = fd.set_tsc_khz(khz) {
                            if !cpu_model::tsc_close(khz, self.cpu.tsc_khz) {
                                return Err(Error::Config(format!(
                                    "cannot run the guest TSC at {khz} kHz (KVM_SET_TSC_KHZ: {e}); this host's runs at {} kHz",
                                    self.cpu.tsc_khz
                                )));
                            }
                        }
                    }
                }
                for (i, (fd, s)) in unstarted.iter().zip(&state.vcpus).enumerate() {
                    vcpu::restore_state(fd, i as u8, s).map_err(|e| Error::Kvm(e.to_string()))?;
                }
            } else {
                if !self.is_paused() {
                    return Err(Error::State("the VM must be paused to load a state".into()));
                }
                for (h, s) in lock(&self.vcpus).iter().zip(&state.vcpus) {
                    h.requests
                        .send(VcpuRequest::Restore(Box::new(s.clone())))
                        .map_err(|_| Error::Kvm(format!("vCPU {} thread has ended", h.index)))?;
                    match h.responses.recv() {
                        Ok(VcpuResponse::Restored(Ok(()))) => {}
                        Ok(VcpuResponse::Restored(Err(e))) => {
                            return Err(Error::Kvm(e.to_string()))
                        }
                        _ => return Err(Error::Kvm(format!("vCPU {} did not answer", h.index))),
                    }
                }
            }
        }
        lock(&self.serial)
            .restore(&state.serial)
            .map_err(|e| Error::Snapshot(e.to_string()))?;
        for (t, s) in self.virtio.iter().zip(&state.virtio) {
            lock(t).restore(s).map_err(Error::Snapshot)?;
        }
        // Requests the guest queued and notified elsewhere (the primary, the snapshotted VM)
        // are served here: the I/O threads look at their queues once they run.
        for n in &self.disk_notifies {
            let _ = n.write(1);
        }
        Ok(())
    }

    /// The guest pages written since the previous call, by vCPUs (KVM dirty log) and by the
    /// monitor's devices (the guest-memory write bitmap).
    pub fn take_dirty_pages(&self) -> Result<DirtyPages, Error> {
        let (mut vcpu, monitor) = self.take_dirty_pages_by_source()?;
        vcpu.merge(&monitor);
        Ok(vcpu)
    }

    /// Like `take_dirty_pages`, but keeps the two sources apart: (vCPU writes, monitor writes).
    pub fn take_dirty_pages_by_source(&self) -> Result<(DirtyPages, DirtyPages), Error> {
        let mut vcpu = Vec::new();
        let mut monitor = Vec::new();
        for (slot, region) in self.mem.iter().enumerate() {
            let bits = self
                .vm_fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(kvm_err("KVM_GET_DIRTY_LOG"))?;
            let bitmap: &vm_memory::bitmap::AtomicBitmap = vm_memory::MmapRegion::bitmap(region);
            let mut mon = bitmap.get_and_reset();
            mon.resize(bits.len(), 0);
            vcpu.push((region.start_addr().0, region.len(), bits));
            monitor.push((region.start_addr().0, region.len(), mon));
        }
        Ok((DirtyPages::new(vcpu), DirtyPages::new(monitor)))
    }

    /// The transmit side of each network interface (output commit).
    pub fn net_outputs(&self) -> &[Arc<NetOutput>] {
        &self.net_outputs
    }

    /// The FT write log of each disk.
    pub fn disk_logs(&self) -> &[Arc<DiskLog>] {
        &self.disk_logs
    }

    /// The backend of each disk.
    pub fn disk_backends(&self) -> &[SharedBackend] {
        &self.disk_backends
    }

    /// The CPU model the guest sees.
    pub fn cpu_model(&self) -> &CpuModel {
        &self.cpu
    }

    /// The kind of kernel.
    pub fn kind(&self) -> KernelKind {
        self.kind
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    /// The configuration.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Status for the control API.
    pub fn status(&self) -> VmStatus {
        let state = if self.shared.exit.get().is_some() {
            "stopped"
        } else if self.is_paused() {
            "paused"
        } else {
            "running"
        };
        VmStatus {
            state: state.into(),
            vcpus: self.config.vcpus,
            mem_mib: self.config.mem_mib,
            kernel: self.kind,
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Asks the VM to stop (as the control API's `shutdown` does).
    pub fn request_shutdown(&self) {
        self.shared.exit.set(ExitReason::Shutdown);
    }

    /// Waits for the VM to stop; returns why, or `None` after `timeout`.
    pub fn wait_exit(&self, timeout: Duration) -> Option<ExitReason> {
        self.shared.exit.wait_timeout(timeout)
    }

    /// The exit status an image's init reported on the console, if any.
    pub fn guest_exit_status(&self) -> Option<i32> {
        *lock(&self.exit_status)
    }

    /// Stops all threads. The VM cannot run again.
    pub fn stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = self.stop_evt.write(1);
        for g in &self.io_gates {
            g.stop();
        }
        let handles: Vec<VcpuHandle> = lock(&self.vcpus).drain(..).collect();
        for h in &handles {
            kick(&h.thread);
        }
        for h in handles {
            // A paused thread waits on its request channel: closing it ends the thread.
            drop(h.requests);
            let _ = h.thread.join();
        }
        for t in lock(&self.threads).drain(..) {
            let _ = t.join();
        }
        lock(&self.serial).flush();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn kick(thread: &JoinHandle<()>) {
    use std::os::unix::thread::JoinHandleExt;
    // SAFETY: the pthread handle belongs to a thread that has not been joined yet.
    unsafe { libc::pthread_kill(thread.as_pthread_t(), vcpu::kick_signal()) };
}

fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

fn stdin_loop(serial: Arc<Mutex<SerialDevice>>) {
    let mut buf = [0u8; 64];
    loop {
        // SAFETY: reading into a valid stack buffer from fd 0.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            return;
        }
        let mut rest = &buf[..n as usize];
        while !rest.is_empty() {
            let taken = lock(&serial).enqueue_input(rest);
            rest = &rest[taken..];
            if taken == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Delivers received frames: waits for the tap (when the guest has buffers) or for a kick.
fn net_rx_loop(rx: NetRx, stop: EventFd) {
    loop {
        let waiting = {
            let mut t = lock(&rx.transport);
            t.poll_backend();
            t.backend_waiting()
        };
        let mut fds = [
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: rx.kick.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: rx.tap_fd,
                events: if waiting { 0 } else { libc::POLLIN },
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
        if n < 0 {
            continue;
        }
        if fds[0].revents != 0 {
            // Never read: every receive thread must see the stop.
            return;
        }
        if fds[1].revents != 0 {
            let _ = rx.kick.read();
        }
    }
}
