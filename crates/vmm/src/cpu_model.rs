//! Named CPU models: what CPUID a guest sees (`x86-64`, `x86-64-v2`, `x86-64-v3`: the x86-64
//! psABI levels, every other feature hidden; `host`: what KVM supports here) and its TSC rate,
//! so a guest moved to another node (FT failover, snapshot restore) finds the features it uses.
//! The default is x86-64-v2; on a host whose KVM cannot offer it (the nested, pagetable-based
//! KVM of the development machines offers no SSE3) the default falls back to x86-64, with a
//! warning naming what is missing. A model given explicitly never falls back.
//!
//! A resolved [`CpuModel`] records the feature words the guest sees and the guest TSC rate in
//! kHz; [`check_provides`] says whether a host can give a guest exactly that, naming what is
//! missing.

use std::fmt;
use std::str::FromStr;

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use serde::{Deserialize, Serialize};

/// A named CPU model, as given with `--cpu`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuModelName {
    /// x86-64 baseline: CMOV, CX8, FPU, FXSR, MMX, SSE, SSE2, SYSCALL, LM, NX.
    X86_64,
    /// x86-64-v2: SSE3, SSSE3, SSE4.1, SSE4.2, POPCNT, CMPXCHG16B, LAHF/SAHF over the baseline.
    #[default]
    X86_64V2,
    /// x86-64-v3: v2 plus AVX, AVX2, BMI1, BMI2, F16C, FMA, LZCNT, MOVBE, XSAVE.
    X86_64V3,
    /// Everything this host's KVM supports (not portable to a host with fewer features).
    Host,
}

impl fmt::Display for CpuModelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::X86_64 => "x86-64",
            Self::X86_64V2 => "x86-64-v2",
            Self::X86_64V3 => "x86-64-v3",
            Self::Host => "host",
        })
    }
}

impl FromStr for CpuModelName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "x86-64" => Ok(Self::X86_64),
            "x86-64-v2" => Ok(Self::X86_64V2),
            "x86-64-v3" => Ok(Self::X86_64V3),
            "host" => Ok(Self::Host),
            _ => Err(format!(
                "unknown CPU model {s:?}: use x86-64-v2 (the default), x86-64, x86-64-v3 or host"
            )),
        }
    }
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One 32-bit feature word of CPUID as the guest sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeatureWord {
    /// CPUID leaf (EAX input).
    pub leaf: u32,
    /// Sub-leaf (ECX input).
    pub subleaf: u32,
    /// Output register.
    pub reg: Reg,
    /// The bits.
    pub value: u32,
}

/// A resolved CPU model: the feature words a guest sees and its TSC rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuModel {
    /// The model it was resolved from.
    pub name: CpuModelName,
    /// The guest's feature words (those listed in `WORDS`).
    pub words: Vec<FeatureWord>,
    /// Guest TSC frequency in kHz (0: unknown, not checked).
    pub tsc_khz: u32,
}

/// What a host offers guests: KVM's supported CPUID, its TSC rate and whether KVM can run a
/// guest TSC at another rate (KVM_CAP_TSC_CONTROL).
pub struct HostCpu {
    /// KVM_GET_SUPPORTED_CPUID.
    pub supported: CpuId,
    /// The host TSC rate in kHz (0 if unknown).
    pub tsc_khz: u32,
    /// KVM can scale the guest TSC (KVM_SET_TSC_KHZ to another rate).
    pub tsc_control: bool,
}

/// The feature words a model defines and a check compares.
const WORDS: &[(u32, u32, Reg)] = &[
    (1, 0, Reg::Ecx),
    (1, 0, Reg::Edx),
    (7, 0, Reg::Ebx),
    (7, 0, Reg::Ecx),
    (7, 0, Reg::Edx),
    (7, 1, Reg::Eax),
    (0xd, 0, Reg::Eax),
    (0xd, 1, Reg::Eax),
    (0x8000_0001, 0, Reg::Ecx),
    (0x8000_0001, 0, Reg::Edx),
];

/// Bits whose value KVM or the monitor sets at run time (OSXSAVE, OSPKE follow CR4; APIC the
/// APIC base MSR; HTT the vCPU count): not compared between hosts.
fn dynamic_bits(leaf: u32, subleaf: u32, reg: Reg) -> u32 {
    match (leaf, subleaf, reg) {
        (1, 0, Reg::Ecx) => 1 << 27,
        (1, 0, Reg::Edx) => (1 << 9) | (1 << 28),
        (7, 0, Reg::Ecx) => 1 << 4,
        _ => 0,
    }
}

/// Feature names of the bits a named model can contain, for messages.
const NAMES: &[(u32, u32, Reg, u32, &str)] = &[
    (1, 0, Reg::Edx, 0, "FPU"),
    (1, 0, Reg::Edx, 1, "VME"),
    (1, 0, Reg::Edx, 2, "DE"),
    (1, 0, Reg::Edx, 3, "PSE"),
    (1, 0, Reg::Edx, 4, "TSC"),
    (1, 0, Reg::Edx, 5, "MSR"),
    (1, 0, Reg::Edx, 6, "PAE"),
    (1, 0, Reg::Edx, 7, "MCE"),
    (1, 0, Reg::Edx, 8, "CX8"),
    (1, 0, Reg::Edx, 11, "SEP"),
    (1, 0, Reg::Edx, 12, "MTRR"),
    (1, 0, Reg::Edx, 13, "PGE"),
    (1, 0, Reg::Edx, 14, "MCA"),
    (1, 0, Reg::Edx, 15, "CMOV"),
    (1, 0, Reg::Edx, 16, "PAT"),
    (1, 0, Reg::Edx, 17, "PSE36"),
    (1, 0, Reg::Edx, 19, "CLFSH"),
    (1, 0, Reg::Edx, 23, "MMX"),
    (1, 0, Reg::Edx, 24, "FXSR"),
    (1, 0, Reg::Edx, 25, "SSE"),
    (1, 0, Reg::Edx, 26, "SSE2"),
    (1, 0, Reg::Ecx, 0, "SSE3"),
    (1, 0, Reg::Ecx, 9, "SSSE3"),
    (1, 0, Reg::Ecx, 12, "FMA"),
    (1, 0, Reg::Ecx, 13, "CX16"),
    (1, 0, Reg::Ecx, 19, "SSE4.1"),
    (1, 0, Reg::Ecx, 20, "SSE4.2"),
    (1, 0, Reg::Ecx, 21, "X2APIC"),
    (1, 0, Reg::Ecx, 22, "MOVBE"),
    (1, 0, Reg::Ecx, 23, "POPCNT"),
    (1, 0, Reg::Ecx, 24, "TSC-DEADLINE"),
    (1, 0, Reg::Ecx, 26, "XSAVE"),
    (1, 0, Reg::Ecx, 28, "AVX"),
    (1, 0, Reg::Ecx, 29, "F16C"),
    (1, 0, Reg::Ecx, 31, "HYPERVISOR"),
    (7, 0, Reg::Ebx, 3, "BMI1"),
    (7, 0, Reg::Ebx, 5, "AVX2"),
    (7, 0, Reg::Ebx, 8, "BMI2"),
    (0xd, 0, Reg::Eax, 0, "XSAVE-X87"),
    (0xd, 0, Reg::Eax, 1, "XSAVE-SSE"),
    (0xd, 0, Reg::Eax, 2, "XSAVE-AVX"),
    (0x8000_0001, 0, Reg::Ecx, 0, "LAHF-SAHF"),
    (0x8000_0001, 0, Reg::Ecx, 5, "LZCNT"),
    (0x8000_0001, 0, Reg::Edx, 11, "SYSCALL"),
    (0x8000_0001, 0, Reg::Edx, 20, "NX"),
    (0x8000_0001, 0, Reg::Edx, 29, "LM"),
];

/// The features the psABI level requires (a host without them cannot run the model).
fn required(name: CpuModelName) -> &'static [&'static str] {
    const V1: &[&str] = &[
        "CMOV", "CX8", "FPU", "FXSR", "MMX", "SSE", "SSE2", "SYSCALL", "LM", "NX",
    ];
    const V2: &[&str] = &[
        "CMOV",
        "CX8",
        "FPU",
        "FXSR",
        "MMX",
        "SSE",
        "SSE2",
        "SYSCALL",
        "LM",
        "NX",
        "CX16",
        "LAHF-SAHF",
        "POPCNT",
        "SSE3",
        "SSE4.1",
        "SSE4.2",
        "SSSE3",
    ];
    const V3: &[&str] = &[
        "CMOV",
        "CX8",
        "FPU",
        "FXSR",
        "MMX",
        "SSE",
        "SSE2",
        "SYSCALL",
        "LM",
        "NX",
        "CX16",
        "LAHF-SAHF",
        "POPCNT",
        "SSE3",
        "SSE4.1",
        "SSE4.2",
        "SSSE3",
        "AVX",
        "AVX2",
        "BMI1",
        "BMI2",
        "F16C",
        "FMA",
        "LZCNT",
        "MOVBE",
        "XSAVE",
        "XSAVE-X87",
        "XSAVE-SSE",
        "XSAVE-AVX",
    ];
    match name {
        CpuModelName::X86_64 => V1,
        CpuModelName::X86_64V2 => V2,
        CpuModelName::X86_64V3 => V3,
        CpuModelName::Host => &[],
    }
}

/// The bits a named model lets through in a word: its level plus the architectural features
/// every x86-64 kernel relies on (paging, APIC, MSRs, TSC, ...).
fn allowed(name: CpuModelName, leaf: u32, subleaf: u32, reg: Reg) -> u32 {
    let level = required(name);
    let architectural = [
        "VME",
        "DE",
        "PSE",
        "TSC",
        "MSR",
        "PAE",
        "MCE",
        "SEP",
        "MTRR",
        "PGE",
        "MCA",
        "PAT",
        "PSE36",
        "CLFSH",
        "X2APIC",
        "TSC-DEADLINE",
        "HYPERVISOR",
    ];
    NAMES
        .iter()
        .filter(|n| (n.0, n.1, n.2) == (leaf, subleaf, reg))
        .filter(|n| level.contains(&n.4) || architectural.contains(&n.4))
        .fold(dynamic_bits(leaf, subleaf, reg), |m, n| m | (1 << n.3))
}

fn entry_mut(cpuid: &mut CpuId, leaf: u32, subleaf: u32) -> Option<&mut kvm_cpuid_entry2> {
    cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == leaf && e.index == subleaf)
}

fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

/// The value of one word of `cpuid` (0 if the leaf is absent).
pub fn word(cpuid: &CpuId, leaf: u32, subleaf: u32, reg: Reg) -> u32 {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == leaf && e.index == subleaf)
        .map_or(0, |e| match reg {
            Reg::Eax => e.eax,
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        })
}

fn name_of(leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> String {
    NAMES
        .iter()
        .find(|n| (n.0, n.1, n.2, n.3) == (leaf, subleaf, reg, bit))
        .map_or_else(
            || format!("CPUID.{leaf:#x}.{subleaf}.{reg:?} bit {bit}"),
            |n| n.4.to_string(),
        )
}

/// Why a host cannot give a guest its CPU model.
#[derive(Debug, thiserror::Error)]
pub enum CpuModelError {
    /// Features the model needs are missing here.
    #[error("this host cannot provide CPU model {model}: its KVM lacks {missing} (use a lower --cpu level such as x86-64, or run the guest on a host with these features)", missing = .missing.join(", "))]
    MissingFeatures {
        /// The model.
        model: CpuModelName,
        /// The missing feature names.
        missing: Vec<String>,
    },
    /// The guest TSC rate cannot be provided.
    #[error("this host cannot run the guest TSC at {wanted} kHz: its TSC runs at {host} kHz and KVM cannot scale it (no KVM_CAP_TSC_CONTROL); use a host with the same TSC rate or with TSC scaling")]
    TscRate {
        /// The guest's rate.
        wanted: u32,
        /// This host's.
        host: u32,
    },
}

/// Guest TSC rates this close to the host's need no scaling (KVM's own tolerance, 250 ppm).
pub fn tsc_close(a: u32, b: u32) -> bool {
    u64::from(a.abs_diff(b)) * 1_000_000 <= u64::from(b) * 250
}

/// Masks `supported` to `name`'s features; `Host` keeps everything.
fn masked(name: CpuModelName, supported: &CpuId) -> CpuId {
    let mut cpuid = supported.clone();
    if name == CpuModelName::Host {
        return cpuid;
    }
    for &(leaf, subleaf, reg) in WORDS {
        let keep = allowed(name, leaf, subleaf, reg);
        if let Some(e) = entry_mut(&mut cpuid, leaf, subleaf) {
            *reg_mut(e, reg) &= keep;
        }
    }
    // XSAVE leaf: only x87/SSE/AVX state exists (v3), nothing without XSAVE (v2); sizes follow.
    let avx = word(&cpuid, 1, 0, Reg::Ecx) & (1 << 28) != 0;
    for e in cpuid.as_mut_slice() {
        if e.function != 0xd {
            continue;
        }
        match e.index {
            0 if avx => {
                e.edx = 0;
                e.ecx = 832; // legacy area + header + AVX state
                e.ebx = e.ebx.min(832);
            }
            1 => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
            2 if avx => {}
            _ => (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0),
        }
    }
    cpuid
}

fn words_of(name: CpuModelName, cpuid: &CpuId, tsc_khz: u32) -> CpuModel {
    CpuModel {
        name,
        words: WORDS
            .iter()
            .map(|&(leaf, subleaf, reg)| FeatureWord {
                leaf,
                subleaf,
                reg,
                value: word(cpuid, leaf, subleaf, reg),
            })
            .collect(),
        tsc_khz,
    }
}

/// Resolves the model `name` (`None`: the default, x86-64-v2, or x86-64 where this host cannot
/// offer v2) on `host`.
pub fn resolve_default(
    name: Option<CpuModelName>,
    host: &HostCpu,
) -> Result<(CpuModel, CpuId), CpuModelError> {
    match name {
        Some(n) => resolve(n, host),
        None => resolve(CpuModelName::X86_64V2, host).or_else(|e| {
            tracing::info!("default CPU model x86-64-v2 unavailable ({e}); using x86-64");
            resolve(CpuModelName::X86_64, host)
        }),
    }
}

/// Resolves `name` on `host`: the model (with the host's TSC rate) and the CPUID to give vCPUs
/// (before per-vCPU topology). Fails naming the level's features the host lacks.
pub fn resolve(name: CpuModelName, host: &HostCpu) -> Result<(CpuModel, CpuId), CpuModelError> {
    let missing: Vec<String> = required(name)
        .iter()
        .filter(|f| {
            let Some(n) = NAMES.iter().find(|n| n.4 == **f) else {
                return true;
            };
            word(&host.supported, n.0, n.1, n.2) & (1 << n.3) == 0
        })
        .map(|f| f.to_string())
        .collect();
    if !missing.is_empty() {
        return Err(CpuModelError::MissingFeatures {
            model: name,
            missing,
        });
    }
    let cpuid = masked(name, &host.supported);
    Ok((words_of(name, &cpuid, host.tsc_khz), cpuid))
}

/// Whether `host` can give a guest exactly `model` (every feature bit it shows, its TSC rate).
pub fn check_provides(model: &CpuModel, host: &HostCpu) -> Result<(), CpuModelError> {
    let mut missing = Vec::new();
    for w in &model.words {
        let have = word(&host.supported, w.leaf, w.subleaf, w.reg);
        let lacking = w.value & !have & !dynamic_bits(w.leaf, w.subleaf, w.reg);
        for bit in (0..32).filter(|b| lacking & (1 << b) != 0) {
            missing.push(name_of(w.leaf, w.subleaf, w.reg, bit));
        }
    }
    if !missing.is_empty() {
        return Err(CpuModelError::MissingFeatures {
            model: model.name,
            missing,
        });
    }
    if model.tsc_khz != 0
        && host.tsc_khz != 0
        && !host.tsc_control
        && !tsc_close(model.tsc_khz, host.tsc_khz)
    {
        return Err(CpuModelError::TscRate {
            wanted: model.tsc_khz,
            host: host.tsc_khz,
        });
    }
    Ok(())
}

/// The CPUID to give vCPUs so the guest sees exactly `model` (call after `check_provides`).
pub fn apply(model: &CpuModel, host: &HostCpu) -> CpuId {
    let mut cpuid = masked(model.name, &host.supported);
    for w in &model.words {
        if let Some(e) = entry_mut(&mut cpuid, w.leaf, w.subleaf) {
            let dynamic = dynamic_bits(w.leaf, w.subleaf, w.reg);
            let r = reg_mut(e, w.reg);
            *r = (w.value & !dynamic) | (*r & dynamic);
        }
    }
    cpuid
}

/// What this host's KVM offers, read through `kvm` (a throwaway VM and vCPU give the TSC rate).
pub fn host_cpu(kvm: &kvm_ioctls::Kvm) -> Result<HostCpu, String> {
    let supported =
        crate::vcpu::supported_cpuid(kvm).map_err(|e| format!("KVM_GET_SUPPORTED_CPUID: {e}"))?;
    let tsc_khz = kvm
        .create_vm()
        .and_then(|vm| vm.create_vcpu(0))
        .and_then(|v| v.get_tsc_khz())
        .unwrap_or(0);
    Ok(HostCpu {
        supported,
        tsc_khz,
        tsc_control: kvm.check_extension(kvm_ioctls::Cap::TscControl),
    })
}

/// The check an FT backup makes before it stands by for a primary whose guest runs `model`:
/// refuses, naming the missing features or the TSC rate, when this host cannot provide it.
pub fn check_peer(model: &CpuModel) -> Result<(), String> {
    let kvm = kvm_ioctls::Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    let host = host_cpu(&kvm)?;
    check_provides(model, &host).map_err(|e| format!("the primary's guest: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, r: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: r[0],
            ebx: r[1],
            ecx: r[2],
            edx: r[3],
            ..Default::default()
        }
    }

    /// A host offering every bit of every feature word, XSAVE with x87/SSE/AVX/AVX-512 state.
    fn big_host() -> HostCpu {
        let all = u32::MAX;
        HostCpu {
            supported: CpuId::from_entries(&[
                entry(0, 0, [0xd, 0, 0, 0]),
                entry(1, 0, [0x00a0_0f11, 0, all, all]),
                entry(7, 0, [1, all, all, all]),
                entry(7, 1, [all, 0, 0, 0]),
                entry(0xd, 0, [0xe7, 2688, 2688, 0]),
                entry(0xd, 1, [0xf, 0, 0, 0]),
                entry(0xd, 2, [256, 576, 0, 0]),
                entry(0xd, 5, [64, 1088, 0, 0]),
                entry(0x8000_0001, 0, [0, 0, all, all]),
            ])
            .unwrap(),
            tsc_khz: 2_000_000,
            tsc_control: false,
        }
    }

    fn real_host() -> HostCpu {
        testbed::require_vms();
        host_cpu(&kvm_ioctls::Kvm::new().unwrap()).unwrap()
    }

    fn has(m: &CpuModel, feature: &str) -> bool {
        let n = NAMES.iter().find(|n| n.4 == feature).unwrap();
        m.words
            .iter()
            .any(|w| (w.leaf, w.subleaf, w.reg) == (n.0, n.1, n.2) && w.value & (1 << n.3) != 0)
    }

    #[test]
    fn names_parse_and_print() {
        for n in ["x86-64", "x86-64-v2", "x86-64-v3", "host"] {
            assert_eq!(n.parse::<CpuModelName>().unwrap().to_string(), n);
        }
        let e = "haswell".parse::<CpuModelName>().unwrap_err();
        assert!(e.contains("haswell") && e.contains("x86-64-v2"), "{e}");
    }

    #[test]
    fn named_levels_show_their_features_and_hide_the_rest() {
        let host = big_host();
        let (v2, cpuid) = resolve(CpuModelName::X86_64V2, &host).unwrap();
        for f in ["SSE4.2", "POPCNT", "CX16", "SSSE3", "LAHF-SAHF", "LM", "NX"] {
            assert!(has(&v2, f), "v2 lacks {f}");
        }
        for f in ["AVX", "AVX2", "XSAVE", "BMI1", "FMA", "LZCNT"] {
            assert!(!has(&v2, f), "v2 shows {f}");
        }
        // Nothing beyond the named bits (e.g. AVX-512 in leaf 7) leaks through.
        assert_eq!(word(&cpuid, 7, 0, Reg::Ebx), 0);
        assert_eq!(word(&cpuid, 7, 0, Reg::Edx), 0);
        assert_eq!(
            word(&cpuid, 0xd, 0, Reg::Eax),
            0,
            "no XSAVE state without XSAVE"
        );
        let (v3, cpuid) = resolve(CpuModelName::X86_64V3, &host).unwrap();
        for f in [
            "AVX", "AVX2", "BMI1", "BMI2", "FMA", "F16C", "MOVBE", "LZCNT", "XSAVE",
        ] {
            assert!(has(&v3, f), "v3 lacks {f}");
        }
        assert_eq!(word(&cpuid, 7, 0, Reg::Ebx), (1 << 3) | (1 << 5) | (1 << 8));
        assert_eq!(
            word(&cpuid, 0xd, 0, Reg::Eax),
            0x7,
            "x87, SSE and AVX state only"
        );
        assert_eq!(word(&cpuid, 0xd, 0, Reg::Ecx), 832);
        assert_eq!(word(&cpuid, 0xd, 5, Reg::Eax), 0, "no AVX-512 state");
        assert_eq!(word(&cpuid, 0xd, 1, Reg::Eax), 0);
        // host keeps everything.
        let (h, _) = resolve(CpuModelName::Host, &host).unwrap();
        assert_eq!(word(&host.supported, 7, 0, Reg::Ebx), u32::MAX);
        assert!(h.words.iter().any(|w| w.leaf == 7 && w.value == u32::MAX));
    }

    #[test]
    fn a_model_this_host_cannot_run_names_the_missing_features() {
        let here = real_host();
        // A guest started on a host with every feature (host model) cannot move here unless
        // this host has them all.
        let (peer, _) = resolve(CpuModelName::Host, &big_host()).unwrap();
        let peer = CpuModel {
            tsc_khz: here.tsc_khz,
            ..peer
        };
        let e = check_provides(&peer, &here).unwrap_err().to_string();
        assert!(e.contains("cannot provide CPU model host"), "{e}");
        // What this host's KVM lacks at the v3 level is named.
        let lacks_avx2 = word(&here.supported, 7, 0, Reg::Ebx) & (1 << 5) == 0;
        assert_eq!(e.contains("AVX2"), lacks_avx2, "{e}");
        // Its own models it can always run, and the default resolves here.
        for name in [CpuModelName::Host, CpuModelName::X86_64] {
            let (m, _) = resolve(name, &here).unwrap();
            check_provides(&m, &here).unwrap();
        }
        let (m, _) = resolve_default(None, &here).unwrap();
        check_provides(&m, &here).unwrap();
        match resolve(CpuModelName::X86_64V2, &here) {
            Ok(_) => assert_eq!(m.name, CpuModelName::X86_64V2),
            Err(CpuModelError::MissingFeatures { missing, .. }) => {
                assert_eq!(m.name, CpuModelName::X86_64, "falls back only by default");
                assert!(!missing.is_empty());
                assert!(resolve_default(Some(CpuModelName::X86_64V2), &here).is_err());
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn the_tsc_rate_is_checked() {
        let mut host = big_host();
        let (mut m, _) = resolve(CpuModelName::X86_64V2, &host).unwrap();
        assert_eq!(m.tsc_khz, 2_000_000);
        check_provides(&m, &host).unwrap();
        m.tsc_khz = 2_000_400; // 200 ppm: within KVM's tolerance
        check_provides(&m, &host).unwrap();
        m.tsc_khz = 2_400_000;
        let e = check_provides(&m, &host).unwrap_err().to_string();
        assert!(
            e.contains("2400000 kHz") && e.contains("2000000 kHz"),
            "{e}"
        );
        host.tsc_control = true;
        check_provides(&m, &host).unwrap();
    }

    #[test]
    fn apply_gives_the_recorded_words() {
        let host = big_host();
        let (v2, _) = resolve(CpuModelName::X86_64V2, &host).unwrap();
        let cpuid = apply(&v2, &host);
        for w in &v2.words {
            assert_eq!(word(&cpuid, w.leaf, w.subleaf, w.reg), w.value, "{w:?}");
        }
    }
}
