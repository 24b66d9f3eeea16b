//! The `malloc` backend: a RAM disk (SPDK's `bdev_malloc`).
//!
//! The device's bytes are one anonymous mapping reserved and populated at creation (transparent hugepages asked
//! for, so random access costs few TLB misses). Reads and writes copy between that RAM and the descriptor's
//! segments with `ptr::copy_nonoverlapping`, in `submit`; the descriptor completes on the channel's next `poll`.
//! Write zeroes and deallocate zero the range (so a deallocated block reads back as zeroes). Flush does nothing:
//! the data is as durable as it will ever be.
//!
//! # Sharing and the data-race rule
//! The RAM is shared by every channel of the device (each reactor has its own channel). It is reached only through
//! raw pointers, never through Rust references. Two reactors writing the same block at the same time, or one
//! reading a block while another writes it, is the caller's ordering problem, exactly as on a real disk: the
//! result of such overlapping requests is unspecified (a mix of old and new bytes). Callers that need an order
//! (the cache, a file system) must not have overlapping requests in flight on two reactors, as they must not on an
//! NVMe namespace.

use std::ptr::NonNull;
use std::sync::Arc;

use nvstack_driver::anon::AnonMap;

use crate::bdev::{ChannelOpts, Rejected, SubmitError};
use crate::null::{push_reserved, FastCheck};
use crate::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoOp, IoStatus};

/// SPDK's product name for this kind.
pub const PRODUCT_NAME: &str = "Malloc disk";
/// Largest single transfer.
pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;
/// Most segments in one request.
pub const MAX_SEGMENTS: u32 = 256;
/// Largest channel queue depth.
pub const MAX_QUEUE_DEPTH: u32 = 65536;

/// The device's RAM: one anonymous mapping (2 MiB-aligned, transparent hugepages asked for, populated now),
/// unmapped when the last channel and the device are gone.
#[derive(Debug)]
struct Ram {
    map: AnonMap,
}

impl Ram {
    fn map(name: &str, len: usize) -> Result<Ram, BdevError> {
        let map = AnonMap::new(len, true)
            .map_err(|source| BdevError::RamMap { name: name.to_owned(), size_bytes: len as u64, source })?;
        Ok(Ram { map })
    }

    fn base(&self) -> NonNull<u8> {
        self.map.as_ptr()
    }
}

/// A RAM disk.
#[derive(Debug)]
pub struct MallocBdev {
    name: String,
    geo: Geometry,
    feat: Features,
    ram: Arc<Ram>,
}

impl MallocBdev {
    /// A RAM disk of `size_bytes` (a non-zero multiple of `block_size`), reserved and zeroed now.
    ///
    /// # Errors
    /// [`BdevError::BlockSize`] / [`BdevError::Size`] for a bad geometry, [`BdevError::RamMap`] when the RAM
    /// cannot be reserved.
    pub fn new(name: &str, size_bytes: u64, block_size: u32) -> Result<Arc<MallocBdev>, BdevError> {
        let block_count = crate::spec::block_count(name, size_bytes, block_size)?;
        let len = usize::try_from(size_bytes)
            .map_err(|_| BdevError::Size { name: name.to_owned(), size_bytes, block_size })?;
        let ram = Arc::new(Ram::map(name, len)?);
        let geo = Geometry {
            block_size,
            block_count,
            max_transfer_bytes: MAX_TRANSFER_BYTES.max(block_size),
            optimal_boundary_bytes: 0,
            buf_align_bytes: 1,
            max_segments: MAX_SEGMENTS,
        };
        let feat = Features { flush: false, write_zeroes: true, deallocate: true, fua: true, volatile_write_cache: false };
        tracing::debug!(name, size_bytes, block_size, "malloc bdev created");
        Ok(Arc::new(MallocBdev { name: name.to_owned(), geo, feat, ram }))
    }
}

impl BlockDev for MallocBdev {
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
        Ok(Box::new(MallocChannel {
            base: self.ram.base(),
            ram: Arc::clone(&self.ram),
            geo: self.geo,
            feat: self.feat,
            fast: FastCheck::new(&self.geo),
            depth,
            done: Vec::with_capacity(depth),
        }))
    }
}

struct MallocChannel {
    base: NonNull<u8>,
    /// Keeps the mapping alive while this channel exists.
    #[allow(dead_code)]
    ram: Arc<Ram>,
    geo: Geometry,
    feat: Features,
    fast: FastCheck,
    depth: usize,
    /// Descriptors whose copy is done, waiting for the next poll. Capacity `depth`, never grows.
    #[allow(clippy::vec_box)] // descriptors are the caller's pooled boxes: moved in and out, never re-boxed
    done: Vec<Box<IoDesc>>,
}

// SAFETY: `base` points into `ram`, which this channel keeps alive; the channel is used by one thread at a time
// (the IoChannel contract), and the RAM's sharing rule is in the module doc.
unsafe impl Send for MallocChannel {}

impl IoChannel for MallocChannel {
    #[inline]
    fn submit(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        if self.done.len() >= self.depth {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        if let Err(e) = self.fast.check(&self.geo, &self.feat, &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        // validate() proved offset+num_blocks <= block_count, so both byte numbers are inside the mapping (whose
        // length block_count * block_size fits usize, checked at creation).
        let bs = self.geo.block_size as usize;
        let off = io.offset_blocks as usize * bs;
        let len = io.num_blocks as usize * bs;
        match io.op {
            // SAFETY: `off..off+len` is inside the RAM (above); the segments add up to `len` (validate) and are the
            // channel's until completion (the descriptor is in our hands).
            IoOp::Read => unsafe { io.copy_in(self.base.as_ptr().add(off)) },
            // SAFETY: as for Read, copying the other way.
            IoOp::Write => unsafe { io.copy_out(self.base.as_ptr().add(off)) },
            // SAFETY: `off..off+len` is inside the RAM (above).
            IoOp::WriteZeroes | IoOp::Deallocate => unsafe { std::ptr::write_bytes(self.base.as_ptr().add(off), 0, len) },
            IoOp::Flush => {}
        }
        io.status = IoStatus::Success;
        push_reserved(&mut self.done, io);
        Ok(())
    }

    #[inline]
    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        crate::bdev::hand_back(&mut self.done, out)
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }

    fn queue_depth(&self) -> u32 {
        // Fits: checked against MAX_QUEUE_DEPTH at open.
        self.depth as u32
    }
}
