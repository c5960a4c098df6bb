//! The control socket refuses everyone but root and its owner: real sockets, a real forked
//! process running as `nobody`. Needs root.

use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::{json, Value};

const NOBODY: u32 = 65534;

/// Counts what it was asked to do: the test checks that a refused caller changed nothing.
#[derive(Default)]
struct Counting {
    pauses: AtomicUsize,
}

impl api::Control for Counting {
    fn status(&self) -> Value {
        json!({ "state": "running" })
    }
    fn pause(&self) -> Result<Value, String> {
        self.pauses.fetch_add(1, Ordering::SeqCst);
        Ok(json!({}))
    }
    fn resume(&self) -> Result<Value, String> {
        Ok(json!({}))
    }
    fn snapshot(&self, _: &Path) -> Result<Value, String> {
        Ok(json!({}))
    }
    fn shutdown(&self) -> Result<Value, String> {
        Ok(json!({}))
    }
    fn memory_checksum(&self) -> Result<Value, String> {
        Ok(json!({}))
    }
}

/// What a request from another uid got.
#[derive(Debug, PartialEq)]
enum Outcome {
    Forbidden,
    Ok,
    ConnectDenied,
    Other(i32),
}

/// Forks; the child drops to `uid` and sends `POST /pause` on `sock` with raw system calls
/// only (nothing allocates between fork and exit).
fn pause_as(uid: u32, sock: &Path) -> Outcome {
    assert_eq!(
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() },
        0,
        "this test needs root (to run a request as another uid)"
    );
    let path = CString::new(sock.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: sockaddr_un is plain data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path.as_bytes_with_nul()) {
        *d = *s as libc::c_char;
    }
    let req =
        b"POST /pause HTTP/1.1\r\nhost: ftvm\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    // SAFETY: the child only makes async-signal-safe system calls on memory prepared above,
    // then _exit()s; the parent waits for it.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: see above; every pointer refers to live stack memory of this frame.
        unsafe {
            if libc::setgid(NOBODY) != 0 || libc::setuid(uid) != 0 {
                libc::_exit(10);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            if fd < 0 {
                libc::_exit(11);
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                libc::_exit(if *libc::__errno_location() == libc::EACCES {
                    2
                } else {
                    12
                });
            }
            if libc::write(fd, req.as_ptr().cast(), req.len()) != req.len() as isize {
                libc::_exit(13);
            }
            let mut buf = [0u8; 12];
            let mut got = 0usize;
            while got < buf.len() {
                let n = libc::read(fd, buf.as_mut_ptr().add(got).cast(), buf.len() - got);
                if n <= 0 {
                    libc::_exit(14);
                }
                got += n as usize;
            }
            libc::_exit(match &buf {
                b"HTTP/1.1 403" => 0,
                b"HTTP/1.1 200" => 1,
                _ => 15,
            });
        }
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    assert!(libc::WIFEXITED(status), "child died: {status}");
    match libc::WEXITSTATUS(status) {
        0 => Outcome::Forbidden,
        1 => Outcome::Ok,
        2 => Outcome::ConnectDenied,
        c => Outcome::Other(c),
    }
}

fn reachable_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    // Let `nobody` reach the socket's directory: only the socket's own mode may stop it.
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn socket_is_created_0600_whatever_the_umask() {
    // SAFETY: umask has no preconditions (nextest runs this test in its own process).
    unsafe { libc::umask(0) };
    let d = reachable_dir();
    let sock = d.path().join("api.sock");
    let ctl = Arc::new(Counting::default());
    let _server = api::serve(&sock, ctl.clone()).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");
    assert_eq!(pause_as(NOBODY, &sock), Outcome::ConnectDenied);
    assert_eq!(ctl.pauses.load(Ordering::SeqCst), 0);
    // Nothing but the socket is left behind (no staging directory).
    let names: Vec<_> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("api.sock")]);
}

#[test]
fn another_uid_is_refused_with_403_and_nothing_is_done() {
    let d = reachable_dir();
    let sock = d.path().join("api.sock");
    let ctl = Arc::new(Counting::default());
    let _server = api::serve(&sock, ctl.clone()).unwrap();
    // Even if an operator opens the socket's mode, the peer's uid is checked.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(pause_as(NOBODY, &sock), Outcome::Forbidden);
    assert_eq!(
        ctl.pauses.load(Ordering::SeqCst),
        0,
        "a refused request paused the VM"
    );
    // Root (this process) is served.
    api::request(&sock, "POST", "/pause", None).unwrap();
    assert_eq!(ctl.pauses.load(Ordering::SeqCst), 1);
}

#[test]
fn a_file_that_is_not_a_socket_is_not_replaced() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("api.sock");
    std::fs::write(&sock, b"precious").unwrap();
    let e = api::serve(&sock, Arc::new(Counting::default()))
        .err()
        .expect("file replaced");
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"precious");
}
