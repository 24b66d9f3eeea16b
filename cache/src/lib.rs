//! nvstack's extent cache: state trees (byte-range state bits) over hugepage-backed cache pages.
//!
//! - [`tree`]: the state tree (btrfs extent-io-tree style): ranges to bits and tags, set/clear/convert, find,
//!   test, count, and exclusive range locks whose waiters are queued continuations.

pub mod error;
pub mod tree;

pub use error::CacheError;
pub use tree::{Bits, Extent, State, StateTree, Tag, Test, TreeConfig};
