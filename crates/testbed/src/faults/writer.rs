//! The fault matrix's client: writes keys to the guest's kv service continuously from the client
//! namespace (reconnecting when a connection breaks), records every acknowledged write with the
//! time its OK arrived, and afterwards reads every acknowledged key back.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::kv::KvClient;
use crate::netns::{self, TwoNodeBed};

/// How long one request may wait for its answer (a 2 s A-link delay holds output ~4 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// Shortest time between two writes (keeps the number of keys to verify bounded).
const WRITE_PACING: Duration = Duration::from_millis(3);

/// A write the guest acknowledged.
#[derive(Clone, Copy, Debug)]
pub struct Acked {
    /// Key number: key `k{n}` holds `v{n}`.
    pub n: usize,
    /// When the OK arrived.
    pub at: Instant,
}

/// A client writing `k{n} = v{n}` for n = 0, 1, 2, ... until stopped.
pub struct KvWriter {
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Acked>>>,
    reconnects: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

fn connect(ns: &str, addr: SocketAddr, deadline: Duration) -> anyhow::Result<KvClient> {
    netns::in_ns(ns, move || {
        KvClient::connect(addr, REQUEST_TIMEOUT, deadline)
    })?
}

impl KvWriter {
    /// Connects (waiting up to 20 s for the service) and starts writing.
    pub fn start(bed: &TwoNodeBed) -> anyhow::Result<Self> {
        let ns = bed.client().to_string();
        let addr = crate::ft::kv_addr(bed);
        let first = connect(&ns, addr, Duration::from_secs(20))
            .context("the kv service does not answer")?;
        let stop = Arc::new(AtomicBool::new(false));
        let acked: Arc<Mutex<Vec<Acked>>> = Arc::default();
        let reconnects = Arc::new(AtomicU64::new(0));
        let (st, ak, rc) = (stop.clone(), acked.clone(), reconnects.clone());
        let thread = std::thread::Builder::new()
            .name("kv-writer".into())
            .spawn(move || write_loop(first, &ns, addr, &st, &ak, &rc))
            .context("cannot start the kv writer")?;
        Ok(Self {
            stop,
            acked,
            reconnects,
            thread: Some(thread),
        })
    }

    /// The writes acknowledged so far.
    pub fn acked(&self) -> Vec<Acked> {
        self.acked.lock().map(|a| a.clone()).unwrap_or_default()
    }

    /// How often the writer had to open a new connection.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::SeqCst)
    }

    /// Stops writing (waits for the request in flight) and returns every acknowledged write.
    pub fn stop(mut self) -> Vec<Acked> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.acked()
    }
}

impl Drop for KvWriter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(
    first: KvClient,
    ns: &str,
    addr: SocketAddr,
    stop: &AtomicBool,
    acked: &Mutex<Vec<Acked>>,
    reconnects: &AtomicU64,
) {
    let mut client = Some(first);
    let mut n = 0usize;
    while !stop.load(Ordering::SeqCst) {
        let t0 = Instant::now();
        let Some(c) = client.as_mut() else {
            match connect(ns, addr, Duration::from_secs(1)) {
                Ok(c) => {
                    reconnects.fetch_add(1, Ordering::SeqCst);
                    client = Some(c);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
            continue;
        };
        match c.set(&format!("k{n}"), &format!("v{n}")) {
            Ok(true) => {
                if let Ok(mut a) = acked.lock() {
                    a.push(Acked {
                        n,
                        at: Instant::now(),
                    });
                }
            }
            // Not acknowledged: the write does not count either way.
            Ok(false) => {}
            Err(_) => client = None,
        }
        // Every key is written once: an unanswered write is never retried under its name.
        n += 1;
        let spent = t0.elapsed();
        if spent < WRITE_PACING {
            std::thread::sleep(WRITE_PACING - spent);
        }
    }
}

/// Reads every acknowledged key back through a new connection; returns the key numbers whose
/// value is missing or wrong. When the service cannot be reached at all, every key is lost.
pub fn verify(bed: &TwoNodeBed, acked: &[Acked]) -> anyhow::Result<Vec<usize>> {
    let ns = bed.client().to_string();
    let addr = crate::ft::kv_addr(bed);
    let mut client = match connect(&ns, addr, Duration::from_secs(10)) {
        Ok(c) => c,
        Err(_) => return Ok(acked.iter().map(|a| a.n).collect()),
    };
    let mut lost = Vec::new();
    for (i, a) in acked.iter().enumerate() {
        let key = format!("k{}", a.n);
        let got = match client.get(&key) {
            Ok(v) => v,
            Err(_) => match connect(&ns, addr, Duration::from_secs(5)) {
                // One new connection, then the key is read again.
                Ok(c) => {
                    client = c;
                    client.get(&key).ok().flatten()
                }
                Err(_) => {
                    lost.extend(acked[i..].iter().map(|a| a.n));
                    return Ok(lost);
                }
            },
        };
        if got.as_deref() != Some(format!("v{}", a.n).as_str()) {
            lost.push(a.n);
        }
    }
    Ok(lost)
}
