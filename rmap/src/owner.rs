//! Who owns a device range: the answers reverse maps give, and the [`Rmap`] trait they implement.
//!
//! "Ask the owner on demand": nothing here is consulted on the I/O path. When poison is reported, the listener
//! turns the address into a (device, offset) and asks every reverse map registered for that device. A map may answer
//! with a [`Owner::Volume`] piece, which the [`Registry`] follows into the volume's own maps (device → volume → the
//! XFS inside the volume), up to [`MAX_CHAIN_DEPTH`] hops.

use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::RmapError;

/// Most plugin hops from a device to an innermost owner (a limit in DESIGN.md).
pub const MAX_CHAIN_DEPTH: usize = 4;

/// What owns a piece of a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Owner {
    /// Nobody: free space.
    Free,
    /// A page of the extent cache holds the range.
    CachePage {
        /// Arena page index of the cache page.
        page_index: u64,
        /// The page holds data not yet written back.
        dirty: bool,
        /// Client id that first dirtied the range, when dirty.
        first_dirtier: Option<u32>,
        /// When it was first dirtied (ms since the cache's epoch), when dirty.
        dirtied_at_ms: Option<u64>,
    },
    /// A free slot of the extent cache: it holds no data, but the cache would hand it out later.
    CacheSlotFree {
        /// Arena page index of the slot.
        page_index: u64,
    },
    /// A slot of the extent cache already out of service (poisoned in an earlier event): it holds no data and is never
    /// handed out, so there is nothing left to do.
    CacheSlotRetired {
        /// Arena page index of the slot.
        page_index: u64,
    },
    /// A volume (export or partition) lives there: the registry follows it.
    Volume {
        /// The volume's name (a device name its own reverse maps are registered under).
        name: String,
        /// Offset of the piece inside the volume.
        offset: u64,
    },
    /// File data (or a file's mapping metadata).
    File {
        /// Inode number.
        ino: u64,
        /// Byte offset in the file.
        file_offset: u64,
        /// Attribute fork.
        attr_fork: bool,
        /// Block-map btree block.
        bmbt: bool,
        /// Unwritten (preallocated) extent.
        unwritten: bool,
    },
    /// File-system metadata.
    Metadata {
        /// What kind ("log", "inode chunks"...).
        what: String,
    },
    /// Outside anything the map knows (beyond a file system's end).
    Outside,
}

/// One owner of one piece of the range asked about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnerPiece {
    /// The device the piece is on.
    pub device: String,
    /// First byte of the piece on that device.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// The owner.
    pub owner: Owner,
    /// Which reverse map answered.
    pub rmap: String,
    /// How many hops from the device the event was on (0 = that device).
    pub depth: usize,
}

/// A reverse map: answers "who owns device range X" for one device.
pub trait Rmap: Send + Sync {
    /// The plugin's name ("xfs", "volume", "cache").
    fn name(&self) -> &str;
    /// The device it answers for.
    fn device(&self) -> &str;
    /// Append the owners of `[offset, offset+len)` to `out`. Pieces may overlap (shared extents have several
    /// owners); ranges nobody owns are either omitted or reported as [`Owner::Free`].
    ///
    /// # Errors
    /// The plugin's failure (a corrupt on-disk structure, a failed read).
    fn owners(&self, offset: u64, len: u64, out: &mut Vec<OwnerPiece>) -> Result<(), RmapError>;
}

/// The registered reverse maps, by device.
#[derive(Default)]
pub struct Registry {
    maps: RwLock<Vec<Arc<dyn Rmap>>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self
            .maps
            .read()
            .map(|m| m.iter().map(|r| format!("{}@{}", r.name(), r.device())).collect())
            .unwrap_or_default();
        f.debug_struct("Registry").field("maps", &names).finish()
    }
}

/// What resolving one range found, including plugin failures (which do not stop the other plugins).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Resolution {
    /// Every owner piece, outermost first.
    pub pieces: Vec<OwnerPiece>,
    /// Plugins that failed, with their error text.
    pub failures: Vec<String>,
}

impl Resolution {
    /// The innermost owners: pieces that are not volumes (a volume was followed into its own maps).
    pub fn leaves(&self) -> impl Iterator<Item = &OwnerPiece> {
        self.pieces.iter().filter(|p| !matches!(p.owner, Owner::Volume { .. }))
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Register a map (control path).
    pub fn register(&self, map: Arc<dyn Rmap>) {
        if let Ok(mut m) = self.maps.write() {
            tracing::info!(rmap = map.name(), device = map.device(), "reverse map registered");
            m.push(map);
        }
    }

    /// Remove every map of `device`.
    pub fn unregister_device(&self, device: &str) {
        if let Ok(mut m) = self.maps.write() {
            m.retain(|r| r.device() != device);
        }
    }

    /// Devices with at least one map.
    pub fn devices(&self) -> Vec<String> {
        let mut v: Vec<String> = self.maps.read().map(|m| m.iter().map(|r| r.device().to_owned()).collect()).unwrap_or_default();
        v.sort();
        v.dedup();
        v
    }

    /// Ask every map of `device` who owns `[offset, offset+len)`, following volumes into their own maps.
    pub fn resolve(&self, device: &str, offset: u64, len: u64) -> Resolution {
        let mut res = Resolution::default();
        self.resolve_into(device, offset, len, 0, &mut res);
        res
    }

    fn resolve_into(&self, device: &str, offset: u64, len: u64, depth: usize, res: &mut Resolution) {
        if depth >= MAX_CHAIN_DEPTH {
            res.failures.push(format!("{device}: chain deeper than {MAX_CHAIN_DEPTH} hops; stopped"));
            return;
        }
        let maps: Vec<Arc<dyn Rmap>> = match self.maps.read() {
            Ok(m) => m.iter().filter(|r| r.device() == device).cloned().collect(),
            Err(_) => return,
        };
        for map in maps {
            let start = res.pieces.len();
            let mut found = Vec::new();
            if let Err(e) = map.owners(offset, len, &mut found) {
                res.failures.push(format!("{}@{device}: {e}", map.name()));
                continue;
            }
            for mut p in found {
                p.depth = depth;
                res.pieces.push(p);
            }
            let volumes: Vec<(String, u64, u64)> = res.pieces[start..]
                .iter()
                .filter_map(|p| match &p.owner {
                    Owner::Volume { name, offset } => Some((name.clone(), *offset, p.len)),
                    _ => None,
                })
                .collect();
            for (name, voff, vlen) in volumes {
                self.resolve_into(&name, voff, vlen, depth + 1, res);
            }
        }
    }
}

/// A volume map: which volume (export, partition) occupies which range of a device.
#[derive(Debug)]
pub struct VolumeMap {
    device: String,
    volumes: RwLock<Vec<(String, u64, u64)>>,
}

impl VolumeMap {
    /// An empty map for `device`.
    pub fn new(device: &str) -> VolumeMap {
        VolumeMap { device: device.to_owned(), volumes: RwLock::new(Vec::new()) }
    }

    /// Say that volume `name` occupies `[start, start+len)` of the device.
    ///
    /// # Errors
    /// [`RmapError::Volume`] when the range overflows or overlaps a registered volume.
    pub fn add(&self, name: &str, start: u64, len: u64) -> Result<(), RmapError> {
        let end = start.checked_add(len).ok_or_else(|| RmapError::Volume {
            device: self.device.clone(),
            volume: name.to_owned(),
            reason: "range overflows".into(),
        })?;
        let mut v = self.volumes.write().map_err(|_| RmapError::Volume {
            device: self.device.clone(),
            volume: name.to_owned(),
            reason: "volume table lock poisoned".into(),
        })?;
        if let Some((other, _, _)) = v.iter().find(|(_, s, l)| start < s + l && *s < end) {
            return Err(RmapError::Volume {
                device: self.device.clone(),
                volume: name.to_owned(),
                reason: format!("overlaps volume {other}"),
            });
        }
        v.push((name.to_owned(), start, len));
        Ok(())
    }
}

impl Rmap for VolumeMap {
    fn name(&self) -> &str {
        "volume"
    }
    fn device(&self) -> &str {
        &self.device
    }
    fn owners(&self, offset: u64, len: u64, out: &mut Vec<OwnerPiece>) -> Result<(), RmapError> {
        let end = offset.saturating_add(len);
        let v = self.volumes.read().map_err(|_| RmapError::Volume {
            device: self.device.clone(),
            volume: String::new(),
            reason: "volume table lock poisoned".into(),
        })?;
        for (name, s, l) in v.iter() {
            let (a, b) = (offset.max(*s), end.min(s + l));
            if a < b {
                out.push(OwnerPiece {
                    device: self.device.clone(),
                    offset: a,
                    len: b - a,
                    owner: Owner::Volume { name: name.clone(), offset: a - s },
                    rmap: "volume".into(),
                    depth: 0,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        dev: String,
        owner: Owner,
    }
    impl Rmap for Fixed {
        fn name(&self) -> &str {
            "fixed"
        }
        fn device(&self) -> &str {
            &self.dev
        }
        fn owners(&self, offset: u64, len: u64, out: &mut Vec<OwnerPiece>) -> Result<(), RmapError> {
            out.push(OwnerPiece { device: self.dev.clone(), offset, len, owner: self.owner.clone(), rmap: "fixed".into(), depth: 0 });
            Ok(())
        }
    }

    #[test]
    fn chain_follows_volumes() {
        let reg = Registry::new();
        let vm = Arc::new(VolumeMap::new("nvme0n1"));
        vm.add("vol0", 1 << 20, 1 << 30).unwrap();
        vm.add("vol1", (1 << 20) + (1 << 30), 1 << 20).unwrap();
        assert!(vm.add("bad", 1 << 20, 4096).is_err());
        reg.register(vm);
        let file = Owner::File { ino: 131, file_offset: 8192, attr_fork: false, bmbt: false, unwritten: false };
        reg.register(Arc::new(Fixed { dev: "vol0".into(), owner: file.clone() }));
        let r = reg.resolve("nvme0n1", (1 << 20) + 4096, 4096);
        assert!(r.failures.is_empty());
        assert_eq!(r.pieces.len(), 2);
        assert_eq!(r.pieces[0].owner, Owner::Volume { name: "vol0".into(), offset: 4096 });
        let leaf = r.leaves().next().unwrap();
        assert_eq!(leaf.device, "vol0");
        assert_eq!(leaf.offset, 4096);
        assert_eq!(leaf.owner, file);
        assert_eq!(leaf.depth, 1);
        // A range before any volume has no owner at all.
        assert!(reg.resolve("nvme0n1", 0, 4096).pieces.is_empty());
    }

    #[test]
    fn loops_stop_at_the_depth_limit() {
        let reg = Registry::new();
        let a = Arc::new(VolumeMap::new("a"));
        a.add("a", 0, 1 << 20).unwrap();
        reg.register(a);
        let r = reg.resolve("a", 0, 4096);
        assert_eq!(r.pieces.len(), MAX_CHAIN_DEPTH);
        assert_eq!(r.failures.len(), 1);
    }
}
