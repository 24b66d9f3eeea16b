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
    /// Installing a signal handler or sending a signal failed.
    #[error("signal: {step} failed")]
    Signal {
        /// The call that failed.
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Opening or sizing a pmem device or file failed.
    #[error("pmem {path}: {step} failed")]
    PmemOpen {
        /// The device or file.
        path: String,
        /// What was being done (open, stat, read size).
        step: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A pmem device or file that cannot be used as given.
    #[error("pmem {path}: {reason}")]
    PmemInvalid {
        /// The device or file.
        path: String,
        /// What is wrong and what to do.
        reason: String,
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
    // ---- VFIO (driver/src/vfio) ----
    /// A PCI address that does not parse.
    #[error("`{input}` is not a PCI address ({reason}); write it as DOMAIN:BUS:DEVICE.FUNCTION, e.g. 0000:00:04.0")]
    PciAddress {
        /// What was given.
        input: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Reading or writing a sysfs (or procfs) attribute failed.
    #[error("sysfs: {op} {path} failed")]
    Sysfs {
        /// "reading", "writing" or "listing".
        op: &'static str,
        /// The attribute.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// No PCI function at this address.
    #[error("VFIO: no PCI function {bdf} (no {path}); list NVMe functions with `nvstack setup status`")]
    VfioNoSuchDevice {
        /// The PCI address.
        bdf: String,
        /// The sysfs directory that is missing.
        path: std::path::PathBuf,
    },
    /// The function is bound to no driver.
    #[error("VFIO: {bdf} is not bound to any driver: run `nvstack setup` (PCI_ALLOWED={bdf}) to bind it to vfio-pci")]
    VfioNotBound {
        /// The PCI address.
        bdf: String,
    },
    /// The function is bound to another driver than vfio-pci.
    #[error(
        "VFIO: {bdf} is bound to {driver}, not vfio-pci: run `nvstack setup` (PCI_ALLOWED={bdf}) to bind it to \
         vfio-pci (unmount its file systems first)"
    )]
    VfioWrongDriver {
        /// The PCI address.
        bdf: String,
        /// The driver it is bound to.
        driver: String,
    },
    /// The function has no IOMMU group: the IOMMU is off.
    #[error(
        "VFIO: {bdf} has no IOMMU group: the IOMMU is off; enable VT-d/AMD-Vi in the firmware and boot with \
         intel_iommu=on (or amd_iommu=on) iommu=pt"
    )]
    VfioNoIommu {
        /// The PCI address.
        bdf: String,
    },
    /// Another device of the IOMMU group is bound to a host driver.
    #[error(
        "VFIO: IOMMU group {group} of {bdf} is not viable: {others}; bind every function of the group to vfio-pci \
         (`nvstack setup`) or unbind them"
    )]
    VfioGroupNotViable {
        /// The PCI address.
        bdf: String,
        /// The IOMMU group number.
        group: u32,
        /// The other devices and their drivers ("0000:00:04.1 (bound to e1000e)").
        others: String,
    },
    /// Opening a VFIO file was refused.
    #[error(
        "VFIO: no permission to open {path} for {bdf}: run as root, or give your user the group file \
         (chown USER {path}) and raise the locked-memory limit (ulimit -l)"
    )]
    VfioPermission {
        /// The PCI address (or "container").
        bdf: String,
        /// The file.
        path: std::path::PathBuf,
        /// The open error.
        #[source]
        source: io::Error,
    },
    /// The group file is held by another process.
    #[error("VFIO: {path} is busy: another process (an nvstack or SPDK application, or QEMU) has {bdf} open; stop it first")]
    VfioBusy {
        /// The PCI address.
        bdf: String,
        /// The group file.
        path: std::path::PathBuf,
        /// The open error (EBUSY).
        #[source]
        source: io::Error,
    },
    /// `/dev/vfio/vfio` or the group file is missing: the vfio modules are not loaded.
    #[error("VFIO: {path} does not exist: load the vfio-pci module (`modprobe vfio-pci`) and bind with `nvstack setup`")]
    VfioModule {
        /// The missing file.
        path: std::path::PathBuf,
        /// The open error.
        #[source]
        source: io::Error,
    },
    /// A VFIO step (container, group, device, region info) failed.
    #[error("VFIO: {step} for {bdf} failed")]
    VfioOpen {
        /// The PCI address (or "container").
        bdf: String,
        /// The step.
        step: &'static str,
        /// What vfio-ioctls said.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// BAR0 cannot be used (missing, not mappable, too small).
    #[error("VFIO: BAR{index} of {bdf} cannot be used: {reason}")]
    VfioBar {
        /// The PCI address.
        bdf: String,
        /// The BAR number.
        index: u32,
        /// What is wrong.
        reason: String,
    },
    /// Mapping BAR0 into the process failed.
    #[error("VFIO: mapping BAR{index} of {bdf} ({size_bytes} bytes) failed")]
    VfioMmap {
        /// The PCI address.
        bdf: String,
        /// The BAR number.
        index: u32,
        /// Bytes asked for.
        size_bytes: u64,
        /// The mmap error.
        #[source]
        source: io::Error,
    },
    /// A config-space access through the VFIO config region failed.
    #[error("VFIO: config space {op} of {bdf} at offset {offset:#x} failed")]
    VfioConfig {
        /// The PCI address.
        bdf: String,
        /// "read" or "write".
        op: &'static str,
        /// The config-space offset.
        offset: u64,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The function-level reset failed.
    #[error("VFIO: function reset of {bdf} failed (does the device support FLR or another reset method?)")]
    VfioReset {
        /// The PCI address.
        bdf: String,
        /// The ioctl error.
        #[source]
        source: io::Error,
    },
    /// Mapping or unmapping the arena in the IOMMU failed.
    #[error("VFIO: DMA {op} of IOVA {iova:#x} ({size_bytes} bytes) failed")]
    VfioDma {
        /// "map" or "unmap".
        op: &'static str,
        /// The IOVA.
        iova: u64,
        /// Bytes.
        size_bytes: u64,
        /// What vfio-ioctls said.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// The arena is not backed by hugepages, which VFIO DMA needs.
    #[error(
        "VFIO: the DMA arena is {backing} memory; VFIO needs hugepages: reserve them with `nvstack setup` \
         (HUGEMEM=2048) and start with a hugepage arena"
    )]
    VfioArenaNotHuge {
        /// What backs the arena.
        backing: &'static str,
    },
}
