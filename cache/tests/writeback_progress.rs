//! Background writeback always makes progress: a dirty run longer than the backing's max transfer, whose first
//! cluster is already being written back (locked), must not make the writeback scan spin on the same cluster (it
//! once looped forever in `poll`, hanging the reactor).

#![allow(clippy::vec_box)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::{ChannelOpts, Rejected};
use nvstack_blockdev::malloc::MallocBdev;
use nvstack_blockdev::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoOp, IoStatus};
use nvstack_cache::{CacheBdev, CacheConfig};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool};

/// Writes are held (not completed) until `release` is set.
struct Gate {
    inner: Arc<dyn BlockDev>,
    release: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
}

struct GateChannel {
    inner: Box<dyn IoChannel>,
    release: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    held: Vec<Box<IoDesc>>,
}

impl BlockDev for Gate {
    fn name(&self) -> &str {
        "gate"
    }
    fn product_name(&self) -> &'static str {
        "Gate disk"
    }
    fn geometry(&self) -> Geometry {
        Geometry { max_transfer_bytes: 256 << 10, ..self.inner.geometry() }
    }
    fn features(&self) -> Features {
        self.inner.features()
    }
    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(GateChannel {
            inner: self.inner.open_channel(opts)?,
            release: Arc::clone(&self.release),
            writes: Arc::clone(&self.writes),
            held: Vec::with_capacity(64),
        }))
    }
}

impl IoChannel for GateChannel {
    fn submit(&mut self, io: Box<IoDesc>) -> Result<(), Rejected> {
        if io.op == IoOp::Write && !self.release.load(Ordering::Acquire) {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.held.push(io);
            return Ok(());
        }
        if io.op == IoOp::Write {
            self.writes.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.submit(io)
    }
    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        let mut n = 0;
        if self.release.load(Ordering::Acquire) {
            for io in self.held.drain(..) {
                match self.inner.submit(io) {
                    Ok(()) => {}
                    Err(r) => {
                        let mut io = r.io;
                        io.status = IoStatus::Failed(nvstack_blockdev::IoError::Aborted);
                        out.push(io);
                        n += 1;
                    }
                }
            }
        }
        n + self.inner.poll(out)
    }
    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.held.len()
    }
    fn queue_depth(&self) -> u32 {
        self.inner.queue_depth()
    }
}

#[test]
fn a_long_dirty_run_with_its_first_cluster_locked_does_not_spin() {
    let arena = Arena::new(ArenaConfig { size_bytes: 16 << 20, require_hugepages: false, try_1g: false }).expect("arena");
    let release = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let gate = Arc::new(Gate {
        inner: MallocBdev::new("Malloc0", 8 << 20, 512).expect("malloc"),
        release: Arc::clone(&release),
        writes: Arc::clone(&writes),
    });
    // Periodic writeback at every poll; 4 MiB of cache so 1 MiB of dirty data is below the pressure mark.
    let cfg = CacheConfig { cache_bytes: 4 << 20, writeback_interval: Duration::ZERO, ..CacheConfig::default() };
    let cache = CacheBdev::new(gate, Arc::clone(&arena), cfg).expect("cache");
    let mut ch = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 16 }).expect("channel");
    let mut pool = BufPool::new(&arena, 128 << 10, 8, 4096, "test").expect("pool");
    let mut out = Vec::with_capacity(16);
    // 1 MiB of contiguous dirty data in 8 writes of 128 KiB (each completes in submit: write-back mode).
    for k in 0..8u64 {
        let mut d = IoDesc::new(1);
        let mut buf = pool.get().expect("buf");
        buf.fill(k as u8 + 1);
        d.attach_buf(buf).expect("attach");
        d.prepare(IoOp::Write, k * 256, 256);
        ch.submit(d).expect("submit");
        let deadline = Instant::now() + Duration::from_secs(5);
        while ch.poll(&mut out) == 0 && Instant::now() < deadline {}
        let mut d = out.pop().expect("write completed");
        assert_eq!(d.status, IoStatus::Success);
        let mut bufs = Vec::new();
        d.take_bufs(&mut bufs);
        for b in bufs {
            let _ = pool.put(b);
        }
    }
    // Writebacks start (clusters of at most 256 KiB) and stay in flight; these polls must return.
    let t0 = Instant::now();
    for _ in 0..100 {
        ch.poll(&mut out);
    }
    assert!(t0.elapsed() < Duration::from_secs(5), "polls with locked clusters took {:?}", t0.elapsed());
    assert!(writes.load(Ordering::Relaxed) >= 1);
    // Let them finish: everything gets written back.
    release.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().dirty_bytes.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        ch.poll(&mut out);
    }
    assert_eq!(cache.stats().dirty_bytes.load(Ordering::Relaxed), 0);
    // 1 MiB in clusters of at most 256 KiB: four, plus at most one split where a scan met the held cluster.
    let ios = cache.stats().writeback_ios.load(Ordering::Relaxed);
    assert!((4..=5).contains(&ios), "{ios} writebacks for 1 MiB");
}
