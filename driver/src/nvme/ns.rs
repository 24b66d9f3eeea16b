//! Namespaces: geometry from Identify Namespace, and the NVM command builders.

use super::spec::{io_opc, IdentifyNamespace, SubmissionEntry};

/// One LBA format of a namespace, decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LbaFormatInfo {
    /// Format index.
    pub index: u8,
    /// Data bytes per block.
    pub block_size: u32,
    /// Metadata bytes per block.
    pub metadata_bytes: u16,
    /// Relative performance (0 best .. 3 degraded).
    pub relative_performance: u8,
    /// Whether this is the format in use.
    pub in_use: bool,
}

/// A namespace as nvstack sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace ID.
    pub nsid: u32,
    /// Size in blocks (NSZE).
    pub block_count: u64,
    /// Capacity in blocks (NCAP).
    pub capacity_blocks: u64,
    /// Block size in bytes.
    pub block_size: u32,
    /// log2(block_size).
    pub lba_shift: u8,
    /// Metadata bytes per block in the format in use.
    pub metadata_bytes: u16,
    /// Optimal I/O boundary in blocks (0: none).
    pub optimal_boundary_blocks: u16,
    /// Every LBA format the namespace offers.
    pub formats: Vec<LbaFormatInfo>,
    /// Why nvstack refuses to do I/O to it (`None`: usable).
    pub refused: Option<String>,
}

impl Namespace {
    /// Decode Identify Namespace data. Formats with metadata, or block sizes outside 512..=65536, are recorded
    /// as refused with the reason, not failed: `identify` still shows them.
    pub fn from_identify(nsid: u32, id: &IdentifyNamespace) -> Namespace {
        let in_use = (id.flbas & 0x0f) | ((id.flbas >> 1) & 0x30);
        let count = usize::from(id.nlbaf).saturating_add(1).min(id.lbaf.len());
        let formats: Vec<LbaFormatInfo> = id.lbaf[..count]
            .iter()
            .enumerate()
            .map(|(i, f)| LbaFormatInfo {
                index: i as u8,
                block_size: if f.lbads >= 9 && f.lbads < 32 { 1u32 << f.lbads } else { 0 },
                metadata_bytes: f.ms,
                relative_performance: f.rp & 3,
                in_use: i as u8 == in_use,
            })
            .collect();
        let cur = id.lbaf.get(usize::from(in_use)).copied().unwrap_or_default();
        let mut refused = None;
        if usize::from(in_use) >= count {
            refused = Some(format!("formatted LBA size index {in_use} is beyond the {count} formats listed"));
        } else if !(9..=16).contains(&cur.lbads) {
            refused = Some(format!("block size 2^{} is outside 512..=65536 bytes", cur.lbads));
        } else if cur.ms != 0 {
            refused = Some(format!(
                "LBA format {in_use} carries {} bytes of metadata per block; nvstack supports only formats \
                 without metadata (reformat the namespace, e.g. `nvme format --lbaf=N` with a metadata-free format)",
                cur.ms
            ));
        } else if id.nsze == 0 {
            refused = Some("namespace size is zero".into());
        }
        let lba_shift = if refused.is_none() { cur.lbads } else { 9 };
        Namespace {
            nsid,
            block_count: id.nsze,
            capacity_blocks: id.ncap,
            block_size: 1u32 << lba_shift,
            lba_shift,
            metadata_bytes: cur.ms,
            optimal_boundary_blocks: id.noiob,
            formats,
            refused,
        }
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.block_count.saturating_mul(u64::from(self.block_size))
    }
}

/// Most blocks one read, write or write-zeroes command carries (NLB is a 16-bit 0-based field).
pub const MAX_NLB_PER_COMMAND: u64 = 1 << 16;
/// Most blocks one DSM range carries (NLB is 32-bit, 1-based); kept a power of two.
pub const MAX_DSM_BLOCKS: u64 = 1 << 31;

/// CDW12 bit 30 of read and write: force unit access (NVM 3.3.4, figure 49).
pub const CDW12_FUA: u32 = 1 << 30;
/// CDW11 bit 2 of dataset management: attribute deallocate (NVM 3.3.3, figure 37).
pub const DSM_CDW11_AD: u32 = 1 << 2;

/// An NVM operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NvmOp {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush.
    Flush,
    /// Write zeroes.
    WriteZeroes,
    /// Dataset management, deallocate.
    Deallocate,
}

impl NvmOp {
    /// Whether it moves data through PRPs or SGLs.
    #[inline]
    pub fn has_data(self) -> bool {
        matches!(self, NvmOp::Read | NvmOp::Write)
    }
    /// The most blocks one command may carry, before MDTS.
    #[inline]
    pub fn max_blocks(self) -> u64 {
        match self {
            NvmOp::Deallocate => MAX_DSM_BLOCKS,
            _ => MAX_NLB_PER_COMMAND,
        }
    }
}

/// Fill `e` as a read, write or write-zeroes command for `nlb` (1..=65536) blocks at `slba`. Data pointers are
/// left to the caller.
#[inline]
pub fn build_rw(e: &mut SubmissionEntry, op: NvmOp, nsid: u32, slba: u64, nlb: u64, fua: bool) {
    *e = SubmissionEntry::default();
    e.opc = match op {
        NvmOp::Read => io_opc::READ,
        NvmOp::Write => io_opc::WRITE,
        NvmOp::WriteZeroes => io_opc::WRITE_ZEROES,
        NvmOp::Flush => io_opc::FLUSH,
        NvmOp::Deallocate => io_opc::DSM,
    };
    e.nsid = nsid;
    e.cdw10 = slba as u32;
    e.cdw11 = (slba >> 32) as u32;
    e.cdw12 = ((nlb - 1) as u32 & 0xffff) | if fua { CDW12_FUA } else { 0 };
}

/// Fill `e` as a flush.
#[inline]
pub fn build_flush(e: &mut SubmissionEntry, nsid: u32) {
    *e = SubmissionEntry { opc: io_opc::FLUSH, nsid, ..Default::default() };
}

/// Fill `e` as a one-range deallocate whose range list (one [`super::spec::DsmRange`]) is at `range_iova`.
#[inline]
pub fn build_deallocate(e: &mut SubmissionEntry, nsid: u32, range_iova: u64) {
    *e = SubmissionEntry { opc: io_opc::DSM, nsid, dptr1: range_iova, cdw10: 0, cdw11: DSM_CDW11_AD, ..Default::default() };
}

/// The starting LBA and block count of a read, write or write-zeroes entry.
#[inline]
pub fn rw_range(e: &SubmissionEntry) -> (u64, u64) {
    (u64::from(e.cdw10) | (u64::from(e.cdw11) << 32), u64::from(e.cdw12 & 0xffff) + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nvme::spec::{LbaFormat, Pod};

    fn idns(lbads: u8, ms: u16) -> IdentifyNamespace {
        let mut id = IdentifyNamespace::zeroed();
        id.nsze = 1000;
        id.ncap = 1000;
        id.nlbaf = 1;
        id.lbaf[0] = LbaFormat { ms: 0, lbads: 9, rp: 0 };
        id.lbaf[1] = LbaFormat { ms, lbads, rp: 0 };
        id.flbas = 1;
        id
    }

    #[test]
    fn formats_and_refusal() {
        let ns = Namespace::from_identify(1, &idns(12, 0));
        assert_eq!(ns.block_size, 4096);
        assert!(ns.refused.is_none());
        assert_eq!(ns.formats.len(), 2);
        assert!(ns.formats[1].in_use);
        let ns = Namespace::from_identify(1, &idns(12, 8));
        assert!(ns.refused.as_deref().unwrap_or("").contains("metadata"));
        let ns = Namespace::from_identify(1, &idns(30, 0));
        assert!(ns.refused.is_some());
    }

    #[test]
    fn rw_fields() {
        let mut e = SubmissionEntry::default();
        build_rw(&mut e, NvmOp::Write, 3, 0x1_2345_6789, 65536, true);
        assert_eq!(e.opc, io_opc::WRITE);
        assert_eq!(rw_range(&e), (0x1_2345_6789, 65536));
        assert_ne!(e.cdw12 & CDW12_FUA, 0);
    }
}
