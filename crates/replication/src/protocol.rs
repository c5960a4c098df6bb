//! Payloads of the A-link frames (postcard-encoded).

use serde::{Deserialize, Serialize};
use vmm::boot::KernelKind;
use vmm::devices::virtio::disk_log::DiskWrite;
use vmm::{VmConfig, VmState};

use crate::pages::PageBatch;
use crate::Error;

/// Primary → backup after the key exchange: the VM to stand by for.
#[derive(Serialize, Deserialize)]
pub struct Hello {
    /// The primary's VM configuration (the backup substitutes its own disks, taps, console).
    pub config: VmConfig,
    /// Which kernel kind runs.
    pub kind: KernelKind,
    /// The guest's CPU model: feature words and TSC rate (the backup refuses one it cannot
    /// provide, see `vmm::cpu_model::check_peer`).
    pub cpu: vmm::cpu_model::CpuModel,
}

/// One complete checkpoint: everything the backup needs to resume the guest at its epoch.
#[derive(Serialize, Deserialize)]
pub struct Checkpoint {
    /// Epoch number, from 1, consecutive.
    pub epoch: u64,
    /// Pages written since the previous checkpoint.
    pub pages: PageBatch,
    /// vCPU and device state at the epoch boundary.
    pub state: VmState,
    /// Guest disk writes of the epoch, per disk.
    pub disk_writes: Vec<Vec<DiskWrite>>,
    /// The network frames the guest sent during the epoch, per interface. The primary releases
    /// them on the acknowledgement; the backup keeps the last committed epoch's frames and sends
    /// them again after a failover, in case the primary died before releasing them (TCP drops
    /// the duplicates), so a reply in flight is not left to a retransmission timer.
    pub output: Vec<Vec<Vec<u8>>>,
}

/// Primary → backup during the initial sync: one chunk of one disk. Writes the guest makes
/// meanwhile are logged and travel with the first checkpoint, so the result is consistent.
#[derive(Serialize, Deserialize)]
pub struct DiskChunk {
    /// Disk index in the VM's order.
    pub disk: u32,
    /// Byte offset.
    pub offset: u64,
    /// LZ4 block (size-prefixed) of the chunk.
    pub lz4: Vec<u8>,
}

/// Backup → primary: checkpoint `epoch` is committed.
#[derive(Serialize, Deserialize)]
pub struct Ack {
    /// The committed epoch.
    pub epoch: u64,
}

/// Encodes a payload.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    postcard::to_allocvec(v).map_err(|e| Error::Protocol(format!("encode: {e}")))
}

/// Decodes a payload.
pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, Error> {
    postcard::from_bytes(b).map_err(|e| Error::Protocol(format!("undecodable payload: {e}")))
}

/// How the guest ended on the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EndReason {
    /// Powered off or shut down: there is nothing to resume, ever.
    PowerOff,
    /// Rebooted: the standby is obsolete; protection restarts with a new session.
    Reboot,
}

/// Primary → backup: the guest ended after checkpoint `epoch`; acknowledged with `Ack`.
#[derive(Debug, Serialize, Deserialize)]
pub struct End {
    /// Why.
    pub reason: EndReason,
    /// The last checkpoint sent before the end.
    pub epoch: u64,
}

/// Backup → primary: this node is no backup any more (its standby is poisoned, e.g. a
/// checkpoint could not be applied); counts as its word that it released the session.
#[derive(Debug, Serialize, Deserialize)]
pub struct NoBackup {
    /// Why, for the operator.
    pub reason: String,
}
