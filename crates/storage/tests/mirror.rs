//! Mirroring in one process: a real TCP target on loopback, real files.

mod common;

use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use common::Rng;
use storage::fault::{FaultSwitch, FaultyBackend};
use storage::mirror::{
    verify, DirtyBitmap, MirrorConfig, MirrorTarget, MirroredBackend, PeerClient, Secret,
};
use storage::{BlockBackend, RawFile};

const MIB: u64 = 1 << 20;
const SECRET: &str = "mirror test cluster secret";

fn secret() -> Secret {
    Secret::new(SECRET.as_bytes()).unwrap()
}

fn raw(p: &Path, size: u64) -> Box<dyn BlockBackend> {
    if !p.exists() {
        fs::File::create(p).unwrap().set_len(size).unwrap();
    }
    Box::new(RawFile::open(p, false).unwrap())
}

fn target(dir: &Path, size: u64, listener: TcpListener, id: u64) -> MirrorTarget {
    let disk = raw(&dir.join("peer.raw"), size);
    MirrorTarget::spawn(
        listener,
        disk,
        "v",
        id,
        &dir.join("peer.target.json"),
        secret(),
    )
    .unwrap()
}

fn cfg(dir: &Path, addr: &str) -> MirrorConfig {
    let mut c = MirrorConfig::new(addr, "v", dir.join("local.bitmap"), secret());
    c.state_path = Some(dir.join("local.state.json"));
    c.io_timeout = Duration::from_secs(2);
    c.reconnect_interval = Duration::from_millis(100);
    c
}

fn random_writes(b: &mut dyn BlockBackend, rng: &mut Rng, n: usize) {
    let size = b.size();
    for i in 0..n {
        let len = 512 * (1 + rng.below(64)) as usize;
        let off = rng.below((size - len as u64) / 512) * 512;
        let mut buf = vec![0u8; len];
        rng.fill(&mut buf);
        b.write_at(&buf, off).unwrap();
        if i % 16 == 0 {
            b.flush().unwrap();
        }
    }
    b.flush().unwrap();
}

fn same_files(a: &Path, b: &Path) {
    assert!(
        fs::read(a).unwrap() == fs::read(b).unwrap(),
        "replicas differ"
    );
}

#[test]
fn writes_reach_both_replicas_and_verify_agrees() {
    let d = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let _t = target(d.path(), size, l, 42);
    let mut m = MirroredBackend::open(raw(&d.path().join("local.raw"), size), cfg(d.path(), &addr))
        .unwrap();
    assert!(m.wait_in_sync(Duration::from_secs(20)), "initial full sync");
    random_writes(&mut m, &mut Rng(1), 300);
    let st = m.status();
    assert!(st.connected && st.local_failed.is_none(), "{st:?}");
    let mut local = raw(&d.path().join("local.raw"), size);
    let diffs = verify(local.as_mut(), &cfg(d.path(), &addr), MIB, &mut |_, _| {}).unwrap();
    assert!(diffs.is_empty(), "{diffs:?}");
    same_files(&d.path().join("local.raw"), &d.path().join("peer.raw"));
    // A divergence is named by verify.
    local.write_at(&[0xee; 512], 5 * MIB + 4096).unwrap();
    let diffs = verify(local.as_mut(), &cfg(d.path(), &addr), MIB, &mut |_, _| {}).unwrap();
    assert_eq!(diffs.len(), 1);
    assert_eq!((diffs[0].offset, diffs[0].len), (5 * MIB, MIB));
}

#[test]
fn unreachable_peer_is_tracked_in_a_persisted_bitmap_then_resynced() {
    let d = tempfile::tempdir().unwrap();
    let size = 32 * MIB;
    // Reserve a port, leave it closed for now.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    // The peer starts out identical and known (as after an earlier sync).
    fs::File::create(d.path().join("peer.raw"))
        .unwrap()
        .set_len(size)
        .unwrap();
    DirtyBitmap::open(&d.path().join("local.bitmap"), size, MIB)
        .unwrap()
        .set_peer_id(7)
        .unwrap();
    {
        let mut m =
            MirroredBackend::open(raw(&d.path().join("local.raw"), size), cfg(d.path(), &addr))
                .unwrap();
        assert!(!m.status().connected);
        m.write_at(&[1u8; 8192], 3 * MIB).unwrap();
        m.write_at(&[2u8; 512], 20 * MIB + 512).unwrap();
        m.flush().unwrap();
    }
    // The bitmap survives the "restart": exactly the two written regions are dirty.
    let bm = DirtyBitmap::open(&d.path().join("local.bitmap"), size, MIB).unwrap();
    assert_eq!(bm.count(), 2);
    assert!(bm.is_set(3) && bm.is_set(20));
    drop(bm);
    let mut m = MirroredBackend::open(raw(&d.path().join("local.raw"), size), cfg(d.path(), &addr))
        .unwrap();
    m.write_at(&[3u8; 4096], 30 * MIB).unwrap();
    let _t = target(d.path(), size, TcpListener::bind(&addr).unwrap(), 7);
    assert!(m.wait_in_sync(Duration::from_secs(20)), "{:?}", m.status());
    let st = m.status();
    assert!(!st.resync_full, "same replica: incremental, not full");
    assert_eq!(
        st.resync_bytes,
        3 * MIB,
        "only the three dirty regions were copied"
    );
    m.flush().unwrap();
    same_files(&d.path().join("local.raw"), &d.path().join("peer.raw"));
}

#[test]
fn new_replica_gets_a_full_sync_while_in_use() {
    let d = tempfile::tempdir().unwrap();
    let size = 24 * MIB;
    let mut local = raw(&d.path().join("local.raw"), size);
    random_writes(local.as_mut(), &mut Rng(9), 200);
    drop(local);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let _t = target(d.path(), size, l, 1234);
    let mut m = MirroredBackend::open(raw(&d.path().join("local.raw"), size), cfg(d.path(), &addr))
        .unwrap();
    // Guest I/O during the full sync.
    random_writes(&mut m, &mut Rng(10), 100);
    assert!(m.wait_in_sync(Duration::from_secs(30)), "{:?}", m.status());
    m.flush().unwrap();
    same_files(&d.path().join("local.raw"), &d.path().join("peer.raw"));
    let state: serde_json::Value =
        serde_json::from_slice(&fs::read(d.path().join("peer.target.json")).unwrap()).unwrap();
    assert_eq!(state["consistent"], true);
}

#[test]
fn local_io_error_switches_to_the_peer() {
    let d = tempfile::tempdir().unwrap();
    let size = 8 * MIB;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let _t = target(d.path(), size, l, 5);
    let switch = FaultSwitch::new();
    let local = Box::new(FaultyBackend::new(
        raw(&d.path().join("local.raw"), size),
        switch.clone(),
    ));
    let mut m = MirroredBackend::open(local, cfg(d.path(), &addr)).unwrap();
    assert!(m.wait_in_sync(Duration::from_secs(20)));
    m.write_at(&[7u8; 65536], MIB).unwrap();
    m.flush().unwrap();
    switch.fail_reads(true);
    switch.fail_writes(true);
    // The guest sees no error: reads come from the peer, writes go to it.
    let mut buf = vec![0u8; 65536];
    m.read_at(&mut buf, MIB).unwrap();
    assert!(buf.iter().all(|b| *b == 7));
    m.write_at(&[8u8; 4096], 2 * MIB).unwrap();
    m.flush().unwrap();
    let mut b2 = vec![0u8; 4096];
    m.read_at(&mut b2, 2 * MIB).unwrap();
    assert!(b2.iter().all(|b| *b == 8));
    assert!(switch.failures() > 0);
    let st = m.status();
    let why = st.local_failed.clone().expect("fault recorded");
    assert!(why.contains("injected"), "{why}");
    // And it is visible to other processes (ftvm volume info reads this file).
    let state = fs::read_to_string(d.path().join("local.state.json")).unwrap();
    assert!(state.contains("injected"), "{state}");
    let peer = fs::read(d.path().join("peer.raw")).unwrap();
    assert!(peer[2 * MIB as usize..2 * MIB as usize + 4096]
        .iter()
        .all(|b| *b == 8));
}

#[test]
fn client_without_the_secret_reads_and_writes_nothing() {
    use std::io::{Read, Write};
    let d = tempfile::tempdir().unwrap();
    let size = 4 * MIB;
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let _t = target(d.path(), size, l, 77);
    fs::write(d.path().join("peer.raw"), vec![0x5au8; size as usize]).unwrap();

    // A plain TCP client speaking the old protocol gets not a single byte back.
    let mut s = std::net::TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut old = vec![0u8; 64];
    old[..4].copy_from_slice(b"FTM1");
    s.write_all(&old).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.is_empty(), "a stranger got {} bytes", got.len());

    // A node with another secret is refused with a clear error, reads and writes nothing.
    let mut wrong = cfg(d.path(), &addr);
    wrong.secret = Secret::new(&b"not the cluster secret"[..]).unwrap();
    let e = PeerClient::connect(&wrong, size)
        .err()
        .expect("wrong secret connected");
    assert!(e.to_string().contains("cluster secret differs"), "{e}");
    {
        let mut m = MirroredBackend::open(raw(&d.path().join("local.raw"), size), wrong).unwrap();
        m.write_at(&[1u8; 65536], 0).unwrap();
        m.flush().unwrap();
        let st = m.status();
        assert!(!st.connected, "{st:?}");
        assert!(
            st.faults.iter().any(|f| f.contains("cluster secret")),
            "{st:?}"
        );
    }
    assert!(fs::read(d.path().join("peer.raw"))
        .unwrap()
        .iter()
        .all(|b| *b == 0x5a));

    // The target still serves the right node after those connections.
    let mut ok = PeerClient::connect(&cfg(d.path(), &addr), size).unwrap();
    assert_eq!(ok.hello().replica_id, 77);
    let sums = ok.checksums(0, MIB as u32, 4).unwrap();
    assert_eq!(sums.len(), 4);
    assert_eq!(sums[0], crc32fast::hash(&vec![0x5au8; MIB as usize]));
}
