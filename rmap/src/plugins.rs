//! Plugins that connect other layers to the poison path: the XFS reverse map as an [`Rmap`], and pmem devices as
//! [`ActionTarget`]s (zero and clear free space).

use std::sync::Arc;

use std::time::Duration;

use nvstack_blockdev::bdev::{run_sync, ChannelOpts};
use nvstack_blockdev::{BlockDev, IoDesc, IoOp, IoStatus};
use nvstack_driver::pmem::PmemDevice;

use crate::action::ActionTarget;
use crate::owner::{Owner, OwnerPiece, Rmap};
use crate::xfs::{XfsOwnerKind, XfsRmap};
use crate::RmapError;

/// The XFS reverse-map btree reader, answering for the device (or volume) the file system lives on.
pub struct XfsPlugin {
    device: String,
    xfs: XfsRmap,
}

impl XfsPlugin {
    /// Answer for `device` with an opened reader.
    pub fn new(device: &str, xfs: XfsRmap) -> XfsPlugin {
        XfsPlugin { device: device.to_owned(), xfs }
    }
}

impl Rmap for XfsPlugin {
    fn name(&self) -> &str {
        "xfs"
    }
    fn device(&self) -> &str {
        &self.device
    }
    fn owners(&self, offset: u64, len: u64, out: &mut Vec<OwnerPiece>) -> Result<(), RmapError> {
        let block = u64::from(self.xfs.superblock().block_size);
        for o in self.xfs.owners(offset, len)? {
            let owner = match o.kind {
                XfsOwnerKind::Inode { ino, file_offset_blocks, attr_fork, bmbt, unwritten } => {
                    // The reader already gives the file offset of the piece's first block.
                    let file_offset = file_offset_blocks.saturating_mul(block);
                    Owner::File { ino, file_offset, attr_fork, bmbt, unwritten }
                }
                XfsOwnerKind::Metadata(m) => Owner::Metadata { what: m.name().to_owned() },
                XfsOwnerKind::Free => Owner::Free,
                XfsOwnerKind::OutsideFilesystem => Owner::Outside,
            };
            out.push(OwnerPiece { device: self.device.clone(), offset: o.offset_bytes, len: o.len_bytes, owner, rmap: "xfs".into(), depth: 0 });
        }
        Ok(())
    }
}

/// A pmem device as an action target: free space is zeroed through the driver (which, for files, also clears the
/// poison the kernel knows of).
pub struct PmemTarget {
    device: String,
    dev: Arc<PmemDevice>,
}

impl PmemTarget {
    /// Act for `device` on `dev`.
    pub fn new(device: &str, dev: Arc<PmemDevice>) -> PmemTarget {
        PmemTarget { device: device.to_owned(), dev }
    }
}

impl ActionTarget for PmemTarget {
    fn owns(&self, device: &str) -> bool {
        device == self.device
    }
    fn zero_and_clear(&self, _device: &str, offset: u64, len: u64) -> Result<(), String> {
        self.dev.zero(offset, len).map_err(|e| e.to_string())
    }
}

/// Any block device as an action target: free space is zeroed with a write-zeroes request (for a pmem block device
/// the kernel's pmem driver clears the poison it knows of on that write). Control path only: it opens a channel per
/// action and waits for the request.
pub struct BdevTarget {
    device: String,
    bdev: Arc<dyn BlockDev>,
}

impl BdevTarget {
    /// Act for `device` (a registry name) on `bdev`.
    pub fn new(device: &str, bdev: Arc<dyn BlockDev>) -> BdevTarget {
        BdevTarget { device: device.to_owned(), bdev }
    }
}

impl ActionTarget for BdevTarget {
    fn owns(&self, device: &str) -> bool {
        device == self.device
    }
    fn zero_and_clear(&self, _device: &str, offset: u64, len: u64) -> Result<(), String> {
        let bs = u64::from(self.bdev.geometry().block_size);
        if !offset.is_multiple_of(bs) || !len.is_multiple_of(bs) || len == 0 {
            return Err(format!("range {offset:#x}+{len:#x} is not whole {bs}-byte blocks"));
        }
        let mut ch = self.bdev.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 1 }).map_err(|e| e.to_string())?;
        let mut io = IoDesc::new(1);
        io.prepare(IoOp::WriteZeroes, offset / bs, len / bs);
        let io = run_sync(ch.as_mut(), io, Duration::from_secs(10)).map_err(|e| e.to_string())?;
        match io.status {
            IoStatus::Success => Ok(()),
            other => Err(format!("write zeroes ended {other:?}")),
        }
    }
}
