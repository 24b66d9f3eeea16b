//! Short-form v5 btree blocks, as the reverse-map btree uses them: header checks and the layout of records, keys
//! (a low and a high key per child: the rmap btree indexes overlapping intervals) and pointers.
//!
//! Header: magic (be32), level (be16), numrecs (be16), left and right siblings (be32 AG blocks), blkno (be64, the
//! block's own 512-byte disk address), lsn (be64), uuid (16 bytes), owner (be32, the AG number), crc (le32): 56
//! bytes.

use crate::error::{RmapError, XfsStructure};
use crate::xfs::crc::{be16, be32, be64, stored_and_computed};
use crate::xfs::rmap::{KEY_BYTES, PTR_BYTES, REC_BYTES};

/// `RMB3`.
pub const RMAP_MAGIC: u32 = 0x524d_4233;
/// Header bytes of a short-form CRC btree block.
pub const SBLOCK_HDR_BYTES: usize = 56;
/// Byte offset of the CRC in a short-form block.
pub const SBLOCK_CRC_OFF: usize = 52;
/// Byte offset of the level.
pub const LEVEL_OFF: usize = 4;
/// Byte offset of the record count.
pub const NUMRECS_OFF: usize = 6;
const LEFTSIB_OFF: usize = 8;
const RIGHTSIB_OFF: usize = 12;
const BLKNO_OFF: usize = 16;
const UUID_OFF: usize = 32;
const OWNER_OFF: usize = 48;
/// "No sibling".
pub const NULL_AGBLOCK: u32 = u32::MAX;

/// Records a leaf block of `block_size` bytes holds.
pub fn leaf_max_records(block_size: u32) -> usize {
    (block_size as usize).saturating_sub(SBLOCK_HDR_BYTES) / REC_BYTES
}

/// Children a node block of `block_size` bytes holds (each: a low key, a high key and a pointer).
pub fn node_max_records(block_size: u32) -> usize {
    (block_size as usize).saturating_sub(SBLOCK_HDR_BYTES) / (2 * KEY_BYTES + PTR_BYTES)
}

/// Byte offset of record `i` in a leaf.
#[inline]
pub fn rec_off(i: usize) -> usize {
    SBLOCK_HDR_BYTES + i * REC_BYTES
}

/// Byte offset of the low key of child `i` in a node.
#[inline]
pub fn low_key_off(i: usize) -> usize {
    SBLOCK_HDR_BYTES + i * 2 * KEY_BYTES
}

/// Byte offset of the high key of child `i` in a node.
#[inline]
pub fn high_key_off(i: usize) -> usize {
    low_key_off(i) + KEY_BYTES
}

/// Byte offset of the pointer to child `i` in a node of a filesystem with `node_max` children per node.
#[inline]
pub fn ptr_off(i: usize, node_max: usize) -> usize {
    SBLOCK_HDR_BYTES + node_max * 2 * KEY_BYTES + i * PTR_BYTES
}

/// Where a block was read and what it must be.
#[derive(Debug, Clone, Copy)]
pub struct Expect {
    /// AG.
    pub agno: u32,
    /// Block within the AG.
    pub agbno: u32,
    /// Blocks in the AG.
    pub ag_length: u32,
    /// 512-byte disk address of the block (what `bb_blkno` must say).
    pub daddr: u64,
    /// Byte offset on the device (for messages).
    pub offset_bytes: u64,
    /// The level it must have.
    pub level: u16,
    /// Filesystem metadata uuid.
    pub uuid: [u8; 16],
}

/// A checked block header.
#[derive(Debug, Clone, Copy)]
pub struct Header {
    /// Level (0: leaf).
    pub level: u16,
    /// Entries.
    pub numrecs: usize,
}

fn hdr_bad(e: &Expect, field: &'static str, value: u64, reason: &'static str) -> RmapError {
    RmapError::XfsBtreeBlock { agno: e.agno, agbno: e.agbno, field, value, reason }
}

/// Check a reverse-map btree block's magic, CRC and header against where it was found.
///
/// # Errors
/// [`RmapError::XfsBadMagic`], [`RmapError::XfsBadCrc`], or [`RmapError::XfsBtreeBlock`] naming the field.
pub fn check_header(buf: &[u8], e: &Expect) -> Result<Header, RmapError> {
    let magic = be32(buf, 0);
    if magic != RMAP_MAGIC {
        return Err(RmapError::XfsBadMagic {
            what: XfsStructure::RmapBlock,
            offset_bytes: e.offset_bytes,
            found: magic,
            expected: RMAP_MAGIC,
        });
    }
    let (stored, computed) = stored_and_computed(buf, SBLOCK_CRC_OFF);
    if stored != computed {
        return Err(RmapError::XfsBadCrc { what: XfsStructure::RmapBlock, offset_bytes: e.offset_bytes, stored, computed });
    }
    if buf.get(UUID_OFF..UUID_OFF + 16) != Some(&e.uuid[..]) {
        return Err(hdr_bad(e, "bb_uuid", 0, "is not the filesystem's metadata uuid"));
    }
    let blkno = be64(buf, BLKNO_OFF);
    if blkno != e.daddr {
        return Err(hdr_bad(e, "bb_blkno", blkno, "is not the block's own disk address (misdirected write?)"));
    }
    let owner = be32(buf, OWNER_OFF);
    if owner != e.agno {
        return Err(hdr_bad(e, "bb_owner", u64::from(owner), "is not this AG"));
    }
    let level = be16(buf, LEVEL_OFF);
    if level != e.level {
        return Err(hdr_bad(e, "bb_level", u64::from(level), "is not one below its parent (or the AGF's height)"));
    }
    let numrecs = usize::from(be16(buf, NUMRECS_OFF));
    let block_size = u32::try_from(buf.len()).unwrap_or(0);
    let max = if level == 0 { leaf_max_records(block_size) } else { node_max_records(block_size) };
    if numrecs > max || (level > 0 && numrecs == 0) {
        return Err(hdr_bad(e, "bb_numrecs", numrecs as u64, "zero in a node, or more entries than the block holds"));
    }
    for (field, off) in [("bb_leftsib", LEFTSIB_OFF), ("bb_rightsib", RIGHTSIB_OFF)] {
        let sib = be32(buf, off);
        if sib != NULL_AGBLOCK && (sib >= e.ag_length || sib == e.agbno) {
            return Err(hdr_bad(e, field, u64::from(sib), "outside the AG or the block itself"));
        }
    }
    Ok(Header { level, numrecs })
}
