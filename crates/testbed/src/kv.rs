//! A client of the test guest's `kv` service (line protocol: `SET k v` → `OK`, `GET k` →
//! `VALUE v` | `NOTFOUND`), with round-trip timing.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// One connection to the kv service.
pub struct KvClient {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl KvClient {
    /// Wraps a connected stream (e.g. made inside a network namespace).
    pub fn from_stream(stream: TcpStream, timeout: Duration) -> anyhow::Result<Self> {
        stream.set_read_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    /// Connects, retrying until `deadline` passes.
    pub fn connect(
        addr: SocketAddr,
        timeout: Duration,
        deadline: Duration,
    ) -> anyhow::Result<Self> {
        let t0 = Instant::now();
        loop {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(s) => return Self::from_stream(s, timeout),
                Err(e) if t0.elapsed() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e).with_context(|| format!("cannot connect to {addr}")),
            }
        }
    }

    /// The connection itself (e.g. to send without waiting for an answer).
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// Sends one line and returns the answer line (without the newline).
    pub fn ask(&mut self, line: &str) -> anyhow::Result<String> {
        self.stream.write_all(format!("{line}\n").as_bytes())?;
        let mut answer = String::new();
        let n = self.reader.read_line(&mut answer)?;
        if n == 0 {
            bail!("connection closed");
        }
        Ok(answer.trim_end().to_string())
    }

    /// `SET key value`; true when acknowledged with `OK`.
    pub fn set(&mut self, key: &str, value: &str) -> anyhow::Result<bool> {
        Ok(self.ask(&format!("SET {key} {value}"))? == "OK")
    }

    /// `GET key`: the value, or None.
    pub fn get(&mut self, key: &str) -> anyhow::Result<Option<String>> {
        let a = self.ask(&format!("GET {key}"))?;
        Ok(a.strip_prefix("VALUE ").map(str::to_string))
    }

    /// Round-trip times in µs of `n` GETs.
    pub fn rtt_us(&mut self, n: usize) -> anyhow::Result<Vec<f64>> {
        let mut v = Vec::with_capacity(n);
        for i in 0..n {
            let t0 = Instant::now();
            self.get(&format!("rtt{}", i % 16))?;
            v.push(t0.elapsed().as_secs_f64() * 1e6);
        }
        Ok(v)
    }
}
