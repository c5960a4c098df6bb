//! One A-link session once the handshake is done: frames are read on their own thread, so an
//! engine waits for them with a timeout without ever cutting a frame in half.

use std::io::{BufReader, BufWriter, Read};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::Duration;

use crate::liveness::SessionId;
use crate::wire::{Channel, Frame, Kind, WireError};

/// An established, authenticated session.
pub struct Link {
    w: BufWriter<TcpStream>,
    tx: Channel,
    frames: Receiver<Result<Frame, WireError>>,
    stream: TcpStream,
    /// The session id (from the handshake, the same on both nodes).
    pub id: SessionId,
}

/// What waiting for a frame gave.
pub enum Next {
    /// A verified frame.
    Frame(Frame),
    /// Nothing yet.
    Nothing,
    /// The stream cannot be used any more: refused frame or broken connection.
    Failed(WireError),
}

impl Link {
    /// Takes over a handshaken stream and its channels; starts the reader thread, which adds
    /// the bytes it receives to `progress` (if given).
    pub fn new(
        stream: TcpStream,
        r: BufReader<TcpStream>,
        w: BufWriter<TcpStream>,
        tx: Channel,
        mut rx: Channel,
        id: SessionId,
        progress: Option<Arc<AtomicU64>>,
    ) -> std::io::Result<Link> {
        r.get_ref().set_read_timeout(None)?;
        let (send, frames) = mpsc::sync_channel(8);
        std::thread::Builder::new()
            .name("ft-alink-rx".into())
            .spawn(move || {
                let mut r = Counting { r, progress };
                loop {
                    let f = rx.recv(&mut r);
                    let failed = f.is_err();
                    if send.send(f).is_err() || failed {
                        return;
                    }
                }
            })?;
        Ok(Link {
            w,
            tx,
            frames,
            stream,
            id,
        })
    }

    /// Sends a frame.
    pub fn send(&mut self, kind: Kind, payload: &[u8]) -> Result<(), WireError> {
        self.tx.send(&mut self.w, kind, payload)
    }

    /// Waits up to `d` for the next frame.
    pub fn next(&self, d: Duration) -> Next {
        match self.frames.recv_timeout(d) {
            Ok(Ok(f)) => Next::Frame(f),
            Ok(Err(e)) => Next::Failed(e),
            Err(RecvTimeoutError::Timeout) => Next::Nothing,
            Err(RecvTimeoutError::Disconnected) => Next::Failed(WireError::Io(
                std::io::Error::new(std::io::ErrorKind::BrokenPipe, "A-link reader ended"),
            )),
        }
    }
}

/// A reader that counts what it reads.
struct Counting<R> {
    r: R,
    progress: Option<Arc<AtomicU64>>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.r.read(buf)?;
        if let Some(p) = &self.progress {
            p.fetch_add(n as u64, Ordering::Relaxed);
        }
        Ok(n)
    }
}

impl Link {
    /// Bytes received on the A-link but not read yet (the reader thread is behind): the
    /// A-link is not silent, whatever the clock says.
    pub fn unread(&self) -> bool {
        pending_bytes(&self.stream) > 0
    }
}

/// Bytes queued for reading on a socket (FIONREAD).
pub fn pending_bytes(s: &impl std::os::fd::AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for the call.
    let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::FIONREAD, &mut n) };
    if r < 0 {
        0
    } else {
        n.max(0) as usize
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Ends the reader thread too.
        let _ = self.stream.shutdown(Shutdown::Both);
    }
}
