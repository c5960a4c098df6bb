//! The monitor never probes a raw disk into a qcow2: a guest disk whose first sector is a qcow2
//! header naming a host file is refused without a format, and with `format=raw` the monitor
//! runs the guest without ever opening that host file. Real monitor, real test guest. Needs
//! root and /dev/kvm.

use std::os::unix::fs::FileExt;
use std::time::Duration;

use storage::qcow2::{CreateOptions, Qcow2};
use testbed::args as s;
use testbed::{require_vms, Monitor, Scratch};

#[test]
fn a_qcow2_header_in_a_raw_disk_never_opens_the_host_file() {
    require_vms();
    let dir = Scratch::new("disk-format").unwrap();
    let host = dir.path("host-secret");
    std::fs::write(&host, vec![0x5au8; 1 << 20]).unwrap();
    let header = dir.path("header.qcow2");
    let opts = CreateOptions {
        backing_file: Some(host.display().to_string()),
        backing_format: Some("raw".into()),
        ..Default::default()
    };
    Qcow2::create(&header, 16 << 20, &opts).unwrap();
    let disk = dir.path("guest.img");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(4 << 20).unwrap();
    f.write_all_at(&std::fs::read(&header).unwrap(), 0).unwrap();
    drop(f);
    let console = dir.path("console");
    let con = format!("file:{}", console.display());

    // Without a format: one clear error naming both fixes.
    let out = std::process::Command::new(testbed::ftvm_bin())
        .args(s(&[
            "vm",
            "run",
            "--image",
            "testguest",
            "--disk",
            &disk.display().to_string(),
        ]))
        .args(s(&["--console", &con]))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("format=qcow2") && err.contains("format=raw"),
        "{err}"
    );

    // format=raw: the guest runs with its bytes; the host file is not among the monitor's files.
    let arg = format!("{},format=raw", disk.display());
    let args = s(&[
        "vm",
        "run",
        "--image",
        "testguest",
        "--mem",
        "64",
        "--cmdline",
        "-- counter",
        "--disk",
        &arg,
        "--console",
        &con,
    ]);
    let mut vm = Monitor::spawn(&args, &console, None).unwrap();
    vm.wait_for("counter 3\n", Duration::from_secs(20)).unwrap();
    let open: Vec<_> = std::fs::read_dir(format!("/proc/{}/fd", vm.pid()))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .collect();
    assert!(open.contains(&disk), "the disk is not open: {open:?}");
    assert!(
        !open.contains(&host),
        "the monitor opened the host file: {open:?}"
    );
    vm.kill9();
}
