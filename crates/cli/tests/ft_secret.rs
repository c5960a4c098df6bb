//! A backup with another cluster secret is refused at the A-link handshake with a clear error
//! on both nodes, never a hang, and the primary keeps its guest running. Real monitors, real
//! test guest, A-link over loopback. Needs root and /dev/kvm.

use std::time::Duration;

use testbed::args as s;
use testbed::ft::{wait_ft_state, wait_path};
use testbed::{Monitor, Scratch};

#[test]
fn backup_with_another_secret_is_refused_at_the_handshake() {
    testbed::require_vms();
    let dir = Scratch::new("ft-secret").unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (good, bad) = (dir.path("good.secret"), dir.path("bad.secret"));
    std::fs::write(&good, "the cluster secret of node A\n").unwrap();
    std::fs::write(&bad, "some other cluster's secret\n").unwrap();

    let (bcon, bsock) = (dir.path("b.console"), dir.path("b.sock"));
    let mut bargs = s(&["vm", "backup", "--listen", &format!("127.0.0.1:{port}")]);
    bargs.extend(s(&["--secret-file", &bad.display().to_string()]));
    bargs.extend(s(&["--console", &format!("file:{}", bcon.display())]));
    bargs.extend(s(&["--api-sock", &bsock.display().to_string()]));
    let mut backup = Monitor::spawn(&bargs, &bcon, Some(&bsock)).unwrap();
    wait_path(&bsock, Duration::from_secs(10)).unwrap();

    let (acon, asock) = (dir.path("a.console"), dir.path("a.sock"));
    let mut aargs = s(&[
        "vm",
        "run",
        "--image",
        "testguest",
        "--mem",
        "64",
        "--cmdline",
        "-- counter",
    ]);
    aargs.extend(s(&["--ft-peer", &format!("127.0.0.1:{port}")]));
    aargs.extend(s(&["--secret-file", &good.display().to_string()]));
    aargs.extend(s(&["--console", &format!("file:{}", acon.display())]));
    aargs.extend(s(&["--api-sock", &asock.display().to_string()]));
    let mut primary = Monitor::spawn(&aargs, &acon, Some(&asock)).unwrap();
    wait_path(&asock, Duration::from_secs(10)).unwrap();

    // The primary is told why, and runs on unprotected (its guest is the only live copy).
    let st = wait_ft_state(&primary, "degraded", Duration::from_secs(20)).unwrap();
    let reason = st["ft"]["reason"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("cluster secret differs"), "{st}");
    primary
        .wait_for("counter 5\n", Duration::from_secs(20))
        .unwrap();
    // The backup refuses and stops without ever running the guest.
    let status = backup.wait_exit(Duration::from_secs(20)).unwrap();
    assert!(!status.success());
    let err = backup.stderr_text();
    assert!(err.contains("cluster secret differs"), "{err}");
    assert!(
        !std::fs::read_to_string(&bcon)
            .unwrap_or_default()
            .contains("counter"),
        "the refused backup ran the guest"
    );
    primary.kill9();
}
