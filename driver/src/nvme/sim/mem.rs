//! The simulated device's view of host memory: IOVA to host address through the arena, raw copies only.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use crate::dma::Arena;
use crate::nvme::spec::Pod;

/// DMA access for the simulated device: every address is checked against the arena.
#[derive(Debug, Clone)]
pub(crate) struct DevMem {
    arena: Arc<Arena>,
    host_base: usize,
    iova_base: u64,
    len: u64,
}

impl DevMem {
    pub(crate) fn new(arena: Arc<Arena>) -> DevMem {
        let r = arena.regions().next();
        let (host_base, iova_base, len) = r.map_or((0, 0, 0), |r| (r.host_addr, r.iova, r.len));
        DevMem { arena, host_base, iova_base, len }
    }

    fn ptr(&self, iova: u64, len: usize) -> Option<*mut u8> {
        let off = iova.checked_sub(self.iova_base)?;
        let end = off.checked_add(len as u64)?;
        if end > self.len || self.host_base == 0 {
            return None;
        }
        let _ = &self.arena;
        Some((self.host_base + off as usize) as *mut u8)
    }

    /// Device read of host memory into `dst` (a DMA read).
    pub(crate) fn read(&self, iova: u64, dst: &mut [u8]) -> bool {
        let Some(p) = self.ptr(iova, dst.len()) else { return false };
        // SAFETY: `p..p+len` is inside the arena mapping (checked by `ptr`), which lives as long as `self.arena`;
        // the destination is a distinct Rust buffer. Raw copy: no reference into the arena is made.
        unsafe { std::ptr::copy_nonoverlapping(p, dst.as_mut_ptr(), dst.len()) };
        true
    }

    /// Device write of `src` into host memory (a DMA write).
    pub(crate) fn write(&self, iova: u64, src: &[u8]) -> bool {
        let Some(p) = self.ptr(iova, src.len()) else { return false };
        // SAFETY: as for `read`, in the other direction.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p, src.len()) };
        true
    }

    /// Read a wire struct (a fetched submission entry, a DSM range).
    pub(crate) fn read_pod<T: Pod>(&self, iova: u64) -> Option<T> {
        let p = self.ptr(iova, std::mem::size_of::<T>())?;
        // SAFETY: in bounds (checked by `ptr`); T is Pod, so any bytes are a valid value; unaligned read.
        Some(unsafe { std::ptr::read_unaligned(p.cast::<T>()) })
    }

    /// Post a 16-byte completion entry: everything but the status word first, then the status word (phase tag)
    /// last, so the host never sees a new phase with old contents.
    pub(crate) fn post_cqe(&self, iova: u64, words: [u32; 3], cid: u16, status: u16) -> bool {
        let Some(p) = self.ptr(iova, 16) else { return false };
        if !(p as usize).is_multiple_of(16) {
            return false;
        }
        // SAFETY: in bounds and 16-aligned (checked); volatile stores because the host polls this memory.
        unsafe {
            let w = p.cast::<u32>();
            std::ptr::write_volatile(w, words[0]);
            std::ptr::write_volatile(w.add(1), words[1]);
            std::ptr::write_volatile(w.add(2), words[2]);
            std::ptr::write_volatile(p.add(12).cast::<u16>(), cid);
        }
        // Orders the entry's body before its status word (which carries the phase tag the host polls).
        fence(Ordering::Release);
        // SAFETY: as above.
        unsafe { std::ptr::write_volatile(p.add(14).cast::<u16>(), status) };
        true
    }
}
