//! The block-device contract suite against the pmem backend (a plain file here; devdax and fsdax run in the QEMU
//! suite), plus a poisoned read that must fail the request, not the process.

use std::sync::Arc;
use std::time::Duration;

use nvstack_blockdev::bdev::{run_sync, ChannelOpts};
use nvstack_blockdev::contract::{self, ContractOpts};
use nvstack_blockdev::spec::open_bdev;
use nvstack_blockdev::{BlockDev, IoDesc, IoError, IoOp, IoStatus};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool};

fn arena() -> Arc<Arena> {
    Arena::new(ArenaConfig { size_bytes: 64 << 20, ..Default::default() }).expect("arena")
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("nvstack-pmem-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&p).expect("temp dir");
    p
}

#[test]
fn pmem_file_passes_the_contract() {
    let dir = tempdir("contract");
    let a = arena();
    let n = std::sync::atomic::AtomicU32::new(0);
    let make = || -> Result<Arc<dyn BlockDev>, String> {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        open_bdev(&format!("pmem:{}/p{i}.img:8M", dir.display()), &a).map_err(|e| e.to_string())
    };
    let r = contract::run_all(&make, &a, &ContractOpts::default()).unwrap_or_else(|e| panic!("pmem contract:\n{e}"));
    assert_eq!(r.passed.len(), contract::check_names().len(), "{r:?}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn poisoned_read_fails_the_request_not_the_process() {
    let dir = tempdir("poison");
    let path = dir.join("p.img");
    let a = arena();
    let dev = open_bdev(&format!("pmem:{}:1M,bs=4096", path.display()), &a).expect("open");
    // Truncating the file under the mapping makes reads of the lost pages raise a real SIGBUS: the same signal a
    // consumed machine check raises. The request must fail with a media error naming the lost blocks.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(512 << 10).unwrap();
    let mut ch = dev.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).unwrap();
    let mut pool = BufPool::new(&a, 64 << 10, 2, 4096, "test").unwrap();
    let mut io = IoDesc::new(4);
    io.prepare(IoOp::Read, 120, 16); // blocks 120..136: 128..136 are beyond the new end
    io.attach_buf(pool.get().unwrap()).unwrap();
    let io = run_sync(ch.as_mut(), io, Duration::from_secs(5)).expect("completes");
    assert_eq!(io.status, IoStatus::Failed(IoError::Media { offset_blocks: 128, num_blocks: 8 }));
    // Blocks before the hole still read.
    let mut io2 = IoDesc::new(4);
    io2.prepare(IoOp::Read, 0, 16);
    io2.attach_buf(pool.get().unwrap()).unwrap();
    let io2 = run_sync(ch.as_mut(), io2, Duration::from_secs(5)).expect("completes");
    assert_eq!(io2.status, IoStatus::Success);
    drop(io);
    let _ = std::fs::remove_dir_all(&dir);
}
