//! nvstack's hardware layer.
//!
//! - [`anon`]: anonymous memory reserved at start, outside the arena (transparent hugepages where the kernel gives
//!   them): RAM disks, the state trees' block pools.
//! - [`dma`]: the DMA arena (hugepages reserved once at start, described as vm-memory regions whose guest address
//!   is the IOVA) and the buffer pools carved from it.
//! - `vfio`, `nvme`, `pmem`: device access (added by their own modules).
//!
//! This crate knows hardware and memory and nothing above it.

pub mod anon;
pub mod dma;
pub mod error;
pub mod nvme;
pub mod pmem;
pub mod vfio;

pub use error::DriverError;
