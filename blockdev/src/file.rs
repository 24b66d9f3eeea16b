//! The `file` backend: a regular file or a block device through io_uring (SPDK's `bdev_uring`, "URING bdev").
//!
//! # Opening
//! `file:PATH[:SIZE]` ([`FileConfig`]). A missing file is created sparse with SIZE; an existing regular file smaller
//! than SIZE is extended (sparse), one larger is refused (nvstack never shrinks a file). A block device's size is
//! its own; SIZE, if given, must equal it. The file is opened with `O_DIRECT` where the file system takes it;
//! where it does not, it is opened buffered and one log line says so. With `O_DIRECT` the block size is at least
//! the file system's direct-I/O offset alignment and buffers must meet its memory alignment (`statx`
//! `STATX_DIOALIGN`), which [`Geometry::buf_align_bytes`] reports.
//!
//! # The channel: one ring per reactor
//! - Created with `IORING_SETUP_SINGLE_ISSUER | DEFER_TASKRUN | COOP_TASKRUN | SUBMIT_ALL` and `R_DISABLED` where
//!   the kernel takes them (falling back to `COOP_TASKRUN`, then to none). The ring is enabled by the first thread
//!   that polls the channel, and is bound to it (single issuer). A channel moved to another thread while nothing is
//!   in the kernel gets a fresh ring there; one moved with requests in the kernel cannot reap them (the kernel
//!   refuses a second issuer): a misuse of the [`IoChannel`] contract, reported in the log.
//! - The file is registered (fixed file), and the arena's regions are registered as fixed buffers (in pieces of at
//!   most 1 GiB, the kernel's limit). A one-segment request inside one registered piece uses `READ_FIXED` /
//!   `WRITE_FIXED`; others use `READV` / `WRITEV`. When registration is refused (e.g. `RLIMIT_MEMLOCK`), plain
//!   reads and writes are used and the log says so.
//! - `submit` only fills a submission entry; `poll` makes one `io_uring_enter` (submit everything queued and run
//!   the completion work) and reaps the completion queue. Nothing is allocated after the channel opens: slots,
//!   iovec arrays and the finished list are sized by the queue depth.
//! - Flush is `fdatasync` (`IORING_OP_FSYNC` with `DATASYNC`); FUA is a write with `RWF_DSYNC`; write zeroes is
//!   `fallocate(ZERO_RANGE)` (falling back to writing zeroes from a zero buffer where the file system lacks it);
//!   deallocate is `fallocate(PUNCH_HOLE | KEEP_SIZE)` (falling back to writing zeroes).
//! - A short read or write is continued from where it stopped; one that moves nothing fails with `EIO`. It is never
//!   reported as success.

// Descriptors are the caller's pooled boxes, moved through `Vec<Box<IoDesc>>` exactly as `IoChannel::poll` takes
// them; unboxing them would copy descriptors instead of pointers.
#![allow(clippy::vec_box)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};
use nvstack_driver::anon::AnonMap;
use nvstack_driver::dma::Arena;

use crate::bdev::{validate, ChannelOpts, Rejected, SubmitError};
use crate::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoError, IoFlags, IoOp, IoStatus};

/// SPDK's product name for this kind.
pub const PRODUCT_NAME: &str = "URING bdev";
/// Largest single transfer.
pub const MAX_TRANSFER_BYTES: u32 = 8 << 20;
/// Most segments in one request (each slot carries an iovec array of this size).
pub const MAX_SEGMENTS: u32 = 128;
/// Largest channel queue depth.
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// Bytes of the zero buffer used when the file system cannot zero or punch a range itself.
pub const ZERO_CHUNK_BYTES: usize = 1 << 20;
/// The kernel's limit on one registered buffer.
const FIXED_PIECE_SHIFT: u32 = 30;
/// Times a request is retried after `EAGAIN`/`EINTR` before it fails.
const MAX_RETRIES: u16 = 64;
/// How long dropping a channel waits for requests still in the kernel.
const DROP_DRAIN: Duration = Duration::from_secs(5);
/// `IORING_ENTER_GETEVENTS`: run deferred completion work and post completions.
const ENTER_GETEVENTS: u32 = 1;
/// `BLKGETSIZE64` = `_IOR(0x12, 114, u64)`.
const BLKGETSIZE64: libc::Ioctl = 0x8008_1272;

/// What to open.
#[derive(Debug, Clone)]
pub struct FileConfig {
    /// File or block device.
    pub path: PathBuf,
    /// Size to create or extend to (required when the file does not exist).
    pub size_bytes: Option<u64>,
    /// Logical block size (default 512, or the direct-I/O alignment when larger).
    pub block_size: Option<u32>,
}

/// The state every channel shares.
#[derive(Debug)]
struct Shared {
    name: String,
    path: String,
    file: File,
    direct: bool,
    arena: Arc<Arena>,
    zeros: ZeroBuf,
    /// fallocate(ZERO_RANGE) worked so far (cleared at the first EOPNOTSUPP).
    zero_range_ok: AtomicBool,
    /// fallocate(PUNCH_HOLE) worked so far.
    punch_ok: AtomicBool,
    /// One log line per device for the fixed-buffer fallback.
    fixed_warned: AtomicBool,
}

/// A page-aligned buffer of zeroes that the kernel only reads from (write-zeroes fallback). It is never written
/// after the kernel zeroed it; every channel (which could have writes from it in the kernel) holds the `Shared` that
/// owns it and drains before it goes.
#[derive(Debug)]
struct ZeroBuf {
    map: AnonMap,
}

impl ZeroBuf {
    fn new(name: &str) -> Result<ZeroBuf, BdevError> {
        let map = AnonMap::new(ZERO_CHUNK_BYTES, false)
            .map_err(|source| BdevError::RamMap { name: name.to_owned(), size_bytes: ZERO_CHUNK_BYTES as u64, source })?;
        Ok(ZeroBuf { map })
    }
}

/// A file or block device served through io_uring.
#[derive(Debug)]
pub struct FileBdev {
    shared: Arc<Shared>,
    geo: Geometry,
    feat: Features,
}

/// Direct-I/O alignment of an open file (`statx` `STATX_DIOALIGN`): `Some((offset, memory))`, both 0 when the file
/// system says it does no direct I/O on this file; `None` when the kernel does not report it (before Linux 6.1).
fn dio_align(file: &File) -> Option<(u32, u32)> {
    // SAFETY: statx is plain data; all-zeroes is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; the empty path with AT_EMPTY_PATH names the fd itself; stx is a valid out-pointer.
    let rc = unsafe {
        libc::statx(file.as_raw_fd(), c"".as_ptr(), libc::AT_EMPTY_PATH, libc::STATX_DIOALIGN, &raw mut stx)
    };
    if rc != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return None;
    }
    Some((stx.stx_dio_offset_align, stx.stx_dio_mem_align))
}

fn open_file(name: &str, cfg: &FileConfig) -> Result<(File, bool), BdevError> {
    let path = cfg.path.display().to_string();
    let open = |direct: bool, create: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 })
            .open(&cfg.path)
    };
    let exists = cfg.path.exists();
    if !exists && cfg.size_bytes.is_none() {
        return Err(BdevError::FileSize {
            name: name.to_owned(),
            path,
            reason: "does not exist: give a size to create it (file:PATH:SIZE, e.g. file:/data/disk.img:1G)".into(),
        });
    }
    match open(true, !exists) {
        Ok(f) => {
            // tmpfs (Linux 6.6+) takes O_DIRECT but serves it from the page cache, more slowly than buffered I/O
            // (io_uring cannot complete it inline). A file system that does no direct I/O on a file says so through
            // statx (zero alignment); tmpfs does not report at all, so it is recognised by its magic number.
            let regular = f.metadata().is_ok_and(|m| m.file_type().is_file());
            if regular && (dio_align(&f) == Some((0, 0)) || is_tmpfs(&f)) {
                tracing::info!(
                    bdev = name, path,
                    "file system does no real direct I/O on this file (tmpfs?): using buffered I/O (page cache)"
                );
                drop(f);
                return open(false, false).map(|f| (f, false)).map_err(|source| BdevError::FileOpen {
                    name: name.to_owned(),
                    path,
                    source,
                });
            }
            Ok((f, true))
        }
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::info!(bdev = name, path, "file system does not take O_DIRECT: using buffered I/O (page cache)");
            open(false, !cfg.path.exists()).map(|f| (f, false)).map_err(|source| BdevError::FileOpen {
                name: name.to_owned(),
                path,
                source,
            })
        }
        Err(source) => Err(BdevError::FileOpen { name: name.to_owned(), path, source }),
    }
}

/// Whether the file lives on tmpfs (or ramfs): memory, where O_DIRECT buys nothing.
fn is_tmpfs(file: &File) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    // SAFETY: statfs is plain data; all-zeroes is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fd is open; st is a valid out-pointer.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &raw mut st) } != 0 {
        return false;
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets
    let magic = st.f_type as i64;
    magic == TMPFS_MAGIC || magic == RAMFS_MAGIC
}

/// Current size and logical block size (block devices) of the open file.
fn probe_size(name: &str, path: &str, file: &File) -> Result<(u64, bool, u32), BdevError> {
    let io_err = |step, source| BdevError::FileIo { name: name.to_owned(), path: path.to_owned(), step, source };
    let meta = file.metadata().map_err(|e| io_err("fstat", e))?;
    if meta.file_type().is_block_device() {
        let mut bytes: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &raw mut bytes) } != 0 {
            return Err(io_err("ioctl(BLKGETSIZE64)", std::io::Error::last_os_error()));
        }
        let mut lbs: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::BLKSSZGET, &raw mut lbs) } != 0 {
            return Err(io_err("ioctl(BLKSSZGET)", std::io::Error::last_os_error()));
        }
        return Ok((bytes, true, u32::try_from(lbs).unwrap_or(512)));
    }
    if !meta.file_type().is_file() {
        return Err(BdevError::FileSize {
            name: name.to_owned(),
            path: path.to_owned(),
            reason: "is neither a regular file nor a block device".into(),
        });
    }
    Ok((meta.len(), false, 0))
}

impl FileBdev {
    /// Open (creating or extending as the module doc says) the file, probe O_DIRECT and alignment.
    ///
    /// # Errors
    /// [`BdevError::FileOpen`], [`BdevError::FileIo`] for OS failures; [`BdevError::FileSize`] for a missing file
    /// with no size, a file larger than the size asked, or a block device of another size; [`BdevError::BlockSize`]
    /// / [`BdevError::Size`] for a bad geometry.
    pub fn open(name: &str, cfg: &FileConfig, arena: &Arc<Arena>) -> Result<Arc<FileBdev>, BdevError> {
        if let Some(bs) = cfg.block_size {
            crate::spec::check_block_size(name, bs)?;
        }
        let path = cfg.path.display().to_string();
        let (file, direct) = open_file(name, cfg)?;
        let (cur_bytes, is_blk, blk_lbs) = probe_size(name, &path, &file)?;
        let (dio_off, dio_mem) = if direct { dio_align(&file).unwrap_or((0, 0)) } else { (0, 0) };
        let min_bs = if direct { dio_off.max(blk_lbs).max(512) } else { blk_lbs.max(512) };
        let block_size = cfg.block_size.unwrap_or(min_bs.max(crate::spec::DEFAULT_BLOCK_SIZE));
        if block_size < min_bs {
            return Err(BdevError::BlockSize {
                name: name.to_owned(),
                block_size,
                reason: format!("{path} needs blocks of at least {min_bs} bytes (direct-I/O alignment)"),
            });
        }
        let size_bytes = match cfg.size_bytes {
            None => cur_bytes,
            Some(want) if is_blk && want != cur_bytes => {
                return Err(BdevError::FileSize {
                    name: name.to_owned(),
                    path,
                    reason: format!("block device holds {cur_bytes} bytes, not {want}: give no size"),
                });
            }
            Some(want) if want < cur_bytes => {
                return Err(BdevError::FileSize {
                    name: name.to_owned(),
                    path,
                    reason: format!(
                        "holds {cur_bytes} bytes, more than the {want} asked: refusing to shrink it \
                         (give its size, or none)"
                    ),
                });
            }
            Some(want) => want,
        };
        let block_count = crate::spec::block_count(name, size_bytes, block_size)?;
        if size_bytes > cur_bytes {
            file.set_len(size_bytes).map_err(|source| BdevError::FileIo {
                name: name.to_owned(),
                path: path.clone(),
                step: "ftruncate (extend)",
                source,
            })?;
            tracing::info!(bdev = name, path, from = cur_bytes, to = size_bytes, "file extended (sparse)");
        }
        let buf_align = if direct { dio_mem.max(1).max(if dio_off == 0 { 512 } else { 1 }) } else { 1 };
        let geo = Geometry {
            block_size,
            block_count,
            max_transfer_bytes: MAX_TRANSFER_BYTES.max(block_size),
            optimal_boundary_bytes: 0,
            buf_align_bytes: buf_align,
            max_segments: MAX_SEGMENTS,
        };
        let feat = Features { flush: true, write_zeroes: true, deallocate: true, fua: true, volatile_write_cache: true };
        tracing::info!(bdev = name, path, size_bytes, block_size, direct, buf_align, "file bdev opened");
        let shared = Arc::new(Shared {
            name: name.to_owned(),
            path,
            file,
            direct,
            arena: Arc::clone(arena),
            zeros: ZeroBuf::new(name)?,
            zero_range_ok: AtomicBool::new(true),
            punch_ok: AtomicBool::new(true),
            fixed_warned: AtomicBool::new(false),
        });
        Ok(Arc::new(FileBdev { shared, geo, feat }))
    }

    /// Whether the file is opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.shared.direct
    }

    /// The path.
    pub fn path(&self) -> &str {
        &self.shared.path
    }
}

impl BlockDev for FileBdev {
    fn name(&self) -> &str {
        &self.shared.name
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
    /// `lseek(SEEK_DATA)` then `lseek(SEEK_HOLE)` on the open file (explicit-offset I/O never uses the file
    /// position, so moving it is harmless). `ENXIO` from `SEEK_DATA` means no data at or after the offset: a hole
    /// to the end. Any other failure (a file system or block device without hole support): `None`.
    fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> Option<(u64, bool)> {
        let size = self.geo.size_bytes();
        if len_bytes == 0 || offset_bytes >= size {
            return None;
        }
        let len = len_bytes.min(size - offset_bytes);
        let off = i64::try_from(offset_bytes).ok()?;
        let fd = self.shared.file.as_raw_fd();
        // SAFETY: lseek on the bdev's open fd with a valid whence; it touches no memory.
        let data = unsafe { libc::lseek(fd, off, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Some((len, false));
            }
            tracing::debug!(bdev = %self.shared.name, error = %e, "SEEK_DATA failed; allocation unknown");
            return None;
        }
        let data = u64::try_from(data).ok()?;
        if data > offset_bytes {
            return Some(((data - offset_bytes).min(len), false));
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, off, libc::SEEK_HOLE) };
        let hole = u64::try_from(hole).ok()?;
        if hole <= offset_bytes {
            return None; // The file changed between the two calls: say nothing.
        }
        Some(((hole - offset_bytes).min(len), true))
    }

    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        let depth = crate::bdev::check_queue_depth(&self.shared.name, &opts, MAX_QUEUE_DEPTH)?;
        let ring = Ring::new(&self.shared, opts.queue_depth)?;
        let slots = (0..depth)
            .map(|_| Slot {
                io: None,
                iov: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; MAX_SEGMENTS as usize]
                    .into_boxed_slice(),
                kind: Kind::Rw,
                pos: 0,
                total: 0,
                done: 0,
                retries: 0,
            })
            .collect();
        let mut free: Vec<u32> = Vec::with_capacity(depth);
        free.extend((0..opts.queue_depth).rev());
        Ok(Box::new(FileChannel {
            ring,
            shared: Arc::clone(&self.shared),
            geo: self.geo,
            feat: self.feat,
            depth,
            slots,
            free,
            done: Vec::with_capacity(depth),
            in_flight: 0,
            in_kernel: 0,
        }))
    }
}

/// The io_uring instance of one channel and what was registered with it.
struct Ring {
    ring: IoUring,
    /// SINGLE_ISSUER was taken: the ring is bound to the thread `bound` (0 = not yet enabled).
    single_issuer: bool,
    bound: usize,
    /// The registered file, or the raw fd when registration failed.
    fixed_file: bool,
    raw_fd: i32,
    /// Registered arena: host address and length (pieces of 1 GiB from `base`); None when not registered.
    fixed_base: usize,
    fixed_len: usize,
}

/// This thread's identity, cheaply: the address of a thread-local.
#[inline]
fn thread_token() -> usize {
    thread_local!(static TOKEN: u8 = const { 0 });
    TOKEN.with(|t| std::ptr::from_ref(t) as usize)
}

impl Ring {
    fn new(shared: &Shared, depth: u32) -> Result<Ring, BdevError> {
        let entries = depth.next_power_of_two();
        type Attempt = (&'static str, fn(&mut io_uring::Builder));
        let attempts: [Attempt; 3] = [
            ("single issuer, deferred task run", |b| {
                b.setup_single_issuer().setup_defer_taskrun().setup_coop_taskrun().setup_submit_all().setup_r_disabled();
            }),
            ("cooperative task run", |b| {
                b.setup_coop_taskrun().setup_submit_all();
            }),
            ("plain", |_| {}),
        ];
        let mut last = None;
        let mut built = None;
        for (what, set) in attempts {
            let mut b = IoUring::builder();
            b.setup_clamp();
            set(&mut b);
            match b.build(entries) {
                Ok(r) => {
                    tracing::debug!(bdev = %shared.name, entries, mode = what, "io_uring ring created");
                    built = Some(r);
                    break;
                }
                Err(e) => {
                    tracing::debug!(bdev = %shared.name, mode = what, error = %e, "io_uring set-up refused, trying fewer flags");
                    last = Some(e);
                }
            }
        }
        let Some(ring) = built else {
            return Err(BdevError::UringSetup {
                name: shared.name.clone(),
                entries,
                source: last.unwrap_or_else(|| std::io::Error::other("no attempt made")),
            });
        };
        let single_issuer = ring.params().is_setup_single_issuer();
        let raw_fd = shared.file.as_raw_fd();
        let fixed_file = match ring.submitter().register_files(&[raw_fd]) {
            Ok(()) => true,
            Err(e) => {
                tracing::debug!(bdev = %shared.name, error = %e, "io_uring: registering the file failed; using its fd");
                false
            }
        };
        let mut r = Ring { ring, single_issuer, bound: 0, fixed_file, raw_fd, fixed_base: 0, fixed_len: 0 };
        r.register_arena(shared);
        Ok(r)
    }

    fn register_arena(&mut self, shared: &Shared) {
        let Some(region) = shared.arena.regions().next() else { return };
        let Ok(len) = usize::try_from(region.len) else { return };
        let piece = 1usize << FIXED_PIECE_SHIFT;
        let iovs: Vec<libc::iovec> = (0..len.div_ceil(piece))
            .map(|k| libc::iovec {
                iov_base: (region.host_addr + k * piece) as *mut libc::c_void,
                iov_len: piece.min(len - k * piece),
            })
            .collect();
        // SAFETY: every iovec lies inside the arena's mapping, which stays mapped while this ring lives (Shared holds
        // an Arc<Arena>, and the channel drops its ring before its Shared).
        match unsafe { self.ring.submitter().register_buffers(&iovs) } {
            Ok(()) => {
                self.fixed_base = region.host_addr;
                self.fixed_len = len;
            }
            Err(e) => {
                if !shared.fixed_warned.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        bdev = %shared.name, error = %e, arena_bytes = len,
                        "io_uring: registering the arena as fixed buffers failed (RLIMIT_MEMLOCK?); using plain reads and writes"
                    );
                }
            }
        }
    }

    /// The registered-buffer index for `ptr..ptr+len`, when it lies inside one registered piece.
    #[inline]
    fn fixed_index(&self, ptr: usize, len: usize) -> Option<u16> {
        let off = ptr.wrapping_sub(self.fixed_base);
        let end = off.checked_add(len)?;
        if self.fixed_len == 0 || off >= self.fixed_len || end > self.fixed_len || len == 0 {
            return None;
        }
        let k = off >> FIXED_PIECE_SHIFT;
        if (end - 1) >> FIXED_PIECE_SHIFT != k {
            return None;
        }
        u16::try_from(k).ok()
    }
}

/// What a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Rw,
    Fsync,
    ZeroRange,
    Punch,
    /// Writing zeroes from the zero buffer, piece by piece.
    ZeroWrite,
}

/// One in-flight request.
struct Slot {
    io: Option<Box<IoDesc>>,
    /// Scratch iovecs for READV/WRITEV (rebuilt for a continuation), MAX_SEGMENTS long.
    iov: Box<[libc::iovec]>,
    kind: Kind,
    /// File offset of the request's first byte.
    pos: u64,
    /// Bytes the request moves (or zeroes).
    total: u64,
    /// Bytes done so far (short transfers continue from here).
    done: u64,
    retries: u16,
}

struct FileChannel {
    // Field order matters: the ring (with its registrations) is dropped before `shared` (arena, zero buffer).
    ring: Ring,
    shared: Arc<Shared>,
    geo: Geometry,
    feat: Features,
    depth: usize,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    /// Finished descriptors not yet handed to the caller (its vector was full). Capacity `depth`.
    #[allow(clippy::vec_box)] // the caller's pooled boxes, moved through
    done: Vec<Box<IoDesc>>,
    /// Slots in use.
    in_flight: usize,
    /// Submission entries the kernel has taken and not yet completed.
    in_kernel: usize,
}

// SAFETY: the raw pointers inside (iovecs, segments, the ring's mappings) point at memory this channel owns or
// that the submitter promised valid until completion; the channel is used by one thread at a time (IoChannel
// contract) and rebinds its ring when it moves (see the module doc).
unsafe impl Send for FileChannel {}

impl FileChannel {
    /// Build and queue the next submission entry for slot `idx`. The SQ always has room: each slot has at most one
    /// entry queued or in the kernel, and the SQ has at least `depth` entries.
    fn queue(&mut self, idx: usize) {
        let entry = if self.ring.fixed_file {
            self.build(idx, types::Fixed(0))
        } else {
            let fd = types::Fd(self.ring.raw_fd);
            self.build(idx, fd)
        };
        let Some(entry) = entry else { return };
        // SAFETY: the entry's buffers (segments: the submitter's promise until completion; iovecs: this slot's
        // array, untouched until this entry completes; the zero buffer: owned by Shared, which outlives the ring)
        // stay valid until its completion is reaped.
        let pushed = unsafe { self.ring.ring.submission().push(&entry) };
        debug_assert!(pushed.is_ok(), "SQ sized to the queue depth cannot be full");
    }
}

/// Build the entry for a slot with either fd kind (io-uring's fd trait is sealed, so this is a macro).
macro_rules! build_entry_for {
    ($fdty:ty) => {
        impl BuildEntry<$fdty> for FileChannel {
            fn build(&mut self, idx: usize, fd: $fdty) -> Option<squeue::Entry> {
                build_body!(self, idx, fd)
            }
        }
    };
}

trait BuildEntry<F> {
    fn build(&mut self, idx: usize, fd: F) -> Option<squeue::Entry>;
}

macro_rules! build_body {
    ($self:ident, $idx:ident, $fd:ident) => {{
        let fixed_ring = &$self.ring;
        let zeros = &$self.shared.zeros;
        let slot = &mut $self.slots[$idx];
        let io = slot.io.as_ref()?;
        let off = slot.pos + slot.done;
        let left = slot.total - slot.done;
        let entry: squeue::Entry = match slot.kind {
            Kind::Rw => {
                let write = io.op == IoOp::Write;
                let rw_flags = if write && io.flags.contains(IoFlags::FUA) { libc::RWF_DSYNC } else { 0 };
                let segs = io.segs();
                if segs.len() == 1 {
                    // `left` <= max transfer (8 MiB), fits u32.
                    let ptr = segs[0].ptr().as_ptr() as usize + slot.done as usize;
                    let len = left as u32;
                    match (fixed_ring.fixed_index(ptr, len as usize), write) {
                        (Some(k), false) => {
                            opcode::ReadFixed::new($fd, ptr as *mut u8, len, k).offset(off).rw_flags(rw_flags).build()
                        }
                        (Some(k), true) => {
                            opcode::WriteFixed::new($fd, ptr as *const u8, len, k).offset(off).rw_flags(rw_flags).build()
                        }
                        (None, false) => opcode::Read::new($fd, ptr as *mut u8, len).offset(off).rw_flags(rw_flags).build(),
                        (None, true) => opcode::Write::new($fd, ptr as *const u8, len).offset(off).rw_flags(rw_flags).build(),
                    }
                } else {
                    // Rebuild the iovec list from the segments, skipping what is done.
                    let mut skip = slot.done as usize;
                    let mut n = 0;
                    for s in segs {
                        let l = s.len() as usize;
                        if skip >= l {
                            skip -= l;
                            continue;
                        }
                        // SAFETY: skip < l, so the pointer stays inside the segment.
                        let base = unsafe { s.ptr().as_ptr().add(skip) };
                        slot.iov[n] = libc::iovec { iov_base: base.cast(), iov_len: l - skip };
                        skip = 0;
                        n += 1;
                    }
                    let iov = slot.iov.as_ptr();
                    if write {
                        opcode::Writev::new($fd, iov, n as u32).offset(off).rw_flags(rw_flags).build()
                    } else {
                        opcode::Readv::new($fd, iov, n as u32).offset(off).rw_flags(rw_flags).build()
                    }
                }
            }
            Kind::Fsync => opcode::Fsync::new($fd).flags(types::FsyncFlags::DATASYNC).build(),
            Kind::ZeroRange => opcode::Fallocate::new($fd, left).offset(off).mode(libc::FALLOC_FL_ZERO_RANGE).build(),
            Kind::Punch => opcode::Fallocate::new($fd, left)
                .offset(off)
                .mode(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
                .build(),
            Kind::ZeroWrite => {
                let len = left.min(zeros.map.len() as u64) as u32;
                opcode::Write::new($fd, zeros.map.as_ptr().as_ptr(), len).offset(off).build()
            }
        };
        Some(entry.user_data($idx as u64))
    }};
}

build_entry_for!(types::Fixed);
build_entry_for!(types::Fd);

impl FileChannel {

    /// Finish slot `idx` with `status`: hand the descriptor over and free the slot.
    #[inline]
    fn complete(&mut self, idx: usize, status: IoStatus, out: &mut Vec<Box<IoDesc>>) -> usize {
        let Some(mut io) = self.slots[idx].io.take() else { return 0 };
        io.status = status;
        self.in_flight -= 1;
        self.free.push(idx as u32);
        if out.len() < out.capacity() {
            out.push(io);
            1
        } else {
            self.done.push(io);
            0
        }
    }

    /// Handle one completion. Returns how many descriptors went into `out`.
    fn on_cqe(&mut self, idx: usize, res: i32, out: &mut Vec<Box<IoDesc>>) -> usize {
        let Some(slot) = self.slots.get_mut(idx) else {
            tracing::error!(bdev = %self.shared.name, user_data = idx, "io_uring completion for an unknown slot");
            return 0;
        };
        if slot.io.is_none() {
            tracing::error!(bdev = %self.shared.name, slot = idx, "io_uring completion for an idle slot");
            return 0;
        }
        if res < 0 {
            let errno = -res;
            if (errno == libc::EAGAIN || errno == libc::EINTR) && slot.retries < MAX_RETRIES {
                slot.retries += 1;
                self.queue(idx);
                return 0;
            }
            let unsupported = errno == libc::EOPNOTSUPP || errno == libc::EINVAL || errno == libc::ENOTTY;
            if unsupported && matches!(slot.kind, Kind::ZeroRange | Kind::Punch) {
                let flag = if slot.kind == Kind::ZeroRange { &self.shared.zero_range_ok } else { &self.shared.punch_ok };
                if flag.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        bdev = %self.shared.name, errno, op = ?slot.kind,
                        "fallocate mode not supported here: zeroing by writing zeroes instead"
                    );
                }
                slot.kind = Kind::ZeroWrite;
                slot.done = 0;
                self.queue(idx);
                return 0;
            }
            return self.complete(idx, IoStatus::Failed(IoError::Os { errno }), out);
        }
        match slot.kind {
            Kind::Rw | Kind::ZeroWrite => {
                let moved = res as u64;
                if moved == 0 && slot.done < slot.total {
                    // Nothing moved (the file shrank under us, or end of device): never report a partial success.
                    return self.complete(idx, IoStatus::Failed(IoError::Os { errno: libc::EIO }), out);
                }
                slot.done = (slot.done + moved).min(slot.total);
                if slot.done < slot.total {
                    self.queue(idx);
                    return 0;
                }
                self.complete(idx, IoStatus::Success, out)
            }
            Kind::Fsync | Kind::ZeroRange | Kind::Punch => self.complete(idx, IoStatus::Success, out),
        }
    }

    /// Make sure the ring may be entered from this thread (single issuer), rebuilding it if the channel moved.
    /// Returns false when it cannot be used from here.
    #[cold]
    fn bind(&mut self, token: usize) -> bool {
        if self.ring.bound == 0 {
            if let Err(e) = self.ring.ring.submitter().register_enable_rings() {
                tracing::error!(bdev = %self.shared.name, error = %e, "io_uring: enabling the ring failed");
                return false;
            }
            self.ring.bound = token;
            return true;
        }
        if self.in_kernel > 0 {
            tracing::error!(
                bdev = %self.shared.name, in_kernel = self.in_kernel,
                "file channel used from a second thread with requests in the kernel: they cannot be reaped here"
            );
            return false;
        }
        // Moved while idle in the kernel: a fresh ring for this thread; requeue what was waiting in the old SQ.
        match Ring::new(&self.shared, self.depth as u32) {
            Ok(r) => {
                self.ring = r;
                if let Err(e) = self.ring.ring.submitter().register_enable_rings() {
                    tracing::error!(bdev = %self.shared.name, error = %e, "io_uring: enabling the ring failed");
                    return false;
                }
                self.ring.bound = token;
                for idx in 0..self.slots.len() {
                    if self.slots[idx].io.is_some() {
                        self.queue(idx);
                    }
                }
                tracing::debug!(bdev = %self.shared.name, "file channel moved threads: new io_uring ring");
                true
            }
            Err(e) => {
                tracing::error!(bdev = %self.shared.name, error = %e, "io_uring: new ring after a thread move failed");
                false
            }
        }
    }

    /// One kernel call: submit what is queued and run completion work. Returns false if the ring is unusable.
    #[inline]
    fn enter(&mut self) -> bool {
        if self.ring.single_issuer {
            let t = thread_token();
            if t != self.ring.bound && !self.bind(t) {
                return false;
            }
        }
        let queued = self.ring.ring.submission().len();
        // SAFETY: plain io_uring_enter on our ring: no argument structure is passed.
        match unsafe { self.ring.ring.submitter().enter::<libc::sigset_t>(queued as u32, 0, ENTER_GETEVENTS, None) } {
            Ok(n) => {
                self.in_kernel += n;
                true
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(0);
                if errno != libc::EAGAIN && errno != libc::EBUSY && errno != libc::EINTR {
                    tracing::error!(bdev = %self.shared.name, error = %e, "io_uring_enter failed");
                }
                // The queued entries stay; the next poll tries again. Completions may still be reaped.
                true
            }
        }
    }

    fn reap(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        let mut n = 0;
        loop {
            // Take one completion at a time: on_cqe may queue a continuation (which needs &mut self).
            let next = self.ring.ring.completion().next();
            let Some(cqe) = next else { break };
            self.in_kernel = self.in_kernel.saturating_sub(1);
            n += self.on_cqe(cqe.user_data() as usize, cqe.result(), out);
        }
        n
    }
}

impl IoChannel for FileChannel {
    fn submit(&mut self, io: Box<IoDesc>) -> Result<(), Rejected> {
        if self.in_flight + self.done.len() >= self.depth {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        if let Err(e) = validate(&self.geo, &self.feat, &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        let Some(idx) = self.free.pop() else { return Err(Rejected { io, why: SubmitError::Busy }) };
        let idx = idx as usize;
        let bs = u64::from(self.geo.block_size);
        // validate() proved offset+num_blocks <= block_count, so these products fit the device size (a u64).
        let (pos, total) = (io.offset_blocks * bs, io.num_blocks * bs);
        let kind = match io.op {
            IoOp::Read | IoOp::Write => Kind::Rw,
            IoOp::Flush => Kind::Fsync,
            IoOp::WriteZeroes if self.shared.zero_range_ok.load(Ordering::Relaxed) => Kind::ZeroRange,
            IoOp::Deallocate if self.shared.punch_ok.load(Ordering::Relaxed) => Kind::Punch,
            IoOp::WriteZeroes | IoOp::Deallocate => Kind::ZeroWrite,
        };
        let slot = &mut self.slots[idx];
        slot.kind = kind;
        slot.pos = pos;
        slot.total = total;
        slot.done = 0;
        slot.retries = 0;
        slot.io = Some(io);
        self.in_flight += 1;
        self.queue(idx);
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        let n = crate::bdev::hand_back(&mut self.done, out);
        if self.in_flight == 0 || !self.enter() {
            return n;
        }
        let reaped = self.reap(out);
        if reaped == 0 && n == 0 && self.in_kernel > 0 {
            // Everything is in the kernel and nothing finished. Requests the kernel could not complete inline run
            // on io-wq workers, which inherit this reactor's CPU: spinning would starve them. Yield the core once
            // (no sleep, no deadline needed: sched_yield returns at once when nothing else is runnable).
            // SAFETY: sched_yield has no preconditions.
            unsafe { libc::sched_yield() };
        }
        n + reaped
    }

    fn outstanding(&self) -> usize {
        self.in_flight + self.done.len()
    }

    fn queue_depth(&self) -> u32 {
        // Fits: checked against MAX_QUEUE_DEPTH at open.
        self.depth as u32
    }
}

impl Drop for FileChannel {
    fn drop(&mut self) {
        // Entries only queued in the SQ die with the ring; only those the kernel took can still touch memory.
        if self.in_kernel == 0 {
            return;
        }
        // Requests in the kernel may still write into their buffers: wait for them (bounded).
        let deadline = Instant::now() + DROP_DRAIN;
        let mut sink: Vec<Box<IoDesc>> = Vec::with_capacity(self.depth);
        while self.in_kernel > 0 && Instant::now() < deadline {
            sink.clear();
            self.done.clear();
            if !self.enter() {
                break;
            }
            self.reap(&mut sink);
            std::thread::sleep(Duration::from_micros(50));
        }
        if self.in_kernel > 0 {
            tracing::warn!(bdev = %self.shared.name, in_kernel = self.in_kernel, "file channel dropped with requests in the kernel");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bdev::{run_sync, SyncError};
    use nvstack_driver::dma::{ArenaConfig, BufPool};

    fn arena() -> Arc<Arena> {
        Arena::new(ArenaConfig { size_bytes: 8 << 20, ..Default::default() }).unwrap()
    }

    struct Dir(PathBuf);
    impl Dir {
        fn new(parent: &str, tag: &str) -> Dir {
            let p = PathBuf::from(parent).join(format!("nvstack-file-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&p).unwrap();
            Dir(p)
        }
        fn file(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn cfg(path: PathBuf, size: Option<u64>, bs: Option<u32>) -> FileConfig {
        FileConfig { path, size_bytes: size, block_size: bs }
    }

    #[test]
    fn block_status_reports_holes_and_data_of_a_sparse_file() -> Result<(), Box<dyn std::error::Error>> {
        let d = Dir::new("/var/tmp", "bstat");
        let a = arena();
        let p = d.file("s.img");
        let b = FileBdev::open("t", &cfg(p.clone(), Some(8 << 20), None), &a)?;
        // A fresh sparse file is one hole; a range past the end or of length 0 is unknown.
        assert_eq!(b.block_status(0, 8 << 20), Some((8 << 20, false)));
        assert_eq!(b.block_status(4096, 1 << 20), Some((1 << 20, false)));
        assert_eq!(b.block_status(8 << 20, 4096), None);
        assert_eq!(b.block_status(0, 0), None);
        // Data at 1 MiB..1 MiB+64 KiB and in the last 4 KiB, written behind the bdev's back (same inode).
        {
            use std::os::unix::fs::FileExt;
            let f = std::fs::OpenOptions::new().write(true).open(&p)?;
            f.write_all_at(&[0xabu8; 64 << 10], 1 << 20)?;
            f.write_all_at(&[1u8; 4096], (8 << 20) - 4096)?;
            f.sync_all()?;
        }
        assert_eq!(b.block_status(0, 8 << 20), Some((1 << 20, false)));
        let (run, alloc) = b.block_status(1 << 20, 8 << 20).ok_or("no status for the data run")?;
        assert!(alloc, "written range is data");
        // File systems may allocate beyond what was written (preallocation), but never less.
        assert!(((64 << 10)..(7 << 20) - 4096).contains(&run), "data run {run}");
        // After the data run: a hole again.
        assert_eq!(b.block_status((1 << 20) + run, 4096), Some((4096, false)));
        // Runs are clipped to the asked length and to the device.
        assert_eq!(b.block_status(1 << 20, 4096), Some((4096, true)));
        assert_eq!(b.block_status((8 << 20) - 4096, 1 << 30), Some((4096, true)));
        // The middle of the big hole after the data.
        assert_eq!(b.block_status(4 << 20, 4096), Some((4096, false)));
        Ok(())
    }

    #[test]
    fn sizing_rules() {
        let d = Dir::new("/var/tmp", "size");
        let a = arena();
        let p = d.file("a.img");
        let e = FileBdev::open("t", &cfg(p.clone(), None, None), &a).unwrap_err();
        assert!(matches!(e, BdevError::FileSize { .. }), "{e}");
        assert!(e.to_string().contains("give a size"), "{e}");
        let b = FileBdev::open("t", &cfg(p.clone(), Some(1 << 20), None), &a).unwrap();
        assert_eq!(b.geometry().size_bytes(), 1 << 20);
        drop(b);
        // Existing, no size: its own size. Larger size: extended, sparse. Smaller: refused.
        let b = FileBdev::open("t", &cfg(p.clone(), None, None), &a).unwrap();
        assert_eq!(b.geometry().size_bytes(), 1 << 20);
        drop(b);
        let b = FileBdev::open("t", &cfg(p.clone(), Some(4 << 20), None), &a).unwrap();
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 << 20);
        drop(b);
        let e = FileBdev::open("t", &cfg(p.clone(), Some(2 << 20), None), &a).unwrap_err();
        assert!(matches!(e, BdevError::FileSize { .. }) && e.to_string().contains("shrink"), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4 << 20);
        let e = FileBdev::open("t", &cfg(d.file("b.img"), Some(1000), Some(512)), &a).unwrap_err();
        assert!(matches!(e, BdevError::Size { .. }), "{e}");
        let e = FileBdev::open("t", &cfg(d.file("c.img"), Some(1 << 20), Some(3000)), &a).unwrap_err();
        assert!(matches!(e, BdevError::BlockSize { .. }), "{e}");
        let e = FileBdev::open("t", &cfg(PathBuf::from("/proc/nonexistent/dir/x"), Some(1 << 20), None), &a).unwrap_err();
        assert!(matches!(e, BdevError::FileOpen { .. }), "{e}");
    }

    #[test]
    fn ring_uses_fast_paths() {
        let d = Dir::new("/var/tmp", "ring");
        let a = arena();
        let b = FileBdev::open("t", &cfg(d.file("a.img"), Some(1 << 20), None), &a).unwrap();
        let r = Ring::new(&b.shared, 32).unwrap();
        // This kernel (6.x) takes every flag; registration works as root or with enough RLIMIT_MEMLOCK.
        eprintln!(
            "direct={} buf_align={} single_issuer={} fixed_file={} fixed_bytes={}",
            b.is_direct(),
            b.geometry().buf_align_bytes,
            r.single_issuer,
            r.fixed_file,
            r.fixed_len
        );
        assert!(r.fixed_file);
        let region = a.regions().next().unwrap();
        if r.fixed_len > 0 {
            assert_eq!(r.fixed_index(region.host_addr, 4096), Some(0));
            assert_eq!(r.fixed_index(region.host_addr + region.len as usize - 4096, 4096), Some(0));
            assert_eq!(r.fixed_index(region.host_addr + region.len as usize - 4096, 8192), None);
            assert_eq!(r.fixed_index(region.host_addr.wrapping_sub(4096), 4096), None);
        }
    }

    fn one_read(ch: &mut dyn IoChannel, pool: &mut BufPool, off: u64, n: u64) -> Result<IoStatus, String> {
        let mut io = IoDesc::new(1);
        let buf = pool.get().ok_or("pool")?;
        io.attach_buf(buf).map_err(|_| "attach")?;
        io.prepare(IoOp::Read, off, n);
        // A buffer of 8 KiB serves 1 or 2 blocks of 4 KiB: shrink the request's view by using a raw segment.
        if n == 1 {
            let mut bufs = Vec::new();
            io.take_bufs(&mut bufs);
            let b = bufs.pop().ok_or("buf")?;
            // SAFETY: b is our pool buffer (arena memory), kept alive below until the request completes.
            unsafe { io.push_seg_raw(std::ptr::NonNull::new(b.as_ptr()).ok_or("null")?, b.iova(), 4096) }
                .map_err(|()| "seg")?;
            let r = run_sync(ch, io, Duration::from_secs(5)).map_err(|e| e.to_string())?;
            pool.put(b).map_err(|_| "put")?;
            return Ok(r.status);
        }
        let mut r = run_sync(ch, io, Duration::from_secs(5)).map_err(|e: SyncError| e.to_string())?;
        let mut bufs = Vec::new();
        r.take_bufs(&mut bufs);
        for b in bufs {
            pool.put(b).map_err(|_| "put")?;
        }
        Ok(r.status)
    }

    #[test]
    fn short_reads_fail_never_succeed() {
        for parent in ["/dev/shm", "/var/tmp"] {
            let d = Dir::new(parent, "short");
            let a = arena();
            let p = d.file("a.img");
            let b = FileBdev::open("t", &cfg(p.clone(), Some(64 << 10), Some(4096)), &a).unwrap();
            let mut pool = BufPool::new(&a, 8192, 4, 4096, "t").unwrap();
            let mut ch = b.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).unwrap();
            assert_eq!(one_read(ch.as_mut(), &mut pool, 14, 2).unwrap(), IoStatus::Success);
            // Someone truncates the file under the device: block 15 is now beyond its end.
            std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(15 * 4096).unwrap();
            assert_eq!(one_read(ch.as_mut(), &mut pool, 13, 1).unwrap(), IoStatus::Success);
            // A read across the new end moves one block, then nothing: EIO, not success.
            let st = one_read(ch.as_mut(), &mut pool, 14, 2).unwrap();
            assert_eq!(st, IoStatus::Failed(IoError::Os { errno: libc::EIO }), "{parent}");
            let st = one_read(ch.as_mut(), &mut pool, 15, 1).unwrap();
            assert_eq!(st, IoStatus::Failed(IoError::Os { errno: libc::EIO }), "{parent}");
            assert_eq!(ch.outstanding(), 0);
        }
    }

    #[test]
    fn channel_moves_between_threads_when_idle() {
        let d = Dir::new("/dev/shm", "move");
        let a = arena();
        let b = FileBdev::open("t", &cfg(d.file("a.img"), Some(64 << 10), Some(4096)), &a).unwrap();
        let mut pool = BufPool::new(&a, 8192, 4, 4096, "t").unwrap();
        let mut ch = b.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).unwrap();
        assert_eq!(one_read(ch.as_mut(), &mut pool, 0, 2).unwrap(), IoStatus::Success);
        let (ch, pool) = std::thread::spawn(move || {
            let st = one_read(ch.as_mut(), &mut pool, 2, 2);
            (ch, pool, st)
        })
        .join()
        .map(|(ch, pool, st)| {
            assert_eq!(st.unwrap(), IoStatus::Success);
            (ch, pool)
        })
        .unwrap();
        let (mut ch, mut pool) = (ch, pool);
        assert_eq!(one_read(ch.as_mut(), &mut pool, 4, 2).unwrap(), IoStatus::Success);
    }
}
