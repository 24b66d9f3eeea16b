//! nvstack's extent cache: state trees (byte-range state bits) over hugepage-backed cache pages.
//!
//! # Modules
//! - [`tree`]: the state tree (after btrfs's extent-io tree): byte ranges to state bits and a tag (first dirtier,
//!   time); set/clear/convert, find, contiguous runs and writeback clusters, test, count, and exclusive range locks
//!   whose waiters are queued continuations (tokens), granted FIFO on unlock. Fixed pools, no allocation per op.
//! - [`pages`]: 4 KiB page slots carved from the DMA arena, a device-page index, CLOCK replacement.
//! - [`bdev`]: the cache as a stacked block device `cache:<backing>` ([`CacheBdev`], [`CacheChannel`]).
//! - [`stripe`]: the stripe layout (which reactor owns which bytes) and request splitting, for the multi-reactor
//!   layer still to be built.
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
//! ## Ownership across reactors (designed, not built yet)
//! The device address space is cut into stripes (e.g. 1 MiB, `stripe = (offset / stripe_bytes) % reactors`); each
//! reactor's [`CacheChannel`] would own the tree, page index and pages of its stripes only. A request arriving on
//! reactor A for a stripe of reactor B is split at stripe boundaries; each foreign piece travels to B as a
//! `Msg::Call { f, a: piece slot, b }` on B's ring (the piece slot lives in a preallocated per-pair table and carries
//! the caller's segments offset into the piece); B runs it through the same state machine as a local request and
//! answers with a `Msg::Call` back to A, which completes the parent descriptor when all its pieces are done. A full
//! ring is back-pressure: the piece waits in A's retry list. Flush fans out to every reactor and completes when all
//! have written back and one backing flush has run. Today `CacheBdev` refuses a second channel with a clear error.
//!
//! ## Status
//! Built and tested: the state tree; the single-reactor cache (hits, misses with one backing I/O per missing run,
//! write-back and write-through, FUA, flush, clustered writeback, periodic and pressure writeback, CLOCK eviction,
//! direct I/O, IOERR, reverse queries, counters), and the stripe arithmetic ([`stripe`]: owners, splitting a request
//! into per-owner pieces, slicing the caller's segments for a piece). Not built: the message layer above (pieces
//! travelling as `Msg::Call`, per-reactor channels, fan-out flush), so 2-reactor tests and figures are missing.
//!
//! `nvstack perf --bdev cache:<backing>[,size=N][,mode=wb|wt]` runs on this cache (one core, as the cache serves one
//! channel) and prints the counters; the spec is parsed in the apps crate (`apps/src/bdev_spec.rs`).

pub mod bdev;
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
