//! A monitor (`ftvm vm run|restore`) running as a child process, its console in a file.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// A running monitor process. Killed (SIGKILL) on drop if still running.
pub struct Monitor {
    child: Child,
    /// The console file.
    pub console: PathBuf,
    /// The control socket, if any.
    pub api_sock: Option<PathBuf>,
}

impl Monitor {
    /// Starts `ftvm <args>`; the caller passes `--console file:<console>`.
    pub fn spawn(args: &[String], console: &Path, api_sock: Option<&Path>) -> anyhow::Result<Self> {
        let child = Command::new(crate::ftvm_bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", crate::ftvm_bin().display()))?;
        Ok(Self {
            child,
            console: console.to_path_buf(),
            api_sock: api_sock.map(Path::to_path_buf),
        })
    }

    /// Wraps an already started monitor process (e.g. one started inside a network namespace
    /// by [`crate::TwoNodeBed::spawn_monitor_in`]); give it a piped stderr for
    /// [`Monitor::stderr_text`].
    pub fn from_child(child: Child, console: &Path, api_sock: Option<&Path>) -> Self {
        Self {
            child,
            console: console.to_path_buf(),
            api_sock: api_sock.map(Path::to_path_buf),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The console output so far.
    pub fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until the console contains `needle`; fails (showing the console) after `timeout`
    /// or if the monitor exits first.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let t0 = Instant::now();
        loop {
            let text = self.console_text();
            if text.contains(needle) {
                return Ok(text);
            }
            if let Some(status) = self.child.try_wait()? {
                let err = self.stderr_text();
                bail!("monitor exited ({status}) before {needle:?} appeared; stderr: {err}; console:\n{text}");
            }
            if t0.elapsed() > timeout {
                bail!(
                    "{needle:?} did not appear on the console within {timeout:?}; console:\n{text}"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGKILL and reaps the process.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let t0 = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if t0.elapsed() > timeout {
                bail!("monitor did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Everything the monitor wrote to stderr (only once it has exited).
    pub fn stderr_text(&mut self) -> String {
        use std::io::Read;
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }

    /// Calls the control API.
    pub fn api(
        &self,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let sock = self
            .api_sock
            .as_deref()
            .context("this monitor has no API socket")?;
        Ok(api::request(sock, method, path, body)?)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill9();
        }
    }
}
