//! Commands that build a test bed (`ftvm bench ft`, `ftvm demo`) remove it when they are told to
//! stop with SIGTERM or SIGINT (as `timeout`, systemd and Ctrl-C do), and while such a command
//! runs, nobody else's stale-bed cleanup removes its bed. Needs root and /dev/kvm.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testbed::TwoNodeBed;

fn spawn(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ftvm"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start ftvm")
}

/// Waits until the three namespaces of `prefix` exist.
fn wait_bed(child: &mut Child, prefix: &str) {
    let t0 = Instant::now();
    while TwoNodeBed::existing(prefix).len() < 3 {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("ftvm ended ({status}) before its bed {prefix}* was up");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the bed {prefix}* did not come up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            eprintln!("ftvm's stderr:\n{err}");
            return status;
        }
        assert!(t0.elapsed() < within, "ftvm did not end after the signal");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill has no memory-safety preconditions; the pid is our own live child's.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

#[test]
fn sigterm_removes_the_bench_bed_and_a_live_bed_is_never_cleaned_up_by_others() {
    testbed::require_vms();
    let prefix = format!("sigt{}-", std::process::id());
    let mut child = spawn(&["bench", "ft", "--bed-prefix", &prefix]);
    wait_bed(&mut child, &prefix);

    // Another process's stale-bed cleanup of the same prefix refuses: the bed's builder runs.
    let err = TwoNodeBed::cleanup_stale(&prefix).expect_err("a live bed was removed");
    assert!(
        format!("{err:#}").contains(&child.id().to_string()),
        "the refusal names the owner: {err:#}"
    );
    assert_eq!(TwoNodeBed::existing(&prefix).len(), 3);
    // And nobody builds over it.
    assert!(TwoNodeBed::up(&prefix).is_err());

    signal(&child, libc::SIGTERM);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status}");
    assert!(
        TwoNodeBed::existing(&prefix).is_empty(),
        "SIGTERM left {:?} behind",
        TwoNodeBed::existing(&prefix)
    );
    // Nothing of it is left to clean up.
    assert!(TwoNodeBed::cleanup_stale(&prefix).unwrap().is_empty());
    assert_eq!(status.signal(), None);
}

#[test]
fn sigint_removes_the_demo_bed() {
    testbed::require_vms();
    let prefix = format!("sigi{}-", std::process::id());
    let mut child = spawn(&["demo", "--seconds", "60", "--bed-prefix", &prefix]);
    wait_bed(&mut child, &prefix);
    signal(&child, libc::SIGINT);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}");
    assert!(
        TwoNodeBed::existing(&prefix).is_empty(),
        "SIGINT left {:?} behind",
        TwoNodeBed::existing(&prefix)
    );
}
