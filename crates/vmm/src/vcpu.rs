//! vCPUs: CPUID and LAPIC setup, the run loop on its own thread, pause/resume by signal, and the
//! complete architectural state (save and restore) of one vCPU.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use serde::{Deserialize, Serialize};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::Bus;
use crate::exit::{ExitReason, ExitSignal};

/// The signal that kicks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Errors configuring or driving a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM vCPU ioctl failed.
    #[error("vCPU {index}: {what} failed: {source}")]
    Kvm {
        /// vCPU index.
        index: u8,
        /// Which operation.
        what: &'static str,
        /// The error from KVM.
        source: kvm_ioctls::Error,
    },
    /// The vCPU thread is gone.
    #[error("vCPU {0} thread is not running")]
    Gone(u8),
}

/// Complete architectural state of one vCPU.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    mp_state: kvm_mp_state,
    regs: kvm_regs,
    sregs: kvm_sregs,
    /// The legacy 4 KiB XSAVE area.
    xsave: Vec<u32>,
    xcrs: kvm_xcrs,
    debugregs: kvm_debugregs,
    lapic: kvm_lapic_state,
    msrs: Vec<(u32, u64)>,
    events: kvm_vcpu_events,
}

impl VcpuState {
    /// The instruction pointer (for status and diagnostics).
    pub fn rip(&self) -> u64 {
        self.regs.rip
    }
}

fn kvm_err(index: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm {
        index,
        what,
        source,
    }
}

/// The CPUID the guest sees on vCPU `index` of `count`: what KVM supports, with topology.
pub fn cpuid_for(base: &CpuId, index: u8, count: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
            }
            0xb | 0x1f => e.edx = u32::from(index),
            _ => {}
        }
    }
    cpuid
}

/// The CPUID KVM supports on this host.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, kvm_ioctls::Error> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
}

/// The MSRs whose values make up a vCPU's state: KVM's list, keeping those this vCPU can read.
/// The TSC comes first so that MSRs relative to it are restored after it.
pub fn saved_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Vec<u32> {
    const MSR_IA32_TSC: u32 = 0x10;
    let Ok(list) = kvm.get_msr_index_list() else {
        return Vec::new();
    };
    let mut out = vec![MSR_IA32_TSC];
    for &index in list.as_slice() {
        if index == MSR_IA32_TSC {
            continue;
        }
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if matches!(vcpu.get_msrs(&mut one), Ok(1)) {
            out.push(index);
        }
    }
    out
}

/// Routes LINT0 to ExtINT and LINT1 to NMI, as a PC's BIOS leaves them.
pub fn set_lint(vcpu: &VcpuFd, index: u8) -> Result<(), VcpuError> {
    const APIC_LVT0: usize = 0x350;
    const APIC_LVT1: usize = 0x360;
    const DM_EXTINT: u32 = 0x7 << 8;
    const DM_NMI: u32 = 0x4 << 8;
    let mut lapic = vcpu.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?;
    let reg = |l: &kvm_lapic_state, off: usize| {
        u32::from_le_bytes([
            l.regs[off] as u8,
            l.regs[off + 1] as u8,
            l.regs[off + 2] as u8,
            l.regs[off + 3] as u8,
        ])
    };
    let set = |l: &mut kvm_lapic_state, off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            l.regs[off + i] = *b as _;
        }
    };
    let lvt0 = (reg(&lapic, APIC_LVT0) & !0x700) | DM_EXTINT;
    let lvt1 = (reg(&lapic, APIC_LVT1) & !0x700) | DM_NMI;
    set(&mut lapic, APIC_LVT0, lvt0);
    set(&mut lapic, APIC_LVT1, lvt1);
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err(index, "KVM_SET_LAPIC"))
}

/// Reads the complete state of `vcpu`. The vCPU must not be running.
pub fn save_state(vcpu: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState, VcpuError> {
    save_state_with(vcpu, index, msr_list, None)
}

/// Like `save_state`, taking regs, sregs and vCPU events from `sync` (what KVM stored in the
/// run structure at the last exit) when given. Only valid right after a KVM_RUN.
fn save_state_with(
    vcpu: &VcpuFd,
    index: u8,
    msr_list: &[u32],
    sync: Option<&kvm_bindings::kvm_sync_regs>,
) -> Result<VcpuState, VcpuError> {
    let entries: Vec<kvm_msr_entry> = msr_list
        .iter()
        .map(|&i| kvm_msr_entry {
            index: i,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
        index,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = vcpu
        .get_msrs(&mut msrs)
        .map_err(kvm_err(index, "KVM_GET_MSRS"))?;
    Ok(VcpuState {
        mp_state: vcpu
            .get_mp_state()
            .map_err(kvm_err(index, "KVM_GET_MP_STATE"))?,
        regs: match sync {
            Some(s) => s.regs,
            None => vcpu.get_regs().map_err(kvm_err(index, "KVM_GET_REGS"))?,
        },
        sregs: match sync {
            Some(s) => s.sregs,
            None => vcpu.get_sregs().map_err(kvm_err(index, "KVM_GET_SREGS"))?,
        },
        xsave: vcpu
            .get_xsave()
            .map_err(kvm_err(index, "KVM_GET_XSAVE"))?
            .region
            .to_vec(),
        xcrs: vcpu.get_xcrs().map_err(kvm_err(index, "KVM_GET_XCRS"))?,
        debugregs: vcpu
            .get_debug_regs()
            .map_err(kvm_err(index, "KVM_GET_DEBUGREGS"))?,
        lapic: vcpu.get_lapic().map_err(kvm_err(index, "KVM_GET_LAPIC"))?,
        msrs: msrs.as_slice()[..n]
            .iter()
            .map(|e| (e.index, e.data))
            .collect(),
        events: match sync {
            Some(s) => s.events,
            None => vcpu
                .get_vcpu_events()
                .map_err(kvm_err(index, "KVM_GET_VCPU_EVENTS"))?,
        },
    })
}

/// Loads a complete state into `vcpu`. The vCPU must not be running.
pub fn restore_state(vcpu: &VcpuFd, index: u8, s: &VcpuState) -> Result<(), VcpuError> {
    vcpu.set_mp_state(s.mp_state)
        .map_err(kvm_err(index, "KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs)
        .map_err(kvm_err(index, "KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(kvm_err(index, "KVM_SET_SREGS"))?;
    let mut xsave = kvm_xsave::default();
    for (d, v) in xsave.region.iter_mut().zip(&s.xsave) {
        *d = *v;
    }
    // SAFETY: `xsave` is a legacy-size kvm_xsave with no extra area, which KVM_SET_XSAVE accepts.
    unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm_err(index, "KVM_SET_XSAVE"))?;
    vcpu.set_xcrs(&s.xcrs)
        .map_err(kvm_err(index, "KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(kvm_err(index, "KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(kvm_err(index, "KVM_SET_LAPIC"))?;
    let entries: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(i, data)| kvm_msr_entry {
            index: i,
            data,
            ..Default::default()
        })
        .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Kvm {
        index,
        what: "building the MSR list",
        source: kvm_ioctls::Error::new(libc::E2BIG),
    })?;
    let n = vcpu
        .set_msrs(&msrs)
        .map_err(kvm_err(index, "KVM_SET_MSRS"))?;
    if n != entries.len() {
        tracing::warn!(vcpu = index, "restored {n} of {} MSRs", entries.len());
    }
    vcpu.set_vcpu_events(&s.events)
        .map_err(kvm_err(index, "KVM_SET_VCPU_EVENTS"))
}

/// Requests to a vCPU thread. Save and Restore are only valid while it is paused.
pub enum VcpuRequest {
    /// Save the state and answer `Saved`.
    Save,
    /// Load a state and answer `Restored`.
    Restore(Box<VcpuState>),
    /// Leave the paused state.
    Resume,
}

/// Answers from a vCPU thread.
pub enum VcpuResponse {
    /// The thread is out of KVM_RUN, paused, and waits for requests.
    Paused,
    /// With capture on: the state saved right after `Paused` (the monitor meanwhile collects
    /// dirty pages in parallel).
    Captured(Result<Box<VcpuState>, VcpuError>),
    /// The state, or why it could not be read.
    Saved(Result<Box<VcpuState>, VcpuError>),
    /// Whether a state was loaded.
    Restored(Result<(), VcpuError>),
}

thread_local! {
    /// The running vCPU's `kvm_run` page, so the kick signal handler can set `immediate_exit`.
    static KVM_RUN: Cell<*mut kvm_bindings::kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: the pointer is set by this thread to its own live kvm_run mapping and cleared
            // before the mapping goes away; a volatile byte store is async-signal-safe.
            unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// Installs the kick signal handler (once per process).
pub fn install_kick_handler() -> Result<(), String> {
    static INSTALLED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            register_signal_handler(kick_signal(), handle_kick).map_err(|e| e.to_string())
        })
        .clone()
}

/// What a vCPU thread shares with the monitor.
pub struct VcpuShared {
    /// Set while the monitor wants every vCPU paused.
    pub pause: AtomicBool,
    /// When set, a pausing vCPU saves its state and sends it (`Captured`) after `Paused`.
    pub capture_on_pause: AtomicBool,
    /// KVM copies regs, sregs and events to the run structure at every exit (KVM_CAP_SYNC_REGS).
    pub sync_regs: bool,
    /// Set when the vCPU threads must end.
    pub stop: AtomicBool,
    /// Where the VM's end is reported.
    pub exit: Arc<ExitSignal>,
    /// Port I/O devices.
    pub io_bus: Bus,
    /// MMIO devices.
    pub mmio_bus: Bus,
}

/// A running vCPU thread and its request/answer channels.
pub struct VcpuHandle {
    /// vCPU index.
    pub index: u8,
    /// The thread.
    pub thread: JoinHandle<()>,
    /// Requests.
    pub requests: Sender<VcpuRequest>,
    /// Answers.
    pub responses: Receiver<VcpuResponse>,
}

/// Spawns the thread running `vcpu`. If `start_paused`, it pauses before its first KVM_RUN.
pub fn spawn(
    mut vcpu: VcpuFd,
    index: u8,
    msr_list: Arc<Vec<u32>>,
    shared: Arc<VcpuShared>,
) -> std::io::Result<VcpuHandle> {
    let (req_tx, req_rx) = std::sync::mpsc::channel();
    let (resp_tx, resp_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            if shared.sync_regs {
                vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::Register);
                vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::SystemRegister);
                vcpu.set_sync_valid_reg(kvm_ioctls::SyncReg::VcpuEvents);
            }
            let run_ptr: *mut kvm_bindings::kvm_run = vcpu.get_kvm_run();
            KVM_RUN.with(|p| p.set(run_ptr));
            run_loop(&mut vcpu, index, &msr_list, &shared, &req_rx, &resp_tx);
            KVM_RUN.with(|p| p.set(std::ptr::null_mut()));
        })?;
    Ok(VcpuHandle {
        index,
        thread,
        requests: req_tx,
        responses: resp_rx,
    })
}

fn run_loop(
    vcpu: &mut VcpuFd,
    index: u8,
    msr_list: &[u32],
    shared: &VcpuShared,
    requests: &Receiver<VcpuRequest>,
    responses: &Sender<VcpuResponse>,
) {
    // The last KVM_RUN returned an I/O or MMIO exit that KVM completes (retires the instruction,
    // stores a read's result) only at the next KVM_RUN.
    let mut exit_pending = false;
    // The run structure holds this vCPU's registers (sync regs) only once a KVM_RUN has
    // returned, and not after a state was loaded: until then they are zeros or stale.
    let mut sync_fresh = false;
    loop {
        if shared.stop.load(Ordering::Acquire) {
            return;
        }
        if shared.pause.load(Ordering::Acquire) {
            let completed = std::mem::take(&mut exit_pending);
            if completed {
                complete_pending_exit(vcpu, index, shared);
            }
            if responses.send(VcpuResponse::Paused).is_err() {
                return;
            }
            // Saving now, unasked, spares the monitor a round trip per checkpoint; the registers
            // KVM copied out at the exit (sync regs) spare three ioctls.
            if shared.capture_on_pause.load(Ordering::Acquire) {
                // After a completing KVM_RUN the registers are read with ioctls (not relying
                // on KVM storing sync regs on that path).
                let sync = (shared.sync_regs && sync_fresh && !completed).then(|| vcpu.sync_regs());
                let s = save_state_with(vcpu, index, msr_list, sync.as_ref()).map(Box::new);
                if responses.send(VcpuResponse::Captured(s)).is_err() {
                    return;
                }
            }
            loop {
                match requests.recv() {
                    Ok(VcpuRequest::Save) => {
                        let s = save_state(vcpu, index, msr_list).map(Box::new);
                        let _ = responses.send(VcpuResponse::Saved(s));
                    }
                    Ok(VcpuRequest::Restore(s)) => {
                        sync_fresh = false;
                        let r = restore_state(vcpu, index, &s);
                        let _ = responses.send(VcpuResponse::Restored(r));
                    }
                    Ok(VcpuRequest::Resume) => break,
                    Err(_) => return,
                }
            }
            continue;
        }
        let ran = vcpu.run();
        sync_fresh = true;
        match ran {
            Ok(exit) => {
                exit_pending = needs_completion(&exit);
                if let Some(reason) = handle_exit(exit, shared) {
                    let reason = match reason {
                        ExitReason::Error(msg) => {
                            ExitReason::Error(describe_failure(vcpu, index, &msg))
                        }
                        other => other,
                    };
                    shared.exit.set(reason);
                    // Stay parked until the monitor stops or pauses us.
                    while !shared.stop.load(Ordering::Acquire)
                        && !shared.pause.load(Ordering::Acquire)
                    {
                        std::thread::park_timeout(std::time::Duration::from_millis(50));
                    }
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
            }
            Err(e) => {
                shared.exit.set(ExitReason::Error(format!(
                    "vCPU {index}: KVM_RUN failed: {e}"
                )));
                return;
            }
        }
    }
}

/// Whether KVM finishes `exit` only when userspace re-enters KVM_RUN (KVM api.rst, KVM_RUN:
/// for I/O and MMIO exits "the corresponding operations are complete (and guest state is
/// consistent) only after userspace has re-entered the kernel with KVM_RUN").
fn needs_completion(exit: &VcpuExit<'_>) -> bool {
    matches!(
        exit,
        VcpuExit::IoIn(..) | VcpuExit::IoOut(..) | VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)
    )
}

/// Re-enters KVM_RUN with `immediate_exit` set so KVM completes the last exit (stores an
/// `in`/MMIO read's data, retires the instruction) without running guest code; the state
/// saved afterwards is consistent. An exit split in fragments may exit again: those are
/// handled the same way until KVM answers EINTR.
fn complete_pending_exit(vcpu: &mut VcpuFd, index: u8, shared: &VcpuShared) {
    vcpu.set_kvm_immediate_exit(1);
    // Bounded: an MMIO access has at most a few fragments.
    for _ in 0..8 {
        match vcpu.run() {
            Ok(exit) => {
                let again = needs_completion(&exit);
                if let Some(reason) = handle_exit(exit, shared) {
                    shared.exit.set(reason);
                    break;
                }
                if !again {
                    break;
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
            Err(e) => {
                shared.exit.set(ExitReason::Error(format!(
                    "vCPU {index}: KVM_RUN (completing an exit before pause) failed: {e}"
                )));
                break;
            }
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

/// Handles one exit; returns why the VM must stop, if it must.
fn handle_exit(exit: VcpuExit<'_>, shared: &VcpuShared) -> Option<ExitReason> {
    match exit {
        VcpuExit::IoIn(port, data) => shared.io_bus.read(u64::from(port), data),
        VcpuExit::IoOut(port, data) => shared.io_bus.write(u64::from(port), data),
        VcpuExit::MmioRead(addr, data) => shared.mmio_bus.read(addr, data),
        VcpuExit::MmioWrite(addr, data) => shared.mmio_bus.write(addr, data),
        VcpuExit::Hlt | VcpuExit::Intr | VcpuExit::IrqWindowOpen => {}
        VcpuExit::Shutdown => {
            tracing::warn!("guest triple fault: resetting as a PC would");
            return Some(ExitReason::Reboot);
        }
        VcpuExit::SystemEvent(kind, _) => {
            return Some(match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::PowerOff,
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitReason::Reboot,
                other => ExitReason::Error(format!("guest system event {other}")),
            })
        }
        VcpuExit::InternalError => return Some(ExitReason::Error("KVM internal error".into())),
        VcpuExit::FailEntry(reason, cpu) => {
            return Some(ExitReason::Error(format!(
                "KVM entry failure (hardware reason {reason:#x}) on CPU {cpu}"
            )))
        }
        other => return Some(ExitReason::Error(format!("unexpected KVM exit {other:?}"))),
    }
    None
}

/// Adds the vCPU's position and, for internal errors, KVM's sub-error to a failure message.
fn describe_failure(vcpu: &mut VcpuFd, index: u8, msg: &str) -> String {
    let mut text = format!("vCPU {index}: {msg}");
    {
        let run = vcpu.get_kvm_run();
        if run.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
            // SAFETY: exit_reason says the `internal` member of the union is the valid one.
            let internal = unsafe { run.__bindgen_anon_1.internal };
            let what = match internal.suberror {
                kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failure",
                kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => {
                    "exception while delivering an exception"
                }
                kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failure",
                _ => "other",
            };
            text.push_str(&format!(" ({what}, suberror {})", internal.suberror));
        }
    }
    if let (Ok(regs), Ok(sregs)) = (vcpu.get_regs(), vcpu.get_sregs()) {
        text.push_str(&format!(" at RIP {:#x} (CPL {})", regs.rip, sregs.cs.dpl));
        if let Ok(t) = vcpu.translate_gva(regs.rip) {
            if t.valid != 0 {
                text.push_str(&format!(", physical {:#x}", t.physical_address));
            }
        }
    }
    text
}
