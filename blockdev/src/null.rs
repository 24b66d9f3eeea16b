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
        let depth = crate::bdev::check_queue_depth(&self.name, &opts, MAX_QUEUE_DEPTH)?;
        Ok(Box::new(NullChannel {
            geo: self.geo,
            feat: self.feat,
            fast: FastCheck::new(&self.geo),
            depth,
            done: Vec::with_capacity(depth),
        }))
    }
}

impl NullChannel {
    #[cold]
    #[inline(never)]
    fn submit_slow(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        if self.done.len() >= self.depth {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        if let Err(e) = validate(&self.geo, &self.feat, &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        io.status = IoStatus::Success;
        push_reserved(&mut self.done, io);
        Ok(())
    }
}

/// One reactor's channel: finished descriptors waiting to be reaped, in submission order.
struct NullChannel {
    geo: Geometry,
    feat: Features,
    fast: FastCheck,
    depth: usize,
    /// Capacity `depth`, reserved at open; never grows.
    #[allow(clippy::vec_box)] // descriptors are the caller's pooled boxes: moved in and out, never re-boxed
    done: Vec<Box<IoDesc>>,
}

impl IoChannel for NullChannel {
    #[inline]
    fn submit(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        // The hot path: room, and the common request shape, accepted in a few instructions. Everything else (Busy,
        // errors, other shapes) goes to the out-of-line path, so this one needs few registers.
        let len = self.done.len();
        if len < self.depth && len < self.done.capacity() && self.fast.accepts(&io) {
            io.status = IoStatus::Success;
            // SAFETY: `len < capacity`: slot `len` is allocated and unused; it is written before the length covers it.
            unsafe {
                self.done.as_mut_ptr().add(len).write(io);
                self.done.set_len(len + 1);
            }
            return Ok(());
        }
        self.submit_slow(io)
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

/// Push onto a vector known to have room (no grow path on the I/O path).
#[inline(always)]
#[allow(clippy::vec_box)] // the caller's pooled boxes, moved through
pub(crate) fn push_reserved(v: &mut Vec<Box<IoDesc>>, io: Box<IoDesc>) {
    let len = v.len();
    if len < v.capacity() {
        // SAFETY: `len < capacity`, so slot `len` is allocated and unused; it is initialised before the length
        // grows to cover it.
        unsafe {
            v.as_mut_ptr().add(len).write(io);
            v.set_len(len + 1);
        }
    } else {
        // Unreachable when callers check their depth first; kept correct (and out of line) rather than unsafe.
        push_slow(v, io);
    }
}

#[cold]
#[inline(never)]
#[allow(clippy::vec_box)]
fn push_slow(v: &mut Vec<Box<IoDesc>>, io: Box<IoDesc>) {
    v.push(io);
}

/// A precomputed check that accepts the common request shape (a read or write of one segment) in a handful of
/// instructions, and otherwise defers to [`validate`] (out of line) for the verdict and its precise error.
/// It only ever accepts what `validate` accepts, so the result is always `validate`'s.
#[derive(Debug, Clone, Copy)]
pub(crate) struct FastCheck {
    block_count: u64,
    /// Most blocks in one transfer: `max_transfer_bytes / block_size`.
    max_blocks: u64,
    block_shift: u32,
    align_mask: usize,
}

impl FastCheck {
    pub(crate) fn new(geo: &Geometry) -> FastCheck {
        FastCheck {
            block_count: geo.block_count,
            max_blocks: u64::from(geo.max_transfer_bytes / geo.block_size.max(1)),
            block_shift: geo.block_size.max(1).trailing_zeros(),
            align_mask: geo.buf_align_bytes.max(1) as usize - 1,
        }
    }

    /// Validate `io` as [`validate`] does.
    ///
    /// # Errors
    /// `validate`'s error.
    #[inline(always)]
    pub(crate) fn check(&self, geo: &Geometry, feat: &Features, io: &IoDesc) -> Result<(), crate::IoError> {
        if self.accepts(io) {
            return Ok(());
        }
        validate_cold(geo, feat, io)
    }

    /// Whether `io` has the common shape and passes every check `validate` makes on it. `false` means "ask
    /// `validate`", not "invalid".
    #[inline(always)]
    pub(crate) fn accepts(&self, io: &IoDesc) -> bool {
        let [s] = io.segs() else { return false };
        let n = io.num_blocks;
        let rw = matches!(io.op, crate::IoOp::Read | crate::IoOp::Write);
        let fua_read = io.op == crate::IoOp::Read && io.flags.contains(crate::IoFlags::FUA);
        // n <= max_blocks <= 2^32, so the shift cannot overflow; the range check cannot either (checked_add).
        let in_range = matches!(io.offset_blocks.checked_add(n), Some(end) if end <= self.block_count);
        let fits = n != 0 && n <= self.max_blocks && u64::from(s.len()) == n << self.block_shift;
        let aligned = (s.ptr().as_ptr() as usize | s.len() as usize) & self.align_mask == 0;
        rw && !fua_read && in_range && fits && aligned
    }
}

#[cold]
#[inline(never)]
fn validate_cold(geo: &Geometry, feat: &Features, io: &IoDesc) -> Result<(), crate::IoError> {
    validate(geo, feat, io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{IoFlags, IoOp};
    use proptest::prelude::*;

    fn geo(bs: u32, count: u64, align: u32) -> Geometry {
        Geometry {
            block_size: bs,
            block_count: count,
            max_transfer_bytes: 64 * bs,
            optimal_boundary_bytes: 0,
            buf_align_bytes: align,
            max_segments: 4,
        }
    }

    #[test]
    fn fast_check_accepts_the_common_shape() {
        let g = geo(4096, 100, 4096);
        let feat = Features::default();
        let backing = vec![0u8; 3 * 4096];
        let at = backing.as_ptr().wrapping_add(4096 - (backing.as_ptr() as usize % 4096)) as *mut u8;
        let mut io = IoDesc::new(1);
        io.prepare(IoOp::Read, 99, 1);
        // SAFETY: only validated, never submitted.
        unsafe { io.push_seg_raw(std::ptr::NonNull::new(at).unwrap(), 0, 4096) }.unwrap();
        let fast = FastCheck::new(&g);
        assert_eq!(fast.check(&g, &feat, &io), Ok(()));
        io.prepare(IoOp::Read, 100, 1);
        assert!(matches!(fast.check(&g, &feat, &io), Err(crate::IoError::OutOfRange { .. })));
    }

    proptest! {
        /// The fast check gives exactly validate's verdict (and error) on every request shape.
        #[test]
        fn fast_check_equals_validate(
            bs_shift in 9u32..13,
            count in 1u64..200,
            align_shift in 0u32..10,
            op in 0u8..5,
            fua in any::<bool>(),
            off in prop_oneof![0u64..300, Just(u64::MAX), Just(u64::MAX - 1)],
            n in prop_oneof![0u64..80, Just(u64::MAX)],
            segs in proptest::collection::vec((0usize..64, 0u32..70_000), 0..6),
        ) {
            let g = geo(1 << bs_shift, count, 1 << align_shift);
            let feat = Features { flush: true, write_zeroes: op % 2 == 0, deallocate: fua, fua: true, volatile_write_cache: false };
            let backing = vec![0u8; 1 << 20];
            let mut io = IoDesc::new(8);
            let op = [IoOp::Read, IoOp::Write, IoOp::Flush, IoOp::WriteZeroes, IoOp::Deallocate][op as usize];
            io.prepare(op, off, n);
            if fua {
                io.flags = IoFlags::FUA;
            }
            for (at, len) in segs {
                // Aligned lengths most of the time, so the accepting paths are exercised too.
                let len = if len % 3 == 0 { len } else { (len / g.block_size + 1) * g.block_size };
                let p = std::ptr::NonNull::new(backing.as_ptr().wrapping_add(at * 512) as *mut u8).unwrap();
                // SAFETY: the descriptor is only validated, never submitted: nothing reads or writes through p.
                let _ = unsafe { io.push_seg_raw(p, 0, len) };
            }
            prop_assert_eq!(FastCheck::new(&g).check(&g, &feat, &io), validate(&g, &feat, &io));
        }
    }
}
