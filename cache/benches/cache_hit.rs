//! Cache-hit benchmark on one core: 4 KiB random reads at QD32 and 128 KiB random reads at QD8, all hits, over a
//! malloc backing device, with the cache channel polled directly on this thread (what one reactor does).
//!
//! Environment: `CACHE_BENCH_SECS` (seconds per figure, default 2), `CACHE_BENCH_MIB` (device and cache size,
//! default 64). Run with `bench/cache-hit.sh`.

#![allow(clippy::vec_box)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::ChannelOpts;
use nvstack_blockdev::malloc::MallocBdev;
use nvstack_blockdev::{IoChannel, IoDesc, IoFlags, IoOp, IoStatus};
use nvstack_cache::{CacheBdev, CacheConfig};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Keep `qd` reads of `io_bytes` in flight at random aligned offsets for `secs`; returns (ios, seconds).
fn run(ch: &mut dyn IoChannel, descs: &mut Vec<Box<IoDesc>>, dev_bytes: u64, io_bytes: u64, secs: f64) -> (u64, f64) {
    let bs = 512u64;
    let slots = dev_bytes / io_bytes;
    let mut rng = Rng(0x1234_5678);
    let mut out: Vec<Box<IoDesc>> = Vec::with_capacity(descs.len());
    let mut ios = 0u64;
    for mut d in descs.drain(..) {
        d.prepare(IoOp::Read, (rng.next() % slots) * io_bytes / bs, io_bytes / bs);
        if let Err(r) = ch.submit(d) {
            panic!("submit refused: {:?}", r.why);
        }
    }
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    loop {
        ch.poll(&mut out);
        let now_done = Instant::now() >= end;
        for mut d in out.drain(..) {
            assert_eq!(d.status, IoStatus::Success);
            ios += 1;
            if now_done {
                descs.push(d);
                continue;
            }
            d.prepare(IoOp::Read, (rng.next() % slots) * io_bytes / bs, io_bytes / bs);
            d.flags = IoFlags::NONE;
            if let Err(r) = ch.submit(d) {
                panic!("submit refused: {:?}", r.why);
            }
        }
        if now_done && ch.outstanding() == 0 {
            break;
        }
    }
    (ios, t0.elapsed().as_secs_f64())
}

fn main() {
    let secs = env_u64("CACHE_BENCH_SECS", 2) as f64;
    let mib = env_u64("CACHE_BENCH_MIB", 64);
    let dev_bytes = mib << 20;
    let arena = Arena::new(ArenaConfig { size_bytes: dev_bytes + (64 << 20), require_hugepages: false, try_1g: false })
        .expect("arena");
    let backing = MallocBdev::new("Malloc0", dev_bytes, 512).expect("malloc");
    let cfg = CacheConfig { cache_bytes: dev_bytes, ..CacheConfig::default() };
    let cache = CacheBdev::new(backing, Arc::clone(&arena), cfg).expect("cache");
    let mut ch = cache.open_cache_channel(ChannelOpts { reactor_index: 0, queue_depth: 64 }).expect("channel");
    let mut pool = BufPool::new(&arena, 128 << 10, 40, 4096, "bench bufs").expect("bufs");
    // Warm: read the whole device once (misses fill every page).
    let mut warm: Vec<Box<IoDesc>> = Vec::new();
    let mut d = IoDesc::new(1);
    d.attach_buf(pool.get().expect("buf")).expect("attach");
    warm.push(d);
    let mut off = 0;
    while off < dev_bytes {
        let mut d = warm.pop().expect("desc");
        d.prepare(IoOp::Read, off / 512, (128 << 10) / 512);
        let d = nvstack_blockdev::bdev::run_sync(ch.as_mut(), d, Duration::from_secs(5)).expect("warm read");
        warm.push(d);
        off += 128 << 10;
    }
    let misses = cache.stats().misses.load(Ordering::Relaxed);
    println!("cache hit benchmark: {mib} MiB device, all cached ({misses} warm-up misses), one core, {secs} s per figure");
    // 4 KiB QD32: descriptors with 4 KiB buffers carved from 128 KiB ones would waste; use a 4 KiB pool.
    let mut small = BufPool::new(&arena, 4096, 32, 4096, "bench 4k").expect("bufs");
    let mut descs: Vec<Box<IoDesc>> = (0..32)
        .map(|_| {
            let mut d = IoDesc::new(1);
            d.attach_buf(small.get().expect("buf")).expect("attach");
            d
        })
        .collect();
    let (ios, t) = run(ch.as_mut(), &mut descs, dev_bytes, 4096, secs);
    println!("4 KiB random read hits, QD32, 1 core: {:>8.3} M IOPS", ios as f64 / t / 1e6);
    let mut big: Vec<Box<IoDesc>> = (0..8)
        .map(|_| {
            let mut d = IoDesc::new(1);
            d.attach_buf(pool.get().expect("buf")).expect("attach");
            d
        })
        .collect();
    let (ios, t) = run(ch.as_mut(), &mut big, dev_bytes, 128 << 10, secs);
    println!("128 KiB random read hits, QD8, 1 core: {:>8.2} GB/s", ios as f64 * 131072.0 / t / 1e9);
    let s = cache.stats();
    println!(
        "counters: hits {} misses {} dirty bytes {} writeback ios {} (avg {} bytes) evictions {}",
        s.hits.load(Ordering::Relaxed),
        s.misses.load(Ordering::Relaxed),
        s.dirty_bytes.load(Ordering::Relaxed),
        s.writeback_ios.load(Ordering::Relaxed),
        s.writeback_avg_bytes(),
        s.evictions.load(Ordering::Relaxed)
    );
}
