//! Guest helper: map a device-DAX character device, write a pattern through the mapping, map it again and read
//! the pattern back, and print the device's physical range as a marker the harness can act on:
//!
//! `@@NVSTACK phys=0xSTART len=0xLEN dev=dax0.0`
//!
//! Usage: `dax-map [/dev/daxX.Y] [MiB to test, default 16]`. Exit status 0 when the pattern read back intact.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::process::ExitCode;

const ALIGN: usize = 2 << 20;

fn sysfs_u64(dev: &str, attr: &str) -> Result<u64, String> {
    let p = format!("/sys/bus/dax/devices/{dev}/{attr}");
    let t = std::fs::read_to_string(&p).map_err(|e| format!("reading {p}: {e}"))?;
    let t = t.trim();
    let v = match t.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    v.map_err(|e| format!("{p}: {t:?}: {e}"))
}

fn pattern(i: usize, seed: u64) -> u64 {
    (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed
}

/// Map `len` bytes of `fd` shared, read-write.
fn map(fd: i32, len: usize) -> Result<*mut u64, String> {
    // SAFETY: a fresh mapping chosen by the kernel (addr NULL); fd is an open device-DAX file and len a
    // multiple of its 2 MiB alignment, checked by the caller. The result is checked against MAP_FAILED.
    let p =
        unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(format!("mmap {len} bytes: {}", std::io::Error::last_os_error()));
    }
    Ok(p.cast())
}

fn unmap(p: *mut u64, len: usize) {
    // SAFETY: p and len are exactly a mapping returned by `map` that is no longer used.
    unsafe { libc::munmap(p.cast(), len) };
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let path = args.get(1).map_or("/dev/dax0.0", String::as_str);
    let mib: usize = args.get(2).map_or(Ok(16), |s| s.parse()).map_err(|e| format!("MiB: {e}"))?;
    let dev = path.rsplit('/').next().unwrap_or(path);
    let size = sysfs_u64(dev, "size")?;
    let start = sysfs_u64(dev, "resource")?;
    let align = sysfs_u64(dev, "align").unwrap_or(ALIGN as u64);
    println!("{dev}: size {size:#x} align {align:#x}");
    println!("@@NVSTACK phys={start:#x} len={size:#x} dev={dev}");
    let len = mib.checked_mul(1 << 20).ok_or("MiB too large")?;
    let size_usize = usize::try_from(size).map_err(|_| "size does not fit usize")?;
    if len == 0 || len % ALIGN != 0 || len > size_usize {
        return Err(format!("test length {len:#x} must be a non-zero multiple of 2 MiB within {size:#x}"));
    }
    let f = OpenOptions::new().read(true).write(true).open(path).map_err(|e| format!("open {path}: {e}"))?;
    let fd = f.as_raw_fd();
    let words = len / 8;
    let seed = u64::from(std::process::id()) << 32 | 0x5eed;
    let p = map(fd, len)?;
    for i in 0..words {
        // SAFETY: i < words, so p.add(i) lies inside the len-byte mapping; volatile because the memory is a
        // device mapping that must really be written.
        unsafe { p.add(i).write_volatile(pattern(i, seed)) };
    }
    unmap(p, len);
    let p = map(fd, len)?;
    let mut bad = 0usize;
    let mut first_bad = None;
    for i in 0..words {
        // SAFETY: as above, inside the mapping.
        let v = unsafe { p.add(i).read_volatile() };
        if v != pattern(i, seed) {
            bad += 1;
            first_bad.get_or_insert(i * 8);
        }
    }
    unmap(p, len);
    if bad != 0 {
        return Err(format!("{bad} words differ, first at offset {:#x}", first_bad.unwrap_or(0)));
    }
    println!("pattern ok: {len} bytes written and read back through {path} (phys {start:#x}..{:#x})", start + size);
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dax-map: {e}");
            ExitCode::FAILURE
        }
    }
}
