//! The rmap crate's one error type.
//!
//! Variants name the step that failed and carry where (device, allocation group, block, byte offset) and, when
//! another layer failed, its error as the source. On-disk corruption is always an error, never a panic.

use nvstack_blockdev::bdev::SyncError;
use nvstack_blockdev::{BdevError, IoError};
use nvstack_driver::DriverError;

/// Which on-disk XFS structure an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XfsStructure {
    /// The primary superblock (sector 0).
    Superblock,
    /// An allocation group's free-space header (AGF, sector 1 of the AG).
    Agf,
    /// A reverse-map btree block.
    RmapBlock,
}

impl std::fmt::Display for XfsStructure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            XfsStructure::Superblock => "superblock",
            XfsStructure::Agf => "AGF",
            XfsStructure::RmapBlock => "rmap btree block",
        })
    }
}

/// Failures of the poison path and its reverse maps.
#[derive(Debug, thiserror::Error)]
pub enum RmapError {
    /// Reserving the reader's DMA buffers from the arena failed.
    #[error("xfs rmap on {device}: reserving metadata buffers from the DMA arena failed")]
    XfsBuffers {
        /// Device name.
        device: String,
        /// The arena's error.
        #[source]
        source: DriverError,
    },
    /// Opening an I/O channel to the device failed.
    #[error("xfs rmap on {device}: opening an I/O channel failed")]
    XfsChannel {
        /// Device name.
        device: String,
        /// The block layer's error (boxed: it is large).
        #[source]
        source: Box<BdevError>,
    },
    /// A metadata read could not be submitted or did not complete in time.
    #[error("xfs rmap on {device}: reading {len_bytes} bytes at byte {offset_bytes} did not complete")]
    XfsReadSubmit {
        /// Device name.
        device: String,
        /// First byte.
        offset_bytes: u64,
        /// Bytes.
        len_bytes: u64,
        /// Why.
        #[source]
        source: SyncError,
    },
    /// A metadata read completed with an error.
    #[error("xfs rmap on {device}: reading {len_bytes} bytes at byte {offset_bytes} failed")]
    XfsRead {
        /// Device name.
        device: String,
        /// First byte.
        offset_bytes: u64,
        /// Bytes.
        len_bytes: u64,
        /// The device's error.
        #[source]
        source: IoError,
    },
    /// Every metadata buffer was lost to timed-out reads; the reader cannot read any more.
    #[error("xfs rmap on {device}: no metadata buffer left (earlier reads timed out): reopen the reader")]
    XfsNoBuffer {
        /// Device name.
        device: String,
    },
    /// A range asked for is empty or overflows.
    #[error("xfs rmap on {device}: byte range {offset_bytes}+{len_bytes} is not a valid query: {reason}")]
    XfsQueryRange {
        /// Device name.
        device: String,
        /// First byte asked for.
        offset_bytes: u64,
        /// Length asked for.
        len_bytes: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The device is smaller than the filesystem (or than a structure read from it).
    #[error("xfs rmap on {device}: device has {device_bytes} bytes but the filesystem needs {needed_bytes}: truncated image?")]
    XfsTruncated {
        /// Device name.
        device: String,
        /// Device size.
        device_bytes: u64,
        /// Bytes the superblock (or a pointer) says exist.
        needed_bytes: u64,
    },
    /// A structure's magic number is wrong.
    #[error("xfs {what} at byte {offset_bytes}: magic {found:#010x}, expected {expected:#010x}: not XFS, or corrupt")]
    XfsBadMagic {
        /// Which structure.
        what: XfsStructure,
        /// Its byte offset on the device.
        offset_bytes: u64,
        /// Magic found.
        found: u32,
        /// Magic expected.
        expected: u32,
    },
    /// A structure's CRC32C does not match its contents.
    #[error("xfs {what} at byte {offset_bytes}: CRC {stored:#010x} stored, {computed:#010x} computed: corrupt metadata")]
    XfsBadCrc {
        /// Which structure.
        what: XfsStructure,
        /// Its byte offset on the device.
        offset_bytes: u64,
        /// CRC on disk.
        stored: u32,
        /// CRC of the contents.
        computed: u32,
    },
    /// A superblock field is invalid.
    #[error("xfs superblock: {field} = {value}: {reason}")]
    XfsSuperblock {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The filesystem lacks a feature the reader needs or has one it does not understand.
    #[error("xfs superblock: {reason}")]
    XfsFeature {
        /// What is missing or unknown, and what to do.
        reason: String,
    },
    /// An AGF field is invalid.
    #[error("xfs AG {agno}: AGF {field} = {value}: {reason}")]
    XfsAgf {
        /// Allocation group.
        agno: u32,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A reverse-map btree block's header disagrees with where it was found.
    #[error("xfs AG {agno} rmap block {agbno}: {field} = {value}: {reason}")]
    XfsBtreeBlock {
        /// Allocation group.
        agno: u32,
        /// Block within the AG.
        agbno: u32,
        /// The header field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A btree pointer leads outside the allocation group (or to a header block).
    #[error("xfs AG {agno} rmap block {agbno}: pointer {index} = {ptr} is outside the AG's {ag_blocks} blocks")]
    XfsBtreePointer {
        /// Allocation group.
        agno: u32,
        /// The node holding the pointer.
        agbno: u32,
        /// Pointer index in the node.
        index: usize,
        /// The pointer's value.
        ptr: u32,
        /// Blocks in the AG.
        ag_blocks: u32,
    },
    /// A btree pointer leads back to a block on the path from the root: a loop.
    #[error("xfs AG {agno} rmap block {agbno}: pointer {index} leads back to ancestor block {ptr}: btree loop")]
    XfsBtreeLoop {
        /// Allocation group.
        agno: u32,
        /// The node holding the pointer.
        agbno: u32,
        /// Pointer index.
        index: usize,
        /// The ancestor it points to.
        ptr: u32,
    },
    /// A btree claims more levels than any valid one can have.
    #[error("xfs AG {agno}: rmap btree of {levels} levels, at most {max} are possible")]
    XfsBtreeTooDeep {
        /// Allocation group.
        agno: u32,
        /// Levels claimed.
        levels: u32,
        /// The limit.
        max: u32,
    },
    /// A walk visited more blocks than the btree can hold (blocks reached twice: a cross-linked tree).
    #[error("xfs AG {agno}: rmap btree walk passed {limit} blocks (the tree has {tree_blocks}): cross-linked btree")]
    XfsBtreeVisitLimit {
        /// Allocation group.
        agno: u32,
        /// Blocks visited when it stopped.
        limit: u64,
        /// Blocks the AGF says the tree has.
        tree_blocks: u32,
    },
    /// Keys or records are out of order, or a node's keys disagree with its child.
    #[error("xfs AG {agno} rmap block {agbno}: entry {index}: {reason}")]
    XfsBtreeKeys {
        /// Allocation group.
        agno: u32,
        /// Block.
        agbno: u32,
        /// Entry index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A reverse-map record is invalid.
    #[error("xfs AG {agno} rmap block {agbno}: record {index}: {reason}")]
    XfsRecord {
        /// Allocation group.
        agno: u32,
        /// Leaf block.
        agbno: u32,
        /// Record index.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// A volume map was given a bad range.
    #[error("volume map of {device}: volume {volume}: {reason}")]
    Volume {
        /// The device.
        device: String,
        /// The volume.
        volume: String,
        /// What is wrong.
        reason: String,
    },
    /// The cache's reverse map could not ask a cache about an arena page.
    #[error("cache reverse map: {step} of arena page {arena_offset:#x} in {cache} failed")]
    CacheQuery {
        /// The cache bdev.
        cache: String,
        /// The arena page.
        arena_offset: u64,
        /// What was asked.
        step: &'static str,
        /// The cache's error.
        #[source]
        source: nvstack_cache::CacheError,
    },
    /// Reading /proc/self/pagemap (physical address translation) failed.
    #[error("translating physical address {phys:#x}: reading /proc/self/pagemap failed")]
    Pagemap {
        /// The physical address.
        phys: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Writing or reading the poison journal's log file failed.
    #[error("poison journal {path}: {step} failed")]
    Journal {
        /// The log file.
        path: String,
        /// What was being done.
        step: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A journal line could not be parsed.
    #[error("poison journal {path}: line {line} is not a journal record")]
    JournalParse {
        /// The log file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// Setting up a poison source (tracefs events, the SIGBUS handler) failed.
    #[error("poison listener: {step} failed")]
    Listener {
        /// What was being set up.
        step: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The listener thread could not start.
    #[error("poison listener: starting its thread failed")]
    ListenerThread {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}
