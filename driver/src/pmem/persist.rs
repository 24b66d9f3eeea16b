//! Making stores to persistent memory durable: cache-line write-back (`clwb`, else `clflushopt`, else `clflush`)
//! or non-temporal stores, then `sfence`; `msync` for a plain file that is not DAX.

use std::sync::OnceLock;

/// Cache line size assumed for flushing (x86).
pub const CACHE_LINE: usize = 64;

/// How stores are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PersistMethod {
    /// `clwb` each line, then `sfence` (line stays cached).
    Clwb,
    /// `clflushopt` each line, then `sfence`.
    ClflushOpt,
    /// `clflush` each line (serialising; no fence needed, one is issued anyway).
    Clflush,
    /// Not DAX memory: `msync(MS_SYNC)` of the pages.
    Msync,
}

impl PersistMethod {
    /// The best cache-flush instruction this CPU has.
    pub fn detect_cpu() -> PersistMethod {
        static BEST: OnceLock<PersistMethod> = OnceLock::new();
        *BEST.get_or_init(|| {
            // CPUID leaf 7, sub-leaf 0: EBX bit 24 is CLWB, bit 23 is CLFLUSHOPT (Intel SDM vol. 2A, CPUID).
            let max_leaf = core::arch::x86_64::__cpuid(0).eax;
            let ebx = if max_leaf >= 7 {
                core::arch::x86_64::__cpuid_count(7, 0).ebx
            } else {
                0
            };
            if ebx & (1 << 24) != 0 {
                PersistMethod::Clwb
            } else if ebx & (1 << 23) != 0 {
                PersistMethod::ClflushOpt
            } else {
                PersistMethod::Clflush
            }
        })
    }

    /// Name for logs.
    pub fn name(self) -> &'static str {
        match self {
            PersistMethod::Clwb => "clwb+sfence",
            PersistMethod::ClflushOpt => "clflushopt+sfence",
            PersistMethod::Clflush => "clflush",
            PersistMethod::Msync => "msync",
        }
    }
}

/// # Safety
/// The CPU has CLWB and `start..end` is mapped.
unsafe fn clwb_lines(start: usize, end: usize) {
    let mut p = start;
    while p < end {
        // SAFETY: the caller guarantees the CPU has clwb and p is inside a mapping of ours; clwb does not fault on
        // mapped memory and writes nothing visible to Rust.
        unsafe { std::arch::asm!("clwb [{0}]", in(reg) p, options(nostack, preserves_flags)) };
        p += CACHE_LINE;
    }
}

/// # Safety
/// The CPU has CLFLUSHOPT and `start..end` is mapped.
unsafe fn clflushopt_lines(start: usize, end: usize) {
    let mut p = start;
    while p < end {
        // SAFETY: as clwb_lines, for clflushopt.
        unsafe { std::arch::asm!("clflushopt [{0}]", in(reg) p, options(nostack, preserves_flags)) };
        p += CACHE_LINE;
    }
}

/// # Safety
/// `start..end` is mapped.
unsafe fn clflush_lines(start: usize, end: usize) {
    let mut p = start;
    while p < end {
        // SAFETY: as clwb_lines.
        unsafe { core::arch::x86_64::_mm_clflush(p as *const u8) };
        p += CACHE_LINE;
    }
}

/// Write back every cache line of `ptr..ptr+len` with `method` and fence. For [`PersistMethod::Msync`] the caller
/// uses [`msync_range`] instead; here it only fences.
///
/// # Safety
/// `ptr..ptr+len` must lie inside a live mapping of this process.
pub unsafe fn flush_range(ptr: *const u8, len: usize, method: PersistMethod) {
    if len == 0 {
        return;
    }
    let start = (ptr as usize) & !(CACHE_LINE - 1);
    let end = ptr as usize + len;
    match method {
        // SAFETY: the CPU has clwb (detect_cpu found it); the range is mapped (caller's promise).
        PersistMethod::Clwb => unsafe { clwb_lines(start, end) },
        // SAFETY: the CPU has clflushopt; the range is mapped.
        PersistMethod::ClflushOpt => unsafe { clflushopt_lines(start, end) },
        // SAFETY: clflush is baseline x86_64; the range is mapped.
        PersistMethod::Clflush => unsafe { clflush_lines(start, end) },
        PersistMethod::Msync => {}
    }
    fence();
}

/// `sfence`: orders every earlier cache write-back and non-temporal store before any later store (the persistence
/// point for DAX memory).
#[inline]
pub fn fence() {
    // SAFETY: sfence has no memory-safety preconditions.
    unsafe { core::arch::x86_64::_mm_sfence() };
}

/// `msync(MS_SYNC)` over the pages holding `ptr..ptr+len`.
///
/// # Safety
/// The range must lie inside a live shared file mapping of this process.
///
/// # Errors
/// The OS error from `msync`.
pub unsafe fn msync_range(ptr: *const u8, len: usize) -> std::io::Result<()> {
    let page = 4096usize;
    let start = (ptr as usize) & !(page - 1);
    let end = (ptr as usize + len).div_ceil(page) * page;
    // SAFETY: page-aligned start inside our mapping (caller's promise), length covering the range.
    let rc = unsafe { libc::msync(start as *mut libc::c_void, end - start, libc::MS_SYNC) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Copy with non-temporal stores where both ends allow it (16-byte aligned destination, length a multiple of 16),
/// else an ordinary copy followed by cache write-back. Always ends with the method's persistence point.
///
/// # Safety
/// `dst..dst+len` inside a live mapping, `src..src+len` readable, no overlap.
pub unsafe fn copy_persist(dst: *mut u8, src: *const u8, len: usize, method: PersistMethod) {
    if method != PersistMethod::Msync && (dst as usize).is_multiple_of(16) && len.is_multiple_of(16) && len >= 256 {
        let mut i = 0;
        while i < len {
            // SAFETY: 16-byte aligned destination inside the range; unaligned 16-byte load from the source range.
            unsafe {
                let v = core::arch::x86_64::_mm_loadu_si128(src.add(i).cast());
                core::arch::x86_64::_mm_stream_si128(dst.add(i).cast(), v);
            }
            i += 16;
        }
        fence();
        return;
    }
    // SAFETY: ranges valid and disjoint (caller's promise).
    unsafe {
        std::ptr::copy_nonoverlapping(src, dst, len);
        flush_range(dst, len, method);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_persist_copies_both_paths() {
        let m = PersistMethod::detect_cpu();
        for (len, off) in [(4096usize, 0usize), (4096, 16), (100, 3), (1 << 16, 0)] {
            let src: Vec<u8> = (0..len).map(|i| (i * 31 + 7) as u8).collect();
            let mut dst = vec![0u8; len + 64];
            let base = dst.as_mut_ptr();
            // SAFETY: dst has len + 64 bytes; off < 64.
            unsafe { copy_persist(base.add(off), src.as_ptr(), len, m) };
            assert_eq!(&dst[off..off + len], &src[..]);
        }
    }
}
