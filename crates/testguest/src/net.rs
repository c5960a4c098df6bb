//! smoltcp on top of the virtio-net driver: interface setup, the polling loop and a small
//! multi-connection TCP server helper. ARP and ICMP echo are answered by the interface.

use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Cidr};

use crate::cmdline::Args;
use crate::virtio::net::{NetDev, RxQueue, TxQueue, MAX_FRAME};
use crate::virtio::{self, DEVICE_NET};
use crate::{clock, fatal, println};

/// Receive token: one received frame, recycled to the device when dropped.
pub struct RxTok<'a> {
    rx: &'a mut RxQueue,
    index: usize,
    len: usize,
}

/// Transmit token: only handed out while a transmit buffer is free.
pub struct TxTok<'a> {
    tx: &'a mut TxQueue,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(self.rx.frame(self.index, self.len))
    }
}

impl Drop for RxTok<'_> {
    fn drop(&mut self) {
        self.rx.recycle(self.index);
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.tx
            .send(len, f)
            .expect("a transmit buffer was free when the token was made")
    }
}

impl phy::Device for NetDev {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        if !self.tx.ready() {
            return None;
        }
        let (index, len) = self.rx.poll()?;
        Some((
            RxTok {
                rx: &mut self.rx,
                index,
                len,
            },
            TxTok { tx: &mut self.tx },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxTok<'_>> {
        self.tx.ready().then_some(TxTok { tx: &mut self.tx })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MAX_FRAME;
        caps
    }
}

/// Displays an optional value, or `none`.
struct OrNone<T>(Option<T>);

impl<T: core::fmt::Display> core::fmt::Display for OrNone<T> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match &self.0 {
            Some(v) => v.fmt(f),
            None => f.write_str("none"),
        }
    }
}

/// The network stack: device, interface and sockets.
pub struct Net {
    pub dev: NetDev,
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
}

fn now() -> Instant {
    Instant::from_micros(clock::now_us() as i64)
}

impl Net {
    /// Brings up the first virtio-net device with `ftvm.ip` (and `ftvm.gw`); powers off with
    /// an error if that is impossible.
    pub fn up(args: &Args) -> Self {
        let Some(ip) = args.ip else {
            fatal!("this job needs ftvm.ip=A.B.C.D/N on the command line");
        };
        let Some(found) = virtio::find(DEVICE_NET) else {
            fatal!("no virtio-net device");
        };
        let mut dev = match NetDev::new(found) {
            Ok(d) => d,
            Err(e) => fatal!("virtio-net in slot {}: {:?}", found.slot, e),
        };
        let mac = EthernetAddress(dev.mac());
        let mut config = Config::new(HardwareAddress::Ethernet(mac));
        config.random_seed = clock::rdtsc();
        let mut iface = Interface::new(config, &mut dev, now());
        iface.update_ip_addrs(|addrs| {
            addrs
                .push(IpCidr::Ipv4(Ipv4Cidr::new(ip.addr, ip.prefix)))
                .expect("room for one address");
        });
        if let Some(gw) = args.gw {
            if iface.routes_mut().add_default_ipv4_route(gw).is_err() {
                fatal!("cannot add the default route via {}", gw);
            }
        }
        let m = mac.0;
        println!(
            "testguest: net mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} ip={}/{} gw={} slot={}",
            m[0],
            m[1],
            m[2],
            m[3],
            m[4],
            m[5],
            ip.addr,
            ip.prefix,
            OrNone(args.gw),
            found.slot
        );
        Self {
            dev,
            iface,
            sockets: SocketSet::new(vec![]),
        }
    }

    /// Runs the interface once: receives, processes and transmits what is pending.
    pub fn poll(&mut self) {
        self.iface.poll(now(), &mut self.dev, &mut self.sockets);
        self.dev.kick();
    }
}

/// A TCP server on one port: a fixed number of sockets, each listening again once its
/// connection is over, each with per-connection state `S` (reset for every connection).
pub struct TcpServer<S> {
    port: u16,
    conns: Vec<(SocketHandle, S)>,
}

impl<S: Default> TcpServer<S> {
    /// Opens `slots` listening sockets with `buf` bytes of receive and send buffer each.
    pub fn new(net: &mut Net, port: u16, slots: usize, buf: usize) -> Self {
        let conns = (0..slots)
            .map(|_| {
                let rx = tcp::SocketBuffer::new(vec![0; buf]);
                let tx = tcp::SocketBuffer::new(vec![0; buf]);
                let mut sock = tcp::Socket::new(rx, tx);
                // Answers go out at once (request/response traffic, latency measurements).
                sock.set_nagle_enabled(false);
                (net.sockets.add(sock), S::default())
            })
            .collect();
        let mut server = Self { port, conns };
        server.service(net, |_, _| {});
        server
    }

    /// Re-arms finished sockets and runs `app` on every connected one.
    pub fn service(&mut self, net: &mut Net, mut app: impl FnMut(&mut tcp::Socket, &mut S)) {
        for (handle, state) in &mut self.conns {
            let sock = net.sockets.get_mut::<tcp::Socket>(*handle);
            if !sock.is_open() {
                if let Err(e) = sock.listen(self.port) {
                    fatal!("cannot listen on port {}: {:?}", self.port, e);
                }
                *state = S::default();
                continue;
            }
            if sock.is_active() {
                app(sock, state);
            }
            // The peer closed its side and everything we had to say was sent: close ours.
            if sock.state() == tcp::State::CloseWait && sock.send_queue() == 0 && !sock.can_recv() {
                sock.close();
            }
        }
    }
}
