//! A fake sysfs tree in a temporary directory, and a fake kernel that answers it: a test instrument.
//!
//! The host that builds nvstack has no IOMMU, so every sysfs decision (which driver, which group, is the group
//! viable, is the device mounted, binding and unbinding, hugepage reservation) is tested against this tree. The
//! real thing is tested in the QEMU guest. [`FakeKernel`] plays the part of the PCI core: it watches the files
//! that `nvstack setup` writes (`drivers/*/unbind`, `drivers/*/bind`, `drivers_probe`, `nr_hugepages`) and moves
//! the `driver` links and hugepage counts as Linux would.
//!
//! Test code: it panics on I/O errors with a message, as tests do.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::sysfs::{PciAddress, Sysfs};

static NEXT_TREE: AtomicU64 = AtomicU64::new(0);

/// A fake root (`ROOT/sys/...`, `ROOT/dev/vfio`, `ROOT/proc/mounts`) removed on drop.
#[derive(Debug)]
pub struct FakeTree {
    root: PathBuf,
}

fn must<T>(r: std::io::Result<T>, what: &str, p: &Path) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("fake sysfs: {what} {}: {e}", p.display()),
    }
}

/// Replace the file's contents at once (a temporary file renamed over it): the program under test reads these files
/// while the fake kernel writes them, and a plain write lets it see the file empty between truncate and write
/// (as real sysfs never shows it).
fn write(p: &Path, s: &str) {
    if let Some(d) = p.parent() {
        must(std::fs::create_dir_all(d), "mkdir", d);
    }
    let mut tmp = p.as_os_str().to_owned();
    tmp.push(".fake-tmp");
    let tmp = PathBuf::from(tmp);
    must(std::fs::write(&tmp, s), "write", &tmp);
    must(std::fs::rename(&tmp, p), "rename", p);
}

fn relink(link: &Path, target: &Path) {
    let _ = std::fs::remove_file(link);
    if let Some(d) = link.parent() {
        must(std::fs::create_dir_all(d), "mkdir", d);
    }
    must(std::os::unix::fs::symlink(target, link), "symlink", link);
}

impl Default for FakeTree {
    fn default() -> Self {
        FakeTree::new()
    }
}

impl FakeTree {
    /// An empty tree with the PCI bus, the nvme and vfio-pci drivers, `/dev/vfio/vfio`, one NUMA node with no
    /// 2 MiB hugepages, and an empty `/proc/mounts`.
    pub fn new() -> FakeTree {
        let n = NEXT_TREE.fetch_add(1, Ordering::Relaxed);
        let root = std::env::temp_dir().join(format!("nvstack-fake-sysfs-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        must(std::fs::create_dir_all(root.join("sys/bus/pci/devices")), "mkdir", &root);
        let t = FakeTree { root };
        write(&t.root.join("sys/bus/pci/drivers_probe"), "");
        for d in ["nvme", "vfio-pci"] {
            t.add_driver(d);
        }
        must(std::fs::create_dir_all(t.root.join("sys/kernel/iommu_groups")), "mkdir", &t.root);
        write(&t.root.join("dev/vfio/vfio"), "");
        write(&t.root.join("proc/mounts"), "proc /proc proc rw 0 0\n");
        write(&t.root.join("proc/swaps"), "Filename\tType\tSize\tUsed\tPriority\n");
        for base in
            ["sys/kernel/mm/hugepages/hugepages-2048kB", "sys/devices/system/node/node0/hugepages/hugepages-2048kB"]
        {
            write(&t.root.join(base).join("nr_hugepages"), "0\n");
            write(&t.root.join(base).join("free_hugepages"), "0\n");
        }
        t
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A [`Sysfs`] on this tree.
    pub fn sysfs(&self) -> Sysfs {
        Sysfs::new(&self.root)
    }

    /// Add a driver directory with `bind` and `unbind`.
    pub fn add_driver(&self, name: &str) {
        let d = self.root.join("sys/bus/pci/drivers").join(name);
        write(&d.join("bind"), "");
        write(&d.join("unbind"), "");
    }

    /// Add a NUMA node (with no hugepages).
    pub fn add_node(&self, node: u32) {
        let base = self.root.join(format!("sys/devices/system/node/node{node}/hugepages/hugepages-2048kB"));
        write(&base.join("nr_hugepages"), "0\n");
        write(&base.join("free_hugepages"), "0\n");
    }

    /// Add a PCI function.
    pub fn add_function(
        &self,
        bdf: &str,
        vendor: u16,
        device: u16,
        class: u32,
        driver: Option<&str>,
        group: Option<u32>,
    ) {
        let dir = self.root.join("sys/bus/pci/devices").join(bdf);
        write(&dir.join("vendor"), &format!("0x{vendor:04x}\n"));
        write(&dir.join("device"), &format!("0x{device:04x}\n"));
        write(&dir.join("class"), &format!("0x{class:06x}\n"));
        write(&dir.join("numa_node"), "-1\n");
        write(&dir.join("driver_override"), "(null)\n");
        self.set_driver(bdf, driver);
        if let Some(g) = group {
            let gdir = self.root.join("sys/kernel/iommu_groups").join(g.to_string());
            relink(&dir.join("iommu_group"), &gdir);
            relink(&gdir.join("devices").join(bdf), &dir);
        }
    }

    /// Add a QEMU NVMe controller (1b36:0010).
    pub fn add_nvme(&self, bdf: &str, driver: Option<&str>, group: Option<u32>) {
        self.add_function(bdf, 0x1b36, 0x0010, super::sysfs::NVME_CLASS, driver, group);
    }

    /// Give `bdf` a kernel NVMe controller `ctrl` (e.g. "nvme0") with namespaces (e.g. ["nvme0n1"]) and their
    /// partitions (e.g. ["nvme0n1p1"]), as the nvme driver shows them.
    pub fn add_block(&self, bdf: &str, ctrl: &str, namespaces: &[&str], partitions: &[&str]) {
        let cdir = self.root.join("sys/bus/pci/devices").join(bdf).join("nvme").join(ctrl);
        for ns in namespaces {
            must(std::fs::create_dir_all(cdir.join(ns)), "mkdir", &cdir);
            must(std::fs::create_dir_all(self.root.join("sys/block").join(ns).join("holders")), "mkdir", &cdir);
            for p in partitions.iter().filter(|p| p.starts_with(ns)) {
                must(
                    std::fs::create_dir_all(self.root.join("sys/block").join(ns).join(p).join("holders")),
                    "mkdir",
                    &cdir,
                );
            }
        }
    }

    /// Record a holder (a device-mapper or md device) of block device `dev`.
    pub fn add_holder(&self, dev: &str, holder: &str) {
        let p = self.root.join("sys/block").join(dev).join("holders").join(holder);
        must(std::fs::create_dir_all(&p), "mkdir", &p);
    }

    /// Append a line to `/proc/mounts`.
    pub fn add_mount(&self, dev: &str, dir: &str, fstype: &str) {
        use std::io::Write;
        let p = self.root.join("proc/mounts");
        let mut f = must(std::fs::OpenOptions::new().append(true).open(&p), "open", &p);
        must(writeln!(f, "{dev} {dir} {fstype} rw,relatime 0 0"), "append", &p);
    }

    /// Point `bdf`'s `driver` link at `driver`, or remove it.
    pub fn set_driver(&self, bdf: &str, driver: Option<&str>) {
        let link = self.root.join("sys/bus/pci/devices").join(bdf).join("driver");
        match driver {
            Some(d) => {
                self.add_driver(d);
                relink(&link, &self.root.join("sys/bus/pci/drivers").join(d));
            }
            None => {
                let _ = std::fs::remove_file(&link);
            }
        }
    }

    /// Create `/dev/vfio/GROUP`.
    pub fn add_vfio_group_file(&self, group: u32) {
        write(&self.root.join("dev/vfio").join(group.to_string()), "");
    }

    /// The driver `bdf` is bound to.
    pub fn driver_of(&self, bdf: &str) -> Option<String> {
        std::fs::read_link(self.root.join("sys/bus/pci/devices").join(bdf).join("driver"))
            .ok()
            .and_then(|t| t.file_name().map(|n| n.to_string_lossy().into_owned()))
    }

    /// Start a fake kernel on this tree.
    pub fn kernel(&self) -> FakeKernel {
        FakeKernel::start(self.root.clone())
    }
}

impl Drop for FakeTree {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// A thread that answers writes to the fake tree as the kernel would. Stopped on drop.
#[derive(Debug)]
pub struct FakeKernel {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

fn take(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let t = s.trim().to_string();
    if t.is_empty() {
        return None;
    }
    std::fs::write(p, "").ok()?;
    Some(t)
}

fn default_driver(root: &Path, dev: &Path) -> Option<&'static str> {
    let class = std::fs::read_to_string(dev.join("class")).ok()?;
    (class.trim() == "0x010802" && root.join("sys/bus/pci/drivers/nvme").is_dir()).then_some("nvme")
}

fn bind(root: &Path, bdf: &str, driver: &str) {
    let dev = root.join("sys/bus/pci/devices").join(bdf);
    let link = dev.join("driver");
    if std::fs::symlink_metadata(&link).is_ok() {
        return; // already bound: the kernel refuses (EBUSY)
    }
    // The group's device node first: a program that sees the driver link may look for it at once.
    if driver == "vfio-pci" {
        if let Ok(g) = std::fs::read_link(dev.join("iommu_group")) {
            if let Some(n) = g.file_name() {
                write(&root.join("dev/vfio").join(n), "");
            }
        }
    }
    relink(&link, &root.join("sys/bus/pci/drivers").join(driver));
}

fn step(root: &Path, hp: &mut HpState) {
    let drivers = root.join("sys/bus/pci/drivers");
    if let Ok(rd) = std::fs::read_dir(&drivers) {
        for ent in rd.flatten() {
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(bdf) = take(&ent.path().join("unbind")) {
                let link = root.join("sys/bus/pci/devices").join(&bdf).join("driver");
                let bound_here = std::fs::read_link(&link).ok().and_then(|t| t.file_name().map(|n| n == name.as_str()));
                if bound_here == Some(true) {
                    let _ = std::fs::remove_file(&link);
                }
            }
            if let Some(bdf) = take(&ent.path().join("bind")) {
                bind(root, &bdf, &name);
            }
        }
    }
    if let Some(bdf) = take(&root.join("sys/bus/pci/drivers_probe")) {
        if bdf.parse::<PciAddress>().is_ok() {
            let dev = root.join("sys/bus/pci/devices").join(&bdf);
            let over = std::fs::read_to_string(dev.join("driver_override")).unwrap_or_default();
            let over = over.trim();
            let driver = if over.is_empty() || over == "(null)" {
                default_driver(root, &dev).map(str::to_string)
            } else {
                Some(over.to_string())
            };
            if let Some(d) = driver.filter(|d| drivers.join(d).is_dir()) {
                bind(root, &bdf, &d);
            }
        }
    }
    hugepages(root, hp);
}

/// What the fake kernel last wrote, to tell a new request from its own writes.
#[derive(Debug, Default)]
struct HpState {
    global: u64,
    nodes: Vec<(PathBuf, u64)>,
}

fn read_n(p: &Path) -> Option<u64> {
    std::fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok())
}

/// Hugepages: a write to a node's `nr_hugepages` reserves that many on the node; a write to the global one is spread
/// over the nodes; the global count is the sum over the nodes. Every reservation succeeds in full.
fn hugepages(root: &Path, st: &mut HpState) {
    let nodes = root.join("sys/devices/system/node");
    let global = root.join("sys/kernel/mm/hugepages/hugepages-2048kB");
    let mut node_dirs: Vec<PathBuf> = std::fs::read_dir(&nodes)
        .map(|rd| rd.flatten().map(|e| e.path().join("hugepages/hugepages-2048kB")).filter(|p| p.is_dir()).collect())
        .unwrap_or_default();
    node_dirs.sort();
    if st.nodes.iter().map(|(p, _)| p).ne(node_dirs.iter()) {
        st.nodes = node_dirs.iter().map(|d| (d.clone(), read_n(&d.join("nr_hugepages")).unwrap_or(0))).collect();
        st.global = st.nodes.iter().map(|(_, n)| n).sum();
    }
    let count = st.nodes.len().max(1) as u64;
    match read_n(&global.join("nr_hugepages")) {
        Some(want) if want != st.global => {
            let per = want.div_ceil(count);
            let mut left = want;
            for (d, n) in &mut st.nodes {
                *n = per.min(left);
                left -= *n;
                write(&d.join("nr_hugepages"), &format!("{n}\n"));
                write(&d.join("free_hugepages"), &format!("{n}\n"));
            }
        }
        _ => {
            for (d, n) in &mut st.nodes {
                if let Some(nr) = read_n(&d.join("nr_hugepages")).filter(|nr| nr != n) {
                    *n = nr;
                    write(&d.join("free_hugepages"), &format!("{nr}\n"));
                }
            }
        }
    }
    let total: u64 = st.nodes.iter().map(|(_, n)| n).sum();
    if total != st.global || read_n(&global.join("free_hugepages")) != Some(total) {
        st.global = total;
        write(&global.join("nr_hugepages"), &format!("{total}\n"));
        write(&global.join("free_hugepages"), &format!("{total}\n"));
    }
}

impl FakeKernel {
    fn start(root: PathBuf) -> FakeKernel {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = Arc::clone(&stop);
        // One step before returning: the hugepage state starts from the files as the test set them up, not from
        // whatever the program under test may already have written when the thread first runs.
        let mut hp = HpState::default();
        step(&root, &mut hp);
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::Relaxed) {
                step(&root, &mut hp);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        FakeKernel { stop, thread: Some(thread) }
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
