//! The driver crate's one error type.

use std::io;

/// Every failure the driver layer reports. Each variant names the step that failed and carries what identifies it.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// An NVMe controller's register read returned all ones: the device is gone (surprise removal, PCIe error).
    #[error("NVMe {ctrlr}: the device is gone (registers read all ones) during {step}")]
    NvmeGone {
        /// Controller name (PCI address or simulator name).
        ctrlr: String,
        /// What was being done.
        step: &'static str,
    },
    /// The NVMe controller reports fatal status (CSTS.CFS).
    #[error("NVMe {ctrlr}: controller fatal status (CSTS.CFS) during {step}; the controller needs a reset")]
    NvmeFatal {
        /// Controller name.
        ctrlr: String,
        /// What was being done.
        step: &'static str,
    },
    /// An NVMe wait passed its deadline (CAP.TO for ready, the admin timeout for commands).
    #[error("NVMe {ctrlr}: {step} did not finish within {timeout_ms} ms")]
    NvmeTimeout {
        /// Controller name.
        ctrlr: String,
        /// What was waited for.
        step: &'static str,
        /// The deadline.
        timeout_ms: u64,
    },
    /// An NVMe admin command completed with an error status.
    #[error("NVMe {ctrlr}: {command} failed: {status}")]
    NvmeCommand {
        /// Controller name.
        ctrlr: String,
        /// The command.
        command: &'static str,
        /// The completion status.
        status: crate::nvme::NvmeStatus,
    },
    /// The NVMe controller or a namespace is outside what nvstack supports, or reported inconsistent data.
    #[error("NVMe {ctrlr}: {what}: {reason}")]
    NvmeUnsupported {
        /// Controller name.
        ctrlr: String,
        /// What was examined.
        what: String,
        /// Why it is refused.
        reason: String,
    },
    /// The NVMe controller has no more of a resource (I/O queue IDs).
    #[error("NVMe {ctrlr}: out of {what}; {hint}")]
    NvmeResources {
        /// Controller name.
        ctrlr: String,
        /// The resource.
        what: &'static str,
        /// What to do about it.
        hint: &'static str,
    },
    /// Reserving the arena's memory with `mmap` failed.
    #[error("arena: mapping {size_bytes} bytes of {kind} memory failed")]
    ArenaMap {
        /// Bytes asked for.
        size_bytes: u64,
        /// "2 MiB hugepage", "1 GiB hugepage" or "ordinary".
        kind: &'static str,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// Hugepages were required (a DMA backend) but none could be had.
    #[error(
        "arena: {size_bytes} bytes of hugepages are required for DMA but none are reserved; \
         run `nvstack setup` (or `echo N > /proc/sys/vm/nr_hugepages` as root) and try again"
    )]
    HugepagesRequired {
        /// Bytes asked for.
        size_bytes: u64,
    },
    /// An arena size that is zero, not page-aligned, or too large.
    #[error("arena: invalid size {size_bytes} bytes: {reason}")]
    ArenaSize {
        /// Bytes asked for.
        size_bytes: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Carving a region out of the arena failed: it is exhausted.
    #[error(
        "arena: out of memory carving {size_bytes} bytes for {purpose} ({free_bytes} bytes free); \
         raise the arena size (--arena-mb)"
    )]
    ArenaExhausted {
        /// What the region was for.
        purpose: &'static str,
        /// Bytes asked for.
        size_bytes: u64,
        /// Bytes left.
        free_bytes: u64,
    },
    /// Describing the arena as vm-memory regions failed.
    #[error("arena: building the vm-memory description failed: {detail}")]
    ArenaDescribe {
        /// What vm-memory said.
        detail: String,
    },
}
