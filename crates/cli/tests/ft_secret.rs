//! A backup with another cluster secret is refused at the A-link handshake with a clear error
//! on both nodes, never a hang, and the primary keeps its guest running. Real monitors, real
//! test guest, A-link over loopback. Needs root and /dev/kvm.

use std::time::Duration;

use testbed::args as s;
use testbed::ft::wait_path;
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

    // The primary is told why in its status and keeps its guest running, never protected (and
    // without an arbiter it never degrades: it holds output while it retries).
    let t0 = std::time::Instant::now();
    let st = loop {
        let st = primary.api("GET", "/status", None).unwrap();
        if st["ft"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("cluster secret differs"))
        {
            break st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the primary's status never named the wrong secret: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        st["ft"]["state"] != "protected" && st["ft"]["checkpoints"] == 0,
        "{st}"
    );
    primary
        .wait_for("counter 5\n", Duration::from_secs(20))
        .unwrap();
    // The backup refused every such session and never held or ran the guest; it said why.
    let bst = backup.api("GET", "/status", None).unwrap();
    assert_eq!(bst["ft"]["checkpoints"], 0, "{bst}");
    backup.kill9();
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
