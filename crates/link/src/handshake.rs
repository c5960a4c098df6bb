//! The handshake: nonces in clear, per-direction keys from HKDF, key confirmation.

use std::io::{Read, Write};

use hkdf::Hkdf;
use sha2::{Digest, Sha256};

use crate::frame::Direction;
use crate::{LinkError, Secret};

const MAGIC: &[u8; 4] = b"FTLH";
const VERSION: u8 = 1;
/// Length of each side's hello.
pub const HELLO_LEN: usize = 48;
/// Kind byte of the key-confirmation frame (each direction's frame 0).
const CONFIRM: u8 = 0;

/// Which end of the connection this is (the ends must differ).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The side that connected (FT primary, mirror owner).
    Initiator,
    /// The side that accepted (FT backup, mirror target).
    Responder,
}

impl Role {
    fn byte(self) -> u8 {
        match self {
            Role::Initiator => 1,
            Role::Responder => 2,
        }
    }
}

/// An established channel: one direction to send with, one to receive with.
pub struct Session {
    /// Frames this side sends.
    pub tx: Direction,
    /// Frames this side receives.
    pub rx: Direction,
    /// The session's identity, the same on both ends and fresh per handshake (the start of
    /// the transcript hash).
    pub id: [u8; 16],
}

fn service_id(service: &str) -> [u8; 8] {
    let d = Sha256::digest(service.as_bytes());
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    id
}

fn hello(role: Role, service: &str, nonce: &[u8; 32]) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[0..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = role.byte();
    h[8..16].copy_from_slice(&service_id(service));
    h[16..48].copy_from_slice(nonce);
    h
}

fn check_hello(
    peer: &[u8; HELLO_LEN],
    ours: &[u8; HELLO_LEN],
    service: &str,
) -> Result<(), LinkError> {
    if &peer[0..4] != MAGIC {
        return Err(LinkError::Format(format!(
            "the peer is not an ftvm node (bad handshake magic): check the {service} address"
        )));
    }
    if peer[4] != VERSION {
        return Err(LinkError::Format(format!(
            "the peer speaks handshake version {}, this node {VERSION}: run the same ftvm on both nodes",
            peer[4]
        )));
    }
    if peer[8..16] != ours[8..16] {
        return Err(LinkError::Format(format!(
            "the peer is an ftvm endpoint of another service, not {service}: check the address and port"
        )));
    }
    if peer[5] == ours[5] || !(1..=2).contains(&peer[5]) {
        return Err(LinkError::Format(format!(
            "the peer's handshake role {} does not complement ours {}",
            peer[5], ours[5]
        )));
    }
    if peer[16..48] == ours[16..48] {
        return Err(LinkError::Auth(
            "the peer echoed this node's own handshake (reflection): refused".into(),
        ));
    }
    Ok(())
}

fn expand(hk: &Hkdf<Sha256>, service: &str, what: &str) -> Result<[u8; 32], LinkError> {
    let mut key = [0u8; 32];
    hk.expand(
        format!("ftvm-link v1 {service} {what}").as_bytes(),
        &mut key,
    )
    .map_err(|_| LinkError::Auth("key derivation failed".into()))?;
    Ok(key)
}

/// Establishes a channel for `service` (a name both ends use, such as `"a-link"`) over `r`/`w`
/// with the shared `secret`, accepting payloads up to `max_payload` bytes. The initiator sends
/// its hello first; the responder answers only a valid hello. Set read timeouts on the stream
/// first: a silent peer makes it fail with [`LinkError::Io`], a peer with another secret with
/// [`LinkError::WrongSecret`].
pub fn handshake<R: Read, W: Write>(
    r: &mut R,
    w: &mut W,
    secret: &Secret,
    role: Role,
    service: &str,
    max_payload: usize,
) -> Result<Session, LinkError> {
    let mut nonce = [0u8; 32];
    getrandom::fill(&mut nonce)
        .map_err(|e| LinkError::Io(std::io::Error::other(format!("no randomness: {e}"))))?;
    let ours = hello(role, service, &nonce);
    let mut peer = [0u8; HELLO_LEN];
    // The responder speaks only to a peer whose hello is one: a stray client gets nothing.
    if role == Role::Initiator {
        w.write_all(&ours)?;
        w.flush()?;
    }
    r.read_exact(&mut peer).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => LinkError::Format(format!(
            "the peer closed the connection during the handshake: it is not an ftvm {service} \
             endpoint or it refused this node's hello (see its log)"
        )),
        _ => LinkError::Io(e),
    })?;
    check_hello(&peer, &ours, service)?;
    if role == Role::Responder {
        w.write_all(&ours)?;
        w.flush()?;
    }

    let (init, resp) = match role {
        Role::Initiator => (&ours, &peer),
        Role::Responder => (&peer, &ours),
    };
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&init[16..48]);
    salt[32..].copy_from_slice(&resp[16..48]);
    let hk = Hkdf::<Sha256>::new(Some(&salt), secret.as_bytes());
    let i2r = expand(&hk, service, "initiator->responder")?;
    let r2i = expand(&hk, service, "responder->initiator")?;
    let (tx_key, rx_key) = match role {
        Role::Initiator => (i2r, r2i),
        Role::Responder => (r2i, i2r),
    };
    let mut transcript = Sha256::new();
    transcript.update(init);
    transcript.update(resp);
    let transcript = transcript.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&transcript[..16]);
    let mut session = Session {
        tx: Direction::new(tx_key, max_payload.max(32)),
        rx: Direction::new(rx_key, max_payload.max(32)),
        id,
    };

    session.tx.send(w, CONFIRM, &transcript)?;
    let confirm = session.rx.recv(r).map_err(|e| match e {
        LinkError::Auth(_) => LinkError::WrongSecret,
        e => e,
    })?;
    if confirm.kind != CONFIRM || confirm.payload[..] != transcript[..] {
        return Err(LinkError::Auth(
            "the peer's key confirmation covers another handshake (tampered link): refused".into(),
        ));
    }
    Ok(session)
}
