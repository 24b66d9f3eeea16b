//! The `pmem` backend: persistent memory mapped into the process (device-DAX, an fsdax file, or a plain file).
//!
//! Reads copy out of the mapping with the machine-check-safe copy: a poisoned range fails that request with
//! [`IoError::Media`] naming the blocks, and never kills the process. Writes copy in and persist before they
//! complete (cache write-back or non-temporal stores plus sfence; msync for a plain file), so every write is already
//! FUA and flush is only a fence. Write zeroes and deallocate zero the range through the driver, which for files
//! also clears poison the kernel knows of.
//!
//! Like `malloc`, copies happen in `submit` and the descriptor completes on the next `poll`. Overlapping requests on
//! two reactors are the caller's ordering problem, as on any disk.

use std::path::Path;
use std::sync::Arc;

use nvstack_driver::pmem::PmemDevice;

use crate::bdev::{validate, ChannelOpts, Rejected, SubmitError};
use crate::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoError, IoOp, IoStatus};

/// SPDK's product name for this kind.
pub const PRODUCT_NAME: &str = "pmem disk";
/// Largest single transfer.
pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;
/// Most segments in one request.
pub const MAX_SEGMENTS: u32 = 256;
/// Largest channel queue depth.
pub const MAX_QUEUE_DEPTH: u32 = 65536;

/// A pmem block device.
#[derive(Debug)]
pub struct PmemBdev {
    name: String,
    geo: Geometry,
    feat: Features,
    dev: Arc<PmemDevice>,
}

impl PmemBdev {
    /// Map `path` (device-DAX, fsdax file or plain file; `size_bytes` creates or extends a file) as a block device.
    ///
    /// # Errors
    /// [`BdevError::Pmem`] when the mapping fails, [`BdevError::Size`] when the size is not a multiple of the block
    /// size.
    pub fn open(name: &str, path: &Path, size_bytes: Option<u64>, block_size: u32) -> Result<Arc<PmemBdev>, BdevError> {
        let dev = PmemDevice::open(path, size_bytes).map_err(|source| BdevError::Pmem { name: name.to_owned(), source })?;
        let block_count = crate::spec::block_count(name, dev.len(), block_size)?;
        let geo = Geometry {
            block_size,
            block_count,
            max_transfer_bytes: MAX_TRANSFER_BYTES.max(block_size),
            optimal_boundary_bytes: 0,
            buf_align_bytes: 1,
            max_segments: MAX_SEGMENTS,
        };
        let feat = Features { flush: true, write_zeroes: true, deallocate: true, fua: true, volatile_write_cache: false };
        tracing::info!(name, path = %path.display(), kind = dev.kind().name(), persist = dev.persist_method().name(), "pmem bdev opened");
        Ok(Arc::new(PmemBdev { name: name.to_owned(), geo, feat, dev: Arc::new(dev) }))
    }

    /// The mapped device (for the poison path: its address range, kind, physical placement).
    pub fn device(&self) -> &Arc<PmemDevice> {
        &self.dev
    }
}

impl BlockDev for PmemBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &'static str {
        PRODUCT_NAME
    }
    fn geometry(&self) -> Geometry {
        self.geo
    }
    fn features(&self) -> Features {
        self.feat
    }
    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        let depth = crate::bdev::check_queue_depth(&self.name, &opts, MAX_QUEUE_DEPTH)?;
        Ok(Box::new(PmemChannel {
            dev: Arc::clone(&self.dev),
            geo: self.geo,
            feat: self.feat,
            depth,
            done: Vec::with_capacity(depth),
        }))
    }
}

struct PmemChannel {
    dev: Arc<PmemDevice>,
    geo: Geometry,
    feat: Features,
    depth: usize,
    #[allow(clippy::vec_box)] // the caller's pooled boxes, moved in and out
    done: Vec<Box<IoDesc>>,
}

impl PmemChannel {
    fn read(&self, io: &IoDesc, off: u64) -> Result<(), IoError> {
        let bs = u64::from(self.geo.block_size);
        let mut at = off;
        for s in io.segs() {
            // SAFETY: the segment is valid for writes and ours until completion (IoDesc contract); it is arena
            // memory, not inside the pmem mapping.
            let r = unsafe { self.dev.read_into(at, s.ptr().as_ptr(), s.len() as usize) };
            if let Err(bad) = r {
                let first = bad.offset / bs;
                let end = (off + io.num_blocks * bs).min(bad.offset + bad.len.max(1)).div_ceil(bs);
                tracing::warn!(bdev = %self.dev.path().display(), offset = bad.offset, "pmem read hit poison");
                return Err(IoError::Media { offset_blocks: first, num_blocks: end.saturating_sub(first).max(1) });
            }
            at += u64::from(s.len());
        }
        Ok(())
    }

    fn write(&self, io: &IoDesc, off: u64) -> Result<(), IoError> {
        let mut at = off;
        for s in io.segs() {
            // SAFETY: the segment is readable and ours until completion (IoDesc contract); not inside the mapping.
            unsafe { self.dev.write_from(at, s.ptr().as_ptr(), s.len() as usize) }
                .map_err(|e| IoError::Os { errno: e.raw_os_error().unwrap_or(libc::EIO) })?;
            at += u64::from(s.len());
        }
        Ok(())
    }
}

impl IoChannel for PmemChannel {
    fn submit(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        if self.done.len() >= self.depth {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        if let Err(e) = validate(&self.geo, &self.feat, &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        // validate() bounded the range by block_count, so these products fit the mapping's length.
        let bs = u64::from(self.geo.block_size);
        let off = io.offset_blocks * bs;
        let len = io.num_blocks * bs;
        let r = match io.op {
            IoOp::Read => self.read(&io, off),
            IoOp::Write => self.write(&io, off),
            IoOp::WriteZeroes | IoOp::Deallocate => {
                self.dev.zero(off, len).map_err(|e| IoError::Os { errno: e.raw_os_error().unwrap_or(libc::EIO) })
            }
            IoOp::Flush => {
                self.dev.flush();
                Ok(())
            }
        };
        io.status = match r {
            Ok(()) => IoStatus::Success,
            Err(e) => IoStatus::Failed(e),
        };
        self.done.push(io);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        crate::bdev::hand_back(&mut self.done, out)
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }

    fn queue_depth(&self) -> u32 {
        self.depth as u32
    }
}
