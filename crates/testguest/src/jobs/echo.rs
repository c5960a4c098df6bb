//! `tcp-echo PORT`: echoes every byte back, on up to [`super::TCP_SLOTS`] connections.

use crate::cmdline::Args;
use crate::net::{Net, TcpServer};

/// Per-socket buffer size (each direction).
const BUF: usize = 64 * 1024;

pub fn run(args: &Args, port: u16) -> ! {
    let mut net = Net::up(args);
    let mut server = TcpServer::<()>::new(&mut net, port, super::TCP_SLOTS, BUF);
    super::running("tcp-echo");
    let mut tmp = [0u8; 8192];
    loop {
        net.poll();
        server.service(&mut net, |sock, _| {
            while sock.can_recv() && sock.can_send() {
                let room = (sock.send_capacity() - sock.send_queue()).min(tmp.len());
                let n = sock.recv_slice(&mut tmp[..room]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                let sent = sock.send_slice(&tmp[..n]).unwrap_or(0);
                debug_assert_eq!(sent, n, "send room was checked");
            }
        });
    }
}
