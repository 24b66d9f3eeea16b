//! The striped cache on 2 reactors against a model: random concurrent reads, writes, FUA writes, direct reads and
//! writes and flushes from both reactors, over malloc and over file backing.
//!
//! Model: the device is 4 KiB blocks; every block write carries (block, version) in every word, so a read names
//! exactly which write it returned. Each block has one writer (the worker owning its 32 KiB chunk), which never has
//! two writes of one block in flight, so versions of a block rise one by one. Any worker reads any block. A read of
//! block `b` must return a version between the last write of `b` completed before the read was submitted and the
//! last one started before it completed: never older (stale), never garbage or torn. Stripes are 16 KiB, so most
//! multi-block requests cross shards and half of all pieces travel to the other reactor.
//!
//! After a flush (mid-run, with the worker's own writes paused, and at the end) the backing device holds exactly the
//! model's contents for every block concerned.

// Descriptors are pooled boxes moved in and out of channels, as the IoChannel contract has them.
#![allow(clippy::vec_box)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::{run_sync, ChannelOpts};
use nvstack_blockdev::file::{FileBdev, FileConfig};
use nvstack_blockdev::malloc::MallocBdev;
use nvstack_blockdev::reactor::{Msg, PollOutcome, Poller, ReactorConfig, ReactorCtx, Reactors};
use nvstack_blockdev::{BlockDev, IoChannel, IoDesc, IoFlags, IoOp, IoStatus};
use nvstack_cache::{CacheBdev, CacheConfig};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool, DmaBuf};
use proptest::prelude::*;

const BLK: u64 = 4096;
const BS: u64 = 512;
const BLOCKS: u64 = 1024; // 4 MiB device
const CHUNK: u64 = 8; // blocks per ownership chunk
const STRIPE: u64 = 16 << 10;
const MAX_BLOCKS_PER_IO: u64 = 4; // the cache's max transfer is one stripe
const QD: usize = 16;
const WORKERS: usize = 2;

fn word(block: u64, version: u64, i: u64) -> u64 {
    let mut z = block.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version.wrapping_mul(0xbf58_476d_1ce4_e5b9) ^ i;
    z ^= z >> 31;
    z
}

/// Fill `buf` (one block) with the pattern of (block, version).
fn fill(buf: &mut [u8], block: u64, version: u64) {
    for (i, c) in buf.chunks_exact_mut(8).enumerate() {
        let w = match i {
            0 => block,
            1 => version,
            _ => word(block, version, i as u64),
        };
        c.copy_from_slice(&w.to_le_bytes());
    }
}

/// The version a block's bytes hold, or a description of the garbage.
fn decode(buf: &[u8], block: u64) -> Result<u64, String> {
    let w = |i: usize| u64::from_le_bytes(buf[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    if w(0) != block {
        return Err(format!("block {block}: holds block {}'s data", w(0)));
    }
    let v = w(1);
    for i in 2..(BLK as usize / 8) {
        if w(i) != word(block, v, i as u64) {
            return Err(format!("block {block}: torn or garbage at word {i} (version {v})"));
        }
    }
    Ok(v)
}

struct Model {
    started: Vec<AtomicU64>,
    completed: Vec<AtomicU64>,
    errors: Mutex<Vec<String>>,
    finished: AtomicU64,
    /// Per-block history of writes (version, flags) for failure reports.
    history: Mutex<Vec<(u64, u64, String)>>,
}

impl Model {
    fn fail(&self, e: String) {
        if let Ok(mut v) = self.errors.lock() {
            if v.len() < 20 {
                v.push(e);
            }
        }
    }
}

fn owner(block: u64) -> usize {
    ((block / CHUNK) % WORKERS as u64) as usize
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Read { lo: [u64; MAX_BLOCKS_PER_IO as usize] },
    Write { version: [u64; MAX_BLOCKS_PER_IO as usize] },
    Flush,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Running,
    /// Pausing own writes, then flushing, then checking the backing for own blocks.
    Quiesce,
    FlushWait,
    Done,
}

struct Worker {
    id: usize,
    ch: Box<dyn IoChannel>,
    backing: Box<dyn IoChannel>,
    /// One buffer per slot; descriptors carry raw segments into their slot's buffer.
    bufs: Vec<DmaBuf>,
    _pool: BufPool,
    free: Vec<Box<IoDesc>>,
    kinds: Vec<Option<(Kind, u64, u64)>>,
    own_inflight: Vec<bool>,
    rng: Rng,
    ops_left: u32,
    checks_left: u32,
    mode: Mode,
    out: Vec<Box<IoDesc>>,
    model: Arc<Model>,
    check_desc: Option<Box<IoDesc>>,
    quiesce_slot: Option<usize>,
}

impl Worker {
    #[allow(clippy::too_many_arguments)] // a test worker's whole set-up in one place
    fn new(id: usize, ctx_index: usize, cache: &Arc<CacheBdev>, backing: &Arc<dyn BlockDev>, arena: &Arc<Arena>, model: Arc<Model>, seed: u64, ops: u32) -> Worker {
        let ch = cache.open_channel(ChannelOpts { reactor_index: ctx_index, queue_depth: QD as u32 }).expect("cache channel");
        let bch = backing.open_channel(ChannelOpts { reactor_index: ctx_index, queue_depth: 4 }).expect("backing channel");
        let mut pool = BufPool::new(arena, (MAX_BLOCKS_PER_IO * BLK) as u32, QD as u32 + 1, 4096, "test bufs").expect("pool");
        let mut free = Vec::new();
        let mut bufs = Vec::new();
        for i in 0..=QD {
            let mut d = IoDesc::new(4);
            d.ctx = i as u64;
            bufs.push(pool.get().expect("buf"));
            if i < QD {
                free.push(d);
            }
        }
        let check = IoDesc::new(2);
        Worker {
            id,
            ch,
            backing: bch,
            bufs,
            _pool: pool,
            free,
            kinds: vec![None; QD],
            own_inflight: vec![false; BLOCKS as usize],
            rng: Rng(seed | 1),
            ops_left: ops,
            checks_left: 3,
            mode: Mode::Running,
            out: Vec::with_capacity(QD),
            model,
            check_desc: Some(check),
            quiesce_slot: None,
        }
    }

    fn submit_one(&mut self) -> bool {
        let Some(mut d) = self.free.pop() else { return false };
        let slot = d.ctx as usize;
        let roll = self.rng.below(100);
        let n = 1 + self.rng.below(MAX_BLOCKS_PER_IO);
        let (kind, first) = if roll < 3 {
            d.prepare(IoOp::Flush, 0, 0);
            (Kind::Flush, 0)
        } else if roll < 55 {
            // A read anywhere (it may cross a stripe, a chunk and the other worker's blocks).
            let first = self.rng.below(BLOCKS - n + 1);
            let mut lo = [0; MAX_BLOCKS_PER_IO as usize];
            for (k, b) in (first..first + n).enumerate() {
                lo[k] = self.model.completed[b as usize].load(Ordering::Acquire);
            }
            d.prepare(IoOp::Read, first * BLK / BS, n * BLK / BS);
            if self.rng.below(8) == 0 {
                d.flags = IoFlags::DIRECT;
            }
            (Kind::Read { lo }, first)
        } else {
            // A write inside one of our chunks, none of whose blocks has a write of ours in flight.
            let chunk = loop {
                let c = self.rng.below(BLOCKS / CHUNK);
                if owner(c * CHUNK) == self.id {
                    break c;
                }
            };
            let first = chunk * CHUNK + self.rng.below(CHUNK - n + 1);
            if (first..first + n).any(|b| self.own_inflight[b as usize]) {
                self.free.push(d);
                return false;
            }
            let mut version = [0; MAX_BLOCKS_PER_IO as usize];
            for (k, b) in (first..first + n).enumerate() {
                let v = self.model.started[b as usize].fetch_add(1, Ordering::AcqRel) + 1;
                version[k] = v;
                self.own_inflight[b as usize] = true;
                let mut block = vec![0u8; BLK as usize];
                fill(&mut block, b, v);
                self.bufs[slot].write_at(k * BLK as usize, &block).expect("fill");
            }
            d.prepare(IoOp::Write, first * BLK / BS, n * BLK / BS);
            d.flags = match self.rng.below(10) {
                0 => IoFlags::FUA,
                1 => IoFlags::DIRECT,
                _ => IoFlags::NONE,
            };
            if let Ok(mut h) = self.model.history.lock() {
                for (k, b) in (first..first + n).enumerate() {
                    h.push((b, version[k], format!("{:?} {}+{}", d.flags, first, n)));
                }
            }
            (Kind::Write { version }, first)
        };
        self.kinds[slot] = Some((kind, first, if kind == Kind::Flush { 0 } else { n }));
        self.resize_seg(&mut d, n);
        match self.ch.submit(d) {
            Ok(()) => true,
            Err(r) => {
                let mut d = r.io;
                d.clear_raw_segs();
                if let Some((Kind::Write { .. }, first, n)) = self.kinds[slot] {
                    // Never submitted: roll the versions back is impossible (others may read `started`), so treat as
                    // a failure of the test set-up.
                    self.model.fail(format!("write of blocks {first}+{n} refused: {:?}", r.why));
                }
                self.kinds[slot] = None;
                d.ctx = slot as u64;
                self.free.push(d);
                false
            }
        }
    }

    /// Point the descriptor's one segment at the first `n` blocks of its slot's buffer.
    fn resize_seg(&mut self, d: &mut IoDesc, n: u64) {
        d.clear_raw_segs();
        if !d.op.has_data() {
            return;
        }
        let buf = &self.bufs[d.ctx as usize];
        let ptr = std::ptr::NonNull::new(buf.as_ptr()).expect("non-null");
        // SAFETY: `n` blocks fit in the slot's buffer (n <= MAX_BLOCKS_PER_IO), which this worker owns, and nothing
        // touches it until the descriptor comes back.
        unsafe { d.push_seg_raw(ptr, buf.iova(), (n * BLK) as u32) }.expect("segment");
    }

    fn completed(&mut self, mut d: Box<IoDesc>) {
        let slot = d.ctx as usize;
        let Some((kind, first, n)) = self.kinds[slot].take() else {
            self.model.fail(format!("completion of an unknown slot {slot}"));
            return;
        };
        let st = d.status;
        match kind {
            Kind::Flush => {
                if st != IoStatus::Success {
                    self.model.fail(format!("flush failed: {st:?}"));
                }
                // Only the quiesce flush (not a random one submitted before the pause) starts the check.
                if self.mode == Mode::FlushWait && self.quiesce_slot == Some(slot) {
                    self.quiesce_slot = None;
                    self.check_backing();
                    self.mode = Mode::Running;
                }
            }
            Kind::Read { lo } => {
                if st != IoStatus::Success {
                    self.model.fail(format!("read of blocks {first}+{n} failed: {st:?}"));
                } else {
                    let buf = &self.bufs[slot];
                    let mut block = vec![0u8; BLK as usize];
                    for k in 0..n {
                        let b = first + k;
                        buf.read_at((k * BLK) as usize, &mut block).expect("read");
                        let hi = self.model.started[b as usize].load(Ordering::Acquire);
                        match decode(&block, b) {
                            Ok(v) if v >= lo[k as usize] && v <= hi => {}
                            Ok(v) => self.model.fail(format!(
                                "worker {}: read of block {b} returned version {v}, outside {}..={hi} (flags {:?})",
                                self.id, lo[k as usize], d.flags
                            )),
                            Err(e) => self.model.fail(format!("worker {}: {e}", self.id)),
                        }
                    }
                }
            }
            Kind::Write { version } => {
                if st != IoStatus::Success {
                    self.model.fail(format!("write of blocks {first}+{n} failed: {st:?}"));
                }
                for k in 0..n {
                    let b = first + k;
                    self.model.completed[b as usize].store(version[k as usize], Ordering::Release);
                    self.own_inflight[b as usize] = false;
                }
            }
        }
        d.clear_raw_segs();
        d.ctx = slot as u64;
        self.free.push(d);
    }

    /// After a flush with our writes paused: the backing holds exactly the model's version of each of our blocks.
    fn check_backing(&mut self) {
        let Some(mut d) = self.check_desc.take() else { return };
        let me = self.id;
        for b in (0..BLOCKS).filter(|&b| owner(b) == me) {
            d.prepare(IoOp::Read, b * BLK / BS, BLK / BS);
            d.ctx = QD as u64;
            self.resize_seg(&mut d, 1);
            let back = run_sync(self.backing.as_mut(), d, Duration::from_secs(10));
            let Ok(mut back) = back else {
                self.model.fail("backing read for the flush check failed".into());
                return;
            };
            let mut block = vec![0u8; BLK as usize];
            self.bufs[QD].read_at(0, &mut block).expect("read");
            let want = self.model.completed[b as usize].load(Ordering::Acquire);
            match decode(&block, b) {
                Ok(v) if v == want => {}
                Ok(v) => self.model.fail(format!("after a flush the backing holds version {v} of block {b}, the model {want}")),
                Err(e) => self.model.fail(format!("after a flush the backing: {e}")),
            }
            back.clear_raw_segs();
            d = back;
        }
        self.check_desc = Some(d);
    }
}

impl Poller for Worker {
    fn poll(&mut self, _ctx: &mut ReactorCtx) -> PollOutcome {
        if self.mode == Mode::Done {
            return PollOutcome::Done;
        }
        self.out.clear();
        self.ch.poll(&mut self.out);
        let done: Vec<_> = self.out.drain(..).collect();
        for d in done {
            self.completed(d);
        }
        match self.mode {
            Mode::Running => {
                if self.ops_left == 0 {
                    if self.free.len() == QD {
                        self.mode = Mode::Done;
                        self.model.finished.fetch_add(1, Ordering::AcqRel);
                    }
                    return PollOutcome::Busy;
                }
                if self.checks_left > 0 && self.rng.below(1500) == 0 {
                    self.checks_left -= 1;
                    self.mode = Mode::Quiesce;
                    return PollOutcome::Busy;
                }
                while self.ops_left > 0 && !self.free.is_empty() {
                    if self.submit_one() {
                        self.ops_left -= 1;
                    } else {
                        break;
                    }
                }
            }
            Mode::Quiesce => {
                if self.own_inflight.iter().any(|&x| x) {
                    return PollOutcome::Busy;
                }
                let Some(mut d) = self.free.pop() else { return PollOutcome::Busy };
                let slot = d.ctx as usize;
                d.prepare(IoOp::Flush, 0, 0);
                d.clear_raw_segs();
                self.kinds[slot] = Some((Kind::Flush, 0, 0));
                match self.ch.submit(d) {
                    Ok(()) => {
                        self.mode = Mode::FlushWait;
                        self.quiesce_slot = Some(slot);
                    }
                    Err(r) => {
                        self.model.fail(format!("flush refused: {:?}", r.why));
                        self.mode = Mode::Done;
                    }
                }
            }
            Mode::FlushWait | Mode::Done => {}
        }
        PollOutcome::Busy
    }
}

fn run(seed: u64, file: bool, ops: u32) {
    let arena = Arena::new(ArenaConfig { size_bytes: 8 << 20, require_hugepages: false, try_1g: false }).expect("arena");
    let tmp = std::env::temp_dir().join(format!("nvstack-striped-{}-{seed:x}", std::process::id()));
    let backing: Arc<dyn BlockDev> = if file {
        std::fs::create_dir_all(&tmp).expect("tmp dir");
        let fc = FileConfig { path: tmp.join("disk.img"), size_bytes: Some(BLOCKS * BLK), block_size: Some(BS as u32) };
        FileBdev::open("file0", &fc, &arena).expect("file bdev")
    } else {
        MallocBdev::new("Malloc0", BLOCKS * BLK, BS as u32).expect("malloc")
    };
    // Version 0 of every block on the backing device.
    {
        let mut ch = backing.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel");
        let mut pool = BufPool::new(&arena, BLK as u32, 1, 4096, "prefill").expect("pool");
        let mut d = IoDesc::new(1);
        d.attach_buf(pool.get().expect("buf")).expect("attach");
        let mut block = vec![0u8; BLK as usize];
        for b in 0..BLOCKS {
            fill(&mut block, b, 0);
            d.bufs_mut()[0].write_at(0, &block).expect("fill");
            d.prepare(IoOp::Write, b * BLK / BS, BLK / BS);
            d = run_sync(ch.as_mut(), d, Duration::from_secs(10)).expect("prefill");
            assert_eq!(d.status, IoStatus::Success);
        }
    }
    let cores = nvstack_blockdev::coremask::allowed_cores();
    let mut rc = ReactorConfig::new((0..WORKERS).map(|i| cores[i % cores.len()]).collect());
    rc.pin = false;
    rc.idle_backoff_rounds = Some(1000);
    let reactors = Reactors::start(rc).expect("reactors");
    // 1 MiB of cache for a 4 MiB device: 128 pages per shard, so pages are evicted and refetched all the time.
    let cfg = CacheConfig { cache_bytes: 1 << 20, stripe_bytes: STRIPE, writeback_interval: Duration::from_millis(5), ..CacheConfig::default() };
    let cache = CacheBdev::new_striped(Arc::clone(&backing), Arc::clone(&arena), cfg, &reactors).expect("striped cache");
    let model = Arc::new(Model {
        started: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        completed: (0..BLOCKS).map(|_| AtomicU64::new(0)).collect(),
        errors: Mutex::new(Vec::new()),
        finished: AtomicU64::new(0),
        history: Mutex::new(Vec::new()),
    });
    for w in 0..WORKERS {
        let (c, b, a, m) = (Arc::clone(&cache), Arc::clone(&backing), Arc::clone(&arena), Arc::clone(&model));
        let s = seed.wrapping_add(w as u64 * 0x1234_5678);
        reactors
            .send(w, Msg::Run(Box::new(move |ctx| ctx.add_poller(Box::new(Worker::new(w, ctx.index(), &c, &b, &a, m, s, ops))))))
            .expect("send");
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while model.finished.load(Ordering::Acquire) < WORKERS as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let finished = model.finished.load(Ordering::Acquire);
    // Final flush from a channel on this thread (pieces go to both shards), then the backing holds the model.
    let mut ch = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel");
    let mut f = IoDesc::new(1);
    f.prepare(IoOp::Flush, 0, 0);
    let f = run_sync(ch.as_mut(), f, Duration::from_secs(30)).expect("final flush");
    assert_eq!(f.status, IoStatus::Success);
    drop(ch);
    let stats = cache.stats();
    let mut bch = backing.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel");
    let mut pool = BufPool::new(&arena, BLK as u32, 1, 4096, "final check").expect("pool");
    let mut d = IoDesc::new(1);
    d.attach_buf(pool.get().expect("buf")).expect("attach");
    let mut block = vec![0u8; BLK as usize];
    let mut mismatches = Vec::new();
    for b in 0..BLOCKS {
        d.prepare(IoOp::Read, b * BLK / BS, BLK / BS);
        d = run_sync(bch.as_mut(), d, Duration::from_secs(10)).expect("read backing");
        d.bufs()[0].read_at(0, &mut block).expect("read");
        let want = model.completed[b as usize].load(Ordering::Acquire);
        match decode(&block, b) {
            Ok(v) if v == want => {}
            other => mismatches.push(format!("block {b}: backing {other:?}, model {want}")),
        }
    }
    drop(cache);
    reactors.stop().expect("stop");
    let _ = std::fs::remove_dir_all(&tmp);
    let errors = model.errors.lock().map(|v| v.clone()).unwrap_or_default();
    if !errors.is_empty() {
        let h = model.history.lock().map(|v| v.clone()).unwrap_or_default();
        for e in &errors {
            if let Some(b) = e.split("of block ").nth(1).and_then(|t| t.split(',').next()).and_then(|t| t.trim().parse::<u64>().ok()) {
                let writes: Vec<_> = h.iter().filter(|x| x.0 == b).map(|x| format!("v{} {}", x.1, x.2)).collect();
                eprintln!("block {b}: writes {writes:?}");
            }
        }
    }
    assert_eq!(finished, WORKERS as u64, "workers did not finish in time; errors: {errors:?}");
    assert!(errors.is_empty(), "seed {seed:#x}: {errors:#?}");
    assert!(mismatches.is_empty(), "seed {seed:#x}: after the final flush: {:?}", &mismatches[..mismatches.len().min(10)]);
    // The run exercised both paths: hits and misses, evictions (4 MiB through 1 MiB) and writebacks.
    assert!(stats.hits.load(Ordering::Relaxed) > 0 && stats.misses.load(Ordering::Relaxed) > 0);
    assert!(stats.writeback_ios.load(Ordering::Relaxed) > 0);
    // Remote read hits come back as loans of the shard's pages (copied by the caller's reactor).
    assert!(stats.loans.load(Ordering::Relaxed) > 0, "no read loan was made");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn two_reactors_over_malloc_match_the_model(seed in any::<u64>()) {
        run(seed, false, 3000);
    }

    #[test]
    fn two_reactors_over_file_match_the_model(seed in any::<u64>()) {
        run(seed, true, 2000);
    }
}

#[test]
fn a_second_striped_channel_on_one_reactor_works_and_flush_reaches_every_shard() {
    run(0x5eed, false, 500);
}


/// A striped cache of 2 shards (reactors that do not pin) over a 4 MiB malloc device, with its arena and backing.
/// Keep the reactors alive as long as the cache.
fn striped_rig() -> (Arc<Arena>, Arc<dyn BlockDev>, Reactors, Arc<CacheBdev>) {
    let arena = Arena::new(ArenaConfig { size_bytes: 16 << 20, require_hugepages: false, try_1g: false }).expect("arena");
    let backing: Arc<dyn BlockDev> = MallocBdev::new("Malloc0", 4 << 20, BS as u32).expect("malloc");
    let cores = nvstack_blockdev::coremask::allowed_cores();
    let mut rc = ReactorConfig::new((0..WORKERS).map(|i| cores[i % cores.len()]).collect());
    rc.pin = false;
    rc.idle_backoff_rounds = Some(1000);
    let reactors = Reactors::start(rc).expect("reactors");
    let cfg = CacheConfig { cache_bytes: 4 << 20, stripe_bytes: STRIPE, ..CacheConfig::default() };
    let cache = CacheBdev::new_striped(Arc::clone(&backing), Arc::clone(&arena), cfg, &reactors).expect("cache");
    (arena, backing, reactors, cache)
}

fn buf_ptr(b: &DmaBuf) -> std::ptr::NonNull<u8> {
    std::ptr::NonNull::new(b.as_ptr()).expect("a DMA buffer has an address")
}

/// One 4 KiB request at byte `page` on one segment of the buffer at `ptr`.
fn page_desc(op: IoOp, page: u64, ptr: std::ptr::NonNull<u8>, iova: u64) -> Box<IoDesc> {
    let mut d = IoDesc::new(1);
    // SAFETY: the callers' buffers outlive every request they make, each of which completes before the test ends.
    unsafe { d.push_seg_raw(ptr, iova, BLK as u32) }.expect("seg");
    d.prepare(op, page / BS, BLK / BS);
    d
}

/// WRITE ZEROES and DEALLOCATE through a striped cache: split per stripe, sent in batches, the cached copies
/// dropped; reads return zeroes afterwards, neighbours keep their data, and the backing device holds the zeroes.
#[test]
fn write_zeroes_across_many_stripes_goes_through_in_batches() {
    let (arena, backing, reactors, cache) = striped_rig();
    assert!(cache.features().write_zeroes && cache.features().deallocate, "the malloc backing's features pass through");
    let mut ch = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel");
    let mut pool = BufPool::new(&arena, STRIPE as u32, 1, 4096, "test").expect("pool");
    let buf = pool.get().expect("buf");
    let ptr = std::ptr::NonNull::new(buf.as_ptr()).expect("ptr");
    let mut rw = |op: IoOp, off: u64, len: u64, fill: Option<u8>| -> (IoStatus, Vec<u8>) {
        let mut d = IoDesc::new(1);
        if let Some(b) = fill {
            // SAFETY: `len` <= the buffer's size; no request is in flight on it.
            unsafe { std::ptr::write_bytes(ptr.as_ptr(), b, len as usize) };
        }
        if op.has_data() {
            // SAFETY: the buffer outlives the request, which completes inside run_sync.
            unsafe { d.push_seg_raw(ptr, buf.iova(), len as u32) }.expect("seg");
        }
        d.prepare(op, off / BS, len / BS);
        let d = run_sync(ch.as_mut(), d, Duration::from_secs(10)).expect("request");
        let mut out = vec![0u8; len as usize];
        if op == IoOp::Read {
            // SAFETY: the read completed into the buffer; `len` bytes are valid.
            unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), out.as_mut_ptr(), len as usize) };
        }
        (d.status, out)
    };
    // 40 stripes of data (cached, dirty), then zero 38 of them from the middle of the first to the middle of the last.
    for k in 0..40u64 {
        assert_eq!(rw(IoOp::Write, k * STRIPE, STRIPE, Some(0xa5)).0, IoStatus::Success);
    }
    let (zs, ze) = (STRIPE / 2, 39 * STRIPE + STRIPE / 2);
    assert_eq!(rw(IoOp::WriteZeroes, zs, ze - zs, None).0, IoStatus::Success);
    for k in 0..40u64 {
        let (st, data) = rw(IoOp::Read, k * STRIPE, STRIPE, None);
        assert_eq!(st, IoStatus::Success);
        for (i, &b) in data.iter().enumerate() {
            let at = k * STRIPE + i as u64;
            let want = if (zs..ze).contains(&at) { 0 } else { 0xa5 };
            assert_eq!(b, want, "byte {at}");
        }
    }
    // Deallocate a range too (malloc reads it back as zeroes), then flush: the backing holds the same picture.
    assert_eq!(rw(IoOp::Deallocate, 0, STRIPE / 2, None).0, IoStatus::Success);
    let mut f = IoDesc::new(1);
    f.prepare(IoOp::Flush, 0, 0);
    assert_eq!(run_sync(ch.as_mut(), f, Duration::from_secs(10)).expect("flush").status, IoStatus::Success);
    drop(ch);
    let mut bch = backing.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel");
    let mut d = IoDesc::new(1);
    // SAFETY: as above: the buffer outlives the request.
    unsafe { d.push_seg_raw(ptr, buf.iova(), STRIPE as u32) }.expect("seg");
    d.prepare(IoOp::Read, 39 * STRIPE / BS, STRIPE / BS);
    let d = run_sync(bch.as_mut(), d, Duration::from_secs(10)).expect("read");
    assert_eq!(d.status, IoStatus::Success);
    let mut last = vec![0u8; STRIPE as usize];
    // SAFETY: the read completed; the buffer holds STRIPE valid bytes.
    unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), last.as_mut_ptr(), STRIPE as usize) };
    assert!(last[..(STRIPE / 2) as usize].iter().all(|&b| b == 0) && last[(STRIPE / 2) as usize..].iter().all(|&b| b == 0xa5));
    drop(cache);
    reactors.stop().expect("stop");
}

/// A read loan keeps its page unchanged until the reader has copied it: a write to a lent page waits (it is retried)
/// until the channel that holds the loan takes its piece back; the read returns the data from before the write, and
/// the write then goes through.
#[test]
fn a_write_to_a_lent_page_waits_until_the_loan_ends() {
    let (arena, _backing, _reactors, cache) = striped_rig();
    // Two channels on this thread, which runs no shard: every piece of theirs travels to a shard, and hits come back
    // as loans.
    let mut a = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel a");
    let mut b = cache.open_channel(ChannelOpts { reactor_index: 1, queue_depth: 4 }).expect("channel b");
    let mut pool = BufPool::new(&arena, BLK as u32, 2, 4096, "test").expect("pool");
    let (rbuf, wbuf) = (pool.get().expect("buf"), pool.get().expect("buf"));
    let (rptr, wptr) = (buf_ptr(&rbuf), buf_ptr(&wbuf));
    let page = 5 * BLK;
    let desc = |op: IoOp, ptr: std::ptr::NonNull<u8>, iova: u64| page_desc(op, page, ptr, iova);
    // The page holds 0x11, cached (the write leaves it dirty and UPTODATE).
    // SAFETY: no request is in flight on the write buffer.
    unsafe { std::ptr::write_bytes(wptr.as_ptr(), 0x11, BLK as usize) };
    let d = run_sync(b.as_mut(), desc(IoOp::Write, wptr, wbuf.iova()), Duration::from_secs(10)).expect("write 0x11");
    assert_eq!(d.status, IoStatus::Success);
    // A reads it: the shard lends the page; A does not poll yet, so the loan stays out.
    let loans0 = cache.stats().loans.load(Ordering::Relaxed);
    a.submit(desc(IoOp::Read, rptr, rbuf.iova())).map_err(|r| r.why).expect("submit read");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.stats().loans.load(Ordering::Relaxed) == loans0 {
        assert!(Instant::now() < deadline, "the shard never lent the page");
        std::thread::sleep(Duration::from_millis(1));
    }
    // B overwrites the page with 0x22: it must wait for the loan.
    // SAFETY: no request is in flight on the write buffer.
    unsafe { std::ptr::write_bytes(wptr.as_ptr(), 0x22, BLK as usize) };
    b.submit(desc(IoOp::Write, wptr, wbuf.iova())).map_err(|r| r.why).expect("submit write");
    let mut done = Vec::with_capacity(4);
    let hold = Instant::now() + Duration::from_millis(200);
    while Instant::now() < hold {
        b.poll(&mut done);
        assert!(done.is_empty(), "the write completed while its page was lent");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(cache.stats().loan_waits.load(Ordering::Relaxed) > 0, "the write never met the loan");
    // A takes its piece back: the read returns the data from before the write.
    let mut got = Vec::with_capacity(4);
    while got.is_empty() {
        assert!(Instant::now() < deadline, "the read never completed");
        a.poll(&mut got);
    }
    assert_eq!(got[0].status, IoStatus::Success);
    let mut data = vec![0u8; BLK as usize];
    // SAFETY: the read completed into the read buffer; BLK bytes are valid.
    unsafe { std::ptr::copy_nonoverlapping(rptr.as_ptr(), data.as_mut_ptr(), BLK as usize) };
    assert!(data.iter().all(|&x| x == 0x11), "the read saw the later write");
    // The loan is over: the write goes through, and a new read sees it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while done.is_empty() {
        assert!(Instant::now() < deadline, "the write never completed after the loan ended");
        b.poll(&mut done);
    }
    assert_eq!(done[0].status, IoStatus::Success);
    let d = run_sync(a.as_mut(), desc(IoOp::Read, rptr, rbuf.iova()), Duration::from_secs(10)).expect("read again");
    assert_eq!(d.status, IoStatus::Success);
    // SAFETY: as above.
    unsafe { std::ptr::copy_nonoverlapping(rptr.as_ptr(), data.as_mut_ptr(), BLK as usize) };
    assert!(data.iter().all(|&x| x == 0x22), "the write was lost");
    drop((a, b));
    drop(cache);
}

/// A read from another reactor first asks the shard with a probe. Bytes that are IOERR (here: dirty data lost to
/// poison) must not be lent: the probe says "send it", the read goes as a piece and fails. After a full overwrite
/// the same read is a hit again and comes back as a loan with the new bytes.
#[test]
fn a_probe_does_not_lend_bytes_lost_to_poison() {
    let (arena, _backing, _reactors, cache) = striped_rig();
    // A channel on this thread, which runs no shard: every read travels, as a probe first.
    let mut ch = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel");
    let mut pool = BufPool::new(&arena, BLK as u32, 2, 4096, "test").expect("pool");
    let (rbuf, wbuf) = (pool.get().expect("buf"), pool.get().expect("buf"));
    let (rptr, wptr) = (buf_ptr(&rbuf), buf_ptr(&wbuf));
    let page = 9 * BLK;
    let desc = |op: IoOp, ptr: std::ptr::NonNull<u8>, iova: u64| page_desc(op, page, ptr, iova);
    let t = Duration::from_secs(10);
    // SAFETY: no request is in flight on the write buffer.
    unsafe { std::ptr::write_bytes(wptr.as_ptr(), 0x33, BLK as usize) };
    assert_eq!(run_sync(ch.as_mut(), desc(IoOp::Write, wptr, wbuf.iova()), t).expect("write").status, IoStatus::Success);
    let loans0 = cache.stats().loans.load(Ordering::Relaxed);
    assert_eq!(run_sync(ch.as_mut(), desc(IoOp::Read, rptr, rbuf.iova()), t).expect("read").status, IoStatus::Success);
    assert!(cache.stats().loans.load(Ordering::Relaxed) > loans0, "a cached page read from another reactor was not lent");
    // The dirty page is poisoned: its data is lost and its bytes become IOERR.
    let hit = cache.poison_device_range(page, page + BLK).expect("poison");
    assert_eq!(hit.len(), 1, "the poisoned range held one cached page");
    let loans1 = cache.stats().loans.load(Ordering::Relaxed);
    // The request itself goes as the probe: whatever the answer, the caller's context words come back untouched.
    let mut r = desc(IoOp::Read, rptr, rbuf.iova());
    (r.ctx, r.ctx2) = (0x5eed, u64::MAX);
    let d = run_sync(ch.as_mut(), r, t).expect("read after poison");
    assert!(matches!(d.status, IoStatus::Failed(_)), "a read of bytes lost to poison returned {:?}", d.status);
    assert_eq!((d.ctx, d.ctx2), (0x5eed, u64::MAX), "the failed read's context words changed");
    assert_eq!(cache.stats().loans.load(Ordering::Relaxed), loans1, "bytes lost to poison were lent");
    // A full overwrite clears the error; the read is a loan again, of the new bytes.
    // SAFETY: no request is in flight on the write buffer.
    unsafe { std::ptr::write_bytes(wptr.as_ptr(), 0x44, BLK as usize) };
    assert_eq!(run_sync(ch.as_mut(), desc(IoOp::Write, wptr, wbuf.iova()), t).expect("overwrite").status, IoStatus::Success);
    let mut r = desc(IoOp::Read, rptr, rbuf.iova());
    (r.ctx, r.ctx2) = (0x5eed, u64::MAX);
    let d = run_sync(ch.as_mut(), r, t).expect("read after overwrite");
    assert_eq!(d.status, IoStatus::Success);
    assert_eq!((d.ctx, d.ctx2), (0x5eed, u64::MAX), "the lent read's context words changed");
    assert!(cache.stats().loans.load(Ordering::Relaxed) > loans1, "the overwritten page was not lent");
    let mut data = vec![0u8; BLK as usize];
    // SAFETY: the read completed into the read buffer; BLK bytes are valid.
    unsafe { std::ptr::copy_nonoverlapping(rptr.as_ptr(), data.as_mut_ptr(), BLK as usize) };
    assert!(data.iter().all(|&x| x == 0x44), "the read after the overwrite returned other bytes");
    drop(ch);
    drop(cache);
}

/// The first dirtier travels with the pieces: a write naming its client (an NBD connection) and crossing a stripe
/// boundary is tagged with that client on both shards; a write naming none is tagged with its channel's reactor.
#[test]
fn pieces_carry_the_requests_client_as_first_dirtier() {
    let (arena, _backing, _reactors, cache) = striped_rig();
    let mut ch = cache.open_channel(ChannelOpts { reactor_index: 4, queue_depth: 4 }).expect("channel");
    let mut pool = BufPool::new(&arena, 2 * BLK as u32, 1, 4096, "test").expect("pool");
    let buf = pool.get().expect("buf");
    let t = Duration::from_secs(10);
    // Two pages, one each side of the first stripe boundary: stripes 0 and 1 belong to the rig's two shards.
    let start = STRIPE - BLK;
    let mut d = IoDesc::new(1);
    // SAFETY: the buffer outlives the request, which completes (run_sync) before the buffer is dropped.
    unsafe { d.push_seg_raw(buf_ptr(&buf), buf.iova(), 2 * BLK as u32) }.expect("seg");
    d.prepare(IoOp::Write, start / BS, 2 * BLK / BS);
    d.client = 500;
    let mut d = run_sync(ch.as_mut(), d, t).expect("write");
    assert_eq!(d.status, IoStatus::Success);
    let pieces = cache.query_range(start, start + 2 * BLK).expect("query");
    assert_eq!(pieces.len(), 2, "{pieces:?}");
    for p in &pieces {
        assert_eq!(p.state.tag.client, 500, "{p:?}");
    }
    // No client named: the channel's reactor (4) as an internal client.
    d.prepare(IoOp::Write, 3 * STRIPE / BS, 2 * BLK / BS);
    let d = run_sync(ch.as_mut(), d, t).expect("write");
    assert_eq!(d.status, IoStatus::Success);
    let pieces = cache.query_range(3 * STRIPE, 3 * STRIPE + 2 * BLK).expect("query");
    assert_eq!(pieces.len(), 2, "{pieces:?}");
    assert!(pieces.iter().all(|p| p.state.tag.client == nvstack_blockdev::client::internal(4)), "{pieces:?}");
    drop(ch);
    drop(cache);
}

/// `close` (the appliance's cache delete): no channel opens any more; while a channel is open the shards keep
/// serving it and `close` gives up at its deadline saying so; once the channel is closed every shard writes back
/// what is dirty, flushes and leaves its reactor, and the backing device holds the data.
#[test]
fn close_waits_for_open_channels_then_writes_back_and_stops_every_shard() {
    let (arena, backing, reactors, cache) = striped_rig();
    let mut ch = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel");
    let mut pool = BufPool::new(&arena, BLK as u32, 1, 4096, "test").expect("pool");
    let buf = pool.get().expect("buf");
    let ptr = buf_ptr(&buf);
    // Eight pages over two stripes (both shards), each filled with its own byte: cached and dirty.
    let pages = 2 * STRIPE / BLK;
    for p in 0..pages {
        // SAFETY: no request is in flight on the buffer.
        unsafe { std::ptr::write_bytes(ptr.as_ptr(), 0x40 + p as u8, BLK as usize) };
        let d = run_sync(ch.as_mut(), page_desc(IoOp::Write, p * BLK, ptr, buf.iova()), Duration::from_secs(10)).expect("write");
        assert_eq!(d.status, IoStatus::Success);
    }
    assert!(cache.stats().dirty_bytes.load(Ordering::Acquire) > 0, "the writes are cached, not yet written back");

    // A channel is open: the shards stay, and close says why it gave up.
    let e = cache.close(Duration::from_millis(200)).expect_err("a channel is still open");
    assert!(e.to_string().contains("channel to the cache is still open"), "{e}");
    assert!(cache.open_channel(ChannelOpts { reactor_index: 1, queue_depth: 4 }).is_err(), "a closing cache opens no channel");
    let d = run_sync(ch.as_mut(), page_desc(IoOp::Read, 5 * BLK, ptr, buf.iova()), Duration::from_secs(10)).expect("read");
    assert_eq!(d.status, IoStatus::Success, "the open channel is still served");
    // SAFETY: the read completed into the buffer.
    assert_eq!(unsafe { *ptr.as_ptr().add(100) }, 0x45);

    drop(ch);
    let carved = arena.carved_bytes();
    cache.close(Duration::from_secs(10)).expect("every shard written back and gone");
    assert_eq!(cache.stats().dirty_bytes.load(Ordering::Acquire), 0);
    assert_eq!(carved - arena.carved_bytes(), 4 << 20, "the shards' pages went back to the arena");
    let mut bch = backing.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("backing channel");
    for p in 0..pages {
        let d = run_sync(bch.as_mut(), page_desc(IoOp::Read, p * BLK, ptr, buf.iova()), Duration::from_secs(10)).expect("read");
        assert_eq!(d.status, IoStatus::Success);
        let mut got = vec![0u8; BLK as usize];
        // SAFETY: the read completed; the buffer holds BLK valid bytes.
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), got.as_mut_ptr(), BLK as usize) };
        assert!(got.iter().all(|&b| b == 0x40 + p as u8), "page {p} reached the backing device");
    }
    drop(bch);
    drop(cache);
    reactors.stop().expect("stop");
}
