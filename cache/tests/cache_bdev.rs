//! The cache bdev against a RAM model (over malloc and over file backing), the writeback clustering test, read
//! errors, direct I/O and the reverse queries. Single reactor: one channel with many requests in flight.

// Descriptors are pooled boxes moved in and out of channels, as the IoChannel contract has them.
#![allow(clippy::vec_box, clippy::boxed_local)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::{ChannelOpts, Rejected};
use nvstack_blockdev::file::{FileBdev, FileConfig};
use nvstack_blockdev::malloc::MallocBdev;
use nvstack_blockdev::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoError, IoFlags, IoOp, IoStatus};
use nvstack_cache::{Bits, CacheBdev, CacheConfig, Test};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool, DmaBuf};
use proptest::prelude::*;

const BS: u64 = 512;
const PAGE: u64 = 4096;

/// A pass-through bdev that counts backing writes and can fail reads in a byte range.
struct Counting {
    inner: Arc<dyn BlockDev>,
    writes: Arc<AtomicU64>,
    write_bytes: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    fail_start: Arc<AtomicU64>,
    fail_end: Arc<AtomicU64>,
}

struct CountingChannel {
    inner: Box<dyn IoChannel>,
    writes: Arc<AtomicU64>,
    write_bytes: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    fail_start: Arc<AtomicU64>,
    fail_end: Arc<AtomicU64>,
    failed: Vec<Box<IoDesc>>,
}

impl BlockDev for Counting {
    fn name(&self) -> &str {
        "counting"
    }
    fn product_name(&self) -> &'static str {
        "Counting disk"
    }
    fn geometry(&self) -> Geometry {
        self.inner.geometry()
    }
    fn features(&self) -> Features {
        self.inner.features()
    }
    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        Ok(Box::new(CountingChannel {
            inner: self.inner.open_channel(opts)?,
            writes: Arc::clone(&self.writes),
            write_bytes: Arc::clone(&self.write_bytes),
            reads: Arc::clone(&self.reads),
            fail_start: Arc::clone(&self.fail_start),
            fail_end: Arc::clone(&self.fail_end),
            failed: Vec::with_capacity(1024),
        }))
    }
}

impl IoChannel for CountingChannel {
    fn submit(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        let bs = self.inner_bs();
        let (s, e) = (io.offset_blocks * bs, (io.offset_blocks + io.num_blocks) * bs);
        match io.op {
            IoOp::Write => {
                self.writes.fetch_add(1, Ordering::Relaxed);
                self.write_bytes.fetch_add(e - s, Ordering::Relaxed);
            }
            IoOp::Read => {
                self.reads.fetch_add(1, Ordering::Relaxed);
                let (fs, fe) = (self.fail_start.load(Ordering::Relaxed), self.fail_end.load(Ordering::Relaxed));
                if s < fe && fs < e {
                    io.status = IoStatus::Failed(IoError::Media { offset_blocks: fs / bs, num_blocks: (fe - fs) / bs });
                    self.failed.push(io);
                    return Ok(());
                }
            }
            _ => {}
        }
        self.inner.submit(io)
    }
    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        let mut n = 0;
        while out.len() < out.capacity() {
            let Some(io) = self.failed.pop() else { break };
            out.push(io);
            n += 1;
        }
        n + self.inner.poll(out)
    }
    fn outstanding(&self) -> usize {
        self.inner.outstanding() + self.failed.len()
    }
    fn queue_depth(&self) -> u32 {
        self.inner.queue_depth()
    }
}

impl CountingChannel {
    fn inner_bs(&self) -> u64 {
        BS
    }
}

struct Rig {
    arena: Arc<Arena>,
    backing: Arc<dyn BlockDev>,
    counting: Arc<Counting>,
    cache: Arc<CacheBdev>,
    pool: BufPool,
    size: u64,
    file: Option<std::path::PathBuf>,
}

fn rig(size: u64, cache_bytes: u64, file: bool, cfg: CacheConfig) -> Rig {
    let arena = Arena::new(ArenaConfig { size_bytes: 16 << 20, require_hugepages: false, try_1g: false }).unwrap();
    let (backing, path): (Arc<dyn BlockDev>, _) = if file {
        let dir = std::env::temp_dir().join(format!("nvstack-cache-test-{}-{}", std::process::id(), rand_id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        let fc = FileConfig { path: path.clone(), size_bytes: Some(size), block_size: Some(BS as u32) };
        (FileBdev::open("file0", &fc, &arena).unwrap(), Some(path))
    } else {
        (MallocBdev::new("Malloc0", size, BS as u32).unwrap(), None)
    };
    let counting = Arc::new(Counting {
        inner: Arc::clone(&backing),
        writes: Arc::default(),
        write_bytes: Arc::default(),
        reads: Arc::default(),
        fail_start: Arc::new(AtomicU64::new(0)),
        fail_end: Arc::new(AtomicU64::new(0)),
    });
    let cache = CacheBdev::new(counting.clone(), Arc::clone(&arena), CacheConfig { cache_bytes, ..cfg }).unwrap();
    let pool = BufPool::new(&arena, PAGE as u32, 512, PAGE, "test bufs").unwrap();
    Rig { arena, backing, counting, cache, pool, size, file: path }
}

fn rand_id() -> u64 {
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Block contents for write stamp `w`: every 8-byte word is (stamp << 32 | block number).
fn fill(buf: &mut DmaBuf, first_block: u64, stamp: u32) {
    for i in 0..(PAGE / 8) as usize {
        let block = first_block + (i as u64 * 8) / BS;
        buf.write_u64(i * 8, (u64::from(stamp) << 32) | block).unwrap();
    }
}

/// The stamp of each block in `bytes` (starting at `first_block`); panics on garbage (wrong block number, torn).
fn stamps(bytes: &[u8], first_block: u64) -> Vec<u32> {
    bytes
        .chunks(BS as usize)
        .enumerate()
        .map(|(k, blk)| {
            let words: Vec<u64> = blk.chunks(8).map(|w| u64::from_le_bytes(w.try_into().unwrap())).collect();
            if words.iter().all(|&w| w == 0) {
                return 0;
            }
            let w0 = words[0];
            assert!(words.iter().all(|&w| w == w0), "block {} is torn", first_block + k as u64);
            assert_eq!(w0 & 0xffff_ffff, first_block + k as u64, "block {} holds another block's data", first_block + k as u64);
            (w0 >> 32) as u32
        })
        .collect()
}

fn desc(pool: &mut BufPool, op: IoOp, off_bytes: u64, len_bytes: u64, flags: IoFlags, stamp: u32) -> Box<IoDesc> {
    let mut io = IoDesc::new(64);
    io.prepare(op, off_bytes / BS, len_bytes / BS);
    io.flags = flags;
    if op.has_data() {
        for k in 0..len_bytes / PAGE {
            let mut b = pool.get().expect("test buffer");
            if op == IoOp::Write {
                fill(&mut b, (off_bytes + k * PAGE) / BS, stamp);
            }
            io.attach_buf(b).unwrap();
        }
    }
    io
}

fn read_back(io: &IoDesc) -> Vec<u8> {
    let mut out = Vec::new();
    for b in io.bufs() {
        let mut tmp = vec![0u8; b.len() as usize];
        b.read_at(0, &mut tmp).unwrap();
        out.extend_from_slice(&tmp);
    }
    out
}

fn recycle(pool: &mut BufPool, mut io: Box<IoDesc>) {
    let mut bufs = Vec::new();
    io.take_bufs(&mut bufs);
    for b in bufs {
        pool.put(b).unwrap();
    }
}

/// Submit all, then poll until every one completed. Returns them in completion order.
fn run_all(ch: &mut dyn IoChannel, ios: Vec<Box<IoDesc>>) -> Vec<Box<IoDesc>> {
    let n = ios.len();
    let mut out = Vec::with_capacity(64);
    let mut done = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    for mut io in ios {
        loop {
            match ch.submit(io) {
                Ok(()) => break,
                Err(r) => {
                    assert!(matches!(r.why, nvstack_blockdev::SubmitError::Busy), "rejected: {:?}", r.why);
                    io = r.io;
                    ch.poll(&mut out);
                    done.append(&mut out);
                    assert!(Instant::now() < deadline, "submit stuck");
                }
            }
        }
    }
    while done.len() < n {
        ch.poll(&mut out);
        done.append(&mut out);
        assert!(Instant::now() < deadline, "requests stuck: {} of {n} done", done.len());
    }
    done
}

/// Read the whole backing device directly (bypassing the cache).
fn backing_contents(r: &mut Rig) -> Vec<u8> {
    if let Some(p) = &r.file {
        return std::fs::read(p).unwrap();
    }
    let mut ch = r.backing.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).unwrap();
    let mut all = Vec::new();
    let mut off = 0;
    while off < r.size {
        let io = desc(&mut r.pool, IoOp::Read, off, 64 * 1024, IoFlags::NONE, 0);
        let mut done = run_all(ch.as_mut(), vec![io]);
        let io = done.pop().unwrap();
        assert_eq!(io.status, IoStatus::Success);
        all.extend(read_back(&io));
        recycle(&mut r.pool, io);
        off += 64 * 1024;
    }
    all
}

#[derive(Debug, Clone)]
enum Op {
    Read { page: u64, pages: u64, direct: bool },
    Write { page: u64, pages: u64, fua: bool, direct: bool },
    Flush,
}

fn op(dev_pages: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => (0..dev_pages, 1..9u64, prop::bool::weighted(0.15)).prop_map(move |(p, n, d)| Op::Read { page: p, pages: n.min(dev_pages - p), direct: d }),
        5 => (0..dev_pages, 1..9u64, prop::bool::weighted(0.15), prop::bool::weighted(0.1)).prop_map(move |(p, n, f, d)| Op::Write { page: p, pages: n.min(dev_pages - p), fua: f, direct: d }),
        1 => Just(Op::Flush),
    ]
}

/// Batches of concurrent requests (writes in a batch never overlap each other; reads may overlap writes), a flush
/// alone in its batch. Properties: every read returns, per block, the data of the last completed write before the
/// batch or of a write in flight with it (never garbage, never stale); after each flush the backing device holds
/// exactly the model.
fn model_run(ops: Vec<Op>, file: bool, write_back: bool) -> Result<(), TestCaseError> {
    let size = 512 * 1024u64;
    let dev_pages = size / PAGE;
    let cfg = CacheConfig { write_back, writeback_interval: Duration::from_millis(1), dirty_high_pct: 30, ..Default::default() };
    // 32 pages of cache for 128 device pages: eviction and pressure writeback happen all the time.
    let mut r = rig(size, 32 * PAGE, file, cfg);
    let mut ch = r.cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 16 }).unwrap();
    let mut committed = vec![0u32; (size / BS) as usize];
    let mut stamp = 0u32;
    let mut batch: Vec<Op> = Vec::new();
    let check_flush = |r: &mut Rig, committed: &[u32]| -> Result<(), TestCaseError> {
        let got = stamps(&backing_contents(r), 0);
        prop_assert_eq!(got, committed.to_vec(), "backing differs from the model after a flush");
        Ok(())
    };
    let flush_batch = |batch: &mut Vec<Op>, r: &mut Rig, ch: &mut Box<dyn IoChannel>, committed: &mut Vec<u32>, stamp: &mut u32| -> Result<(), TestCaseError> {
        let mut ios = Vec::new();
        let mut meta = Vec::new();
        let mut written: Vec<(u64, u64, u32)> = Vec::new();
        for o in batch.drain(..) {
            match o {
                Op::Read { page, pages, direct } => {
                    let f = if direct { IoFlags::DIRECT } else { IoFlags::NONE };
                    ios.push(desc(&mut r.pool, IoOp::Read, page * PAGE, pages * PAGE, f, 0));
                    meta.push((page, pages, 0u32));
                }
                Op::Write { page, pages, fua, direct } => {
                    if written.iter().any(|&(p, n, _)| page < p + n && p < page + pages) {
                        continue;
                    }
                    *stamp += 1;
                    let mut f = IoFlags::NONE;
                    if fua {
                        f = f.with(IoFlags::FUA);
                    }
                    if direct {
                        f = f.with(IoFlags::DIRECT);
                    }
                    ios.push(desc(&mut r.pool, IoOp::Write, page * PAGE, pages * PAGE, f, *stamp));
                    meta.push((page, pages, *stamp));
                    written.push((page, pages, *stamp));
                }
                Op::Flush => unreachable!(),
            }
        }
        for (k, io) in ios.iter_mut().enumerate() {
            io.ctx = k as u64;
        }
        let done = run_all(ch.as_mut(), ios);
        for io in done {
            prop_assert_eq!(io.status, IoStatus::Success, "{:?} failed", io.op);
            let (page, pages, _) = meta[io.ctx as usize];
            if io.op == IoOp::Read {
                let first_block = page * PAGE / BS;
                let got = stamps(&read_back(&io), first_block);
                for (k, s) in got.iter().enumerate() {
                    let b = first_block as usize + k;
                    let in_flight = written.iter().any(|&(p, n, st)| {
                        let (lo, hi) = (p * PAGE / BS, (p + n) * PAGE / BS);
                        (lo..hi).contains(&(b as u64)) && st == *s
                    });
                    prop_assert!(*s == committed[b] || in_flight, "block {} read stamp {} (committed {})", b, s, committed[b]);
                }
            }
            let _ = pages;
            recycle(&mut r.pool, io);
        }
        for (p, n, st) in written {
            for b in p * PAGE / BS..(p + n) * PAGE / BS {
                committed[b as usize] = st;
            }
        }
        Ok(())
    };
    for o in ops {
        match o {
            Op::Flush => {
                flush_batch(&mut batch, &mut r, &mut ch, &mut committed, &mut stamp)?;
                let io = desc(&mut r.pool, IoOp::Flush, 0, 0, IoFlags::NONE, 0);
                let mut done = run_all(ch.as_mut(), vec![io]);
                let io = done.pop().unwrap();
                prop_assert_eq!(io.status, IoStatus::Success);
                recycle(&mut r.pool, io);
                check_flush(&mut r, &committed)?;
            }
            o => {
                batch.push(o);
                if batch.len() >= 6 {
                    flush_batch(&mut batch, &mut r, &mut ch, &mut committed, &mut stamp)?;
                }
            }
        }
    }
    flush_batch(&mut batch, &mut r, &mut ch, &mut committed, &mut stamp)?;
    // A final flush: the backing device must equal the model.
    let io = desc(&mut r.pool, IoOp::Flush, 0, 0, IoFlags::NONE, 0);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    prop_assert_eq!(io.status, IoStatus::Success);
    check_flush(&mut r, &committed)?;
    let _ = dev_pages;
    drop(ch);
    if let Some(p) = &r.file {
        let _ = std::fs::remove_dir_all(p.parent().unwrap());
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, max_shrink_iters: 200, ..ProptestConfig::default() })]
    #[test]
    fn cache_over_malloc_matches_ram_model(ops in proptest::collection::vec(op(128), 1..120)) {
        model_run(ops, false, true)?;
    }

    #[test]
    fn write_through_cache_over_malloc_matches_ram_model(ops in proptest::collection::vec(op(128), 1..60)) {
        model_run(ops, false, false)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, max_shrink_iters: 100, ..ProptestConfig::default() })]
    #[test]
    fn cache_over_file_matches_ram_model(ops in proptest::collection::vec(op(128), 1..100)) {
        model_run(ops, true, true)?;
    }
}

#[test]
fn writeback_clusters_scattered_pages_into_max_transfer_ios() {
    let cfg = CacheConfig { writeback_interval: Duration::from_secs(3600), dirty_high_pct: 100, ..Default::default() };
    let mut r = rig(4 << 20, 4 << 20, false, cfg);
    let max_transfer = u64::from(r.counting.geometry().max_transfer_bytes);
    let mut ch = r.cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 16 }).unwrap();
    // 256 scattered 4 KiB writes filling [1 MiB, 2 MiB).
    let base = 1 << 20;
    let order: Vec<u64> = (0..256u64).map(|k| (k * 167) % 256).collect();
    for chunk in order.chunks(16) {
        let ios = chunk.iter().map(|&p| desc(&mut r.pool, IoOp::Write, base + p * PAGE, PAGE, IoFlags::NONE, 7)).collect();
        for io in run_all(ch.as_mut(), ios) {
            assert_eq!(io.status, IoStatus::Success);
            recycle(&mut r.pool, io);
        }
    }
    assert_eq!(r.counting.writes.load(Ordering::Relaxed), 0, "write-back: nothing reached the backing yet");
    let io = desc(&mut r.pool, IoOp::Flush, 0, 0, IoFlags::NONE, 0);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    assert_eq!(io.status, IoStatus::Success);
    let writes = r.counting.writes.load(Ordering::Relaxed);
    let limit = (1u64 << 20).div_ceil(max_transfer);
    assert!(writes <= limit, "{writes} backing writes for 1 MiB of dirty pages; at most {limit} allowed");
    assert_eq!(r.counting.write_bytes.load(Ordering::Relaxed), 1 << 20);
    assert_eq!(r.cache.stats().writeback_avg_bytes(), 1 << 20);
}

#[test]
fn writeback_from_a_middle_page_walks_back_to_the_cluster_start() {
    let cfg = CacheConfig { writeback_interval: Duration::from_secs(3600), dirty_high_pct: 100, ..Default::default() };
    let mut r = rig(4 << 20, 4 << 20, false, cfg);
    let mut ch = r.cache.open_cache_channel(ChannelOpts { reactor_index: 0, queue_depth: 16 }).unwrap();
    let ios = (0..16u64).map(|p| desc(&mut r.pool, IoOp::Write, p * PAGE, PAGE, IoFlags::NONE, 3)).collect();
    for io in run_all(ch.as_mut(), ios) {
        recycle(&mut r.pool, io);
    }
    assert!(ch.writeback_at(9 * PAGE + 100));
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::with_capacity(4);
    while ch.tree().total(Bits::DIRTY) > 0 && Instant::now() < deadline {
        ch.poll(&mut out);
    }
    assert_eq!(r.counting.writes.load(Ordering::Relaxed), 1);
    assert_eq!(r.counting.write_bytes.load(Ordering::Relaxed), 16 * PAGE);
}

#[test]
fn read_error_marks_ioerr_until_a_full_overwrite() {
    let mut r = rig(1 << 20, 256 * 1024, false, CacheConfig::default());
    let mut ch = r.cache.open_cache_channel(ChannelOpts { reactor_index: 0, queue_depth: 8 }).unwrap();
    r.counting.fail_start.store(8 * PAGE, Ordering::Relaxed);
    r.counting.fail_end.store(9 * PAGE, Ordering::Relaxed);
    let io = desc(&mut r.pool, IoOp::Read, 8 * PAGE, PAGE, IoFlags::NONE, 0);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    assert!(matches!(io.status, IoStatus::Failed(IoError::Media { .. })), "{:?}", io.status);
    recycle(&mut r.pool, io);
    assert!(ch.tree().test(8 * PAGE, 9 * PAGE, Bits::IOERR, Test::All));
    // The device recovers, but the range stays marked: reads fail fast without a backing read.
    r.counting.fail_end.store(0, Ordering::Relaxed);
    let reads = r.counting.reads.load(Ordering::Relaxed);
    let io = desc(&mut r.pool, IoOp::Read, 8 * PAGE, PAGE, IoFlags::NONE, 0);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    assert!(matches!(io.status, IoStatus::Failed(IoError::BadRange { .. })), "{:?}", io.status);
    assert_eq!(r.counting.reads.load(Ordering::Relaxed), reads);
    recycle(&mut r.pool, io);
    // A full overwrite clears it.
    let io = desc(&mut r.pool, IoOp::Write, 8 * PAGE, PAGE, IoFlags::NONE, 42);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    assert_eq!(io.status, IoStatus::Success);
    recycle(&mut r.pool, io);
    let io = desc(&mut r.pool, IoOp::Read, 8 * PAGE, PAGE, IoFlags::NONE, 0);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    assert_eq!(io.status, IoStatus::Success);
    assert!(stamps(&read_back(&io), 8 * PAGE / BS).iter().all(|&s| s == 42));
    recycle(&mut r.pool, io);
}

#[test]
fn miss_reads_the_missing_extent_in_one_io_then_hits() {
    let mut r = rig(1 << 20, 256 * 1024, false, CacheConfig::default());
    let mut ch = r.cache.open_cache_channel(ChannelOpts { reactor_index: 0, queue_depth: 8 }).unwrap();
    let io = desc(&mut r.pool, IoOp::Read, 0, 16 * PAGE, IoFlags::NONE, 0);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    assert_eq!(io.status, IoStatus::Success);
    recycle(&mut r.pool, io);
    assert_eq!(r.counting.reads.load(Ordering::Relaxed), 1, "one backing read for a 64 KiB miss");
    let io = desc(&mut r.pool, IoOp::Read, 4 * PAGE, 8 * PAGE, IoFlags::NONE, 0);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    assert_eq!(io.status, IoStatus::Success);
    recycle(&mut r.pool, io);
    assert_eq!(r.counting.reads.load(Ordering::Relaxed), 1, "the second read hits");
    assert_eq!(r.cache.stats().hits.load(Ordering::Relaxed), 1);
    assert_eq!(r.cache.stats().misses.load(Ordering::Relaxed), 1);
}

#[test]
fn reverse_queries_name_pages_state_and_tag() {
    let mut r = rig(1 << 20, 256 * 1024, false, CacheConfig::default());
    let mut ch = r.cache.open_cache_channel(ChannelOpts { reactor_index: 2, queue_depth: 8 }).unwrap();
    let io = desc(&mut r.pool, IoOp::Write, 3 * PAGE, 2 * PAGE, IoFlags::NONE, 5);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    recycle(&mut r.pool, io);
    let mut out = Vec::new();
    ch.query_range(0, 1 << 20, &mut out);
    assert_eq!(out.len(), 2, "{out:?}");
    for (k, piece) in out.iter().enumerate() {
        assert_eq!(piece.start, (3 + k as u64) * PAGE);
        assert!(piece.state.bits.contains(Bits::DIRTY | Bits::UPTODATE));
        assert_eq!(piece.state.tag.client, 0x8002, "no client named: the channel's reactor (2) as an internal client");
        let off = piece.arena_offset.expect("page allocated");
        assert_eq!(ch.device_range_of(off + 17), Some((piece.start, piece.start + PAGE)));
    }
    assert_eq!(ch.device_range_of(r.arena.size_bytes() - 1), None);
    // A request that names its client (an NBD connection) is tagged with it; a later write by another client to
    // the same dirty bytes keeps the first dirtier.
    let mut io = desc(&mut r.pool, IoOp::Write, 9 * PAGE, PAGE, IoFlags::NONE, 6);
    io.client = 41;
    recycle(&mut r.pool, run_all(ch.as_mut(), vec![io]).pop().unwrap());
    let mut io = desc(&mut r.pool, IoOp::Write, 9 * PAGE, PAGE, IoFlags::NONE, 7);
    io.client = 42;
    recycle(&mut r.pool, run_all(ch.as_mut(), vec![io]).pop().unwrap());
    out.clear();
    ch.query_range(9 * PAGE, 10 * PAGE, &mut out);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].state.tag.client, 41, "the first dirtier is the client the request named");
    assert!(r.cache.open_channel(ChannelOpts { reactor_index: 1, queue_depth: 8 }).is_err(), "one channel for now");
}

#[test]
fn periodic_writeback_cleans_without_a_flush() {
    let cfg = CacheConfig { writeback_interval: Duration::from_millis(5), dirty_high_pct: 100, ..Default::default() };
    let mut r = rig(1 << 20, 256 * 1024, false, cfg);
    let mut ch = r.cache.open_cache_channel(ChannelOpts { reactor_index: 0, queue_depth: 8 }).unwrap();
    let ios = (0..8u64).map(|p| desc(&mut r.pool, IoOp::Write, p * 2 * PAGE, PAGE, IoFlags::NONE, 9)).collect();
    for io in run_all(ch.as_mut(), ios) {
        assert_eq!(io.status, IoStatus::Success);
        recycle(&mut r.pool, io);
    }
    assert_eq!(r.cache.stats().dirty_bytes.load(Ordering::Relaxed), 8 * PAGE);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut out = Vec::with_capacity(4);
    while ch.tree().total(Bits::DIRTY) > 0 && Instant::now() < deadline {
        ch.poll(&mut out);
    }
    assert_eq!(ch.tree().total(Bits::DIRTY), 0, "the interval writeback must clean everything");
    assert_eq!(r.counting.writes.load(Ordering::Relaxed), 8, "8 separate clusters");
    let got = stamps(&backing_contents(&mut r)[..(16 * PAGE) as usize], 0);
    for p in 0..16u64 {
        let want = if p % 2 == 0 { 9 } else { 0 };
        assert!(got[(p * 8) as usize..((p + 1) * 8) as usize].iter().all(|&s| s == want), "page {p}");
    }
}

#[test]
fn a_miss_with_more_runs_than_io_slots_backs_off_and_finishes() {
    // Queue depth 1: 10 backing I/O slots. Cache every other page, then read 32 pages: 16 missing runs.
    let mut r = rig(1 << 20, 512 * 1024, false, CacheConfig::default());
    let mut ch = r.cache.open_cache_channel(ChannelOpts { reactor_index: 0, queue_depth: 1 }).unwrap();
    for p in (0..32u64).step_by(2) {
        let io = desc(&mut r.pool, IoOp::Write, p * PAGE, PAGE, IoFlags::NONE, 11);
        let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
        assert_eq!(io.status, IoStatus::Success);
        recycle(&mut r.pool, io);
    }
    let io = desc(&mut r.pool, IoOp::Read, 0, 32 * PAGE, IoFlags::NONE, 0);
    let io = run_all(ch.as_mut(), vec![io]).pop().unwrap();
    assert_eq!(io.status, IoStatus::Success);
    let got = stamps(&read_back(&io), 0);
    for p in 0..32usize {
        let want = if p % 2 == 0 { 11 } else { 0 };
        assert!(got[p * 8..(p + 1) * 8].iter().all(|&s| s == want), "page {p}");
    }
    recycle(&mut r.pool, io);
    assert_eq!(r.counting.reads.load(Ordering::Relaxed), 16, "one backing read per missing run");
}
