//! The XFS reverse-map plugin: who owns a byte range of a device that holds an XFS filesystem?
//!
//! It reads the filesystem's own reverse-map btree (rmapbt, `mkfs.xfs -m rmapbt=1`) through a [`BlockDev`]: the v5
//! superblock, each AG's AGF, then the btree blocks, every one CRC-checked and its header checked against where it
//! was found. Nothing is tracked ahead of time: a lookup walks from the AGF to the leaves that overlap the range
//! (a handful of block reads, most of them served by a small bounded cache after the first).
//!
//! The answer for each filesystem block is one of: the records that own it (an inode's data or attr fork, a
//! block-map btree block, or a kind of metadata; several records when reflinked files share the block), free
//! space (no record), or "outside the filesystem".
//!
//! The reader sees the on-disk state. On a mounted filesystem the log may hold newer metadata; cached blocks are
//! kept until [`XfsRmap::invalidate`].
//!
//! Every number read from disk is checked: sizes against the superblock, pointers against the AG, levels against
//! the height the AGF gives (so a pointer cannot lead back up: a loop), and the blocks visited against the tree's
//! size. Corruption is an [`RmapError`], never a panic.

pub mod agf;
pub mod btree;
pub mod crc;
mod io;
pub mod rmap;
pub mod superblock;

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use nvstack_blockdev::BlockDev;
use nvstack_driver::dma::Arena;

pub use agf::XfsAgf;
pub use rmap::{XfsMetaKind, XfsRmapRecord};
pub use superblock::XfsSuperblock;

use crate::error::RmapError;
use agf::RMAP_MAX_LEVELS;
use btree::{check_header, high_key_off, low_key_off, node_max_records, ptr_off, rec_off, Expect};
use io::{BlockCache, MetaIo};
use rmap::Key;

/// How to open the reader.
#[derive(Debug, Clone, Copy)]
pub struct XfsOptions {
    /// Byte offset of the filesystem on the device (0 for a whole-device filesystem).
    pub base_offset_bytes: u64,
    /// Bytes of metadata blocks kept in the cache (0: none). The default, 4 MiB, holds the whole rmap btree of a
    /// filesystem with about 150 k extents at 4 KiB blocks; after one [`XfsRmap::walk`] lookups read nothing.
    pub cache_bytes: usize,
    /// Deadline of each metadata read.
    pub io_timeout: Duration,
}

impl Default for XfsOptions {
    fn default() -> Self {
        XfsOptions { base_offset_bytes: 0, cache_bytes: 4 << 20, io_timeout: Duration::from_secs(5) }
    }
}

/// What owns a piece of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XfsOwnerKind {
    /// A file's blocks.
    Inode {
        /// Inode number.
        ino: u64,
        /// File offset in filesystem blocks of this piece's first block (0 for bmbt blocks).
        file_offset_blocks: u64,
        /// The attribute fork, not the data fork.
        attr_fork: bool,
        /// A block of the fork's block-map btree, not data.
        bmbt: bool,
        /// Preallocated and not yet written.
        unwritten: bool,
    },
    /// Filesystem metadata.
    Metadata(XfsMetaKind),
    /// Free space: no record covers it.
    Free,
    /// Beyond the filesystem's data blocks (or before its start on the device).
    OutsideFilesystem,
}

/// One owner of a piece of the range asked about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct XfsOwner {
    /// First device byte of the piece (inside the range asked about).
    pub offset_bytes: u64,
    /// Bytes of the piece.
    pub len_bytes: u64,
    /// The owner.
    pub kind: XfsOwnerKind,
    /// AG of the piece (0 outside the filesystem).
    pub agno: u32,
    /// First AG block of the piece.
    pub agbno: u32,
    /// Filesystem blocks the piece touches.
    pub block_count: u32,
    /// The whole record this piece comes from (`None` for free space and outside the filesystem).
    pub record: Option<XfsRmapRecord>,
}

/// What a full walk saw.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XfsWalkStats {
    /// AGs walked.
    pub ags: u32,
    /// Btree blocks read.
    pub blocks: u64,
    /// Records.
    pub records: u64,
    /// Deepest tree (levels).
    pub max_levels: u32,
}

/// Metadata-read counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XfsCacheStats {
    /// Btree blocks served by the cache.
    pub hits: u64,
    /// Btree blocks read from the device.
    pub misses: u64,
}

/// The reverse-map reader of one XFS filesystem on one device.
pub struct XfsRmap {
    /// Kept so the device outlives the channel the reader holds.
    _dev: Arc<dyn BlockDev>,
    device: String,
    sb: XfsSuperblock,
    base: u64,
    node_max: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for XfsRmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XfsRmap").field("device", &self.device).field("sb", &self.sb).finish()
    }
}

struct Inner {
    io: MetaIo,
    cache: BlockCache,
    agfs: Vec<Option<XfsAgf>>,
    /// One block buffer per btree level (allocated at open).
    scratch: Vec<Vec<u8>>,
    /// The AGF sector buffer.
    sector: Vec<u8>,
}

/// Per-walk state.
struct Walk<'a> {
    agf: XfsAgf,
    lo: u32,
    hi: u32,
    strict: bool,
    visits: u64,
    path: [u32; RMAP_MAX_LEVELS as usize],
    max_level_seen: u32,
    out: &'a mut dyn FnMut(&XfsRmapRecord),
}

impl XfsRmap {
    /// Open the filesystem on `dev` with default options.
    ///
    /// # Errors
    /// As [`XfsRmap::open_with`].
    pub fn open(dev: Arc<dyn BlockDev>, arena: &Arc<Arena>) -> Result<XfsRmap, RmapError> {
        Self::open_with(dev, arena, XfsOptions::default())
    }

    /// Open the filesystem that starts `opts.base_offset_bytes` into `dev`: read and check its superblock.
    ///
    /// # Errors
    /// I/O set-up errors ([`RmapError::XfsChannel`], [`RmapError::XfsBuffers`]), read errors, and the superblock's
    /// ([`RmapError::XfsBadMagic`], [`RmapError::XfsBadCrc`], [`RmapError::XfsSuperblock`],
    /// [`RmapError::XfsFeature`]); [`RmapError::XfsTruncated`] when the device is smaller than the filesystem.
    pub fn open_with(dev: Arc<dyn BlockDev>, arena: &Arc<Arena>, opts: XfsOptions) -> Result<XfsRmap, RmapError> {
        let mut io = MetaIo::open(&dev, arena, opts.io_timeout)?;
        let device = io.device().to_string();
        // The superblock's sector size is not known yet: read the largest sector.
        let first = 32768u64.min(io.dev_bytes().saturating_sub(opts.base_offset_bytes)).max(512);
        let mut sb_buf = vec![0u8; first as usize];
        io.read(opts.base_offset_bytes, &mut sb_buf)?;
        let sb = XfsSuperblock::parse(&sb_buf, opts.base_offset_bytes)?;
        let needed = opts.base_offset_bytes.saturating_add(sb.data_bytes());
        if needed > io.dev_bytes() {
            return Err(RmapError::XfsTruncated { device, device_bytes: io.dev_bytes(), needed_bytes: needed });
        }
        let block = sb.block_size as usize;
        tracing::info!(
            device = %device, block_size = sb.block_size, ag_count = sb.ag_count, ag_blocks = sb.ag_blocks,
            reflink = sb.has_reflink, "xfs rmap: filesystem opened"
        );
        let inner = Inner {
            io,
            cache: BlockCache::new(opts.cache_bytes / block, block),
            agfs: vec![None; sb.ag_count as usize],
            scratch: (0..RMAP_MAX_LEVELS).map(|_| vec![0u8; block]).collect(),
            sector: vec![0u8; usize::from(sb.sector_size)],
        };
        Ok(XfsRmap { _dev: dev, device, node_max: node_max_records(sb.block_size), sb, base: opts.base_offset_bytes, inner: Mutex::new(inner) })
    }

    /// The checked superblock.
    pub fn superblock(&self) -> &XfsSuperblock {
        &self.sb
    }

    /// The device's name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Forget cached AGFs and btree blocks (after the filesystem changed).
    pub fn invalidate(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.cache.invalidate(None);
            inner.agfs.iter_mut().for_each(|a| *a = None);
        }
    }

    /// Cache counters.
    pub fn cache_stats(&self) -> XfsCacheStats {
        self.inner.lock().map(|i| i.cache.stats()).map(|(hits, misses)| XfsCacheStats { hits, misses }).unwrap_or_default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the cache inconsistent in a way that matters (blocks are
        // re-verified on read), so a poisoned lock is recovered.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The AGF of `agno`, read and checked on first use.
    ///
    /// # Errors
    /// Read errors and [`XfsAgf::parse`]'s.
    pub fn agf(&self, agno: u32) -> Result<XfsAgf, RmapError> {
        let mut inner = self.lock();
        self.agf_locked(&mut inner, agno)
    }

    fn agf_locked(&self, inner: &mut Inner, agno: u32) -> Result<XfsAgf, RmapError> {
        if let Some(Some(a)) = inner.agfs.get(agno as usize) {
            return Ok(*a);
        }
        if agno >= self.sb.ag_count {
            return Err(RmapError::XfsAgf { agno, field: "agno", value: u64::from(agno), reason: "no such AG" });
        }
        let off = self.base + self.sb.ag_block_bytes(agno, 0) + u64::from(self.sb.sector_size);
        let Inner { io, sector, agfs, .. } = inner;
        io.read(off, sector)?;
        let agf = XfsAgf::parse(sector, &self.sb, agno, off)?;
        if let Some(slot) = agfs.get_mut(agno as usize) {
            *slot = Some(agf);
        }
        Ok(agf)
    }

    /// Who owns device bytes `[offset_bytes, offset_bytes + len_bytes)`: the owners of every filesystem block the
    /// range touches, free space where no record covers a block, and whatever lies outside the filesystem. Pieces
    /// are sorted by offset; a shared (reflinked) block yields one piece per owner.
    ///
    /// # Errors
    /// [`RmapError::XfsQueryRange`] for an empty or overflowing range; read and corruption errors.
    pub fn owners(&self, offset_bytes: u64, len_bytes: u64) -> Result<Vec<XfsOwner>, RmapError> {
        let end = offset_bytes.checked_add(len_bytes).filter(|_| len_bytes > 0).ok_or_else(|| RmapError::XfsQueryRange {
            device: self.device.clone(),
            offset_bytes,
            len_bytes,
            reason: "empty or past 2^64",
        })?;
        let mut out = Vec::new();
        let fs_start = self.base;
        let fs_end = self.base.saturating_add(self.sb.data_bytes());
        let outside = |from: u64, to: u64, out: &mut Vec<XfsOwner>| {
            if from < to {
                out.push(XfsOwner {
                    offset_bytes: from,
                    len_bytes: to - from,
                    kind: XfsOwnerKind::OutsideFilesystem,
                    agno: 0,
                    agbno: 0,
                    block_count: 0,
                    record: None,
                });
            }
        };
        outside(offset_bytes, end.min(fs_start), &mut out);
        let (from, to) = (offset_bytes.max(fs_start), end.min(fs_end));
        if from < to {
            let first = (from - fs_start) >> self.sb.block_log;
            let last = (to - 1 - fs_start) >> self.sb.block_log;
            let ag_blocks = u64::from(self.sb.ag_blocks);
            let mut inner = self.lock();
            for agno in (first / ag_blocks)..=(last / ag_blocks) {
                let agno = u32::try_from(agno).unwrap_or(u32::MAX);
                let ag_first = u64::from(agno) * ag_blocks;
                let lo = u32::try_from(first.max(ag_first) - ag_first).unwrap_or(u32::MAX);
                let hi = u32::try_from(last.min(ag_first + ag_blocks - 1) - ag_first).unwrap_or(u32::MAX);
                self.ag_owners(&mut inner, agno, lo, hi, (from, to), &mut out)?;
            }
        }
        outside(offset_bytes.max(fs_end), end, &mut out);
        out.sort_unstable();
        Ok(out)
    }

    /// The pieces of AG blocks `lo..=hi` that fall inside device bytes `bytes`.
    fn ag_owners(
        &self,
        inner: &mut Inner,
        agno: u32,
        lo: u32,
        hi: u32,
        bytes: (u64, u64),
        out: &mut Vec<XfsOwner>,
    ) -> Result<(), RmapError> {
        let mut recs: Vec<XfsRmapRecord> = Vec::new();
        match self.agf_locked(inner, agno) {
            Ok(agf) => {
                self.walk_tree(inner, agf, lo, hi, false, &mut |r| recs.push(*r))?;
            }
            // The header blocks (superblock copy, AGF, AGI, AGFL) belong to the headers whatever the btree says: a
            // poisoned or corrupt AGF is itself answerable.
            Err(e) if hi <= self.sb.agfl_block() => {
                tracing::warn!(device = %self.device, agno, error = %e, "xfs rmap: AGF unreadable; answering for the header blocks");
                recs.push(self.header_record(agno));
            }
            Err(e) => return Err(e),
        }
        recs.sort_unstable_by_key(|r| r.agbno);
        let piece = |b0: u32, b1: u32| -> (u64, u64) {
            let start = self.base + self.sb.ag_block_bytes(agno, b0);
            let stop = self.base + self.sb.ag_block_bytes(agno, b1) + u64::from(self.sb.block_size);
            let s = start.max(bytes.0);
            (s, stop.min(bytes.1) - s)
        };
        let mut covered_to = lo; // first block not yet known to be covered
        for r in &recs {
            let Some(r_last) = r.last_block() else { continue };
            let b0 = r.agbno.max(lo);
            let b1 = r_last.min(hi);
            if b0 > b1 {
                continue;
            }
            if b0 > covered_to {
                let (offset_bytes, len_bytes) = piece(covered_to, b0 - 1);
                out.push(free_piece(offset_bytes, len_bytes, agno, covered_to, b0 - covered_to));
            }
            covered_to = covered_to.max(b1.saturating_add(1));
            let kind = if rmap::is_special_owner(r.owner) {
                XfsMetaKind::from_owner(r.owner).map_or(XfsOwnerKind::Metadata(XfsMetaKind::Unknown), XfsOwnerKind::Metadata)
            } else {
                let skip = u64::from(b0 - r.agbno);
                XfsOwnerKind::Inode {
                    ino: r.owner,
                    file_offset_blocks: if r.bmbt { 0 } else { r.offset + skip },
                    attr_fork: r.attr_fork,
                    bmbt: r.bmbt,
                    unwritten: r.unwritten,
                }
            };
            let (offset_bytes, len_bytes) = piece(b0, b1);
            out.push(XfsOwner { offset_bytes, len_bytes, kind, agno, agbno: b0, block_count: b1 - b0 + 1, record: Some(*r) });
        }
        if covered_to <= hi {
            let (offset_bytes, len_bytes) = piece(covered_to, hi);
            out.push(free_piece(offset_bytes, len_bytes, agno, covered_to, hi - covered_to + 1));
        }
        Ok(())
    }

    /// The record every AG has for its header blocks (what XFS writes at mkfs).
    fn header_record(&self, agno: u32) -> XfsRmapRecord {
        XfsRmapRecord {
            agno,
            agbno: 0,
            block_count: self.sb.agfl_block() + 1,
            owner: XfsMetaKind::AgHeaders.owner_value() as u64,
            offset: 0,
            attr_fork: false,
            bmbt: false,
            unwritten: false,
        }
    }

    /// Every record of every AG, in btree order, checking every block and that each node's keys agree with its
    /// children. Returns what it saw. The blocks read stay in the cache (as many as it holds), so a walk at start
    /// makes later lookups read nothing.
    ///
    /// # Errors
    /// Read and corruption errors (the first met).
    pub fn walk(&self, visit: &mut dyn FnMut(&XfsRmapRecord)) -> Result<XfsWalkStats, RmapError> {
        let mut stats = XfsWalkStats::default();
        let mut inner = self.lock();
        for agno in 0..self.sb.ag_count {
            let agf = self.agf_locked(&mut inner, agno)?;
            let mut n = 0u64;
            let (blocks, levels) = self.walk_tree(&mut inner, agf, 0, u32::MAX, true, &mut |r| {
                n += 1;
                visit(r)
            })?;
            stats.ags += 1;
            stats.blocks += blocks;
            stats.records += n;
            stats.max_levels = stats.max_levels.max(levels);
        }
        Ok(stats)
    }

    /// Every record of every AG, collected.
    ///
    /// # Errors
    /// As [`XfsRmap::walk`].
    pub fn records(&self) -> Result<Vec<XfsRmapRecord>, RmapError> {
        let mut v = Vec::new();
        self.walk(&mut |r| v.push(*r))?;
        Ok(v)
    }

    /// Visit the records of `agf`'s tree that overlap AG blocks `lo..=hi`. Returns (blocks read, levels).
    fn walk_tree(
        &self,
        inner: &mut Inner,
        agf: XfsAgf,
        lo: u32,
        hi: u32,
        strict: bool,
        out: &mut dyn FnMut(&XfsRmapRecord),
    ) -> Result<(u64, u32), RmapError> {
        let mut w = Walk { agf, lo, hi, strict, visits: 0, path: [u32::MAX; RMAP_MAX_LEVELS as usize], max_level_seen: 0, out };
        let root_level = u16::try_from(agf.rmap_levels - 1).unwrap_or(u16::MAX);
        self.visit(inner, &mut w, agf.rmap_root, root_level, 0)?;
        Ok((w.visits, w.max_level_seen + 1))
    }

    /// Read and check block `agbno` at `depth` (its level must be `level`), then visit its overlapping entries.
    /// Returns the block's (low key, high key), computed from its entries (meaningful when all were visited).
    fn visit(&self, inner: &mut Inner, w: &mut Walk<'_>, agbno: u32, level: u16, depth: usize) -> Result<Option<(Key, Key)>, RmapError> {
        let agno = w.agf.agno;
        w.visits += 1;
        if w.visits > u64::from(w.agf.rmap_blocks) {
            return Err(RmapError::XfsBtreeVisitLimit { agno, limit: w.visits, tree_blocks: w.agf.rmap_blocks });
        }
        if let Some(p) = w.path.get_mut(depth) {
            *p = agbno;
        }
        w.max_level_seen = w.max_level_seen.max(u32::from(level));
        let offset_bytes = self.base + self.sb.ag_block_bytes(agno, agbno);
        let expect = Expect {
            agno,
            agbno,
            ag_length: w.agf.length,
            daddr: self.sb.ag_block_bytes(agno, agbno) >> 9,
            offset_bytes,
            level,
            uuid: self.sb.meta_uuid,
        };
        let hdr = self.load_block(inner, depth, &expect)?;
        if level == 0 {
            return self.visit_leaf(inner, w, agbno, depth, hdr.numrecs);
        }
        let mut low_of_block: Option<Key> = None;
        let mut high_of_block: Option<Key> = None;
        let mut prev_low: Option<Key> = None;
        for i in 0..hdr.numrecs {
            let (low, high, ptr) = {
                let b = inner.scratch.get(depth).map(Vec::as_slice).unwrap_or(&[]);
                (Key::decode(b, low_key_off(i)), Key::decode(b, high_key_off(i)), crc::be32(b, ptr_off(i, self.node_max)))
            };
            if prev_low.is_some_and(|p| p > low) {
                return Err(RmapError::XfsBtreeKeys { agno, agbno, index: i, reason: "low keys out of order" });
            }
            if high.startblock < low.startblock {
                return Err(RmapError::XfsBtreeKeys { agno, agbno, index: i, reason: "high key below the low key" });
            }
            prev_low = Some(low);
            low_of_block.get_or_insert(low);
            high_of_block = Some(high_of_block.map_or(high, |h: Key| h.max(high)));
            if ptr <= self.sb.agfl_block() || ptr >= w.agf.length {
                return Err(RmapError::XfsBtreePointer { agno, agbno, index: i, ptr, ag_blocks: w.agf.length });
            }
            if w.path.iter().take(depth + 1).any(|&a| a == ptr) {
                return Err(RmapError::XfsBtreeLoop { agno, agbno, index: i, ptr });
            }
            if !w.strict && (low.startblock > w.hi || high.startblock < w.lo) {
                if low.startblock > w.hi {
                    break;
                }
                continue;
            }
            let child = self.visit(inner, w, ptr, level - 1, depth + 1)?;
            if w.strict && child != Some((low, high)) {
                return Err(RmapError::XfsBtreeKeys { agno, agbno, index: i, reason: "keys disagree with the child block" });
            }
        }
        Ok(low_of_block.zip(high_of_block))
    }

    fn visit_leaf(&self, inner: &mut Inner, w: &mut Walk<'_>, agbno: u32, depth: usize, numrecs: usize) -> Result<Option<(Key, Key)>, RmapError> {
        let agno = w.agf.agno;
        let mut low_of_block: Option<Key> = None;
        let mut high_of_block: Option<Key> = None;
        let mut prev_low: Option<Key> = None;
        for i in 0..numrecs {
            let b = inner.scratch.get(depth).map(Vec::as_slice).unwrap_or(&[]);
            let rec = XfsRmapRecord::decode_checked(b, rec_off(i), agno)
                .and_then(|r| r.check(&self.sb, w.agf.length).map(|()| r))
                .map_err(|reason| RmapError::XfsRecord { agno, agbno, index: i, reason })?;
            let low = rec.low_key();
            if prev_low.is_some_and(|p| p > low) {
                return Err(RmapError::XfsBtreeKeys { agno, agbno, index: i, reason: "records out of order" });
            }
            prev_low = Some(low);
            low_of_block.get_or_insert(low);
            let high = rec.high_key();
            high_of_block = Some(high_of_block.map_or(high, |h: Key| h.max(high)));
            if rec.agbno > w.hi && !w.strict {
                break;
            }
            let last = rec.last_block().unwrap_or(rec.agbno);
            if last >= w.lo && rec.agbno <= w.hi {
                (w.out)(&rec);
            }
        }
        Ok(low_of_block.zip(high_of_block))
    }

    /// Bring block `e.agbno` into `scratch[depth]` (from the cache or the device) and check its header.
    fn load_block(&self, inner: &mut Inner, depth: usize, e: &Expect) -> Result<btree::Header, RmapError> {
        let Inner { io, cache, scratch, .. } = inner;
        let buf = scratch.get_mut(depth).ok_or(RmapError::XfsBtreeTooDeep {
            agno: e.agno,
            levels: u32::try_from(depth).unwrap_or(u32::MAX).saturating_add(1),
            max: RMAP_MAX_LEVELS,
        })?;
        if cache.get(e.offset_bytes, buf) {
            return check_header(buf, e);
        }
        io.read(e.offset_bytes, buf)?;
        let hdr = check_header(buf, e)?;
        cache.insert(e.offset_bytes, e.agno, buf);
        Ok(hdr)
    }
}

fn free_piece(offset_bytes: u64, len_bytes: u64, agno: u32, agbno: u32, block_count: u32) -> XfsOwner {
    XfsOwner { offset_bytes, len_bytes, kind: XfsOwnerKind::Free, agno, agbno, block_count, record: None }
}
