//! The cache crate's one error type.

/// Failures of the state tree and the cache bdev.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// A configuration value is out of bounds.
    #[error("cache configuration: {what} {reason}")]
    Config {
        /// Which setting.
        what: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// A byte range with its end before its start (or empty where a range is required).
    #[error("bad byte range {start}..{end}")]
    BadRange {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// The state tree's node pool cannot hold the result of an operation; nothing was changed.
    #[error("state tree full: {needed} more ranges needed, {free} free of {capacity} (raise max_ranges)")]
    TreeFull {
        /// Pool size.
        capacity: u32,
        /// Nodes the operation needed.
        needed: u32,
        /// Nodes free.
        free: u32,
    },
    /// Reserving the memory of a state tree's block pool failed.
    #[error("state tree for {max_ranges} ranges: reserving {bytes} bytes of blocks failed (lower max_ranges or free memory)")]
    TreeMemory {
        /// Ranges the tree was sized for.
        max_ranges: u32,
        /// Bytes asked for.
        bytes: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The lock waiter pool is full.
    #[error("state tree lock waiters full ({capacity}); retry after some unlocks")]
    WaitersFull {
        /// Pool size.
        capacity: u32,
    },
    /// Unlock of a range that is not (entirely) locked.
    #[error("unlock of {start}..{end}, which is not entirely locked")]
    NotLocked {
        /// First byte.
        start: u64,
        /// One past the last byte.
        end: u64,
    },
    /// Carving cache pages from the DMA arena failed.
    #[error("reserving {bytes} bytes of cache pages in the DMA arena failed (raise the arena size)")]
    Arena {
        /// Bytes asked for.
        bytes: u64,
        /// The driver's error (boxed: it is large and this is a set-up path).
        #[source]
        source: Box<nvstack_driver::DriverError>,
    },
    /// A control-path call (the poison path's queries and actions) to a shard failed.
    #[error("cache shard {shard}: {reason}")]
    Control {
        /// The shard (reactor index; u32::MAX when not one shard).
        shard: u32,
        /// What went wrong.
        reason: &'static str,
    },
    /// Opening the backing device's channel failed.
    #[error("cache over {backing}: opening the backing channel failed")]
    BackingChannel {
        /// Backing device name.
        backing: String,
        /// The blockdev error (boxed: it is large and this is a set-up path).
        #[source]
        source: Box<nvstack_blockdev::BdevError>,
    },
}
