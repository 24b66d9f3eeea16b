//! The AGF: each allocation group's free-space header (its second sector), which roots the reverse-map btree.

use crate::error::{RmapError, XfsStructure};
use crate::xfs::crc::{be32, stored_and_computed};
use crate::xfs::superblock::XfsSuperblock;

/// `XAGF`.
pub const AGF_MAGIC: u32 = 0x5841_4746;
/// Byte offset of `agf_crc`.
pub const AGF_CRC_OFF: usize = 216;
/// Byte offset of the rmap btree root (`agf_roots[2]`).
pub const AGF_RMAP_ROOT_OFF: usize = 24;
/// Byte offset of the rmap btree height (`agf_levels[2]`).
pub const AGF_RMAP_LEVEL_OFF: usize = 36;
/// Byte offset of `agf_rmap_blocks`.
pub const AGF_RMAP_BLOCKS_OFF: usize = 80;
const AGF_VERSION: u32 = 1;
const AGF_UUID_OFF: usize = 64;

/// The most levels a reverse-map btree can have on any filesystem: with the smallest CRC block size (1 KiB), half
/// full nodes and the largest AG, nine levels index every block.
pub const RMAP_MAX_LEVELS: u32 = 9;

/// What the reader needs from one AGF, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XfsAgf {
    /// The AG.
    pub agno: u32,
    /// Blocks in the AG.
    pub length: u32,
    /// Root block of the rmap btree.
    pub rmap_root: u32,
    /// Levels of the rmap btree (1: the root is a leaf).
    pub rmap_levels: u32,
    /// Blocks in the rmap btree (the root included).
    pub rmap_blocks: u32,
}

fn bad(agno: u32, field: &'static str, value: u64, reason: &'static str) -> RmapError {
    RmapError::XfsAgf { agno, field, value, reason }
}

impl XfsAgf {
    /// Parse and check the AGF of `agno` (`buf` is its sector).
    ///
    /// # Errors
    /// [`RmapError::XfsBadMagic`], [`RmapError::XfsBadCrc`], [`RmapError::XfsAgf`] for a field that disagrees with
    /// the superblock, [`RmapError::XfsBtreeTooDeep`] for an impossible rmap btree height.
    pub fn parse(buf: &[u8], sb: &XfsSuperblock, agno: u32, offset_bytes: u64) -> Result<XfsAgf, RmapError> {
        let magic = be32(buf, 0);
        if magic != AGF_MAGIC {
            return Err(RmapError::XfsBadMagic { what: XfsStructure::Agf, offset_bytes, found: magic, expected: AGF_MAGIC });
        }
        let sector = buf.get(..usize::from(sb.sector_size)).unwrap_or(buf);
        let (stored, computed) = stored_and_computed(sector, AGF_CRC_OFF);
        if stored != computed {
            return Err(RmapError::XfsBadCrc { what: XfsStructure::Agf, offset_bytes, stored, computed });
        }
        let version = be32(buf, 4);
        if version != AGF_VERSION {
            return Err(bad(agno, "agf_versionnum", u64::from(version), "not version 1"));
        }
        let seqno = be32(buf, 8);
        if seqno != agno {
            return Err(bad(agno, "agf_seqno", u64::from(seqno), "is not this AG's number"));
        }
        let length = be32(buf, 12);
        if length != sb.ag_length(agno) {
            return Err(bad(agno, "agf_length", u64::from(length), "disagrees with the superblock's AG size"));
        }
        if buf.get(AGF_UUID_OFF..AGF_UUID_OFF + 16) != Some(&sb.meta_uuid[..]) {
            return Err(bad(agno, "agf_uuid", 0, "is not the filesystem's metadata uuid"));
        }
        let rmap_levels = be32(buf, AGF_RMAP_LEVEL_OFF);
        if rmap_levels == 0 || rmap_levels > RMAP_MAX_LEVELS {
            return Err(RmapError::XfsBtreeTooDeep { agno, levels: rmap_levels, max: RMAP_MAX_LEVELS });
        }
        let rmap_root = be32(buf, AGF_RMAP_ROOT_OFF);
        if rmap_root <= sb.agfl_block() || rmap_root >= length {
            return Err(RmapError::XfsBtreePointer { agno, agbno: 0, index: 0, ptr: rmap_root, ag_blocks: length });
        }
        let rmap_blocks = be32(buf, AGF_RMAP_BLOCKS_OFF);
        if rmap_blocks == 0 || rmap_blocks >= length {
            return Err(bad(agno, "agf_rmap_blocks", u64::from(rmap_blocks), "zero or more blocks than the AG has"));
        }
        Ok(XfsAgf { agno, length, rmap_root, rmap_levels, rmap_blocks })
    }
}
