//! Anonymous memory reserved at start (outside the DMA arena): one private mapping, faulted in at once so a hot
//! path never takes a page fault and an over-commit fails at set-up rather than mid-run.
//!
//! With `huge`, the mapping is placed on a 2 MiB boundary and advised for transparent hugepages, so random access
//! over tens of MiB (a RAM disk, a state tree's block pool) costs few TLB misses: where THP is set to `madvise`
//! (Debian's default) an unadvised mapping gets 4 KiB pages only. The advice may be refused (THP `never`); the
//! memory then works the same on 4 KiB pages, and [`AnonMap::new`] says so in one debug log line.
//!
//! The memory is zeroed by the kernel. [`AnonMap`] hands out only a raw base pointer: the owner decides how it is
//! reached (raw copies for a RAM disk, a typed slice for a pool whose type is valid for any bit pattern).

use std::ptr::NonNull;

/// Transparent hugepage size on x86-64: the alignment and length granule of a `huge` mapping.
pub const THP_BYTES: usize = 2 << 20;
const PAGE_BYTES: usize = 4096;

/// One anonymous private mapping, unmapped on drop.
#[derive(Debug)]
pub struct AnonMap {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: AnonMap owns its mapping and exposes it only as a raw pointer; whoever dereferences that pointer states
// its own rule for concurrent access.
unsafe impl Send for AnonMap {}
// SAFETY: as for Send: shared access only reads `base` and `len`.
unsafe impl Sync for AnonMap {}

/// `mmap` an anonymous private read-write region of `len` bytes at an address of the kernel's choosing.
fn map(len: usize) -> std::io::Result<NonNull<u8>> {
    // SAFETY: a new anonymous mapping; no existing memory is touched. The result is checked against MAP_FAILED.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned a null address"))
}

/// Unmap `len` bytes at `p`, which the caller mapped and no longer uses.
fn unmap(p: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: the callers pass a piece of a mapping made by `map` that nothing reaches any more.
    let rc = unsafe { libc::munmap(p.cast(), len) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), len, "anonymous memory: munmap failed");
    }
}

impl AnonMap {
    /// `len` bytes (more than 0), zeroed and resident; with `huge`, on a 2 MiB boundary, rounded up to whole 2 MiB,
    /// and advised for transparent hugepages. Without it, rounded up to whole 4 KiB pages.
    ///
    /// # Errors
    /// The OS error when the address space cannot be had or the memory cannot be populated (ENOMEM): the caller
    /// names what it was for.
    pub fn new(len: usize, huge: bool) -> std::io::Result<AnonMap> {
        let granule = if huge { THP_BYTES } else { PAGE_BYTES };
        let len = len
            .max(1)
            .checked_next_multiple_of(granule)
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "size overflows the address space"))?;
        let base = if huge {
            // Map one granule more than asked, keep the 2 MiB-aligned part, give back the ends.
            let span = len
                .checked_add(THP_BYTES)
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "size overflows the address space"))?;
            let raw = map(span)?;
            let head = raw.as_ptr().align_offset(THP_BYTES);
            // SAFETY: head < THP_BYTES and head + len <= span: both pointers are inside the mapping just made.
            let (aligned, tail) = unsafe { (raw.as_ptr().add(head), raw.as_ptr().add(head + len)) };
            unmap(raw.as_ptr(), head);
            unmap(tail, span - head - len);
            // SAFETY: `aligned..aligned+len` is what remains of the mapping; madvise only changes how it is backed.
            let advised = unsafe { libc::madvise(aligned.cast(), len, libc::MADV_HUGEPAGE) };
            if advised != 0 {
                tracing::debug!(len, error = %std::io::Error::last_os_error(), "anonymous memory: no transparent hugepages");
            }
            NonNull::new(aligned).ok_or_else(|| std::io::Error::other("aligned address is null"))?
        } else {
            map(len)?
        };
        let m = AnonMap { base, len };
        m.populate()?;
        Ok(m)
    }

    /// Fault every page in, writable, now.
    fn populate(&self) -> std::io::Result<()> {
        // SAFETY: base/len describe this mapping; MADV_POPULATE_WRITE faults its pages in writable.
        let rc = unsafe { libc::madvise(self.base.as_ptr().cast(), self.len, libc::MADV_POPULATE_WRITE) };
        if rc == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOMEM) {
            return Err(err);
        }
        // Kernels before 5.14 lack MADV_POPULATE_WRITE: touch one byte per page instead.
        for off in (0..self.len).step_by(PAGE_BYTES) {
            // SAFETY: off < len, inside the mapping, which nothing else reaches yet; a volatile store of the zero
            // already there, so the touch is not optimised away.
            unsafe { std::ptr::write_volatile(self.base.as_ptr().add(off), 0) };
        }
        Ok(())
    }

    /// First byte of the mapping (aligned to 4 KiB, to 2 MiB when `huge`).
    pub fn as_ptr(&self) -> NonNull<u8> {
        self.base
    }

    /// Bytes mapped (the size asked for, rounded up).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: a mapping holds at least one page.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for AnonMap {
    fn drop(&mut self) {
        unmap(self.base.as_ptr(), self.len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_mapping_is_aligned_rounded_zeroed_and_writable() {
        let m = AnonMap::new(THP_BYTES + 1, true).expect("map");
        assert_eq!(m.as_ptr().as_ptr() as usize % THP_BYTES, 0);
        assert_eq!(m.len(), 2 * THP_BYTES);
        for off in (0..m.len()).step_by(PAGE_BYTES * 31) {
            // SAFETY: off < len; the test owns the mapping and nothing else reaches it.
            unsafe {
                assert_eq!(std::ptr::read(m.as_ptr().as_ptr().add(off)), 0);
                std::ptr::write(m.as_ptr().as_ptr().add(off), 0xa5);
                assert_eq!(std::ptr::read(m.as_ptr().as_ptr().add(off)), 0xa5);
            }
        }
    }

    #[test]
    fn a_small_mapping_is_whole_pages() {
        let m = AnonMap::new(10, false).expect("map");
        assert_eq!(m.len(), PAGE_BYTES);
        assert_eq!(m.as_ptr().as_ptr() as usize % PAGE_BYTES, 0);
        assert!(!m.is_empty());
    }

    #[test]
    fn an_impossible_size_is_an_error_not_a_panic() {
        let e = AnonMap::new(usize::MAX - 10, true).expect_err("too big");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        let e = AnonMap::new(usize::MAX / 2, false).expect_err("too big");
        assert!(e.raw_os_error().is_some() || e.kind() == std::io::ErrorKind::InvalidInput, "{e}");
    }
}
