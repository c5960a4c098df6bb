//! Fetching Debian packages with the host's apt: candidate versions, dependencies, download and
//! extraction. Every failure names the command that failed and what to do about it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// A package at a version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Package {
    /// Package name.
    pub name: String,
    /// Debian version.
    pub version: String,
}

/// Whether this process runs as root (apt-get update needs it; apt-get download then drops to
/// the `_apt` user unless told not to).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Checks that apt-get, apt-cache and dpkg-deb are installed.
pub fn check_tools() -> Result<(), Error> {
    for (tool, package) in [
        ("apt-get", "apt"),
        ("apt-cache", "apt"),
        ("dpkg-deb", "dpkg"),
    ] {
        if !in_path(tool) {
            return Err(Error::MissingTool(format!(
                "{tool} not found: building an image needs Debian's package tools \
                 (on Debian or Ubuntu: `apt-get install {package}`)"
            )));
        }
    }
    Ok(())
}

/// Runs `cmd`, returning its stdout; a failure becomes an error naming `what` and the last
/// lines of stderr.
fn run(cmd: &mut Command, what: &str, fix: &str) -> Result<String, Error> {
    let out = cmd
        .output()
        .map_err(|e| Error::Apt(format!("{what}: cannot run it: {e}; {fix}")))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .rev()
            .take(3)
            .collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        return Err(Error::Apt(format!(
            "{what} failed ({}): {}; {fix}",
            out.status,
            tail.join(" / ")
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The version apt would install of `pkg`, or `None` if apt's lists do not have it.
pub fn candidate(pkg: &str) -> Result<Option<String>, Error> {
    let out = run(
        Command::new("apt-cache").args(["policy", "--", pkg]),
        &format!("apt-cache policy {pkg}"),
        "check that apt works on this host",
    )?;
    Ok(parse_candidate(&out))
}

fn parse_candidate(policy: &str) -> Option<String> {
    policy
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(str::trim)
        .filter(|v| !v.is_empty() && *v != "(none)")
        .map(str::to_string)
}

/// The package names in the `Depends:` field of `pkg` at `version` (alternatives flattened,
/// version constraints and architecture qualifiers dropped).
pub fn depends(pkg: &str, version: &str) -> Result<Vec<String>, Error> {
    let out = run(
        Command::new("apt-cache").args(["show", "--", &format!("{pkg}={version}")]),
        &format!("apt-cache show {pkg}={version}"),
        "run `apt-get update` and try again",
    )?;
    Ok(parse_depends(&out))
}

fn parse_depends(show: &str) -> Vec<String> {
    // Only the first stanza; a field may continue on indented lines.
    let mut field = String::new();
    let mut in_depends = false;
    for line in show.lines() {
        if line.is_empty() {
            break;
        }
        if let Some(rest) = line.strip_prefix("Depends:") {
            in_depends = true;
            field.push_str(rest);
        } else if in_depends && line.starts_with([' ', '\t']) {
            field.push_str(line);
        } else {
            in_depends = false;
        }
    }
    field
        .split([',', '|'])
        .filter_map(|d| d.split_whitespace().next())
        .map(|d| d.split(':').next().unwrap_or(d).to_string())
        .filter(|d| !d.is_empty())
        .collect()
}

/// Runs `apt-get update` (root only).
pub fn update() -> Result<(), Error> {
    if !is_root() {
        return Err(Error::Apt(
            "apt's package lists have no candidate for the image's packages: \
             run `sudo apt-get update` and try again"
                .into(),
        ));
    }
    run(
        Command::new("apt-get").args(["update", "-q"]),
        "apt-get update",
        "check the network and the sources in /etc/apt/sources.list(.d)",
    )
    .map(drop)
}

/// Downloads `pkgs` (exact versions) into `dir` and returns the `.deb` paths in `pkgs` order.
pub fn download(dir: &Path, pkgs: &[Package]) -> Result<Vec<PathBuf>, Error> {
    let mut cmd = Command::new("apt-get");
    cmd.current_dir(dir).args(["download", "-q"]);
    if is_root() {
        // Otherwise apt downloads as `_apt`, which cannot write into a private temp dir.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd.arg("--");
    for p in pkgs {
        cmd.arg(format!("{}={}", p.name, p.version));
    }
    let names: Vec<String> = pkgs
        .iter()
        .map(|p| format!("{}={}", p.name, p.version))
        .collect();
    run(
        &mut cmd,
        &format!("apt-get download {}", names.join(" ")),
        "check the network, or run `apt-get update` if the versions are gone",
    )?;
    let files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::Apt(format!("cannot list {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "deb"))
        .collect();
    pkgs.iter()
        .map(|p| {
            let prefix = format!("{}_", p.name);
            files
                .iter()
                .find(|f| {
                    f.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
                })
                .cloned()
                .ok_or_else(|| {
                    Error::Apt(format!(
                        "apt-get download reported success but left no {prefix}*.deb in {}",
                        dir.display()
                    ))
                })
        })
        .collect()
}

/// Extracts the files of `deb` into `dest`.
pub fn extract(deb: &Path, dest: &Path) -> Result<(), Error> {
    run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dest),
        &format!("dpkg-deb -x {}", deb.display()),
        "the download may be damaged: try again",
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_policy() {
        let p = "linux-image-cloud-amd64:\n  Installed: (none)\n  Candidate: 6.1.172-1\n  \
                 Version table:\n     6.1.172-1 500\n";
        assert_eq!(parse_candidate(p).as_deref(), Some("6.1.172-1"));
        assert_eq!(
            parse_candidate("x:\n  Installed: (none)\n  Candidate: (none)\n"),
            None
        );
        assert_eq!(parse_candidate(""), None);
    }

    #[test]
    fn parses_depends() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.172-1\n\
                    Depends: linux-image-6.1.0-48-cloud-amd64 (= 6.1.172-1),\n \
                    foo:any | bar (>= 2)\nDescription: x\n\nPackage: other\nDepends: no\n";
        assert_eq!(
            parse_depends(show),
            ["linux-image-6.1.0-48-cloud-amd64", "foo", "bar"]
        );
    }
}
