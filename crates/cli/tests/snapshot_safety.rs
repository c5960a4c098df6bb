//! `POST /snapshot` never writes through or over anything, and its file is private: the real
//! test guest, a real monitor and its control socket. Needs root and /dev/kvm.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::json;
use testbed::args as s;
use testbed::ft::wait_path;
use testbed::{require_vms, Monitor, Scratch};

#[test]
fn snapshot_refuses_symlinks_and_existing_files_and_is_private() {
    require_vms();
    let dir = Scratch::new("snap-safety").unwrap();
    let console = dir.path("vm.console");
    let sock = dir.path("vm.sock");
    let mut args = s(&[
        "vm",
        "run",
        "--image",
        "testguest",
        "--mem",
        "64",
        "--cmdline",
        "-- counter",
    ]);
    args.extend(s(&["--console", &format!("file:{}", console.display())]));
    args.extend(s(&["--api-sock", &sock.display().to_string()]));
    let mut vm = Monitor::spawn(&args, &console, Some(&sock)).unwrap();
    vm.wait_for("counter 3\n", Duration::from_secs(20)).unwrap();
    wait_path(&sock, Duration::from_secs(5)).unwrap();
    let sock_mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(sock_mode, 0o600, "control socket mode {sock_mode:o}");

    // A symlink to a precious host file.
    let victim = dir.path("victim");
    std::fs::write(&victim, b"precious host data").unwrap();
    let link = dir.path("link.snap");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let e = vm
        .api("POST", "/snapshot", Some(json!({ "path": link })))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists as a symlink"), "{e}");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious host data");
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());

    // A dangling symlink is refused too (nothing is created at its target).
    let target = dir.path("would-be-created");
    let dangling = dir.path("dangling.snap");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    assert!(vm
        .api("POST", "/snapshot", Some(json!({ "path": dangling })))
        .is_err());
    assert!(!target.exists(), "the snapshot followed a dangling symlink");

    // An existing regular file is not overwritten.
    let existing = dir.path("existing.snap");
    std::fs::write(&existing, b"an older snapshot").unwrap();
    let e = vm
        .api("POST", "/snapshot", Some(json!({ "path": existing })))
        .unwrap_err()
        .to_string();
    assert!(e.contains("already exists"), "{e}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"an older snapshot");

    // A new name works, mode 0600, and no temporary file is left.
    let good = dir.path("good.snap");
    let info = vm
        .api("POST", "/snapshot", Some(json!({ "path": good })))
        .unwrap();
    assert!(info["bytes"].as_u64().unwrap() > 0, "{info}");
    let mode = std::fs::metadata(&good).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "snapshot mode {mode:o}");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path(""))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    vm.kill9();
}
