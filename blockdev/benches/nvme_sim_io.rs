//! 4 KiB random reads through the nvme bdev against the simulated controller, on this (the "reactor") thread:
//! submit + completion, driver and bdev. Used by `bench/nvme-sim-callgrind.sh`, which runs it under callgrind
//! with `--separate-threads=yes` at two run lengths and takes the slope of this thread's instruction count.
//!
//! Usage: `nvme_sim_io [IOS] [QD]` (defaults 100000 and 32). Prints one JSON line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::ChannelOpts;
use nvstack_blockdev::nvme::{sim_config, NvmeBdev};
use nvstack_blockdev::{BlockDev, IoDesc, IoOp, IoStatus};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool};
use nvstack_driver::nvme::sim::SimController;
use nvstack_driver::nvme::{Controller, CtrlrOpts, Transport};

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let ios = args.first().copied().unwrap_or(100_000);
    let qd = args.get(1).copied().unwrap_or(32) as usize;
    let arena = Arena::new(ArenaConfig { size_bytes: 64 << 20, ..Default::default() }).expect("arena");
    let sim = SimController::start(Arc::clone(&arena), sim_config()).expect("sim");
    let t: Arc<dyn Transport> = sim.clone();
    let ctrl = Controller::attach(t, CtrlrOpts::default()).expect("attach");
    let bdev = NvmeBdev::new(ctrl, 1, "Nvme0n1").expect("bdev");
    let blocks = bdev.geometry().block_count;
    let mut ch = bdev.open_channel(ChannelOpts { reactor_index: 1, queue_depth: qd as u32 }).expect("channel");
    let mut pool = BufPool::new(&arena, 4096, qd as u32, 4096, "bench").expect("pool");
    let mut free: Vec<Box<IoDesc>> = (0..qd)
        .map(|_| {
            let mut d = IoDesc::new(1);
            d.attach_buf(pool.get().expect("buf")).expect("attach");
            d
        })
        .collect();
    let mut done: Vec<Box<IoDesc>> = Vec::with_capacity(qd);
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let (mut submitted, mut completed, mut empty_polls) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(600);
    let t0 = Instant::now();
    // Each completed descriptor is resubmitted at once: no free list in the loop.
    while let Some(mut io) = free.pop() {
        if submitted == ios {
            break;
        }
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        io.prepare(IoOp::Read, rng % blocks, 1);
        ch.submit(io).expect("initial submit");
        submitted += 1;
    }
    while completed < ios {
        if ch.poll(&mut done) == 0 {
            empty_polls += 1;
            // Let the simulator thread run (valgrind runs one thread at a time).
            std::thread::yield_now();
            assert!(Instant::now() < deadline, "bench did not finish");
            continue;
        }
        while let Some(mut io) = done.pop() {
            if io.status != IoStatus::Success {
                panic!("I/O failed: {:?}", io.status);
            }
            completed += 1;
            if submitted < ios {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                io.prepare(IoOp::Read, rng % blocks, 1);
                if let Err(r) = ch.submit(io) {
                    panic!("resubmit refused: {:?}", r.why);
                }
                submitted += 1;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{{\"ios\": {completed}, \"qd\": {qd}, \"seconds\": {secs:.3}, \"iops\": {:.0}, \"empty_polls\": {empty_polls}}}",
        completed as f64 / secs
    );
    drop(ch);
}
