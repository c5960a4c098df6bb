//! The mirror target: serves a replica to the node that owns the volume.

use std::io;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use super::protocol::{region_checksums, Conn, Hello, HelloOk, Kind, MAX_PAYLOAD};
use crate::BlockBackend;
use link::{Role, Secret};

/// The target's persisted state (`N.mirror-target.json`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct TargetState {
    /// False while a resync into this replica is unfinished.
    pub consistent: bool,
}

struct Replica {
    disk: Box<dyn BlockBackend>,
    replica_id: u64,
    volume: String,
    state_path: PathBuf,
    state: TargetState,
}

impl Replica {
    fn set_consistent(&mut self, c: bool) -> io::Result<()> {
        if self.state.consistent != c {
            self.state.consistent = c;
            let b = serde_json::to_vec(&self.state).map_err(io::Error::other)?;
            crate::pool::write_atomic(&self.state_path, &b)?;
        }
        Ok(())
    }
}

/// Reads a target state file; a missing one means consistent.
pub fn load_target_state(path: &Path) -> TargetState {
    std::fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(TargetState { consistent: true })
}

/// A running mirror target.
pub struct MirrorTarget {
    addr: std::net::SocketAddr,
}

impl MirrorTarget {
    /// Serves `disk` (volume `volume`, replica `replica_id`) on `listener` from background
    /// threads, one per connection; each request runs under one lock on the replica, so a
    /// reconnecting writer and a stale connection never interleave within a request. Only a
    /// client that shares `secret` gets past the handshake; others are logged and dropped, and
    /// the target keeps accepting.
    pub fn spawn(
        listener: TcpListener,
        disk: Box<dyn BlockBackend>,
        volume: &str,
        replica_id: u64,
        state_path: &Path,
        secret: Secret,
    ) -> io::Result<MirrorTarget> {
        let addr = listener.local_addr()?;
        let state = load_target_state(state_path);
        let replica = Arc::new(Mutex::new(Replica {
            disk,
            replica_id,
            volume: volume.to_string(),
            state_path: state_path.to_path_buf(),
            state,
        }));
        std::thread::Builder::new()
            .name("mirror-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let r = replica.clone();
                    let secret = secret.clone();
                    let _ = std::thread::Builder::new()
                        .name("mirror-conn".into())
                        .spawn(move || {
                            let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                            if let Err(e) = handle(conn, &r, &secret) {
                                if e.kind() != io::ErrorKind::UnexpectedEof {
                                    tracing::warn!("mirror connection from {peer} ended: {e}");
                                }
                            }
                        });
                }
            })?;
        Ok(MirrorTarget { addr })
    }

    /// The address it listens on.
    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.addr
    }
}

fn handle(conn: TcpStream, replica: &Mutex<Replica>, secret: &Secret) -> io::Result<()> {
    let mut conn = Conn::establish(conn, secret, Role::Responder, None)?;
    let lock = || {
        replica
            .lock()
            .map_err(|_| io::Error::other("mirror target state poisoned"))
    };
    loop {
        let f = conn.read_frame()?;
        let reply: Result<(Kind, Vec<u8>), String> = match f.kind {
            Kind::Hello => {
                let hello: Hello = serde_json::from_slice(&f.payload).map_err(io::Error::other)?;
                let r = lock()?;
                if hello.volume != r.volume {
                    Err(format!(
                        "this target serves volume {:?}, not {:?}",
                        r.volume, hello.volume
                    ))
                } else {
                    let ok = HelloOk {
                        size: r.disk.size(),
                        replica_id: r.replica_id,
                        consistent: r.state.consistent,
                    };
                    Ok((
                        Kind::HelloOk,
                        serde_json::to_vec(&ok).map_err(io::Error::other)?,
                    ))
                }
            }
            Kind::Write => lock()?
                .disk
                .write_at(&f.payload, f.offset)
                .map(|_| (Kind::Ack, Vec::new()))
                .map_err(|e| e.to_string()),
            Kind::Flush => lock()?
                .disk
                .flush()
                .map(|_| (Kind::Ack, Vec::new()))
                .map_err(|e| e.to_string()),
            Kind::Read => {
                let len = u32::from_be_bytes(
                    f.payload
                        .get(..4)
                        .and_then(|b| b.try_into().ok())
                        .unwrap_or([0; 4]),
                );
                if len as usize > MAX_PAYLOAD {
                    Err(format!(
                        "read of {len} bytes exceeds the {MAX_PAYLOAD}-byte limit"
                    ))
                } else {
                    let mut buf = vec![0u8; len as usize];
                    lock()?
                        .disk
                        .read_at(&mut buf, f.offset)
                        .map(|_| (Kind::Data, buf))
                        .map_err(|e| e.to_string())
                }
            }
            Kind::Checksums => {
                let p = &f.payload;
                if p.len() < 8 {
                    Err("short checksum request".into())
                } else {
                    let region = u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as u64;
                    let count = u32::from_be_bytes([p[4], p[5], p[6], p[7]]) as u64;
                    let mut r = lock()?;
                    let size = r.disk.size();
                    let len = (region * count).min(size.saturating_sub(f.offset));
                    let mut buf = vec![0u8; len as usize];
                    match r.disk.read_at(&mut buf, f.offset) {
                        Ok(()) => {
                            let sums = region_checksums(&buf, region.max(1) as usize);
                            Ok((
                                Kind::Data,
                                sums.iter().flat_map(|c| c.to_be_bytes()).collect(),
                            ))
                        }
                        Err(e) => Err(e.to_string()),
                    }
                }
            }
            Kind::SyncStart => lock()?
                .set_consistent(false)
                .map(|_| (Kind::Ack, Vec::new()))
                .map_err(|e| e.to_string()),
            Kind::SyncDone => {
                let mut r = lock()?;
                r.disk
                    .flush()
                    .and_then(|_| r.set_consistent(true))
                    .map(|_| (Kind::Ack, Vec::new()))
                    .map_err(|e| e.to_string())
            }
            other => Err(format!("unexpected frame {other:?} at the mirror target")),
        };
        match reply {
            Ok((k, p)) => conn.write_frame(k, f.seq, f.offset, &p)?,
            Err(msg) => conn.write_frame(Kind::Error, f.seq, f.offset, msg.as_bytes())?,
        }
    }
}
