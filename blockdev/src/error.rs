//! The blockdev crate's one error type (for set-up and control paths; the I/O path uses [`crate::IoError`]).

use std::io;

/// Failures while creating, opening or configuring block devices and reactors.
#[derive(Debug, thiserror::Error)]
pub enum BdevError {
    /// A device specification (`null:1G`, `file:PATH`...) could not be parsed.
    #[error("bdev spec {spec:?}: {reason}")]
    Spec {
        /// The text given.
        spec: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A size that is zero or not a multiple of the block size.
    #[error("bdev {name}: size {size_bytes} bytes is not a non-zero multiple of the block size {block_size}")]
    Size {
        /// Device name.
        name: String,
        /// Bytes given.
        size_bytes: u64,
        /// Block size.
        block_size: u32,
    },
    /// A block size that is not a power of two in 512..=65536, or one the backing store cannot do.
    #[error("bdev {name}: block size {block_size}: {reason}")]
    BlockSize {
        /// Device name.
        name: String,
        /// Block size asked for.
        block_size: u32,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// A backing file's size does not fit what was asked (too small to shrink safely, missing with no size given).
    #[error("bdev {name}: {path}: {reason}")]
    FileSize {
        /// Device name.
        name: String,
        /// The path.
        path: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Extending, inspecting or probing a backing file failed.
    #[error("bdev {name}: {step} on {path} failed")]
    FileIo {
        /// Device name.
        name: String,
        /// The path.
        path: String,
        /// The step that failed (`ftruncate`, `fstat`, `statx`...).
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Opening or sizing a backing file failed.
    #[error("bdev {name}: opening {path} failed")]
    FileOpen {
        /// Device name.
        name: String,
        /// The path.
        path: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Setting up an io_uring instance failed.
    #[error("bdev {name}: io_uring set-up with {entries} entries failed")]
    UringSetup {
        /// Device name.
        name: String,
        /// Ring entries asked for.
        entries: u32,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Memory for the device could not be had.
    #[error("bdev {name}: reserving memory failed")]
    Memory {
        /// Device name.
        name: String,
        /// The driver's error.
        #[source]
        source: nvstack_driver::DriverError,
    },
    /// Attaching an NVMe controller or opening one of its namespaces failed.
    #[error("bdev {name}: NVMe")]
    Nvme {
        /// Device name.
        name: String,
        /// The driver's error.
        #[source]
        source: nvstack_driver::DriverError,
    },
    /// Mapping a pmem device or file failed.
    #[error("bdev {name}: opening persistent memory failed")]
    Pmem {
        /// Device name.
        name: String,
        /// The driver's error.
        #[source]
        source: nvstack_driver::DriverError,
    },
    /// Mapping or populating a RAM-backed device's memory failed.
    #[error("bdev {name}: reserving {size_bytes} bytes of RAM failed")]
    RamMap {
        /// Device name.
        name: String,
        /// Bytes asked for.
        size_bytes: u64,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Opening a per-reactor channel failed.
    #[error("bdev {name}: opening an I/O channel failed: {reason}")]
    Channel {
        /// Device name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A core mask could not be parsed or names a core the machine lacks.
    #[error("core mask {mask:?}: {reason}")]
    CoreMask {
        /// The text given.
        mask: String,
        /// What is wrong.
        reason: String,
    },
    /// Starting a reactor thread failed.
    #[error("reactor {index} on core {core}: start failed")]
    ReactorStart {
        /// Reactor index.
        index: usize,
        /// OS core id.
        core: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Pinning a reactor thread failed.
    #[error("reactor on core {core}: pinning failed: {reason}")]
    ReactorPin {
        /// OS core id.
        core: usize,
        /// What hwloc said.
        reason: String,
    },
    /// A message could not be delivered because the target ring is full.
    #[error("reactor {index}: message ring full")]
    RingFull {
        /// Target reactor.
        index: usize,
    },
    /// A reactor thread panicked.
    #[error("reactor {index}: thread panicked")]
    ReactorPanicked {
        /// Reactor index.
        index: usize,
    },
}
