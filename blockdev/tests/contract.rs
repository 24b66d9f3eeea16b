//! The block-device contract suite (`nvstack_blockdev::contract`) run against every backend in this crate.

use std::sync::Arc;

use nvstack_blockdev::contract::{self, ContractOpts, ContractReport};
use nvstack_blockdev::spec::open_bdev;
use nvstack_blockdev::BlockDev;
use nvstack_driver::dma::{Arena, ArenaConfig};

fn arena() -> Arc<Arena> {
    Arena::new(ArenaConfig { size_bytes: 64 << 20, ..Default::default() }).expect("arena")
}

fn run(spec: &str, opts: &ContractOpts) -> ContractReport {
    let a = arena();
    let make = || -> Result<Arc<dyn BlockDev>, String> { open_bdev(spec, &a).map_err(|e| e.to_string()) };
    match contract::run_all(&make, &a, opts) {
        Ok(r) => {
            assert_eq!(r.passed.len(), contract::check_names().len(), "{spec}: {r:?}");
            r
        }
        Err(e) => panic!("{spec}: contract failures:\n{e}"),
    }
}

#[test]
fn null_512() {
    let r = run("null:64M", &ContractOpts { verify_data: false, ..Default::default() });
    assert!(r.passed.contains(&"reactors"));
}

#[test]
fn null_4k() {
    run("null:1G,bs=4096", &ContractOpts { verify_data: false, ..Default::default() });
}

#[test]
fn malloc_512() {
    run("malloc:8M", &ContractOpts::default());
}

#[test]
fn malloc_4k() {
    run("malloc:16M,bs=4K", &ContractOpts::default());
}

#[test]
fn malloc_tiny_device() {
    // Four blocks: checks that need room say they were skipped, the rest still run.
    let r = run("malloc:2K", &ContractOpts { queue_depth: 4, ..Default::default() });
    assert!(!r.skipped.is_empty());
}

/// A directory for file-backed devices, removed at the end.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new(parent: &str, tag: &str) -> Option<TempDir> {
        let p = std::path::Path::new(parent).join(format!("nvstack-contract-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&p).ok()?;
        Some(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether this process may use io_uring (container seccomp profiles and `kernel.io_uring_disabled` can refuse it).
fn uring_refused() -> Option<String> {
    match io_uring::IoUring::new(2) {
        Ok(_) => None,
        Err(e) if matches!(e.raw_os_error(), Some(libc::EPERM | libc::ENOSYS | libc::EACCES)) => Some(e.to_string()),
        Err(_) => None,
    }
}

fn run_file(parent: &str, tag: &str, size: &str, opts_suffix: &str) -> Option<ContractReport> {
    if let Some(why) = uring_refused() {
        eprintln!("SKIPPED file contract in {parent}: io_uring is refused in this environment ({why})");
        return None;
    }
    let Some(dir) = TempDir::new(parent, tag) else {
        eprintln!("skipping file contract in {parent}: cannot create a directory there");
        return None;
    };
    let a = arena();
    let n = std::sync::atomic::AtomicU32::new(0);
    let make = || -> Result<Arc<dyn BlockDev>, String> {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let spec = format!("file:{}/d{i}.img:{size}{opts_suffix}", dir.0.display());
        open_bdev(&spec, &a).map_err(|e| format!("{spec}: {e}"))
    };
    match contract::run_all(&make, &a, &ContractOpts::default()) {
        Ok(r) => {
            assert_eq!(r.passed.len(), contract::check_names().len(), "{r:?}");
            Some(r)
        }
        Err(e) => panic!("file in {parent}: contract failures:\n{e}"),
    }
}

#[test]
fn file_tmpfs() {
    run_file("/dev/shm", "shm", "16M", "");
}

#[test]
fn file_tmpfs_4k() {
    run_file("/dev/shm", "shm4k", "16M", ",bs=4096");
}

#[test]
fn file_disk_direct() {
    // /var/tmp is usually on a disk file system that takes O_DIRECT (alignment errors are then real).
    run_file("/var/tmp", "disk", "16M", "");
}
