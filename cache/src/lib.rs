//! nvstack's extent cache: state trees (byte-range state bits) over hugepage-backed cache pages.
//!
//! # Modules
//! - [`tree`]: the state tree (after btrfs's extent-io tree): byte ranges to state bits and a tag (first dirtier,
//!   time); set/clear/convert, find, contiguous runs and writeback clusters, test, count, and exclusive range locks
//!   whose waiters are queued continuations (tokens), granted FIFO on unlock. Fixed pools, no allocation per op.
//! - [`pages`]: 4 KiB page slots carved from the DMA arena, a device-page index, CLOCK replacement.
//! - [`bdev`]: the cache as a stacked block device `cache:<backing>` ([`CacheBdev`], [`CacheChannel`]).
//! - [`stripe`]: the stripe layout (which reactor owns which bytes) and request splitting.
//! - [`striped`]: the cache across reactors (shards, pieces, rings, fan-out flush, shutdown write-back).
//! - [`reverse`]: the poison path's queries and actions, from any thread.
//!
//! # Design of the cache bdev
//! State lives per byte range in a [`StateTree`], not per page: UPTODATE (the page bytes hold the device's data or
//! newer), DIRTY (newer than the device; tagged with the first dirtier and when), LOCKED (an I/O or a direct request
//! owns the range), WRITEBACK, IOERR (a backing read failed; cleared by a later write of those bytes), POISONED.
//! Pages only hold bytes; a page may be partly valid (the tree says which bytes). Reads hit when every byte is
//! UPTODATE; a miss locks its range and reads each missing run in one backing I/O straight into the pages. Writes in
//! write-back mode copy into pages and set DIRTY; FUA writes and write-through mode also write the caller's buffer
//! to the backing device. Writeback starts from any dirty byte, walks back to the start of its dirty cluster and
//! writes the whole cluster (up to the backing max transfer / segment count) in one scatter-gather I/O from the
//! pages. Direct I/O locks its range, writes back (read) or drops (write) what the cache holds there, and moves the
//! caller's buffer with no copy. CLOCK evicts only pages with no DIRTY, LOCKED or WRITEBACK byte.
//!
//! ## Ownership across reactors
//! [`CacheBdev::new_striped`] cuts the device address space into stripes (1 MiB by default, stripe `k` owned by
//! reactor `k % reactors`) and builds one engine (a [`CacheChannel`]: tree, page index, pages, backing channel) per
//! reactor, on it, driven by a poller. Channels ([`StripedChannel`], any number, any reactor) split requests into
//! per-stripe pieces that travel to the owning shard on lock-free rings (or straight into the engine when it runs
//! on the channel's own thread) and gather the answers; FLUSH fans out to every shard; see [`striped`].
//! [`CacheBdev::new`] is the single-reactor form: its one channel is the engine itself.
//!
//! ## Reverse queries
//! [`reverse`]: which cache pages hold a device range, which device range an arena page caches, and the poison
//! action on a page (drop clean data, lose dirty data as IOERR, retire the slot), each run on the owning reactor
//! through a control message. Nothing there is on the I/O path.
//!
//! `nvstack perf --bdev cache:<backing>[,size=N][,mode=wb|wt]` runs on this cache (striped when `-m` names more
//! than one core) and prints the counters; the spec is parsed in the apps crate (`apps/src/bdev_spec.rs`).

pub mod bdev;
pub(crate) mod loans;
pub(crate) mod ring;
pub mod error;
pub mod pages;
pub mod reverse;
pub mod stripe;
pub mod striped;
pub mod tree;

pub use bdev::{CacheBdev, CacheChannel, CacheConfig, CacheStats, CachedPiece, PoisonedPage};
pub use striped::{CacheCounters, StripedChannel};
pub use error::CacheError;
pub use tree::{Bits, Extent, State, StateTree, Tag, Test, TreeConfig};
