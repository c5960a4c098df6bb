//! `ftvm vm run --cpu`: a bad model name and a model this host's KVM cannot provide each give
//! one clear error naming the problem. Needs /dev/kvm.

use testbed::args as s;
use testbed::{require_vms, Scratch};

fn run_error(args: &[String]) -> Option<String> {
    let out = std::process::Command::new(testbed::ftvm_bin())
        .args(args)
        .output()
        .unwrap();
    (!out.status.success()).then(|| String::from_utf8_lossy(&out.stderr).into_owned())
}

fn poweroff_guest(dir: &Scratch, cpu: &str) -> Vec<String> {
    let console = dir.path(&format!("{cpu}.console"));
    s(&[
        "vm",
        "run",
        "--image",
        "testguest",
        "--mem",
        "32",
        "--cpu",
        cpu,
        "--cmdline",
        "-- poweroff",
        "--console",
        &format!("file:{}", console.display()),
    ])
}

#[test]
fn unknown_cpu_model_is_one_clear_error() {
    require_vms();
    let dir = Scratch::new("cpu-bad").unwrap();
    let err = run_error(&poweroff_guest(&dir, "haswell")).expect("--cpu haswell was accepted");
    assert!(
        err.contains("haswell") && err.contains("x86-64-v2") && err.contains("host"),
        "{err}"
    );
}

#[test]
fn each_model_runs_or_names_what_this_host_lacks() {
    require_vms();
    let dir = Scratch::new("cpu-models").unwrap();
    for cpu in ["x86-64", "host", "x86-64-v2", "x86-64-v3"] {
        match run_error(&poweroff_guest(&dir, cpu)) {
            None => {
                let text = std::fs::read_to_string(dir.path(&format!("{cpu}.console"))).unwrap();
                assert!(text.contains("powering off"), "{cpu}: {text}");
            }
            Some(err) => {
                assert!(
                    cpu.starts_with("x86-64-v"),
                    "--cpu {cpu} must always run: {err}"
                );
                assert_eq!(err.lines().count(), 1, "{err}");
                assert!(
                    err.contains(&format!("cannot provide CPU model {cpu}: its KVM lacks")),
                    "{err}"
                );
            }
        }
    }
}
