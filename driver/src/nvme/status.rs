//! Completion status decoding (Base spec 4.6.1, figures 93-100) into named statuses.

use std::fmt;

/// Status code types (4.6.1.1, figure 94).
pub mod sct {
    /// Generic command status.
    pub const GENERIC: u8 = 0x0;
    /// Command specific status.
    pub const COMMAND_SPECIFIC: u8 = 0x1;
    /// Media and data integrity errors.
    pub const MEDIA: u8 = 0x2;
    /// Path related status.
    pub const PATH: u8 = 0x3;
    /// Vendor specific.
    pub const VENDOR: u8 = 0x7;
}

/// Generic status codes (4.6.1.2.1, figure 95) and NVM command set generic codes (NVM spec figure 23).
pub mod generic {
    /// Successful completion.
    pub const SUCCESS: u8 = 0x00;
    /// Invalid command opcode.
    pub const INVALID_OPCODE: u8 = 0x01;
    /// Invalid field in command.
    pub const INVALID_FIELD: u8 = 0x02;
    /// Command ID conflict.
    pub const CID_CONFLICT: u8 = 0x03;
    /// Data transfer error.
    pub const DATA_TRANSFER_ERROR: u8 = 0x04;
    /// Commands aborted due to power loss notification.
    pub const ABORTED_POWER_LOSS: u8 = 0x05;
    /// Internal error.
    pub const INTERNAL_ERROR: u8 = 0x06;
    /// Command abort requested.
    pub const ABORT_REQUESTED: u8 = 0x07;
    /// Command aborted due to SQ deletion.
    pub const ABORTED_SQ_DELETION: u8 = 0x08;
    /// Invalid namespace or format.
    pub const INVALID_NAMESPACE: u8 = 0x0b;
    /// LBA out of range.
    pub const LBA_OUT_OF_RANGE: u8 = 0x80;
    /// Capacity exceeded.
    pub const CAPACITY_EXCEEDED: u8 = 0x81;
    /// Namespace not ready.
    pub const NAMESPACE_NOT_READY: u8 = 0x82;
}

/// Command specific status codes (4.6.1.2.2, figure 96).
pub mod command_specific {
    /// Completion queue invalid.
    pub const INVALID_CQ: u8 = 0x00;
    /// Invalid queue identifier.
    pub const INVALID_QID: u8 = 0x01;
    /// Invalid queue size.
    pub const INVALID_QUEUE_SIZE: u8 = 0x02;
    /// Abort command limit exceeded.
    pub const ABORT_LIMIT_EXCEEDED: u8 = 0x03;
    /// Asynchronous event request limit exceeded.
    pub const AER_LIMIT_EXCEEDED: u8 = 0x05;
    /// Invalid log page.
    pub const INVALID_LOG_PAGE: u8 = 0x09;
}

/// Media and data integrity errors (4.6.1.2.3, figure 97 and NVM spec figure 25).
pub mod media {
    /// Write fault.
    pub const WRITE_FAULT: u8 = 0x80;
    /// Unrecovered read error.
    pub const UNRECOVERED_READ_ERROR: u8 = 0x81;
    /// End-to-end guard check error.
    pub const GUARD_CHECK_ERROR: u8 = 0x82;
    /// End-to-end application tag check error.
    pub const APP_TAG_CHECK_ERROR: u8 = 0x83;
    /// End-to-end reference tag check error.
    pub const REF_TAG_CHECK_ERROR: u8 = 0x84;
    /// Compare failure.
    pub const COMPARE_FAILURE: u8 = 0x85;
    /// Access denied.
    pub const ACCESS_DENIED: u8 = 0x86;
    /// Deallocated or unwritten logical block.
    pub const DEALLOCATED_OR_UNWRITTEN: u8 = 0x87;
}

/// The status field of a completion, without the phase tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NvmeStatus {
    /// Status code type (bits 11:9 of the CQE status word).
    pub sct: u8,
    /// Status code (bits 8:1).
    pub sc: u8,
    /// More information in the error log (bit 14).
    pub more: bool,
    /// Do not retry (bit 15).
    pub dnr: bool,
}

impl NvmeStatus {
    /// Decode the CQE status word (phase tag in bit 0 ignored).
    #[inline]
    pub fn from_cqe_word(w: u16) -> NvmeStatus {
        NvmeStatus {
            sc: ((w >> 1) & 0xff) as u8,
            sct: ((w >> 9) & 0x7) as u8,
            more: (w >> 14) & 1 == 1,
            dnr: (w >> 15) & 1 == 1,
        }
    }
    /// Encode as a CQE status word with `phase` in bit 0 (for the simulator).
    pub fn to_cqe_word(self, phase: bool) -> u16 {
        u16::from(phase)
            | (u16::from(self.sc) << 1)
            | (u16::from(self.sct & 0x7) << 9)
            | (u16::from(self.more) << 14)
            | (u16::from(self.dnr) << 15)
    }
    /// A status of the given type and code.
    pub const fn new(sct: u8, sc: u8) -> NvmeStatus {
        NvmeStatus { sct, sc, more: false, dnr: false }
    }
    /// Success.
    pub const SUCCESS: NvmeStatus = NvmeStatus::new(sct::GENERIC, generic::SUCCESS);
    /// Whether this is success.
    #[inline]
    pub fn is_success(self) -> bool {
        self.sct == sct::GENERIC && self.sc == generic::SUCCESS
    }
    /// Whether this is a media and data integrity error (the LBA range is bad, not the command).
    pub fn is_media_error(self) -> bool {
        self.sct == sct::MEDIA
    }
    /// Whether the command was aborted at our request (Abort command) or by SQ deletion: it may be resubmitted.
    pub fn is_aborted(self) -> bool {
        self.sct == sct::GENERIC
            && matches!(self.sc, generic::ABORT_REQUESTED | generic::ABORTED_SQ_DELETION | generic::ABORTED_POWER_LOSS)
    }
    /// The status's name as the spec gives it.
    pub fn name(self) -> &'static str {
        match (self.sct, self.sc) {
            (sct::GENERIC, generic::SUCCESS) => "successful completion",
            (sct::GENERIC, generic::INVALID_OPCODE) => "invalid command opcode",
            (sct::GENERIC, generic::INVALID_FIELD) => "invalid field in command",
            (sct::GENERIC, generic::CID_CONFLICT) => "command ID conflict",
            (sct::GENERIC, generic::DATA_TRANSFER_ERROR) => "data transfer error",
            (sct::GENERIC, generic::ABORTED_POWER_LOSS) => "aborted due to power loss notification",
            (sct::GENERIC, generic::INTERNAL_ERROR) => "internal error",
            (sct::GENERIC, generic::ABORT_REQUESTED) => "command abort requested",
            (sct::GENERIC, generic::ABORTED_SQ_DELETION) => "aborted due to SQ deletion",
            (sct::GENERIC, generic::INVALID_NAMESPACE) => "invalid namespace or format",
            (sct::GENERIC, generic::LBA_OUT_OF_RANGE) => "LBA out of range",
            (sct::GENERIC, generic::CAPACITY_EXCEEDED) => "capacity exceeded",
            (sct::GENERIC, generic::NAMESPACE_NOT_READY) => "namespace not ready",
            (sct::COMMAND_SPECIFIC, command_specific::INVALID_CQ) => "completion queue invalid",
            (sct::COMMAND_SPECIFIC, command_specific::INVALID_QID) => "invalid queue identifier",
            (sct::COMMAND_SPECIFIC, command_specific::INVALID_QUEUE_SIZE) => "invalid queue size",
            (sct::COMMAND_SPECIFIC, command_specific::ABORT_LIMIT_EXCEEDED) => "abort command limit exceeded",
            (sct::COMMAND_SPECIFIC, command_specific::AER_LIMIT_EXCEEDED) => "asynchronous event request limit exceeded",
            (sct::COMMAND_SPECIFIC, command_specific::INVALID_LOG_PAGE) => "invalid log page",
            (sct::MEDIA, media::WRITE_FAULT) => "write fault",
            (sct::MEDIA, media::UNRECOVERED_READ_ERROR) => "unrecovered read error",
            (sct::MEDIA, media::GUARD_CHECK_ERROR) => "end-to-end guard check error",
            (sct::MEDIA, media::APP_TAG_CHECK_ERROR) => "end-to-end application tag check error",
            (sct::MEDIA, media::REF_TAG_CHECK_ERROR) => "end-to-end reference tag check error",
            (sct::MEDIA, media::COMPARE_FAILURE) => "compare failure",
            (sct::MEDIA, media::ACCESS_DENIED) => "access denied",
            (sct::MEDIA, media::DEALLOCATED_OR_UNWRITTEN) => "deallocated or unwritten logical block",
            (sct::GENERIC, _) => "generic status (unnamed)",
            (sct::COMMAND_SPECIFIC, _) => "command specific status (unnamed)",
            (sct::MEDIA, _) => "media error (unnamed)",
            (sct::PATH, _) => "path related status",
            (sct::VENDOR, _) => "vendor specific status",
            _ => "reserved status code type",
        }
    }
}

impl fmt::Display for NvmeStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (sct {:#x}, sc {:#04x}{})", self.name(), self.sct, self.sc, if self.dnr { ", do not retry" } else { "" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_every_status_word() {
        for w in 0..=u16::MAX {
            let s = NvmeStatus::from_cqe_word(w);
            // Bits 13:12 (CRD) are not kept; everything else round-trips.
            assert_eq!(s.to_cqe_word(w & 1 == 1), w & !0x3000);
        }
    }

    #[test]
    fn names() {
        let s = NvmeStatus::new(sct::MEDIA, media::UNRECOVERED_READ_ERROR);
        assert!(s.is_media_error());
        assert_eq!(s.name(), "unrecovered read error");
        assert!(NvmeStatus::new(sct::GENERIC, generic::ABORT_REQUESTED).is_aborted());
        assert!(NvmeStatus::SUCCESS.is_success());
        assert!(format!("{s}").contains("0x81"));
    }
}
