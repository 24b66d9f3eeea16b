//! Controller registers (Base spec 3.1, figure 35): offsets, named field accessors, and every MMIO access nvstack
//! makes, through the [`Transport`].
//!
//! Each register is a newtype over its raw value with one accessor per field; no caller masks bits by hand.

use super::transport::Transport;

/// CAP: controller capabilities (3.1.1), 64-bit.
pub const CAP: usize = 0x00;
/// VS: version (3.1.2).
pub const VS: usize = 0x08;
/// INTMS: interrupt mask set (3.1.3).
pub const INTMS: usize = 0x0c;
/// CC: controller configuration (3.1.5).
pub const CC: usize = 0x14;
/// CSTS: controller status (3.1.6).
pub const CSTS: usize = 0x1c;
/// AQA: admin queue attributes (3.1.8).
pub const AQA: usize = 0x24;
/// ASQ: admin submission queue base address (3.1.9), 64-bit.
pub const ASQ: usize = 0x28;
/// ACQ: admin completion queue base address (3.1.10), 64-bit.
pub const ACQ: usize = 0x30;
/// First doorbell register (3.1.24).
pub const DOORBELL_BASE: usize = 0x1000;

/// A 32-bit register read of all ones: the device is gone (surprise removal, or a PCIe error).
pub const ALL_ONES_32: u32 = u32::MAX;

const fn field64(v: u64, shift: u32, width: u32) -> u64 {
    (v >> shift) & ((1u64 << width) - 1)
}
const fn field32(v: u32, shift: u32, width: u32) -> u32 {
    (v >> shift) & ((1u32 << width) - 1)
}
const fn set32(v: u32, shift: u32, width: u32, x: u32) -> u32 {
    let mask = ((1u32 << width) - 1) << shift;
    (v & !mask) | ((x << shift) & mask)
}

/// CAP (3.1.1, figure 36).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cap(pub u64);

impl Cap {
    /// MQES, bits 15:0: maximum queue entries supported, 0-based.
    pub fn mqes(self) -> u16 {
        field64(self.0, 0, 16) as u16
    }
    /// CQR, bit 16: contiguous queues required.
    pub fn cqr(self) -> bool {
        field64(self.0, 16, 1) == 1
    }
    /// TO, bits 31:24: worst-case time to ready, in 500 ms units.
    pub fn to_500ms(self) -> u8 {
        field64(self.0, 24, 8) as u8
    }
    /// TO as milliseconds.
    pub fn timeout_ms(self) -> u64 {
        u64::from(self.to_500ms()) * 500
    }
    /// DSTRD, bits 35:32: doorbell stride, as 2^(2 + DSTRD) bytes.
    pub fn dstrd(self) -> u8 {
        field64(self.0, 32, 4) as u8
    }
    /// CSS, bits 44:37: command sets supported (bit 0 of the field: NVM command set).
    pub fn css(self) -> u8 {
        field64(self.0, 37, 8) as u8
    }
    /// MPSMIN, bits 51:48: minimum memory page size, 2^(12 + MPSMIN).
    pub fn mpsmin(self) -> u8 {
        field64(self.0, 48, 4) as u8
    }
    /// MPSMAX, bits 55:52: maximum memory page size, 2^(12 + MPSMAX).
    pub fn mpsmax(self) -> u8 {
        field64(self.0, 52, 4) as u8
    }
    /// Build a CAP value (for the simulator).
    pub fn build(mqes: u16, to_500ms: u8, dstrd: u8, css: u8, mpsmin: u8, mpsmax: u8) -> Cap {
        Cap(u64::from(mqes)
            | (1 << 16)
            | (u64::from(to_500ms) << 24)
            | (u64::from(dstrd & 0xf) << 32)
            | (u64::from(css) << 37)
            | (u64::from(mpsmin & 0xf) << 48)
            | (u64::from(mpsmax & 0xf) << 52))
    }
}

/// CC (3.1.5, figure 46).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cc(pub u32);

/// CC.SHN values (3.1.5): shutdown notification.
pub mod shn {
    /// No notification.
    pub const NONE: u32 = 0;
    /// Normal shutdown.
    pub const NORMAL: u32 = 1;
    /// Abrupt shutdown.
    pub const ABRUPT: u32 = 2;
}

impl Cc {
    /// EN, bit 0: enable.
    pub fn en(self) -> bool {
        field32(self.0, 0, 1) == 1
    }
    /// With EN set to `on`.
    pub fn with_en(self, on: bool) -> Cc {
        Cc(set32(self.0, 0, 1, u32::from(on)))
    }
    /// CSS, bits 6:4: I/O command set selected (0: NVM).
    pub fn css(self) -> u32 {
        field32(self.0, 4, 3)
    }
    /// With CSS.
    pub fn with_css(self, v: u32) -> Cc {
        Cc(set32(self.0, 4, 3, v))
    }
    /// MPS, bits 10:7: memory page size 2^(12 + MPS).
    pub fn mps(self) -> u32 {
        field32(self.0, 7, 4)
    }
    /// With MPS.
    pub fn with_mps(self, v: u32) -> Cc {
        Cc(set32(self.0, 7, 4, v))
    }
    /// AMS, bits 13:11: arbitration mechanism (0: round robin).
    pub fn ams(self) -> u32 {
        field32(self.0, 11, 3)
    }
    /// SHN, bits 15:14: shutdown notification ([`shn`]).
    pub fn shn(self) -> u32 {
        field32(self.0, 14, 2)
    }
    /// With SHN.
    pub fn with_shn(self, v: u32) -> Cc {
        Cc(set32(self.0, 14, 2, v))
    }
    /// IOSQES, bits 19:16: I/O SQ entry size, log2 bytes.
    pub fn iosqes(self) -> u32 {
        field32(self.0, 16, 4)
    }
    /// With IOSQES.
    pub fn with_iosqes(self, v: u32) -> Cc {
        Cc(set32(self.0, 16, 4, v))
    }
    /// IOCQES, bits 23:20: I/O CQ entry size, log2 bytes.
    pub fn iocqes(self) -> u32 {
        field32(self.0, 20, 4)
    }
    /// With IOCQES.
    pub fn with_iocqes(self, v: u32) -> Cc {
        Cc(set32(self.0, 20, 4, v))
    }
}

/// CSTS (3.1.6, figure 47).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Csts(pub u32);

/// CSTS.SHST values (3.1.6): shutdown status.
pub mod shst {
    /// Normal operation.
    pub const NORMAL: u32 = 0;
    /// Shutdown processing occurring.
    pub const OCCURRING: u32 = 1;
    /// Shutdown processing complete.
    pub const COMPLETE: u32 = 2;
}

impl Csts {
    /// Whether the read returned all ones (device gone): no field below means anything then.
    pub fn is_all_ones(self) -> bool {
        self.0 == ALL_ONES_32
    }
    /// RDY, bit 0: ready.
    pub fn rdy(self) -> bool {
        field32(self.0, 0, 1) == 1
    }
    /// CFS, bit 1: controller fatal status.
    pub fn cfs(self) -> bool {
        field32(self.0, 1, 1) == 1
    }
    /// SHST, bits 3:2: shutdown status ([`shst`]).
    pub fn shst(self) -> u32 {
        field32(self.0, 2, 2)
    }
    /// Build a CSTS value (for the simulator).
    pub fn build(rdy: bool, cfs: bool, shst: u32) -> Csts {
        Csts(set32(set32(set32(0, 0, 1, u32::from(rdy)), 1, 1, u32::from(cfs)), 2, 2, shst))
    }
}

/// AQA (3.1.8, figure 49).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Aqa(pub u32);

impl Aqa {
    /// ASQS, bits 11:0: admin SQ size, 0-based.
    pub fn asqs(self) -> u16 {
        field32(self.0, 0, 12) as u16
    }
    /// ACQS, bits 27:16: admin CQ size, 0-based.
    pub fn acqs(self) -> u16 {
        field32(self.0, 16, 12) as u16
    }
    /// Build from 0-based sizes.
    pub fn build(asqs: u16, acqs: u16) -> Aqa {
        Aqa(set32(set32(0, 0, 12, u32::from(asqs)), 16, 12, u32::from(acqs)))
    }
}

/// VS (3.1.2, figure 37).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Version(pub u32);

impl Version {
    /// MJR, bits 31:16.
    pub fn major(self) -> u16 {
        field32(self.0, 16, 16) as u16
    }
    /// MNR, bits 15:8.
    pub fn minor(self) -> u8 {
        field32(self.0, 8, 8) as u8
    }
    /// TER, bits 7:0.
    pub fn tertiary(self) -> u8 {
        field32(self.0, 0, 8) as u8
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major(), self.minor(), self.tertiary())
    }
}

/// Offset of SQ `qid`'s tail doorbell (3.1.24: `0x1000 + (2 * qid) * (4 << DSTRD)`).
pub fn sq_doorbell(qid: u16, dstrd: u8) -> usize {
    DOORBELL_BASE + (2 * usize::from(qid)) * (4usize << dstrd)
}

/// Offset of CQ `qid`'s head doorbell (3.1.25: `0x1000 + (2 * qid + 1) * (4 << DSTRD)`).
pub fn cq_doorbell(qid: u16, dstrd: u8) -> usize {
    DOORBELL_BASE + (2 * usize::from(qid) + 1) * (4usize << dstrd)
}

/// Typed register access over a transport. Holds nothing but the transport.
pub struct Regs<'a>(pub &'a dyn Transport);

impl Regs<'_> {
    /// Read CAP.
    pub fn cap(&self) -> Cap {
        Cap(self.0.read64(CAP))
    }
    /// Read VS.
    pub fn vs(&self) -> Version {
        Version(self.0.read32(VS))
    }
    /// Read CC.
    pub fn cc(&self) -> Cc {
        Cc(self.0.read32(CC))
    }
    /// Write CC.
    pub fn set_cc(&self, cc: Cc) {
        self.0.write32(CC, cc.0);
    }
    /// Read CSTS.
    pub fn csts(&self) -> Csts {
        Csts(self.0.read32(CSTS))
    }
    /// Write AQA.
    pub fn set_aqa(&self, aqa: Aqa) {
        self.0.write32(AQA, aqa.0);
    }
    /// Write ASQ.
    pub fn set_asq(&self, iova: u64) {
        self.0.write64(ASQ, iova);
    }
    /// Write ACQ.
    pub fn set_acq(&self, iova: u64) {
        self.0.write64(ACQ, iova);
    }
    /// Mask all interrupts (INTMS): nvstack polls.
    pub fn mask_interrupts(&self) {
        self.0.write32(INTMS, u32::MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cap_fields_round_trip() {
        let c = Cap::build(1023, 20, 1, 1, 0, 4);
        assert_eq!(c.mqes(), 1023);
        assert!(c.cqr());
        assert_eq!(c.to_500ms(), 20);
        assert_eq!(c.timeout_ms(), 10_000);
        assert_eq!(c.dstrd(), 1);
        assert_eq!(c.css(), 1);
        assert_eq!(c.mpsmin(), 0);
        assert_eq!(c.mpsmax(), 4);
    }

    #[test]
    fn cc_setters_touch_only_their_field() {
        let cc = Cc::default().with_iosqes(6).with_iocqes(4).with_mps(0).with_css(0).with_en(true);
        assert_eq!(cc.0, 0x0046_0001);
        let off = cc.with_en(false);
        assert_eq!(off.iosqes(), 6);
        assert_eq!(off.iocqes(), 4);
        assert!(!off.en());
        assert_eq!(cc.with_shn(shn::NORMAL).shn(), 1);
        assert_eq!(cc.with_shn(shn::NORMAL).iosqes(), 6);
    }

    #[test]
    fn csts_and_doorbells() {
        let s = Csts::build(true, true, shst::COMPLETE);
        assert!(s.rdy() && s.cfs());
        assert_eq!(s.shst(), shst::COMPLETE);
        assert!(Csts(u32::MAX).is_all_ones());
        assert_eq!(sq_doorbell(0, 0), 0x1000);
        assert_eq!(cq_doorbell(0, 0), 0x1004);
        assert_eq!(sq_doorbell(3, 0), 0x1018);
        assert_eq!(cq_doorbell(1, 2), 0x1000 + 3 * 16);
        let a = Aqa::build(31, 31);
        assert_eq!((a.asqs(), a.acqs()), (31, 31));
    }
}
