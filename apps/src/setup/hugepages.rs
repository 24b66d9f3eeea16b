//! Hugepage reservation and reporting, through sysfs (`/sys/kernel/mm/hugepages`, per node under
//! `/sys/devices/system/node/nodeN/hugepages`).

use std::path::PathBuf;

use nvstack_driver::vfio::Sysfs;
use nvstack_driver::DriverError;

/// The hugepage size nvstack reserves: 2 MiB, in kB as sysfs names it.
pub const HUGEPAGE_KB: u64 = 2048;

/// One line of the hugepage report: a node (or `None` for the system total) and one page size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HugeLine {
    /// NUMA node, or `None` for a system without per-node directories.
    pub node: Option<u32>,
    /// Page size in kB.
    pub size_kb: u64,
    /// Free pages.
    pub free: u64,
    /// Reserved pages.
    pub total: u64,
}

fn read_u64(sysfs: &Sysfs, p: &std::path::Path) -> Result<u64, DriverError> {
    let s = sysfs.read_attr(p)?;
    s.parse::<u64>().map_err(|_| DriverError::Sysfs {
        op: "parsing",
        path: p.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, format!("not a count: {s:?}")),
    })
}

fn size_dirs(dir: &std::path::Path) -> Vec<(u64, PathBuf)> {
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    let kb = n.strip_prefix("hugepages-")?.strip_suffix("kB")?.parse::<u64>().ok()?;
                    Some((kb, e.path()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// The NUMA nodes that have hugepage directories, sorted.
pub fn nodes(sysfs: &Sysfs) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir(sysfs.path("/sys/devices/system/node"))
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_string_lossy().strip_prefix("node")?.parse::<u32>().ok())
                .filter(|n| sysfs.path(&format!("/sys/devices/system/node/node{n}/hugepages")).is_dir())
                .collect()
        })
        .unwrap_or_default();
    out.sort_unstable();
    out
}

/// Hugepages per node and size (or the system totals when there are no node directories).
///
/// # Errors
/// [`DriverError::Sysfs`] when a count cannot be read.
pub fn report(sysfs: &Sysfs) -> Result<Vec<HugeLine>, DriverError> {
    let mut out = Vec::new();
    let nodes = nodes(sysfs);
    if nodes.is_empty() {
        for (kb, d) in size_dirs(&sysfs.path("/sys/kernel/mm/hugepages")) {
            out.push(HugeLine {
                node: None,
                size_kb: kb,
                free: read_u64(sysfs, &d.join("free_hugepages"))?,
                total: read_u64(sysfs, &d.join("nr_hugepages"))?,
            });
        }
    }
    for n in nodes {
        for (kb, d) in size_dirs(&sysfs.path(&format!("/sys/devices/system/node/node{n}/hugepages"))) {
            out.push(HugeLine {
                node: Some(n),
                size_kb: kb,
                free: read_u64(sysfs, &d.join("free_hugepages"))?,
                total: read_u64(sysfs, &d.join("nr_hugepages"))?,
            });
        }
    }
    Ok(out)
}

/// How many 2 MiB pages to reserve: `nr_huge` if given, else `hugemem_mb` rounded up to whole pages.
pub fn pages_wanted(hugemem_mb: u64, nr_huge: Option<u64>) -> Option<u64> {
    match nr_huge {
        Some(n) => Some(n),
        None => hugemem_mb.checked_mul(1024).map(|kb| kb.div_ceil(HUGEPAGE_KB)),
    }
}

/// The outcome of one reservation: where, asked and got.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reserved {
    /// The node, or `None` for the system-wide count.
    pub node: Option<u32>,
    /// Pages asked for.
    pub asked: u64,
    /// Pages the kernel reserved.
    pub got: u64,
}

/// Reserve `pages` 2 MiB pages: on each of `nodes` (each gets `pages`, as SPDK's HUGENODE), or system-wide when
/// `nodes` is empty (the kernel spreads them). Reads back what the kernel reserved.
///
/// # Errors
/// [`DriverError::Sysfs`] when a count cannot be written or read (a node that does not exist, no permission).
pub fn reserve(sysfs: &Sysfs, pages: u64, nodes: &[u32]) -> Result<Vec<Reserved>, DriverError> {
    let mut out = Vec::new();
    let targets: Vec<(Option<u32>, PathBuf)> = if nodes.is_empty() {
        vec![(None, sysfs.path(&format!("/sys/kernel/mm/hugepages/hugepages-{HUGEPAGE_KB}kB/nr_hugepages")))]
    } else {
        nodes
            .iter()
            .map(|n| {
                (
                    Some(*n),
                    sysfs.path(&format!(
                        "/sys/devices/system/node/node{n}/hugepages/hugepages-{HUGEPAGE_KB}kB/nr_hugepages"
                    )),
                )
            })
            .collect()
    };
    for (node, p) in targets {
        sysfs.write_attr(&p, &format!("{pages}\n"))?;
        let got = read_u64(sysfs, &p)?;
        tracing::info!(?node, asked = pages, got, "hugepages reserved");
        out.push(Reserved { node, asked: pages, got });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvstack_driver::vfio::fake::FakeTree;

    #[test]
    fn pages_from_hugemem_and_nrhuge() {
        assert_eq!(pages_wanted(2048, None), Some(1024));
        assert_eq!(pages_wanted(3, None), Some(2));
        assert_eq!(pages_wanted(2048, Some(7)), Some(7));
        assert_eq!(pages_wanted(0, None), Some(0));
        assert_eq!(pages_wanted(u64::MAX, None), None);
    }

    #[test]
    fn reserve_per_node_and_report() {
        let t = FakeTree::new();
        t.add_node(1);
        let s = t.sysfs();
        assert_eq!(nodes(&s), vec![0, 1]);
        let r = reserve(&s, 16, &[1]).unwrap();
        assert_eq!(r, vec![Reserved { node: Some(1), asked: 16, got: 16 }]);
        let rep = report(&s).unwrap();
        assert_eq!(rep.iter().find(|l| l.node == Some(1)).unwrap().total, 16);
        assert_eq!(rep.iter().find(|l| l.node == Some(0)).unwrap().total, 0);
        assert!(reserve(&s, 1, &[5]).is_err(), "a node that does not exist is an error");
    }
}
