//! "Nothing on the I/O path without errors": 4 KiB random-read cache hits at QD32 on one core with and without the
//! poison listener running (its thread polling SIGBUS ring, media queue and badblocks every 10 ms, the cache
//! registered as the arena's reverse map and action target), in alternating rounds. Prints each round and the
//! medians; the listener must cost nothing measurable.
//!
//! Run: `cargo bench -p nvstack-rmap --bench cache_with_listener` (or bench/cache-listener.sh).
//! Environment: `ROUNDS` (default 4), `SECS` per run (default 2).

#![allow(clippy::vec_box)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::{run_sync, ChannelOpts};
use nvstack_blockdev::malloc::MallocBdev;
use nvstack_blockdev::{BlockDev, IoChannel, IoDesc, IoOp, IoStatus};
use nvstack_cache::{CacheBdev, CacheConfig};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool};
use nvstack_rmap::cache::CacheMaps;
use nvstack_rmap::journal::Journal;
use nvstack_rmap::listener::{PoisonPath, DEFAULT_POLL_PERIOD};

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn hits(ch: &mut dyn IoChannel, descs: &mut Vec<Box<IoDesc>>, dev_bytes: u64, secs: f64) -> f64 {
    let slots = dev_bytes / 4096;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % slots) * 8
    };
    let mut out: Vec<Box<IoDesc>> = Vec::with_capacity(descs.len());
    for mut d in descs.drain(..) {
        d.prepare(IoOp::Read, next(), 8);
        ch.submit(d).expect("submit");
    }
    let (t0, mut ios) = (Instant::now(), 0u64);
    let end = t0 + Duration::from_secs_f64(secs);
    loop {
        ch.poll(&mut out);
        let stop = Instant::now() >= end;
        for mut d in out.drain(..) {
            assert_eq!(d.status, IoStatus::Success);
            ios += 1;
            if stop {
                descs.push(d);
            } else {
                d.prepare(IoOp::Read, next(), 8);
                ch.submit(d).expect("submit");
            }
        }
        if stop && ch.outstanding() == 0 {
            return ios as f64 / t0.elapsed().as_secs_f64();
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let rounds = env_u64("ROUNDS", 4);
    let secs = env_u64("SECS", 2) as f64;
    let dev_bytes = 64u64 << 20;
    let arena = Arena::new(ArenaConfig { size_bytes: dev_bytes + (16 << 20), require_hugepages: false, try_1g: false }).expect("arena");
    let cache = CacheBdev::new(MallocBdev::new("Malloc0", dev_bytes, 512).expect("malloc"), Arc::clone(&arena), CacheConfig {
        cache_bytes: dev_bytes,
        ..CacheConfig::default()
    })
    .expect("cache");
    let mut ch = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 64 }).expect("channel");
    let mut pool = BufPool::new(&arena, 4096, 33, 4096, "bench").expect("bufs");
    // Warm: every page cached.
    let mut d = IoDesc::new(1);
    d.attach_buf(pool.get().expect("buf")).expect("attach");
    for off in (0..dev_bytes).step_by(4096) {
        d.prepare(IoOp::Read, off / 512, 8);
        d = run_sync(ch.as_mut(), d, Duration::from_secs(5)).expect("warm");
    }
    let mut descs: Vec<Box<IoDesc>> = (0..32)
        .map(|_| {
            let mut d = IoDesc::new(1);
            d.attach_buf(pool.get().expect("buf")).expect("attach");
            d
        })
        .collect();
    let path = PoisonPath::new(Journal::new(64, None).expect("journal"));
    CacheMaps::attach(&path, &arena).add(cache.name(), &cache);
    println!("cache hits (4 KiB random reads, QD32, one core, {secs} s per run) with and without the poison listener");
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for r in 1..=rounds {
        let a = hits(ch.as_mut(), &mut descs, dev_bytes, secs);
        let listener = path.spawn(DEFAULT_POLL_PERIOD).expect("listener");
        let b = hits(ch.as_mut(), &mut descs, dev_bytes, secs);
        listener.stop();
        println!("round {r}: without {:.3} M IOPS, with the listener {:.3} M IOPS", a / 1e6, b / 1e6);
        without.push(a);
        with.push(b);
    }
    let (a, b) = (median(without), median(with));
    println!("median: without {:.3} M IOPS, with {:.3} M IOPS ({:+.1}%)", a / 1e6, b / 1e6, (b / a - 1.0) * 100.0);
}
