//! Is an NVMe function in use by the host? Its namespaces and partitions, checked against `/proc/mounts`,
//! `/proc/swaps` and each block device's `holders` (device-mapper, md). A function in use is never unbound.

use std::path::Path;

use nvstack_driver::vfio::{PciAddress, Sysfs};

/// The kernel block devices of `bdf` (namespaces, then their partitions), from sysfs.
pub fn block_devices(sysfs: &Sysfs, bdf: PciAddress) -> Vec<String> {
    let mut out = Vec::new();
    for ns in namespaces(sysfs, bdf) {
        let parts =
            list(&sysfs.path("/sys/block").join(&ns)).into_iter().filter(|p| p.starts_with(ns.as_str()) && *p != ns);
        let mut parts: Vec<String> = parts.collect();
        parts.sort();
        out.push(ns);
        out.extend(parts);
    }
    out
}

/// The kernel controller names of `bdf` (`nvme0`), from `devices/BDF/nvme/`.
pub fn controllers(sysfs: &Sysfs, bdf: PciAddress) -> Vec<String> {
    let mut c = list(&sysfs.device_dir(bdf).join("nvme"));
    c.sort();
    c
}

/// Namespace block devices (`nvme0n1`) of `bdf`'s controllers. A multipath path name `nvmeAcBnC` stands for the
/// block device `nvmeAnC`.
fn namespaces(sysfs: &Sysfs, bdf: PciAddress) -> Vec<String> {
    let mut out = Vec::new();
    for ctrl in controllers(sysfs, bdf) {
        for ent in list(&sysfs.device_dir(bdf).join("nvme").join(&ctrl)) {
            let Some(rest) = ent.strip_prefix("nvme") else { continue };
            let name = match rest.split_once('c') {
                Some((subsys, tail)) => match tail.split_once('n') {
                    Some((_, ns)) if !ns.is_empty() => format!("nvme{subsys}n{ns}"),
                    _ => continue,
                },
                None if rest.contains('n') => ent.clone(),
                None => continue,
            };
            if !out.contains(&name) {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Why `bdf` must not be taken from the kernel: each entry says what uses which block device. Empty when free.
pub fn users(sysfs: &Sysfs, bdf: PciAddress) -> Vec<String> {
    let devs = block_devices(sysfs, bdf);
    if devs.is_empty() {
        return Vec::new();
    }
    let mounts = std::fs::read_to_string(sysfs.path("/proc/mounts")).unwrap_or_default();
    let swaps = std::fs::read_to_string(sysfs.path("/proc/swaps")).unwrap_or_default();
    let mut out = Vec::new();
    for dev in &devs {
        let node = format!("/dev/{dev}");
        for line in mounts.lines() {
            let mut f = line.split_whitespace();
            if let (Some(src), Some(dir)) = (f.next(), f.next()) {
                if src == node {
                    out.push(format!("{dev} is mounted on {dir}"));
                }
            }
        }
        if swaps.lines().skip(1).any(|l| l.split_whitespace().next() == Some(node.as_str())) {
            out.push(format!("{dev} is used as swap"));
        }
        let holders_dir = if devs.iter().any(|ns| dev.starts_with(ns.as_str()) && dev != ns) {
            // A partition: /sys/block/NS/PART/holders.
            let ns = devs.iter().find(|ns| dev.starts_with(ns.as_str()) && dev != *ns).cloned().unwrap_or_default();
            sysfs.path("/sys/block").join(ns).join(dev).join("holders")
        } else {
            sysfs.path("/sys/block").join(dev).join("holders")
        };
        let mut holders = list(&holders_dir);
        holders.sort();
        for h in holders {
            out.push(format!("{dev} is held by {h}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvstack_driver::vfio::fake::FakeTree;

    fn bdf() -> PciAddress {
        "0000:00:04.0".parse().unwrap()
    }

    #[test]
    fn free_device_has_no_users() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
        t.add_block("0000:00:04.0", "nvme0", &["nvme0n1"], &["nvme0n1p1"]);
        assert_eq!(block_devices(&t.sysfs(), bdf()), vec!["nvme0n1", "nvme0n1p1"]);
        assert!(users(&t.sysfs(), bdf()).is_empty());
    }

    #[test]
    fn mounted_partition_swap_and_holder_are_found() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
        t.add_block("0000:00:04.0", "nvme0", &["nvme0n1", "nvme0n2"], &["nvme0n1p1"]);
        t.add_mount("/dev/nvme0n1p1", "/mnt/data", "xfs");
        t.add_holder("nvme0n2", "dm-0");
        std::fs::write(
            t.root().join("proc/swaps"),
            "Filename Type Size Used Priority\n/dev/nvme0n1 partition 1 0 -2\n",
        )
        .unwrap();
        let u = users(&t.sysfs(), bdf());
        assert_eq!(u, vec!["nvme0n1 is used as swap", "nvme0n1p1 is mounted on /mnt/data", "nvme0n2 is held by dm-0"]);
    }

    #[test]
    fn multipath_names_map_to_the_block_device() {
        let t = FakeTree::new();
        t.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
        t.add_block("0000:00:04.0", "nvme1", &["nvme0c1n1"], &[]);
        std::fs::create_dir_all(t.root().join("sys/block/nvme0n1/holders")).unwrap();
        t.add_mount("/dev/nvme0n1", "/srv", "ext4");
        assert_eq!(users(&t.sysfs(), bdf()), vec!["nvme0n1 is mounted on /srv"]);
    }
}
