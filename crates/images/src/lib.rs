//! Guest images for ftvm: Debian's stock cloud kernel and a busybox initramfs that loads the
//! virtio-mmio, virtio-blk and virtio-net modules, configures eth0 from the kernel command line
//! and runs `ftvm.exec` commands (see `init.sh`).
//!
//! Images are built from Debian packages fetched with the host's apt and cached under
//! `~/.cache/ftvm/images/<name>/` (`$FTVM_CACHE_DIR/images/<name>/` if that is set) as
//! `vmlinuz`, `initrd.img` and `manifest.json`.

pub mod apt;
pub mod initramfs;
pub mod modules;

use std::fs::File;
use std::io::{IsTerminal, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use apt::Package;
pub use initramfs::Initramfs;

/// The image `ftvm image build` builds when no name is given.
pub const DEFAULT_IMAGE: &str = "debian-cloud";

/// The init script every image carries as `/init`.
pub const INIT_SCRIPT: &str = include_str!("init.sh");

/// Kernel modules the guest loads at boot (their dependencies come along).
pub const GUEST_MODULES: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_net"];

/// Bumped whenever the initramfs layout changes, so older caches are rebuilt.
const BUILDER_VERSION: u32 = 1;

/// File names inside an image directory.
const KERNEL_FILE: &str = "vmlinuz";
const INITRD_FILE: &str = "initrd.img";
const MANIFEST_FILE: &str = "manifest.json";

/// Image errors; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No recipe for this image name.
    #[error("unknown image {0:?}: the images ftvm can build are: {known}", known = KNOWN_IMAGES.join(", "))]
    UnknownImage(String),
    /// A host tool is missing.
    #[error("{0}")]
    MissingTool(String),
    /// apt could not resolve or fetch a package.
    #[error("{0}")]
    Apt(String),
    /// Building the image failed.
    #[error("{0}")]
    Build(String),
    /// The cache directory cannot be used.
    #[error("{0}")]
    Cache(String),
}

/// Names `ftvm image build --name` accepts.
pub const KNOWN_IMAGES: &[&str] = &[DEFAULT_IMAGE];

/// Where an image's packages come from.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Image name.
    pub name: &'static str,
    /// The kernel metapackage, whose dependency is the versioned kernel package.
    pub kernel_meta: &'static str,
    /// The versioned kernel package's name ends like this (`linux-image-*-cloud-amd64`).
    pub kernel_suffix: &'static str,
    /// The statically linked busybox package.
    pub busybox: &'static str,
}

/// The recipe of image `name`.
pub fn recipe(name: &str) -> Result<Recipe, Error> {
    match name {
        DEFAULT_IMAGE => Ok(Recipe {
            name: DEFAULT_IMAGE,
            kernel_meta: "linux-image-cloud-amd64",
            kernel_suffix: "-cloud-amd64",
            busybox: "busybox-static",
        }),
        _ => Err(Error::UnknownImage(name.to_string())),
    }
}

/// Checksum and size of one image file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Lower-case hex SHA-256.
    pub sha256: String,
    /// Size in bytes.
    pub size: u64,
}

/// `manifest.json`: what an image was built from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Image name.
    pub name: String,
    /// Version of the builder that made it.
    pub builder_version: u32,
    /// SHA-256 of the init script inside.
    pub init_sha256: String,
    /// The kernel release (`uname -r` in the guest).
    pub kernel_release: String,
    /// The kernel metapackage, the versioned kernel package and busybox.
    pub packages: Vec<Package>,
    /// Modules in the initramfs, in load order (paths below `/lib/modules/<release>`).
    pub modules: Vec<String>,
    /// `vmlinuz`.
    pub kernel: FileInfo,
    /// `initrd.img` (gzip-compressed newc cpio).
    pub initrd: FileInfo,
    /// Build time, seconds since the Unix epoch.
    pub built_at: u64,
}

/// The files of a built image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImagePaths {
    /// The image directory.
    pub dir: PathBuf,
    /// The kernel (bzImage).
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
    /// `manifest.json`.
    pub manifest: PathBuf,
}

impl ImagePaths {
    fn in_dir(dir: PathBuf) -> Self {
        Self {
            kernel: dir.join(KERNEL_FILE),
            initrd: dir.join(INITRD_FILE),
            manifest: dir.join(MANIFEST_FILE),
            dir,
        }
    }
}

/// What [`build`] did.
#[derive(Debug, Clone)]
pub struct BuildOutcome {
    /// The image's files.
    pub paths: ImagePaths,
    /// Its manifest.
    pub manifest: Manifest,
    /// False when a valid cached image was used (nothing downloaded).
    pub built: bool,
    /// Why the cache was not used, when it was not.
    pub rebuild_reason: Option<String>,
    /// Wall time of the call.
    pub elapsed: Duration,
}

/// Options of [`build`].
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// Show progress on stderr.
    pub progress: bool,
    /// Rebuild even if the cache is valid.
    pub force: bool,
}

/// ftvm's cache directory: `$FTVM_CACHE_DIR`, else `~/.cache/ftvm`.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("FTVM_CACHE_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    home.join(".cache").join("ftvm")
}

/// The directory of image `name` in the default cache.
pub fn image_dir(name: &str) -> PathBuf {
    image_dir_in(&cache_root(), name)
}

/// The directory of image `name` under cache root `root`.
pub fn image_dir_in(root: &Path, name: &str) -> PathBuf {
    root.join("images").join(name)
}

/// The image `name`, built (with progress on stderr if `progress`) if it is not cached yet.
pub fn ensure_image(name: &str, progress: bool) -> Result<ImagePaths, Error> {
    build(
        name,
        BuildOptions {
            progress,
            force: false,
        },
    )
    .map(|o| o.paths)
}

/// Builds image `name` in the default cache, or keeps the cached one if it is valid.
pub fn build(name: &str, opts: BuildOptions) -> Result<BuildOutcome, Error> {
    build_in(&cache_root(), name, opts)
}

/// The cached image `name` under `root`, if it is complete and its files match the manifest.
pub fn cached_in(root: &Path, name: &str) -> Result<(ImagePaths, Manifest), String> {
    let paths = ImagePaths::in_dir(image_dir_in(root, name));
    let manifest = check_cache(&paths, name)?;
    Ok((paths, manifest))
}

fn sha256_file(path: &Path) -> std::io::Result<FileInfo> {
    let mut f = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok(FileInfo {
        sha256: hex::encode(hasher.finalize()),
        size,
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// Why the cached image is unusable, or its manifest.
fn check_cache(paths: &ImagePaths, name: &str) -> Result<Manifest, String> {
    let text = match std::fs::read_to_string(&paths.manifest) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err("not built yet".into()),
        Err(e) => return Err(format!("cannot read {}: {e}", paths.manifest.display())),
    };
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| format!("{} is damaged: {e}", paths.manifest.display()))?;
    if m.name != name {
        return Err(format!("the manifest is for image {:?}", m.name));
    }
    if m.builder_version != BUILDER_VERSION || m.init_sha256 != sha256_hex(INIT_SCRIPT.as_bytes()) {
        return Err("it was made by another version of ftvm".into());
    }
    for (file, want) in [(&paths.kernel, &m.kernel), (&paths.initrd, &m.initrd)] {
        let have = sha256_file(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        if &have != want {
            return Err(format!(
                "{} does not match its manifest (sha256 {}, expected {})",
                file.display(),
                have.sha256,
                want.sha256
            ));
        }
    }
    Ok(m)
}

/// Progress on stderr: spinners on a terminal, one line per step otherwise.
struct Progress {
    enabled: bool,
    tty: bool,
}

impl Progress {
    fn step(&self, msg: &str) -> Step {
        let bar = if self.enabled && self.tty {
            let bar = ProgressBar::new_spinner();
            if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} ({elapsed})") {
                bar.set_style(style);
            }
            bar.set_message(msg.to_string());
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        } else {
            if self.enabled {
                eprintln!("ftvm image: {msg}");
            }
            ProgressBar::hidden()
        };
        Step {
            bar,
            start: Instant::now(),
            msg: msg.to_string(),
        }
    }
}

struct Step {
    bar: ProgressBar,
    start: Instant,
    msg: String,
}

impl Step {
    fn done(self) {
        let secs = self.start.elapsed().as_secs_f64();
        self.bar
            .finish_with_message(format!("{} ({secs:.1} s)", self.msg));
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if !self.bar.is_finished() {
            self.bar.abandon();
        }
    }
}

/// An exclusive lock on a file next to the image, held while building or checking it, so two
/// processes never build the same image at once.
struct BuildLock {
    _file: File,
}

impl BuildLock {
    fn take(path: &Path, progress: bool) -> Result<Self, Error> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| Error::Cache(format!("cannot open lock file {}: {e}", path.display())))?;
        let fd = f.as_raw_fd();
        // SAFETY: flock on a file descriptor this function owns (kept open in `f`); no memory
        // is passed to the kernel.
        if unsafe { libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            if progress {
                eprintln!("ftvm image: waiting for another ftvm building this image");
            }
            // SAFETY: as above.
            if unsafe { libc::flock(fd, libc::LOCK_EX) } != 0 {
                return Err(Error::Cache(format!(
                    "cannot lock {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(Self { _file: f })
    }
}

/// Builds image `name` under cache root `root` (see [`build`]).
pub fn build_in(root: &Path, name: &str, opts: BuildOptions) -> Result<BuildOutcome, Error> {
    let start = Instant::now();
    let recipe = recipe(name)?;
    let images = root.join("images");
    std::fs::create_dir_all(&images).map_err(|e| {
        Error::Cache(format!(
            "cannot create the image cache {}: {e} (set FTVM_CACHE_DIR to a writable directory)",
            images.display()
        ))
    })?;
    let _lock = BuildLock::take(&images.join(format!(".{name}.lock")), opts.progress)?;
    let paths = ImagePaths::in_dir(image_dir_in(root, name));
    let rebuild_reason = match check_cache(&paths, name) {
        Ok(manifest) if !opts.force => {
            return Ok(BuildOutcome {
                paths,
                manifest,
                built: false,
                rebuild_reason: None,
                elapsed: start.elapsed(),
            })
        }
        Ok(_) => "--force".to_string(),
        Err(reason) => reason,
    };
    let progress = Progress {
        enabled: opts.progress,
        tty: std::io::stderr().is_terminal(),
    };
    apt::check_tools()?;
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}.build-"))
        .tempdir_in(&images)
        .map_err(|e| {
            Error::Cache(format!(
                "cannot create a build directory in {}: {e}",
                images.display()
            ))
        })?;

    let step = progress.step("resolving Debian packages");
    let packages = resolve_packages(&recipe)?;
    step.done();

    let debs_dir = tmp.path().join("debs");
    let tree = tmp.path().join("tree");
    mkdir(&debs_dir)?;
    mkdir(&tree)?;
    let names: Vec<String> = packages[1..]
        .iter()
        .map(|p| format!("{} {}", p.name, p.version))
        .collect();
    let step = progress.step(&format!("downloading {}", names.join(", ")));
    let debs = apt::download(&debs_dir, &packages[1..])?;
    step.done();

    let step = progress.step("extracting packages");
    for deb in &debs {
        apt::extract(deb, &tree)?;
    }
    step.done();

    let step = progress.step("building the initramfs");
    let (release, modules_dir) = find_modules_dir(&tree)?;
    let kernel_src = tree.join("boot").join(format!("vmlinuz-{release}"));
    if !kernel_src.is_file() {
        return Err(Error::Build(format!(
            "the kernel package has no boot/vmlinuz-{release}"
        )));
    }
    let busybox = ["bin/busybox", "usr/bin/busybox"]
        .iter()
        .map(|p| tree.join(p))
        .find(|p| p.is_file())
        .ok_or_else(|| Error::Build(format!("{} has no busybox binary", recipe.busybox)))?;
    let busybox = std::fs::read(&busybox)
        .map_err(|e| Error::Build(format!("cannot read {}: {e}", busybox.display())))?;
    let mods = modules::resolve(&modules_dir, GUEST_MODULES)?;
    let fs = initramfs_for(&recipe, &release, &packages, busybox, &mods)?;
    let initrd_tmp = tmp.path().join(INITRD_FILE);
    let out = File::create(&initrd_tmp)
        .map_err(|e| Error::Build(format!("cannot create {}: {e}", initrd_tmp.display())))?;
    fs.write_gzip(std::io::BufWriter::new(out))
        .and_then(|mut w| w.flush())
        .map_err(|e| Error::Build(format!("cannot write {}: {e}", initrd_tmp.display())))?;
    step.done();

    let kernel_tmp = tmp.path().join(KERNEL_FILE);
    std::fs::copy(&kernel_src, &kernel_tmp)
        .map_err(|e| Error::Build(format!("cannot copy the kernel: {e}")))?;
    let file_info = |p: &Path| {
        sha256_file(p).map_err(|e| Error::Build(format!("cannot read {}: {e}", p.display())))
    };
    let manifest = Manifest {
        name: name.to_string(),
        builder_version: BUILDER_VERSION,
        init_sha256: sha256_hex(INIT_SCRIPT.as_bytes()),
        kernel_release: release,
        packages,
        modules: mods.iter().map(|m| m.rel_path.clone()).collect(),
        kernel: file_info(&kernel_tmp)?,
        initrd: file_info(&initrd_tmp)?,
        built_at: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    install(&paths, &kernel_tmp, &initrd_tmp, &manifest)?;
    Ok(BuildOutcome {
        paths,
        manifest,
        built: true,
        rebuild_reason: Some(rebuild_reason),
        elapsed: start.elapsed(),
    })
}

fn mkdir(p: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(p)
        .map_err(|e| Error::Build(format!("cannot create {}: {e}", p.display())))
}

/// The kernel metapackage, the versioned kernel package and busybox at their candidate
/// versions (runs `apt-get update` once if apt's lists lack them).
fn resolve_packages(recipe: &Recipe) -> Result<Vec<Package>, Error> {
    let missing = || -> Result<bool, Error> {
        Ok(apt::candidate(recipe.kernel_meta)?.is_none()
            || apt::candidate(recipe.busybox)?.is_none())
    };
    if missing()? {
        apt::update()?;
    }
    let candidate = |pkg: &str| -> Result<Package, Error> {
        let version = apt::candidate(pkg)?.ok_or_else(|| {
            Error::Apt(format!(
                "package {pkg} not found in apt's lists: add Debian's main archive \
                 (e.g. `deb http://deb.debian.org/debian bookworm main`) to /etc/apt/sources.list \
                 and run `apt-get update`"
            ))
        })?;
        Ok(Package {
            name: pkg.to_string(),
            version,
        })
    };
    let meta = candidate(recipe.kernel_meta)?;
    let kernel_name = apt::depends(&meta.name, &meta.version)?
        .into_iter()
        .find(|d| {
            d.starts_with("linux-image-") && d.ends_with(recipe.kernel_suffix) && *d != meta.name
        })
        .ok_or_else(|| {
            Error::Apt(format!(
                "{} {} depends on no linux-image-*{} package",
                meta.name, meta.version, recipe.kernel_suffix
            ))
        })?;
    let kernel = candidate(&kernel_name)?;
    let busybox = candidate(recipe.busybox)?;
    Ok(vec![meta, kernel, busybox])
}

/// `lib/modules/<release>` (or `usr/lib/modules/<release>`) in the extracted tree.
fn find_modules_dir(tree: &Path) -> Result<(String, PathBuf), Error> {
    for base in ["lib/modules", "usr/lib/modules"] {
        let dir = tree.join(base);
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        let releases: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("kernel").is_dir())
            .collect();
        match releases.as_slice() {
            [one] => {
                let release = one
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| Error::Build(format!("odd module directory {}", one.display())))?
                    .to_string();
                return Ok((release, one.clone()));
            }
            [] => {}
            many => {
                return Err(Error::Build(format!(
                    "the kernel package has {} module trees in {}",
                    many.len(),
                    dir.display()
                )))
            }
        }
    }
    Err(Error::Build(
        "the kernel package has no lib/modules/<release>/kernel directory".into(),
    ))
}

/// The initramfs: busybox, `/init`, the modules and their load order, a few /etc files.
pub fn initramfs_for(
    recipe: &Recipe,
    release: &str,
    packages: &[Package],
    busybox: Vec<u8>,
    mods: &[modules::Module],
) -> Result<Initramfs, Error> {
    let err = |e: initramfs::InitramfsError| Error::Build(e.to_string());
    let mut fs = Initramfs::new();
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "mnt", "etc/ftvm",
    ] {
        fs.dir(d, 0o755).map_err(err)?;
    }
    fs.dir("root", 0o700).map_err(err)?;
    fs.dir("tmp", 0o1777).map_err(err)?;
    // The kernel opens /dev/console for init before /dev is mounted.
    fs.char_dev("dev/console", 0o600, 5, 1).map_err(err)?;
    fs.char_dev("dev/null", 0o666, 1, 3).map_err(err)?;
    fs.file("bin/busybox", busybox, 0o755).map_err(err)?;
    fs.symlink("bin/sh", "busybox").map_err(err)?;
    fs.file("init", INIT_SCRIPT.as_bytes().to_vec(), 0o755)
        .map_err(err)?;
    let moddir = format!("lib/modules/{release}");
    let mut order = String::new();
    for m in mods {
        fs.file(&format!("{moddir}/{}", m.rel_path), m.data.clone(), 0o644)
            .map_err(err)?;
        order.push_str(&format!("/{moddir}/{}\n", m.rel_path));
    }
    fs.file(
        &format!("{moddir}/modules.dep"),
        modules::modules_dep(mods).into_bytes(),
        0o644,
    )
    .map_err(err)?;
    fs.file("etc/ftvm/modules", order.into_bytes(), 0o644)
        .map_err(err)?;
    let mut about = format!("image={}\nkernel_release={release}\n", recipe.name);
    for p in packages {
        about.push_str(&format!("package={} {}\n", p.name, p.version));
    }
    fs.file("etc/ftvm/image", about.into_bytes(), 0o644)
        .map_err(err)?;
    fs.file(
        "etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\n".to_vec(),
        0o644,
    )
    .map_err(err)?;
    fs.file("etc/group", b"root:x:0:\n".to_vec(), 0o644)
        .map_err(err)?;
    fs.file("etc/hostname", b"ftvm\n".to_vec(), 0o644)
        .map_err(err)?;
    Ok(fs)
}

/// Moves the new files into the image directory; the manifest goes last, so a crash leaves an
/// image that fails validation rather than one that passes with wrong files.
fn install(
    paths: &ImagePaths,
    kernel: &Path,
    initrd: &Path,
    manifest: &Manifest,
) -> Result<(), Error> {
    let cache_err = |what: &Path, e: std::io::Error| {
        Error::Cache(format!("cannot write {}: {e}", what.display()))
    };
    std::fs::create_dir_all(&paths.dir).map_err(|e| cache_err(&paths.dir, e))?;
    match std::fs::remove_file(&paths.manifest) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(cache_err(&paths.manifest, e)),
    }
    std::fs::rename(kernel, &paths.kernel).map_err(|e| cache_err(&paths.kernel, e))?;
    std::fs::rename(initrd, &paths.initrd).map_err(|e| cache_err(&paths.initrd, e))?;
    let json = serde_json::to_string_pretty(manifest)
        .map_err(|e| Error::Build(format!("cannot encode the manifest: {e}")))?;
    let tmp = paths.dir.join(".manifest.json.tmp");
    std::fs::write(&tmp, json + "\n").map_err(|e| cache_err(&tmp, e))?;
    std::fs::rename(&tmp, &paths.manifest).map_err(|e| cache_err(&paths.manifest, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_packages() -> Vec<Package> {
        [
            "linux-image-cloud-amd64",
            "linux-image-6.1.0-99-cloud-amd64",
            "busybox-static",
        ]
        .iter()
        .map(|n| Package {
            name: n.to_string(),
            version: "1.0".into(),
        })
        .collect()
    }

    /// Builds the initramfs from a fake module tree and a real file, writes it gzip-compressed
    /// and checks what is in it.
    #[test]
    fn initramfs_has_init_busybox_and_modules_in_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = modules::tests::fake_tree(tmp.path());
        let mods = modules::resolve(&dir, GUEST_MODULES).unwrap();
        // Any real executable stands in for busybox.
        let bb = std::fs::read("/bin/sh").unwrap();
        let r = recipe(DEFAULT_IMAGE).unwrap();
        let fs = initramfs_for(
            &r,
            "6.1.0-99-cloud-amd64",
            &fake_packages(),
            bb.clone(),
            &mods,
        )
        .unwrap();
        let path = tmp.path().join("initrd.img");
        fs.write_gzip(File::create(&path).unwrap()).unwrap();
        let entries = initramfs::read_archive_file(&path).unwrap();
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(get("init").mode, 0o100755);
        assert_eq!(get("init").data, INIT_SCRIPT.as_bytes());
        assert_eq!(get("bin/busybox").data, bb);
        assert_eq!(get("bin/sh").data, b"busybox");
        assert_eq!(get("dev/console").rdev, (5, 1));
        let order = String::from_utf8(get("etc/ftvm/modules").data.clone()).unwrap();
        let order: Vec<&str> = order.lines().collect();
        assert_eq!(order.len(), 7);
        for line in &order {
            let rel = line.trim_start_matches('/');
            assert!(rel.starts_with("lib/modules/6.1.0-99-cloud-amd64/kernel/"));
            assert_eq!(get(rel).mode, 0o100644);
        }
        let pos = |m: &str| order.iter().position(|l| l.ends_with(m)).unwrap();
        assert!(pos("/virtio.ko") < pos("/virtio_mmio.ko"));
        assert!(pos("/failover.ko") < pos("/net_failover.ko"));
        assert!(pos("/net_failover.ko") < pos("/virtio_net.ko"));
        assert!(get("lib/modules/6.1.0-99-cloud-amd64/modules.dep")
            .data
            .starts_with(b"kernel/"));
    }

    #[test]
    fn unknown_image_and_empty_cache() {
        let e = recipe("fedora").unwrap_err().to_string();
        assert!(e.contains("debian-cloud"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(
            cached_in(tmp.path(), DEFAULT_IMAGE).unwrap_err(),
            "not built yet"
        );
        assert!(build_in(tmp.path(), "fedora", BuildOptions::default()).is_err());
    }

    /// A hand-made cache entry is accepted, and rejected once a file changes.
    #[test]
    fn cache_validation() {
        let tmp = tempfile::tempdir().unwrap();
        let paths = ImagePaths::in_dir(image_dir_in(tmp.path(), DEFAULT_IMAGE));
        let k = tmp.path().join("k");
        let i = tmp.path().join("i");
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"initrd").unwrap();
        let m = Manifest {
            name: DEFAULT_IMAGE.into(),
            builder_version: BUILDER_VERSION,
            init_sha256: sha256_hex(INIT_SCRIPT.as_bytes()),
            kernel_release: "6.1.0-99-cloud-amd64".into(),
            packages: fake_packages(),
            modules: vec![],
            kernel: sha256_file(&k).unwrap(),
            initrd: sha256_file(&i).unwrap(),
            built_at: 0,
        };
        install(&paths, &k, &i, &m).unwrap();
        let (p, got) = cached_in(tmp.path(), DEFAULT_IMAGE).unwrap();
        assert_eq!(got, m);
        assert_eq!(p.kernel, paths.kernel);
        // A valid cache means no apt at all: this works even without apt-get.
        let out = build_in(tmp.path(), DEFAULT_IMAGE, BuildOptions::default()).unwrap();
        assert!(!out.built);
        std::fs::write(&paths.initrd, b"changed").unwrap();
        let why = cached_in(tmp.path(), DEFAULT_IMAGE).unwrap_err();
        assert!(why.contains("does not match"), "{why}");
        std::fs::write(&paths.manifest, b"{").unwrap();
        let why = cached_in(tmp.path(), DEFAULT_IMAGE).unwrap_err();
        assert!(why.contains("damaged"), "{why}");
    }

    /// Runs the init script on the host in its test mode: command line parsing, base64
    /// decoding (standard and URL-safe, with and without padding) and the exit-status line.
    #[test]
    fn init_script_runs_exec_and_reports_status() {
        let tmp = tempfile::tempdir().unwrap();
        let init = tmp.path().join("init");
        std::fs::write(&init, INIT_SCRIPT).unwrap();
        let run = |cmdline: &str| {
            let out = std::process::Command::new("sh")
                .arg(&init)
                .env("FTVM_INIT_TEST", "1")
                .env("FTVM_CMDLINE", cmdline)
                .output()
                .unwrap();
            (
                out.status.code(),
                String::from_utf8_lossy(&out.stdout).into_owned(),
            )
        };
        // "echo TOKEN; exit 3" in standard base64.
        let (code, out) =
            run("console=ttyS0 ftvm.ip=10.0.0.2/24 ftvm.exec=ZWNobyBUT0tFTjsgZXhpdCAz panic=-1");
        assert_eq!(code, Some(3), "{out}");
        assert!(out.contains("TOKEN\n"), "{out}");
        assert!(
            out.contains("would configure eth0 with 10.0.0.2/24"),
            "{out}"
        );
        assert_eq!(
            out.lines()
                .filter(|l| l.starts_with("ftvm-exit-status:"))
                .collect::<Vec<_>>(),
            ["ftvm-exit-status: 3"]
        );
        // "printf '%s' a>b?" — needs '+'/'/' vs '-'/'_' and padding.
        let cmd = "printf '%s' 'a>b?'";
        let std_b64 = "cHJpbnRmICclcycgJ2E+Yj8n";
        assert_eq!(cmd.len() % 3, 0);
        let (code, out) = run(&format!("ftvm.exec={std_b64}"));
        assert_eq!(code, Some(0));
        assert!(out.contains("a>b?\nftvm-exit-status: 0\n"), "{out}");
        let (_, out2) = run(&format!(
            "ftvm.exec={}",
            std_b64.replace('+', "-").replace('/', "_")
        ));
        assert_eq!(out, out2);
        // "true" without padding ("dHJ1ZQ==").
        let (code, out) = run("ftvm.exec=dHJ1ZQ");
        assert_eq!(code, Some(0), "{out}");
        let (code, out) = run("ftvm.exec=!!!");
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains("not valid base64"), "{out}");
        // No ftvm.exec: nothing to run (the shell is skipped in test mode).
        let (code, out) = run("console=ttyS0");
        assert_eq!(code, Some(0));
        assert!(!out.contains("ftvm-exit-status"), "{out}");
    }
}
