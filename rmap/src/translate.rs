//! Address translation for the poison path: a virtual or physical address → (device, device offset).
//!
//! - A virtual address inside one of our registered mappings (a pmem mapping, the DMA arena) → that mapping and
//!   the offset in it → the device offset.
//! - A physical address inside a mapping whose physical placement is known (device-DAX from sysfs) → the device
//!   offset directly; otherwise the pages of registered mappings are looked up in `/proc/self/pagemap` (root only:
//!   others see PFN 0) to find the virtual address, then as above.
//!
//! Registration happens at start; lookups happen only when an event arrives.

use std::io::{Read, Seek, SeekFrom};
use std::sync::RwLock;

use nvstack_driver::pmem::sysfs::PhysRange;
use serde::{Deserialize, Serialize};

use crate::RmapError;

/// One mapping the translator knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// The device (or, for the arena, "arena") whose bytes are mapped.
    pub device: String,
    /// First virtual address, when the device is mapped into this process (a phys-only mapping has none).
    pub vaddr: Option<usize>,
    /// Length in bytes.
    pub len: u64,
    /// Device offset of the first mapped byte.
    pub device_offset: u64,
    /// Physical placement, when known.
    pub phys: Option<PhysRange>,
}

/// How an address was translated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Translation {
    /// The device.
    pub device: String,
    /// The byte offset on the device.
    pub offset: u64,
    /// The steps taken, for the journal ("vaddr 0x.. in pmem mapping dax0.0 at +0x..").
    pub via: String,
}

/// The registered mappings.
#[derive(Debug, Default)]
pub struct Translator {
    maps: RwLock<Vec<Mapping>>,
}

const PAGE: u64 = 4096;
/// Pagemap entry: bits 0-54 PFN, bit 63 present (Documentation/admin-guide/mm/pagemap.rst).
const PM_PFN_MASK: u64 = (1 << 55) - 1;
const PM_PRESENT: u64 = 1 << 63;

impl Translator {
    /// Register the DMA arena as device `device`: addresses in it translate to offsets inside the arena (its IOVA
    /// minus [`nvstack_driver::dma::IOVA_BASE`]), the coordinates the cache's reverse map answers in.
    pub fn add_arena(&self, device: &str, arena: &nvstack_driver::dma::Arena) {
        for r in arena.regions() {
            let device_offset = r.iova.saturating_sub(nvstack_driver::dma::IOVA_BASE);
            self.add(Mapping { device: device.to_string(), vaddr: Some(r.host_addr), len: r.len, device_offset, phys: None });
        }
    }

    /// An empty translator.
    pub fn new() -> Translator {
        Translator::default()
    }

    /// Register a mapping.
    pub fn add(&self, m: Mapping) {
        if let Ok(mut v) = self.maps.write() {
            tracing::debug!(device = %m.device, vaddr = m.vaddr, len = m.len, phys = ?m.phys, "translator: mapping registered");
            v.push(m);
        }
    }

    /// Forget the mappings of `device`.
    pub fn remove_device(&self, device: &str) {
        if let Ok(mut v) = self.maps.write() {
            v.retain(|m| m.device != device);
        }
    }

    /// The registered mappings.
    pub fn mappings(&self) -> Vec<Mapping> {
        self.maps.read().map(|v| v.clone()).unwrap_or_default()
    }

    /// Translate a virtual address of this process.
    pub fn vaddr(&self, addr: usize) -> Option<Translation> {
        let v = self.maps.read().ok()?;
        v.iter().find_map(|m| {
            let base = m.vaddr?;
            let off = (addr as u64).checked_sub(base as u64)?;
            (off < m.len).then(|| Translation {
                device: m.device.clone(),
                offset: m.device_offset + off,
                via: format!("vaddr {addr:#x} is {off:#x} into the mapping of {} at {base:#x}", m.device),
            })
        })
    }

    /// Translate a physical address.
    ///
    /// # Errors
    /// [`RmapError::Pagemap`] if `/proc/self/pagemap` cannot be read while searching mappings without a known
    /// physical placement. `Ok(None)` means no registered mapping holds the address.
    pub fn phys(&self, pa: u64) -> Result<Option<Translation>, RmapError> {
        let maps = self.mappings();
        for m in &maps {
            if let Some(p) = m.phys {
                if let Some(off) = p.offset_of(pa) {
                    if off < m.len {
                        return Ok(Some(Translation {
                            device: m.device.clone(),
                            offset: m.device_offset + off,
                            via: format!("phys {pa:#x} is {off:#x} into {} (physical {:#x}+{:#x})", m.device, p.start, p.len),
                        }));
                    }
                }
            }
        }
        let pfn = pa / PAGE;
        for m in maps.iter().filter(|m| m.phys.is_none()) {
            let Some(base) = m.vaddr else { continue };
            if let Some(va) = find_pfn(base, m.len, pfn).map_err(|source| RmapError::Pagemap { phys: pa, source })? {
                let va = va + (pa % PAGE) as usize;
                if let Some(mut t) = self.vaddr(va) {
                    t.via = format!("phys {pa:#x} is pfn {pfn:#x}, mapped at vaddr {va:#x} (pagemap); {}", t.via);
                    return Ok(Some(t));
                }
            }
        }
        Ok(None)
    }
}

/// Find which page of `[vaddr, vaddr+len)` is backed by `pfn`, reading `/proc/self/pagemap`.
///
/// # Errors
/// The read error.
pub fn find_pfn(vaddr: usize, len: u64, pfn: u64) -> std::io::Result<Option<usize>> {
    let mut f = std::fs::File::open("/proc/self/pagemap")?;
    let first = vaddr as u64 / PAGE;
    let pages = len.div_ceil(PAGE);
    let mut buf = vec![0u8; 8 * 4096];
    let mut done = 0u64;
    while done < pages {
        let n = (pages - done).min(4096);
        f.seek(SeekFrom::Start((first + done) * 8))?;
        let bytes = &mut buf[..(n * 8) as usize];
        f.read_exact(bytes)?;
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let mut w = [0u8; 8];
            w.copy_from_slice(e);
            let entry = u64::from_le_bytes(w);
            if entry & PM_PRESENT != 0 && entry & PM_PFN_MASK == pfn && pfn != 0 {
                return Ok(Some(((first + done + i as u64) * PAGE) as usize));
            }
        }
        done += n;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vaddr_and_phys_ranges() {
        let t = Translator::new();
        t.add(Mapping {
            device: "dax0.0".into(),
            vaddr: Some(0x7f00_0000_0000),
            len: 1 << 30,
            device_offset: 0,
            phys: Some(PhysRange { start: 0x1_4000_0000, len: 1 << 30 }),
        });
        let v = t.vaddr(0x7f00_0000_3000).unwrap();
        assert_eq!((v.device.as_str(), v.offset), ("dax0.0", 0x3000));
        assert!(t.vaddr(0x7f00_4000_0000).is_none());
        let p = t.phys(0x1_4020_0040).unwrap().unwrap();
        assert_eq!((p.device.as_str(), p.offset), ("dax0.0", 0x20_0040));
        assert!(t.phys(0x1000).unwrap().is_none());
    }

    #[test]
    fn pagemap_finds_our_own_page_when_root() {
        let page = vec![7u8; 3 * 4096];
        let base = (page.as_ptr() as usize).div_ceil(4096) * 4096;
        // Read our own pagemap entry for `base` to learn its PFN (0 when not root: then there is nothing to find).
        let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
        f.seek(SeekFrom::Start(base as u64 / 4096 * 8)).unwrap();
        let mut e = [0u8; 8];
        f.read_exact(&mut e).unwrap();
        let pfn = u64::from_le_bytes(e) & PM_PFN_MASK;
        if pfn == 0 {
            assert_eq!(find_pfn(base, 4096, 0).unwrap(), None);
            return;
        }
        let t = Translator::new();
        t.add(Mapping { device: "arena".into(), vaddr: Some(base), len: 4096, device_offset: 0x10_0000, phys: None });
        let got = t.phys(pfn * 4096 + 12).unwrap().unwrap();
        assert_eq!(got.device, "arena");
        assert_eq!(got.offset, 0x10_0000 + 12);
        drop(page);
    }
}
