//! Real capture of the business LAN in the client namespace: every frame whose source MAC is the
//! guest's, per bridge port (`to-a`: node A's uplink, `to-b`: node B's), with the time it arrived,
//! read from one `AF_PACKET` raw socket bound to each port. An [`ArpProber`] makes every running
//! copy of the guest speak: it broadcasts ARP requests for the guest's address from the client,
//! and each copy that runs answers on its own node's port.
//!
//! Only frames *entering* the client's bridge through a port count (`PACKET_OUTGOING` copies,
//! e.g. a broadcast from node B flooded out of `to-a`, are skipped), so a frame on `to-a` was sent
//! by a copy on node A and a frame on `to-b` by a copy on node B.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::netns::{self, TwoNodeBed};
use crate::timeline::{Frame, Port};

const ETH_P_ALL: u16 = 0x0003;
const ETH_P_ARP: u16 = 0x0806;
/// `sll_pkttype` of frames this host sends out of the port.
const PACKET_OUTGOING: u8 = 4;
/// How often a capture thread looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// An `AF_PACKET` raw socket bound to one interface of the calling thread's namespace.
fn packet_socket(dev: &str, protocol: u16) -> std::io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the returned descriptor is checked below and owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            // Protocol 0: receive nothing until bound, so no frame of another interface slips in.
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(dev)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: `name` is a NUL-terminated string that lives across the call.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = protocol.to_be();
    addr.sll_ifindex = ifindex as i32;
    // SAFETY: `addr` is an initialised sockaddr_ll and the length passed is its size.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_ll as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: POLL.as_micros() as libc::suseconds_t,
    };
    // SAFETY: SO_RCVTIMEO reads a timeval; `tv` lives across the call and the length is its size.
    let ret = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fd)
}

/// Receives one frame into `buf`; returns its length and packet type, or None on timeout.
fn recv_frame(fd: &OwnedFd, buf: &mut [u8]) -> std::io::Result<Option<(usize, u8)>> {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `buf` is writable for its length; `from` and `len` are valid for writes and `len`
    // holds the size of `from`.
    let n = unsafe {
        libc::recvfrom(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
            0,
            &mut from as *mut libc::sockaddr_ll as *mut libc::sockaddr,
            &mut len,
        )
    };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some((n as usize, from.sll_pkttype)))
}

/// A running capture of the guest's frames on the client's ports `to-a` and `to-b`.
/// Stops on drop.
pub struct LanCapture {
    start: Instant,
    frames: Arc<Mutex<Vec<Frame>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl LanCapture {
    /// Starts capturing frames from `mac` on both client ports of `bed`. Times count from this
    /// call ([`LanCapture::start_time`]).
    pub fn start(bed: &TwoNodeBed, mac: [u8; 6]) -> anyhow::Result<Self> {
        let start = Instant::now();
        let frames: Arc<Mutex<Vec<Frame>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for (port, dev) in [(Port::A, "to-a"), (Port::B, "to-b")] {
            let fd = bed
                .in_ns(bed.client(), || packet_socket(dev, ETH_P_ALL))?
                .with_context(|| {
                    format!(
                        "cannot open a raw socket on {dev} in {} (root?)",
                        bed.client()
                    )
                })?;
            let (frames, stop) = (frames.clone(), stop.clone());
            let t = std::thread::Builder::new()
                .name(format!("capture-{dev}"))
                .spawn(move || capture_loop(fd, port, mac, start, &frames, &stop))
                .context("cannot start a capture thread")?;
            threads.push(t);
        }
        Ok(Self {
            start,
            frames,
            stop,
            threads,
        })
    }

    /// The instant capture times count from.
    pub fn start_time(&self) -> Instant {
        self.start
    }

    /// `t` as a capture time (zero if before the start).
    pub fn at(&self, t: Instant) -> Duration {
        t.saturating_duration_since(self.start)
    }

    /// Every guest frame captured so far, in arrival order.
    pub fn frames(&self) -> Vec<Frame> {
        let mut v = self.frames.lock().map(|f| f.clone()).unwrap_or_default();
        v.sort_by_key(|f| f.t);
        v
    }

    /// Waits until a guest frame arrived on `port` at or after capture time `after`; returns
    /// its time, or None after `timeout`.
    pub fn wait_frame(&self, port: Port, after: Duration, timeout: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        loop {
            if let Some(f) = self
                .frames()
                .iter()
                .find(|f| f.port == port && f.t >= after)
            {
                return Some(f.t);
            }
            if t0.elapsed() > timeout {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the capture threads.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LanCapture {
    fn drop(&mut self) {
        self.stop();
    }
}

fn capture_loop(
    fd: OwnedFd,
    port: Port,
    mac: [u8; 6],
    start: Instant,
    frames: &Mutex<Vec<Frame>>,
    stop: &AtomicBool,
) {
    let mut buf = vec![0u8; 65536];
    while !stop.load(Ordering::SeqCst) {
        match recv_frame(&fd, &mut buf) {
            Ok(Some((n, kind))) => {
                let t = start.elapsed();
                if kind == PACKET_OUTGOING || n < 14 || buf[6..12] != mac {
                    continue;
                }
                let ethertype = u16::from_be_bytes([buf[12], buf[13]]);
                if let Ok(mut f) = frames.lock() {
                    f.push(Frame {
                        t,
                        port,
                        len: n,
                        ethertype,
                    });
                }
            }
            Ok(None) => {}
            // The port was taken down (a fault): the socket stays bound and receives again
            // once the port is up.
            Err(e) if e.raw_os_error() == Some(libc::ENETDOWN) => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => {
                eprintln!("testbed: capture on {port:?} stopped: {e}");
                return;
            }
        }
    }
}

/// An ARP request from `src_mac`/`src_ip` for `target_ip` (broadcast).
pub fn arp_request(src_mac: [u8; 6], src_ip: [u8; 4], target_ip: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
    // Ethernet/IPv4, lengths 6/4, operation 1 (request).
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&src_ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target_ip);
    f.resize(60, 0);
    f
}

fn ipv4(s: &str) -> anyhow::Result<[u8; 4]> {
    let ip: std::net::Ipv4Addr = s
        .parse()
        .with_context(|| format!("invalid IPv4 address {s:?}"))?;
    Ok(ip.octets())
}

/// The MAC address of `dev` in namespace `ns` (from `ip -o link show`).
pub fn mac_of(bed: &TwoNodeBed, ns: &str, dev: &str) -> anyhow::Result<[u8; 6]> {
    let out = bed.run_in(ns, "ip", &["-o", "link", "show", "dev", dev])?;
    let mut words = out.split_whitespace();
    while let Some(w) = words.next() {
        if w == "link/ether" {
            let mac = words.next().context("`ip link` printed no MAC")?;
            return netns::parse_mac(mac);
        }
    }
    bail!("{dev} in {ns} has no Ethernet address: {}", out.trim())
}

/// Sends one raw frame out of `dev` in the client namespace of `bed`.
pub fn send_raw(bed: &TwoNodeBed, dev: &str, frame: &[u8]) -> anyhow::Result<()> {
    let fd = bed
        .in_ns(bed.client(), || packet_socket(dev, 0))?
        .with_context(|| format!("cannot open a raw socket on {dev} in {}", bed.client()))?;
    let file = File::from(fd);
    std::io::Write::write_all(&mut &file, frame).context("cannot send a raw frame")?;
    Ok(())
}

/// Broadcasts an ARP request for the guest's address from the client's `lan` bridge every
/// `interval`, so every running copy of the guest answers on its node's port. Stops on drop.
pub struct ArpProber {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ArpProber {
    /// Starts probing.
    pub fn start(bed: &TwoNodeBed, interval: Duration) -> anyhow::Result<Self> {
        let lan_mac = mac_of(bed, bed.client(), "lan")?;
        let frame = arp_request(lan_mac, ipv4(bed.client_ip())?, ipv4(bed.guest_ip())?);
        let fd = bed
            .in_ns(bed.client(), || packet_socket("lan", 0))?
            .with_context(|| format!("cannot open a raw socket on lan in {}", bed.client()))?;
        let file = File::from(fd);
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let thread = std::thread::Builder::new()
            .name("arp-prober".into())
            .spawn(move || {
                while !st.load(Ordering::SeqCst) {
                    // A full socket buffer or a link being down is not the prober's business.
                    let _ = std::io::Write::write_all(&mut &file, &frame);
                    std::thread::sleep(interval);
                }
            })
            .context("cannot start the ARP prober")?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for ArpProber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
