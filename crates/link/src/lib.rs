//! ftvm's node-to-node channel: authenticated and encrypted frames over any byte stream, used by
//! the A-link (FT checkpoints, crate `replication`) and by disk mirroring (crate `storage`).
//!
//! # Handshake ([`handshake`])
//! The initiator, then (only to a valid hello) the responder, sends a 48-byte hello in clear: `"FTLH" | version u8 | role u8 | 0 u16 |
//! service id (8 bytes of SHA-256 of the service name) | random nonce (32 bytes)`. Both then
//! derive two keys with HKDF-SHA256 from the cluster secret (input key material), both nonces
//! (salt: initiator's then responder's) and a distinct `info` per direction and service, so a
//! frame reflected back to its sender, or carried from one service or session to another, never
//! authenticates. Each side's first frame carries SHA-256 of both hellos (key confirmation): a
//! peer with another secret is refused at once with [`LinkError::WrongSecret`].
//!
//! # Frames ([`Direction`])
//! ```text
//! header (16 bytes, clear): "FTLK" | version u8 | kind u8 | flags u16 (0) | len u32 LE | 0 u32
//! header tag (16 bytes):    ChaCha20-Poly1305 tag over nothing, header as associated data
//! payload (len bytes):      ChaCha20-Poly1305 ciphertext, header as associated data
//! payload tag (16 bytes)
//! ```
//! The nonce is the direction's frame counter (and 0 for the header tag, 1 for the payload), so
//! a replayed, dropped or reordered frame fails authentication. The receiver checks the header
//! tag and the channel's length bound before it allocates or reads the payload: an
//! unauthenticated peer makes it allocate nothing. [`frame_len`] gives a frame's size on the
//! wire from its clear header (for test proxies that drop exactly one frame).

mod frame;
mod handshake;
mod secret;

use std::io;

pub use frame::{frame_len, Direction, Received, FRAME_OVERHEAD, HEADER_LEN, VERSION};
pub use handshake::{handshake, Role, Session, HELLO_LEN};
pub use secret::{Secret, MIN_SECRET_LEN, SECRET_ENV};

/// Why the channel refused a frame or a peer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The connection failed, timed out or closed.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer does not speak this protocol (magic, version, service, role).
    #[error("{0}")]
    Format(String),
    /// A frame did not authenticate: tampered, replayed, reordered, or from another session.
    #[error("{0}")]
    Auth(String),
    /// Key confirmation failed during the handshake.
    #[error(
        "the peer's cluster secret differs from this node's (key confirmation failed): \
         give both nodes the same secret (--secret-file PATH or FTVM_FT_SECRET)"
    )]
    WrongSecret,
    /// An authenticated frame declares more than this channel accepts.
    #[error("frame of {len} bytes exceeds this channel's {max}-byte limit")]
    TooLarge {
        /// Declared payload length.
        len: usize,
        /// The channel's limit.
        max: usize,
    },
    /// The cluster secret is missing or too weak.
    #[error("{0}")]
    Secret(String),
}
