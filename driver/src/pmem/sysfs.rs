//! What sysfs says about pmem: device-DAX size and physical placement, and badblocks lists.
//!
//! The sysfs root is `/sys` unless `NVSTACK_SYSFS_ROOT` names another (tests use a fake tree).

use std::io;
use std::path::PathBuf;

/// A physical address range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PhysRange {
    /// First physical byte.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

impl PhysRange {
    /// The offset of `phys` inside the range.
    pub fn offset_of(&self, phys: u64) -> Option<u64> {
        let off = phys.checked_sub(self.start)?;
        (off < self.len).then_some(off)
    }
}

fn root() -> PathBuf {
    std::env::var_os("NVSTACK_SYSFS_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/sys"))
}

fn read_trim(p: PathBuf) -> io::Result<String> {
    Ok(std::fs::read_to_string(p)?.trim().to_string())
}

/// Parse a sysfs number: decimal, or hex with `0x`.
///
/// # Errors
/// `InvalidData` naming the text.
pub fn parse_num(text: &str) -> io::Result<u64> {
    let t = text.trim();
    let r = match t.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|_| io::Error::new(io::ErrorKind::InvalidData, format!("not a number: {t:?}")))
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name.contains("..") {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad device name {name:?}")));
    }
    Ok(())
}

/// Size in bytes of device-DAX `name` (`dax0.0`).
///
/// # Errors
/// The read or parse error.
pub fn devdax_size(name: &str) -> io::Result<u64> {
    check_name(name)?;
    parse_num(&read_trim(root().join("bus/dax/devices").join(name).join("size"))?)
}

/// Physical range of device-DAX `name` (its `resource` attribute and size).
///
/// # Errors
/// The read or parse error.
pub fn devdax_phys_range(name: &str) -> io::Result<PhysRange> {
    check_name(name)?;
    let dir = root().join("bus/dax/devices").join(name);
    let start = parse_num(&read_trim(dir.join("resource"))?)?;
    let len = parse_num(&read_trim(dir.join("size"))?)?;
    Ok(PhysRange { start, len })
}

/// One badblocks entry, in 512-byte sectors as the kernel lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadRange {
    /// First bad sector.
    pub sector: u64,
    /// Number of bad sectors.
    pub count: u64,
}

impl BadRange {
    /// The range in bytes: (offset, len), or None on overflow.
    pub fn bytes(&self) -> Option<(u64, u64)> {
        Some((self.sector.checked_mul(512)?, self.count.checked_mul(512)?))
    }
}

/// Parse a badblocks file ("SECTOR COUNT" per line). Malformed lines are skipped and counted.
pub fn parse_badblocks(text: &str) -> (Vec<BadRange>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let mut it = line.split_whitespace();
        match (it.next().map(parse_num), it.next().map(parse_num), it.next()) {
            (Some(Ok(sector)), Some(Ok(count)), None) => out.push(BadRange { sector, count }),
            (None, _, _) => {}
            _ => bad += 1,
        }
    }
    (out, bad)
}

/// The badblocks of block device `name` (`pmem0`: `/sys/block/pmem0/badblocks`) or, for a path under sysfs given
/// relative to the root, that file.
///
/// # Errors
/// The read error.
pub fn read_badblocks(rel_path: &str) -> io::Result<Vec<BadRange>> {
    if rel_path.contains("..") {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad sysfs path"));
    }
    let text = std::fs::read_to_string(root().join(rel_path))?;
    let (v, malformed) = parse_badblocks(&text);
    if malformed > 0 {
        tracing::warn!(path = rel_path, malformed, "badblocks: malformed lines skipped");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn badblocks_parse() {
        let (v, bad) = parse_badblocks("8 8\n4096 1\n\ngarbage here\n12 x\n");
        assert_eq!(v, vec![BadRange { sector: 8, count: 8 }, BadRange { sector: 4096, count: 1 }]);
        assert_eq!(bad, 2);
        assert_eq!(v[0].bytes(), Some((4096, 4096)));
        assert_eq!(BadRange { sector: u64::MAX, count: 1 }.bytes(), None);
    }

    #[test]
    fn numbers_and_names() {
        assert_eq!(parse_num("0x1000\n").unwrap(), 4096);
        assert_eq!(parse_num("42").unwrap(), 42);
        assert!(parse_num("x").is_err());
        assert!(devdax_size("../etc").is_err());
        let r = PhysRange { start: 0x1_0000_0000, len: 1 << 30 };
        assert_eq!(r.offset_of(0x1_0000_1000), Some(0x1000));
        assert_eq!(r.offset_of(0xffff_ffff), None);
        assert_eq!(r.offset_of(0x1_4000_0000), None);
    }
}
