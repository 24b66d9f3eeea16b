//! The block-device contract: [`BlockDev`] (what a device is) and [`IoChannel`] (how one reactor talks to it).
//!
//! # The I/O path
//! - A caller owns boxed [`IoDesc`]s, allocated once at start (a descriptor pool). It fills one and moves it into
//!   [`IoChannel::submit`], which returns at once: accepted, or rejected with the descriptor handed back
//!   ([`SubmitError::Busy`] when the channel is full: back-pressure, try again after polling;
//!   [`SubmitError::Invalid`] for a request that can never succeed).
//! - [`IoChannel::poll`] reaps finished descriptors into a caller-owned `Vec` (capacity reserved at start, so no
//!   allocation), each with its [`IoStatus`] set.
//! - Out-of-range or misaligned requests are rejected by [`validate`], never truncated.
//!
//! # Memory
//! A descriptor's data lives in arena memory, described by [`Seg`]s. Buffers the descriptor owns ([`DmaBuf`]s
//! attached with [`IoDesc::attach_buf`]) travel with it and come back at completion. Raw segments (cache pages,
//! a caller's buffer for direct I/O) are added with the `unsafe` [`IoDesc::push_seg_raw`], whose caller promises
//! the memory stays valid and untouched until completion.

use std::fmt;
use std::ptr::NonNull;
use std::time::{Duration, Instant};

use nvstack_driver::dma::DmaBuf;

use crate::BdevError;

/// A device's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Logical block size in bytes (a power of two, 512..=65536).
    pub block_size: u32,
    /// Number of logical blocks.
    pub block_count: u64,
    /// Largest single read or write in bytes.
    pub max_transfer_bytes: u32,
    /// I/O should not cross multiples of this many bytes (0: no boundary).
    pub optimal_boundary_bytes: u32,
    /// Every data segment's address and length must be a multiple of this (a power of two).
    pub buf_align_bytes: u32,
    /// Most segments in one request.
    pub max_segments: u32,
}

impl Geometry {
    /// Size of the device in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.block_count.saturating_mul(u64::from(self.block_size))
    }
}

/// What a device can do beyond read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Features {
    /// A flush does something (the device has a volatile cache or buffers writes).
    pub flush: bool,
    /// Write zeroes is supported.
    pub write_zeroes: bool,
    /// Deallocate (trim/unmap) is supported.
    pub deallocate: bool,
    /// Force-unit-access writes are honoured.
    pub fua: bool,
    /// The device has a volatile write cache (flush needed for durability).
    pub volatile_write_cache: bool,
}

/// An operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read blocks into the segments.
    Read,
    /// Write blocks from the segments.
    Write,
    /// Make every completed write durable.
    Flush,
    /// Write zeroes to a block range (no data segments).
    WriteZeroes,
    /// Deallocate (trim) a block range (no data segments). Reads of it afterwards return zeroes or old data.
    Deallocate,
}

impl IoOp {
    /// Lower-case name, as SPDK's iostat names it.
    pub fn name(self) -> &'static str {
        match self {
            IoOp::Read => "read",
            IoOp::Write => "write",
            IoOp::Flush => "flush",
            IoOp::WriteZeroes => "write_zeroes",
            IoOp::Deallocate => "unmap",
        }
    }
    /// Whether the op moves data through segments.
    pub fn has_data(self) -> bool {
        matches!(self, IoOp::Read | IoOp::Write)
    }
}

/// Per-request flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IoFlags(u8);

impl IoFlags {
    /// No flags.
    pub const NONE: IoFlags = IoFlags(0);
    /// Force unit access: the write is durable when it completes.
    pub const FUA: IoFlags = IoFlags(1);
    /// Direct I/O: bypass (and keep coherent with) any cache.
    pub const DIRECT: IoFlags = IoFlags(2);

    /// Whether all bits of `other` are set.
    #[inline]
    pub fn contains(self, other: IoFlags) -> bool {
        self.0 & other.0 == other.0
    }
    /// Union.
    #[inline]
    pub fn with(self, other: IoFlags) -> IoFlags {
        IoFlags(self.0 | other.0)
    }
}

/// One piece of arena memory a request reads into or writes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seg {
    ptr: NonNull<u8>,
    iova: u64,
    len: u32,
}

// SAFETY: a Seg is a description (address, IOVA, length); the memory it names is owned by the descriptor or by the
// caller that promised (in push_seg_raw) to keep it valid, so moving the description across threads is sound.
unsafe impl Send for Seg {}

impl Seg {
    /// Host address.
    #[inline]
    pub fn ptr(&self) -> NonNull<u8> {
        self.ptr
    }
    /// IOVA.
    #[inline]
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> u32 {
        self.len
    }
    /// Whether zero-length.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoStatus {
    /// Not finished (or never submitted).
    Pending,
    /// Done, successfully.
    Success,
    /// Failed.
    Failed(IoError),
}

/// Why a request failed. Small and `Copy`: it travels in the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The block range is outside the device.
    #[error("blocks {offset_blocks}+{num_blocks} are outside the device's {block_count} blocks")]
    OutOfRange {
        /// First block asked for.
        offset_blocks: u64,
        /// Blocks asked for.
        num_blocks: u64,
        /// The device's size in blocks.
        block_count: u64,
    },
    /// A data segment's address or length is not a multiple of the device's buffer alignment.
    #[error("segment {index} (address {addr:#x}, {len} bytes) is not aligned to {align} bytes")]
    Misaligned {
        /// Segment index.
        index: usize,
        /// Its host address.
        addr: usize,
        /// Its length.
        len: u32,
        /// The alignment required.
        align: u32,
    },
    /// The segments do not add up to the request's length, or there are too many, or the transfer is too large.
    #[error("bad length: {detail} (request {bytes} bytes)")]
    BadLength {
        /// Request bytes.
        bytes: u64,
        /// What is wrong.
        detail: &'static str,
    },
    /// The device does not support the operation or flag.
    #[error("{op:?} is not supported by this device")]
    Unsupported {
        /// The operation.
        op: IoOp,
    },
    /// The OS (file backend) returned an error.
    #[error("I/O error (errno {errno})")]
    Os {
        /// The errno value.
        errno: i32,
    },
    /// The device reported a media error on a range (NVMe unrecovered read error, pmem poison).
    #[error("media error at blocks {offset_blocks}+{num_blocks}")]
    Media {
        /// First bad block.
        offset_blocks: u64,
        /// Blocks in the bad range.
        num_blocks: u64,
    },
    /// The range is marked IOERR or POISONED (by the cache or poison path).
    #[error("bytes {offset_bytes}+{len_bytes} are marked bad after an earlier error")]
    BadRange {
        /// First byte.
        offset_bytes: u64,
        /// Length.
        len_bytes: u64,
    },
    /// The device failed with a status we name but do not model further.
    #[error("device error: status type {sct:#x} code {sc:#x}")]
    Device {
        /// Status code type.
        sct: u8,
        /// Status code.
        sc: u8,
    },
    /// The device is gone (surprise removal, all-ones registers).
    #[error("device is gone")]
    DeviceGone,
    /// The request timed out and was aborted.
    #[error("request timed out")]
    Timeout,
    /// The request was aborted (reset, shutdown).
    #[error("request aborted")]
    Aborted,
}

/// Why a submit was refused. The descriptor comes back with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitError {
    /// The channel is full: poll, then submit again.
    Busy,
    /// The request can never succeed as given.
    Invalid(IoError),
}

/// A refused submission.
pub struct Rejected {
    /// The descriptor, returned unchanged.
    pub io: Box<IoDesc>,
    /// Why.
    pub why: SubmitError,
}

impl fmt::Debug for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejected").field("why", &self.why).field("op", &self.io.op).finish()
    }
}

/// One request: allocated once (in a pool at start), reused for many I/Os.
///
/// Cache-line aligned: a descriptor that crosses cores (a striped cache's pieces, completions handed between
/// reactors) then moves exactly two lines, never three.
#[derive(Debug)]
#[repr(align(64))]
pub struct IoDesc {
    /// The operation.
    pub op: IoOp,
    /// Flags.
    pub flags: IoFlags,
    /// First block.
    pub offset_blocks: u64,
    /// Number of blocks (0 for flush).
    pub num_blocks: u64,
    /// Caller's context (request id, slot index...). Not interpreted.
    pub ctx: u64,
    /// Second caller context word.
    pub ctx2: u64,
    /// Who asked, when the caller says (0: not said; numbering in [`crate::client`]): the NBD server puts its
    /// connection number here. Stacked devices pass it down; the cache records it as the first dirtier of the bytes
    /// a write dirties (without it, [`crate::client::internal`] of the submitting reactor). Reset by
    /// [`IoDesc::prepare`].
    pub client: u16,
    /// Set by the channel at completion.
    pub status: IoStatus,
    segs: Vec<Seg>,
    bufs: Vec<DmaBuf>,
}

impl IoDesc {
    /// A descriptor able to carry `max_segs` segments without allocating.
    pub fn new(max_segs: usize) -> Box<IoDesc> {
        Box::new(IoDesc {
            op: IoOp::Read,
            flags: IoFlags::NONE,
            offset_blocks: 0,
            num_blocks: 0,
            ctx: 0,
            ctx2: 0,
            client: 0,
            status: IoStatus::Pending,
            segs: Vec::with_capacity(max_segs),
            bufs: Vec::with_capacity(max_segs),
        })
    }

    /// Set the operation and range, clearing status, flags and client. Segments and buffers are kept.
    #[inline]
    pub fn prepare(&mut self, op: IoOp, offset_blocks: u64, num_blocks: u64) {
        self.op = op;
        self.flags = IoFlags::NONE;
        self.client = 0;
        self.offset_blocks = offset_blocks;
        self.num_blocks = num_blocks;
        self.status = IoStatus::Pending;
    }

    /// Attach an owned buffer as the next segment. It comes back with the descriptor.
    ///
    /// # Errors
    /// Returns the buffer if the descriptor's segment capacity is used up (it never reallocates).
    #[inline]
    pub fn attach_buf(&mut self, buf: DmaBuf) -> Result<(), DmaBuf> {
        if self.segs.len() == self.segs.capacity() || self.bufs.len() == self.bufs.capacity() {
            return Err(buf);
        }
        let Some(ptr) = NonNull::new(buf.as_ptr()) else { return Err(buf) };
        self.segs.push(Seg { ptr, iova: buf.iova(), len: buf.len() });
        self.bufs.push(buf);
        Ok(())
    }

    /// Add a segment that the descriptor does not own (a cache page, a caller's buffer).
    ///
    /// # Safety
    /// `ptr..ptr+len` must be arena memory at `iova`, valid for reads and writes until the descriptor completes (is
    /// returned by `poll`) or is rejected, and nothing else may access it in that time except through this request.
    ///
    /// # Errors
    /// Refuses (returns `Err(())`) when the segment capacity is used up.
    #[inline]
    #[allow(clippy::result_unit_err)]
    pub unsafe fn push_seg_raw(&mut self, ptr: NonNull<u8>, iova: u64, len: u32) -> Result<(), ()> {
        if self.segs.len() == self.segs.capacity() {
            return Err(());
        }
        self.segs.push(Seg { ptr, iova, len });
        Ok(())
    }

    /// The data segments.
    #[inline]
    pub fn segs(&self) -> &[Seg] {
        &self.segs
    }

    /// Total bytes of the data segments.
    #[inline]
    pub fn seg_bytes(&self) -> u64 {
        self.segs.iter().map(|s| u64::from(s.len)).sum()
    }

    /// The owned buffers.
    pub fn bufs(&self) -> &[DmaBuf] {
        &self.bufs
    }

    /// The owned buffers, mutably (to fill or check them while the descriptor is not in flight).
    pub fn bufs_mut(&mut self) -> &mut [DmaBuf] {
        &mut self.bufs
    }

    /// Take every owned buffer out (into `out`), and forget every segment.
    pub fn take_bufs(&mut self, out: &mut Vec<DmaBuf>) {
        self.segs.clear();
        out.append(&mut self.bufs);
    }

    /// Forget the segments after the first `n` (raw ones pushed last; owned buffers' segments always stay).
    pub fn truncate_segs(&mut self, n: usize) {
        self.segs.truncate(n.max(self.bufs.len()));
    }

    /// Forget the segments, keeping owned buffers (only valid when all segments were raw ones).
    pub fn clear_raw_segs(&mut self) {
        self.segs.truncate(self.bufs.len());
    }

    /// Segment capacity.
    pub fn seg_capacity(&self) -> usize {
        self.segs.capacity()
    }

    /// Copy `len` bytes starting at byte `from` of the request's data into `dst` (for backends that copy).
    ///
    /// # Safety
    /// The descriptor must be in the channel's hands (submitted, not yet completed), so that its segments are valid
    /// and nobody else touches them.
    #[inline]
    pub unsafe fn copy_out(&self, mut dst: *mut u8) {
        for s in &self.segs {
            // SAFETY: the caller guarantees segs are valid (push_seg_raw/attach_buf contracts); dst has room for
            // seg_bytes() bytes (the caller's promise).
            unsafe {
                std::ptr::copy_nonoverlapping(s.ptr.as_ptr(), dst, s.len as usize);
                dst = dst.add(s.len as usize);
            }
        }
    }

    /// Copy into the request's data segments from `src`.
    ///
    /// # Safety
    /// As [`IoDesc::copy_out`]; `src` must hold `seg_bytes()` readable bytes.
    #[inline]
    pub unsafe fn copy_in(&self, mut src: *const u8) {
        for s in &self.segs {
            // SAFETY: as copy_out, in the other direction.
            unsafe {
                std::ptr::copy_nonoverlapping(src, s.ptr.as_ptr(), s.len as usize);
                src = src.add(s.len as usize);
            }
        }
    }
}

/// Check a request against a device's geometry and features. Every backend calls this in `submit`.
///
/// # Errors
/// The [`IoError`] that explains why the request can never succeed.
#[inline]
pub fn validate(geo: &Geometry, feat: &Features, io: &IoDesc) -> Result<(), IoError> {
    let range_ok = |io: &IoDesc| -> Result<(), IoError> {
        match io.offset_blocks.checked_add(io.num_blocks) {
            Some(end) if io.num_blocks > 0 && end <= geo.block_count => Ok(()),
            _ => Err(IoError::OutOfRange {
                offset_blocks: io.offset_blocks,
                num_blocks: io.num_blocks,
                block_count: geo.block_count,
            }),
        }
    };
    match io.op {
        IoOp::Read | IoOp::Write => {
            range_ok(io)?;
            let bytes = io.num_blocks.checked_mul(u64::from(geo.block_size)).ok_or(IoError::BadLength {
                bytes: u64::MAX,
                detail: "block count overflows",
            })?;
            if bytes > u64::from(geo.max_transfer_bytes) {
                return Err(IoError::BadLength { bytes, detail: "larger than the device's max transfer" });
            }
            if io.segs.len() > geo.max_segments as usize {
                return Err(IoError::BadLength { bytes, detail: "more segments than the device takes" });
            }
            let mask = (geo.buf_align_bytes.max(1) as usize) - 1;
            let mut total = 0u64;
            for (index, s) in io.segs.iter().enumerate() {
                let addr = s.ptr.as_ptr() as usize;
                if addr & mask != 0 || (s.len as usize) & mask != 0 {
                    return Err(IoError::Misaligned { index, addr, len: s.len, align: geo.buf_align_bytes });
                }
                total += u64::from(s.len);
            }
            if total != bytes {
                return Err(IoError::BadLength { bytes, detail: "segments do not add up to the block range" });
            }
            if io.flags.contains(IoFlags::FUA) && io.op == IoOp::Read {
                return Err(IoError::Unsupported { op: io.op });
            }
            Ok(())
        }
        IoOp::Flush => Ok(()),
        IoOp::WriteZeroes => {
            if !feat.write_zeroes {
                return Err(IoError::Unsupported { op: io.op });
            }
            range_ok(io)
        }
        IoOp::Deallocate => {
            if !feat.deallocate {
                return Err(IoError::Unsupported { op: io.op });
            }
            range_ok(io)
        }
    }
}

/// Move finished descriptors from a channel's completion list into the caller's `out`, never beyond `out`'s spare
/// capacity (so nothing allocates). Returns how many moved. Shared by the backends that complete in `submit`.
#[inline]
#[allow(clippy::vec_box)] // the caller's pooled boxes, moved in and out, never re-boxed
pub fn hand_back(done: &mut Vec<Box<IoDesc>>, out: &mut Vec<Box<IoDesc>>) -> usize {
    let n = done.len();
    if n == 0 {
        return 0;
    }
    let room = out.capacity() - out.len();
    if n <= room {
        // The common case: everything fits; one move of `n` pointers, no allocation (room was checked).
        out.append(done);
        n
    } else {
        out.extend(done.drain(..room));
        room
    }
}

/// Check a channel's requested queue depth against a backend's limit.
///
/// # Errors
/// [`BdevError::Channel`] naming the device and the accepted range.
pub fn check_queue_depth(name: &str, opts: &ChannelOpts, max: u32) -> Result<usize, BdevError> {
    if opts.queue_depth == 0 || opts.queue_depth > max {
        return Err(BdevError::Channel {
            name: name.to_owned(),
            reason: format!("queue depth {} is not in 1..={max}", opts.queue_depth),
        });
    }
    Ok(opts.queue_depth as usize)
}

/// Options for opening a channel.
#[derive(Debug, Clone, Copy)]
pub struct ChannelOpts {
    /// The reactor the channel belongs to.
    pub reactor_index: usize,
    /// Most requests in flight at once on this channel.
    pub queue_depth: u32,
}

/// One reactor's private path to a device. Never shared between threads while in use.
pub trait IoChannel: Send {
    /// Hand a request to the device. Returns at once.
    ///
    /// # Errors
    /// [`Rejected`] with the descriptor: [`SubmitError::Busy`] when full, [`SubmitError::Invalid`] when the request
    /// can never succeed.
    fn submit(&mut self, io: Box<IoDesc>) -> Result<(), Rejected>;

    /// Reap finished requests into `out` (which must have spare capacity: the channel never pushes beyond it).
    /// Returns how many were reaped.
    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize;

    /// Requests submitted and not yet reaped.
    fn outstanding(&self) -> usize;

    /// The queue depth this channel was opened with.
    fn queue_depth(&self) -> u32;
}

/// A block device. Shared by all reactors (each opens its own channel).
pub trait BlockDev: Send + Sync {
    /// The device's name (`null0`, `Malloc0`, `nvme0n1`...).
    fn name(&self) -> &str;
    /// SPDK's `product_name` for this kind ("Null disk", "Malloc disk"...).
    fn product_name(&self) -> &'static str;
    /// Shape.
    fn geometry(&self) -> Geometry;
    /// Capabilities.
    fn features(&self) -> Features;
    /// Open a channel for one reactor.
    ///
    /// # Errors
    /// [`BdevError::Channel`] (or the backend's own set-up error) when resources cannot be had.
    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError>;
    /// Allocation status at `offset_bytes`: `Some((run_bytes, allocated))`, where `run_bytes` (1..=`len_bytes`)
    /// is the length of the first run that is all data (`allocated`) or all hole (`!allocated`: reads as
    /// zeroes), looking no further than `len_bytes`. `None`: the device cannot tell (or the range is empty or
    /// past the end); callers report such bytes as allocated data. It reflects every completed write. It may make
    /// a system call (the file backend's `SEEK_DATA`/`SEEK_HOLE`): for metadata queries such as NBD
    /// `BLOCK_STATUS`, not for the data path. Default: `None`.
    fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> Option<(u64, bool)> {
        let _ = (offset_bytes, len_bytes);
        None
    }
}

/// Submit one request and poll until it completes or `timeout` passes. For control paths and tests, never for the
/// I/O path (it spins).
///
/// # Errors
/// The rejection, or [`IoError::Timeout`] (with the descriptor lost to the channel) when the deadline passes.
pub fn run_sync(ch: &mut dyn IoChannel, io: Box<IoDesc>, timeout: Duration) -> Result<Box<IoDesc>, SyncError> {
    let deadline = Instant::now() + timeout;
    let mut io = io;
    loop {
        match ch.submit(io) {
            Ok(()) => break,
            Err(Rejected { io: back, why: SubmitError::Busy }) => {
                io = back;
                let mut sink = Vec::with_capacity(ch.queue_depth() as usize);
                ch.poll(&mut sink);
                if !sink.is_empty() {
                    return Err(SyncError::Foreign);
                }
                if Instant::now() > deadline {
                    return Err(SyncError::Rejected(Rejected { io, why: SubmitError::Busy }));
                }
            }
            Err(r) => return Err(SyncError::Rejected(r)),
        }
    }
    let mut out = Vec::with_capacity(ch.queue_depth().max(1) as usize);
    loop {
        if ch.poll(&mut out) > 0 {
            if out.len() == 1 {
                return out.pop().ok_or(SyncError::Foreign);
            }
            return Err(SyncError::Foreign);
        }
        if Instant::now() > deadline {
            return Err(SyncError::Timeout);
        }
        std::hint::spin_loop();
    }
}

/// Why [`run_sync`] failed.
#[derive(Debug)]
pub enum SyncError {
    /// Submit refused it.
    Rejected(Rejected),
    /// It did not complete in time.
    Timeout,
    /// The channel had other requests in flight (run_sync needs an idle channel).
    Foreign,
}

impl fmt::Display for SyncError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SyncError::Rejected(r) => write!(f, "request rejected: {:?}", r.why),
            SyncError::Timeout => write!(f, "request timed out"),
            SyncError::Foreign => write!(f, "channel had other requests in flight"),
        }
    }
}

impl std::error::Error for SyncError {}
