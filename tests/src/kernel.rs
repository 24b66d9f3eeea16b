//! The guest kernel: a Debian `linux-image-*-amd64` package fetched with `apt-get download`, unpacked with
//! `dpkg -x` into the cache (never installed on the host) and indexed with `depmod`. Cached per package name.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::HarnessError;
use crate::host::{self, find_tool};

/// Environment variable that pins the kernel package (e.g. `linux-image-6.1.0-56-amd64`).
pub const KERNEL_PKG_ENV: &str = "NVSTACK_QEMU_KERNEL_PKG";

/// An unpacked guest kernel.
#[derive(Debug, Clone)]
pub struct Kernel {
    /// The Debian package it came from.
    pub package: String,
    /// `uname -r` of the kernel, e.g. `6.1.0-56-amd64`.
    pub version: String,
    /// The unpacked package.
    pub root: PathBuf,
    /// The kernel image.
    pub vmlinuz: PathBuf,
    /// Whether it came from the cache (false: downloaded and unpacked by this run).
    pub reused: bool,
}

/// The xz stream magic inside a bzImage built with CONFIG_KERNEL_XZ.
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";

/// The uncompressed ELF kernel extracted from `k`'s bzImage, cached as `vmlinux` next to the unpacked tree, when
/// the kernel can boot from it (CONFIG_PVH: QEMU enters it through the PVH ELF note). Booting it skips the xz
/// decompression, which costs TCG several seconds per boot.
///
/// # Errors
/// Why not (then boot the bzImage): no CONFIG_PVH, not an xz bzImage, xz missing or failing.
pub fn pvh_vmlinux(k: &Kernel) -> Result<PathBuf, String> {
    let out = k.root.parent().ok_or("kernel tree has no parent")?.join("vmlinux");
    if out.exists() {
        return Ok(out);
    }
    let cfg_path = k.root.join("boot").join(format!("config-{}", k.version));
    let config = std::fs::read_to_string(&cfg_path).map_err(|e| format!("{}: {e}", cfg_path.display()))?;
    if !config.lines().any(|l| l == "CONFIG_PVH=y") {
        return Err("the kernel lacks CONFIG_PVH".into());
    }
    let image = std::fs::read(&k.vmlinuz).map_err(|e| format!("{}: {e}", k.vmlinuz.display()))?;
    let at = image.windows(XZ_MAGIC.len()).position(|w| w == XZ_MAGIC).ok_or("no xz stream in the bzImage")?;
    let xz = find_tool("xz", "xz-utils").map_err(|e| e.to_string())?;
    let mut child = Command::new(xz)
        .args(["-dc", "--single-stream"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("xz: {e}"))?;
    let mut stdin = child.stdin.take().ok_or("xz has no stdin")?;
    let payload = image[at..].to_vec();
    // xz stops reading after its stream, so this write may fail with a broken pipe: that is fine.
    let feeder = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &payload));
    let done = child.wait_with_output().map_err(|e| format!("xz: {e}"))?;
    let _ = feeder.join();
    if !done.status.success() || !done.stdout.starts_with(b"\x7fELF") {
        return Err(format!("xz -dc gave no ELF kernel ({})", done.status));
    }
    host::write_atomic(&out, &done.stdout).map_err(|e| e.to_string())?;
    Ok(out)
}

impl Kernel {
    /// `lib/modules/VERSION` of the unpacked tree.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join("lib/modules").join(&self.version)
    }

    /// Module name (dashes as underscores) to (path relative to the modules dir, dependencies' paths), from
    /// `modules.dep`.
    ///
    /// # Errors
    /// When `modules.dep` cannot be read.
    pub fn module_index(&self) -> Result<ModuleIndex, HarnessError> {
        let p = self.modules_dir().join("modules.dep");
        let text = std::fs::read_to_string(&p).map_err(|e| HarnessError::io("reading modules.dep", &p, e))?;
        Ok(ModuleIndex::parse(&text))
    }
}

/// The dependency graph of a kernel's modules.
#[derive(Debug, Default)]
pub struct ModuleIndex {
    deps: BTreeMap<String, (String, Vec<String>)>,
}

/// `kernel/drivers/vfio/pci/vfio-pci.ko` -> `vfio_pci`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

impl ModuleIndex {
    /// Parse `modules.dep` text (`path: dep dep ...` per line).
    pub fn parse(text: &str) -> ModuleIndex {
        let mut deps = BTreeMap::new();
        for line in text.lines() {
            let Some((path, rest)) = line.split_once(':') else { continue };
            let d = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(path), (path.to_string(), d));
        }
        ModuleIndex { deps }
    }

    /// The module files (relative paths) needed to load `names`, dependencies included.
    ///
    /// # Errors
    /// [`HarnessError::Environment`] naming a module the kernel does not have as a loadable module.
    pub fn closure(&self, names: &[String], builtin: &BTreeSet<String>) -> Result<BTreeSet<String>, HarnessError> {
        let mut out = BTreeSet::new();
        for n in names {
            let n = n.replace('-', "_");
            match self.deps.get(&n) {
                Some((path, d)) => {
                    out.insert(path.clone());
                    out.extend(d.iter().cloned());
                }
                None if builtin.contains(&n) => {}
                None => return Err(HarnessError::Environment(format!("kernel module {n} not found in modules.dep"))),
            }
        }
        Ok(out)
    }
}

/// Names of the modules built into the kernel (`modules.builtin`).
///
/// # Errors
/// When the file cannot be read.
pub fn builtin_modules(k: &Kernel) -> Result<BTreeSet<String>, HarnessError> {
    let p = k.modules_dir().join("modules.builtin");
    let text = std::fs::read_to_string(&p).map_err(|e| HarnessError::io("reading modules.builtin", &p, e))?;
    Ok(text.lines().map(module_name).collect())
}

/// The package `linux-image-amd64` depends on, or the pinned one.
fn kernel_package() -> Result<String, HarnessError> {
    if let Ok(p) = std::env::var(KERNEL_PKG_ENV) {
        if !p.is_empty() {
            return Ok(p);
        }
    }
    let apt_cache = find_tool("apt-cache", "apt")?;
    let out = host::run("finding the kernel package", Command::new(apt_cache).args(["depends", "linux-image-amd64"]))?;
    out.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64"))
        .map(str::to_string)
        .ok_or_else(|| {
            HarnessError::Environment(format!(
                "apt-cache depends linux-image-amd64 names no linux-image-*-amd64 package (run apt-get update, or \
                 set {KERNEL_PKG_ENV})"
            ))
        })
}

/// Make sure the guest kernel is unpacked in `cache/kernel/PACKAGE/`, downloading it if needed.
///
/// # Errors
/// When apt cannot find or download the package, or dpkg/depmod fail.
pub fn prepare(cache: &Path) -> Result<Kernel, HarnessError> {
    let package = kernel_package()?;
    let version = package
        .strip_prefix("linux-image-")
        .filter(|v| !v.is_empty() && !v.contains('/'))
        .ok_or_else(|| HarnessError::Environment(format!("{package} is not a linux-image-VERSION package")))?
        .to_string();
    let dir = cache.join("kernel").join(&package);
    let root = dir.join("root");
    let ready = dir.join("ready");
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    let mut k = Kernel { package: package.clone(), version: version.clone(), root, vmlinuz, reused: true };
    if ready.exists() && k.vmlinuz.exists() {
        return Ok(k);
    }
    k.reused = false;
    let work = dir.join(format!("work.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| HarnessError::io("creating kernel work dir", &work, e))?;
    let apt_get = find_tool("apt-get", "apt")?;
    let download = |w: &Path| {
        host::run("downloading the kernel", Command::new(&apt_get).arg("download").arg(&package).current_dir(w))
    };
    if let Err(first) = download(&work) {
        // Lists may be missing on a fresh machine; refresh them once when we may.
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err(first);
        }
        host::run("refreshing apt lists", Command::new(&apt_get).args(["update", "-qq"]))?;
        download(&work)?;
    }
    let deb = std::fs::read_dir(&work)
        .map_err(|e| HarnessError::io("listing the kernel download", &work, e))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| HarnessError::Environment(format!("apt-get download {package} left no .deb")))?;
    let unpacked = work.join("root");
    host::run("unpacking the kernel", Command::new(find_tool("dpkg", "dpkg")?).arg("-x").arg(&deb).arg(&unpacked))?;
    host::run(
        "indexing kernel modules",
        Command::new(find_tool("depmod", "kmod")?).arg("-b").arg(&unpacked).arg(&version),
    )?;
    let _ = std::fs::remove_dir_all(&k.root);
    std::fs::rename(&unpacked, &k.root).map_err(|e| HarnessError::io("moving the unpacked kernel", &k.root, e))?;
    let _ = std::fs::remove_dir_all(&work);
    std::fs::write(&ready, format!("{package}\n")).map_err(|e| HarnessError::io("marking kernel ready", &ready, e))?;
    if !k.vmlinuz.exists() {
        return Err(HarnessError::Environment(format!("{package} has no {}", k.vmlinuz.display())));
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_closure_follows_dependencies() {
        let idx = ModuleIndex::parse(
            "kernel/drivers/vfio/pci/vfio-pci.ko: kernel/drivers/vfio/pci/vfio-pci-core.ko kernel/drivers/vfio/vfio.ko\n\
             kernel/drivers/vfio/pci/vfio-pci-core.ko: kernel/drivers/vfio/vfio.ko\n\
             kernel/drivers/vfio/vfio.ko:\n",
        );
        let builtin: BTreeSet<String> = ["loop".to_string()].into();
        let c = idx.closure(&["vfio-pci".into(), "loop".into()], &builtin).unwrap();
        assert_eq!(c.len(), 3);
        assert!(c.contains("kernel/drivers/vfio/vfio.ko"));
        assert!(idx.closure(&["nope".into()], &builtin).is_err());
        assert_eq!(module_name("kernel/x/crc32c-intel.ko.xz"), "crc32c_intel");
    }
}
