//! Building blocks for tests and benchmarks that drive real monitors: locating the binaries,
//! tap devices that clean up after themselves, monitor processes with their consoles, and the
//! two-node network-namespace test bed ([`TwoNodeBed`]).

pub mod bed;
pub mod capture;
pub mod cleanup;
pub mod faults;
pub mod ft;
pub mod kv;
pub mod monitor;
pub mod netns;
pub mod proxy;
pub mod tap;
pub mod timeline;

use std::path::PathBuf;

pub use monitor::Monitor;
pub use netns::TwoNodeBed;
pub use tap::TapDevice;

/// The directory holding the workspace's built binaries (`ftvm`, `testguest`).
pub fn bin_dir() -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of the `ftvm` binary (from Cargo when testing the cli crate, else next to the tests).
pub fn ftvm_bin() -> PathBuf {
    std::env::var_os("FTVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| bin_dir().join("ftvm"))
}

/// Path of the test guest ELF.
pub fn testguest_bin() -> PathBuf {
    bin_dir().join("testguest")
}

/// Owned strings from string slices (argument lists for `ftvm`).
pub fn args(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

/// The numbers of all complete `counter N` lines of a test-guest console, in order (a line
/// still being printed does not count).
pub fn counter_values(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().strip_prefix("counter "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// Whether this process may use KVM and create taps (root with /dev/kvm).
pub fn can_run_vms() -> bool {
    netns::is_root() && std::path::Path::new("/dev/kvm").exists()
}

/// Fails the calling test unless this process may run VMs (root with /dev/kvm).
///
/// A test never passes without doing its work: `scripts/test` leaves out the tests a host
/// cannot run and reports them as SKIPPED (a failure under `CI=true`); a test run by hand
/// without the capability fails here, saying what it needs.
pub fn require_vms() {
    require_root();
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm (a host with KVM); `sudo ./scripts/test` reports it as \
         SKIPPED on hosts without it"
    );
    assert!(
        testguest_bin().exists(),
        "the test guest is not built at {}: run `cargo build --workspace` first",
        testguest_bin().display()
    );
}

/// Fails the calling test unless it runs as root (network namespaces, taps).
pub fn require_root() {
    assert!(
        netns::is_root(),
        "this test needs root (KVM, taps, network namespaces): run it with `sudo ./scripts/test`"
    );
}

/// Fails the calling test unless `tool --version` runs; names the Debian package to install.
pub fn require_tool(tool: &str, package: &str) {
    let ok = std::process::Command::new(tool)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "this test needs `{tool}` (Debian package {package}); `sudo ./scripts/setup` installs it"
    );
}

/// A unique scratch directory under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Creates `/tmp/ftvm-test-<tag>-<pid>-<n>`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ftvm-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
