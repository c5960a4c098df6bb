//! The handshake and channel over real TCP connections on loopback.

use std::io::{BufReader, BufWriter};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use link::{handshake, LinkError, Role, Secret, Session};

const SERVICE: &str = "test";

fn secret(s: &str) -> Secret {
    Secret::new(s.as_bytes()).unwrap()
}

type Ended = Result<(Session, TcpStream), LinkError>;

/// Runs a responder with `theirs` on a thread and an initiator with `ours`; returns both
/// results and the two streams' ends.
fn connect(ours: Secret, theirs: Secret, service_b: &'static str) -> (Ended, Ended) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = BufWriter::new(s.try_clone().unwrap());
        handshake(&mut r, &mut w, &theirs, Role::Responder, service_b, 1 << 20).map(|x| (x, s))
    });
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut w = BufWriter::new(s.try_clone().unwrap());
    let a = handshake(&mut r, &mut w, &ours, Role::Initiator, SERVICE, 1 << 20).map(|x| (x, s));
    (a, t.join().unwrap())
}

#[test]
fn both_directions_carry_frames() {
    let (a, b) = connect(
        secret("0123456789abcdef"),
        secret("0123456789abcdef"),
        SERVICE,
    );
    let ((mut sa, ta), (mut sb, tb)) = (a.unwrap(), b.unwrap());
    sa.tx.send(&mut &ta, 9, b"to responder").unwrap();
    sb.tx.send(&mut &tb, 8, b"to initiator").unwrap();
    let f = sb.rx.recv(&mut &tb).unwrap();
    assert_eq!(
        (f.kind, f.counter, &f.payload[..]),
        (9, 1, &b"to responder"[..])
    );
    let f = sa.rx.recv(&mut &ta).unwrap();
    assert_eq!((f.kind, &f.payload[..]), (8, &b"to initiator"[..]));
}

#[test]
fn wrong_secret_refused_at_handshake_on_both_ends() {
    let (a, b) = connect(
        secret("0123456789abcdef"),
        secret("fedcba9876543210"),
        SERVICE,
    );
    for r in [a, b] {
        let e = r.err().expect("a wrong secret was accepted");
        assert!(matches!(e, LinkError::WrongSecret), "{e}");
        assert!(e.to_string().contains("cluster secret differs"), "{e}");
    }
}

#[test]
fn another_service_is_refused() {
    let (a, b) = connect(
        secret("0123456789abcdef"),
        secret("0123456789abcdef"),
        "other",
    );
    let e = b.err().expect("another service was accepted");
    assert!(e.to_string().contains("another service"), "{e}");
    // The responder never answered: the initiator learns only that it was refused.
    let e = a.err().expect("another service was accepted");
    assert!(
        e.to_string()
            .contains("closed the connection during the handshake"),
        "{e}"
    );
}

#[test]
fn frame_reflected_to_its_sender_is_refused() {
    let (a, b) = connect(
        secret("0123456789abcdef"),
        secret("0123456789abcdef"),
        SERVICE,
    );
    let ((mut sa, _ta), (_sb, _tb)) = (a.unwrap(), b.unwrap());
    let frame = sa.tx.seal(4, &[b"checkpoint"]).unwrap();
    // The initiator's own receiving direction is at the same counter as its sending one was.
    let e = sa.rx.recv(&mut &frame[..]).unwrap_err();
    assert!(matches!(e, LinkError::Auth(_)), "{e}");
}

#[test]
fn silent_peer_fails_with_a_timeout_not_a_hang() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let _held = l.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let e = handshake(
        &mut &s,
        &mut &s,
        &secret("0123456789abcdef"),
        Role::Initiator,
        SERVICE,
        1024,
    )
    .err()
    .expect("handshake with a silent peer succeeded");
    assert!(matches!(e, LinkError::Io(_)), "{e}");
}
