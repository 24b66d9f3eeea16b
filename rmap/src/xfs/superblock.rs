//! The v5 superblock (sector 0 of the device): geometry and features, every field checked.

use crate::error::{RmapError, XfsStructure};
use crate::xfs::crc::{be16, be32, be64, stored_and_computed};

/// `XFSB`.
pub const SB_MAGIC: u32 = 0x5846_5342;
/// Byte offset of `sb_crc` in the superblock.
pub const SB_CRC_OFF: usize = 224;
/// Bytes of the superblock structure that are interpreted (it is padded to its sector).
pub const SB_BYTES: usize = 264;

/// `sb_versionnum` low nibble of a CRC-enabled (v5) filesystem.
const VERSION_5: u16 = 5;
const VERSION_NUM_MASK: u16 = 0x000f;

/// Read-only-compatible feature bits (`sb_features_ro_compat`).
const RO_COMPAT_FINOBT: u32 = 1 << 0;
const RO_COMPAT_RMAPBT: u32 = 1 << 1;
const RO_COMPAT_REFLINK: u32 = 1 << 2;
/// Incompatible feature bit: blocks carry `sb_meta_uuid`, not `sb_uuid`.
const INCOMPAT_META_UUID: u32 = 1 << 2;
/// Incompatible features whose on-disk changes leave the AG headers and the rmap btree as this reader knows them:
/// ftype, sparse inodes, meta uuid, bigtime, needsrepair, large extent counts, exchange-range, parent pointers.
const INCOMPAT_KNOWN: u32 = 0xff;

/// Smallest and largest filesystem block sizes.
const MIN_BLOCK_BYTES: u32 = 512;
const MAX_BLOCK_BYTES: u32 = 65536;
/// Smallest and largest sector sizes.
const MIN_SECTOR_BYTES: u16 = 512;
const MAX_SECTOR_BYTES: u16 = 32768;
/// An AG holds at least 64 blocks and at most 2^31 - 1 blocks... and at most 1 TiB.
const MIN_AG_BLOCKS: u32 = 64;
const MAX_AG_BYTES: u64 = 1 << 40;
/// The most AGs this reader accepts (its per-AG table is sized by it at open).
pub const MAX_AG_COUNT: u32 = 1 << 20;

/// The superblock fields the reverse-map reader uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XfsSuperblock {
    /// Filesystem block size in bytes.
    pub block_size: u32,
    /// log2 of `block_size`.
    pub block_log: u8,
    /// Sector size in bytes (AG headers are one sector each).
    pub sector_size: u16,
    /// Blocks in the data device.
    pub data_blocks: u64,
    /// Blocks per AG (the last AG may be shorter).
    pub ag_blocks: u32,
    /// Number of AGs.
    pub ag_count: u32,
    /// log2 of `ag_blocks`, rounded up (the AG part of inode and fs block numbers).
    pub ag_block_log: u8,
    /// log2 of inodes per block.
    pub inodes_per_block_log: u8,
    /// First block of the internal log (0 if external).
    pub log_start: u64,
    /// Blocks in the log.
    pub log_blocks: u32,
    /// Root directory inode.
    pub root_inode: u64,
    /// The uuid stamped on every metadata block (`sb_meta_uuid` or `sb_uuid`).
    pub meta_uuid: [u8; 16],
    /// The user-visible uuid.
    pub uuid: [u8; 16],
    /// Free inode btree present.
    pub has_finobt: bool,
    /// Reverse-map btree present.
    pub has_rmapbt: bool,
    /// Reflink (shared extents, refcount btree) present.
    pub has_reflink: bool,
}

fn bad(field: &'static str, value: u64, reason: &'static str) -> RmapError {
    RmapError::XfsSuperblock { field, value, reason }
}

fn uuid_at(b: &[u8], off: usize) -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Some(s) = off.checked_add(16).and_then(|end| b.get(off..end)) {
        u.copy_from_slice(s);
    }
    u
}

fn log2_exact(v: u64) -> Option<u8> {
    v.is_power_of_two().then(|| v.trailing_zeros() as u8)
}

impl XfsSuperblock {
    /// Parse and check a superblock sector (`buf` is one sector, at least 512 bytes).
    ///
    /// # Errors
    /// [`RmapError::XfsBadMagic`], [`RmapError::XfsBadCrc`], [`RmapError::XfsSuperblock`] for an invalid field,
    /// [`RmapError::XfsFeature`] when the filesystem is not v5, lacks the rmap btree or has unknown incompatible
    /// features.
    pub fn parse(buf: &[u8], offset_bytes: u64) -> Result<XfsSuperblock, RmapError> {
        if buf.len() < usize::from(MIN_SECTOR_BYTES) {
            return Err(bad("sector", buf.len() as u64, "buffer shorter than a sector"));
        }
        let magic = be32(buf, 0);
        if magic != SB_MAGIC {
            return Err(RmapError::XfsBadMagic {
                what: XfsStructure::Superblock,
                offset_bytes,
                found: magic,
                expected: SB_MAGIC,
            });
        }
        let version = be16(buf, 100);
        if version & VERSION_NUM_MASK != VERSION_5 {
            return Err(RmapError::XfsFeature {
                reason: format!(
                    "version {} filesystem: only v5 (CRC) filesystems have a reverse-map btree; make it with mkfs.xfs -m crc=1,rmapbt=1",
                    version & VERSION_NUM_MASK
                ),
            });
        }
        let sector_size = be16(buf, 102);
        let sector_log = buf.get(121).copied().unwrap_or(0);
        if !(MIN_SECTOR_BYTES..=MAX_SECTOR_BYTES).contains(&sector_size)
            || log2_exact(u64::from(sector_size)) != Some(sector_log)
        {
            return Err(bad("sb_sectsize", u64::from(sector_size), "not a power of two in 512..=32768 matching sb_sectlog"));
        }
        // The CRC covers the whole sector.
        let sector = buf.get(..usize::from(sector_size)).ok_or_else(|| {
            bad("sb_sectsize", u64::from(sector_size), "larger than the buffer read")
        })?;
        let (stored, computed) = stored_and_computed(sector, SB_CRC_OFF);
        if stored != computed {
            return Err(RmapError::XfsBadCrc { what: XfsStructure::Superblock, offset_bytes, stored, computed });
        }
        Self::fields(buf, sector_size)
    }

    fn fields(buf: &[u8], sector_size: u16) -> Result<XfsSuperblock, RmapError> {
        let block_size = be32(buf, 4);
        let block_log = buf.get(120).copied().unwrap_or(0);
        if !(MIN_BLOCK_BYTES..=MAX_BLOCK_BYTES).contains(&block_size)
            || log2_exact(u64::from(block_size)) != Some(block_log)
        {
            return Err(bad("sb_blocksize", u64::from(block_size), "not a power of two in 512..=65536 matching sb_blocklog"));
        }
        if u32::from(sector_size) > block_size {
            return Err(bad("sb_sectsize", u64::from(sector_size), "larger than the block size"));
        }
        let ag_blocks = be32(buf, 84);
        let ag_count = be32(buf, 88);
        let data_blocks = be64(buf, 8);
        if ag_blocks < MIN_AG_BLOCKS || u64::from(ag_blocks) * u64::from(block_size) > MAX_AG_BYTES {
            return Err(bad("sb_agblocks", u64::from(ag_blocks), "outside 64 blocks..=1 TiB"));
        }
        if ag_count == 0 || ag_count > MAX_AG_COUNT {
            return Err(bad("sb_agcount", u64::from(ag_count), "zero or more AGs than the reader supports (2^20)"));
        }
        let full = u64::from(ag_count) * u64::from(ag_blocks);
        let below = full - u64::from(ag_blocks);
        if data_blocks > full || data_blocks <= below {
            return Err(bad("sb_dblocks", data_blocks, "does not fit sb_agcount AGs of sb_agblocks"));
        }
        let ag_block_log = buf.get(124).copied().unwrap_or(0);
        let want_log = 64 - (u64::from(ag_blocks) - 1).leading_zeros();
        if u32::from(ag_block_log) != want_log {
            return Err(bad("sb_agblklog", u64::from(ag_block_log), "is not log2(sb_agblocks) rounded up"));
        }
        let inode_size = be16(buf, 104);
        let inodes_per_block = be16(buf, 106);
        let inodes_per_block_log = buf.get(123).copied().unwrap_or(0);
        if !(256..=2048).contains(&inode_size)
            || !inode_size.is_power_of_two()
            || u32::from(inode_size) * u32::from(inodes_per_block) != block_size
            || log2_exact(u64::from(inodes_per_block)) != Some(inodes_per_block_log)
        {
            return Err(bad("sb_inodesize", u64::from(inode_size), "inconsistent with the block size and sb_inopblock"));
        }
        if u32::from(ag_block_log) + u32::from(inodes_per_block_log) > 32 {
            return Err(bad("sb_agblklog", u64::from(ag_block_log), "inode numbers would not fit 64 bits"));
        }
        if buf.get(126).copied().unwrap_or(0) != 0 {
            return Err(bad("sb_inprogress", 1, "mkfs did not finish"));
        }
        let ro_compat = be32(buf, 212);
        let incompat = be32(buf, 216);
        if incompat & !INCOMPAT_KNOWN != 0 {
            return Err(RmapError::XfsFeature {
                reason: format!("unknown incompatible features {:#x}: the reader does not know their layout", incompat & !INCOMPAT_KNOWN),
            });
        }
        let has_rmapbt = ro_compat & RO_COMPAT_RMAPBT != 0;
        if !has_rmapbt {
            return Err(RmapError::XfsFeature {
                reason: "no reverse-map btree (rmapbt): make the filesystem with mkfs.xfs -m rmapbt=1".into(),
            });
        }
        let log_start = be64(buf, 48);
        let log_blocks = be32(buf, 96);
        if log_start != 0 && log_start.checked_add(u64::from(log_blocks)).is_none() {
            return Err(bad("sb_logstart", log_start, "log extent overflows"));
        }
        let uuid = uuid_at(buf, 32);
        let meta_uuid = if incompat & INCOMPAT_META_UUID != 0 { uuid_at(buf, 248) } else { uuid };
        Ok(XfsSuperblock {
            block_size,
            block_log,
            sector_size,
            data_blocks,
            ag_blocks,
            ag_count,
            ag_block_log,
            inodes_per_block_log,
            log_start,
            log_blocks,
            root_inode: be64(buf, 56),
            meta_uuid,
            uuid,
            has_finobt: ro_compat & RO_COMPAT_FINOBT != 0,
            has_rmapbt,
            has_reflink: ro_compat & RO_COMPAT_REFLINK != 0,
        })
    }

    /// Bytes the data device must hold.
    pub fn data_bytes(&self) -> u64 {
        // Cannot overflow: data_blocks <= ag_count * ag_blocks <= 2^20 * 2^40 bytes / block size.
        self.data_blocks.saturating_mul(u64::from(self.block_size))
    }

    /// Blocks in AG `agno` (the last one may be shorter). 0 for an AG that does not exist.
    pub fn ag_length(&self, agno: u32) -> u32 {
        if agno >= self.ag_count {
            return 0;
        }
        let start = u64::from(agno) * u64::from(self.ag_blocks);
        let len = self.data_blocks.saturating_sub(start).min(u64::from(self.ag_blocks));
        u32::try_from(len).unwrap_or(0)
    }

    /// The AG block that holds the AGFL sector (the last of the four header sectors): every block up to it holds
    /// only headers.
    pub fn agfl_block(&self) -> u32 {
        (3 * u32::from(self.sector_size)) >> self.block_log
    }

    /// Byte offset (from the start of the filesystem) of block `agbno` of AG `agno`.
    pub fn ag_block_bytes(&self, agno: u32, agbno: u32) -> u64 {
        (u64::from(agno) * u64::from(self.ag_blocks) + u64::from(agbno)) << self.block_log
    }

    /// Whether `ino` can name an inode of this filesystem (its AG exists and its block is inside it).
    pub fn inode_plausible(&self, ino: u64) -> bool {
        let shift = u32::from(self.ag_block_log) + u32::from(self.inodes_per_block_log);
        let agno = ino.checked_shr(shift).unwrap_or(0);
        let agino = ino & ((1u64 << shift) - 1);
        let agbno = agino >> self.inodes_per_block_log;
        ino != 0 && agno < u64::from(self.ag_count) && agbno < u64::from(self.ag_blocks)
    }
}
