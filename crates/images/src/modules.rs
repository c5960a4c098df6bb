//! Kernel modules for the initramfs: find them in an extracted kernel package, resolve their
//! dependencies from each module's `.modinfo` (Debian ships no `modules.dep`; `depmod` makes it
//! at install time), decompress compressed ones, and order them for loading.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::Error;

/// One module picked for the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Module name (`virtio_mmio`).
    pub name: String,
    /// Path below `lib/modules/<release>/`, always ending in `.ko` (decompressed).
    pub rel_path: String,
    /// The uncompressed module.
    pub data: Vec<u8>,
    /// Names of the modules it needs (built-in ones left out).
    pub depends: Vec<String>,
}

/// Module name of a file name: `virtio-rng.ko.xz` → `virtio_rng`.
fn module_name(file_name: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(ext))?;
    Some(stem.replace('-', "_"))
}

/// The `key=value` strings of an ELF64 little-endian module's `.modinfo` section.
pub fn modinfo(elf: &[u8]) -> Result<Vec<(String, String)>, String> {
    let u16_at = |o: usize| -> Result<u16, String> {
        elf.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
            .ok_or_else(|| "truncated ELF".to_string())
    };
    let u32_at = |o: usize| -> Result<u32, String> {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| "truncated ELF".to_string())
    };
    let u64_at = |o: usize| -> Result<u64, String> {
        elf.get(o..o + 8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                u64::from_le_bytes(a)
            })
            .ok_or_else(|| "truncated ELF".to_string())
    };
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if elf[4] != 2 || elf[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let shoff = u64_at(0x28)? as usize;
    let shentsize = u16_at(0x3a)? as usize;
    let shnum = u16_at(0x3c)? as usize;
    let shstrndx = u16_at(0x3e)? as usize;
    if shentsize < 64 || shstrndx >= shnum {
        return Err("bad ELF section table".into());
    }
    let section = |i: usize| -> Result<(u32, usize, usize), String> {
        let base = shoff + i * shentsize;
        let name = u32_at(base)?;
        let offset = u64_at(base + 24)? as usize;
        let size = u64_at(base + 32)? as usize;
        Ok((name, offset, size))
    };
    let bytes_of = |offset: usize, size: usize| -> Result<&[u8], String> {
        elf.get(offset..offset.saturating_add(size))
            .ok_or_else(|| "ELF section outside the file".to_string())
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let strtab = bytes_of(str_off, str_size)?;
    for i in 0..shnum {
        let (name, offset, size) = section(i)?;
        let name = strtab
            .get(name as usize..)
            .and_then(|s| s.split(|b| *b == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return Ok(bytes_of(offset, size)?
                .split(|b| *b == 0)
                .filter_map(|s| std::str::from_utf8(s).ok())
                .filter_map(|s| s.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect());
        }
    }
    Err("no .modinfo section".into())
}

/// Decompresses a module file according to its extension.
fn read_module(path: &Path) -> Result<Vec<u8>, Error> {
    let name = path.to_string_lossy();
    let io_err = |e: std::io::Error| Error::Build(format!("cannot read {name}: {e}"));
    if name.ends_with(".ko") {
        return std::fs::read(path).map_err(io_err);
    }
    if name.ends_with(".ko.gz") {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(std::fs::File::open(path).map_err(io_err)?)
            .read_to_end(&mut out)
            .map_err(io_err)?;
        return Ok(out);
    }
    // xz and zstd: the host's tools (busybox insmod cannot load zstd modules, so the image
    // always carries plain .ko files).
    let (tool, package) = if name.ends_with(".ko.xz") {
        ("xz", "xz-utils")
    } else {
        ("zstd", "zstd")
    };
    let out = Command::new(tool)
        .args(["-dc", "--"])
        .arg(path)
        .output()
        .map_err(|e| {
            Error::MissingTool(format!(
                "{tool} is needed to decompress {name} ({e}): install it with `apt-get install {package}`"
            ))
        })?;
    if !out.status.success() {
        return Err(Error::Build(format!(
            "{tool} could not decompress {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(out.stdout)
}

/// Resolves `wanted` and all their dependencies in the module tree `modules_dir`
/// (`.../lib/modules/<release>`) and returns them in load order (dependencies first).
/// Modules listed in `modules.builtin` count as present.
pub fn resolve(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<Module>, Error> {
    let mut files: BTreeMap<String, PathBuf> = BTreeMap::new();
    let kernel_dir = modules_dir.join("kernel");
    let mut stack = vec![kernel_dir.clone()];
    while let Some(dir) = stack.pop() {
        let rd = std::fs::read_dir(&dir)
            .map_err(|e| Error::Build(format!("cannot read {}: {e}", dir.display())))?;
        for ent in rd {
            let ent =
                ent.map_err(|e| Error::Build(format!("cannot read {}: {e}", dir.display())))?;
            let path = ent.path();
            let ft = ent
                .file_type()
                .map_err(|e| Error::Build(format!("cannot stat {}: {e}", path.display())))?;
            if ft.is_dir() {
                stack.push(path);
            } else if let Some(name) = ent.file_name().to_str().and_then(module_name) {
                files.insert(name, path);
            }
        }
    }
    let builtin: BTreeSet<String> = std::fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();

    let mut loaded: BTreeMap<String, Module> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    // Depth-first, dependencies before dependants; `visiting` catches cycles.
    fn visit(
        name: &str,
        files: &BTreeMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        kernel_dir: &Path,
        loaded: &mut BTreeMap<String, Module>,
        order: &mut Vec<String>,
        visiting: &mut Vec<String>,
    ) -> Result<(), Error> {
        if loaded.contains_key(name) || builtin.contains(name) {
            return Ok(());
        }
        if visiting.iter().any(|v| v == name) {
            return Err(Error::Build(format!(
                "module dependency cycle: {} -> {name}",
                visiting.join(" -> ")
            )));
        }
        let path = files.get(name).ok_or_else(|| {
            Error::Build(format!(
                "module {name} is neither in {} nor built in{}",
                kernel_dir.display(),
                if visiting.is_empty() {
                    String::new()
                } else {
                    format!(" (needed by {})", visiting.join(" -> "))
                }
            ))
        })?;
        let data = read_module(path)?;
        let info =
            modinfo(&data).map_err(|e| Error::Build(format!("module {}: {e}", path.display())))?;
        let depends: Vec<String> = info
            .iter()
            .filter(|(k, _)| k == "depends")
            .flat_map(|(_, v)| v.split(','))
            .map(|d| d.trim().replace('-', "_"))
            .filter(|d| !d.is_empty() && !builtin.contains(d))
            .collect();
        visiting.push(name.to_string());
        for d in &depends {
            visit(d, files, builtin, kernel_dir, loaded, order, visiting)?;
        }
        visiting.pop();
        let rel = path
            .strip_prefix(kernel_dir.parent().unwrap_or(kernel_dir))
            .unwrap_or(path)
            .to_string_lossy()
            .to_string();
        let rel_path = [".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .find_map(|ext| rel.strip_suffix(ext))
            .map(|stem| format!("{stem}.ko"))
            .unwrap_or(rel);
        loaded.insert(
            name.to_string(),
            Module {
                name: name.to_string(),
                rel_path,
                data,
                depends,
            },
        );
        order.push(name.to_string());
        Ok(())
    }
    for w in wanted {
        let name = w.replace('-', "_");
        visit(
            &name,
            &files,
            &builtin,
            &kernel_dir,
            &mut loaded,
            &mut order,
            &mut Vec::new(),
        )?;
    }
    Ok(order
        .into_iter()
        .filter_map(|n| loaded.remove(&n))
        .collect())
}

/// A `modules.dep` for `modules` (paths relative to `lib/modules/<release>`), so `modprobe`
/// works in the guest too.
pub fn modules_dep(modules: &[Module]) -> String {
    let path_of: BTreeMap<&str, &str> = modules
        .iter()
        .map(|m| (m.name.as_str(), m.rel_path.as_str()))
        .collect();
    let mut out = String::new();
    for m in modules {
        // modules.dep lists all transitive dependencies, nearest last-loaded first.
        let mut deps: Vec<&str> = Vec::new();
        let mut todo: Vec<&str> = m.depends.iter().map(String::as_str).collect();
        while let Some(d) = todo.pop() {
            if deps.contains(&d) {
                continue;
            }
            deps.push(d);
            if let Some(dm) = modules.iter().find(|x| x.name == d) {
                todo.extend(dm.depends.iter().map(String::as_str));
            }
        }
        let dep_paths: Vec<&str> = deps
            .iter()
            .filter_map(|d| path_of.get(d).copied())
            .collect();
        out.push_str(&m.rel_path);
        out.push(':');
        for p in dep_paths {
            out.push(' ');
            out.push_str(p);
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal ELF64 relocatable file with a `.modinfo` section holding `info`.
    pub(crate) fn fake_module(info: &[&str]) -> Vec<u8> {
        let mut modinfo = Vec::new();
        for s in info {
            modinfo.extend_from_slice(s.as_bytes());
            modinfo.push(0);
        }
        let shstrtab = b"\0.modinfo\0.shstrtab\0".to_vec();
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little endian
        elf[6] = 1;
        elf[16] = 1; // ET_REL
        elf[18] = 62; // x86-64
        let modinfo_off = elf.len();
        elf.extend_from_slice(&modinfo);
        let shstr_off = elf.len();
        elf.extend_from_slice(&shstrtab);
        while elf.len() & 7 != 0 {
            elf.push(0);
        }
        let shoff = elf.len();
        let mut sh = |name: u32, ty: u32, off: usize, size: usize| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[4..8].copy_from_slice(&ty.to_le_bytes());
            h[24..32].copy_from_slice(&(off as u64).to_le_bytes());
            h[32..40].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&h);
        };
        sh(0, 0, 0, 0);
        sh(1, 1, modinfo_off, modinfo.len());
        sh(10, 3, shstr_off, shstrtab.len());
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x34..0x36].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }

    /// A module tree like Debian's: virtio modules in their directories, no modules.dep.
    pub(crate) fn fake_tree(root: &Path) -> PathBuf {
        let dir = root.join("lib/modules/6.1.0-99-cloud-amd64");
        let put = |rel: &str, info: &[&str]| {
            let p = dir.join("kernel").join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, fake_module(info)).unwrap();
        };
        put("drivers/virtio/virtio.ko", &["name=virtio", "depends="]);
        put(
            "drivers/virtio/virtio_ring.ko",
            &["name=virtio_ring", "depends="],
        );
        put(
            "drivers/virtio/virtio_mmio.ko",
            &["name=virtio_mmio", "depends=virtio,virtio_ring"],
        );
        put(
            "drivers/block/virtio_blk.ko",
            &["name=virtio_blk", "depends=virtio,virtio_ring"],
        );
        put(
            "drivers/net/virtio_net.ko",
            &["name=virtio_net", "depends=virtio_ring,virtio,net_failover"],
        );
        put(
            "drivers/net/net_failover.ko",
            &["name=net_failover", "depends=failover"],
        );
        put("net/core/failover.ko", &["name=failover", "depends="]);
        put(
            "drivers/char/hw_random/virtio-rng.ko",
            &["name=virtio_rng", "depends=virtio,virtio_ring,rng_core"],
        );
        std::fs::write(
            dir.join("modules.builtin"),
            "kernel/drivers/char/hw_random/rng-core.ko\n",
        )
        .unwrap();
        dir
    }

    #[test]
    fn parses_modinfo() {
        let info = modinfo(&fake_module(&["license=GPL", "depends=a,b", "name=x"])).unwrap();
        assert!(info.contains(&("depends".into(), "a,b".into())));
        assert!(info.contains(&("name".into(), "x".into())));
        assert!(modinfo(b"not an elf").is_err());
        let mut truncated = fake_module(&["depends="]);
        truncated.truncate(80);
        assert!(modinfo(&truncated).is_err());
    }

    #[test]
    fn resolves_dependencies_in_load_order() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = fake_tree(tmp.path());
        let mods = resolve(&dir, &["virtio_mmio", "virtio_blk", "virtio_net"]).unwrap();
        let names: Vec<&str> = mods.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names.len(), 7, "{names:?}");
        let pos = |n: &str| names.iter().position(|x| *x == n).unwrap();
        for m in &mods {
            for d in &m.depends {
                assert!(pos(d) < pos(&m.name), "{d} must load before {}", m.name);
            }
        }
        assert_eq!(
            mods[pos("failover")].rel_path,
            "kernel/net/core/failover.ko"
        );
        // Built-in dependencies are skipped; `-` and `_` are the same.
        let rng = resolve(&dir, &["virtio-rng"]).unwrap();
        assert_eq!(rng.last().unwrap().name, "virtio_rng");
        assert!(rng.iter().all(|m| m.name != "rng_core"));
        let dep = modules_dep(&mods);
        assert!(dep.contains("kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"));
        let err = resolve(&dir, &["nope"]).unwrap_err().to_string();
        assert!(err.contains("module nope"), "{err}");
    }

    #[test]
    fn decompresses_gzip_and_xz_modules() {
        use std::io::Write;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("lib/modules/x");
        let kdir = dir.join("kernel/drivers");
        std::fs::create_dir_all(&kdir).unwrap();
        let a = fake_module(&["name=a", "depends=b"]);
        let mut gz = flate2::write::GzEncoder::new(
            std::fs::File::create(kdir.join("a.ko.gz")).unwrap(),
            flate2::Compression::fast(),
        );
        gz.write_all(&a).unwrap();
        gz.finish().unwrap();
        let b = fake_module(&["name=b", "depends="]);
        std::fs::write(kdir.join("b.ko"), &b).unwrap();
        let have_xz = Command::new("xz").arg("--version").output().is_ok();
        if have_xz {
            std::fs::write(kdir.join("b.ko"), &b).unwrap();
            let st = Command::new("xz")
                .arg("-z")
                .arg(kdir.join("b.ko"))
                .status()
                .unwrap();
            assert!(st.success());
        }
        let mods = resolve(&dir, &["a"]).unwrap();
        assert_eq!(mods.len(), 2);
        assert_eq!(mods[0].name, "b");
        assert_eq!(mods[0].data, b);
        assert_eq!(mods[0].rel_path, "kernel/drivers/b.ko");
        assert_eq!(mods[1].data, a);
        assert_eq!(mods[1].rel_path, "kernel/drivers/a.ko");
    }
}
