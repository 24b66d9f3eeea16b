//! The `null` backend: every request completes at once and moves no data (SPDK's `bdev_null`).
//!
//! It measures the cost of the layers above it. A channel is a preallocated vector of finished descriptors: submit
//! validates the request, marks it done and pushes it; poll hands the finished ones over in one move. Nothing is
//! allocated after [`NullBdev::open_channel`].
//!
//! Reads leave the caller's buffers as they were (no data is produced). Flush, write zeroes and deallocate are
//! accepted and do nothing.

use std::sync::Arc;

use crate::bdev::{validate, ChannelOpts, Rejected, SubmitError};
use crate::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoStatus};

/// SPDK's product name for this kind.
pub const PRODUCT_NAME: &str = "Null disk";
/// Largest single transfer the null device takes.
pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;
/// Most segments in one request.
pub const MAX_SEGMENTS: u32 = 256;
/// Largest channel queue depth (a limit in DESIGN.md).
pub const MAX_QUEUE_DEPTH: u32 = 65536;

/// A device of a given size that completes everything at once.
#[derive(Debug)]
pub struct NullBdev {
    name: String,
    geo: Geometry,
    feat: Features,
}

impl NullBdev {
    /// A null device of `size_bytes` (a non-zero multiple of `block_size`) with `block_size`-byte blocks.
    ///
    /// # Errors
    /// [`BdevError::BlockSize`] for a block size that is not a power of two in 512..=65536, [`BdevError::Size`] for
    /// a size that is zero or not a multiple of it.
    pub fn new(name: &str, size_bytes: u64, block_size: u32) -> Result<Arc<NullBdev>, BdevError> {
        let block_count = crate::spec::block_count(name, size_bytes, block_size)?;
        let geo = Geometry {
            block_size,
            block_count,
            max_transfer_bytes: MAX_TRANSFER_BYTES.max(block_size),
            optimal_boundary_bytes: 0,
            buf_align_bytes: 1,
            max_segments: MAX_SEGMENTS,
        };
        let feat = Features { flush: true, write_zeroes: true, deallocate: true, fua: true, volatile_write_cache: false };
        tracing::debug!(name, size_bytes, block_size, "null bdev created");
        Ok(Arc::new(NullBdev { name: name.to_owned(), geo, feat }))
    }
}

impl BlockDev for NullBdev {
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
        if opts.queue_depth == 0 || opts.queue_depth > MAX_QUEUE_DEPTH {
            return Err(BdevError::Channel {
                name: self.name.clone(),
                reason: format!("queue depth {} is not in 1..={MAX_QUEUE_DEPTH}", opts.queue_depth),
            });
        }
        Ok(Box::new(NullChannel {
            geo: self.geo,
            feat: self.feat,
            depth: opts.queue_depth as usize,
            done: Vec::with_capacity(opts.queue_depth as usize),
        }))
    }
}

/// One reactor's channel: finished descriptors waiting to be reaped, in submission order.
struct NullChannel {
    geo: Geometry,
    feat: Features,
    depth: usize,
    /// Capacity `depth`, reserved at open; never grows.
    #[allow(clippy::vec_box)] // descriptors are the caller's pooled boxes: moved in and out, never re-boxed
    done: Vec<Box<IoDesc>>,
}

impl IoChannel for NullChannel {
    #[inline]
    fn submit(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        if self.done.len() >= self.depth {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        if let Err(e) = validate(&self.geo, &self.feat, &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        io.status = IoStatus::Success;
        self.done.push(io);
        Ok(())
    }

    #[inline]
    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        let n = self.done.len();
        if n == 0 {
            return 0;
        }
        let room = out.capacity() - out.len();
        if n <= room {
            // The common case: everything fits; one move of `n` pointers, no allocation (room was checked).
            out.append(&mut self.done);
            n
        } else {
            out.extend(self.done.drain(..room));
            room
        }
    }

    fn outstanding(&self) -> usize {
        self.done.len()
    }

    fn queue_depth(&self) -> u32 {
        // Fits: checked against MAX_QUEUE_DEPTH at open.
        self.depth as u32
    }
}
