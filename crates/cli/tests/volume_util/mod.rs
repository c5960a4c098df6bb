//! Helpers for the `ftvm volume` process tests.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

/// The cluster secret every `ftvm` these tests start shares (through FTVM_FT_SECRET).
pub const SECRET: &str = "volume-tests-cluster-secret";

pub fn ftvm() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftvm"));
    c.env("FTVM_LOG", "warn");
    c.env("FTVM_FT_SECRET", SECRET);
    c
}

/// Runs `ftvm args...` with FTVM_FT_SECRET set to `secret` (or unset); returns (exit code,
/// stdout, stderr).
pub fn run_with_secret(args: &[&str], secret: Option<&str>) -> (i32, String, String) {
    let mut c = ftvm();
    match secret {
        Some(s) => c.env("FTVM_FT_SECRET", s),
        None => c.env_remove("FTVM_FT_SECRET"),
    };
    let o: Output = c.args(args).output().expect("run ftvm");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs `ftvm args...`; returns (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let o: Output = ftvm().args(args).output().expect("run ftvm");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Runs and asserts success; returns stdout.
pub fn ok(args: &[&str]) -> String {
    let (c, out, err) = run(args);
    assert_eq!(c, 0, "ftvm {args:?} failed:\nstdout: {out}\nstderr: {err}");
    out
}

/// Runs and asserts failure; returns stderr.
pub fn fails(args: &[&str]) -> String {
    let (c, out, err) = run(args);
    assert_ne!(c, 0, "ftvm {args:?} should fail:\nstdout: {out}");
    err
}

/// A child whose stdout lines arrive on a channel.
pub struct Proc {
    pub child: Child,
    pub lines: Receiver<String>,
    pub seen: Vec<String>,
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        let mut child = ftvm()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ftvm");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a stdout line matching `f`.
    pub fn wait_line(&mut self, what: &str, timeout: Duration, f: impl Fn(&str) -> bool) -> String {
        let t0 = Instant::now();
        loop {
            let left = timeout.saturating_sub(t0.elapsed());
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if f(&l) {
                        return l;
                    }
                }
                Err(_) => panic!(
                    "timed out waiting for {what}; output so far: {:?}",
                    self.seen
                ),
            }
        }
    }

    pub fn kill9(&mut self) {
        // SAFETY: kill(2) with the pid of our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> i32 {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                while let Ok(l) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push(l);
                }
                return s.code().unwrap_or(-1);
            }
            if t0.elapsed() > timeout {
                self.kill9();
                panic!("process did not exit in time; output: {:?}", self.seen);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}

/// A TCP port free right now on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn qemu_img(args: &[&str]) -> (i32, String) {
    let o = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img (apt-get install qemu-utils)");
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr),
    )
}

pub fn p(path: &Path) -> &str {
    path.to_str().unwrap()
}
