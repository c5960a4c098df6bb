//! Helpers shared by the storage integration tests.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

/// Runs qemu-img; returns (exit status, stdout + stderr).
pub fn qemu_img(args: &[&str]) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img must be installed (apt-get install qemu-utils)");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), s)
}

/// `qemu-img convert -c` of the raw image `raw` into the compressed qcow2 `img`, with
/// `opts` (e.g. `compression_type=zstd,cluster_size=4096`); asserts it worked.
pub fn convert_compressed(raw: &Path, img: &Path, opts: &str) {
    let (code, out) = qemu_img(&[
        "convert",
        "-c",
        "-f",
        "raw",
        "-O",
        "qcow2",
        "-o",
        opts,
        raw.to_str().unwrap(),
        img.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "qemu-img convert -c -o {opts}: {out}");
}

/// Asserts `qemu-img check` finds no errors and no leaks.
pub fn assert_check_clean(p: &Path) {
    let (code, out) = qemu_img(&["check", p.to_str().unwrap()]);
    assert_eq!(code, 0, "qemu-img check {}:\n{out}", p.display());
    assert!(out.contains("No errors were found"), "{out}");
}

/// Asserts qemu-img compare (raw `expected` vs qcow2 `img`) finds identical contents.
pub fn assert_same(img: &Path, expected: &Path) {
    let (code, out) = qemu_img(&[
        "compare",
        "-f",
        "qcow2",
        "-F",
        "raw",
        img.to_str().unwrap(),
        expected.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "qemu-img compare: {out}");
}

/// A small deterministic generator (xorshift64*).
pub struct Rng(pub u64);
impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    pub fn fill(&mut self, buf: &mut [u8]) {
        for c in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}
