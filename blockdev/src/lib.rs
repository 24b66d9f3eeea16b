//! nvstack's block-device layer.
//!
//! - [`bdev`]: the [`BlockDev`] / [`IoChannel`] contract: geometry, features, I/O descriptors and their
//!   validation. Every backend and every stacked device (the cache) speaks it.
//! - [`reactor`]: one pinned polling thread per core, pollers run to completion, cross-core messages on bounded
//!   rings.
//! - [`coremask`]: SPDK-style core masks (`0x3`, `0,1`, `0-3`).
//! - One module per backend: `null`, `malloc`, `file`; [`spec::open_bdev`] opens one from text (`malloc:64M`).
//! - [`contract`]: the checks every backend must pass, reusable by any crate's tests.

pub mod bdev;
pub mod client;
pub mod coremask;
pub mod error;
pub mod reactor;
pub mod null;
pub mod nvme;
pub mod malloc;
pub mod file;
pub mod pmem;
pub mod spec;
pub mod contract;

pub use bdev::{BlockDev, Features, Geometry, IoChannel, IoDesc, IoError, IoFlags, IoOp, IoStatus, Seg, SubmitError};
pub use error::BdevError;
