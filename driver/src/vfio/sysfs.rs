//! PCI functions as sysfs shows them: addresses, drivers, IOMMU groups, and the checks made before opening VFIO.
//!
//! Every path is taken relative to a root directory ([`Sysfs::root`]): `/` on a real system, a temporary directory
//! in tests (see [`super::fake`]). Nothing here opens `/dev/vfio`; it only reads (and, for `nvstack setup`, writes)
//! attributes, so every error path is tested on the host, which has no IOMMU.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::DriverError;

/// PCI class code of an NVMe controller (mass storage, non-volatile memory, NVMe programming interface).
pub const NVME_CLASS: u32 = 0x01_08_02;
/// The VFIO PCI driver's name in sysfs.
pub const VFIO_PCI: &str = "vfio-pci";
/// The environment variable that moves the sysfs root (tests and fake trees).
pub const SYSFS_ROOT_ENV: &str = "NVSTACK_SYSFS_ROOT";

/// A PCI address (domain:bus:device.function), as `0000:00:04.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u32,
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04x}:{:02x}:{:02x}.{:x}", self.domain, self.bus, self.device, self.function)
    }
}

impl FromStr for PciAddress {
    type Err = DriverError;

    /// Parse `DDDD:BB:DD.F`, or `BB:DD.F` (domain 0).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |reason| DriverError::PciAddress { input: s.to_string(), reason };
        let t = s.trim();
        let (rest, func) = t.rsplit_once('.').ok_or_else(|| bad("no `.FUNCTION`"))?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, dev) = match parts.as_slice() {
            [d, b, v] => (*d, *b, *v),
            [b, v] => ("0", *b, *v),
            _ => return Err(bad("expected DOMAIN:BUS:DEVICE.FUNCTION")),
        };
        let hex = |x: &str, what| {
            if x.is_empty() || x.len() > 8 {
                return Err(bad(what));
            }
            u32::from_str_radix(x, 16).map_err(|_| bad(what))
        };
        let domain = hex(domain, "domain is not hex")?;
        let bus = u8::try_from(hex(bus, "bus is not hex")?).map_err(|_| bad("bus above ff"))?;
        let device = u8::try_from(hex(dev, "device is not hex")?)
            .ok()
            .filter(|d| *d < 32)
            .ok_or_else(|| bad("device above 1f"))?;
        let function = u8::try_from(hex(func, "function is not hex")?)
            .ok()
            .filter(|f| *f < 8)
            .ok_or_else(|| bad("function above 7"))?;
        Ok(PciAddress { domain, bus, device, function })
    }
}

/// What sysfs says about one PCI function.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciFunction {
    /// Its address.
    pub bdf: PciAddress,
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Class code (24 bits: class, subclass, programming interface).
    pub class: u32,
    /// NUMA node, if the platform reports one (`-1` in sysfs means none).
    pub numa_node: Option<u32>,
    /// The bound driver's name, if any.
    pub driver: Option<String>,
    /// `driver_override`, if set.
    pub driver_override: Option<String>,
    /// IOMMU group number, if the IOMMU is on.
    pub iommu_group: Option<u32>,
}

impl PciFunction {
    /// Whether this is an NVMe controller.
    pub fn is_nvme(&self) -> bool {
        self.class == NVME_CLASS
    }

    /// Whether this is a bridge (header type 1 or 2): the kernel lets a VFIO group hold bridges bound to any driver.
    pub fn is_bridge(&self) -> bool {
        matches!(self.class >> 8, 0x0604 | 0x0607)
    }
}

/// A sysfs tree under a root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sysfs {
    root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs::system()
    }
}

fn io_err(op: &'static str, path: &Path, source: io::Error) -> DriverError {
    DriverError::Sysfs { op, path: path.to_path_buf(), source }
}

fn parse_hex_attr(path: &Path, text: &str) -> Result<u32, DriverError> {
    let t = text.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    u32::from_str_radix(t, 16)
        .map_err(|_| io_err("parsing", path, io::Error::new(io::ErrorKind::InvalidData, format!("not hex: {text:?}"))))
}

impl Sysfs {
    /// The real system: root `/`.
    pub fn system() -> Sysfs {
        Sysfs { root: PathBuf::from("/") }
    }

    /// A tree under `root` (a fake tree in tests).
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    /// The root named by `NVSTACK_SYSFS_ROOT`, or `/`.
    pub fn from_env() -> Sysfs {
        match std::env::var_os(SYSFS_ROOT_ENV) {
            Some(r) if !r.is_empty() => Sysfs::new(r),
            _ => Sysfs::system(),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Whether this is the real system (root `/`): only then may VFIO files be opened and modules loaded.
    pub fn is_system(&self) -> bool {
        self.root == Path::new("/")
    }

    /// `rel` (an absolute-looking path such as `/sys/bus/pci`) under the root.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel.trim_start_matches('/'))
    }

    /// `/sys/bus/pci/devices/BDF` under the root.
    pub fn device_dir(&self, bdf: PciAddress) -> PathBuf {
        self.path("/sys/bus/pci/devices").join(bdf.to_string())
    }

    /// `/sys/bus/pci/drivers/NAME` under the root.
    pub fn driver_dir(&self, driver: &str) -> PathBuf {
        self.path("/sys/bus/pci/drivers").join(driver)
    }

    /// `/dev/vfio/GROUP` under the root.
    pub fn vfio_group_file(&self, group: u32) -> PathBuf {
        self.path("/dev/vfio").join(group.to_string())
    }

    /// Read an attribute as a trimmed string.
    ///
    /// # Errors
    /// [`DriverError::Sysfs`] when it cannot be read.
    pub fn read_attr(&self, path: &Path) -> Result<String, DriverError> {
        std::fs::read_to_string(path).map(|s| s.trim().to_string()).map_err(|e| io_err("reading", path, e))
    }

    /// Write `value` to an existing attribute (never creates a file: a missing attribute is an error).
    ///
    /// # Errors
    /// [`DriverError::Sysfs`] when it cannot be opened or written.
    pub fn write_attr(&self, path: &Path, value: &str) -> Result<(), DriverError> {
        use std::io::Write;
        // O_TRUNC as a shell's `>` does: sysfs ignores it, a regular file (a fake tree) needs it.
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(path)
            .map_err(|e| io_err("writing", path, e))?;
        // One write call: sysfs stores take the whole buffer at once.
        f.write_all(value.as_bytes()).map_err(|e| io_err("writing", path, e))?;
        tracing::debug!(path = %path.display(), value, "sysfs write");
        Ok(())
    }

    /// The last component of the symlink `path` points to (a driver or group name), or `None` if no link.
    fn link_name(&self, path: &Path) -> Result<Option<String>, DriverError> {
        match std::fs::read_link(path) {
            Ok(target) => Ok(target.file_name().map(|n| n.to_string_lossy().into_owned())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("reading the link", path, e)),
        }
    }

    /// Whether a PCI function exists at `bdf`.
    pub fn exists(&self, bdf: PciAddress) -> bool {
        self.device_dir(bdf).is_dir()
    }

    /// The driver bound to `bdf`, if any.
    ///
    /// # Errors
    /// [`DriverError::Sysfs`] when the link cannot be read.
    pub fn driver(&self, bdf: PciAddress) -> Result<Option<String>, DriverError> {
        self.link_name(&self.device_dir(bdf).join("driver"))
    }

    /// The IOMMU group of `bdf`, or `None` when the function has none (the IOMMU is off).
    ///
    /// # Errors
    /// [`DriverError::Sysfs`] when the link cannot be read or does not end in a number.
    pub fn iommu_group(&self, bdf: PciAddress) -> Result<Option<u32>, DriverError> {
        let link = self.device_dir(bdf).join("iommu_group");
        match self.link_name(&link)? {
            None => Ok(None),
            Some(n) => n.parse::<u32>().map(Some).map_err(|_| {
                io_err(
                    "parsing",
                    &link,
                    io::Error::new(io::ErrorKind::InvalidData, format!("group `{n}` is not a number")),
                )
            }),
        }
    }

    /// Every PCI function, sorted by address.
    ///
    /// # Errors
    /// [`DriverError::Sysfs`] when the devices directory cannot be listed.
    pub fn functions(&self) -> Result<Vec<PciAddress>, DriverError> {
        let dir = self.path("/sys/bus/pci/devices");
        let rd = std::fs::read_dir(&dir).map_err(|e| io_err("listing", &dir, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| io_err("listing", &dir, e))?;
            if let Ok(bdf) = ent.file_name().to_string_lossy().parse::<PciAddress>() {
                out.push(bdf);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Every function of IOMMU group `group`, sorted.
    ///
    /// # Errors
    /// [`DriverError::Sysfs`] when the group's directory cannot be listed.
    pub fn group_members(&self, group: u32) -> Result<Vec<PciAddress>, DriverError> {
        let dir = self.path("/sys/kernel/iommu_groups").join(group.to_string()).join("devices");
        let rd = std::fs::read_dir(&dir).map_err(|e| io_err("listing", &dir, e))?;
        let mut out = Vec::new();
        for ent in rd {
            let ent = ent.map_err(|e| io_err("listing", &dir, e))?;
            if let Ok(bdf) = ent.file_name().to_string_lossy().parse::<PciAddress>() {
                out.push(bdf);
            }
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Everything sysfs says about `bdf`.
    ///
    /// # Errors
    /// [`DriverError::VfioNoSuchDevice`] when there is no such function; [`DriverError::Sysfs`] when an attribute
    /// cannot be read.
    pub fn function(&self, bdf: PciAddress) -> Result<PciFunction, DriverError> {
        let dir = self.device_dir(bdf);
        if !dir.is_dir() {
            return Err(DriverError::VfioNoSuchDevice { bdf: bdf.to_string(), path: dir });
        }
        let hex = |name: &str| -> Result<u32, DriverError> {
            let p = dir.join(name);
            let s = self.read_attr(&p)?;
            parse_hex_attr(&p, &s)
        };
        let vendor = u16::try_from(hex("vendor")?).unwrap_or(u16::MAX);
        let device = u16::try_from(hex("device")?).unwrap_or(u16::MAX);
        let class = hex("class")?;
        let numa_node = std::fs::read_to_string(dir.join("numa_node")).ok().and_then(|s| s.trim().parse::<u32>().ok());
        let driver_override = std::fs::read_to_string(dir.join("driver_override"))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s != "(null)");
        Ok(PciFunction {
            bdf,
            vendor,
            device,
            class,
            numa_node,
            driver: self.driver(bdf)?,
            driver_override,
            iommu_group: self.iommu_group(bdf)?,
        })
    }

    /// Every NVMe function (class 0x010802), sorted by address.
    ///
    /// # Errors
    /// As [`Sysfs::functions`] and [`Sysfs::function`].
    pub fn nvme_functions(&self) -> Result<Vec<PciFunction>, DriverError> {
        let mut out = Vec::new();
        for bdf in self.functions()? {
            let f = self.function(bdf)?;
            if f.is_nvme() {
                out.push(f);
            }
        }
        Ok(out)
    }
}

/// What [`check_vfio_ready`] found: the function is bound to vfio-pci and its group is usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfioReady {
    /// The function.
    pub bdf: PciAddress,
    /// Its IOMMU group.
    pub group: u32,
    /// `/dev/vfio/GROUP` (under the sysfs root).
    pub group_file: PathBuf,
}

/// Check, from sysfs alone, that `bdf` can be opened through VFIO, and say what to do when it cannot.
///
/// # Errors
/// - [`DriverError::VfioNoSuchDevice`]: no function at that address;
/// - [`DriverError::VfioNotBound`] / [`DriverError::VfioWrongDriver`]: not bound to vfio-pci;
/// - [`DriverError::VfioNoIommu`]: no IOMMU group;
/// - [`DriverError::VfioGroupNotViable`]: another function of the group is bound to a host driver;
/// - [`DriverError::VfioModule`]: `/dev/vfio/GROUP` is missing;
/// - [`DriverError::VfioPermission`]: `/dev/vfio/GROUP` exists but cannot be opened for reading and writing;
/// - [`DriverError::VfioBusy`]: another process holds the group;
/// - [`DriverError::Sysfs`]: an attribute could not be read.
pub fn check_vfio_ready(sysfs: &Sysfs, bdf: PciAddress) -> Result<VfioReady, DriverError> {
    let dir = sysfs.device_dir(bdf);
    if !dir.is_dir() {
        return Err(DriverError::VfioNoSuchDevice { bdf: bdf.to_string(), path: dir });
    }
    match sysfs.driver(bdf)? {
        None => return Err(DriverError::VfioNotBound { bdf: bdf.to_string() }),
        Some(d) if d != VFIO_PCI => return Err(DriverError::VfioWrongDriver { bdf: bdf.to_string(), driver: d }),
        Some(_) => {}
    }
    let group = sysfs.iommu_group(bdf)?.ok_or_else(|| DriverError::VfioNoIommu { bdf: bdf.to_string() })?;
    let blockers = group_blockers(sysfs, bdf, group)?;
    if !blockers.is_empty() {
        return Err(DriverError::VfioGroupNotViable { bdf: bdf.to_string(), group, others: blockers.join(", ") });
    }
    let group_file = sysfs.vfio_group_file(group);
    // Open read-write, as VFIO will: this tells a missing module, a permission problem and a busy group apart.
    if let Err(e) = std::fs::OpenOptions::new().read(true).write(true).open(&group_file) {
        let fatal = matches!(e.kind(), io::ErrorKind::NotFound | io::ErrorKind::PermissionDenied)
            || e.raw_os_error() == Some(libc::EBUSY);
        if fatal {
            return Err(super::container::classify_open(&bdf.to_string(), &group_file, e));
        }
        tracing::debug!(bdf = %bdf, error = %e, "vfio group file: open check failed, leaving it to VFIO");
    }
    Ok(VfioReady { bdf, group, group_file })
}

/// The other functions of `group` that make it not viable, described as "BDF (bound to DRIVER)". A function
/// is fine when it is unbound, bound to vfio-pci or pci-stub, or a bridge (the kernel's own rule).
///
/// # Errors
/// [`DriverError::Sysfs`] when the group or a member cannot be read.
pub fn group_blockers(sysfs: &Sysfs, bdf: PciAddress, group: u32) -> Result<Vec<String>, DriverError> {
    let mut out = Vec::new();
    for member in sysfs.group_members(group)? {
        if member == bdf {
            continue;
        }
        let f = sysfs.function(member)?;
        match f.driver.as_deref() {
            None | Some(VFIO_PCI) | Some("pci-stub") => {}
            Some(_) if f.is_bridge() => {}
            Some(d) => out.push(format!("{member} (bound to {d})")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vfio::fake::FakeTree;

    fn bdf(s: &str) -> PciAddress {
        s.parse().unwrap()
    }

    #[test]
    fn pci_address_parses_and_prints() {
        assert_eq!(bdf("0000:00:04.0").to_string(), "0000:00:04.0");
        assert_eq!(bdf("00:1f.7").to_string(), "0000:00:1f.7");
        assert_eq!(bdf("10000:af:1f.7"), PciAddress { domain: 0x10000, bus: 0xaf, device: 0x1f, function: 7 });
        for bad in ["", "0000:00:04", "0000:00:20.0", "0000:00:04.8", "0000:100:04.0", "zz:00.0", "0:0:0:0.0", "00:.0"]
        {
            let e = bad.parse::<PciAddress>().unwrap_err();
            assert!(matches!(e, DriverError::PciAddress { .. }), "{bad}: {e}");
            assert!(e.to_string().contains("0000:00:04.0"), "the message shows the form: {e}");
        }
    }

    #[test]
    fn reads_a_function() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
        let s = t.sysfs();
        let f = s.function(bdf("0000:00:04.0")).unwrap();
        assert_eq!(f.vendor, 0x1b36);
        assert_eq!(f.device, 0x0010);
        assert!(f.is_nvme());
        assert_eq!(f.driver.as_deref(), Some("nvme"));
        assert_eq!(f.iommu_group, Some(3));
        assert_eq!(f.numa_node, None);
        assert_eq!(s.nvme_functions().unwrap().len(), 1);
        assert_eq!(s.group_members(3).unwrap(), vec![bdf("0000:00:04.0")]);
    }

    #[test]
    fn no_such_device() {
        let t = FakeTree::new();
        let e = check_vfio_ready(&t.sysfs(), bdf("0000:00:05.0")).unwrap_err();
        assert!(matches!(e, DriverError::VfioNoSuchDevice { .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("0000:00:05.0") && msg.contains("nvstack setup status"), "{msg}");
    }

    #[test]
    fn bound_to_another_driver_names_it_and_points_to_setup() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
        let e = check_vfio_ready(&t.sysfs(), bdf("0000:00:04.0")).unwrap_err();
        assert!(matches!(&e, DriverError::VfioWrongDriver { driver, .. } if driver == "nvme"), "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("bound to nvme") && msg.contains("nvstack setup") && msg.contains("0000:00:04.0"),
            "{msg}"
        );
    }

    #[test]
    fn unbound_points_to_setup() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", None, Some(3));
        let e = check_vfio_ready(&t.sysfs(), bdf("0000:00:04.0")).unwrap_err();
        assert!(matches!(e, DriverError::VfioNotBound { .. }), "{e}");
        assert!(e.to_string().contains("nvstack setup"));
    }

    #[test]
    fn no_iommu_says_how_to_enable_it() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("vfio-pci"), None);
        let e = check_vfio_ready(&t.sysfs(), bdf("0000:00:04.0")).unwrap_err();
        assert!(matches!(e, DriverError::VfioNoIommu { .. }), "{e}");
        assert!(e.to_string().contains("intel_iommu=on"), "{e}");
    }

    #[test]
    fn group_not_viable_names_the_others() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("vfio-pci"), Some(7));
        t.add_function("0000:00:04.1", 0x8086, 0x10d3, 0x020000, Some("e1000e"), Some(7));
        t.add_function("0000:00:04.2", 0x8086, 0x10d3, 0x020000, None, Some(7));
        t.add_function("0000:00:1c.0", 0x8086, 0x2918, 0x060400, Some("pcieport"), Some(7));
        t.add_vfio_group_file(7);
        let e = check_vfio_ready(&t.sysfs(), bdf("0000:00:04.0")).unwrap_err();
        match &e {
            DriverError::VfioGroupNotViable { group, others, .. } => {
                assert_eq!(*group, 7);
                assert_eq!(others, "0000:00:04.1 (bound to e1000e)");
            }
            other => panic!("wrong error: {other}"),
        }
        assert!(e.to_string().contains("0000:00:04.1 (bound to e1000e)"));
        // Once the other function is given to vfio-pci the group is viable.
        t.set_driver("0000:00:04.1", Some("vfio-pci"));
        let ok = check_vfio_ready(&t.sysfs(), bdf("0000:00:04.0")).unwrap();
        assert_eq!(ok.group, 7);
    }

    #[test]
    fn missing_group_file_says_load_the_module() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("vfio-pci"), Some(3));
        let e = check_vfio_ready(&t.sysfs(), bdf("0000:00:04.0")).unwrap_err();
        assert!(matches!(e, DriverError::VfioModule { .. }), "{e}");
        assert!(e.to_string().contains("modprobe vfio-pci"));
        t.add_vfio_group_file(3);
        let ok = check_vfio_ready(&t.sysfs(), bdf("0000:00:04.0")).unwrap();
        assert_eq!(ok.group_file, t.root().join("dev/vfio/3"));
    }

    #[test]
    fn no_permission_names_the_file() {
        // Root opens any file, so a permission failure can only be produced as a non-root user.
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            let e = DriverError::VfioPermission {
                bdf: "0000:00:04.0".into(),
                path: "/dev/vfio/3".into(),
                source: io::Error::from_raw_os_error(libc::EACCES),
            };
            assert!(e.to_string().contains("chown USER /dev/vfio/3"), "{e}");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("vfio-pci"), Some(3));
        t.add_vfio_group_file(3);
        std::fs::set_permissions(t.root().join("dev/vfio/3"), std::fs::Permissions::from_mode(0o000)).unwrap();
        let e = check_vfio_ready(&t.sysfs(), bdf("0000:00:04.0")).unwrap_err();
        assert!(matches!(e, DriverError::VfioPermission { .. }), "{e}");
    }

    #[test]
    fn write_attr_never_creates() {
        let t = FakeTree::new();
        let p = t.root().join("sys/nothing");
        assert!(t.sysfs().write_attr(&p, "x").is_err());
        assert!(!p.exists());
    }
}
