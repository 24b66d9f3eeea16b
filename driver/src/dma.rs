//! The DMA arena: memory reserved once at start, from which every buffer a device may touch is carved.
//!
//! # Who owns what
//! - The [`Arena`] owns one anonymous mapping (2 MiB or 1 GiB hugepages when reserved, ordinary pages otherwise),
//!   described as a single vm-memory region whose *guest address is the IOVA*. It is mapped for DMA once per VFIO
//!   container, by the VFIO layer, from [`Arena::regions`]. It is never unmapped while any [`DmaRegion`] lives:
//!   every region holds an `Arc<Arena>`.
//! - [`Arena::carve`] hands out [`DmaRegion`]s (control path only: a bump allocator under a mutex). Queues, PRP
//!   lists, cache pages and buffer pools are regions. A region is never reused by default: a device might still
//!   write a dropped one (a queue of a controller that failed to stop). An owner that knows no device can touch it
//!   any more marks it [`DmaRegion::reuse_on_drop`] (the cache, for its pages); such a region goes back to the arena
//!   when dropped and a later `carve` may hand its bytes out again.
//! - A [`BufPool`] splits a region into equal [`DmaBuf`]s. The pool is owned by one reactor: `get`/`put` take no
//!   lock and never allocate.
//!
//! # Access rule
//! A device may write arena memory at any time while an I/O is outstanding, so nothing here ever creates a Rust
//! reference (`&[u8]`/`&mut [u8]`) into the arena. All access goes through raw-pointer copies
//! (`ptr::copy_nonoverlapping`) or volatile loads and stores. A buffer is handed to a device only by moving its
//! owning [`DmaBuf`] into an I/O descriptor; the CPU reads device-written data only after the completion has been
//! observed with acquire ordering (the driver's completion path provides that fence).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap};

use crate::DriverError;

/// IOVA of the arena's first byte. 4 GiB: above the x86 MSI window (0xfee0_0000) that an IOMMU reserves, and well
/// inside a 39-bit IOMMU aperture.
pub const IOVA_BASE: u64 = 0x1_0000_0000;

/// 2 MiB, the x86 huge page size.
pub const HUGE_2M: u64 = 2 << 20;
/// 1 GiB, the x86 gigantic page size.
pub const HUGE_1G: u64 = 1 << 30;
/// The base page size assumed for alignment of carved regions.
pub const PAGE_4K: u64 = 4096;

/// What kind of pages back the arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArenaBacking {
    /// 1 GiB hugepages.
    Huge1G,
    /// 2 MiB hugepages.
    Huge2M,
    /// Ordinary 4 KiB pages: fine for backends that do no DMA, refused for VFIO.
    Ordinary,
}

impl ArenaBacking {
    /// A name for logs and errors.
    pub fn describe(self) -> &'static str {
        match self {
            ArenaBacking::Huge1G => "1 GiB hugepage",
            ArenaBacking::Huge2M => "2 MiB hugepage",
            ArenaBacking::Ordinary => "ordinary",
        }
    }

    /// Whether the backing is pinned-size hugepages (and so usable for DMA through VFIO).
    pub fn is_huge(self) -> bool {
        !matches!(self, ArenaBacking::Ordinary)
    }
}

/// How to reserve the arena.
#[derive(Debug, Clone, Copy)]
pub struct ArenaConfig {
    /// Total bytes. Rounded up to the page size actually used.
    pub size_bytes: u64,
    /// Refuse ordinary memory (a VFIO backend is configured).
    pub require_hugepages: bool,
    /// Try 1 GiB pages first.
    pub try_1g: bool,
}

impl Default for ArenaConfig {
    fn default() -> Self {
        ArenaConfig { size_bytes: 64 << 20, require_hugepages: false, try_1g: false }
    }
}

/// The largest arena nvstack reserves (a limit in DESIGN.md).
pub const ARENA_MAX_BYTES: u64 = 64 << 30;

/// Memory reserved once at start and described as a vm-memory region at [`IOVA_BASE`].
pub struct Arena {
    mem: GuestMemoryMmap,
    host_base: NonNull<u8>,
    size_bytes: u64,
    backing: ArenaBacking,
    alloc: Mutex<Alloc>,
    carved_bytes: AtomicU64,
}

/// The arena's allocator: a bump pointer, and the ranges given back below it (sorted, disjoint, not touching).
#[derive(Debug, Default)]
struct Alloc {
    next: u64,
    free: Vec<(u64, u64)>,
}

impl Alloc {
    /// First fit among the ranges given back, else at the bump pointer: `[start, start + size)` aligned to `align`,
    /// inside `limit`.
    fn take(&mut self, size: u64, align: u64, limit: u64) -> Option<u64> {
        let fit = |s: u64, e: u64| s.checked_next_multiple_of(align).filter(|&a| a.checked_add(size).is_some_and(|end| end <= e));
        if let Some((i, start)) = self.free.iter().enumerate().find_map(|(i, &(s, e))| fit(s, e).map(|a| (i, a))) {
            let (s, e) = self.free.remove(i);
            let end = start + size;
            if end < e {
                self.free.insert(i, (end, e));
            }
            if s < start {
                self.free.insert(i, (s, start));
            }
            return Some(start);
        }
        let start = fit(self.next, limit)?;
        if start > self.next {
            // The alignment gap stays usable by smaller requests.
            self.free.push((self.next, start));
        }
        self.next = start + size;
        Some(start)
    }

    /// Give `[start, end)` back: merged with its free neighbours, and into the bump pointer when it ends there.
    fn give_back(&mut self, start: u64, end: u64) {
        let i = self.free.partition_point(|&(_, e)| e < start);
        let (mut s, mut e) = (start, end);
        while let Some(&(ns, ne)) = self.free.get(i) {
            if ns > e {
                break;
            }
            // Touching (or, which cannot happen, overlapping): merge.
            s = s.min(ns);
            e = e.max(ne);
            self.free.remove(i);
        }
        if e >= self.next {
            self.next = s;
        } else {
            self.free.insert(i, (s, e));
        }
        // The bump pointer may now meet the last free range.
        while let Some(&(ls, le)) = self.free.last() {
            if le < self.next {
                break;
            }
            self.next = ls;
            self.free.pop();
        }
    }

    fn free_bytes(&self, limit: u64) -> u64 {
        limit.saturating_sub(self.next) + self.free.iter().map(|&(s, e)| e - s).sum::<u64>()
    }
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("host_base", &self.host_base)
            .field("size_bytes", &self.size_bytes)
            .field("backing", &self.backing)
            .finish()
    }
}

// SAFETY: the arena's mapping is process-wide memory; `Arena` only hands out raw regions and never references into
// it, and its mutable state (the bump pointer) is behind a Mutex/atomics.
unsafe impl Send for Arena {}
// SAFETY: as for Send: shared access only reads immutable fields or goes through the Mutex/atomics.
unsafe impl Sync for Arena {}

/// One contiguous piece of the arena: where it is in the process and at which IOVA a device sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaRegionInfo {
    /// Host virtual address.
    pub host_addr: usize,
    /// IOVA (= vm-memory guest address).
    pub iova: u64,
    /// Length in bytes.
    pub len: u64,
}

fn map_anonymous(size: u64, backing: ArenaBacking) -> Result<GuestRegionMmap, DriverError> {
    let extra = match backing {
        ArenaBacking::Huge1G => libc::MAP_HUGETLB | (30 << libc::MAP_HUGE_SHIFT),
        ArenaBacking::Huge2M => libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT),
        ArenaBacking::Ordinary => 0,
    };
    let len = usize::try_from(size)
        .map_err(|_| DriverError::ArenaSize { size_bytes: size, reason: "does not fit the address space" })?;
    let region = MmapRegionBuilder::new(len)
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | extra)
        .with_hugetlbfs(backing.is_huge())
        .build()
        .map_err(|e| DriverError::ArenaMap {
            size_bytes: size,
            kind: backing.describe(),
            source: std::io::Error::other(e.to_string()),
        })?;
    GuestRegionMmap::new(region, GuestAddress(IOVA_BASE))
        .ok_or_else(|| DriverError::ArenaDescribe { detail: "region overflows the guest address space".into() })
}

impl Arena {
    /// Reserve the arena: 1 GiB pages if asked and available, else 2 MiB pages, else (unless hugepages are required)
    /// ordinary memory, saying so in one log line.
    ///
    /// # Errors
    /// [`DriverError::ArenaSize`] for a bad size, [`DriverError::HugepagesRequired`] when hugepages are required but
    /// none are reserved, [`DriverError::ArenaMap`] when even ordinary memory cannot be mapped.
    pub fn new(cfg: ArenaConfig) -> Result<Arc<Arena>, DriverError> {
        if cfg.size_bytes == 0 {
            return Err(DriverError::ArenaSize { size_bytes: 0, reason: "must be more than zero" });
        }
        if cfg.size_bytes > ARENA_MAX_BYTES {
            return Err(DriverError::ArenaSize { size_bytes: cfg.size_bytes, reason: "larger than the 64 GiB limit" });
        }
        let mut tries: Vec<ArenaBacking> = Vec::with_capacity(3);
        if cfg.try_1g {
            tries.push(ArenaBacking::Huge1G);
        }
        tries.push(ArenaBacking::Huge2M);
        let mut last_err = None;
        for backing in tries {
            let page = if backing == ArenaBacking::Huge1G { HUGE_1G } else { HUGE_2M };
            let size = cfg.size_bytes.div_ceil(page) * page;
            match map_anonymous(size, backing) {
                Ok(region) => return Self::from_region(region, size, backing),
                Err(e) => {
                    tracing::debug!(error = %e, kind = backing.describe(), "arena: hugepage reservation failed");
                    last_err = Some(e);
                }
            }
        }
        if cfg.require_hugepages {
            drop(last_err);
            return Err(DriverError::HugepagesRequired { size_bytes: cfg.size_bytes });
        }
        let size = cfg.size_bytes.div_ceil(HUGE_2M) * HUGE_2M;
        tracing::warn!(
            size_bytes = size,
            "no hugepages reserved: the DMA arena falls back to ordinary memory (fine for file, malloc, null and pmem; \
             VFIO needs hugepages: run `nvstack setup`)"
        );
        let region = map_anonymous(size, ArenaBacking::Ordinary)?;
        Self::from_region(region, size, ArenaBacking::Ordinary)
    }

    fn from_region(region: GuestRegionMmap, size: u64, backing: ArenaBacking) -> Result<Arc<Arena>, DriverError> {
        let host_base = NonNull::new(region.as_ptr())
            .ok_or_else(|| DriverError::ArenaDescribe { detail: "mapping at a null address".into() })?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| DriverError::ArenaDescribe { detail: e.to_string() })?;
        tracing::info!(size_bytes = size, kind = backing.describe(), iova = IOVA_BASE, "DMA arena reserved");
        Ok(Arc::new(Arena {
            mem,
            host_base,
            size_bytes: size,
            backing,
            alloc: Mutex::new(Alloc::default()),
            carved_bytes: AtomicU64::new(0),
        }))
    }

    /// The vm-memory description (guest address = IOVA).
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// The regions to map for DMA (one today).
    pub fn regions(&self) -> impl Iterator<Item = ArenaRegionInfo> + '_ {
        std::iter::once(ArenaRegionInfo {
            host_addr: self.host_base.as_ptr() as usize,
            iova: IOVA_BASE,
            len: self.size_bytes,
        })
    }

    /// What backs the arena.
    pub fn backing(&self) -> ArenaBacking {
        self.backing
    }

    /// Total bytes.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }

    /// Bytes carved and not given back.
    pub fn carved_bytes(&self) -> u64 {
        self.carved_bytes.load(Ordering::Relaxed)
    }

    /// The IOVA of a host address inside the arena, or `None` if it is outside.
    pub fn iova_of(&self, host_addr: usize) -> Option<u64> {
        let base = self.host_base.as_ptr() as usize;
        let off = host_addr.checked_sub(base)? as u64;
        (off < self.size_bytes).then(|| IOVA_BASE + off)
    }

    /// The byte offset inside the arena of a host address, or `None` if it is outside.
    pub fn offset_of(&self, host_addr: usize) -> Option<u64> {
        let base = self.host_base.as_ptr() as usize;
        let off = host_addr.checked_sub(base)? as u64;
        (off < self.size_bytes).then_some(off)
    }

    /// Carve `size_bytes` at an `align_bytes` boundary (a power of two; at least 64 is used) for `purpose`: from
    /// bytes given back (first fit), else from the untouched end of the arena.
    ///
    /// Control path only: this takes a mutex.
    ///
    /// # Errors
    /// [`DriverError::ArenaExhausted`] when the arena has too little left; [`DriverError::ArenaSize`] for a zero size
    /// or an alignment that is not a power of two.
    pub fn carve(self: &Arc<Self>, size_bytes: u64, align_bytes: u64, purpose: &'static str) -> Result<DmaRegion, DriverError> {
        if size_bytes == 0 || !align_bytes.is_power_of_two() {
            return Err(DriverError::ArenaSize { size_bytes, reason: "zero size or alignment not a power of two" });
        }
        let align = align_bytes.max(64);
        let mut alloc = self.alloc.lock().map_err(|_| DriverError::ArenaDescribe { detail: "arena lock poisoned".into() })?;
        let start = alloc.take(size_bytes, align, self.size_bytes).ok_or(DriverError::ArenaExhausted {
            purpose,
            size_bytes,
            free_bytes: alloc.free_bytes(self.size_bytes),
        })?;
        drop(alloc);
        self.carved_bytes.fetch_add(size_bytes, Ordering::Relaxed);
        let offset = usize::try_from(start).map_err(|_| DriverError::ArenaSize { size_bytes, reason: "offset overflow" })?;
        // SAFETY: `start + size_bytes <= self.size_bytes` (checked above), so the pointer stays inside the mapping.
        let ptr = unsafe { self.host_base.as_ptr().add(offset) };
        Ok(DmaRegion {
            ptr: NonNull::new(ptr).ok_or_else(|| DriverError::ArenaDescribe { detail: "null region".into() })?,
            iova: IOVA_BASE + start,
            len: size_bytes,
            reuse: false,
            arena: Arc::clone(self),
        })
    }
}

/// A carved piece of the arena. It keeps the arena alive. Access is by raw copies and volatile operations only.
#[derive(Debug)]
pub struct DmaRegion {
    ptr: NonNull<u8>,
    iova: u64,
    len: u64,
    /// Give the bytes back to the arena on drop (see [`DmaRegion::reuse_on_drop`]).
    reuse: bool,
    arena: Arc<Arena>,
}

impl Drop for DmaRegion {
    fn drop(&mut self) {
        if !self.reuse {
            return;
        }
        let start = self.iova - IOVA_BASE;
        match self.arena.alloc.lock() {
            Ok(mut a) => {
                a.give_back(start, start + self.len);
                self.arena.carved_bytes.fetch_sub(self.len, Ordering::Relaxed);
            }
            // A poisoned lock: the bytes stay out of use (safe, only lost).
            Err(_) => tracing::error!(offset = start, len = self.len, "arena lock poisoned: a region is not given back"),
        }
    }
}

// SAFETY: a DmaRegion is a unique owner of its byte range of the arena (carve never hands out overlapping ranges),
// and all access goes through raw pointers, so moving it between threads is sound.
unsafe impl Send for DmaRegion {}
// SAFETY: shared access only reads the immutable descriptor fields; memory access is by raw pointer with bounds
// checks, and callers coordinate who writes which bytes (documented at each use).
unsafe impl Sync for DmaRegion {}

impl DmaRegion {
    /// Host address of the first byte.
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// IOVA of the first byte.
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Choose whether the region's bytes go back to the arena when it is dropped (false, the default, keeps them out
    /// of use for good). Set it only when no device can write the region any more once it is dropped (nothing of
    /// it is in a queue, a PRP list or an I/O in flight), and clear it again when its memory turns out to be bad
    /// (poisoned bytes must never be handed out).
    pub fn reuse_on_drop(&mut self, reuse: bool) {
        self.reuse = reuse;
    }

    /// Whether the region is empty (never, for a carved one).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Host pointer and IOVA at `offset`, checked so that `offset + len` stays inside the region.
    pub fn slice(&self, offset: u64, len: u64) -> Option<(NonNull<u8>, u64)> {
        let end = offset.checked_add(len)?;
        if end > self.len {
            return None;
        }
        // SAFETY: offset + len <= self.len, so the result is inside this region (and so inside the mapping).
        let p = unsafe { self.ptr.as_ptr().add(usize::try_from(offset).ok()?) };
        Some((NonNull::new(p)?, self.iova + offset))
    }

    /// Volatile 64-bit load at `offset` (8-byte aligned).
    pub fn read_u64(&self, offset: u64) -> Option<u64> {
        if !offset.is_multiple_of(8) {
            return None;
        }
        let (p, _) = self.slice(offset, 8)?;
        // SAFETY: in bounds (slice checked it) and 8-aligned (region starts 64-aligned and offset % 8 == 0).
        Some(unsafe { std::ptr::read_volatile(p.as_ptr().cast::<u64>()) })
    }

    /// Volatile 64-bit store at `offset` (8-byte aligned).
    pub fn write_u64(&self, offset: u64, value: u64) -> Option<()> {
        if !offset.is_multiple_of(8) {
            return None;
        }
        let (p, _) = self.slice(offset, 8)?;
        // SAFETY: in bounds and 8-aligned, as for read_u64.
        unsafe { std::ptr::write_volatile(p.as_ptr().cast::<u64>(), value) };
        Some(())
    }

    /// Copy `src` into the region at `offset`.
    pub fn write_bytes(&self, offset: u64, src: &[u8]) -> Option<()> {
        let (p, _) = self.slice(offset, src.len() as u64)?;
        // SAFETY: destination is in bounds; source is a valid slice; they cannot overlap (src is not arena memory
        // that we reference: no references into the arena exist).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p.as_ptr(), src.len()) };
        Some(())
    }

    /// Copy from the region at `offset` into `dst`.
    pub fn read_bytes(&self, offset: u64, dst: &mut [u8]) -> Option<()> {
        let (p, _) = self.slice(offset, dst.len() as u64)?;
        // SAFETY: source is in bounds; destination is a valid exclusive slice outside the arena.
        unsafe { std::ptr::copy_nonoverlapping(p.as_ptr(), dst.as_mut_ptr(), dst.len()) };
        Some(())
    }

    /// Zero `len` bytes at `offset`.
    pub fn zero(&self, offset: u64, len: u64) -> Option<()> {
        let (p, _) = self.slice(offset, len)?;
        // SAFETY: in bounds (checked by slice).
        unsafe { std::ptr::write_bytes(p.as_ptr(), 0, usize::try_from(len).ok()?) };
        Some(())
    }
}

/// One buffer from a [`BufPool`]: it knows its host address and its IOVA. Owning it is the right to touch its bytes;
/// moving it into an I/O descriptor hands that right to the device until completion.
#[derive(Debug)]
pub struct DmaBuf {
    ptr: NonNull<u8>,
    iova: u64,
    len: u32,
    index: u32,
}

// SAFETY: a DmaBuf is the unique owner of its bytes (the pool hands each index out once); the arena outlives it
// because the pool that carved it holds the region (and a pool is dropped only after its buffers return: see
// BufPool's Drop note). Raw-pointer access only.
unsafe impl Send for DmaBuf {}

impl DmaBuf {
    /// Host address of the first byte.
    #[inline]
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
    /// IOVA of the first byte.
    #[inline]
    pub fn iova(&self) -> u64 {
        self.iova
    }
    /// Length in bytes.
    #[inline]
    pub fn len(&self) -> u32 {
        self.len
    }
    /// Whether the buffer is empty (never, for a pool buffer).
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The pool index (stable identity of this buffer).
    #[inline]
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Copy `src` into the buffer at `offset`. Returns `None` if it does not fit.
    #[inline]
    pub fn write_at(&mut self, offset: usize, src: &[u8]) -> Option<()> {
        if offset.checked_add(src.len())? > self.len as usize {
            return None;
        }
        // SAFETY: bounds checked above; we own the buffer (no device holds it: it is not in a descriptor).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(offset), src.len()) };
        Some(())
    }

    /// Copy from the buffer at `offset` into `dst`. Returns `None` if out of range.
    #[inline]
    pub fn read_at(&self, offset: usize, dst: &mut [u8]) -> Option<()> {
        if offset.checked_add(dst.len())? > self.len as usize {
            return None;
        }
        // SAFETY: bounds checked above; we own the buffer, and any device write finished before it was returned.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(offset), dst.as_mut_ptr(), dst.len()) };
        Some(())
    }

    /// Volatile 64-bit load at byte `offset` (8-aligned).
    #[inline]
    pub fn read_u64(&self, offset: usize) -> Option<u64> {
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > self.len as usize {
            return None;
        }
        // SAFETY: in bounds and aligned (pool buffers are at least 64-aligned).
        Some(unsafe { std::ptr::read_volatile(self.ptr.as_ptr().add(offset).cast::<u64>()) })
    }

    /// Volatile 64-bit store at byte `offset` (8-aligned).
    #[inline]
    pub fn write_u64(&mut self, offset: usize, value: u64) -> Option<()> {
        if !offset.is_multiple_of(8) || offset.checked_add(8)? > self.len as usize {
            return None;
        }
        // SAFETY: in bounds and aligned, as for read_u64.
        unsafe { std::ptr::write_volatile(self.ptr.as_ptr().add(offset).cast::<u64>(), value) };
        Some(())
    }

    /// Fill the whole buffer with `byte`.
    pub fn fill(&mut self, byte: u8) {
        // SAFETY: the whole buffer is ours.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr(), byte, self.len as usize) };
    }
}

/// A fixed set of equal buffers carved from the arena at start. Owned by one reactor; `get` and `put` are O(1),
/// take no lock and never allocate.
#[derive(Debug)]
pub struct BufPool {
    region: DmaRegion,
    buf_bytes: u32,
    stride_bytes: u64,
    count: u32,
    free: Vec<u32>,
}

impl BufPool {
    /// Carve `count` buffers of `buf_bytes` (aligned to `align_bytes`, at least 64) from `arena`.
    ///
    /// # Errors
    /// As [`Arena::carve`]; also [`DriverError::ArenaSize`] for a zero count or size.
    pub fn new(arena: &Arc<Arena>, buf_bytes: u32, count: u32, align_bytes: u64, purpose: &'static str) -> Result<BufPool, DriverError> {
        if buf_bytes == 0 || count == 0 {
            return Err(DriverError::ArenaSize { size_bytes: 0, reason: "a pool needs a non-zero buffer size and count" });
        }
        let align = align_bytes.max(64);
        let stride = u64::from(buf_bytes).div_ceil(align) * align;
        let total = stride.checked_mul(u64::from(count)).ok_or(DriverError::ArenaSize {
            size_bytes: u64::MAX,
            reason: "pool size overflows",
        })?;
        let region = arena.carve(total, align, purpose)?;
        let mut free = Vec::with_capacity(count as usize);
        free.extend((0..count).rev());
        Ok(BufPool { region, buf_bytes, stride_bytes: stride, count, free })
    }

    /// Take a buffer, or `None` when all are out (back-pressure).
    #[inline]
    pub fn get(&mut self) -> Option<DmaBuf> {
        let index = self.free.pop()?;
        let off = u64::from(index) * self.stride_bytes;
        let (ptr, iova) = self.region.slice(off, u64::from(self.buf_bytes))?;
        Some(DmaBuf { ptr, iova, len: self.buf_bytes, index })
    }

    /// Return a buffer. A buffer from another pool is refused (returned back).
    ///
    /// # Errors
    /// Gives the buffer back if it does not belong to this pool.
    #[inline]
    pub fn put(&mut self, buf: DmaBuf) -> Result<(), DmaBuf> {
        let off = u64::from(buf.index) * self.stride_bytes;
        match self.region.slice(off, 0) {
            Some((p, _)) if p == buf.ptr && buf.index < self.count && self.free.len() < self.count as usize => {
                self.free.push(buf.index);
                Ok(())
            }
            _ => Err(buf),
        }
    }

    /// Buffers not handed out.
    pub fn available(&self) -> usize {
        self.free.len()
    }
    /// Total buffers.
    pub fn count(&self) -> u32 {
        self.count
    }
    /// Bytes per buffer.
    pub fn buf_bytes(&self) -> u32 {
        self.buf_bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arena() -> Arc<Arena> {
        Arena::new(ArenaConfig { size_bytes: 8 << 20, require_hugepages: false, try_1g: false }).expect("arena")
    }

    #[test]
    fn carve_is_aligned_and_disjoint() {
        let a = arena();
        let r1 = a.carve(100, 4096, "t").unwrap();
        let r2 = a.carve(5000, 4096, "t").unwrap();
        assert_eq!(r1.iova() % 4096, 0);
        assert_eq!(r2.iova() % 4096, 0);
        assert!(r2.iova() >= r1.iova() + 100);
        assert_eq!(a.iova_of(r2.as_ptr() as usize), Some(r2.iova()));
        assert!(a.carve(64 << 20, 64, "too big").is_err());
    }

    #[test]
    fn pool_round_trip() {
        let a = arena();
        let mut p = BufPool::new(&a, 4096, 4, 4096, "t").unwrap();
        let mut bufs: Vec<_> = (0..4).map(|_| p.get().unwrap()).collect();
        assert!(p.get().is_none());
        let mut seen: Vec<u64> = bufs.iter().map(|b| b.iova()).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 4);
        bufs[0].write_at(10, b"hello").unwrap();
        let mut out = [0u8; 5];
        bufs[0].read_at(10, &mut out).unwrap();
        assert_eq!(&out, b"hello");
        assert!(bufs[0].write_at(4094, b"abc").is_none());
        for b in bufs.drain(..) {
            p.put(b).unwrap();
        }
        assert_eq!(p.available(), 4);
    }

    #[test]
    fn foreign_buffer_is_refused() {
        let a = arena();
        let mut p1 = BufPool::new(&a, 4096, 2, 4096, "t").unwrap();
        let mut p2 = BufPool::new(&a, 4096, 2, 4096, "t").unwrap();
        let b = p1.get().unwrap();
        let b = p2.put(b).unwrap_err();
        p1.put(b).unwrap();
    }

    #[test]
    fn zero_size_is_an_error() {
        assert!(Arena::new(ArenaConfig { size_bytes: 0, ..Default::default() }).is_err());
    }

    #[test]
    fn regions_marked_for_reuse_come_back_and_others_never_do() {
        let a = arena();
        let total = a.size_bytes();
        let kept = a.carve(1 << 20, 4096, "kept").expect("carve");
        let mut r = a.carve(2 << 20, 4096, "reused").expect("carve");
        let iova = r.iova();
        r.reuse_on_drop(true);
        drop(r);
        let again = a.carve(1 << 20, 4096, "again").expect("carve");
        assert_eq!(again.iova(), iova, "first fit lands in the bytes given back");
        drop(kept);
        assert_eq!(a.carved_bytes(), 2 << 20, "a region not marked stays carved");
        let e = a.carve(total, 64, "too much").expect_err("exhausted");
        assert!(e.to_string().contains("arena"), "{e}");
    }

    proptest::proptest! {
        /// The allocator against a byte map: what it hands out is aligned, inside the arena and never overlaps
        /// anything in use; giving everything back returns it to empty; a request fails only when no free run fits.
        #[test]
        fn allocator_matches_a_byte_map(ops in proptest::collection::vec((0u8..3, 1u64..40, 0u32..4), 1..200)) {
            const LIMIT: u64 = 256;
            let mut al = Alloc::default();
            let mut used = [false; LIMIT as usize];
            let mut live: Vec<(u64, u64)> = Vec::new();
            for (op, size, k) in ops {
                if op < 2 || live.is_empty() {
                    let align = 1u64 << k;
                    match al.take(size, align, LIMIT) {
                        Some(s) => {
                            proptest::prop_assert!(s % align == 0 && s + size <= LIMIT);
                            proptest::prop_assert!(used[s as usize..(s + size) as usize].iter().all(|&u| !u), "overlap at {}", s);
                            used[s as usize..(s + size) as usize].fill(true);
                            live.push((s, s + size));
                        }
                        None => {
                            // No aligned run of `size` free bytes anywhere.
                            let fits = (0..LIMIT).step_by(align as usize).any(|s| s + size <= LIMIT && used[s as usize..(s + size) as usize].iter().all(|&u| !u));
                            proptest::prop_assert!(!fits, "refused {} bytes at alignment {} with room", size, align);
                        }
                    }
                } else {
                    let (s, e) = live.swap_remove(size as usize % live.len());
                    used[s as usize..e as usize].fill(false);
                    al.give_back(s, e);
                }
                proptest::prop_assert!(al.free.windows(2).all(|w| w[0].1 < w[1].0), "free ranges sorted, apart: {:?}", al.free);
                proptest::prop_assert!(al.free.last().is_none_or(|&(_, e)| e < al.next), "{:?} next {}", al.free, al.next);
                let in_use = used.iter().filter(|&&u| u).count() as u64;
                proptest::prop_assert_eq!(al.free_bytes(LIMIT), LIMIT - in_use);
            }
            for (s, e) in live.drain(..) {
                al.give_back(s, e);
            }
            proptest::prop_assert_eq!((al.next, al.free.len()), (0, 0));
        }
    }

}
