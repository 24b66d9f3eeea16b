//! The cache as a stacked block device: `cache:<backing>` implements [`BlockDev`] / [`IoChannel`].
//!
//! The engine: a [`CacheChannel`] owns one state tree, its pages and one backing channel. A single-reactor
//! [`CacheBdev`] hands it out as its one channel; a striped one (`crate::striped`) runs one per reactor as a shard.
//!
//! A request lives in a slot (`Req`) from submit to completion and moves through these steps:
//! - **Read, hit**: every byte UPTODATE: copy from the pages, complete in `submit`. No lock (fills set UPTODATE only
//!   when their data is in place; writes and writebacks do not change page bytes a hit could read halfway).
//! - **Read, miss**: lock the range (or queue behind the holder; the unlock hands the slot back as a token), give
//!   pages to the bytes not UPTODATE, read each missing run in one backing I/O straight into the pages, mark it
//!   UPTODATE (IOERR on failure), copy out, unlock.
//! - **Write, write-back**: lock, copy into pages, set UPTODATE + DIRTY with the tag (client, time), clear IOERR,
//!   unlock. Completes in `submit` unless it had to wait for the lock.
//! - **Write, FUA or write-through**: lock, copy into pages (clean), write the caller's buffer to the backing (FUA
//!   when asked and supported, else write then flush), unlock. On failure the bytes become DIRTY again.
//! - **Direct I/O** (and DEALLOCATE / WRITE ZEROES, which go to the backing device the same way): lock; a write
//!   drops the cached bytes of its range, a read first writes back the dirty bytes
//!   of its range from the pages; then one backing I/O on the caller's segments (no copy); unlock.
//! - **Flush**: write back every dirty cluster (waiting for locked ones), wait for every writeback started before
//!   the scan ended, then flush the backing device.
//! - **Writeback**: from a dirty byte, [`StateTree::cluster_at`] walks back to the start of its dirty cluster; the
//!   cluster (capped at the backing device's max transfer and segment count) is locked and written in one
//!   scatter-gather I/O from the pages. Periodic (an interval) and pressure-driven (dirty bytes above a share of the
//!   cache).
//! - **Eviction**: CLOCK over the slots; only pages with no DIRTY, LOCKED or WRITEBACK byte may go.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::{validate, ChannelOpts, Rejected};
use nvstack_blockdev::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoError, IoFlags, IoOp, IoStatus, SubmitError};
use nvstack_driver::dma::Arena;

use crate::loans::LoanBook;
use crate::pages::{Pages, PAGE_BYTES};
use crate::striped::{CacheCounters, Shared};
use crate::tree::lock::LockOutcome;
use crate::{Bits, CacheError, StateTree, Tag, Test, TreeConfig};

/// How to build a cache.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Bytes of cache pages (rounded down to 4 KiB pages).
    pub cache_bytes: u64,
    /// Write-back (default) or write-through.
    pub write_back: bool,
    /// State tree ranges per channel (0: four per page plus 1024).
    pub max_ranges: u32,
    /// Start writeback at this interval when anything is dirty.
    pub writeback_interval: Duration,
    /// Start writeback when dirty bytes exceed this percentage of the cache.
    pub dirty_high_pct: u8,
    /// Bytes per stripe when the cache is spread over several reactors ([`CacheBdev::new_striped`]): a power of
    /// two of at least 4 KiB. Stripe `k` belongs to reactor `k % reactors`.
    pub stripe_bytes: u64,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            cache_bytes: 64 << 20,
            write_back: true,
            max_ranges: 0,
            writeback_interval: Duration::from_millis(500),
            dirty_high_pct: 50,
            stripe_bytes: crate::striped::DEFAULT_STRIPE_BYTES,
        }
    }
}

/// Counters, readable from any thread.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Reads served entirely from pages.
    pub hits: AtomicU64,
    /// Reads that needed the backing device.
    pub misses: AtomicU64,
    /// Dirty bytes now.
    pub dirty_bytes: AtomicU64,
    /// Writeback I/Os completed.
    pub writeback_ios: AtomicU64,
    /// Bytes those writebacks wrote.
    pub writeback_bytes: AtomicU64,
    /// Pages evicted.
    pub evictions: AtomicU64,
    /// Backing reads issued for misses.
    pub fill_ios: AtomicU64,
    /// Read hits from another reactor answered with a loan of the pages (the caller copied on its own core).
    pub loans: AtomicU64,
    /// Writes and invalidations that waited for a loan of their pages to end.
    pub loan_waits: AtomicU64,
}

impl CacheStats {
    /// Add `other`'s counts into `self` (summing shards).
    pub(crate) fn add(&self, other: &CacheStats) {
        for (a, b) in [
            (&self.hits, &other.hits),
            (&self.misses, &other.misses),
            (&self.dirty_bytes, &other.dirty_bytes),
            (&self.writeback_ios, &other.writeback_ios),
            (&self.writeback_bytes, &other.writeback_bytes),
            (&self.evictions, &other.evictions),
            (&self.fill_ios, &other.fill_ios),
            (&self.loans, &other.loans),
            (&self.loan_waits, &other.loan_waits),
        ] {
            a.fetch_add(b.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    /// Average writeback I/O size in bytes (0 before the first).
    pub fn writeback_avg_bytes(&self) -> u64 {
        let n = self.writeback_ios.load(Ordering::Relaxed);
        self.writeback_bytes.load(Ordering::Relaxed).checked_div(n).unwrap_or(0)
    }
}

/// The cache device.
pub struct CacheBdev {
    name: String,
    backing: Arc<dyn BlockDev>,
    arena: Arc<Arena>,
    cfg: CacheConfig,
    geo: Geometry,
    feat: Features,
    opened: AtomicBool,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for CacheBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheBdev").field("name", &self.name).field("cfg", &self.cfg).finish()
    }
}

impl CacheBdev {
    /// A single-reactor cache named `cache:<backing>` over `backing`, with pages from `arena`: one channel (the
    /// first opened) owns all of it. For several reactors use [`CacheBdev::new_striped`].
    ///
    /// # Errors
    /// [`CacheError::Config`] for a cache smaller than one page or a backing block size above 4 KiB or not dividing
    /// it.
    pub fn new(backing: Arc<dyn BlockDev>, arena: Arc<Arena>, cfg: CacheConfig) -> Result<Arc<CacheBdev>, CacheError> {
        Self::build(backing, arena, cfg, 1, false)
    }

    pub(crate) fn build(
        backing: Arc<dyn BlockDev>,
        arena: Arc<Arena>,
        cfg: CacheConfig,
        shards: u32,
        striped: bool,
    ) -> Result<Arc<CacheBdev>, CacheError> {
        let bgeo = backing.geometry();
        if cfg.cache_bytes < PAGE_BYTES {
            return Err(CacheError::Config { what: "cache size", reason: "must hold at least one 4 KiB page" });
        }
        if u64::from(bgeo.block_size) > PAGE_BYTES || !PAGE_BYTES.is_multiple_of(u64::from(bgeo.block_size)) {
            return Err(CacheError::Config { what: "backing block size", reason: "must divide 4096" });
        }
        // A request must fit in the pages and in one backing I/O of page-sized segments.
        let seg_cap = u64::from(bgeo.max_segments.saturating_sub(1).max(1)) * PAGE_BYTES;
        let max_transfer = u64::from(bgeo.max_transfer_bytes).min(seg_cap).min(cfg.cache_bytes / 4).max(PAGE_BYTES);
        let geo = Geometry {
            max_transfer_bytes: u32::try_from(max_transfer).unwrap_or(u32::MAX),
            optimal_boundary_bytes: 0,
            // Requests are copied into pages (or split into per-stripe pieces that carry the caller's segments), so
            // the cache takes a bounded number of segments whatever the backing takes.
            max_segments: bgeo.max_segments.clamp(1, crate::striped::MAX_USER_SEGS),
            ..bgeo
        };
        let stripes = crate::stripe::StripeMap::new(cfg.stripe_bytes, shards)?;
        // Across reactors a request is at most two pieces: no larger than one stripe.
        let geo = if shards > 1 {
            Geometry { max_transfer_bytes: geo.max_transfer_bytes.min(u32::try_from(cfg.stripe_bytes).unwrap_or(u32::MAX)), ..geo }
        } else {
            geo
        };
        if cfg.cache_bytes / u64::from(shards) < PAGE_BYTES {
            return Err(CacheError::Config { what: "cache size", reason: "must hold at least one 4 KiB page per reactor" });
        }
        let bfeat = backing.features();
        let feat = Features {
            flush: true,
            write_zeroes: bfeat.write_zeroes,
            deallocate: bfeat.deallocate,
            fua: true,
            volatile_write_cache: cfg.write_back,
        };
        Ok(Arc::new(CacheBdev {
            name: format!("cache:{}", backing.name()),
            backing,
            arena,
            cfg,
            geo,
            feat,
            opened: AtomicBool::new(false),
            shared: Shared::new(shards, stripes, striped),
        }))
    }

    /// A snapshot of the counters, summed over the reactors' shards.
    pub fn stats(&self) -> CacheStats {
        self.shared.snapshot()
    }

    /// A handle to the counters that outlives borrows of the cache (for reports).
    pub fn counters(&self) -> CacheCounters {
        CacheCounters(Arc::clone(&self.shared))
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// What a shard's engine needs to be built.
    pub(crate) fn engine_spec(&self, shard: u32) -> EngineSpec {
        let shards = u64::from(self.shared.shard_count());
        EngineSpec {
            backing: Arc::clone(&self.backing),
            arena: Arc::clone(&self.arena),
            cfg: CacheConfig { cache_bytes: self.cfg.cache_bytes / shards, ..self.cfg },
            geo: self.geo,
            feat: self.feat,
            shared: Arc::clone(&self.shared),
            shard,
        }
    }

    /// Open the (single) channel with its concrete type, for reverse queries and counters.
    ///
    /// # Errors
    /// [`CacheError::Config`] when a channel is already open, or the cache is striped (its shards belong to its reactors);
    /// [`CacheError::Arena`] / [`CacheError::BackingChannel`] when resources cannot be had.
    pub fn open_cache_channel(&self, opts: ChannelOpts) -> Result<Box<CacheChannel>, CacheError> {
        if self.shared.is_striped() {
            return Err(CacheError::Config {
                what: "cache channels",
                reason: "a striped cache's shards belong to its reactors: open a channel with open_channel",
            });
        }
        if self.opened.swap(true, Ordering::AcqRel) {
            return Err(CacheError::Config {
                what: "cache channels",
                reason: "a single-reactor cache takes one channel: build it with CacheBdev::new_striped for several",
            });
        }
        match CacheChannel::new(self.engine_spec(0), opts.reactor_index, opts.queue_depth) {
            Ok(c) => {
                if let Some(r) = c.arena_range() {
                    self.shared.set_arena_range(0, r);
                }
                Ok(c)
            }
            Err(e) => {
                self.opened.store(false, Ordering::Release);
                Err(e)
            }
        }
    }
}

impl BlockDev for CacheBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &'static str {
        "Cache disk"
    }
    fn geometry(&self) -> Geometry {
        self.geo
    }
    fn features(&self) -> Features {
        self.feat
    }
    fn block_status(&self, offset_bytes: u64, len_bytes: u64) -> Option<(u64, bool)> {
        let (run, allocated) = self.backing.block_status(offset_bytes, len_bytes)?;
        if allocated {
            return Some((run, true));
        }
        // A hole of the backing device reads as zeroes through the cache only when the cache holds nothing newer.
        // The shards' trees belong to their reactors (this may run on one of them), so the answer rests on the
        // dirty-byte counters: with any dirty data, the range is reported as data (always a correct answer).
        if self.shared.dirty_bytes() == 0 {
            Some((run, false))
        } else {
            None
        }
    }
    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        if self.shared.is_striped() {
            return match crate::striped::StripedChannel::open(self, opts) {
                Ok(c) => Ok(c),
                Err(e) => Err(BdevError::Channel { name: self.name.clone(), reason: e.to_string() }),
            };
        }
        match self.open_cache_channel(opts) {
            Ok(c) => Ok(c),
            Err(e) => Err(BdevError::Channel { name: self.name.clone(), reason: e.to_string() }),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Free,
    /// Queued on the tree lock; the unlock gives the slot back as a token.
    WaitLock,
    /// Holding nothing; try again at the next poll (no page, no I/O slot, tree full).
    Retry,
    /// Holding the lock, backing I/Os in flight.
    Io,
    /// Flush: scanning for dirty clusters from `cursor`.
    FlushScan,
    /// Flush: waiting for writebacks older than `seq_limit`.
    FlushWait,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Direct read: writing back the dirty bytes of the range first.
    DirectWriteback,
    /// The request's own backing I/O.
    Main,
    /// Backing flush after a write, for FUA on a backing without FUA.
    FlushAfter,
}

struct Req {
    io: Option<Box<IoDesc>>,
    step: Step,
    phase: Phase,
    start: u64,
    end: u64,
    pending: u32,
    err: Option<IoError>,
    /// Some backing I/O could not start for want of an I/O slot: when the started ones finish, back off and retry.
    starved: bool,
    cursor: u64,
    seq_limit: u64,
    errs_at_start: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JobKind {
    Fill,
    Writeback,
    User,
    BackingFlush,
}

#[derive(Debug, Clone, Copy)]
struct Job {
    kind: JobKind,
    /// The request it works for (u32::MAX: background writeback).
    req: u32,
    start: u64,
    end: u64,
    seq: u64,
    busy: bool,
}

const NO_REQ: u32 = u32::MAX;

/// One reactor's channel to the cache. Owns the state tree, the pages and the backing channel.
pub struct CacheChannel {
    backing: Box<dyn IoChannel>,
    bgeo: Geometry,
    bfeat: Features,
    geo: Geometry,
    feat: Features,
    tree: StateTree,
    pages: Pages,
    arena: Arc<Arena>,
    write_back: bool,
    /// First-dirtier id for requests that name no client (the channel's reactor, as an internal client).
    client: u16,
    /// A shard of a striped cache: requests are pieces cut by a `StripedChannel`, already validated, whose
    /// first-dirtier id travels in `ctx` (bits 48..64).
    striped_shard: bool,
    shared: Arc<Shared>,
    shard: u32,
    epoch: Instant,
    depth: u32,
    reqs: Vec<Req>,
    free_reqs: Vec<u32>,
    jobs: Vec<Job>,
    descs: Vec<Option<Box<IoDesc>>>,
    free_jobs: Vec<u32>,
    #[allow(clippy::vec_box)] // descriptors are the caller's pooled boxes: moved in and out, never re-boxed
    done: Vec<Box<IoDesc>>,
    #[allow(clippy::vec_box)]
    reaped: Vec<Box<IoDesc>>,
    woken: Vec<u64>,
    ready: VecDeque<u32>,
    retry: Vec<u32>,
    job_seq: u64,
    wb_errors: u64,
    last_wb_error: Option<IoError>,
    wb_cursor: u64,
    wb_max_bytes: u64,
    /// Flush requests in FlushScan or FlushWait (so poll scans the slots only when there are some).
    flushes_waiting: u32,
    last_periodic: Instant,
    interval: Duration,
    dirty_high_bytes: u64,
    stats: Arc<CacheStats>,
    /// The pages lent to channels on other reactors (a shard of a striped cache with more than one shard).
    book: Option<LoanBook>,
}

// SAFETY: the channel is used by one thread at a time (the IoChannel contract). Its raw pointers (page memory,
// caller segments inside descriptors) stay valid wherever the channel moves: the arena region is owned by `pages`
// and the descriptors travel with the channel.
unsafe impl Send for CacheChannel {}

/// What the poison action found and did on one cache page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoisonedPage {
    /// First device byte the page caches.
    pub start: u64,
    /// One past the last.
    pub end: u64,
    /// Dirty bytes lost (0: the page was clean; it will be refetched).
    pub dirty_bytes: u64,
    /// Who first dirtied the lost bytes, and when.
    pub first_dirtier: Option<Tag>,
    /// Whether the slot was taken out of service.
    pub slot_retired: bool,
}

/// One cached piece of a device range, for the poison path's reverse query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachedPiece {
    /// First device byte.
    pub start: u64,
    /// One past the last device byte.
    pub end: u64,
    /// The state tree's bits and tag for it.
    pub state: crate::State,
    /// The page slot holding it, if a page is allocated.
    pub slot: Option<u32>,
    /// Byte offset of that data inside the DMA arena, if a page is allocated.
    pub arena_offset: Option<u64>,
}

/// What a shard's engine is built from.
pub(crate) struct EngineSpec {
    pub(crate) backing: Arc<dyn BlockDev>,
    pub(crate) arena: Arc<Arena>,
    /// With this shard's share of the cache size.
    pub(crate) cfg: CacheConfig,
    pub(crate) geo: Geometry,
    pub(crate) feat: Features,
    pub(crate) shared: Arc<Shared>,
    pub(crate) shard: u32,
}

impl CacheChannel {
    pub(crate) fn new(dev: EngineSpec, reactor_index: usize, queue_depth: u32) -> Result<Box<CacheChannel>, CacheError> {
        let opts = ChannelOpts { reactor_index, queue_depth };
        let depth = opts.queue_depth.clamp(1, 4096);
        let npages = u32::try_from(dev.cfg.cache_bytes / PAGE_BYTES).unwrap_or(u32::MAX);
        let pages = Pages::new(&dev.arena, npages)?;
        let max_ranges = if dev.cfg.max_ranges == 0 { npages.saturating_mul(4).saturating_add(1024) } else { dev.cfg.max_ranges };
        let tree = StateTree::new(TreeConfig { max_ranges, max_waiters: depth.saturating_mul(2) })?;
        let njobs = depth.saturating_mul(2).saturating_add(8);
        let bgeo = dev.backing.geometry();
        let backing = dev
            .backing
            .open_channel(ChannelOpts { reactor_index: opts.reactor_index, queue_depth: njobs })
            .map_err(|source| CacheError::BackingChannel { backing: dev.backing.name().to_owned(), source: Box::new(source) })?;
        let segs = bgeo.max_segments.max(1) as usize;
        let wb_max_bytes = u64::from(bgeo.max_transfer_bytes).min(u64::from(bgeo.max_segments.max(1)) * PAGE_BYTES);
        let reqs = (0..depth)
            .map(|_| Req {
                io: None,
                step: Step::Free,
                phase: Phase::Main,
                start: 0,
                end: 0,
                pending: 0,
                err: None,
                starved: false,
                cursor: 0,
                seq_limit: 0,
                errs_at_start: 0,
            })
            .collect();
        let job = Job { kind: JobKind::Fill, req: NO_REQ, start: 0, end: 0, seq: 0, busy: false };
        Ok(Box::new(CacheChannel {
            backing,
            bgeo,
            bfeat: dev.backing.features(),
            geo: dev.geo,
            feat: dev.feat,
            tree,
            pages,
            arena: Arc::clone(&dev.arena),
            write_back: dev.cfg.write_back,
            client: nvstack_blockdev::client::internal(opts.reactor_index),
            striped_shard: dev.shared.is_striped(),
            shared: Arc::clone(&dev.shared),
            shard: dev.shard,
            epoch: Instant::now(),
            depth,
            reqs,
            free_reqs: (0..depth).rev().collect(),
            jobs: vec![job; njobs as usize],
            descs: (0..njobs).map(|_| Some(IoDesc::new(segs))).collect(),
            free_jobs: (0..njobs).rev().collect(),
            done: Vec::with_capacity(depth as usize),
            reaped: Vec::with_capacity(njobs as usize),
            woken: Vec::with_capacity(depth as usize * 2),
            ready: VecDeque::with_capacity(depth as usize * 2),
            retry: Vec::with_capacity(depth as usize),
            job_seq: 0,
            wb_errors: 0,
            last_wb_error: None,
            wb_cursor: 0,
            wb_max_bytes,
            flushes_waiting: 0,
            last_periodic: Instant::now(),
            interval: dev.cfg.writeback_interval,
            dirty_high_bytes: u64::from(npages) * PAGE_BYTES * u64::from(dev.cfg.dirty_high_pct.min(100)) / 100,
            stats: Arc::clone(dev.shared.shard_stats(dev.shard)),
            book: (dev.shared.is_striped() && dev.shared.shard_count() > 1).then(|| LoanBook::new(crate::striped::MAX_CHANNELS)),
        }))
    }

    /// The first-dirtier tag for request `r`: who (the request's client, else this channel's reactor as an internal client)
    /// and when.
    fn tag(&self, r: u32) -> Tag {
        // Milliseconds since the channel opened (u32: 49 days, then it saturates).
        let ms = self.epoch.elapsed().as_millis();
        let client = match self.reqs[r as usize].io.as_ref() {
            Some(io) if io.client != 0 => io.client,
            _ => self.client,
        };
        Tag { client, time: u32::try_from(ms).unwrap_or(u32::MAX) }
    }

    fn publish_dirty(&self) {
        self.stats.dirty_bytes.store(self.tree.total(Bits::DIRTY), Ordering::Release);
    }

    // ----- completion -----

    fn complete(&mut self, r: u32, status: IoStatus) {
        let req = &mut self.reqs[r as usize];
        if matches!(req.step, Step::FlushScan | Step::FlushWait) {
            self.flushes_waiting -= 1;
        }
        if let Some(mut io) = req.io.take() {
            io.status = status;
            self.done.push(io);
        }
        req.step = Step::Free;
        req.err = None;
        req.pending = 0;
        self.free_reqs.push(r);
    }

    fn unlock(&mut self, start: u64, end: u64) {
        if let Err(e) = self.tree.unlock(start, end, &mut self.woken) {
            tracing::error!(error = %e, start, end, "cache: unlock failed");
        }
        for t in self.woken.drain(..) {
            self.ready.push_back(t as u32);
        }
    }

    fn fail_locked(&mut self, r: u32, e: IoError) {
        let (s, en) = (self.reqs[r as usize].start, self.reqs[r as usize].end);
        self.unlock(s, en);
        self.complete(r, IoStatus::Failed(e));
    }

    /// Back off: release the lock and try the request again at the next poll.
    fn retry_later(&mut self, r: u32) {
        let (s, e) = (self.reqs[r as usize].start, self.reqs[r as usize].end);
        self.unlock(s, e);
        self.reqs[r as usize].step = Step::Retry;
        self.retry.push(r);
    }

    // ----- data movement -----

    /// Copy between the request's segments and the pages for its whole range.
    fn copy_user(&mut self, r: u32, into_pages: bool) {
        let req = &self.reqs[r as usize];
        if let Some(io) = req.io.as_ref() {
            copy_pages(&mut self.pages, io, req.start, req.end, into_pages);
        }
    }

    /// A read that every byte of which is cached (and none bad) completes at once, without a request slot: the
    /// striped cache's fast path for hits (same-thread requests, and pieces from other reactors, which get a loan
    /// when they allow it). `None`: not such a read; submit it.
    pub(crate) fn try_hit(&mut self, io: &mut IoDesc, may_lend: bool) -> Option<IoStatus> {
        if io.op != IoOp::Read || io.flags.contains(IoFlags::DIRECT) {
            return None;
        }
        let bs = u64::from(self.geo.block_size);
        let s = io.offset_blocks.checked_mul(bs)?;
        let e = s.checked_add(io.num_blocks.checked_mul(bs)?)?;
        if self.tree.test(s, e, Bits::IOERR | Bits::POISONED, Test::Any) {
            return Some(IoStatus::Failed(IoError::BadRange { offset_bytes: s, len_bytes: e - s }));
        }
        if !self.tree.test(s, e, Bits::UPTODATE, Test::All) {
            return None;
        }
        bump(&self.stats.hits);
        if !(may_lend && self.lend_io(io, s, e)) {
            copy_pages(&mut self.pages, io, s, e, false);
        }
        Some(IoStatus::Success)
    }

    /// A read of bytes `[s, e)` inside one page, asked by channel `ch` of another reactor as a probe (no descriptor
    /// crossed over): when it is a hit, lend the page and return the loan's `ctx2`. None: not a hit, or not lendable
    /// now (IOERR or POISONED bytes, loan window full): the channel then sends the read as a piece.
    pub(crate) fn probe_lend(&mut self, ch: usize, s: u64, e: u64) -> Option<u64> {
        use crate::striped::{lent_ctx2, MAX_LENT_SLOT};
        if e <= s || s / PAGE_BYTES != (e - 1) / PAGE_BYTES || e > self.geo.size_bytes() {
            return None;
        }
        let book = self.book.as_mut()?;
        if self.tree.test(s, e, Bits::IOERR | Bits::POISONED, Test::Any) || !self.tree.test(s, e, Bits::UPTODATE, Test::All) {
            return None;
        }
        let slot = self.pages.lookup(s / PAGE_BYTES).filter(|&sl| sl <= MAX_LENT_SLOT)?;
        let seq = book.lend(ch, slot)?;
        self.pages.pin(slot);
        self.pages.touch(slot);
        bump(&self.stats.hits);
        bump(&self.stats.loans);
        Some(lent_ctx2(self.shard, slot, seq))
    }

    /// A read hit for another reactor: instead of copying into the caller's buffer (whose cache lines live on the
    /// caller's core), lend the page: pin it, record the loan, and name it in the piece's `ctx2`; the channel copies
    /// on its own core and says when it is done (see `crate::loans`). Only for pieces whose channel
    /// asked for it (`LEND_OK` in `ctx2`) that lie in one page. False: copy as usual.
    fn lend(&mut self, r: u32) -> bool {
        let (s, e) = req_range(&self.reqs[r as usize]);
        let Some(mut io) = self.reqs[r as usize].io.take() else { return false };
        let lent = self.lend_io(&mut io, s, e);
        self.reqs[r as usize].io = Some(io);
        lent
    }

    fn lend_io(&mut self, io: &mut IoDesc, s: u64, e: u64) -> bool {
        use crate::striped::{lent_ctx2, LEND_OK, MAX_LENT_SLOT};
        let Some(book) = self.book.as_mut() else { return false };
        if io.ctx2 & LEND_OK == 0 || s / PAGE_BYTES != (e - 1) / PAGE_BYTES {
            return false;
        }
        let Some(slot) = self.pages.lookup(s / PAGE_BYTES) else { return false };
        if slot > MAX_LENT_SLOT {
            return false;
        }
        let Some(seq) = book.lend(((io.ctx >> 32) & 0xffff) as usize, slot) else { return false };
        self.pages.pin(slot);
        self.pages.touch(slot);
        // The loan travels in `ctx2` alone (slot, number, shard): the piece's segment array stays untouched here, so
        // its cache line never crosses back and forth.
        io.ctx2 = lent_ctx2(self.shard, slot, seq);
        bump(&self.stats.loans);
        true
    }

    /// Host address of slot 0 and the bytes of all slots.
    pub(crate) fn pages_region(&self) -> (std::ptr::NonNull<u8>, u64) {
        self.pages.region()
    }

    /// Unpin the pages of loans the channels have finished with.
    fn reclaim_loans(&mut self) {
        let Some(book) = self.book.as_mut() else { return };
        let (shared, shard, pages) = (&self.shared, self.shard, &mut self.pages);
        book.reclaim(|ch| shared.loan_ack(ch, shard), |slot| pages.unpin(slot));
    }

    /// Loans still out (after taking in what the channels finished).
    pub(crate) fn loans_outstanding(&mut self) -> u64 {
        self.reclaim_loans();
        self.book.as_ref().map_or(0, LoanBook::outstanding)
    }

    /// Whether some page of `[start, end)` is lent to another reactor now (its bytes must not change).
    fn range_pinned(&mut self, start: u64, end: u64) -> bool {
        if self.book.as_ref().is_none_or(|b| b.outstanding() == 0) {
            return false;
        }
        let pinned = |pg: &Pages| (start / PAGE_BYTES..end.div_ceil(PAGE_BYTES)).any(|p| pg.lookup(p).is_some_and(|s| pg.pinned(s)));
        if !pinned(&self.pages) {
            return false;
        }
        self.reclaim_loans();
        pinned(&self.pages)
    }

    /// Give every page overlapping `[start, end)` a slot. False when some page could not get one.
    fn ensure_pages(&mut self, start: u64, end: u64) -> Result<bool, IoError> {
        let (first, last) = (start / PAGE_BYTES, end.div_ceil(PAGE_BYTES));
        for p in first..last {
            let tree = &self.tree;
            let got = self.pages.get_or_alloc(p, |old| {
                let (s, e) = (old * PAGE_BYTES, old * PAGE_BYTES + PAGE_BYTES);
                !tree.test(s, e, Bits::DIRTY | Bits::LOCKED | Bits::WRITEBACK, Test::Any)
            });
            match got {
                None => return Ok(false),
                Some((_, Some(old))) => {
                    bump(&self.stats.evictions);
                    let s = old * PAGE_BYTES;
                    if let Err(e) = self.tree.clear(s, s + PAGE_BYTES, Bits::UPTODATE) {
                        tracing::error!(error = %e, "cache: evicting a page: state tree full");
                        return Err(IoError::Aborted);
                    }
                }
                Some((_, None)) => {}
            }
        }
        Ok(true)
    }

    /// Drop the slots of pages in `[start, end)` that no longer hold anything.
    fn drop_empty_pages(&mut self, start: u64, end: u64) {
        for p in start / PAGE_BYTES..end.div_ceil(PAGE_BYTES) {
            let (s, e) = (p * PAGE_BYTES, p * PAGE_BYTES + PAGE_BYTES);
            if !self.tree.test(s, e, Bits::UPTODATE | Bits::DIRTY | Bits::LOCKED, Test::Any) {
                self.pages.drop_page(p);
            }
        }
    }

    // ----- backing I/O -----

    /// Start a backing I/O. `from_pages`: its data is the pages of `[start, end)`; otherwise the request's segments.
    #[allow(clippy::too_many_arguments)]
    fn start_job(&mut self, kind: JobKind, r: u32, op: IoOp, start: u64, end: u64, flags: IoFlags, from_pages: bool) -> Result<(), IoError> {
        let Some(j) = self.free_jobs.pop() else { return Err(IoError::Aborted) };
        let Some(mut desc) = self.descs[j as usize].take() else {
            self.free_jobs.push(j);
            return Err(IoError::Aborted);
        };
        let bs = u64::from(self.bgeo.block_size);
        desc.clear_raw_segs();
        if op == IoOp::Flush {
            desc.prepare(IoOp::Flush, 0, 0);
        } else {
            desc.prepare(op, start / bs, (end - start) / bs);
        }
        desc.flags = flags;
        desc.ctx = u64::from(j);
        let mut ok = true;
        if op.has_data() {
            if from_pages {
                let mut dev = start;
                while dev < end {
                    let poff = dev % PAGE_BYTES;
                    let chunk = (PAGE_BYTES - poff).min(end - dev);
                    let piece = self.pages.lookup(dev / PAGE_BYTES).and_then(|s| self.pages.ptr(s, poff, chunk));
                    let Some((ptr, iova)) = piece else {
                        ok = false;
                        break;
                    };
                    // SAFETY: the page bytes belong to the cache and are under the range lock (or WRITEBACK) for the
                    // whole I/O: nothing else touches them until the job completes.
                    if unsafe { desc.push_seg_raw(ptr, iova, chunk as u32) }.is_err() {
                        ok = false;
                        break;
                    }
                    dev += chunk;
                }
            } else if let Some(io) = self.reqs[r as usize].io.as_ref() {
                for s in io.segs() {
                    // SAFETY: the caller's segments are ours until the request completes, which is after this job.
                    if unsafe { desc.push_seg_raw(s.ptr(), s.iova(), s.len()) }.is_err() {
                        ok = false;
                        break;
                    }
                }
            }
        }
        if !ok {
            desc.clear_raw_segs();
            self.descs[j as usize] = Some(desc);
            self.free_jobs.push(j);
            return Err(IoError::BadLength { bytes: end - start, detail: "too many segments for the backing device" });
        }
        self.job_seq += 1;
        self.jobs[j as usize] = Job { kind, req: r, start, end, seq: self.job_seq, busy: true };
        match self.backing.submit(desc) {
            Ok(()) => Ok(()),
            Err(Rejected { mut io, why }) => {
                io.clear_raw_segs();
                self.descs[j as usize] = Some(io);
                self.jobs[j as usize].busy = false;
                self.free_jobs.push(j);
                Err(match why {
                    SubmitError::Invalid(e) => e,
                    SubmitError::Busy => IoError::Aborted,
                })
            }
        }
    }

    fn job_done(&mut self, j: u32, status: IoStatus) {
        let job = self.jobs[j as usize];
        self.jobs[j as usize].busy = false;
        self.free_jobs.push(j);
        let err = match status {
            IoStatus::Success => None,
            IoStatus::Failed(e) => Some(e),
            IoStatus::Pending => Some(IoError::Aborted),
        };
        match job.kind {
            JobKind::Writeback => self.writeback_done(job, err),
            JobKind::Fill => self.fill_done(job, err),
            JobKind::User | JobKind::BackingFlush => self.user_io_done(job, err),
        }
    }

    fn fill_done(&mut self, job: Job, err: Option<IoError>) {
        let r = job.req;
        let res = match err {
            None => self.tree.convert(job.start, job.end, Bits::UPTODATE, Bits::IOERR, Tag::NONE),
            Some(_) => self.tree.set(job.start, job.end, Bits::IOERR, Tag::NONE),
        };
        if let Err(e) = res {
            tracing::error!(error = %e, "cache: recording a fill: state tree full");
        }
        let req = &mut self.reqs[r as usize];
        if err.is_some() && req.err.is_none() {
            req.err = err;
        }
        req.pending -= 1;
        if req.pending > 0 {
            return;
        }
        match req.err {
            Some(e) => self.fail_locked(r, e),
            // The runs that started are UPTODATE now; the rest start when the request runs again.
            None if req.starved => self.retry_later(r),
            None => {
                self.copy_user(r, false);
                let (s, e) = req_range(&self.reqs[r as usize]);
                self.unlock(s, e);
                self.complete(r, IoStatus::Success);
            }
        }
    }

    fn writeback_done(&mut self, job: Job, err: Option<IoError>) {
        let res = match err {
            None => {
                bump(&self.stats.writeback_ios);
                self.stats.writeback_bytes.fetch_add(job.end - job.start, Ordering::Relaxed);
                self.tree.clear(job.start, job.end, Bits::DIRTY | Bits::WRITEBACK)
            }
            Some(e) => {
                tracing::warn!(start = job.start, end = job.end, error = %e, "cache: writeback failed; data stays dirty");
                self.wb_errors += 1;
                self.last_wb_error = Some(e);
                self.tree.clear(job.start, job.end, Bits::WRITEBACK)
            }
        };
        if let Err(e) = res {
            tracing::error!(error = %e, "cache: recording a writeback: state tree full");
        }
        self.publish_dirty();
        if job.req == NO_REQ {
            self.unlock(job.start, job.end);
            return;
        }
        // A direct read's writeback of its own range: the request holds the lock.
        let r = job.req;
        let req = &mut self.reqs[r as usize];
        if err.is_some() && req.err.is_none() {
            req.err = err;
        }
        req.pending -= 1;
        if req.pending == 0 {
            match req.err {
                Some(e) => self.fail_locked(r, e),
                None if req.starved => self.retry_later(r),
                None => self.direct_main(r),
            }
        }
    }

    fn user_io_done(&mut self, job: Job, err: Option<IoError>) {
        let r = job.req;
        let Some(io) = self.reqs[r as usize].io.as_ref() else { return };
        let (op, flags) = (io.op, io.flags);
        if op == IoOp::Flush {
            let st = err.map_or(IoStatus::Success, IoStatus::Failed);
            self.complete(r, st);
            return;
        }
        let (s, e) = req_range(&self.reqs[r as usize]);
        if let Some(er) = err {
            if op == IoOp::Write && !flags.contains(IoFlags::DIRECT) {
                // The pages hold the new data but the device may not: keep it dirty so writeback retries.
                let tag = self.tag(r);
                let _ = self.tree.set(s, e, Bits::DIRTY, tag);
                self.publish_dirty();
            }
            self.fail_locked(r, er);
            return;
        }
        let need_flush = op == IoOp::Write
            && self.reqs[r as usize].phase == Phase::Main
            && flags.contains(IoFlags::FUA)
            && !self.bfeat.fua
            && self.bfeat.flush;
        if need_flush {
            self.reqs[r as usize].phase = Phase::FlushAfter;
            if let Err(er) = self.start_job(JobKind::User, r, IoOp::Flush, 0, 0, IoFlags::NONE, false) {
                self.fail_locked(r, er);
            }
            return;
        }
        self.unlock(s, e);
        self.complete(r, IoStatus::Success);
    }

    // ----- request steps -----

    /// First step of a request (also re-run after a Retry).
    fn begin(&mut self, r: u32) {
        let Some(io) = self.reqs[r as usize].io.as_ref() else { return };
        let (op, flags) = (io.op, io.flags);
        let (s, e) = req_range(&self.reqs[r as usize]);
        match op {
            IoOp::Flush => {
                let req = &mut self.reqs[r as usize];
                req.step = Step::FlushScan;
                req.cursor = 0;
                req.errs_at_start = self.wb_errors;
                self.flushes_waiting += 1;
                self.flush_scan(r);
            }
            IoOp::Read if !flags.contains(IoFlags::DIRECT) => {
                if self.tree.test(s, e, Bits::IOERR | Bits::POISONED, Test::Any) {
                    self.complete(r, IoStatus::Failed(IoError::BadRange { offset_bytes: s, len_bytes: e - s }));
                    return;
                }
                if self.tree.test(s, e, Bits::UPTODATE, Test::All) {
                    bump(&self.stats.hits);
                    if !self.lend(r) {
                        self.copy_user(r, false);
                    }
                    self.complete(r, IoStatus::Success);
                    return;
                }
                bump(&self.stats.misses);
                self.lock(r);
            }
            _ => self.lock(r),
        }
    }

    fn lock(&mut self, r: u32) {
        let (s, e) = req_range(&self.reqs[r as usize]);
        match self.tree.lock(s, e, u64::from(r)) {
            Ok(LockOutcome::Granted) => self.locked(r),
            Ok(LockOutcome::Queued) => self.reqs[r as usize].step = Step::WaitLock,
            Err(_) => {
                self.reqs[r as usize].step = Step::Retry;
                self.retry.push(r);
            }
        }
    }

    /// The request holds the lock over its range.
    fn locked(&mut self, r: u32) {
        let Some(io) = self.reqs[r as usize].io.as_ref() else { return };
        let (op, flags) = (io.op, io.flags);
        let (s, e) = req_range(&self.reqs[r as usize]);
        self.reqs[r as usize].step = Step::Io;
        self.reqs[r as usize].err = None;
        self.reqs[r as usize].starved = false;
        if flags.contains(IoFlags::DIRECT) {
            return self.direct_begin(r, op);
        }
        match op {
            IoOp::Read => self.read_locked(r, s, e),
            IoOp::Write => self.write_locked(r, s, e, flags),
            // Like a direct write: drop what the cache holds of the range, then the backing device does it.
            IoOp::Deallocate | IoOp::WriteZeroes => self.direct_begin(r, op),
            IoOp::Flush => self.fail_locked(r, IoError::Unsupported { op }),
        }
    }

    fn read_locked(&mut self, r: u32, s: u64, e: u64) {
        if self.tree.test(s, e, Bits::IOERR | Bits::POISONED, Test::Any) {
            return self.fail_locked(r, IoError::BadRange { offset_bytes: s, len_bytes: e - s });
        }
        if self.tree.test(s, e, Bits::UPTODATE, Test::All) {
            self.copy_user(r, false);
            self.unlock(s, e);
            return self.complete(r, IoStatus::Success);
        }
        match self.ensure_pages(s, e) {
            Ok(true) => {}
            Ok(false) => return self.retry_later(r),
            Err(er) => return self.fail_locked(r, er),
        }
        // Read each run of bytes that is not UPTODATE in one backing I/O.
        let mut pos = s;
        let mut runs = 0u32;
        while pos < e {
            let next_up = self.tree.find_first(pos, Bits::UPTODATE).map_or(e, |x| x.start.min(e));
            if next_up > pos {
                let end = next_up;
                match self.start_job(JobKind::Fill, r, IoOp::Read, pos, end, IoFlags::NONE, true) {
                    Ok(()) => {
                        runs += 1;
                        bump(&self.stats.fill_ios);
                    }
                    Err(IoError::Aborted) => {
                        self.reqs[r as usize].starved = true;
                        break;
                    }
                    Err(er) => {
                        self.reqs[r as usize].err = Some(er);
                        break;
                    }
                }
                pos = end;
            } else {
                // Skip the UPTODATE run.
                pos = self.tree.find_run(pos, Bits::UPTODATE, e - pos).map_or(e, |(_, end)| end.min(e));
            }
        }
        self.reqs[r as usize].pending = runs;
        if runs == 0 {
            match self.reqs[r as usize].err {
                None if self.reqs[r as usize].starved => self.retry_later(r),
                Some(er) => self.fail_locked(r, er),
                None => {
                    self.copy_user(r, false);
                    self.unlock(s, e);
                    self.complete(r, IoStatus::Success);
                }
            }
        }
    }

    fn write_locked(&mut self, r: u32, s: u64, e: u64, flags: IoFlags) {
        if self.range_pinned(s, e) {
            // Another reactor is copying out of these pages: wait for it.
            bump(&self.stats.loan_waits);
            return self.retry_later(r);
        }
        match self.ensure_pages(s, e) {
            Ok(true) => {}
            Ok(false) => return self.retry_later(r),
            Err(er) => return self.fail_locked(r, er),
        }
        self.copy_user(r, true);
        let through = !self.write_back || flags.contains(IoFlags::FUA);
        let res = if through {
            self.tree.convert(s, e, Bits::UPTODATE, Bits::DIRTY | Bits::IOERR, Tag::NONE)
        } else {
            let tag = self.tag(r);
            self.tree.convert(s, e, Bits::UPTODATE | Bits::DIRTY, Bits::IOERR, tag)
        };
        if let Err(er) = res {
            tracing::error!(error = %er, "cache: write: state tree full");
            return self.retry_later(r);
        }
        self.publish_dirty();
        if !through {
            self.unlock(s, e);
            return self.complete(r, IoStatus::Success);
        }
        let bflags = if flags.contains(IoFlags::FUA) && self.bfeat.fua { IoFlags::FUA } else { IoFlags::NONE };
        self.reqs[r as usize].phase = Phase::Main;
        if let Err(er) = self.start_job(JobKind::User, r, IoOp::Write, s, e, bflags, false) {
            // Keep the data: it is in the pages; make it dirty so writeback takes it, and report the failure.
            let tag = self.tag(r);
            let _ = self.tree.set(s, e, Bits::DIRTY, tag);
            self.publish_dirty();
            self.fail_locked(r, er);
        }
    }

    fn direct_begin(&mut self, r: u32, op: IoOp) {
        let (s, e) = req_range(&self.reqs[r as usize]);
        if op != IoOp::Read {
            if self.range_pinned(s, e) {
                // Another reactor is copying out of these pages: their slots must not be dropped and refilled yet.
                bump(&self.stats.loan_waits);
                return self.retry_later(r);
            }
            if let Err(er) = self.tree.clear(s, e, Bits::UPTODATE | Bits::DIRTY | Bits::IOERR) {
                tracing::error!(error = %er, "cache: direct write: state tree full");
                return self.retry_later(r);
            }
            self.publish_dirty();
            self.drop_empty_pages(s, e);
            return self.direct_main(r);
        }
        // Direct read: write back the dirty bytes of the range from the pages first.
        self.reqs[r as usize].phase = Phase::DirectWriteback;
        let mut pos = s;
        let mut n = 0u32;
        while let Some((a, b)) = self.tree.find_run(pos, Bits::DIRTY, self.wb_max_bytes) {
            if a >= e {
                break;
            }
            let b = b.min(e);
            if let Err(er) = self.tree.set(a, b, Bits::WRITEBACK, Tag::NONE) {
                self.reqs[r as usize].starved = true;
                tracing::warn!(error = %er, "cache: direct read writeback: state tree full; retrying");
                break;
            }
            if let Err(er) = self.start_job(JobKind::Writeback, r, IoOp::Write, a, b, IoFlags::NONE, true) {
                let _ = self.tree.clear(a, b, Bits::WRITEBACK);
                if er == IoError::Aborted {
                    self.reqs[r as usize].starved = true;
                } else {
                    self.reqs[r as usize].err = Some(er);
                }
                break;
            }
            n += 1;
            pos = b;
        }
        self.reqs[r as usize].pending = n;
        if n == 0 {
            match self.reqs[r as usize].err {
                None if self.reqs[r as usize].starved => self.retry_later(r),
                Some(er) => self.fail_locked(r, er),
                None => self.direct_main(r),
            }
        }
    }

    fn direct_main(&mut self, r: u32) {
        let Some(io) = self.reqs[r as usize].io.as_ref() else { return };
        let (op, flags) = (io.op, io.flags);
        let (s, e) = req_range(&self.reqs[r as usize]);
        self.reqs[r as usize].phase = Phase::Main;
        let bflags = if flags.contains(IoFlags::FUA) && self.bfeat.fua { IoFlags::FUA } else { IoFlags::NONE };
        match self.start_job(JobKind::User, r, op, s, e, bflags, false) {
            Ok(()) => {}
            Err(IoError::Aborted) => self.retry_later(r),
            Err(er) => self.fail_locked(r, er),
        }
    }

    fn flush_scan(&mut self, r: u32) {
        loop {
            let cursor = self.reqs[r as usize].cursor;
            let Some(x) = self.tree.find_first(cursor, Bits::DIRTY) else { break };
            let Some((a, b)) = self.tree.cluster_at(x.start, Bits::DIRTY, self.wb_max_bytes) else { break };
            match self.start_writeback(a, b) {
                Ok(true) => self.reqs[r as usize].cursor = b,
                // Locked by someone (a fill, a writeback, a direct read), or no I/O slot: scan again next poll.
                Ok(false) => return,
                Err(()) => return,
            }
        }
        let req = &mut self.reqs[r as usize];
        req.step = Step::FlushWait;
        req.seq_limit = self.job_seq;
        self.flush_wait(r);
    }

    fn flush_wait(&mut self, r: u32) {
        let limit = self.reqs[r as usize].seq_limit;
        let older_in_flight = self.jobs.iter().any(|j| j.busy && j.kind == JobKind::Writeback && j.seq <= limit);
        if older_in_flight {
            return;
        }
        if self.wb_errors > self.reqs[r as usize].errs_at_start {
            let e = self.last_wb_error.unwrap_or(IoError::Aborted);
            return self.complete(r, IoStatus::Failed(e));
        }
        if self.bfeat.flush {
            match self.start_job(JobKind::BackingFlush, r, IoOp::Flush, 0, 0, IoFlags::NONE, false) {
                Ok(()) => {
                    self.reqs[r as usize].step = Step::Io;
                    self.flushes_waiting -= 1;
                }
                // No I/O slot: stay in FlushWait and try again at the next poll.
                Err(IoError::Aborted) => {}
                Err(e) => self.complete(r, IoStatus::Failed(e)),
            }
            return;
        }
        self.complete(r, IoStatus::Success);
    }

    /// Lock `[a, b)` and write it back from the pages. Ok(false) when it is locked or no I/O slot is free.
    fn start_writeback(&mut self, a: u64, b: u64) -> Result<bool, ()> {
        if self.free_jobs.is_empty() {
            return Ok(false);
        }
        match self.tree.try_lock(a, b) {
            Ok(true) => {}
            Ok(false) => return Ok(false),
            Err(_) => return Err(()),
        }
        if self.tree.set(a, b, Bits::WRITEBACK, Tag::NONE).is_err() {
            self.unlock(a, b);
            return Err(());
        }
        match self.start_job(JobKind::Writeback, NO_REQ, IoOp::Write, a, b, IoFlags::NONE, true) {
            Ok(()) => Ok(true),
            Err(_) => {
                let _ = self.tree.clear(a, b, Bits::WRITEBACK);
                self.unlock(a, b);
                Ok(false)
            }
        }
    }

    /// Background writeback: up to `budget` clusters from the rotating cursor.
    fn writeback_some(&mut self, budget: u32) {
        let mut started = 0;
        let mut wrapped = false;
        while started < budget {
            let found = self.tree.find_first(self.wb_cursor, Bits::DIRTY);
            let Some(x) = found else {
                if wrapped || self.wb_cursor == 0 {
                    return;
                }
                wrapped = true;
                self.wb_cursor = 0;
                continue;
            };
            let Some((a, b)) = self.tree.cluster_at(x.start, Bits::DIRTY, self.wb_max_bytes) else { return };
            let next = match self.start_writeback(a, b) {
                Ok(true) => {
                    started += 1;
                    b
                }
                Ok(false) if self.free_jobs.is_empty() => return,
                // Locked (a writeback of it is in flight...): go past the whole extent found.
                _ => b.max(x.end),
            };
            // Always move forward: a dirty run longer than the max transfer makes `cluster_at` walk back to a cluster
            // that ends at (or before) where the search started.
            self.wb_cursor = next.max(x.start.saturating_add(1));
        }
    }

    /// Write back every dirty cluster whose cluster contains `pos` (used by tests and by pressure): returns whether
    /// a writeback started.
    pub fn writeback_at(&mut self, pos: u64) -> bool {
        match self.tree.cluster_at(pos, Bits::DIRTY, self.wb_max_bytes) {
            Some((a, b)) => matches!(self.start_writeback(a, b), Ok(true)),
            None => false,
        }
    }

    fn run_ready(&mut self) {
        while let Some(r) = self.ready.pop_front() {
            if self.reqs[r as usize].step == Step::WaitLock {
                self.locked(r);
            }
        }
    }

    // ----- queries -----

    /// The state tree (read-only): bits, tags, dirty bytes.
    pub fn tree(&self) -> &StateTree {
        &self.tree
    }

    /// Reverse query for the poison path: the cached pieces of `[start, end)`, split at page boundaries, with their
    /// state, slot and arena offset. Appends to `out`.
    pub fn query_range(&self, start: u64, end: u64, out: &mut Vec<CachedPiece>) {
        self.tree.for_each(start, end, |x| {
            let mut pos = x.start;
            while pos < x.end {
                let p = pos / PAGE_BYTES;
                let pend = ((p + 1) * PAGE_BYTES).min(x.end);
                let slot = self.pages.lookup(p);
                let arena_offset = slot
                    .and_then(|s| self.pages.ptr(s, pos % PAGE_BYTES, 0))
                    .and_then(|(ptr, _)| self.arena.offset_of(ptr.as_ptr() as usize));
                out.push(CachedPiece { start: pos, end: pend, state: x.state, slot, arena_offset });
                pos = pend;
            }
            true
        });
    }

    /// Reverse query: the device byte range cached by the page holding arena byte `arena_offset`.
    pub fn device_range_of(&self, arena_offset: u64) -> Option<(u64, u64)> {
        let (slot, _) = self.pages.slot_of_arena_offset(&self.arena, arena_offset)?;
        let p = self.pages.dev_page_of(slot)?;
        Some((p * PAGE_BYTES, (p + 1) * PAGE_BYTES))
    }

    /// Whether the page holding arena byte `arena_offset` is one of this engine's slots and free (caches nothing).
    pub fn slot_free_at(&self, arena_offset: u64) -> bool {
        self.pages.slot_of_arena_offset(&self.arena, arena_offset).is_some_and(|(slot, _)| self.pages.is_free(slot))
    }

    /// Whether the page holding arena byte `arena_offset` is one of this engine's slots, out of service since an
    /// earlier poison event.
    pub fn slot_retired_at(&self, arena_offset: u64) -> bool {
        self.pages.slot_of_arena_offset(&self.arena, arena_offset).is_some_and(|(slot, _)| self.pages.is_retired(slot))
    }

    /// Poison action for a free slot: the page holding arena byte `arena_offset` is taken out of service for good
    /// (never handed out, so nothing ever reads or fills poisoned memory). True when it was a free slot of ours.
    pub fn retire_free_slot_at(&mut self, arena_offset: u64) -> bool {
        let Some((slot, _)) = self.pages.slot_of_arena_offset(&self.arena, arena_offset) else { return false };
        let retired = self.pages.retire_free_slot(slot);
        if retired {
            tracing::warn!(slot, arena_offset, "cache: a free slot's memory is poisoned; retired, no data lost");
        }
        retired
    }

    /// Whether device page `p` has a cache slot.
    pub fn holds_page(&self, p: u64) -> bool {
        self.pages.lookup(p).is_some()
    }

    /// The arena byte range of this engine's pages.
    pub fn arena_range(&self) -> Option<(u64, u64)> {
        self.pages.arena_range(&self.arena)
    }

    /// Poison action for memory under cached data: the page caching device page `dev_page` is poisoned. Its slot
    /// is retired for good (never reused). When the page held no dirty byte, its bytes simply stop being cached
    /// (the next read refetches them from the backing device). When it held dirty bytes, those are lost: they
    /// become IOERR (reads fail until a full overwrite) and are no longer dirty. Returns what was found.
    ///
    /// # Errors
    /// [`CacheError::TreeFull`] when the tree cannot record it (nothing changed then).
    pub fn poison_page(&mut self, dev_page: u64) -> Result<PoisonedPage, CacheError> {
        let (s, e) = (dev_page * PAGE_BYTES, (dev_page + 1) * PAGE_BYTES);
        let mut first_dirty: Option<crate::Extent> = None;
        self.tree.for_each(s, e, |x| {
            if x.state.bits.contains(Bits::DIRTY) {
                first_dirty = Some(x);
                return false;
            }
            true
        });
        let dirty_bytes = self.tree.count(s, e, Bits::DIRTY);
        let locked = self.tree.test(s, e, Bits::LOCKED | Bits::WRITEBACK, Test::Any);
        if first_dirty.is_some() {
            self.tree.convert(s, e, Bits::IOERR, Bits::DIRTY | Bits::UPTODATE, Tag::NONE)?;
        } else {
            self.tree.clear(s, e, Bits::UPTODATE)?;
        }
        self.publish_dirty();
        let slot = if locked {
            // An I/O is using the page: leave the slot for now (the bytes are no longer UPTODATE, so no read will
            // be served from it); it is retired when the poison path runs again or simply reused after refill.
            None
        } else {
            self.pages.retire_page(dev_page)
        };
        Ok(PoisonedPage {
            start: s,
            end: e,
            dirty_bytes,
            first_dirtier: first_dirty.map(|x| x.state.tag),
            slot_retired: slot.is_some(),
        })
    }

    /// Mark `[start, end)` POISONED (the poison path): reads of it fail until it is written again... or forever for
    /// dirty data that was lost.
    ///
    /// # Errors
    /// [`CacheError::TreeFull`] when the tree cannot record it.
    pub fn mark_poisoned(&mut self, start: u64, end: u64) -> Result<(), CacheError> {
        self.tree.set(start, end, Bits::POISONED, Tag::NONE)
    }
}

/// Count one event on an engine counter. Each shard's counters have one writer, its engine's thread, so a load
/// and a store do (no locked read-modify-write on the I/O path); readers on other threads see whole values.
#[inline]
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

/// Copy between `io`'s segments and the cache pages of device bytes `[start, end)` (every page present).
fn copy_pages(pages: &mut Pages, io: &IoDesc, start: u64, end: u64, into_pages: bool) {
    let (mut dev, segs) = (start, io.segs());
    let (mut si, mut soff) = (0usize, 0u64);
    while dev < end && si < segs.len() {
        let seg = segs[si];
        let poff = dev % PAGE_BYTES;
        let chunk = (PAGE_BYTES - poff).min(end - dev).min(u64::from(seg.len()) - soff);
        let Some(slot) = pages.lookup(dev / PAGE_BYTES) else {
            tracing::error!(dev, "cache: page missing during copy");
            return;
        };
        let Some((pp, _)) = pages.ptr(slot, poff, chunk) else { return };
        // SAFETY: `pp..pp+chunk` is inside the slot (ptr checked it); the page is not under device I/O (the caller
        // holds the range lock, or the bytes are UPTODATE and no I/O writes UPTODATE bytes). The segment bytes
        // `soff..soff+chunk` are inside the segment, and the descriptor is in our hands until completion.
        unsafe {
            let up = seg.ptr().as_ptr().add(soff as usize);
            if into_pages {
                std::ptr::copy_nonoverlapping(up, pp.as_ptr(), chunk as usize);
            } else {
                std::ptr::copy_nonoverlapping(pp.as_ptr(), up, chunk as usize);
            }
        }
        pages.touch(slot);
        dev += chunk;
        soff += chunk;
        if soff == u64::from(seg.len()) {
            si += 1;
            soff = 0;
        }
    }
}

fn req_range(r: &Req) -> (u64, u64) {
    (r.start, r.end)
}

impl IoChannel for CacheChannel {
    fn submit(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        // A shard of a striped cache takes only pieces cut by a StripedChannel from requests it already validated
        // against the same geometry (and the shard's own final flush).
        if !self.striped_shard {
            if let Err(e) = validate(&self.geo, &self.feat, &io) {
                return Err(Rejected { io, why: SubmitError::Invalid(e) });
            }
        }
        if self.done.len() + (self.depth as usize - self.free_reqs.len()) >= self.depth as usize {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        let Some(r) = self.free_reqs.pop() else { return Err(Rejected { io, why: SubmitError::Busy }) };
        let bs = u64::from(self.geo.block_size);
        io.status = IoStatus::Pending;
        let req = &mut self.reqs[r as usize];
        req.start = io.offset_blocks * bs;
        req.end = req.start + io.num_blocks * bs;
        req.io = Some(io);
        req.err = None;
        req.pending = 0;
        req.phase = Phase::Main;
        self.begin(r);
        self.run_ready();
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        // Control-path requests (the poison path's queries and actions) run here, on the owning reactor.
        if self.shared.has_controls(self.shard) {
            let shared = Arc::clone(&self.shared);
            shared.run_controls(self.shard, self);
        }
        self.reaped.clear();
        self.backing.poll(&mut self.reaped);
        while let Some(mut d) = self.reaped.pop() {
            let j = d.ctx as u32;
            let status = d.status;
            d.clear_raw_segs();
            if let Some(slot) = self.descs.get_mut(j as usize) {
                *slot = Some(d);
                self.job_done(j, status);
            }
        }
        if self.book.as_ref().is_some_and(|b| b.outstanding() > 0) {
            self.reclaim_loans();
        }
        self.run_ready();
        // Requests that backed off, and flushes that wait.
        let retry_count = self.retry.len();
        for _ in 0..retry_count {
            let r = self.retry.remove(0);
            if self.reqs[r as usize].step == Step::Retry {
                self.begin(r);
            }
        }
        if self.flushes_waiting > 0 {
            for r in 0..self.reqs.len() as u32 {
                match self.reqs[r as usize].step {
                    Step::FlushScan => self.flush_scan(r),
                    Step::FlushWait => self.flush_wait(r),
                    _ => {}
                }
            }
        }
        self.run_ready();
        // Writeback: under pressure (dirty share, or requests waiting for pages), or periodically.
        let dirty = self.tree.total(Bits::DIRTY);
        if dirty > 0 {
            let pressure = dirty > self.dirty_high_bytes || !self.retry.is_empty();
            if pressure || self.last_periodic.elapsed() >= self.interval {
                self.last_periodic = Instant::now();
                self.writeback_some(if pressure { 8 } else { 2 });
            }
        }
        let room = out.capacity() - out.len();
        let n = room.min(self.done.len());
        out.extend(self.done.drain(..n));
        n
    }

    fn outstanding(&self) -> usize {
        self.depth as usize - self.free_reqs.len() + self.done.len()
    }

    fn queue_depth(&self) -> u32 {
        self.depth
    }
}

impl Drop for CacheChannel {
    fn drop(&mut self) {
        // Backing I/Os still in flight point into our pages: wait (bounded) for them before the pages go.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.jobs.iter().any(|j| j.busy) && Instant::now() < deadline {
            self.reaped.clear();
            self.backing.poll(&mut self.reaped);
            for d in self.reaped.drain(..) {
                if let Some(job) = self.jobs.get_mut(d.ctx as usize) {
                    job.busy = false;
                }
            }
        }
        if !self.jobs.iter().any(|j| j.busy) {
            // No device writes the pages any more: their memory can serve a later cache (unless some is poisoned).
            self.pages.give_back_on_drop();
        }
        let dirty = self.tree.total(Bits::DIRTY);
        if dirty > 0 {
            tracing::warn!(dirty_bytes = dirty, "cache channel dropped with dirty data (flush before closing)");
        }
    }
}

