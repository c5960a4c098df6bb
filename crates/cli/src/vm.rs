//! `ftvm vm` subcommands: run and restore a VM in this process, and control a running one
//! through its API socket.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use replication::arbiter::Arbiter;
use replication::watch::WatchPath;
use serde_json::{json, Value};
use vmm::config::{default_mac, parse_mac};
use vmm::snapshot::{self, SnapshotFile};
use vmm::{ConsoleConfig, DiskConfig, ExitReason, NetConfig, Vm, VmConfig};

/// `ftvm vm` subcommands.
#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a VM and run it until it powers off.
    Run(Box<RunArgs>),
    /// Resume a VM from a snapshot file in this new process.
    Restore(RestoreArgs),
    /// Show a running VM's status.
    Status(SockArgs),
    /// Pause a running VM.
    Pause(SockArgs),
    /// Resume a paused VM.
    Resume(SockArgs),
    /// Write a running VM's complete state to a file.
    Snapshot {
        #[command(flatten)]
        sock: SockArgs,
        /// The snapshot file to write.
        #[arg(long)]
        file: PathBuf,
    },
    /// Stop a running VM.
    Shutdown(SockArgs),
    /// Stand by as the FT backup of a VM whose primary runs `vm run --ft-peer`.
    Backup(Box<BackupArgs>),
}

/// FT options of `vm run` (the primary side).
#[derive(Args, Clone)]
pub struct FtArgs {
    /// Protect the VM with FT: the backup's A-link address (it runs `ftvm vm backup --listen`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub ft_peer: Option<std::net::SocketAddr>,
    /// File holding the cluster secret that authenticates and encrypts the A-link and disk
    /// mirroring (or set FTVM_FT_SECRET).
    #[arg(long, value_name = "PATH", visible_alias = "secret-file")]
    pub ft_secret_file: Option<PathBuf>,
    /// Shortest checkpoint interval, ms.
    #[arg(long, default_value_t = 2)]
    pub ft_min_interval_ms: u64,
    /// Longest checkpoint interval, ms.
    #[arg(long, default_value_t = 20)]
    pub ft_max_interval_ms: u64,
    /// A-link silence after which the peer is declared lost, ms.
    #[arg(long, default_value_t = 100)]
    pub ft_timeout_ms: u64,
    /// Skip copying the disks at the start of protection: the backup's volumes are known to be
    /// identical to the primary's.
    #[arg(long)]
    pub ft_assume_disks_synced: bool,
    /// Send every dirty page whole (no delta against the copy the backup holds): for
    /// measurements.
    #[arg(long)]
    pub ft_no_delta: bool,
    #[command(flatten)]
    pub watch: WatchArgs,
    /// How long the A-link may stay without a session before the backup is asked (watch path)
    /// to release its standby so this node may release held output, ms.
    #[arg(long, default_value_t = 1000)]
    pub ft_release_after_ms: u64,
}

/// The watch path (the two-node arbiter), on both `vm run` and `vm backup`.
#[derive(Args, Clone)]
pub struct WatchArgs {
    /// The peer monitor's watch address (management network, UDP). Without it there is no
    /// arbiter: the backup never takes over by itself and the primary never degrades.
    #[arg(long, value_name = "PEER_ADDR:PORT")]
    pub ft_watch: Option<std::net::SocketAddr>,
    /// This node's watch address (default: any address, the peer's port).
    #[arg(long, value_name = "ADDR:PORT", requires = "ft_watch")]
    pub ft_watch_bind: Option<std::net::SocketAddr>,
    /// The VM's identity on the watch path (the same on both nodes).
    #[arg(long, default_value = "vm")]
    pub ft_vm_id: String,
}

/// A watch path (if configured) and the arbiter deciding from it.
type WatchAndArbiter = (Option<Arc<WatchPath>>, Arc<dyn Arbiter>);

impl WatchArgs {
    /// Starts the watch path and its arbiter (or none, with a warning).
    fn start(
        &self,
        secret: &[u8],
        primary: bool,
        dead: Duration,
    ) -> anyhow::Result<WatchAndArbiter> {
        let Some(peer) = self.ft_watch else {
            eprintln!(
                "ftvm: warning: no --ft-watch: there is no arbiter; the backup never takes over \
                 by itself and the primary holds its output while the backup is away"
            );
            return Ok((None, Arc::new(replication::arbiter::NoArbiter)));
        };
        let bind = self
            .ft_watch_bind
            .unwrap_or_else(|| std::net::SocketAddr::from(([0, 0, 0, 0], peer.port())));
        let w = replication::watch::WatchPath::start(
            &self.ft_vm_id,
            bind,
            peer,
            secret,
            primary,
            dead,
        )?;
        let a = Arc::new(replication::arbiter::TwoNodeArbiter::new(w.clone(), dead));
        Ok((Some(w), a))
    }
}

/// Options of `ftvm vm backup`.
#[derive(Args)]
pub struct BackupArgs {
    /// A-link address to listen on.
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: std::net::SocketAddr,
    /// This node's copies of the VM's disks, in the primary's order: PATH[,readonly].
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// This node's taps, in the primary's order: tap=NAME (the guest keeps its MACs).
    #[arg(long = "net")]
    pub nets: Vec<String>,
    /// Console of the guest once it runs here: stdio, file:PATH or null.
    #[arg(long, default_value = "stdio")]
    pub console: String,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// File holding the cluster secret (or set FTVM_FT_SECRET); also for mirrored disks.
    #[arg(long, value_name = "PATH", visible_alias = "secret-file")]
    pub ft_secret_file: Option<PathBuf>,
    /// A-link silence after which the primary is declared lost, ms.
    #[arg(long, default_value_t = 100)]
    pub ft_timeout_ms: u64,
    /// After a failover, protect the guest again with a backup at this A-link address (for
    /// instance the repaired former primary running `ftvm vm backup --listen`).
    #[arg(long, value_name = "ADDR:PORT")]
    pub reprotect_to: Option<std::net::SocketAddr>,
    /// The new backup's watch address after a failover (with --reprotect-to).
    #[arg(long, value_name = "ADDR:PORT", requires = "reprotect_to")]
    pub reprotect_watch: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub watch: WatchArgs,
}

/// The control socket of a running VM.
#[derive(Args)]
pub struct SockArgs {
    /// The VM's control API socket (given to `vm run --api-sock`).
    #[arg(long)]
    pub api_sock: PathBuf,
}

/// Options of `ftvm vm run`.
#[derive(Args)]
pub struct RunArgs {
    /// A built guest image (`ftvm image build --name NAME`), or `testguest` for ftvm's test guest.
    #[arg(long, conflicts_with = "kernel")]
    pub image: Option<String>,
    /// Kernel: a bzImage or an ELF.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk.
    #[arg(long, requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (added after ftvm's defaults); the test guest's job follows ` -- `.
    #[arg(long, default_value = "", allow_hyphen_values = true)]
    pub cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u8,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 512)]
    pub mem: u64,
    /// CPU model the guest sees: x86-64, x86-64-v2, x86-64-v3 or host. Default: x86-64-v2,
    /// or x86-64 on a host whose KVM cannot offer v2.
    #[arg(long)]
    pub cpu: Option<vmm::cpu_model::CpuModelName>,
    /// A disk: PATH[,format=raw|qcow2][,readonly][,mirror=ADDR:PORT] (format: without it a
    /// pool volume's metadata decides, else raw, and a file that looks like qcow2 is refused;
    /// mirror: synchronous copy to `ftvm volume mirror-serve` on the peer). Repeat for more.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// A network interface: tap=NAME[,mac=MAC]. Repeat for more.
    #[arg(long = "net")]
    pub nets: Vec<String>,
    /// Run this shell command in the guest (image guests), then power off with its status.
    #[arg(long)]
    pub exec: Option<String>,
    /// Console: stdio, file:PATH or null.
    #[arg(long, default_value = "stdio")]
    pub console: String,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    #[command(flatten)]
    pub ft: FtArgs,
}

/// Options of `ftvm vm restore`.
#[derive(Args)]
pub struct RestoreArgs {
    /// The snapshot file.
    #[arg(long)]
    pub snapshot: PathBuf,
    /// Network interfaces replacing the snapshot's taps, in order: tap=NAME[,mac=MAC].
    #[arg(long = "net")]
    pub nets: Vec<String>,
    /// Console: stdio, file:PATH or null.
    #[arg(long, default_value = "stdio")]
    pub console: String,
    /// Serve the control API on this Unix socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Stay paused after restoring (resume through the API).
    #[arg(long)]
    pub paused: bool,
}

/// Runs one `ftvm vm` subcommand; returns the process exit status.
pub fn run(cmd: VmCommand) -> anyhow::Result<i32> {
    match cmd {
        VmCommand::Run(args) => run_vm(*args),
        VmCommand::Restore(args) => restore_vm(args),
        VmCommand::Backup(args) => backup_vm(*args),
        VmCommand::Status(s) => print_answer(api::request(&s.api_sock, "GET", "/status", None)?),
        VmCommand::Pause(s) => print_answer(api::request(&s.api_sock, "POST", "/pause", None)?),
        VmCommand::Resume(s) => print_answer(api::request(&s.api_sock, "POST", "/resume", None)?),
        VmCommand::Shutdown(s) => {
            print_answer(api::request(&s.api_sock, "POST", "/shutdown", None)?)
        }
        VmCommand::Snapshot { sock, file } => {
            let file = absolute(&file)?;
            print_answer(api::request(
                &sock.api_sock,
                "POST",
                "/snapshot",
                Some(json!({ "path": file })),
            )?)
        }
    }
}

fn print_answer(v: Value) -> anyhow::Result<i32> {
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

fn absolute(p: &Path) -> anyhow::Result<PathBuf> {
    if p.is_absolute() {
        Ok(p.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .context("cannot read the current directory")?
            .join(p))
    }
}

/// The test guest binary shipped next to `ftvm`.
pub fn testguest_path() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the ftvm executable")?;
    let dir = exe
        .parent()
        .context("the ftvm executable has no directory")?;
    for candidate in [dir.join("testguest"), dir.join("../testguest")] {
        if candidate.exists() {
            return Ok(candidate);
        }
    }
    bail!(
        "the test guest is not built next to {}; run `cargo build --workspace`",
        exe.display()
    )
}

fn parse_console(s: &str) -> anyhow::Result<ConsoleConfig> {
    Ok(match s {
        "stdio" => ConsoleConfig::Stdio,
        "null" => ConsoleConfig::Null,
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => ConsoleConfig::File(PathBuf::from(p)),
            _ => bail!("invalid --console {s:?}: use stdio, null or file:PATH"),
        },
    })
}

fn parse_disk(s: &str) -> anyhow::Result<DiskConfig> {
    let mut parts = s.split(',');
    let path = parts
        .next()
        .filter(|p| !p.is_empty())
        .context("--disk needs a path: --disk PATH[,readonly]")?;
    let mut read_only = false;
    let mut mirror = None;
    let mut format = None;
    for opt in parts {
        match opt.split_once('=') {
            None if opt == "readonly" || opt == "ro" => read_only = true,
            Some(("mirror", peer)) if !peer.is_empty() => mirror = Some(peer.to_string()),
            Some(("format", f)) => {
                format = Some(f.parse().map_err(|e| anyhow::anyhow!("--disk {path}: {e}"))?)
            }
            _ => bail!(
                "unknown --disk option {opt:?}: use --disk PATH[,format=raw|qcow2][,readonly][,mirror=ADDR:PORT]"
            ),
        }
    }
    Ok(DiskConfig {
        path: PathBuf::from(path),
        read_only,
        format,
        mirror,
        secret: None,
    })
}

/// Gives every mirrored disk the cluster secret (`file` or FTVM_FT_SECRET); loads it only when
/// a disk is mirrored.
fn attach_secrets(disks: &mut [DiskConfig], file: Option<&Path>) -> anyhow::Result<()> {
    if disks.iter().any(|d| d.mirror.is_some()) {
        let secret = storage::mirror::Secret::load(file, "--secret-file")
            .context("a disk is mirrored (--disk PATH,mirror=ADDR:PORT)")?;
        for d in disks.iter_mut().filter(|d| d.mirror.is_some()) {
            d.secret = Some(secret.clone());
        }
    }
    Ok(())
}

fn parse_net(s: &str) -> anyhow::Result<NetConfig> {
    let mut tap = None;
    let mut mac = None;
    for opt in s.split(',') {
        match opt.split_once('=') {
            Some(("tap", v)) if !v.is_empty() => tap = Some(v.to_string()),
            Some(("mac", v)) => mac = Some(parse_mac(v)?),
            _ => bail!("invalid --net option {opt:?}: use --net tap=NAME[,mac=52:54:00:12:34:56]"),
        }
    }
    let tap = tap.context("--net needs tap=NAME")?;
    let mac = mac.unwrap_or_else(|| default_mac(&tap));
    Ok(NetConfig { tap, mac })
}

/// Standard base64 (RFC 4648, with padding).
fn base64(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}

fn build_config(args: &RunArgs) -> anyhow::Result<VmConfig> {
    let (kernel, initrd, base_cmdline) = match (&args.image, &args.kernel) {
        (Some(name), _) if name == "testguest" => (testguest_path()?, None, String::new()),
        (Some(name), _) => {
            let (kernel, initrd) = image_files(name)?;
            (kernel, Some(initrd), default_linux_cmdline())
        }
        (None, Some(k)) => {
            let linux = !vmm::boot::is_elf(k)?;
            (
                k.clone(),
                args.initrd.clone(),
                if linux {
                    default_linux_cmdline()
                } else {
                    String::new()
                },
            )
        }
        (None, None) => {
            bail!("give a guest: --image NAME (e.g. --image testguest) or --kernel PATH")
        }
    };
    let mut cmdline = base_cmdline;
    if !args.cmdline.is_empty() {
        if !cmdline.is_empty() {
            cmdline.push(' ');
        }
        cmdline.push_str(&args.cmdline);
    }
    if let Some(exec) = &args.exec {
        // Before any " -- " so the kernel, not init, parses it.
        let arg = format!("ftvm.exec={}", base64(exec.as_bytes()));
        cmdline = match cmdline.split_once(" -- ") {
            Some((k, init)) => format!("{k} {arg} -- {init}"),
            None => format!("{cmdline} {arg}").trim().to_string(),
        };
    }
    let mut disks: Vec<DiskConfig> = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<_>>()?;
    attach_secrets(&mut disks, args.ft.ft_secret_file.as_deref())?;
    Ok(VmConfig {
        kernel,
        initrd,
        cmdline,
        vcpus: args.vcpus,
        mem_mib: args.mem,
        cpu: args.cpu,
        disks,
        nets: args
            .nets
            .iter()
            .map(|n| parse_net(n))
            .collect::<anyhow::Result<_>>()?,
        console: parse_console(&args.console)?,
    })
}

/// Kernel and initrd of the image `name`, built first if needed.
fn image_files(name: &str) -> anyhow::Result<(PathBuf, PathBuf)> {
    let paths = images::ensure_image(name, true)?;
    Ok((paths.kernel, paths.initrd))
}

/// The command line every Linux guest gets.
fn default_linux_cmdline() -> String {
    "console=ttyS0 earlyprintk=serial,ttyS0 reboot=acpi panic=-1".to_string()
}

/// The control API's view of a VM (and of its FT engine, if protected).
struct VmControl {
    vm: Arc<Vm>,
    ft: Option<Arc<replication::FtStatus>>,
    watch: Option<Arc<replication::watch::WatchPath>>,
    /// Whether an operator's pause is in force (only that one may be resumed through the API).
    operator_paused: std::sync::Mutex<bool>,
}

impl VmControl {
    fn new(vm: Arc<Vm>, ft: Option<FtRun>, paused: bool) -> Self {
        let (ft, watch) = match ft {
            Some(f) => (Some(f.status), f.watch),
            None => (None, None),
        };
        Self {
            vm,
            ft,
            watch,
            operator_paused: std::sync::Mutex::new(paused),
        }
    }
}

impl api::Control for VmControl {
    fn status(&self) -> Value {
        let mut v = serde_json::to_value(self.vm.status())
            .unwrap_or_else(|e| json!({ "error": e.to_string() }));
        if let (Some(ft), Some(obj)) = (&self.ft, v.as_object_mut()) {
            obj.insert("ft".into(), ft_json(ft, self.watch.as_deref()));
        }
        v
    }

    fn pause(&self) -> Result<Value, String> {
        let mut paused = self
            .operator_paused
            .lock()
            .map_err(|_| "control state poisoned")?;
        if *paused {
            return Ok(json!({ "paused": true, "pause_us": 0 }));
        }
        let d = self.vm.pause().map_err(|e| e.to_string())?;
        *paused = true;
        Ok(json!({ "paused": true, "pause_us": d.as_micros() as u64 }))
    }

    fn resume(&self) -> Result<Value, String> {
        let mut paused = self
            .operator_paused
            .lock()
            .map_err(|_| "control state poisoned")?;
        if *paused {
            self.vm.resume().map_err(|e| e.to_string())?;
            *paused = false;
        }
        Ok(json!({ "paused": false }))
    }

    fn snapshot(&self, path: &Path) -> Result<Value, String> {
        let info = snapshot::write_snapshot(&self.vm, path).map_err(|e| e.to_string())?;
        serde_json::to_value(info).map_err(|e| e.to_string())
    }

    fn shutdown(&self) -> Result<Value, String> {
        self.vm.request_shutdown();
        Ok(json!({ "shutdown": true }))
    }

    fn memory_checksum(&self) -> Result<Value, String> {
        if !self.vm.is_paused() {
            return Err("pause the VM first: the checksum of running memory is meaningless".into());
        }
        let crc = snapshot::memory_checksum(self.vm.memory()).map_err(|e| e.to_string())?;
        Ok(json!({ "crc32": crc }))
    }
}

/// Reads the cluster secret from `file` or FTVM_FT_SECRET.
fn read_secret(file: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    let s = storage::mirror::Secret::load(file, "--ft-secret-file").context("FT protection")?;
    Ok(s.as_bytes().to_vec())
}

/// The FT status as JSON, with the watch path's view.
fn ft_json(ft: &replication::FtStatus, watch: Option<&replication::watch::WatchPath>) -> Value {
    let mut v = serde_json::to_value(ft.get()).unwrap_or_default();
    if let Some(obj) = v.as_object_mut() {
        obj.insert(
            "watch".into(),
            watch
                .map(|w| serde_json::to_value(w.status()).unwrap_or_default())
                .unwrap_or(Value::Null),
        );
    }
    v
}

/// What `supervise` needs of a protected VM.
struct FtRun {
    status: Arc<replication::FtStatus>,
    watch: Option<Arc<replication::watch::WatchPath>>,
    /// The engine thread: waited for (bounded) when the guest ends, so the backup is told.
    engine: Option<std::thread::JoinHandle<()>>,
}

/// Exit status of a copy stopped because its peer is live.
const EXIT_FENCED: i32 = 3;

fn run_vm(args: RunArgs) -> anyhow::Result<i32> {
    let config = build_config(&args)?;
    let ft = match args.ft.ft_peer {
        Some(peer) => {
            let secret = read_secret(args.ft.ft_secret_file.as_deref())?;
            let mut o = replication::FtOptions::new(peer, secret.clone());
            o.min_interval = Duration::from_millis(args.ft.ft_min_interval_ms.max(1));
            o.max_interval =
                Duration::from_millis(args.ft.ft_max_interval_ms.max(args.ft.ft_min_interval_ms));
            o.timeout = Duration::from_millis(args.ft.ft_timeout_ms.max(10));
            o.release_after = Duration::from_millis(args.ft.ft_release_after_ms.max(10));
            o.sync_disks = !args.ft.ft_assume_disks_synced;
            o.delta = !args.ft.ft_no_delta;
            o.vm_id = args.ft.watch.ft_vm_id.clone();
            // One watch path for the process: protection follows reboots.
            (o.watch, o.arbiter) = args.ft.watch.start(&secret, true, o.timeout)?;
            Some(o)
        }
        None => None,
    };
    loop {
        let vm = Arc::new(Vm::create(config.clone())?);
        let run = match &ft {
            Some(opts) => {
                let status = Arc::new(replication::FtStatus::new("primary"));
                let engine = replication::start_primary(vm.clone(), opts.clone(), status.clone())
                    .context("cannot start the FT engine")?;
                Some(FtRun {
                    status,
                    watch: opts.watch.clone(),
                    engine: Some(engine),
                })
            }
            None => None,
        };
        match supervise(vm, args.api_sock.as_deref(), false, run)? {
            Some(code) => return Ok(code),
            None if ft.is_some() => tracing::info!("the FT guest rebooted; protecting it again"),
            None => tracing::info!("guest rebooted"),
        }
    }
}

/// The control API of a backup that has no running VM yet.
struct BackupControl(
    Arc<replication::FtStatus>,
    Option<Arc<replication::watch::WatchPath>>,
);

impl api::Control for BackupControl {
    fn status(&self) -> Value {
        json!({ "state": "standby", "ft": ft_json(&self.0, self.1.as_deref()) })
    }
    fn pause(&self) -> Result<Value, String> {
        Err("this node holds a standby copy; pause the primary".into())
    }
    fn resume(&self) -> Result<Value, String> {
        Err("this node holds a standby copy; nothing runs here".into())
    }
    fn snapshot(&self, _: &Path) -> Result<Value, String> {
        Err("this node holds a standby copy; snapshot the primary".into())
    }
    fn shutdown(&self) -> Result<Value, String> {
        Err("stop the backup process itself (it has no running VM)".into())
    }
    fn memory_checksum(&self) -> Result<Value, String> {
        Err("this node holds a standby copy".into())
    }
}

fn backup_vm(args: BackupArgs) -> anyhow::Result<i32> {
    let secret = read_secret(args.ft_secret_file.as_deref())?;
    let mut disks = args
        .disks
        .iter()
        .map(|d| parse_disk(d))
        .collect::<anyhow::Result<Vec<_>>>()?;
    attach_secrets(&mut disks, args.ft_secret_file.as_deref())?;
    let taps = args
        .nets
        .iter()
        .map(|n| parse_net(n).map(|n| n.tap))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let timeout = Duration::from_millis(args.ft_timeout_ms.max(10));
    let (watch, arbiter) = args.watch.start(&secret, false, timeout)?;
    let opts = replication::BackupOptions {
        listen: args.listen,
        secret,
        disks,
        taps,
        console: parse_console(&args.console)?,
        timeout,
        vm_id: args.watch.ft_vm_id.clone(),
        watch: watch.clone(),
        arbiter,
    };
    let status = Arc::new(replication::FtStatus::new("backup"));
    let server = match &args.api_sock {
        Some(p) => Some(api::serve(
            p,
            Arc::new(BackupControl(status.clone(), watch.clone())),
        )?),
        None => None,
    };
    match replication::run_backup(&opts, status.clone())? {
        replication::BackupOutcome::PrimaryStopped => Ok(0),
        replication::BackupOutcome::FailedOver { vm, epoch, reason } => {
            eprintln!("ftvm: primary lost ({reason}); guest resumed here from checkpoint {epoch}");
            drop(server);
            let run = match args.reprotect_to {
                Some(peer) => {
                    // This node is the primary now; protect the guest again.
                    let mut o = replication::FtOptions::new(peer, opts.secret.clone());
                    o.timeout = opts.timeout;
                    o.vm_id = opts.vm_id.clone();
                    if let (Some(w), Some(new_peer)) = (&watch, args.reprotect_watch) {
                        // Live here, no session yet: output flows until the first checkpoint.
                        w.set_own(true, replication::liveness::PeerState::PrimaryLive, 0, 0);
                        w.set_peer(new_peer);
                        o.watch = Some(w.clone());
                        o.arbiter = Arc::new(replication::arbiter::TwoNodeArbiter::new(
                            w.clone(),
                            opts.timeout,
                        ));
                    } else {
                        eprintln!(
                            "ftvm: warning: no --reprotect-watch: the new backup has no arbiter"
                        );
                    }
                    let st = Arc::new(replication::FtStatus::new("primary"));
                    let engine = replication::start_primary(vm.clone(), o.clone(), st.clone())
                        .context("cannot start the FT engine")?;
                    FtRun {
                        status: st,
                        watch: o.watch,
                        engine: Some(engine),
                    }
                }
                None => FtRun {
                    status,
                    watch,
                    engine: None,
                },
            };
            match supervise_started(vm, args.api_sock.as_deref(), Some(run), false)? {
                Some(code) => Ok(code),
                None => {
                    bail!("the guest rebooted after failover; start it again with `ftvm vm run`")
                }
            }
        }
    }
}

fn restore_vm(args: RestoreArgs) -> anyhow::Result<i32> {
    let snap = SnapshotFile::open(&args.snapshot)?;
    let mut config = snap.state.config.clone();
    attach_secrets(&mut config.disks, None)?;
    if !args.nets.is_empty() {
        let nets: Vec<NetConfig> = args
            .nets
            .iter()
            .map(|n| parse_net(n))
            .collect::<anyhow::Result<_>>()?;
        if nets.len() != config.nets.len() {
            bail!(
                "the snapshot has {} network interfaces; give exactly that many --net options (or none to reuse its taps)",
                config.nets.len()
            );
        }
        // The guest keeps its MACs: only the host side changes.
        config.nets = nets
            .into_iter()
            .zip(&snap.state.config.nets)
            .map(|(n, old)| NetConfig {
                tap: n.tap,
                mac: old.mac,
            })
            .collect();
    }
    config.console = parse_console(&args.console)?;
    let vm = Arc::new(Vm::restore(config.clone(), &snap.state, |mem| {
        snap.load_memory(mem)
    })?);
    match supervise(vm, args.api_sock.as_deref(), args.paused, None)? {
        Some(code) => Ok(code),
        None => {
            // A reboot after restore boots the same configuration afresh.
            let _ = config;
            bail!("the restored guest rebooted; start it again with `ftvm vm run`")
        }
    }
}

/// Runs `vm` until it ends. `Some(status)` to exit with, `None` when the guest rebooted.
fn supervise(
    vm: Arc<Vm>,
    api_sock: Option<&Path>,
    start_paused: bool,
    ft: Option<FtRun>,
) -> anyhow::Result<Option<i32>> {
    // Start first: when the socket appears, the VM is in the state the options asked for.
    if start_paused {
        vm.start_paused()?;
    } else {
        vm.start()?;
    }
    announce(&vm);
    supervise_started(vm, api_sock, ft, start_paused)
}

/// Tells the LAN where the guest's MACs now are (a RARP broadcast per NIC), so switches that
/// saw the MAC elsewhere (another node, before a restart or a failover) forward to us at once.
fn announce(vm: &Vm) {
    for (out, net) in vm.net_outputs().iter().zip(&vm.config().nets) {
        out.inject(&replication::announce::rarp_frame(net.mac));
    }
}

/// Runs an already started `vm` until it ends, serving its control API meanwhile;
/// `operator_paused` says the VM was started paused on the operator's behalf.
fn supervise_started(
    vm: Arc<Vm>,
    api_sock: Option<&Path>,
    mut ft: Option<FtRun>,
    operator_paused: bool,
) -> anyhow::Result<Option<i32>> {
    let engine = ft.as_mut().and_then(|f| f.engine.take());
    let status = ft.as_ref().map(|f| f.status.clone());
    let _server = match api_sock {
        Some(p) => Some(api::serve(
            p,
            Arc::new(VmControl::new(vm.clone(), ft, operator_paused)),
        )?),
        None => None,
    };
    wait_end(vm, status, engine)
}

fn wait_end(
    vm: Arc<Vm>,
    ft: Option<Arc<replication::FtStatus>>,
    engine: Option<std::thread::JoinHandle<()>>,
) -> anyhow::Result<Option<i32>> {
    let fenced = || {
        ft.as_ref()
            .is_some_and(|s| s.get().state == replication::FtState::Fenced)
    };
    let reason = loop {
        if let Some(r) = vm.wait_exit(Duration::from_millis(20)) {
            break r;
        }
        if fenced() {
            vm.stop();
            eprintln!("ftvm: the peer node runs this VM now; this copy stopped");
            return Ok(Some(EXIT_FENCED));
        }
    };
    // The FT engine tells the backup that the guest ended (so it is never resumed there)
    // before this process may exit.
    if let Some(e) = engine {
        let t0 = std::time::Instant::now();
        while !e.is_finished() && t0.elapsed() < Duration::from_secs(8) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    vm.stop();
    if fenced() {
        return Ok(Some(EXIT_FENCED));
    }
    match reason {
        ExitReason::PowerOff => Ok(Some(vm.guest_exit_status().unwrap_or(0))),
        ExitReason::Shutdown => Ok(Some(0)),
        ExitReason::Reboot => Ok(None),
        ExitReason::Error(msg) => bail!("the VM stopped: {msg}"),
    }
}
