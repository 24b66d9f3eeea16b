//! BAR access: the BAR mapped into the process and read and written with volatile loads and stores.
//!
//! All of the VFIO layer's MMIO is in this file. The invariant, established once in [`MappedBar::map`]:
//! `ptr..ptr + len` is a live `MAP_SHARED` mapping of the BAR, owned by the `MappedBar` and unmapped only in its
//! `Drop`. No Rust reference into it is ever made: the device owns that memory, so every access is a volatile load
//! or store of a naturally aligned 32-bit word, at an offset checked against `len`.
//!
//! Where the BAR is only partly mappable (a sparse-mmap capability), accesses outside the mapped part go through
//! `pread`/`pwrite` on the device file at the region's offset, which the kernel forwards to the device.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::ptr::NonNull;

/// A BAR mapped with `mmap`.
#[derive(Debug)]
pub(crate) struct MappedBar {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is process-wide memory owned by this value; it is only reached through volatile loads and
// stores of whole words, which the device (not Rust) orders, so sharing or moving it between threads is sound.
unsafe impl Send for MappedBar {}
// SAFETY: as for Send: `&MappedBar` only allows volatile word accesses, no references into the mapping.
unsafe impl Sync for MappedBar {}

impl MappedBar {
    /// Map `len` bytes of the device file `fd` at `file_offset` (the region offset VFIO reports) read-write, shared.
    pub(crate) fn map(fd: &File, file_offset: u64, len: usize) -> std::io::Result<MappedBar> {
        if len == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "empty BAR"));
        }
        let off = libc::off_t::try_from(file_offset)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "region offset too large"))?;
        // SAFETY: a fresh mapping chosen by the kernel (addr null, no MAP_FIXED), so no existing memory is affected;
        // the fd is open for the duration of the call. The result is checked for MAP_FAILED below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let ptr = NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::other("mmap returned null"))?;
        // Invariant established: ptr..ptr+len is a live shared mapping of the BAR, owned by this value.
        Ok(MappedBar { ptr, len })
    }

    /// The mapped length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn word(&self, offset: usize) -> Option<*mut u32> {
        if !offset.is_multiple_of(4) || offset.checked_add(4)? > self.len {
            return None;
        }
        // SAFETY: offset + 4 <= len (checked), so the pointer stays inside the mapping (the module invariant).
        Some(unsafe { self.ptr.as_ptr().add(offset) }.cast::<u32>())
    }

    /// Volatile 32-bit load, or `None` when `offset` is unaligned or outside the mapping.
    #[inline]
    pub(crate) fn read32(&self, offset: usize) -> Option<u32> {
        let p = self.word(offset)?;
        // SAFETY: inside the live mapping and 4-aligned (word() checked both; the mapping is page-aligned); a
        // volatile load makes no reference and is not elided or merged.
        Some(unsafe { std::ptr::read_volatile(p) })
    }

    /// Volatile 32-bit store; `None` when `offset` is unaligned or outside the mapping.
    #[inline]
    pub(crate) fn write32(&self, offset: usize, value: u32) -> Option<()> {
        let p = self.word(offset)?;
        // SAFETY: as for read32: inside the mapping, aligned, volatile, no reference.
        unsafe { std::ptr::write_volatile(p, value) };
        Some(())
    }
}

impl Drop for MappedBar {
    fn drop(&mut self) {
        // SAFETY: ptr/len are exactly the mapping made in map(), not unmapped before (Drop runs once), and no
        // reference into it exists (module invariant).
        let rc = unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "munmap of a BAR failed");
        }
    }
}

/// BAR0 of a VFIO device: the mapped part by volatile access, the rest through the device file.
#[derive(Debug)]
pub(crate) struct Bar {
    map: Option<MappedBar>,
    file: File,
    region_offset: u64,
    region_size: u64,
}

impl Bar {
    /// A BAR of `region_size` bytes at `region_offset` in `file`, with its mappable prefix (if any) mapped.
    pub(crate) fn new(map: Option<MappedBar>, file: File, region_offset: u64, region_size: u64) -> Bar {
        Bar { map, file, region_offset, region_size }
    }

    /// Bytes of the BAR reached through the mapping.
    pub(crate) fn mapped_len(&self) -> usize {
        self.map.as_ref().map_or(0, MappedBar::len)
    }

    /// The BAR's size.
    pub(crate) fn size(&self) -> u64 {
        self.region_size
    }

    fn file_offset(&self, offset: usize, width: u64) -> Option<u64> {
        let off = u64::try_from(offset).ok()?;
        (off.checked_add(width)? <= self.region_size).then(|| self.region_offset.checked_add(off)).flatten()
    }

    /// 32-bit read at `offset`. All ones when it cannot be read (out of range, or the device is gone), which is
    /// what a PCIe read of a vanished device returns too.
    #[inline]
    pub(crate) fn read32(&self, offset: usize) -> u32 {
        if let Some(v) = self.map.as_ref().and_then(|m| m.read32(offset)) {
            return v;
        }
        let Some(at) = self.file_offset(offset, 4).filter(|_| offset.is_multiple_of(4)) else {
            tracing::warn!(offset, "BAR read outside the BAR or unaligned");
            return u32::MAX;
        };
        let mut b = [0u8; 4];
        match self.file.read_exact_at(&mut b, at) {
            Ok(()) => u32::from_le_bytes(b),
            Err(e) => {
                tracing::warn!(offset, error = %e, "BAR read through the device file failed");
                u32::MAX
            }
        }
    }

    /// 32-bit write at `offset`. A write that cannot be made is logged (the device is gone or the offset is bad:
    /// the next read shows all ones or a timeout follows).
    #[inline]
    pub(crate) fn write32(&self, offset: usize, value: u32) {
        if self.map.as_ref().and_then(|m| m.write32(offset, value)).is_some() {
            return;
        }
        let Some(at) = self.file_offset(offset, 4).filter(|_| offset.is_multiple_of(4)) else {
            tracing::warn!(offset, "BAR write outside the BAR or unaligned");
            return;
        };
        if let Err(e) = self.file.write_all_at(&value.to_le_bytes(), at) {
            tracing::warn!(offset, error = %e, "BAR write through the device file failed");
        }
    }

    /// 64-bit read as two 32-bit reads, low then high (as Linux's `lo_hi_readq`: NVMe allows it, and some
    /// devices do not take 8-byte accesses).
    #[inline]
    pub(crate) fn read64(&self, offset: usize) -> u64 {
        let lo = self.read32(offset);
        let hi = offset.checked_add(4).map_or(u32::MAX, |o| self.read32(o));
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// 64-bit write as two 32-bit writes, low then high (as Linux's `lo_hi_writeq` for ASQ/ACQ).
    #[inline]
    pub(crate) fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        if let Some(o) = offset.checked_add(4) {
            self.write32(o, (value >> 32) as u32);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A BAR stand-in: a temp file mapped shared, 16 KiB, the first 8 KiB mapped and the rest through the file.
    fn fake_bar() -> (Bar, std::path::PathBuf) {
        let p =
            std::env::temp_dir().join(format!("nvstack-bar-{}-{:?}", std::process::id(), std::thread::current().id()));
        let f = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&p).unwrap();
        f.set_len(16384 + 4096).unwrap();
        // Region at file offset 4096, as VFIO places regions at offsets in the device file.
        let m = MappedBar::map(&f, 4096, 8192).unwrap();
        (Bar::new(Some(m), f, 4096, 16384), p)
    }

    #[test]
    fn mapped_and_file_paths_agree() {
        let (bar, p) = fake_bar();
        assert_eq!(bar.mapped_len(), 8192);
        bar.write32(0x14, 0x0046_0001);
        assert_eq!(bar.read32(0x14), 0x0046_0001);
        bar.write64(0x28, 0x1234_5678_9abc_def0);
        assert_eq!(bar.read64(0x28), 0x1234_5678_9abc_def0);
        // Beyond the mapping: through the file, still at the right place.
        bar.write32(0x3000, 0xfeed_f00d);
        assert_eq!(bar.read32(0x3000), 0xfeed_f00d);
        let raw = std::fs::read(&p).unwrap();
        assert_eq!(&raw[4096 + 0x3000..4096 + 0x3004], &0xfeed_f00du32.to_le_bytes());
        assert_eq!(&raw[4096 + 0x14..4096 + 0x18], &0x0046_0001u32.to_le_bytes());
        // Out of range and unaligned: all ones, nothing written.
        assert_eq!(bar.read32(16384), u32::MAX);
        assert_eq!(bar.read32(2), u32::MAX);
        bar.write32(16384, 1);
        assert_eq!(bar.size(), 16384);
        let _ = std::fs::remove_file(p);
    }
}
