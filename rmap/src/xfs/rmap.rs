//! Reverse-map records and keys: their on-disk encoding, their checks, and what an owner means.

use crate::xfs::crc::{be32, be64};
use crate::xfs::superblock::XfsSuperblock;

/// Bytes of one on-disk record (`startblock` be32, `blockcount` be32, `owner` be64, `offset` be64).
pub const REC_BYTES: usize = 24;
/// Bytes of one on-disk key (`startblock` be32, `owner` be64, `offset` be64, packed).
pub const KEY_BYTES: usize = 20;
/// Bytes of one node pointer (an AG block number).
pub const PTR_BYTES: usize = 4;

/// `rm_offset` bit 63: the extent belongs to the attribute fork.
pub const OFF_ATTR_FORK: u64 = 1 << 63;
/// `rm_offset` bit 62: the extent is a block of the fork's block-map btree.
pub const OFF_BMBT_BLOCK: u64 = 1 << 62;
/// `rm_offset` bit 61: the extent is preallocated, not yet written.
pub const OFF_UNWRITTEN: u64 = 1 << 61;
/// The file block offset: `rm_offset` bits 0..54.
pub const OFF_MASK: u64 = (1 << 54) - 1;
/// Largest file offset in blocks plus one.
const MAX_FILE_BLOCKS: u64 = 1 << 54;

/// The kinds of metadata XFS records with negative ("special") owners.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XfsMetaKind {
    /// `-1`: no owner (growfs).
    Null,
    /// `-2`: unknown owner (log recovery).
    Unknown,
    /// `-3`: static filesystem metadata: superblock, AGF, AGI and AGFL sectors.
    AgHeaders,
    /// `-4`: the internal log.
    Log,
    /// `-5`: free-space btrees (by block and by size), the rmap btree and AGFL blocks.
    FreeSpaceBtrees,
    /// `-6`: inode btrees (inobt and finobt).
    InodeBtrees,
    /// `-7`: inode chunks.
    InodeChunks,
    /// `-8`: the refcount btree.
    RefcountBtree,
    /// `-9`: copy-on-write staging extents.
    CowStaging,
}

impl XfsMetaKind {
    /// The kind of a special owner value, or `None` for one XFS does not define.
    pub fn from_owner(owner: u64) -> Option<XfsMetaKind> {
        Some(match owner as i64 {
            -1 => XfsMetaKind::Null,
            -2 => XfsMetaKind::Unknown,
            -3 => XfsMetaKind::AgHeaders,
            -4 => XfsMetaKind::Log,
            -5 => XfsMetaKind::FreeSpaceBtrees,
            -6 => XfsMetaKind::InodeBtrees,
            -7 => XfsMetaKind::InodeChunks,
            -8 => XfsMetaKind::RefcountBtree,
            -9 => XfsMetaKind::CowStaging,
            _ => return None,
        })
    }

    /// The owner value on disk (as xfs_db prints it, negative).
    pub fn owner_value(self) -> i64 {
        match self {
            XfsMetaKind::Null => -1,
            XfsMetaKind::Unknown => -2,
            XfsMetaKind::AgHeaders => -3,
            XfsMetaKind::Log => -4,
            XfsMetaKind::FreeSpaceBtrees => -5,
            XfsMetaKind::InodeBtrees => -6,
            XfsMetaKind::InodeChunks => -7,
            XfsMetaKind::RefcountBtree => -8,
            XfsMetaKind::CowStaging => -9,
        }
    }

    /// A short name for logs and reports.
    pub fn name(self) -> &'static str {
        match self {
            XfsMetaKind::Null => "no owner",
            XfsMetaKind::Unknown => "unknown owner",
            XfsMetaKind::AgHeaders => "AG headers",
            XfsMetaKind::Log => "log",
            XfsMetaKind::FreeSpaceBtrees => "free-space btrees",
            XfsMetaKind::InodeBtrees => "inode btrees",
            XfsMetaKind::InodeChunks => "inode chunk",
            XfsMetaKind::RefcountBtree => "refcount btree",
            XfsMetaKind::CowStaging => "CoW staging",
        }
    }
}

/// Whether an owner value is special (metadata) rather than an inode number.
#[inline]
pub fn is_special_owner(owner: u64) -> bool {
    owner & (1 << 63) != 0
}

/// One reverse-map record: `block_count` blocks from `agbno` in AG `agno` belong to `owner`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XfsRmapRecord {
    /// Allocation group.
    pub agno: u32,
    /// First block, within the AG.
    pub agbno: u32,
    /// Blocks.
    pub block_count: u32,
    /// Inode number, or a special owner (see [`XfsMetaKind`]; negative as `i64`).
    pub owner: u64,
    /// File offset in blocks of the first block (0 for metadata and bmbt blocks).
    pub offset: u64,
    /// The attribute fork, not the data fork.
    pub attr_fork: bool,
    /// A block of the fork's block-map btree.
    pub bmbt: bool,
    /// Preallocated, not yet written.
    pub unwritten: bool,
}

/// Why a record is invalid.
pub type RecordFault = &'static str;

impl XfsRmapRecord {
    /// Decode the record at `off` in a leaf block, without checks.
    pub fn decode(buf: &[u8], off: usize, agno: u32) -> XfsRmapRecord {
        let raw_offset = be64(buf, off + 16);
        XfsRmapRecord {
            agno,
            agbno: be32(buf, off),
            block_count: be32(buf, off + 4),
            owner: be64(buf, off + 8),
            offset: raw_offset & OFF_MASK,
            attr_fork: raw_offset & OFF_ATTR_FORK != 0,
            bmbt: raw_offset & OFF_BMBT_BLOCK != 0,
            unwritten: raw_offset & OFF_UNWRITTEN != 0,
        }
    }

    /// Decode and check the raw `rm_offset` reserved bits (54..61 must be zero).
    pub fn decode_checked(buf: &[u8], off: usize, agno: u32) -> Result<XfsRmapRecord, RecordFault> {
        let raw_offset = be64(buf, off + 16);
        if raw_offset & !(OFF_MASK | OFF_ATTR_FORK | OFF_BMBT_BLOCK | OFF_UNWRITTEN) != 0 {
            return Err("reserved offset bits are set");
        }
        Ok(Self::decode(buf, off, agno))
    }

    /// Last block of the extent (inclusive), or `None` for an empty or overflowing one.
    pub fn last_block(&self) -> Option<u32> {
        self.agbno.checked_add(self.block_count.checked_sub(1)?)
    }

    /// Check the record as XFS's own verifier does: non-empty, inside the AG (only the header records may cover
    /// the header blocks), a known owner, and flags that fit the owner.
    pub fn check(&self, sb: &XfsSuperblock, ag_length: u32) -> Result<(), RecordFault> {
        if self.block_count == 0 {
            return Err("zero block count");
        }
        let agfl = sb.agfl_block();
        if self.agbno <= agfl {
            if self.owner != (-3i64) as u64 || u64::from(self.block_count) != u64::from(agfl) + 1 {
                return Err("a record over the AG header blocks that is not the header record");
            }
        } else {
            match self.agbno.checked_add(self.block_count) {
                Some(end) if end <= ag_length => {}
                _ => return Err("extent runs past the end of the AG"),
            }
        }
        let special = is_special_owner(self.owner);
        if special {
            if self.owner as i64 > -3 || XfsMetaKind::from_owner(self.owner).is_none() {
                return Err("unknown special owner");
            }
            if self.offset != 0 || self.attr_fork || self.bmbt || self.unwritten {
                return Err("metadata owner with a file offset or fork flags");
            }
        } else {
            if !sb.inode_plausible(self.owner) {
                return Err("owner is not a valid inode number");
            }
            if self.bmbt && self.offset != 0 {
                return Err("bmbt block with a file offset");
            }
            if self.unwritten && (self.bmbt || self.attr_fork) {
                return Err("unwritten flag on a bmbt or attr fork extent");
            }
            if !self.bmbt && self.offset.checked_add(u64::from(self.block_count)).is_none_or(|e| e > MAX_FILE_BLOCKS) {
                return Err("file offset runs past the largest file");
            }
        }
        Ok(())
    }

    /// The record's low key (its first block).
    pub fn low_key(&self) -> Key {
        Key { startblock: self.agbno, owner: self.owner, offset: self.key_offset(self.offset) }
    }

    /// The record's high key: its last block, and for file data its last file offset.
    pub fn high_key(&self) -> Key {
        let adj = self.block_count.saturating_sub(1);
        let offset = if is_special_owner(self.owner) || self.bmbt {
            self.offset
        } else {
            (self.offset.saturating_add(u64::from(adj))) & OFF_MASK
        };
        Key { startblock: self.agbno.saturating_add(adj), owner: self.owner, offset: self.key_offset(offset) }
    }

    fn key_offset(&self, offset: u64) -> u64 {
        let mut k = offset & OFF_MASK;
        if self.attr_fork {
            k |= OFF_ATTR_FORK;
        }
        if self.bmbt {
            k |= OFF_BMBT_BLOCK;
        }
        k
    }
}

/// A btree key as it is compared: start block, then owner, then offset with its fork and bmbt bits (the unwritten
/// bit is not part of a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Key {
    /// AG block.
    pub startblock: u32,
    /// Owner.
    pub owner: u64,
    /// Offset with the attr-fork and bmbt bits.
    pub offset: u64,
}

impl Key {
    /// Decode the key at `off` in a node block.
    pub fn decode(buf: &[u8], off: usize) -> Key {
        Key { startblock: be32(buf, off), owner: be64(buf, off + 4), offset: be64(buf, off + 12) & !OFF_UNWRITTEN }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> XfsSuperblock {
        XfsSuperblock {
            block_size: 4096,
            block_log: 12,
            sector_size: 512,
            data_blocks: 4 * 40960,
            ag_blocks: 40960,
            ag_count: 4,
            ag_block_log: 16,
            inodes_per_block_log: 3,
            log_start: 0,
            log_blocks: 0,
            root_inode: 128,
            meta_uuid: [0; 16],
            uuid: [0; 16],
            has_finobt: true,
            has_rmapbt: true,
            has_reflink: true,
        }
    }

    fn rec(agbno: u32, block_count: u32, owner: u64, offset: u64) -> XfsRmapRecord {
        XfsRmapRecord { agno: 0, agbno, block_count, owner, offset, attr_fork: false, bmbt: false, unwritten: false }
    }

    #[test]
    fn keys_follow_xfs_rules() {
        let data = rec(100, 10, 131, 50);
        assert_eq!(data.low_key(), Key { startblock: 100, owner: 131, offset: 50 });
        assert_eq!(data.high_key(), Key { startblock: 109, owner: 131, offset: 59 });
        let bmbt = XfsRmapRecord { bmbt: true, offset: 0, ..data };
        assert_eq!(bmbt.high_key(), Key { startblock: 109, owner: 131, offset: OFF_BMBT_BLOCK });
        let meta = rec(7, 6, (-5i64) as u64, 0);
        assert_eq!(meta.high_key().offset, 0);
        let unwritten = XfsRmapRecord { unwritten: true, ..data };
        assert_eq!(unwritten.low_key(), data.low_key(), "the unwritten bit is not part of a key");
        let attr = XfsRmapRecord { attr_fork: true, ..data };
        assert!(attr.low_key() > data.low_key());
    }

    #[test]
    fn record_checks() {
        let sb = sb();
        assert_eq!(rec(0, 1, (-3i64) as u64, 0).check(&sb, 40960), Ok(()));
        assert!(rec(0, 2, (-3i64) as u64, 0).check(&sb, 40960).is_err());
        assert!(rec(0, 1, 131, 0).check(&sb, 40960).is_err());
        assert_eq!(rec(10, 5, 131, 7).check(&sb, 40960), Ok(()));
        assert!(rec(10, 0, 131, 7).check(&sb, 40960).is_err());
        assert!(rec(40950, 20, 131, 7).check(&sb, 40960).is_err());
        assert!(rec(10, 5, (-10i64) as u64, 0).check(&sb, 40960).is_err());
        assert!(rec(10, 5, (-4i64) as u64, 3).check(&sb, 40960).is_err());
        assert!(rec(10, 5, 0, 0).check(&sb, 40960).is_err(), "inode 0 does not exist");
        assert!(rec(10, 5, 5u64 << 19, 0).check(&sb, 40960).is_err(), "inode in AG 5 of 4");
        assert!(XfsRmapRecord { bmbt: true, ..rec(10, 1, 131, 4) }.check(&sb, 40960).is_err());
        assert!(XfsRmapRecord { unwritten: true, attr_fork: true, ..rec(10, 1, 131, 4) }.check(&sb, 40960).is_err());
        assert!(rec(10, 5, 131, MAX_FILE_BLOCKS - 2).check(&sb, 40960).is_err());
        assert_eq!(XfsMetaKind::from_owner((-7i64) as u64), Some(XfsMetaKind::InodeChunks));
        assert_eq!(XfsMetaKind::InodeChunks.owner_value(), -7);
        assert_eq!(XfsMetaKind::from_owner(5), None);
    }

    #[test]
    fn decode_flags_and_reserved_bits() {
        let mut b = vec![0u8; 24];
        b[0..4].copy_from_slice(&10u32.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[8..16].copy_from_slice(&131u64.to_be_bytes());
        b[16..24].copy_from_slice(&(OFF_ATTR_FORK | OFF_UNWRITTEN | 9).to_be_bytes());
        let r = XfsRmapRecord::decode_checked(&b, 0, 2).unwrap();
        assert_eq!((r.agno, r.agbno, r.block_count, r.owner, r.offset), (2, 10, 3, 131, 9));
        assert!(r.attr_fork && r.unwritten && !r.bmbt);
        b[17] |= 0x40; // bit 54: reserved
        assert!(XfsRmapRecord::decode_checked(&b, 0, 2).is_err());
        // Short buffers decode as zeros instead of panicking.
        assert_eq!(XfsRmapRecord::decode(&b[..5], 0, 0).owner, 0);
    }
}
