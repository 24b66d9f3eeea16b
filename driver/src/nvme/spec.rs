//! NVMe wire structures (NVM Express Base Specification 2.0): submission and completion entries, identify data,
//! log pages, DSM ranges and SGL descriptors. Layout only, no logic: every struct is `#[repr(C)]` with its size and
//! the offsets of the fields we read checked at compile time.
//!
//! All multi-byte fields are little-endian on the wire. nvstack builds only for little-endian hosts (checked below),
//! so the native integer types are the wire types.

use std::mem::{offset_of, size_of};

#[cfg(not(target_endian = "little"))]
compile_error!("nvstack's NVMe wire structs assume a little-endian host");

/// Admin command opcodes (Base spec 5, figure 139).
pub mod admin_opc {
    /// Delete I/O submission queue (5.7).
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O submission queue (5.5).
    pub const CREATE_SQ: u8 = 0x01;
    /// Get log page (5.16).
    pub const GET_LOG_PAGE: u8 = 0x02;
    /// Delete I/O completion queue (5.6).
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O completion queue (5.4).
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify (5.17).
    pub const IDENTIFY: u8 = 0x06;
    /// Abort (5.1).
    pub const ABORT: u8 = 0x08;
    /// Set features (5.27).
    pub const SET_FEATURES: u8 = 0x09;
    /// Get features (5.15).
    pub const GET_FEATURES: u8 = 0x0a;
    /// Asynchronous event request (5.2).
    pub const ASYNC_EVENT: u8 = 0x0c;
}

/// NVM command set I/O opcodes (NVM Command Set spec 3, figure 17).
pub mod io_opc {
    /// Flush (Base 7.1).
    pub const FLUSH: u8 = 0x00;
    /// Write (NVM 3.3.6).
    pub const WRITE: u8 = 0x01;
    /// Read (NVM 3.3.4).
    pub const READ: u8 = 0x02;
    /// Write zeroes (NVM 3.3.7).
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset management (NVM 3.3.3).
    pub const DSM: u8 = 0x09;
}

/// Identify CNS values (Base 5.17, figure 273).
pub mod cns {
    /// Identify namespace for the NSID.
    pub const NAMESPACE: u8 = 0x00;
    /// Identify controller.
    pub const CONTROLLER: u8 = 0x01;
    /// Active namespace ID list.
    pub const ACTIVE_NS_LIST: u8 = 0x02;
}

/// Feature identifiers (Base 5.27.1, figure 317).
pub mod fid {
    /// Volatile write cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
    /// Asynchronous event configuration.
    pub const ASYNC_EVENT_CONFIG: u8 = 0x0b;
}

/// Log page identifiers (Base 5.16.1, figure 202).
pub mod lid {
    /// Error information (5.16.1.2).
    pub const ERROR_INFO: u8 = 0x01;
    /// SMART / health information (5.16.1.3).
    pub const SMART_HEALTH: u8 = 0x02;
    /// Firmware slot information.
    pub const FIRMWARE_SLOT: u8 = 0x03;
}

/// Submission queue entry (Base 4.2, figure 88): 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SubmissionEntry {
    /// Opcode (bits 7:0 of CDW0).
    pub opc: u8,
    /// FUSE (1:0) and PSDT (7:6) (bits 15:8 of CDW0).
    pub flags: u8,
    /// Command identifier (bits 31:16 of CDW0).
    pub cid: u16,
    /// Namespace identifier.
    pub nsid: u32,
    /// Command dword 2.
    pub cdw2: u32,
    /// Command dword 3.
    pub cdw3: u32,
    /// Metadata pointer.
    pub mptr: u64,
    /// Data pointer: PRP1 or the first half of SGL1.
    pub dptr1: u64,
    /// Data pointer: PRP2 or the second half of SGL1.
    pub dptr2: u64,
    /// Command dword 10.
    pub cdw10: u32,
    /// Command dword 11.
    pub cdw11: u32,
    /// Command dword 12.
    pub cdw12: u32,
    /// Command dword 13.
    pub cdw13: u32,
    /// Command dword 14.
    pub cdw14: u32,
    /// Command dword 15.
    pub cdw15: u32,
}
const _: () = assert!(size_of::<SubmissionEntry>() == 64);
const _: () = assert!(offset_of!(SubmissionEntry, nsid) == 4);
const _: () = assert!(offset_of!(SubmissionEntry, mptr) == 16);
const _: () = assert!(offset_of!(SubmissionEntry, dptr1) == 24);
const _: () = assert!(offset_of!(SubmissionEntry, cdw10) == 40);
const _: () = assert!(offset_of!(SubmissionEntry, cdw15) == 60);

/// PSDT field of CDW0 flags (Base 4.2, figure 88): SGL used for the data transfer, metadata pointer contiguous.
pub const PSDT_SGL_MPTR_CONTIG: u8 = 0b01 << 6;

/// Completion queue entry (Base 4.6, figure 92): 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Command-specific dword 0.
    pub dw0: u32,
    /// Command-specific dword 1.
    pub dw1: u32,
    /// SQ head pointer at the time of posting.
    pub sq_head: u16,
    /// SQ identifier.
    pub sq_id: u16,
    /// Command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status field (bits 15:1), decoded by `status.rs`.
    pub status: u16,
}
const _: () = assert!(size_of::<CompletionEntry>() == 16);
const _: () = assert!(offset_of!(CompletionEntry, sq_head) == 8);
const _: () = assert!(offset_of!(CompletionEntry, cid) == 12);
const _: () = assert!(offset_of!(CompletionEntry, status) == 14);

/// Identify controller data structure (Base 5.17.2.1, figure 275): the fields nvstack reads, the rest reserved.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IdentifyController {
    /// PCI vendor ID.
    pub vid: u16,
    /// PCI subsystem vendor ID.
    pub ssvid: u16,
    /// Serial number (ASCII, space padded).
    pub sn: [u8; 20],
    /// Model number (ASCII, space padded).
    pub mn: [u8; 40],
    /// Firmware revision (ASCII, space padded).
    pub fr: [u8; 8],
    /// Recommended arbitration burst.
    pub rab: u8,
    /// IEEE OUI.
    pub ieee: [u8; 3],
    /// Multi-path I/O and namespace sharing capabilities.
    pub cmic: u8,
    /// Maximum data transfer size: 2^MDTS units of CAP.MPSMIN; 0 means no limit.
    pub mdts: u8,
    /// Controller ID.
    pub cntlid: u16,
    /// Version.
    pub ver: u32,
    /// RTD3 resume latency.
    pub rtd3r: u32,
    /// RTD3 entry latency.
    pub rtd3e: u32,
    /// Optional asynchronous events supported.
    pub oaes: u32,
    /// Controller attributes.
    pub ctratt: u32,
    _rsvd100: [u8; 156],
    /// Optional admin command support.
    pub oacs: u16,
    /// Abort command limit (0-based).
    pub acl: u8,
    /// Asynchronous event request limit (0-based).
    pub aerl: u8,
    /// Firmware updates.
    pub frmw: u8,
    /// Log page attributes.
    pub lpa: u8,
    /// Error log page entries (0-based).
    pub elpe: u8,
    /// Number of power states support (0-based).
    pub npss: u8,
    _rsvd264: [u8; 248],
    /// Submission queue entry size: required (3:0) and maximum (7:4), log2 bytes.
    pub sqes: u8,
    /// Completion queue entry size: required (3:0) and maximum (7:4), log2 bytes.
    pub cqes: u8,
    /// Maximum outstanding commands.
    pub maxcmd: u16,
    /// Number of namespaces (highest valid NSID).
    pub nn: u32,
    /// Optional NVM command support (see [`oncs`]).
    pub oncs: u16,
    /// Fused operation support.
    pub fuses: u16,
    /// Format NVM attributes.
    pub fna: u8,
    /// Volatile write cache (bit 0: present).
    pub vwc: u8,
    /// Atomic write unit normal.
    pub awun: u16,
    /// Atomic write unit power fail.
    pub awupf: u16,
    /// I/O command set vendor specific command configuration.
    pub icsvscc: u8,
    /// Namespace write protection capabilities.
    pub nwpc: u8,
    /// Atomic compare and write unit.
    pub acwu: u16,
    _rsvd534: u16,
    /// SGL support (see [`sgls`]).
    pub sgls: u32,
    /// Maximum number of allowed namespaces.
    pub mnan: u32,
    _rsvd544: [u8; 224],
    /// NVM subsystem NVMe qualified name (UTF-8, NUL padded).
    pub subnqn: [u8; 256],
    _rsvd1024: [u8; 3072],
}
const _: () = assert!(size_of::<IdentifyController>() == 4096);
const _: () = assert!(offset_of!(IdentifyController, sn) == 4);
const _: () = assert!(offset_of!(IdentifyController, mn) == 24);
const _: () = assert!(offset_of!(IdentifyController, fr) == 64);
const _: () = assert!(offset_of!(IdentifyController, mdts) == 77);
const _: () = assert!(offset_of!(IdentifyController, ver) == 80);
const _: () = assert!(offset_of!(IdentifyController, oacs) == 256);
const _: () = assert!(offset_of!(IdentifyController, aerl) == 259);
const _: () = assert!(offset_of!(IdentifyController, sqes) == 512);
const _: () = assert!(offset_of!(IdentifyController, nn) == 516);
const _: () = assert!(offset_of!(IdentifyController, oncs) == 520);
const _: () = assert!(offset_of!(IdentifyController, vwc) == 525);
const _: () = assert!(offset_of!(IdentifyController, sgls) == 536);
const _: () = assert!(offset_of!(IdentifyController, subnqn) == 768);

/// ONCS bits of [`IdentifyController::oncs`] (Base 5.17.2.1, figure 275, bytes 521:520).
pub mod oncs {
    /// Compare command.
    pub const COMPARE: u16 = 1 << 0;
    /// Write uncorrectable command.
    pub const WRITE_UNCORRECTABLE: u16 = 1 << 1;
    /// Dataset management command.
    pub const DSM: u16 = 1 << 2;
    /// Write zeroes command.
    pub const WRITE_ZEROES: u16 = 1 << 3;
}

/// SGLS field of [`IdentifyController::sgls`] (Base 5.17.2.1, figure 275, bytes 539:536).
pub mod sgls {
    /// Bits 1:0: SGL support. 0 none, 1 supported with no alignment rule, 2 supported with dword alignment.
    pub const SUPPORT_MASK: u32 = 0b11;
}

/// One LBA format (NVM Command Set 4.1.5.1, figure 98).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LbaFormat {
    /// Metadata bytes per LBA.
    pub ms: u16,
    /// LBA data size, log2 bytes.
    pub lbads: u8,
    /// Relative performance (bits 1:0).
    pub rp: u8,
}
const _: () = assert!(size_of::<LbaFormat>() == 4);

/// Identify namespace data structure, NVM command set (NVM Command Set 4.1.5.1, figure 97).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct IdentifyNamespace {
    /// Namespace size in LBAs.
    pub nsze: u64,
    /// Namespace capacity in LBAs.
    pub ncap: u64,
    /// Namespace utilization in LBAs.
    pub nuse: u64,
    /// Namespace features.
    pub nsfeat: u8,
    /// Number of LBA formats (0-based).
    pub nlbaf: u8,
    /// Formatted LBA size: format index (3:0, with 6:5 as the high bits), metadata at end of LBA (4).
    pub flbas: u8,
    /// Metadata capabilities.
    pub mc: u8,
    /// End-to-end data protection capabilities.
    pub dpc: u8,
    /// End-to-end data protection type settings.
    pub dps: u8,
    /// Namespace multi-path I/O and sharing capabilities.
    pub nmic: u8,
    /// Reservation capabilities.
    pub rescap: u8,
    /// Format progress indicator.
    pub fpi: u8,
    /// Deallocate logical block features.
    pub dlfeat: u8,
    /// Namespace atomic write unit normal.
    pub nawun: u16,
    /// Namespace atomic write unit power fail.
    pub nawupf: u16,
    /// Namespace atomic compare and write unit.
    pub nacwu: u16,
    /// Namespace atomic boundary size normal.
    pub nabsn: u16,
    /// Namespace atomic boundary offset.
    pub nabo: u16,
    /// Namespace atomic boundary size power fail.
    pub nabspf: u16,
    /// Namespace optimal I/O boundary in LBAs.
    pub noiob: u16,
    /// NVM capacity in bytes (128-bit).
    pub nvmcap: [u8; 16],
    _rsvd64: [u8; 64],
    /// LBA formats 0..=63.
    pub lbaf: [LbaFormat; 64],
    _rsvd384: [u8; 3712],
}
const _: () = assert!(size_of::<IdentifyNamespace>() == 4096);
const _: () = assert!(offset_of!(IdentifyNamespace, nlbaf) == 25);
const _: () = assert!(offset_of!(IdentifyNamespace, flbas) == 26);
const _: () = assert!(offset_of!(IdentifyNamespace, noiob) == 46);
const _: () = assert!(offset_of!(IdentifyNamespace, nvmcap) == 48);
const _: () = assert!(offset_of!(IdentifyNamespace, lbaf) == 128);

/// Error information log entry (Base 5.16.1.2, figure 205): 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ErrorLogEntry {
    /// Error count (0: entry not valid).
    pub error_count: u64,
    /// Submission queue ID.
    pub sqid: u16,
    /// Command ID.
    pub cid: u16,
    /// Status field (bit 0 phase tag, as in a CQE).
    pub status: u16,
    /// Parameter error location.
    pub param_error_location: u16,
    /// First LBA that saw the error.
    pub lba: u64,
    /// Namespace.
    pub nsid: u32,
    /// Vendor-specific information available.
    pub vs: u8,
    /// Transport type.
    pub trtype: u8,
    _rsvd30: [u8; 2],
    /// Command-specific information.
    pub csi: u64,
    /// Transport type specific information.
    pub trtype_spec: u16,
    _rsvd42: [u8; 22],
}
const _: () = assert!(size_of::<ErrorLogEntry>() == 64);
const _: () = assert!(offset_of!(ErrorLogEntry, lba) == 16);
const _: () = assert!(offset_of!(ErrorLogEntry, nsid) == 24);
const _: () = assert!(offset_of!(ErrorLogEntry, csi) == 32);

/// SMART / health information log (Base 5.16.1.3, figure 207): 512 bytes. 128-bit counters are byte arrays.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SmartLog {
    /// Critical warning bits.
    pub critical_warning: u8,
    /// Composite temperature in kelvins (little-endian u16 at an odd offset).
    pub temperature: [u8; 2],
    /// Available spare, percent.
    pub avail_spare: u8,
    /// Available spare threshold, percent.
    pub spare_thresh: u8,
    /// Percentage used.
    pub percent_used: u8,
    /// Endurance group critical warning summary.
    pub endurance_group_warning: u8,
    _rsvd7: [u8; 25],
    /// Data units read (thousands of 512-byte units).
    pub data_units_read: [u8; 16],
    /// Data units written.
    pub data_units_written: [u8; 16],
    /// Host read commands.
    pub host_reads: [u8; 16],
    /// Host write commands.
    pub host_writes: [u8; 16],
    /// Controller busy time, minutes.
    pub ctrl_busy_time: [u8; 16],
    /// Power cycles.
    pub power_cycles: [u8; 16],
    /// Power-on hours.
    pub power_on_hours: [u8; 16],
    /// Unsafe shutdowns.
    pub unsafe_shutdowns: [u8; 16],
    /// Media and data integrity errors.
    pub media_errors: [u8; 16],
    /// Number of error information log entries.
    pub num_err_log_entries: [u8; 16],
    _rsvd192: [u8; 320],
}
const _: () = assert!(size_of::<SmartLog>() == 512);
const _: () = assert!(offset_of!(SmartLog, data_units_read) == 32);
const _: () = assert!(offset_of!(SmartLog, media_errors) == 160);
const _: () = assert!(offset_of!(SmartLog, num_err_log_entries) == 176);

/// Dataset management range (NVM Command Set 3.3.3, figure 38): 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DsmRange {
    /// Context attributes.
    pub cattr: u32,
    /// Length in logical blocks (1-based).
    pub nlb: u32,
    /// Starting LBA.
    pub slba: u64,
}
const _: () = assert!(size_of::<DsmRange>() == 16);
const _: () = assert!(offset_of!(DsmRange, slba) == 8);

/// SGL descriptor (Base 4.1.8, figure 117): 16 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SglDescriptor {
    /// Address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    _rsvd: [u8; 3],
    /// SGL identifier: descriptor type (7:4) and subtype (3:0).
    pub sgl_id: u8,
}
const _: () = assert!(size_of::<SglDescriptor>() == 16);
const _: () = assert!(offset_of!(SglDescriptor, sgl_id) == 15);

/// SGL descriptor types (Base 4.1.8.1, figure 118), already shifted into bits 7:4 of the identifier.
pub mod sgl_type {
    /// SGL data block descriptor, address subtype.
    pub const DATA_BLOCK: u8 = 0x0 << 4;
    /// SGL last segment descriptor, address subtype.
    pub const LAST_SEGMENT: u8 = 0x3 << 4;
}

impl SglDescriptor {
    /// A descriptor of `kind` (a [`sgl_type`] value) at `addr` for `len` bytes.
    pub const fn new(addr: u64, len: u32, kind: u8) -> Self {
        SglDescriptor { addr, len, _rsvd: [0; 3], sgl_id: kind }
    }
    /// The two data-pointer dwords-pairs of a command carrying this descriptor as SGL1.
    pub fn to_dptr(self) -> (u64, u64) {
        let hi = u64::from(self.len) | (u64::from(self.sgl_id) << 56);
        (self.addr, hi)
    }
}

/// Plain-old-data wire structs: every byte pattern is a valid value, so they may be copied out of DMA memory.
///
/// # Safety
/// Implement only for `#[repr(C)]` structs made of integers and integer arrays, with no padding.
pub unsafe trait Pod: Copy {
    /// An all-zero value.
    fn zeroed() -> Self {
        // SAFETY: the trait's contract: all-zero bytes are a valid value.
        unsafe { std::mem::zeroed() }
    }
}
// SAFETY: each is repr(C), integers only, no padding (sizes asserted above equal the sum of the fields).
unsafe impl Pod for SubmissionEntry {}
// SAFETY: as above.
unsafe impl Pod for CompletionEntry {}
// SAFETY: as above.
unsafe impl Pod for IdentifyController {}
// SAFETY: as above.
unsafe impl Pod for IdentifyNamespace {}
// SAFETY: as above.
unsafe impl Pod for ErrorLogEntry {}
// SAFETY: as above.
unsafe impl Pod for SmartLog {}
// SAFETY: as above.
unsafe impl Pod for DsmRange {}
// SAFETY: as above.
unsafe impl Pod for SglDescriptor {}
// SAFETY: as above.
unsafe impl Pod for LbaFormat {}
// SAFETY: an integer: every bit pattern is valid.
unsafe impl Pod for u64 {}
