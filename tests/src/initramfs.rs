//! The guest's initramfs, in three layers concatenated into one file (the kernel unpacks each archive in turn):
//!
//! 1. **base** (cached, gzip): busybox-static and its applet links, kmod (`/sbin/modprobe`), ndctl, daxctl,
//!    nvme-cli, pciutils, xfsprogs tools and their shared libraries, the kernel modules with their dependencies
//!    and a `depmod` index. Keyed by the kernel package, the module list and the content of every file.
//! 2. **bins** (cached, gzip): the project's binaries (`nvstack` and the guest helpers), debug info stripped, with
//!    any library the base lacks. Keyed by the content of the unstripped binaries.
//! 3. **scenario** (per run, plain cpio): `/init`, the step scripts and the environment.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;

use crate::cpio::CpioWriter;
use crate::error::HarnessError;
use crate::host::{self, find_tool, write_atomic, KeyHasher};
use crate::kernel::{self, Kernel};

/// Bumped when the layout of a layer changes, so that old cache entries are not reused.
const FORMAT_VERSION: &str = "nvstack-initramfs-1";

/// Modules every guest may load (EMULATION.md's list, the NVMe driver and the crc32c XFS needs), dependencies
/// added automatically. Scenarios add theirs with `machine.modules`.
pub const BASE_MODULES: &[&str] = &[
    "vfio",
    "vfio_iommu_type1",
    "vfio_pci",
    "vfio_pci_core",
    "irqbypass",
    "libnvdimm",
    "nd_pmem",
    "nd_btt",
    "dax_pmem",
    "device_dax",
    "nfit",
    "hwpoison_inject",
    "xfs",
    "nvme",
    "nvme_core",
    "crc32c_generic",
    "crc32c_intel",
];

/// Host tools copied into the guest: (program, Debian package).
pub const GUEST_TOOLS: &[(&str, &str)] = &[
    ("ndctl", "ndctl"),
    ("daxctl", "daxctl"),
    ("nvme", "nvme-cli"),
    ("lspci", "pciutils"),
    ("setpci", "pciutils"),
    ("mkfs.xfs", "xfsprogs"),
    ("xfs_io", "xfsprogs"),
    ("xfs_db", "xfsprogs"),
];

/// kmod's personalities, linked to `/usr/bin/kmod` (and `/sbin/modprobe`, where the kernel looks for it).
const KMOD_LINKS: &[&str] = &["modprobe", "insmod", "rmmod", "lsmod", "modinfo", "depmod"];

/// Where a file's bytes come from.
#[derive(Debug, Clone)]
enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Node {
    Dir,
    File { src: Source, perm: u32 },
    Symlink(String),
    CharDev(u32, u32),
}

/// A file tree to be written as a cpio archive. Paths are absolute guest paths.
#[derive(Debug, Default, Clone)]
pub struct Tree {
    nodes: BTreeMap<String, Node>,
}

fn norm(path: &str) -> String {
    path.trim_matches('/').to_string()
}

impl Tree {
    fn parents(&mut self, path: &str) {
        let mut acc = String::new();
        let parts: Vec<&str> = path.split('/').collect();
        for p in &parts[..parts.len().saturating_sub(1)] {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(p);
            self.nodes.entry(acc.clone()).or_insert(Node::Dir);
        }
    }

    fn insert(&mut self, path: &str, node: Node) {
        let p = norm(path);
        self.parents(&p);
        self.nodes.insert(p, node);
    }

    /// Whether `path` is in the tree.
    pub fn contains(&self, path: &str) -> bool {
        self.nodes.contains_key(&norm(path))
    }

    /// A directory (and its parents).
    pub fn dir(&mut self, path: &str) {
        self.insert(path, Node::Dir);
    }

    /// A file with the given contents.
    pub fn bytes(&mut self, path: &str, perm: u32, data: impl Into<Vec<u8>>) {
        self.insert(path, Node::File { src: Source::Bytes(data.into()), perm });
    }

    /// A file copied from the host when the archive is written.
    pub fn host_file(&mut self, path: &str, perm: u32, host: &Path) {
        self.insert(path, Node::File { src: Source::Host(host.to_path_buf()), perm });
    }

    /// A symbolic link.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.insert(path, Node::Symlink(target.to_string()));
    }

    /// A character device node.
    pub fn char_dev(&mut self, path: &str, major: u32, minor: u32) {
        self.insert(path, Node::CharDev(major, minor));
    }

    /// A host program and the shared libraries `ldd` lists for it (at the same paths), except those in `skip`.
    ///
    /// # Errors
    /// When `ldd` cannot run.
    pub fn program(&mut self, guest: &str, host: &Path, skip: &Tree) -> Result<(), HarnessError> {
        self.host_file(guest, 0o755, host);
        for lib in shared_libraries(host)? {
            let g = lib.to_string_lossy().into_owned();
            if !skip.contains(&g) {
                self.host_file(&g, 0o755, &lib);
            }
        }
        Ok(())
    }

    /// Feed every path, kind, mode and file content into `h`.
    ///
    /// # Errors
    /// When a host file cannot be read.
    pub fn key(&self, h: &mut KeyHasher) -> Result<(), HarnessError> {
        for (path, node) in &self.nodes {
            h.piece(path.as_bytes());
            match node {
                Node::Dir => h.piece(b"d"),
                Node::Symlink(t) => {
                    h.piece(b"l");
                    h.piece(t.as_bytes());
                }
                Node::CharDev(a, b) => h.piece(format!("c{a}:{b}").as_bytes()),
                Node::File { src, perm } => {
                    h.piece(format!("f{perm:o}").as_bytes());
                    match src {
                        Source::Bytes(b) => h.piece(b),
                        Source::Host(p) => {
                            h.piece(&std::fs::read(p).map_err(|e| HarnessError::io("hashing initramfs input", p, e))?)
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Write the tree as a `newc` archive (parents sort before children, as the kernel needs).
    ///
    /// # Errors
    /// When a host file cannot be read or writing fails.
    pub fn write<W: Write>(&self, out: W) -> Result<W, HarnessError> {
        let err = |e| HarnessError::io("writing initramfs", "(archive)", e);
        let mut w = CpioWriter::new(out);
        for (path, node) in &self.nodes {
            match node {
                Node::Dir => w.dir(path, 0o755).map_err(err)?,
                Node::Symlink(t) => w.symlink(path, t).map_err(err)?,
                Node::CharDev(a, b) => w.char_dev(path, 0o600, *a, *b).map_err(err)?,
                Node::File { src: Source::Bytes(b), perm } => w.file(path, *perm, b).map_err(err)?,
                Node::File { src: Source::Host(p), perm } => {
                    let data = std::fs::read(p).map_err(|e| HarnessError::io("reading initramfs input", p, e))?;
                    w.file(path, *perm, &data).map_err(err)?;
                }
            }
        }
        w.finish().map_err(err)
    }

    /// Write the tree gzip-compressed (fast level: TCG decompresses it at boot).
    ///
    /// # Errors
    /// As [`Tree::write`].
    pub fn write_gz(&self) -> Result<Vec<u8>, HarnessError> {
        let gz = self.write(GzEncoder::new(Vec::new(), flate2::Compression::fast()))?;
        gz.finish().map_err(|e| HarnessError::io("compressing initramfs", "(archive)", e))
    }
}

/// The shared libraries `ldd` lists for `bin` (empty for a static program).
///
/// # Errors
/// When `ldd` cannot run.
pub fn shared_libraries(bin: &Path) -> Result<Vec<PathBuf>, HarnessError> {
    let ldd = find_tool("ldd", "libc-bin")?;
    let out = Command::new(&ldd).arg(bin).output().map_err(|source| HarnessError::Spawn {
        step: "listing shared libraries".into(),
        command: format!("ldd {}", bin.display()),
        source,
    })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": a static program needs nothing.
        return Ok(Vec::new());
    }
    Ok(parse_ldd(&text))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rhs)) => rhs.trim().split(" (").next().unwrap_or(""),
            None => line.split(" (").next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    libs
}

/// A built layer.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The archive file.
    pub path: PathBuf,
    /// Whether it came from the cache.
    pub reused: bool,
    /// Its size.
    pub size_bytes: u64,
}

fn cached_layer(path: PathBuf, build: impl FnOnce() -> Result<Vec<u8>, HarnessError>) -> Result<Layer, HarnessError> {
    if let Ok(m) = std::fs::metadata(&path) {
        return Ok(Layer { path, reused: true, size_bytes: m.len() });
    }
    let data = build()?;
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| HarnessError::io("creating cache dir", parent, e))?;
    }
    write_atomic(&path, &data)?;
    Ok(Layer { path, reused: false, size_bytes: data.len() as u64 })
}

/// The base layer's tree, without the `depmod` index (added when the layer is built).
///
/// # Errors
/// When a tool or module is missing.
pub fn base_tree(k: &Kernel, modules: &BTreeSet<String>) -> Result<(Tree, Vec<String>), HarnessError> {
    let mut t = Tree::default();
    for d in ["proc", "sys", "dev", "tmp", "run", "mnt", "root", "etc", "var/tmp", "usr/local/bin", "sbin"] {
        t.dir(d);
    }
    t.char_dev("dev/console", 5, 1);
    t.char_dev("dev/null", 1, 3);
    let busybox = find_tool("busybox", "busybox-static")?;
    if !shared_libraries(&busybox)?.is_empty() {
        return Err(HarnessError::Environment(format!(
            "{} is not static: install the Debian package busybox-static",
            busybox.display()
        )));
    }
    t.host_file("bin/busybox", 0o755, &busybox);
    let applets = host::run("listing busybox applets", Command::new(&busybox).arg("--list"))?;
    for a in applets.lines().map(str::trim).filter(|a| !a.is_empty() && *a != "busybox") {
        if !KMOD_LINKS.contains(&a) && a.bytes().all(|b| b.is_ascii_graphic() && b != b'/') {
            t.symlink(&format!("bin/{a}"), "busybox");
        }
    }
    let empty = Tree::default();
    t.program("usr/bin/kmod", &find_tool("kmod", "kmod")?, &empty)?;
    for l in KMOD_LINKS {
        t.symlink(&format!("usr/bin/{l}"), "kmod");
        t.symlink(&format!("sbin/{l}"), "../usr/bin/kmod");
    }
    for (tool, pkg) in GUEST_TOOLS {
        t.program(&format!("usr/bin/{tool}"), &find_tool(tool, pkg)?, &empty)?;
    }
    let ids = Path::new("/usr/share/misc/pci.ids");
    if ids.exists() {
        t.host_file("usr/share/misc/pci.ids", 0o644, ids);
    }
    let names: Vec<String> = modules.iter().cloned().collect();
    let files = k.module_index()?.closure(&names, &kernel::builtin_modules(k)?)?;
    let mdir = k.modules_dir();
    let gdir = format!("lib/modules/{}", k.version);
    for f in &files {
        t.host_file(&format!("{gdir}/{f}"), 0o644, &mdir.join(f));
    }
    for f in ["modules.builtin", "modules.builtin.modinfo", "modules.order"] {
        if mdir.join(f).exists() {
            t.host_file(&format!("{gdir}/{f}"), 0o644, &mdir.join(f));
        }
    }
    Ok((t, files.into_iter().collect()))
}

/// Run `depmod` over the chosen modules in a scratch tree and add its index files to `t`.
fn add_depmod_index(t: &mut Tree, k: &Kernel, files: &[String], scratch: &Path) -> Result<(), HarnessError> {
    let mdir = k.modules_dir();
    let sdir = scratch.join("lib/modules").join(&k.version);
    let _ = std::fs::remove_dir_all(scratch);
    for f in files.iter().map(String::as_str).chain(["modules.builtin", "modules.builtin.modinfo", "modules.order"]) {
        let (src, dst) = (mdir.join(f), sdir.join(f));
        if !src.exists() {
            continue;
        }
        if let Some(p) = dst.parent() {
            std::fs::create_dir_all(p).map_err(|e| HarnessError::io("creating depmod scratch", p, e))?;
        }
        std::fs::copy(&src, &dst).map_err(|e| HarnessError::io("copying a module", &src, e))?;
    }
    host::run(
        "indexing guest modules",
        Command::new(find_tool("depmod", "kmod")?).arg("-b").arg(scratch).arg(&k.version),
    )?;
    let rd = std::fs::read_dir(&sdir).map_err(|e| HarnessError::io("reading depmod output", &sdir, e))?;
    for e in rd.filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("modules.") && e.path().is_file() {
            let data = std::fs::read(e.path()).map_err(|er| HarnessError::io("reading depmod output", e.path(), er))?;
            t.bytes(&format!("lib/modules/{}/{name}", k.version), 0o644, data);
        }
    }
    let _ = std::fs::remove_dir_all(scratch);
    Ok(())
}

/// Build (or reuse) the base layer.
///
/// # Errors
/// When a tool, library or module is missing, or writing fails.
pub fn base_layer(cache: &Path, k: &Kernel, modules: &BTreeSet<String>) -> Result<(Layer, Tree), HarnessError> {
    let (mut t, files) = base_tree(k, modules)?;
    let mut h = KeyHasher::default();
    h.piece(FORMAT_VERSION.as_bytes());
    h.piece(k.package.as_bytes());
    t.key(&mut h)?;
    let path = cache.join("initrd").join(format!("base-{}.cpio.gz", h.hex()));
    let scratch = cache.join("initrd").join(format!("depmod.{}", std::process::id()));
    let index_tree = t.clone();
    let layer = cached_layer(path, || {
        add_depmod_index(&mut t, k, &files, &scratch)?;
        t.write_gz()
    })?;
    Ok((layer, index_tree))
}

/// Build (or reuse) the layer of project binaries: each `(host path, guest name)` goes to `/usr/local/bin/NAME`
/// with debug info stripped, plus any library that `base` lacks.
///
/// # Errors
/// When a binary is missing, stripping fails, or writing fails.
pub fn bins_layer(cache: &Path, bins: &[(PathBuf, String)], base: &Tree) -> Result<Layer, HarnessError> {
    let mut h = KeyHasher::default();
    h.piece(FORMAT_VERSION.as_bytes());
    let mut t = Tree::default();
    for (host_path, name) in bins {
        if !host_path.exists() {
            return Err(HarnessError::Environment(format!(
                "{} is missing: build it first (cargo build --release -p nvstack -p nvstack-tests)",
                host_path.display()
            )));
        }
        h.piece(name.as_bytes());
        t.program(&format!("usr/local/bin/{name}"), host_path, base)?;
    }
    t.key(&mut h)?;
    let path = cache.join("initrd").join(format!("bins-{}.cpio.gz", h.hex()));
    let scratch = cache.join("initrd").join(format!("strip.{}", std::process::id()));
    cached_layer(path, || {
        std::fs::create_dir_all(&scratch).map_err(|e| HarnessError::io("creating strip dir", &scratch, e))?;
        let objcopy = find_tool("objcopy", "binutils")?;
        for (host_path, name) in bins {
            let out = scratch.join(name);
            host::run("stripping debug info", Command::new(&objcopy).arg("--strip-debug").arg(host_path).arg(&out))?;
            let data = std::fs::read(&out).map_err(|e| HarnessError::io("reading stripped binary", &out, e))?;
            t.bytes(&format!("usr/local/bin/{name}"), 0o755, data);
        }
        let r = t.write_gz();
        let _ = std::fs::remove_dir_all(&scratch);
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parses() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            vec![PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"), PathBuf::from("/lib64/ld-linux-x86-64.so.2")]
        );
    }

    #[test]
    fn tree_adds_parents_and_sorts_them_first() {
        let mut t = Tree::default();
        t.bytes("/usr/local/bin/x", 0o755, b"x".to_vec());
        t.symlink("/bin/sh", "busybox");
        let out = t.write(Vec::new()).unwrap();
        let text = String::from_utf8_lossy(&out);
        let pos = |s: &str| text.find(s).unwrap();
        assert!(pos("usr\0") < pos("usr/local\0") && pos("usr/local\0") < pos("usr/local/bin/x\0"));
        assert!(t.contains("/bin") && t.contains("bin/sh"));
    }

    #[test]
    fn key_changes_with_content() {
        let mut a = Tree::default();
        a.bytes("f", 0o644, b"1".to_vec());
        let mut b = Tree::default();
        b.bytes("f", 0o644, b"2".to_vec());
        let (mut ha, mut hb) = (KeyHasher::default(), KeyHasher::default());
        a.key(&mut ha).unwrap();
        b.key(&mut hb).unwrap();
        assert_ne!(ha.hex(), hb.hex());
    }

    #[test]
    fn program_copies_libraries() {
        let mut t = Tree::default();
        t.program("bin/sh", Path::new("/bin/sh"), &Tree::default()).unwrap();
        assert!(t.nodes.keys().any(|k| k.contains("libc.so")), "{:?}", t.nodes.keys().collect::<Vec<_>>());
    }
}
