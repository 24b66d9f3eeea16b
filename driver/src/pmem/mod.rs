//! Persistent memory: device-DAX, fsdax files and plain files, mapped into the process.
//!
//! - [`PmemDevice::open`] maps `/dev/daxX.Y` (device-DAX, 2 MiB aligned), a file on a DAX-mounted file system
//!   (`MAP_SHARED_VALIDATE | MAP_SYNC`: stores are durable after a cache flush, no msync), or a plain file (falls
//!   back to `MAP_SHARED` + `msync`, and says so once).
//! - Reads go through the machine-check-safe copy ([`mc_copy::copy_guarded`]): poison fails the read with
//!   [`PmemReadError`] naming the range, never kills the process.
//! - Writes are persisted with clwb/clflushopt or non-temporal stores and sfence ([`persist`]).
//! - The device knows its physical range where sysfs tells it, and reads its badblocks list (for the poison path).
//!
//! No Rust reference into the mapping is ever created: it is shared with the device (and, for files, with other
//! processes); access is by raw copies only.

pub mod mc_copy;
pub mod persist;
pub mod sysfs;

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, FromRawFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;

use crate::DriverError;
pub use persist::PersistMethod;

/// What kind of pmem mapping this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmemKind {
    /// `/dev/daxX.Y`.
    DevDax,
    /// A file on a DAX file system, mapped with MAP_SYNC.
    FsDax,
    /// A plain file (not DAX): msync for durability.
    File,
}

impl PmemKind {
    /// Name for logs and JSON.
    pub fn name(self) -> &'static str {
        match self {
            PmemKind::DevDax => "devdax",
            PmemKind::FsDax => "fsdax",
            PmemKind::File => "file",
        }
    }
}

/// A read that hit poison (or a hole in the mapping).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PmemReadError {
    /// Device offset of the first byte that could not be read.
    pub offset: u64,
    /// Bytes of the request from there on that were not read.
    pub len: u64,
}

/// Alignment of device-DAX mappings.
pub const DEVDAX_ALIGN: u64 = 2 << 20;

/// A mapped pmem device or file.
#[derive(Debug)]
pub struct PmemDevice {
    path: PathBuf,
    kind: PmemKind,
    base: NonNull<u8>,
    len: u64,
    method: PersistMethod,
    fd: OwnedFd,
}

// SAFETY: the mapping is process-wide; PmemDevice hands out only raw copies with bounds checks, and concurrent
// writers to the same bytes are ordered by the caller (as on any block device).
unsafe impl Send for PmemDevice {}
// SAFETY: as Send: no interior state changes after open; all access is raw copies into/out of the mapping.
unsafe impl Sync for PmemDevice {}

const MAP_SHARED_VALIDATE: i32 = 0x03;
const MAP_SYNC: i32 = 0x80000;

fn open_fd(path: &Path, flags: i32) -> Result<OwnedFd, DriverError> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| DriverError::PmemInvalid {
        path: path.display().to_string(),
        reason: "path contains a NUL byte".into(),
    })?;
    // SAFETY: a valid NUL-terminated path; the returned fd is owned below.
    let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0o644) };
    if fd < 0 {
        return Err(DriverError::PmemOpen {
            path: path.display().to_string(),
            step: "open",
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just returned by open and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn mmap_shared(fd: &OwnedFd, len: u64, flags: i32) -> std::io::Result<NonNull<u8>> {
    let l = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: a new mapping chosen by the kernel (no MAP_FIXED); fd is open for read and write.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), l, libc::PROT_READ | libc::PROT_WRITE, flags, fd.as_raw_fd(), 0) };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    NonNull::new(p.cast::<u8>()).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFAULT))
}

impl PmemDevice {
    /// Map `path`. For a file, `size_bytes` creates or extends it (never shrinks); `None` uses its size.
    ///
    /// # Errors
    /// [`DriverError::PmemOpen`] when the path cannot be opened or mapped, [`DriverError::PmemInvalid`] for an empty
    /// or oddly sized device.
    pub fn open(path: &Path, size_bytes: Option<u64>) -> Result<PmemDevice, DriverError> {
        mc_copy::install_sigbus_handler()?;
        let shown = path.display().to_string();
        let meta = std::fs::metadata(path);
        let is_char = meta.as_ref().map(|m| m.file_type().is_char_device()).unwrap_or(false);
        if is_char {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let len = sysfs::devdax_size(name).map_err(|source| DriverError::PmemOpen {
                path: shown.clone(),
                step: "reading the device-DAX size from /sys/bus/dax/devices",
                source,
            })?;
            if len == 0 || len % DEVDAX_ALIGN != 0 {
                return Err(DriverError::PmemInvalid { path: shown, reason: format!("device-DAX size {len} is not a non-zero multiple of 2 MiB") });
            }
            let fd = open_fd(path, libc::O_RDWR)?;
            let base = mmap_shared(&fd, len, libc::MAP_SHARED).map_err(|source| DriverError::PmemOpen {
                path: shown.clone(),
                step: "mmap of the device-DAX",
                source,
            })?;
            tracing::info!(path = %shown, len, "device-DAX mapped");
            return Ok(PmemDevice { path: path.to_path_buf(), kind: PmemKind::DevDax, base, len, method: PersistMethod::detect_cpu(), fd });
        }
        let fd = open_fd(path, libc::O_RDWR | libc::O_CREAT)?;
        let mut st: libc::stat = {
            // SAFETY: stat is plain data; zeroed is valid before fstat fills it.
            unsafe { std::mem::zeroed() }
        };
        // SAFETY: fd is open; st is ours.
        if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
            return Err(DriverError::PmemOpen { path: shown, step: "fstat", source: std::io::Error::last_os_error() });
        }
        let cur = u64::try_from(st.st_size).unwrap_or(0);
        let len = match size_bytes {
            Some(want) if want > cur => {
                let off = libc::off_t::try_from(want).map_err(|_| DriverError::PmemInvalid { path: shown.clone(), reason: "size too large".into() })?;
                // SAFETY: fd is open for writing.
                if unsafe { libc::ftruncate(fd.as_raw_fd(), off) } != 0 {
                    return Err(DriverError::PmemOpen { path: shown, step: "ftruncate", source: std::io::Error::last_os_error() });
                }
                want
            }
            Some(want) => want,
            None => cur,
        };
        if len == 0 || len % 4096 != 0 {
            return Err(DriverError::PmemInvalid { path: shown, reason: format!("size {len} is not a non-zero multiple of 4096; give a size") });
        }
        match mmap_shared(&fd, len, MAP_SHARED_VALIDATE | MAP_SYNC) {
            Ok(base) => {
                tracing::info!(path = %shown, len, "fsdax file mapped with MAP_SYNC");
                Ok(PmemDevice { path: path.to_path_buf(), kind: PmemKind::FsDax, base, len, method: PersistMethod::detect_cpu(), fd })
            }
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) || e.raw_os_error() == Some(libc::EINVAL) => {
                let base = mmap_shared(&fd, len, libc::MAP_SHARED).map_err(|source| DriverError::PmemOpen {
                    path: shown.clone(),
                    step: "mmap",
                    source,
                })?;
                tracing::warn!(path = %shown, "not on a DAX file system: MAP_SYNC refused, falling back to MAP_SHARED with msync for durability");
                Ok(PmemDevice { path: path.to_path_buf(), kind: PmemKind::File, base, len, method: PersistMethod::Msync, fd })
            }
            Err(source) => Err(DriverError::PmemOpen { path: shown, step: "mmap with MAP_SYNC", source }),
        }
    }

    /// The device or file path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// What kind of mapping.
    pub fn kind(&self) -> PmemKind {
        self.kind
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }
    /// Whether empty (never, once opened).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// How writes are made durable.
    pub fn persist_method(&self) -> PersistMethod {
        self.method
    }
    /// Virtual address of the mapping's first byte.
    pub fn base_addr(&self) -> usize {
        self.base.as_ptr() as usize
    }
    /// The device offset of a virtual address inside the mapping.
    pub fn offset_of(&self, vaddr: usize) -> Option<u64> {
        let off = vaddr.checked_sub(self.base_addr())? as u64;
        (off < self.len).then_some(off)
    }

    fn check(&self, offset: u64, len: u64) -> Option<usize> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then_some(())?;
        usize::try_from(offset).ok()
    }

    /// Copy `len` bytes at device `offset` into `dst`, guarded against poison.
    ///
    /// # Safety
    /// `dst..dst+len` must be valid for writes and not inside this mapping.
    ///
    /// # Errors
    /// [`PmemReadError`] naming the unread range (poison), or the whole range when it is out of bounds.
    pub unsafe fn read_into(&self, offset: u64, dst: *mut u8, len: usize) -> Result<(), PmemReadError> {
        let Some(off) = self.check(offset, len as u64) else {
            return Err(PmemReadError { offset, len: len as u64 });
        };
        // SAFETY: the source is inside our mapping (checked); the caller vouches for dst.
        let r = unsafe { mc_copy::copy_guarded(dst, self.base.as_ptr().add(off), len) };
        r.map_err(|f| PmemReadError { offset: offset + f.copied as u64, len: (len - f.copied) as u64 })
    }

    /// Copy `len` bytes from `src` to device `offset` and make them durable.
    ///
    /// # Safety
    /// `src..src+len` must be readable and not inside this mapping.
    ///
    /// # Errors
    /// `EINVAL` out of range; the msync error for plain files.
    pub unsafe fn write_from(&self, offset: u64, src: *const u8, len: usize) -> std::io::Result<()> {
        let off = self.check(offset, len as u64).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: destination inside our mapping (checked); the caller vouches for src.
        let dst = unsafe { self.base.as_ptr().add(off) };
        // SAFETY: ranges valid and disjoint.
        unsafe { persist::copy_persist(dst, src, len, self.method) };
        if self.method == PersistMethod::Msync {
            // SAFETY: inside our shared file mapping.
            unsafe { persist::msync_range(dst, len)? };
        }
        Ok(())
    }

    /// Zero `len` bytes at `offset` and make them durable. For files this goes through `pwrite`, so the kernel's
    /// pmem driver also clears poison it knows of in that range (the "zero and clear" action for free space).
    ///
    /// # Errors
    /// `EINVAL` out of range, or the write error.
    pub fn zero(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let off = self.check(offset, len).ok_or_else(|| std::io::Error::from_raw_os_error(libc::EINVAL))?;
        if self.kind == PmemKind::DevDax {
            let l = usize::try_from(len).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: inside our mapping (checked).
            let dst = unsafe { self.base.as_ptr().add(off) };
            // SAFETY: as above.
            unsafe {
                std::ptr::write_bytes(dst, 0, l);
                persist::flush_range(dst, l, self.method);
            }
            return Ok(());
        }
        let zeros = [0u8; 65536];
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            let at = libc::off_t::try_from(offset + done).map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
            // SAFETY: zeros is a valid buffer of at least n bytes; fd is open for writing.
            let w = unsafe { libc::pwrite(self.fd.as_raw_fd(), zeros.as_ptr().cast(), n, at) };
            if w < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if w == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            done += w as u64;
        }
        // SAFETY: fd is open.
        if unsafe { libc::fdatasync(self.fd.as_raw_fd()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Make every write so far durable (a fence: each write already flushed its lines).
    pub fn flush(&self) {
        persist::fence();
    }

    /// The physical address range of a device-DAX mapping (sysfs), if known.
    pub fn phys_range(&self) -> Option<sysfs::PhysRange> {
        match self.kind {
            PmemKind::DevDax => {
                let name = self.path.file_name()?.to_str()?;
                sysfs::devdax_phys_range(name).ok()
            }
            _ => None,
        }
    }
}

impl Drop for PmemDevice {
    fn drop(&mut self) {
        if let Ok(l) = usize::try_from(self.len) {
            // SAFETY: unmapping exactly the mapping we made; no references into it exist.
            unsafe { libc::munmap(self.base.as_ptr().cast(), l) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_file_round_trip_and_bounds() {
        let dir = std::env::temp_dir().join(format!("nvstack-pmem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pm.img");
        let dev = PmemDevice::open(&path, Some(1 << 20)).unwrap();
        assert_eq!(dev.len(), 1 << 20);
        assert_ne!(dev.kind(), PmemKind::DevDax);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        // SAFETY: data is a valid buffer outside the mapping.
        unsafe { dev.write_from(4096, data.as_ptr(), data.len()) }.unwrap();
        let mut back = vec![0u8; 8192];
        // SAFETY: back is a valid buffer outside the mapping.
        unsafe { dev.read_into(4096, back.as_mut_ptr(), back.len()) }.unwrap();
        assert_eq!(back, data);
        // SAFETY: as above.
        assert!(unsafe { dev.read_into((1 << 20) - 10, back.as_mut_ptr(), 20) }.is_err());
        dev.zero(4096, 4096).unwrap();
        // SAFETY: as above.
        unsafe { dev.read_into(4096, back.as_mut_ptr(), 8192) }.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert_eq!(&back[4096..], &data[4096..]);
        assert_eq!(dev.offset_of(dev.base_addr() + 100), Some(100));
        assert_eq!(dev.offset_of(dev.base_addr() + (1 << 20)), None);
        drop(dev);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn truncated_file_read_is_an_error_not_a_crash() {
        let dir = std::env::temp_dir().join(format!("nvstack-pmem-t-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("pm.img");
        let dev = PmemDevice::open(&path, Some(64 << 10)).unwrap();
        // Another party truncates the file under the mapping: reads of the lost pages raise SIGBUS.
        std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(16 << 10).unwrap();
        let mut back = vec![0u8; 32 << 10];
        // SAFETY: back is valid and outside the mapping.
        let err = unsafe { dev.read_into(8 << 10, back.as_mut_ptr(), back.len()) }.unwrap_err();
        assert_eq!(err, PmemReadError { offset: 16 << 10, len: 24 << 10 });
        drop(dev);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
