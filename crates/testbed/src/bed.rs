//! The two-node test bed: network namespaces for node A, node B and a client on one machine.
//!
//! ```text
//!   {p}node-a                        {p}node-b
//!   alink 10.99.0.1/24 <--veth--> alink 10.99.0.2/24            (the A-link)
//!   br0 [tap0, uplink]               br0 [tap0, uplink]
//!   br0 192.168.50.2/24              br0 192.168.50.3/24          (the nodes' management addresses)
//!              \                          /
//!             to-a        {p}client     to-b
//!                 lan 192.168.50.1/24 [to-a, to-b]               (the business LAN)
//! ```
//!
//! The guest, on whichever node runs it, uses `tap0` of that node with 192.168.50.10/24 and
//! MAC 52:54:00:f7:00:10. Bridges run without STP, forward at once, and learn MACs (a RARP
//! broadcast from the guest's MAC moves its FDB entry to the new node's port).
//!
//! All interfaces live inside the namespaces, so beds with different prefixes never collide.
//! Everything here needs root.

use std::fs::File;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context};

use crate::cleanup::{self, BedLock};
use crate::netns::{
    attach_tap, check_prefix, in_ns, ip, ip_in, kill_all_in, netns_exists, pids_in, remove_ns,
    require_root, signal, wait_oper_up,
};
use crate::Monitor;
/// Node A's address on the A-link.
pub const ALINK_IP_A: &str = "10.99.0.1";
/// Node B's address on the A-link.
pub const ALINK_IP_B: &str = "10.99.0.2";
/// The client's address on the business LAN.
pub const CLIENT_IP: &str = "192.168.50.1";
/// Node A's management address (on its LAN bridge; the FT watch path runs here).
pub const MGMT_IP_A: &str = "192.168.50.2";
/// Node B's management address.
pub const MGMT_IP_B: &str = "192.168.50.3";
/// The guest's address on the business LAN.
pub const GUEST_IP: &str = "192.168.50.10";
/// The guest's MAC address.
pub const GUEST_MAC: &str = "52:54:00:f7:00:10";
/// The tap device in each node namespace.
pub const TAP: &str = "tap0";
/// How long the bridges keep a learnt MAC without traffic from it.
pub const BRIDGE_AGEING_SECS: u32 = 10;

/// A link of the bed that fault injection can cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// The veth between node-a and node-b (both ends).
    ALink,
    /// Node A's uplink to the business LAN (`uplink` in node-a, `to-a` in the client).
    LanA,
    /// Node B's uplink to the business LAN (`uplink` in node-b, `to-b` in the client).
    LanB,
}

/// Three network namespaces wired as a two-node cluster plus a client (see the module docs).
///
/// Dropping it runs [`TwoNodeBed::down`] (also when a test panics), unless [`TwoNodeBed::keep`]
/// was called.
pub struct TwoNodeBed {
    prefix: String,
    node_a: String,
    node_b: String,
    client: String,
    keep: bool,
}

impl TwoNodeBed {
    /// The namespace names `[node-a, node-b, client]` for `prefix`.
    pub fn names(prefix: &str) -> [String; 3] {
        [
            format!("{prefix}node-a"),
            format!("{prefix}node-b"),
            format!("{prefix}client"),
        ]
    }

    /// Builds the bed with namespaces `{prefix}node-a`, `{prefix}node-b`, `{prefix}client`.
    /// Fails (touching nothing) if one of them exists already; anything half-built is removed
    /// on failure.
    pub fn up(prefix: &str) -> anyhow::Result<Self> {
        require_root("the two-node test bed")?;
        check_prefix(prefix)?;
        let [node_a, node_b, client] = Self::names(prefix);
        // Checking and creating the namespaces is one step for all processes on the machine.
        let lock = BedLock::take()?;
        for ns in [&node_a, &node_b, &client] {
            if netns_exists(ns) {
                let owner = match cleanup::live_owner(prefix) {
                    Some(pid) => format!(" (it belongs to running process {pid})"),
                    None => String::new(),
                };
                bail!(
                    "network namespace {ns} already exists{owner}: remove the old bed with \
                     `ftvm testbed down --prefix '{prefix}'` (or TwoNodeBed::cleanup_stale)"
                );
            }
        }
        // From here on, dropping `bed` removes whatever was built, and so does a terminating
        // signal.
        let bed = Self {
            prefix: prefix.to_string(),
            node_a,
            node_b,
            client,
            keep: false,
        };
        cleanup::register(prefix, &bed.namespaces());
        let created = cleanup::record_owner(prefix).and_then(|()| {
            bed.namespaces()
                .iter()
                .try_for_each(|ns| ip(&["netns", "add", ns]).map(drop))
        });
        // Released before anything can fail out of here: dropping `bed` removes what was made,
        // which takes the lock again.
        drop(lock);
        created?;
        bed.build().context("cannot build the two-node test bed")?;
        for ns in bed.namespaces() {
            if !netns_exists(ns) {
                bail!("network namespace {ns} vanished while the bed was built (removed by another process?)");
            }
        }
        Ok(bed)
    }

    fn build(&self) -> anyhow::Result<()> {
        let (a, b, c) = (&self.node_a[..], &self.node_b[..], &self.client[..]);
        let bridge_opts = |name: &'static str| -> Vec<String> {
            [
                "link",
                "add",
                name,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
                "mcast_snooping",
                "0",
                "ageing_time",
            ]
            .iter()
            .map(|s| s.to_string())
            .chain([(BRIDGE_AGEING_SECS * 100).to_string()]) // centiseconds
            .collect()
        };
        for ns in [a, b, c] {
            // No IPv6: keeps router solicitations, DAD and MLD frames off the bridges and taps.
            in_ns(ns, || {
                for conf in ["all", "default"] {
                    let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
                    if Path::new(&path).exists() {
                        let _ = std::fs::write(&path, "1");
                    }
                }
            })?;
            ip_in(ns, &["link", "set", "lo", "up"])?;
        }

        // The A-link, created directly inside the two namespaces.
        ip(&[
            "link", "add", "alink", "netns", a, "type", "veth", "peer", "name", "alink", "netns", b,
        ])?;
        for (ns, addr) in [(a, ALINK_IP_A), (b, ALINK_IP_B)] {
            ip_in(ns, &["addr", "add", &format!("{addr}/24"), "dev", "alink"])?;
            ip_in(ns, &["link", "set", "alink", "up"])?;
        }

        // The business LAN: the client's bridge...
        let args = bridge_opts("lan");
        ip_in(c, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
        ip_in(
            c,
            &["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "lan"],
        )?;
        ip_in(c, &["link", "set", "lan", "up"])?;
        // ...and on each node a bridge holding the guest's tap and the uplink to the client.
        for (ns, peer, mgmt) in [(a, "to-a", MGMT_IP_A), (b, "to-b", MGMT_IP_B)] {
            let args = bridge_opts("br0");
            ip_in(ns, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
            ip_in(ns, &["addr", "add", &format!("{mgmt}/24"), "dev", "br0"])?;
            ip_in(ns, &["tuntap", "add", "dev", TAP, "mode", "tap"])?;
            ip_in(
                ns,
                &[
                    "link", "add", "uplink", "type", "veth", "peer", "name", peer, "netns", c,
                ],
            )?;
            ip_in(ns, &["link", "set", TAP, "master", "br0"])?;
            ip_in(ns, &["link", "set", "uplink", "master", "br0"])?;
            ip_in(c, &["link", "set", peer, "master", "lan"])?;
            for dev in ["br0", TAP, "uplink"] {
                ip_in(ns, &["link", "set", dev, "up"])?;
            }
            ip_in(c, &["link", "set", peer, "up"])?;
        }
        let mut wired: Vec<(&str, &str)> = vec![(c, "lan"), (c, "to-a"), (c, "to-b")];
        for ns in [a, b] {
            wired.extend([(ns, "alink"), (ns, "br0"), (ns, "uplink")]);
        }
        wait_oper_up(&wired)
    }

    /// Removes the namespaces of a bed with `prefix` left behind by an earlier run (killing
    /// their processes); returns the names removed.
    pub fn cleanup_stale(prefix: &str) -> anyhow::Result<Vec<String>> {
        require_root("removing the test bed")?;
        check_prefix(prefix)?;
        if let Some(pid) = cleanup::live_owner(prefix) {
            if !Self::existing(prefix).is_empty() {
                bail!(
                    "the test bed {prefix}* belongs to running process {pid}, which removes it when \
                     it ends; stop that process (kill {pid}) instead of removing its bed"
                );
            }
        }
        let mut removed = Vec::new();
        for ns in Self::names(prefix) {
            if netns_exists(&ns) {
                remove_ns(&ns)?;
                removed.push(ns);
            }
        }
        cleanup::clear_owner(prefix);
        Ok(removed)
    }

    /// Which of the namespaces for `prefix` exist.
    pub fn existing(prefix: &str) -> Vec<String> {
        Self::names(prefix)
            .into_iter()
            .filter(|ns| netns_exists(ns))
            .collect()
    }

    /// Kills every process in the namespaces (SIGKILL) and deletes the namespaces with their
    /// interfaces. Idempotent.
    pub fn down(&self) -> anyhow::Result<()> {
        let mut first_err = None;
        for ns in [&self.node_a, &self.node_b, &self.client] {
            if let Err(e) = remove_ns(ns) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            Some(e) => Err(e.context("cannot remove the test bed completely")),
            None => {
                cleanup::unregister(&self.prefix);
                cleanup::clear_owner(&self.prefix);
                Ok(())
            }
        }
    }

    /// Leaves the bed in place when this value is dropped (for `ftvm testbed up`); from then on
    /// it belongs to nobody, and `cleanup_stale` (`ftvm testbed down`) removes it.
    pub fn keep(mut self) {
        self.keep = true;
        cleanup::unregister(&self.prefix);
        cleanup::clear_owner(&self.prefix);
    }

    /// The prefix of the namespace names.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Node A's namespace.
    pub fn node_a(&self) -> &str {
        &self.node_a
    }

    /// Node B's namespace.
    pub fn node_b(&self) -> &str {
        &self.node_b
    }

    /// The client's namespace.
    pub fn client(&self) -> &str {
        &self.client
    }

    /// The three namespaces: node-a, node-b, client.
    pub fn namespaces(&self) -> [&str; 3] {
        [&self.node_a, &self.node_b, &self.client]
    }

    /// Node A's A-link address.
    pub fn alink_ip_a(&self) -> &'static str {
        ALINK_IP_A
    }

    /// Node B's A-link address.
    pub fn alink_ip_b(&self) -> &'static str {
        ALINK_IP_B
    }

    /// Node A's management address (its LAN bridge).
    pub fn mgmt_ip_a(&self) -> &'static str {
        MGMT_IP_A
    }

    /// Node B's management address (its LAN bridge).
    pub fn mgmt_ip_b(&self) -> &'static str {
        MGMT_IP_B
    }

    /// The guest's tap device, same name on both nodes.
    pub fn tap_name(&self) -> &'static str {
        TAP
    }

    /// The client's address on the business LAN.
    pub fn client_ip(&self) -> &'static str {
        CLIENT_IP
    }

    /// The guest's address on the business LAN.
    pub fn guest_ip(&self) -> &'static str {
        GUEST_IP
    }

    /// The guest's address with prefix length.
    pub fn guest_cidr(&self) -> String {
        format!("{GUEST_IP}/24")
    }

    /// The guest's MAC address.
    pub fn guest_mac(&self) -> &'static str {
        GUEST_MAC
    }

    /// The monitor option for the guest's NIC on either node: `tap=tap0,mac=...`.
    pub fn net_arg(&self) -> String {
        format!("tap={TAP},mac={GUEST_MAC}")
    }

    /// The guest command-line option giving the test guest its address.
    pub fn guest_cmdline(&self) -> String {
        format!("ftvm.ip={GUEST_IP}/24")
    }

    /// Human-readable description of what the bed consists of.
    pub fn describe(&self) -> String {
        let (a, b, c) = (&self.node_a, &self.node_b, &self.client);
        format!(
            "namespaces: {a} {b} {c}\n\
             A-link:     {a}/alink {ALINK_IP_A}/24 <-> {b}/alink {ALINK_IP_B}/24\n\
             LAN:        {c}/lan {CLIENT_IP}/24, ports to-a, to-b\n\
             node A:     {a}/br0 {MGMT_IP_A}/24 = [{TAP}, uplink <-> {c}/to-a]\n\
             node B:     {b}/br0 {MGMT_IP_B}/24 = [{TAP}, uplink <-> {c}/to-b]\n\
             guest:      {GUEST_IP}/24, MAC {GUEST_MAC}, on {TAP} of the node running it\n\
             run:        ip netns exec {a} ftvm vm run ... --net {}",
            self.net_arg()
        )
    }

    /// What exists of the bed with `prefix`: each namespace's interfaces and addresses.
    pub fn status(prefix: &str) -> anyhow::Result<String> {
        require_root("looking at the test bed")?;
        check_prefix(prefix)?;
        let mut out = String::new();
        for ns in Self::names(prefix) {
            if !netns_exists(&ns) {
                out.push_str(&format!("{ns}: absent\n"));
                continue;
            }
            let pids = pids_in(&ns)?;
            out.push_str(&format!("{ns}: {} process(es)\n", pids.len()));
            for line in ip_in(&ns, &["-br", "addr"])?.lines() {
                out.push_str(&format!("  {line}\n"));
            }
        }
        Ok(out)
    }

    fn check_ns(&self, ns: &str) -> anyhow::Result<()> {
        if !self.namespaces().contains(&ns) {
            bail!(
                "{ns:?} is not a namespace of this test bed (use {}, {} or {})",
                self.node_a,
                self.node_b,
                self.client
            );
        }
        Ok(())
    }

    /// A `Command` running `program` inside `ns` (`ip netns exec ns program`), stdin null.
    /// Add arguments and stdout/stderr settings, then spawn it. The child's pid is the
    /// program's own (`ip` execs it). It also gets its own mount namespace with the
    /// namespace's `/sys`.
    pub fn command_in(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns])
            .arg(program)
            .stdin(Stdio::null());
        cmd
    }

    /// Starts `program args...` inside `ns`: stdin and stdout null, stderr inherited.
    pub fn spawn_in(&self, ns: &str, program: &Path, args: &[String]) -> std::io::Result<Child> {
        self.check_ns(ns)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{e:#}")))?;
        self.command_in(ns, program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
    }

    /// Runs `program args...` inside `ns` to completion and returns its stdout; fails with its
    /// stderr if it exits unsuccessfully.
    pub fn run_in(&self, ns: &str, program: &str, args: &[&str]) -> anyhow::Result<String> {
        self.check_ns(ns)?;
        let out = self
            .command_in(ns, program)
            .args(args)
            .output()
            .with_context(|| format!("cannot run {program} in {ns}"))?;
        if !out.status.success() {
            bail!(
                "{program} {} in {ns}: {} {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `ftvm <args>` inside `ns` as a [`Monitor`] (the caller passes
    /// `--console file:<console>` and the API socket option).
    pub fn spawn_monitor_in(
        &self,
        ns: &str,
        args: &[String],
        console: &Path,
        api_sock: Option<&Path>,
    ) -> anyhow::Result<Monitor> {
        self.check_ns(ns)?;
        let child = self
            .command_in(ns, crate::ftvm_bin())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {} in {ns}", crate::ftvm_bin().display()))?;
        Ok(Monitor::from_child(child, console, api_sock))
    }

    /// Runs `f` on a fresh thread inside `ns`; see [`in_ns`]. Sockets made in `f` stay in `ns`.
    pub fn in_ns<T: Send>(&self, ns: &str, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
        self.check_ns(ns)?;
        in_ns(ns, f)
    }

    /// Processes (other than this one) in `ns`.
    pub fn pids(&self, ns: &str) -> anyhow::Result<Vec<u32>> {
        self.check_ns(ns)?;
        pids_in(ns)
    }

    /// SIGKILLs every process in `ns` (never this test process, even if some of its threads
    /// are inside) and waits until none is left; returns how many were killed. Reaping
    /// children stays with their owners.
    pub fn kill_node(&self, ns: &str) -> anyhow::Result<usize> {
        self.check_ns(ns)?;
        kill_all_in(ns)
    }

    fn link_ends(&self, link: Link) -> [(&str, &'static str); 2] {
        match link {
            Link::ALink => [(&self.node_a, "alink"), (&self.node_b, "alink")],
            Link::LanA => [(&self.node_a, "uplink"), (&self.client, "to-a")],
            Link::LanB => [(&self.node_b, "uplink"), (&self.client, "to-b")],
        }
    }

    /// Takes both ends of `link` down (like pulling the cable).
    pub fn link_down(&self, link: Link) -> anyhow::Result<()> {
        for (ns, dev) in self.link_ends(link) {
            ip_in(ns, &["link", "set", dev, "down"])?;
        }
        Ok(())
    }

    /// Brings both ends of `link` up again and waits until they carry traffic (the kernel
    /// notices the carrier within about a second).
    pub fn link_up(&self, link: Link) -> anyhow::Result<()> {
        let ends = self.link_ends(link);
        for (ns, dev) in ends {
            ip_in(ns, &["link", "set", dev, "up"])?;
        }
        wait_oper_up(&ends)
    }

    /// Stops process `pid` (SIGSTOP).
    pub fn freeze(&self, pid: u32) -> anyhow::Result<()> {
        signal(pid, libc::SIGSTOP)
    }

    /// Continues process `pid` (SIGCONT).
    pub fn thaw(&self, pid: u32) -> anyhow::Result<()> {
        signal(pid, libc::SIGCONT)
    }

    /// Stops every process in `ns`; returns their pids (for [`TwoNodeBed::thaw_all`]).
    pub fn freeze_node(&self, ns: &str) -> anyhow::Result<Vec<u32>> {
        let pids = self.pids(ns)?;
        for &pid in &pids {
            let _ = self.freeze(pid);
        }
        Ok(pids)
    }

    /// Continues the given processes.
    pub fn thaw_all(&self, pids: &[u32]) {
        for &pid in pids {
            let _ = self.thaw(pid);
        }
    }

    /// Attaches to the tap device `tap` of node namespace `ns` from this process, as a guest's
    /// monitor would (no packet information: each write or read is one Ethernet frame; reads
    /// are non-blocking and fail with `WouldBlock` when no frame waits). The bridge port
    /// forwards only once the kernel has noticed the carrier, which can take up to ~1 s.
    pub fn open_tap(&self, ns: &str, tap: &str) -> anyhow::Result<File> {
        self.check_ns(ns)?;
        self.in_ns(ns, || attach_tap(tap))?
            .with_context(|| format!("cannot attach to tap {tap} in {ns} (is a monitor using it?)"))
    }

    /// The client bridge port (`to-a` or `to-b`) behind which the `lan` bridge has learnt
    /// `mac`, if any.
    pub fn lan_port_of(&self, mac: &str) -> anyhow::Result<Option<String>> {
        let mac = mac.to_ascii_lowercase();
        let out = Command::new("bridge")
            .args(["-n", &self.client, "fdb", "show", "br", "lan"])
            .stdin(Stdio::null())
            .output()
            .context("cannot run `bridge`: install iproute2")?;
        if !out.status.success() {
            bail!(
                "bridge fdb show in {}: {}",
                self.client,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Lines look like "52:54:00:f7:00:10 dev to-b master lan".
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if words.first() == Some(&mac.as_str()) && words.contains(&"master") {
                if let Some(i) = words.iter().position(|w| *w == "dev") {
                    if let Some(dev) = words.get(i + 1) {
                        return Ok(Some(dev.to_string()));
                    }
                }
            }
        }
        Ok(None)
    }
}

impl Drop for TwoNodeBed {
    fn drop(&mut self) {
        if !self.keep {
            if let Err(e) = self.down() {
                eprintln!("testbed: {e:#}");
            }
        }
    }
}
