//! The cache across reactors: stripes owned by shards, pieces travelling as messages, fan-out flush.
//!
//! [`CacheBdev::new_striped`] cuts the device address space into stripes ([`crate::stripe::StripeMap`]) and builds
//! one shard per reactor, on that reactor: a [`CacheChannel`] (the single-reactor engine: its own state tree, page
//! index, pages and backing channel) driven by a [`Poller`]. Nothing of a shard is touched by another thread.
//!
//! A [`StripedChannel`] (what `open_channel` returns, any number per reactor) owns no cache state. Its `submit`
//! splits a request at stripe boundaries into pieces. Each piece is a descriptor from the channel's own pool
//! (allocated at open) that carries raw segments into the caller's buffer (no copy), and travels to its owning
//! shard on the single-producer ring from this channel to that shard ([`crate::ring`]). The shard runs it through
//! the engine and hands the finished descriptor back on the ring from that shard to the channel; the channel's
//! `poll` counts pieces and completes the caller's request when the last one is back (first error wins). A full
//! ring is back-pressure: the piece waits in the channel and is sent again at the next poll. FLUSH fans out to every shard; each writes back what is dirty and flushes the backing, and
//! the request completes when all have answered.
//!
//! Hits take a short cut on both sides: a read inside one stripe of the channel's own thread's shard completes
//! inside `submit` (no piece), and a read piece that hits completes as soon as its shard takes it (no request slot
//! in the engine).
//!
//! Read probes: a read inside one page for another reactor first travels as a 16-byte probe (no descriptor); the
//! shard answers with the loan of the page, or with "send it" (then the read goes as a piece).
//!
//! Read loans: a read hit that travelled from another reactor is not copied by the shard (the caller's buffer lives
//! in the caller's core's cache, and writing it from here would pull every line across). The shard pins the page
//! and appends its address to the piece's segments (`LENT` in `ctx2`); the channel copies on its own core and
//! publishes that the loan is over. The shard keeps writes, invalidations and eviction off lent pages until then
//! ([`crate::loans`]).
//!
//! The control path (the poison path's reverse queries and actions) sends closures to a shard's control ring and
//! waits for the answer with a deadline. A single-reactor cache ([`CacheBdev::new`]) has the same control ring,
//! drained by its one channel's `poll`.
//!
//! Shutdown: when the reactors stop, or the cache is dropped or closed ([`CacheBdev::close`]) and no channel is open
//! any more, each shard writes back and flushes everything, then leaves its reactor and frees its engine and pages.
//! A channel opened after the reactors stopped answers FLUSH from the shards' final state; once the cache is closing,
//! no channel opens.

use std::collections::VecDeque;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use nvstack_blockdev::bdev::{validate, ChannelOpts, Rejected};
use nvstack_blockdev::reactor::{Msg, PollOutcome, Poller, ReactorCtx, Reactors};
use nvstack_blockdev::{BlockDev, Features, Geometry, IoChannel, IoDesc, IoError, IoFlags, IoOp, IoStatus, SubmitError};
use nvstack_driver::dma::Arena;

use crate::bdev::{CacheBdev, CacheChannel, CacheConfig, CacheStats};
use crate::loans::LoanWindow;
use crate::pages::PAGE_BYTES;
use crate::ring::{PieceRing, Ring};
use crate::stripe::{seg_slices, StripeMap};
use crate::CacheError;

/// Default stripe: 1 MiB (a writeback cluster never crosses a stripe, so this bounds clustering too).
pub const DEFAULT_STRIPE_BYTES: u64 = 1 << 20;
/// Most segments a caller's request may have on a cache (each piece carries a slice of them).
pub const MAX_USER_SEGS: u32 = 32;
/// Most channels open at once on one striped cache (a limit in DESIGN.md).
pub const MAX_CHANNELS: usize = 64;
/// `ctx2` of a piece: the channel takes a read loan instead of a copy (set by the channel on remote read pieces).
pub(crate) const LEND_OK: u64 = 1 << 63;
/// `ctx2` of a finished piece: its page is lent. Bits 0..14 name the lending shard, 14..38 the page's slot there,
/// 38..62 the loan's number (its low 24 bits); the bytes are the piece's own offset within that page.
pub(crate) const LENT: u64 = 1 << 62;
/// Largest slot a loan can name (24 bits: 64 GiB of pages per shard; beyond, hits are copied).
pub(crate) const MAX_LENT_SLOT: u32 = (1 << 24) - 1;
const _: () = assert!(crate::loans::SEQ_BITS == 24);

/// The `ctx2` of a piece whose page (slot `slot` of shard `shard`) is lent as loan number `seq`.
#[inline]
pub(crate) fn lent_ctx2(shard: u32, slot: u32, seq: u64) -> u64 {
    LENT | ((seq & 0xff_ffff) << 38) | (u64::from(slot & MAX_LENT_SLOT) << 14) | u64::from(shard & 0x3fff)
}

/// A lent page's whereabouts, decoded from `ctx2`: (shard, slot, low bits of the loan's number).
#[inline]
fn lent_parts(ctx2: u64) -> (usize, u64, u32) {
    ((ctx2 & 0x3fff) as usize, (ctx2 >> 14) & u64::from(MAX_LENT_SLOT), ((ctx2 >> 38) & 0xff_ffff) as u32)
}

/// Where a shard's pages are, for channels copying out of lent ones.
#[derive(Debug, Clone, Copy)]
struct PagesRegion {
    base: NonNull<u8>,
    len: u64,
}

// SAFETY: a description of the shard's page memory (owned by its engine, alive until the shard stops, which waits
// for every loan to end); channels only read lent pages through it.
unsafe impl Send for PagesRegion {}
// SAFETY: as above: shared read-only.
unsafe impl Sync for PagesRegion {}
/// How long a stopping shard waits for channels to end their read loans before it leaks its pages instead.
const LOAN_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Most pieces one channel has.
const MAX_PIECES: usize = 8192;
/// Most slots in one (channel, shard) ring: a channel with more pieces than this keeps the rest back while a ring is
/// full (8 KiB per ring).
const MAX_RING_SLOTS: usize = 1024;
/// Entries in each shard's control ring.
const CONTROL_ENTRIES: usize = 64;
/// How long a control-path call waits for the owning reactor.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long opening a striped cache waits for each shard to be built on its reactor.
const BUILD_TIMEOUT: Duration = Duration::from_secs(30);

/// A read probe: a channel asks a shard to lend the page holding bytes `[start, start + len)` (one page at most).
/// It travels inline in the ring, so the piece's descriptor never leaves the channel's core on a hit.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Probe {
    start: u64,
    len: u32,
    /// The channel's name for the waiting piece.
    token: u32,
}

/// A shard's answer to a probe: `ctx2` names the loan (`LENT` set), or is 0: not a hit, send the read as a piece.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct Answer {
    ctx2: u64,
    token: u32,
    _pad: u32,
}
// Four to a cache line.
const _: () = assert!(std::mem::size_of::<Probe>() == 16 && std::mem::size_of::<Answer>() == 16);

/// Token bit of a probe sent for a whole request (parked in its parent slot) rather than for a piece.
const WHOLE: u32 = 1 << 31;

/// A loan watermark on its own cache line (written by one channel, read by one shard).
#[repr(align(128))]
#[derive(Default)]
struct AckLine(AtomicU64);

/// What other threads may see of one channel.
pub(crate) struct Front {
    /// Per shard: the channel's pieces to that shard (produced by the channel, consumed by the shard).
    to_shard: Box<[PieceRing]>,
    /// Per shard: finished pieces back from that shard (produced on the shard's thread: its poller, or a channel
    /// there that reaped them from the engine; consumed by the channel).
    from_shard: Box<[PieceRing]>,
    /// Per shard: read probes to that shard (producer the channel, consumer the shard), and the shard's answers
    /// (producer the shard's poller, consumer the channel).
    probes: Box<[Ring<Probe>]>,
    answers: Box<[Ring<Answer>]>,
    /// Per shard: every loan from it numbered below this is over (the channel copied it).
    acks: Box<[AckLine]>,
}

/// A control-path call, run on the shard's reactor with its engine.
pub(crate) type Control = Box<dyn FnOnce(&mut CacheChannel) + Send>;

/// Shard states.
const SHARD_NONE: u8 = 0;
const SHARD_RUNNING: u8 = 1;
/// Finished with everything written back and flushed.
const SHARD_DONE_CLEAN: u8 = 2;
/// Finished with dirty data it could not write back, or a failed final flush.
const SHARD_DONE_DIRTY: u8 = 3;

/// What other threads may see of one shard.
pub(crate) struct ShardSlot {
    control: ArrayQueue<Control>,
    stats: Arc<CacheStats>,
    state: AtomicU8,
    /// The arena byte range of this shard's pages (for "which shard caches this arena page").
    arena_range: OnceLock<(u64, u64)>,
    /// The shard's page memory (channels copy lent pages out of it).
    pages: OnceLock<PagesRegion>,
    /// The engine, for channels running on the shard's own thread (the local fast path); null when none.
    engine: AtomicPtr<CacheChannel>,
    /// [`thread_tag`] of the shard's reactor thread (0: none yet).
    thread: AtomicU64,
    /// The shard's final flush, when a same-thread channel reaped it from the engine.
    final_back: ArrayQueue<Box<IoDesc>>,
    /// The shard's poller has left its reactor (its engine freed, or leaked when loans outlived their deadline).
    left: AtomicBool,
}

/// A number naming the current thread (never 0), cheap to read on the I/O path.
fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: u64 = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    TAG.with(|t| *t)
}

/// State shared by a cache's shards and channels.
pub(crate) struct Shared {
    shards: Box<[ShardSlot]>,
    stripes: StripeMap,
    striped: bool,
    /// Completion rings and loan watermarks of the striped channels, by channel id (made on first use, reused
    /// after a close).
    fronts: Box<[OnceLock<Arc<Front>>]>,
    front_busy: Box<[AtomicBool]>,
    /// Bit `c`: channel id `c` has its rings (set once, never cleared); the shards look for pieces there.
    opened: AtomicU64,
    closing: AtomicBool,
    /// Serialises control-path callers (one query at a time keeps the control rings from filling).
    control_lock: Mutex<()>,
}

impl Shared {
    pub(crate) fn new(shards: u32, stripes: StripeMap, striped: bool) -> Arc<Shared> {
        Arc::new(Shared {
            shards: (0..shards)
                .map(|_| ShardSlot {
                    control: ArrayQueue::new(CONTROL_ENTRIES),
                    stats: Arc::new(CacheStats::default()),
                    state: AtomicU8::new(SHARD_NONE),
                    arena_range: OnceLock::new(),
                    pages: OnceLock::new(),
                    engine: AtomicPtr::new(std::ptr::null_mut()),
                    thread: AtomicU64::new(0),
                    final_back: ArrayQueue::new(1),
                    left: AtomicBool::new(false),
                })
                .collect(),
            stripes,
            striped,
            fronts: (0..if striped { MAX_CHANNELS } else { 0 }).map(|_| OnceLock::new()).collect(),
            front_busy: (0..if striped { MAX_CHANNELS } else { 0 }).map(|_| AtomicBool::new(false)).collect(),
            opened: AtomicU64::new(0),
            closing: AtomicBool::new(false),
            control_lock: Mutex::new(()),
        })
    }

    pub(crate) fn is_striped(&self) -> bool {
        self.striped
    }
    pub(crate) fn shard_count(&self) -> u32 {
        self.shards.len() as u32
    }
    pub(crate) fn shard_stats(&self, shard: u32) -> &Arc<CacheStats> {
        &self.shards[shard as usize].stats
    }
    pub(crate) fn stripes(&self) -> StripeMap {
        self.stripes
    }

    /// Hand a piece finished by shard `from` (called on that shard's thread) to the channel its `ctx` names. Gives
    /// it back when that ring is full (kept by the caller and handed on later); drops it, logged, when no such
    /// channel exists.
    fn deliver_to_front(&self, from: u32, io: Box<IoDesc>) -> Result<(), Box<IoDesc>> {
        if self.shards.get(from as usize).map(|s| s.thread.load(Ordering::Acquire)) != Some(thread_tag()) {
            // Cannot happen (callers are the shard's poller and channels reaping its engine, both on its thread);
            // the ring's one producer must be that thread.
            tracing::error!(shard = from, "cache: a finished piece handed back off its shard's thread; kept back");
            return Err(io);
        }
        let front = ((io.ctx >> 32) & 0xffff) as usize;
        match self.fronts.get(front).and_then(OnceLock::get).and_then(|f| f.from_shard.get(from as usize)) {
            // SAFETY: the producer of a channel's ring from shard `from` is whatever runs on that shard's thread (its
            // poller, or a channel reaping its engine), checked just above: one thread, so one push at a time.
            Some(r) => unsafe { r.push(io) },
            None => {
                tracing::error!(front, "cache: a piece names a channel that does not exist; dropped");
                Ok(())
            }
        }
    }

    /// The loan watermark channel `ch` published for `shard`. Acquire: the channel's copies out of the lent pages
    /// happen before the shard reuses them.
    #[inline]
    pub(crate) fn loan_ack(&self, ch: usize, shard: u32) -> u64 {
        self.fronts.get(ch).and_then(OnceLock::get).and_then(|f| f.acks.get(shard as usize)).map_or(0, |a| a.0.load(Ordering::Acquire))
    }

    /// No channel is open (every channel id is free again).
    fn no_channel_open(&self) -> bool {
        self.front_busy.iter().all(|b| !b.load(Ordering::Acquire))
    }

    /// Dirty bytes over all shards.
    pub(crate) fn dirty_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.stats.dirty_bytes.load(Ordering::Acquire)).sum()
    }

    /// The counters summed over the shards.
    pub(crate) fn snapshot(&self) -> CacheStats {
        let sum = CacheStats::default();
        for s in self.shards.iter() {
            sum.add(&s.stats);
        }
        sum
    }

    #[inline]
    pub(crate) fn has_controls(&self, shard: u32) -> bool {
        self.shards.get(shard as usize).is_some_and(|s| !s.control.is_empty())
    }

    /// Run the queued control calls of `shard` with its engine (on the shard's reactor).
    pub(crate) fn run_controls(&self, shard: u32, engine: &mut CacheChannel) {
        let Some(slot) = self.shards.get(shard as usize) else { return };
        while let Some(c) = slot.control.pop() {
            c(engine);
        }
    }

    pub(crate) fn set_arena_range(&self, shard: u32, range: (u64, u64)) {
        if let Some(s) = self.shards.get(shard as usize) {
            let _ = s.arena_range.set(range);
        }
    }

    /// The shard whose pages hold arena byte `arena_offset`.
    pub(crate) fn shard_of_arena_offset(&self, arena_offset: u64) -> Option<u32> {
        self.shards.iter().position(|s| s.arena_range.get().is_some_and(|&(a, b)| (a..b).contains(&arena_offset))).map(|i| i as u32)
    }

    /// Run `f` with shard `shard`'s engine on its reactor and wait (up to [`CONTROL_TIMEOUT`]) for its answer.
    pub(crate) fn call<R: Send + 'static>(
        &self,
        shard: u32,
        f: impl FnOnce(&mut CacheChannel) -> R + Send + 'static,
    ) -> Result<R, CacheError> {
        let slot = self.shards.get(shard as usize).ok_or(CacheError::Control { shard, reason: "no such shard" })?;
        let st = slot.state.load(Ordering::Acquire);
        if self.striped && st != SHARD_RUNNING {
            return Err(CacheError::Control { shard, reason: "the shard is not running (stopped or never started)" });
        }
        let _serial = self.control_lock.lock().map_err(|_| CacheError::Control { shard, reason: "control lock poisoned" })?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<R>(1);
        let call: Control = Box::new(move |engine| {
            let _ = tx.send(f(engine));
        });
        if slot.control.push(call).is_err() {
            return Err(CacheError::Control { shard, reason: "control ring full" });
        }
        rx.recv_timeout(CONTROL_TIMEOUT)
            .map_err(|_| CacheError::Control { shard, reason: "the owning reactor did not answer in time (is its channel polled?)" })
    }
}

/// A handle to a cache's counters.
#[derive(Clone)]
pub struct CacheCounters(pub(crate) Arc<Shared>);

impl std::fmt::Debug for CacheCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheCounters").field("shards", &self.0.shards.len()).finish()
    }
}

impl CacheCounters {
    /// The counters now, summed over the shards.
    pub fn snapshot(&self) -> CacheStats {
        self.0.snapshot()
    }
}

impl CacheBdev {
    /// A cache spread over every reactor of `reactors`: stripes of `cfg.stripe_bytes`, one shard per reactor
    /// (each with `cache_bytes / reactors` of pages), built on its reactor. Channels may be opened on any reactor,
    /// any number of them.
    ///
    /// # Errors
    /// [`CacheError::Config`] for bad sizes; the first shard's build error (arena, backing channel);
    /// [`CacheError::Control`] when a reactor does not build its shard in time.
    pub fn new_striped(
        backing: Arc<dyn BlockDev>,
        arena: Arc<Arena>,
        cfg: CacheConfig,
        reactors: &Reactors,
    ) -> Result<Arc<CacheBdev>, CacheError> {
        let n = u32::try_from(reactors.count()).map_err(|_| CacheError::Config { what: "reactor count", reason: "too large" })?;
        let dev = CacheBdev::build(backing, arena, cfg, n, true)?;
        let (tx, rx) = std::sync::mpsc::channel::<(u32, Result<(), CacheError>)>();
        for shard in 0..n {
            let spec = dev.engine_spec(shard);
            let tx = tx.clone();
            let depth = ENGINE_DEPTH;
            let msg = Msg::Run(Box::new(move |ctx: &mut ReactorCtx| {
                let shared = Arc::clone(&spec.shared);
                match CacheChannel::new(spec, ctx.index(), depth) {
                    Ok(engine) => {
                        if let Some(r) = engine.arena_range() {
                            shared.set_arena_range(shard, r);
                        }
                        let (base, len) = engine.pages_region();
                        let _ = shared.shards[shard as usize].pages.set(PagesRegion { base, len });
                        shared.shards[shard as usize].state.store(SHARD_RUNNING, Ordering::Release);
                        ctx.add_poller(Box::new(ShardPoller::new(shared, shard, engine)));
                        let _ = tx.send((shard, Ok(())));
                    }
                    Err(e) => {
                        let _ = tx.send((shard, Err(e)));
                    }
                }
            }));
            reactors
                .send(shard as usize, msg)
                .map_err(|_| CacheError::Control { shard, reason: "the reactor's inbox is full" })?;
        }
        drop(tx);
        let deadline = Instant::now() + BUILD_TIMEOUT;
        for _ in 0..n {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok((_, Ok(()))) => {}
                Ok((shard, Err(e))) => {
                    dev.shared().closing.store(true, Ordering::Release);
                    tracing::error!(shard, error = %e, "cache: building a shard failed");
                    return Err(e);
                }
                Err(_) => {
                    dev.shared().closing.store(true, Ordering::Release);
                    return Err(CacheError::Control { shard: u32::MAX, reason: "a reactor did not build its shard in time" });
                }
            }
        }
        tracing::info!(name = dev.name(), shards = n, stripe_bytes = cfg.stripe_bytes, "striped cache ready");
        Ok(dev)
    }
}

/// How often [`CacheBdev::close`] looks at the shards while it waits.
const CLOSE_POLL: Duration = Duration::from_millis(2);

impl CacheBdev {
    /// Stop a striped cache for good (the appliance's `nvstack_cache_delete`): no channel opens any more, and once
    /// every open channel is closed each shard writes back and flushes everything, leaves its reactor and frees its
    /// engine and pages. Waits up to `timeout` for every shard to have left. Flush first (a FLUSH through a channel)
    /// to learn of a write-back failure while the cache still runs: this is the last word, not a way to retry.
    ///
    /// # Errors
    /// [`CacheError::Config`] for a single-reactor cache (it stops when its one channel is dropped);
    /// [`CacheError::Control`] naming a shard that has not left by the deadline (a channel is still open) or that
    /// left with data it could not write back (logged with the byte count).
    pub fn close(&self, timeout: Duration) -> Result<(), CacheError> {
        let shared = self.shared();
        if !shared.is_striped() {
            return Err(CacheError::Config { what: "close", reason: "applies to a striped cache only (drop the channel of a single-reactor one)" });
        }
        shared.closing.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        loop {
            let waiting = shared
                .shards
                .iter()
                .position(|s| s.state.load(Ordering::Acquire) != SHARD_NONE && !s.left.load(Ordering::Acquire));
            let Some(shard) = waiting else { break };
            if Instant::now() >= deadline {
                let reason = if shared.no_channel_open() {
                    "did not stop in time (still writing back?)"
                } else {
                    "did not stop in time: a channel to the cache is still open (close every user first)"
                };
                return Err(CacheError::Control { shard: shard as u32, reason });
            }
            std::thread::sleep(CLOSE_POLL);
        }
        match shared.shards.iter().position(|s| s.state.load(Ordering::Acquire) == SHARD_DONE_DIRTY) {
            Some(shard) => Err(CacheError::Control { shard: shard as u32, reason: "stopped with data it could not write back (see the log)" }),
            None => {
                tracing::info!(name = self.name(), "cache closed: written back, flushed, every shard gone");
                Ok(())
            }
        }
    }
}

impl Drop for CacheBdev {
    fn drop(&mut self) {
        // The shards write back, flush and leave their reactors once no channel is open (or when the reactors stop).
        self.shared().closing.store(true, Ordering::Release);
    }
}

/// Requests one shard's engine takes at once.
const ENGINE_DEPTH: u32 = 1024;

/// Drives one shard's engine on its reactor: takes pieces from the inbox, hands finished ones back to their
/// channels, runs control calls, and at shutdown writes everything back.
struct ShardPoller {
    shared: Arc<Shared>,
    shard: u32,
    /// The engine, owned by this poller (from `Box::into_raw`; freed in `Drop`). Channels on this reactor's thread
    /// reach it through the slot's pointer, only while this poller is not running (one thread runs both).
    engine: NonNull<CacheChannel>,
    /// A piece the engine refused with Busy: first in line next round.
    stalled: Option<Box<IoDesc>>,
    #[allow(clippy::vec_box)] // descriptors are the channels' pooled boxes, moved, never re-boxed
    out: Vec<Box<IoDesc>>,
    #[allow(clippy::vec_box)]
    undelivered: Vec<Box<IoDesc>>,
    /// Answers to probes whose channel's answer ring was full: (channel id, answer), sent again next round.
    unanswered: Vec<(usize, Answer)>,
    /// Shutdown: the final flush descriptor (None until shutdown, then in the engine, then back).
    final_flush: Option<Box<IoDesc>>,
    final_state: FinalFlush,
    /// Shutdown: when to stop waiting for read loans to end.
    loan_deadline: Option<Instant>,
    /// Loans outlived the deadline: the engine (and its pages) is leaked, not freed, so late copies stay safe.
    leak_engine: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FinalFlush {
    NotStarted,
    InFlight,
    Done,
}

/// `ctx` of the shard's own final flush (never a channel's: channel ids are below [`MAX_CHANNELS`]).
const FINAL_FLUSH_CTX: u64 = u64::MAX;

impl ShardPoller {
    /// Called on the shard's reactor thread.
    fn new(shared: Arc<Shared>, shard: u32, engine: Box<CacheChannel>) -> ShardPoller {
        let engine = NonNull::from(Box::leak(engine));
        let slot = &shared.shards[shard as usize];
        slot.thread.store(thread_tag(), Ordering::Release);
        slot.engine.store(engine.as_ptr(), Ordering::Release);
        ShardPoller {
            shared,
            shard,
            engine,
            stalled: None,
            out: Vec::with_capacity(ENGINE_DEPTH as usize + 1),
            undelivered: Vec::with_capacity(64),
            unanswered: Vec::with_capacity(64),
            final_flush: Some(IoDesc::new(1)),
            final_state: FinalFlush::NotStarted,
            loan_deadline: None,
            leak_engine: false,
        }
    }

    fn slot(&self) -> &ShardSlot {
        &self.shared.shards[self.shard as usize]
    }

    /// Answer every waiting read probe (and answers held back last round). True when there were any.
    /// (The shared state is looked up per entry rather than held, not cloned: an `Arc` clone per poll would write
    /// its count, on the line every thread reads `Shared` through.)
    fn answer_probes(&mut self) -> bool {
        let mut any = !self.unanswered.is_empty();
        for _ in 0..self.unanswered.len() {
            let (c, a) = self.unanswered.remove(0);
            self.answer(c, a);
        }
        let mut opened = self.shared.opened.load(Ordering::Acquire);
        while opened != 0 {
            let c = opened.trailing_zeros() as usize;
            opened &= opened - 1;
            while let Some(p) = self.next_probe(c) {
                any = true;
                let ctx2 = self.engine().probe_lend(c, p.start, p.start + u64::from(p.len)).unwrap_or(0);
                self.answer(c, Answer { ctx2, token: p.token, _pad: 0 });
            }
        }
        any
    }

    /// The next probe from channel `c`.
    fn next_probe(&self, c: usize) -> Option<Probe> {
        let r = self.shared.fronts[c].get()?.probes.get(self.shard as usize)?;
        // SAFETY: this poller is the one consumer of every channel's probe ring to its shard (one poller per shard).
        unsafe { r.pop() }
    }

    /// The next piece from channel `c`.
    fn next_piece(&self, c: usize) -> Option<Box<IoDesc>> {
        let r = self.shared.fronts[c].get()?.to_shard.get(self.shard as usize)?;
        // SAFETY: this poller is the one consumer of every channel's piece ring to its shard.
        unsafe { r.pop() }
    }

    fn answer(&mut self, c: usize, a: Answer) {
        let Some(r) = self.shared.fronts[c].get().and_then(|f| f.answers.get(self.shard as usize)) else { return };
        // SAFETY: this poller is the one producer of every channel's answer ring from its shard.
        if let Err(a) = unsafe { r.push(a) } {
            self.unanswered.push((c, a));
        }
    }

    /// No channel has a piece or a probe waiting for this shard.
    fn inbox_empty(&self) -> bool {
        if !self.unanswered.is_empty() {
            return false;
        }
        let mut opened = self.shared.opened.load(Ordering::Acquire);
        while opened != 0 {
            let c = opened.trailing_zeros() as usize;
            opened &= opened - 1;
            let Some(f) = self.shared.fronts[c].get() else { continue };
            let me = self.shard as usize;
            // SAFETY: as in `poll`: this poller is the one consumer of the rings to its shard.
            if f.to_shard.get(me).is_some_and(|r| !unsafe { r.is_empty() }) || f.probes.get(me).is_some_and(|r| !unsafe { r.is_empty() }) {
                return false;
            }
        }
        true
    }

    fn engine(&mut self) -> &mut CacheChannel {
        // SAFETY: the pointer came from a leaked Box owned by this poller and stays valid until `Drop`. The only other
        // user is a channel on this same thread (the local fast path), which runs inside another poller's round,
        // never while this `&mut` is alive.
        unsafe { self.engine.as_mut() }
    }

    fn deliver(&mut self, io: Box<IoDesc>) {
        if io.ctx == FINAL_FLUSH_CTX {
            let ok = io.status == IoStatus::Success;
            self.final_flush = Some(io);
            self.final_state = FinalFlush::Done;
            let dirty = self.engine().tree().total(crate::Bits::DIRTY);
            let clean = ok && dirty == 0;
            if !clean {
                tracing::error!(shard = self.shard, dirty_bytes = dirty, "cache shard stopping with data not written back");
            }
            self.slot().state.store(if clean { SHARD_DONE_CLEAN } else { SHARD_DONE_DIRTY }, Ordering::Release);
            return;
        }
        if let Err(back) = self.shared.deliver_to_front(self.shard, io) {
            self.undelivered.push(back);
        }
    }
}

impl Poller for ShardPoller {
    fn poll(&mut self, ctx: &mut ReactorCtx) -> PollOutcome {
        let mut busy = false;
        if self.shared.has_controls(self.shard) {
            let shared = Arc::clone(&self.shared);
            shared.run_controls(self.shard, self.engine());
            busy = true;
        }
        if let Some(f) = self.slot().final_back.pop() {
            self.deliver(f);
        }
        // Pieces that could not be handed back last round.
        for _ in 0..self.undelivered.len() {
            let io = self.undelivered.remove(0);
            self.deliver(io);
        }
        // Read probes: answered at once, a loan or "send it".
        if self.answer_probes() {
            busy = true;
        }
        // New pieces, while the engine takes them: the stalled one first, then each channel's ring in turn.
        let mut next = self.stalled.take();
        let mut took = false;
        // (Rings looked up per piece, not held: see `answer_probes`.)
        let mut opened = self.shared.opened.load(Ordering::Acquire);
        let mut ring: Option<usize> = None;
        loop {
            let io = match next.take() {
                Some(io) => io,
                None => match ring.and_then(|c| self.next_piece(c)) {
                    Some(io) => io,
                    None if opened == 0 => break,
                    None => {
                        ring = Some(opened.trailing_zeros() as usize);
                        opened &= opened - 1;
                        continue;
                    }
                },
            };
            busy = true;
            took = true;
            let mut io = io;
            if let Some(st) = self.engine().try_hit(&mut io, true) {
                // A hit: answered at once (lent when the piece allows it), no request slot.
                io.status = st;
                self.deliver(io);
                continue;
            }
            match self.engine().submit(io) {
                Ok(()) => {}
                Err(Rejected { io, why: SubmitError::Busy }) => {
                    self.stalled = Some(io);
                    break;
                }
                Err(Rejected { mut io, why: SubmitError::Invalid(e) }) => {
                    io.status = IoStatus::Failed(e);
                    self.deliver(io);
                }
            }
        }
        self.out.clear();
        let mut out = std::mem::take(&mut self.out);
        let n = self.engine().poll(&mut out);
        self.out = out;
        if n > 0 {
            busy = true;
        }
        while let Some(io) = self.out.pop() {
            self.deliver(io);
        }
        if took && self.final_state == FinalFlush::Done {
            // Work arrived after the final flush (a channel still draining): flush again before leaving.
            self.final_state = FinalFlush::NotStarted;
            self.slot().state.store(SHARD_RUNNING, Ordering::Release);
        }
        // Shutdown: once nothing is waiting, write back and flush everything, then leave. A closing cache waits for
        // its channels to close first (a channel still open could send a piece after the shard left).
        let leaving = ctx.stopping() || (self.shared.closing.load(Ordering::Acquire) && self.shared.no_channel_open());
        if leaving && self.stalled.is_none() && self.inbox_empty() {
            let engine_idle = self.engine().outstanding() == 0;
            match self.final_state {
                FinalFlush::NotStarted => {
                    if let Some(mut f) = self.final_flush.take() {
                        f.prepare(IoOp::Flush, 0, 0);
                        f.ctx = FINAL_FLUSH_CTX;
                        match self.engine().submit(f) {
                            Ok(()) => self.final_state = FinalFlush::InFlight,
                            Err(r) => self.final_flush = Some(r.io),
                        }
                    }
                }
                FinalFlush::InFlight => {}
                FinalFlush::Done if engine_idle && self.undelivered.is_empty() => {
                    // Pages still lent to channels must outlive their copies.
                    if self.engine().loans_outstanding() == 0 {
                        return PollOutcome::Done;
                    }
                    let deadline = *self.loan_deadline.get_or_insert_with(|| Instant::now() + LOAN_DRAIN_TIMEOUT);
                    if Instant::now() >= deadline {
                        tracing::error!(shard = self.shard, "cache shard stopping with pages still lent; leaking them");
                        self.leak_engine = true;
                        return PollOutcome::Done;
                    }
                }
                FinalFlush::Done => {}
            }
            return PollOutcome::Busy;
        }
        if busy {
            PollOutcome::Busy
        } else {
            PollOutcome::Idle
        }
    }
}

impl Drop for ShardPoller {
    fn drop(&mut self) {
        // No channel may reach the engine any more (they run on this thread, so none is inside it now).
        self.slot().engine.store(std::ptr::null_mut(), Ordering::Release);
        self.slot().thread.store(0, Ordering::Release);
        if !self.leak_engine {
            // SAFETY: the pointer came from `Box::leak` in `new` and nothing else frees it.
            drop(unsafe { Box::from_raw(self.engine.as_ptr()) });
        }
        self.slot().left.store(true, Ordering::Release);
    }
}

// SAFETY: the engine is owned by the poller (a raw pointer only to let same-thread channels reach it); the poller
// moves to its reactor thread once, before it first runs, and is used there only.
unsafe impl Send for ShardPoller {}

struct Parent {
    io: Option<Box<IoDesc>>,
    pending: u32,
    err: Option<IoError>,
    /// DEALLOCATE / WRITE ZEROES (no data, any length): the next byte to send a piece for, and the end. Such a
    /// request goes out in batches of at most [`RANGE_BATCH`] pieces, the next batch when the last one is back.
    next: u64,
    end: u64,
}

/// Most pieces of a DEALLOCATE / WRITE ZEROES request in flight at once.
const RANGE_BATCH: usize = 8;

/// One reactor's channel to a striped cache: splits requests into per-stripe pieces and gathers their answers.
pub struct StripedChannel {
    shared: Arc<Shared>,
    id: u16,
    client: u16,
    geo: Geometry,
    feat: Features,
    depth: u32,
    parents: Vec<Parent>,
    free_parents: Vec<u32>,
    #[allow(clippy::vec_box)] // pooled piece descriptors, moved in and out, never re-boxed
    free_pieces: Vec<Box<IoDesc>>,
    piece_count: usize,
    /// Pieces whose shard inbox was full: sent again at the next poll.
    unsent: VecDeque<(u32, Box<IoDesc>)>,
    #[allow(clippy::vec_box)]
    done: Vec<Box<IoDesc>>,
    /// Completions reaped from a same-thread engine (the local fast path), before routing.
    #[allow(clippy::vec_box)]
    reaped: Vec<Box<IoDesc>>,
    /// Completions for other channels that their rings could not take yet, with the shard that finished them.
    foreign: Vec<(u32, Box<IoDesc>)>,
    /// Per shard: which of its loans this channel has finished.
    windows: Vec<LoanWindow>,
    /// Per shard: the watermark to publish at the end of this poll (`None`: unchanged). One store per poll and
    /// shard, not one per loan: the shard reads the line every poll, so each store can cost a cross-core transfer.
    acks_due: Vec<Option<u64>>,
    /// This channel's rings and loan watermarks (also reachable by the shards through `Shared::fronts`).
    front: Arc<Front>,
    /// Read pieces waiting for a probe's answer, by token.
    probing: Vec<Option<Box<IoDesc>>>,
    free_tokens: Vec<u32>,
}

// SAFETY: the channel is used by one thread at a time (the IoChannel contract); the raw segments inside its piece
// descriptors point into callers' buffers, which the callers keep valid until their requests complete.
unsafe impl Send for StripedChannel {}

impl StripedChannel {
    pub(crate) fn open(dev: &CacheBdev, opts: ChannelOpts) -> Result<Box<StripedChannel>, CacheError> {
        let shared = Arc::clone(dev.shared());
        if shared.closing.load(Ordering::Acquire) {
            return Err(CacheError::Config { what: "cache", reason: "is shutting down" });
        }
        let depth = opts.queue_depth.clamp(1, 4096);
        let id = (0..shared.front_busy.len())
            .find(|&i| shared.front_busy[i].compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok())
            .ok_or(CacheError::Config { what: "cache channels", reason: "too many open at once (64)" })?;
        let nshards = shared.shards.len();
        let geo = dev.geometry();
        // Pieces: one per request in the common case, a second for requests crossing a stripe, one per shard for
        // flush; beyond that a request waits (Busy) for pieces to come back.
        let piece_count = (depth as usize * 2 + nshards).min(MAX_PIECES);
        // A ring holds every piece of this channel up to its limit (a later user of the id with more pieces, or one
        // beyond the limit, may find a ring full, and keeps the piece until a later poll).
        let slots = piece_count.min(MAX_RING_SLOTS);
        let front = Arc::clone(shared.fronts[id].get_or_init(|| {
            Arc::new(Front {
                to_shard: (0..nshards).map(|_| PieceRing::new(slots)).collect(),
                from_shard: (0..nshards).map(|_| PieceRing::new(slots)).collect(),
                probes: (0..nshards).map(|_| Ring::new(slots)).collect(),
                answers: (0..nshards).map(|_| Ring::new(slots)).collect(),
                acks: (0..nshards).map(|_| AckLine::default()).collect(),
            })
        }));
        // Release: the rings are built before a shard sees the bit and looks at them.
        shared.opened.fetch_or(1 << id, Ordering::Release);
        // A reused id goes on from the loans its last user finished (all of them: it waited for every piece).
        let windows = (0..nshards as u32).map(|sh| LoanWindow::starting_at(shared.loan_ack(id, sh))).collect();
        let acks_due = vec![None; nshards];
        let segs = geo.max_segments as usize;
        Ok(Box::new(StripedChannel {
            id: id as u16,
            client: nvstack_blockdev::client::internal(opts.reactor_index),
            geo,
            feat: dev.features(),
            depth,
            parents: (0..depth).map(|_| Parent { io: None, pending: 0, err: None, next: 0, end: 0 }).collect(),
            free_parents: (0..depth).rev().collect(),
            free_pieces: (0..piece_count).map(|_| IoDesc::new(segs)).collect(),
            probing: (0..piece_count).map(|_| None).collect(),
            free_tokens: (0..piece_count as u32).collect(),
            piece_count,
            unsent: VecDeque::with_capacity(piece_count),
            done: Vec::with_capacity(depth as usize),
            reaped: Vec::with_capacity(ENGINE_DEPTH as usize + 1),
            foreign: Vec::with_capacity(64),
            windows,
            acks_due,
            front,
            shared,
        }))
    }

    /// The engine of `shard` when it runs on this thread (the local fast path: no ring in either direction).
    #[inline]
    fn local_engine(&self, shard: u32) -> Option<NonNull<CacheChannel>> {
        let slot = &self.shared.shards[shard as usize];
        if slot.thread.load(Ordering::Acquire) != thread_tag() {
            return None;
        }
        NonNull::new(slot.engine.load(Ordering::Acquire))
    }

    fn send(&mut self, shard: u32, mut piece: Box<IoDesc>) {
        piece.ctx2 = 0;
        if self.unsent.is_empty() {
            if let Some(mut engine) = self.local_engine(shard) {
                // SAFETY: the engine belongs to the shard poller of this very thread, which is not running now (we
                // are inside another poller's round or outside the reactor loop on this thread), and it stays alive
                // while its pointer is published (the poller clears it before freeing the engine, on this thread).
                match unsafe { engine.as_mut() }.submit(piece) {
                    Ok(()) => return,
                    Err(Rejected { io, why: SubmitError::Busy }) => piece = io,
                    Err(Rejected { mut io, why: SubmitError::Invalid(e) }) => {
                        io.status = IoStatus::Failed(e);
                        self.piece_done(io);
                        return;
                    }
                }
            }
        }
        let state = self.shared.shards[shard as usize].state.load(Ordering::Acquire);
        if state >= SHARD_DONE_CLEAN {
            // The shard has left its reactor (shutdown): nothing will serve the piece.
            piece.status = match (piece.op, state) {
                (IoOp::Flush, SHARD_DONE_CLEAN) => IoStatus::Success,
                _ => IoStatus::Failed(IoError::Aborted),
            };
            self.piece_done(piece);
            return;
        }
        if piece.op == IoOp::Read && !piece.flags.contains(IoFlags::DIRECT) && self.unsent.is_empty() && self.shared.shards.len() > 1 {
            if let Some(token) = self.probe(shard, &piece) {
                self.probing[token as usize] = Some(piece);
                return;
            }
        }
        self.enqueue(shard, piece);
    }

    /// A read inside one page for another reactor: ask with an inline probe first (the descriptor stays here);
    /// a hit comes back as a loan. The probe's token when it went (the caller parks the piece under it).
    fn probe(&mut self, shard: u32, piece: &IoDesc) -> Option<u32> {
        let bs = u64::from(self.geo.block_size);
        let start = piece.offset_blocks * bs;
        let len = piece.num_blocks * bs;
        if len == 0 || start / PAGE_BYTES != (start + len - 1) / PAGE_BYTES {
            return None;
        }
        let token = self.free_tokens.pop()?;
        let probe = Probe { start, len: len as u32, token };
        // SAFETY: as in `enqueue`: this channel is the one producer of its rings to the shards.
        if unsafe { self.front.probes[shard as usize].push(probe) }.is_err() {
            self.free_tokens.push(token);
            return None;
        }
        Some(token)
    }

    /// A shard answered a probe: take the loan, or send the read as a piece after all.
    fn answered(&mut self, shard: u32, a: Answer) {
        let token = a.token & !WHOLE;
        let Some(mut piece) = self.probing.get_mut(token as usize).and_then(Option::take) else {
            tracing::error!(shard, token = a.token, "cache: an answer to a probe this channel did not send; ignored");
            return;
        };
        self.free_tokens.push(token);
        if a.token & WHOLE != 0 {
            self.answered_whole(shard, piece, a.ctx2);
            return;
        }
        if a.ctx2 & LENT != 0 {
            piece.ctx2 = a.ctx2;
            piece.status = IoStatus::Success;
            self.piece_done(piece);
        } else {
            self.enqueue(shard, piece);
        }
    }

    /// A read inside one page for another reactor's shard, probed as it is (see `submit`): reserve a parent slot
    /// and a piece (so a "send it" answer can always go on), park the request under a token and send the probe.
    /// Gives the request back when the probe cannot go (no token, the ring full): it then takes the usual path.
    fn probe_whole(&mut self, shard: u32, io: Box<IoDesc>) -> Result<(), Box<IoDesc>> {
        let bs = u64::from(self.geo.block_size);
        let (start, len) = (io.offset_blocks * bs, io.num_blocks * bs);
        if io.flags.contains(IoFlags::DIRECT) || len == 0 || start / PAGE_BYTES != (start + len - 1) / PAGE_BYTES {
            return Err(io);
        }
        if self.shared.shards[shard as usize].state.load(Ordering::Acquire) != SHARD_RUNNING {
            return Err(io);
        }
        let (Some(&p), Some(&token)) = (self.free_parents.last(), self.free_tokens.last()) else { return Err(io) };
        let Some(mut piece) = self.free_pieces.pop() else { return Err(io) };
        // SAFETY: as in `enqueue`: this channel is the one producer of its rings to the shards.
        if unsafe { self.front.probes[shard as usize].push(Probe { start, len: len as u32, token: token | WHOLE }) }.is_err() {
            self.free_pieces.push(piece);
            return Err(io);
        }
        self.free_parents.pop();
        self.free_tokens.pop();
        piece.ctx = self.piece_ctx(p);
        self.probing[token as usize] = Some(piece);
        let parent = &mut self.parents[p as usize];
        parent.io = Some(io);
        parent.pending = 1;
        parent.err = None;
        (parent.next, parent.end) = (0, 0);
        Ok(())
    }

    /// The answer to a whole-request probe: a loan is copied straight into the request's buffer, which completes;
    /// "send it" sends the reserved piece for the whole request.
    fn answered_whole(&mut self, shard: u32, mut piece: Box<IoDesc>, ctx2: u64) {
        let p = (piece.ctx & 0xffff_ffff) as usize;
        let Some(mut io) = self.parents.get_mut(p).and_then(|pa| pa.io.take()) else {
            tracing::error!(shard, parent = p, "cache: a probe's request is missing; ignored");
            self.free_pieces.push(piece);
            return;
        };
        if ctx2 & LENT != 0 {
            io.status = IoStatus::Success;
            self.take_loan(&mut io, ctx2);
            self.free_pieces.push(piece);
            self.free_parents.push(p as u32);
            self.done.push(io);
            return;
        }
        let ctx = piece.ctx;
        piece.prepare(io.op, io.offset_blocks, io.num_blocks);
        piece.flags = io.flags;
        piece.ctx = ctx;
        piece.client = self.client_of(&io);
        for s in io.segs() {
            // SAFETY: a whole segment of the caller's request, valid and untouched until the request completes,
            // which is after this piece comes back; a piece has as many segments as its request.
            if unsafe { piece.push_seg_raw(s.ptr(), s.iova(), s.len()) }.is_err() {
                tracing::error!("cache: a piece needed more segments than its request");
            }
        }
        self.parents[p].io = Some(io);
        self.enqueue(shard, piece);
    }

    /// Put a piece on its shard's ring (or keep it, in order, when the ring is full).
    fn enqueue(&mut self, shard: u32, mut piece: Box<IoDesc>) {
        if piece.op == IoOp::Read && !piece.flags.contains(IoFlags::DIRECT) {
            // Another reactor: a hit comes back as a loan of its pages, copied here on this core.
            piece.ctx2 = LEND_OK;
        }
        if !self.unsent.is_empty() {
            // Keep order behind earlier refused pieces.
            self.unsent.push_back((shard, piece));
            return;
        }
        // SAFETY: a channel's rings to the shards have one producer, the channel holding the id (taken exclusively
        // in `open`, given back in `drop`), used by one thread at a time (`&mut self`).
        if let Err(back) = unsafe { self.front.to_shard[shard as usize].push(piece) } {
            self.unsent.push_back((shard, back));
        }
    }

    /// A read piece came back as a loan: copy the lent page's bytes into the caller's segments, then publish that
    /// the loan is over.
    fn take_loan(&mut self, piece: &mut IoDesc, ctx2: u64) {
        let (shard, slot, seq) = lent_parts(ctx2);
        let bs = u64::from(self.geo.block_size);
        let (off, len) = ((piece.offset_blocks * bs) % PAGE_BYTES, piece.num_blocks * bs);
        let at = slot * PAGE_BYTES + off;
        match self.shared.shards.get(shard).and_then(|s| s.pages.get()) {
            Some(region) if at + len <= region.len => {
                let mut done = 0u64;
                for d in piece.segs() {
                    let n = u64::from(d.len()).min(len - done);
                    // SAFETY: the destination is the first `n` bytes of a caller's segment (lent to us until its
                    // request completes, after this). The source is bytes `at + done .. at + done + n` of the shard's
                    // page memory (inside it: checked above, `done + n <= len`), a page its shard pinned for this
                    // loan and leaves unchanged until we publish the loan's end below.
                    unsafe { std::ptr::copy_nonoverlapping(region.base.as_ptr().add((at + done) as usize), d.ptr().as_ptr(), n as usize) };
                    done += n;
                }
            }
            _ => {
                tracing::error!(shard, slot, "cache: a read loan names a page outside its shard");
                piece.status = IoStatus::Failed(IoError::Aborted);
            }
        }
        match (self.windows.get_mut(shard).map(|w| w.finish(seq)), self.acks_due.get_mut(shard)) {
            (Some(Some(mark)), Some(due)) => *due = Some(mark),
            _ => tracing::error!(shard, seq, "cache: a read loan outside this channel's window"),
        }
    }

    /// Publish the loan watermarks that moved during this poll.
    fn publish_acks(&mut self) {
        for (shard, due) in self.acks_due.iter_mut().enumerate() {
            if let (Some(mark), Some(a)) = (due.take(), self.front.acks.get(shard)) {
                // Release: the copies of every loan below `mark` happen before the shard sees their end and reuses
                // the pages.
                a.0.store(mark, Ordering::Release);
            }
        }
    }

    fn piece_done(&mut self, mut piece: Box<IoDesc>) {
        if piece.ctx2 & LENT != 0 {
            let ctx2 = piece.ctx2;
            self.take_loan(&mut piece, ctx2);
            piece.ctx2 = 0;
        }
        let p = (piece.ctx & 0xffff_ffff) as usize;
        let status = piece.status;
        piece.clear_raw_segs();
        self.free_pieces.push(piece);
        let Some(parent) = self.parents.get_mut(p) else { return };
        if let IoStatus::Failed(e) = status {
            parent.err.get_or_insert(e);
        } else if status == IoStatus::Pending {
            parent.err.get_or_insert(IoError::Aborted);
        }
        parent.pending = parent.pending.saturating_sub(1);
        if parent.pending == 0 && parent.next < parent.end && parent.err.is_none() {
            self.send_range_batch(p as u32);
            return;
        }
        if parent.pending == 0 {
            if let Some(mut io) = parent.io.take() {
                io.status = parent.err.take().map_or(IoStatus::Success, IoStatus::Failed);
                self.done.push(io);
            }
            self.free_parents.push(p as u32);
        }
    }

    /// Send the next batch of pieces of a DEALLOCATE / WRITE ZEROES parent.
    fn send_range_batch(&mut self, p: u32) {
        let Some(parent) = self.parents.get(p as usize) else { return };
        let (next, end) = (parent.next, parent.end);
        let Some((op, flags, client)) = parent.io.as_ref().map(|io| (io.op, io.flags, self.client_of(io))) else { return };
        let bs = u64::from(self.geo.block_size);
        let ctx = self.piece_ctx(p);
        let mut batch: [(u32, u64, u64); RANGE_BATCH] = [(0, 0, 0); RANGE_BATCH];
        let mut n = 0usize;
        let mut stop = end;
        self.shared.stripes().split(next, end, |pc| {
            if n < RANGE_BATCH && n < self.free_pieces.len() {
                batch[n] = (pc.owner, pc.start, pc.end);
                n += 1;
            } else if stop == end {
                stop = pc.start;
            }
        });
        let parent = &mut self.parents[p as usize];
        parent.next = stop;
        parent.pending += n as u32;
        for &(owner, a, b) in &batch[..n] {
            let Some(mut piece) = self.free_pieces.pop() else { break };
            piece.prepare(op, a / bs, (b - a) / bs);
            piece.flags = flags;
            piece.ctx = ctx;
            piece.client = client;
            self.send(owner, piece);
        }
    }

    /// A finished piece reaped from a same-thread engine: ours, another channel's, or the shard's own final flush
    /// (handed back to the shard poller).
    fn route(&mut self, shard: u32, io: Box<IoDesc>) {
        if io.ctx == FINAL_FLUSH_CTX {
            match self.shared.shards.get(shard as usize).map(|s| s.final_back.push(io)) {
                Some(Ok(())) => {}
                _ => tracing::error!(shard, "cache: a shard's final flush came back where it cannot be handed on"),
            }
            return;
        }
        if (io.ctx >> 32) & 0xffff == u64::from(self.id) {
            self.piece_done(io);
        } else if let Err(back) = self.shared.deliver_to_front(shard, io) {
            self.foreign.push((shard, back));
        }
    }

    fn piece_ctx(&self, parent: u32) -> u64 {
        (u64::from(self.id) << 32) | u64::from(parent)
    }

    /// Who a piece of `io` is for: the request's client, else this channel's reactor as an internal client.
    fn client_of(&self, io: &IoDesc) -> u16 {
        if io.client != 0 {
            io.client
        } else {
            self.client
        }
    }

    /// Flush on a cache whose shards have all stopped: answer from their final state.
    fn flush_after_stop(&self) -> Option<IoStatus> {
        let mut all_clean = true;
        for s in self.shared.shards.iter() {
            match s.state.load(Ordering::Acquire) {
                SHARD_DONE_CLEAN => {}
                SHARD_DONE_DIRTY => all_clean = false,
                _ => return None,
            }
        }
        Some(if all_clean { IoStatus::Success } else { IoStatus::Failed(IoError::Aborted) })
    }
}

impl IoChannel for StripedChannel {
    fn submit(&mut self, mut io: Box<IoDesc>) -> Result<(), Rejected> {
        if let Err(e) = validate(&self.geo, &self.feat, &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        let bs = u64::from(self.geo.block_size);
        let stripes = self.shared.stripes();
        let (start, end) = (io.offset_blocks * bs, (io.offset_blocks + io.num_blocks) * bs);
        let needed = if io.op == IoOp::Flush {
            if let Some(st) = self.flush_after_stop() {
                io.status = st;
                self.done.push(io);
                return Ok(());
            }
            self.shared.shards.len()
        } else if !io.op.has_data() {
            1
        } else {
            // At most two: the max transfer across reactors is one stripe.
            2
        };
        if self.free_parents.is_empty() || self.free_pieces.len() < needed || self.done.len() >= self.depth as usize {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        if io.op == IoOp::Read && self.unsent.is_empty() {
            // The hit fast path: a read inside one stripe of the shard on this thread completes here and now.
            let sb = stripes.stripe_bytes();
            let owner = stripes.owner(start);
            if start / sb == (end - 1) / sb || self.shared.shards.len() == 1 {
                if let Some(mut engine) = self.local_engine(owner) {
                    // SAFETY: as in `send`: the same-thread engine, whose poller is not running now.
                    if let Some(st) = unsafe { engine.as_mut() }.try_hit(&mut io, false) {
                        io.status = st;
                        self.done.push(io);
                        return Ok(());
                    }
                } else if self.shared.shards.len() > 1 {
                    // Another reactor's page: probe with the request itself. On a hit (a loan) it completes
                    // without a piece ever being built or sent.
                    match self.probe_whole(owner, io) {
                        Ok(()) => return Ok(()),
                        Err(back) => io = back,
                    }
                }
            }
        }
        let Some(p) = self.free_parents.pop() else { return Err(Rejected { io, why: SubmitError::Busy }) };
        io.status = IoStatus::Pending;
        let ctx = self.piece_ctx(p);
        let (op, flags, client) = (io.op, io.flags, self.client_of(&io));
        if !op.has_data() && op != IoOp::Flush {
            self.parents[p as usize] = Parent { io: Some(io), pending: 0, err: None, next: start, end };
            self.send_range_batch(p);
            return Ok(());
        }
        if op == IoOp::Flush {
            self.parents[p as usize] = Parent { io: Some(io), pending: needed as u32, err: None, next: 0, end: 0 };
            for shard in 0..self.shared.shards.len() as u32 {
                let Some(mut piece) = self.free_pieces.pop() else { break };
                piece.prepare(IoOp::Flush, 0, 0);
                piece.ctx = ctx;
                piece.client = client;
                self.send(shard, piece);
            }
            return Ok(());
        }
        // Build the pieces while the request is still ours to read, then hand it to its parent slot, then send.
        let mut pieces: [Option<(u32, Box<IoDesc>)>; 2] = [None, None];
        let mut count = 0usize;
        let mut too_many = false;
        stripes.split(start, end, |pc| {
            if count >= pieces.len() {
                too_many = true;
                return;
            }
            let Some(mut piece) = self.free_pieces.pop() else {
                too_many = true;
                return;
            };
            piece.prepare(op, pc.start / bs, (pc.end - pc.start) / bs);
            piece.flags = flags;
            piece.ctx = ctx;
            piece.client = client;
            let segs = io.segs();
            let mut ok = true;
            seg_slices(segs.iter().map(|s| u64::from(s.len())), pc.buf_offset, pc.end - pc.start, |i, o, l| {
                let s = segs[i];
                // SAFETY: `o + l <= s.len()` (seg_slices stays inside each segment), so the pointer is inside the
                // segment and non-null; the caller's segments stay valid and untouched until its request completes,
                // which is after every piece has come back.
                let ptr = unsafe { std::ptr::NonNull::new_unchecked(s.ptr().as_ptr().add(o as usize)) };
                // SAFETY: as above: a sub-range of a segment the caller lent us until completion.
                if unsafe { piece.push_seg_raw(ptr, s.iova() + o, l as u32) }.is_err() {
                    ok = false;
                }
            });
            if !ok {
                // Cannot happen: a piece has at most as many segments as its request.
                tracing::error!("cache: a piece needed more segments than its request");
            }
            pieces[count] = Some((pc.owner, piece));
            count += 1;
        });
        if too_many {
            // Cannot happen with the geometry's max transfer of one stripe: undo and refuse.
            for (_, mut piece) in pieces.iter_mut().filter_map(Option::take) {
                piece.clear_raw_segs();
                self.free_pieces.push(piece);
            }
            self.free_parents.push(p);
            return Err(Rejected {
                io,
                why: SubmitError::Invalid(IoError::BadLength { bytes: end - start, detail: "spans more than two cache stripes" }),
            });
        }
        self.parents[p as usize] = Parent { io: Some(io), pending: count as u32, err: None, next: 0, end: 0 };
        for (owner, piece) in pieces.iter_mut().filter_map(Option::take) {
            self.send(owner, piece);
        }
        Ok(())
    }

    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        while let Some((shard, piece)) = self.unsent.pop_front() {
            // SAFETY: as in `send`: this channel is the one producer of its rings to the shards.
            if let Err(back) = unsafe { self.front.to_shard[shard as usize].push(piece) } {
                self.unsent.push_front((shard, back));
                break;
            }
        }
        // Rings by index, not through a clone of the `Arc<Front>`: a clone and drop per poll would write its count
        // twice, on the line the shards read the ring pointers from every poll (a locked instruction waiting on a
        // cross-core miss, each poll).
        for shard in 0..self.front.answers.len() {
            // SAFETY: this channel is the one consumer of its answer rings (as for its piece rings below).
            while let Some(a) = unsafe { self.front.answers[shard].pop() } {
                self.answered(shard as u32, a);
            }
        }
        for shard in 0..self.front.from_shard.len() {
            // SAFETY: this channel (holding the id exclusively, `&mut self`) is the one consumer of its rings.
            while let Some(piece) = unsafe { self.front.from_shard[shard].pop() } {
                self.piece_done(piece);
            }
        }
        // The local fast path: reap the same-thread engine (a thread runs one reactor, so at most one shard) directly,
        // routing other channels' pieces to their rings.
        for _ in 0..self.foreign.len() {
            let (shard, io) = self.foreign.remove(0);
            self.route(shard, io);
        }
        let me = thread_tag();
        let local = self.shared.shards.iter().position(|s| s.thread.load(Ordering::Acquire) == me);
        if let Some(shard) = local.map(|i| i as u32) {
            if let Some(mut engine) = self.local_engine(shard) {
                let mut reaped = std::mem::take(&mut self.reaped);
                // SAFETY: as in `send`: the same-thread engine, whose poller is not running now.
                unsafe { engine.as_mut() }.poll(&mut reaped);
                for io in reaped.drain(..) {
                    self.route(shard, io);
                }
                self.reaped = reaped;
            }
        }
        // Loans only end in this poll (answers, pieces back, local reaps): publish once, here.
        self.publish_acks();
        let room = out.capacity() - out.len();
        let n = room.min(self.done.len());
        out.extend(self.done.drain(..n));
        n
    }

    fn outstanding(&self) -> usize {
        self.depth as usize - self.free_parents.len() + self.done.len()
    }

    fn queue_depth(&self) -> u32 {
        self.depth
    }
}

impl Drop for StripedChannel {
    fn drop(&mut self) {
        // Pieces still at the shards point into callers' buffers and will come back to our ring: wait for them
        // (bounded), so the channel id can be reused safely.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sink = Vec::with_capacity(self.depth as usize);
        while (self.free_pieces.len() + self.unsent.len() < self.piece_count || self.free_tokens.len() < self.piece_count)
            && Instant::now() < deadline
        {
            sink.clear();
            self.poll(&mut sink);
            if !self.unsent.is_empty() && self.shared.shards.iter().all(|s| s.state.load(Ordering::Acquire) >= SHARD_DONE_CLEAN) {
                break;
            }
            std::thread::yield_now();
        }
        let back = self.free_pieces.len() + self.unsent.len();
        if back < self.piece_count || self.free_tokens.len() < self.piece_count {
            // Keep the id taken forever: a late piece must not land on a new channel's ring.
            tracing::error!(channel = self.id, missing = self.piece_count - back, "cache channel closed with pieces still at the shards");
            return;
        }
        self.shared.front_busy[self.id as usize].store(false, Ordering::Release);
    }
}

impl std::fmt::Debug for StripedChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripedChannel").field("id", &self.id).field("depth", &self.depth).finish()
    }
}

/// Check a piece layout cheaply at compile time: the ctx packs channel id (16 of the high 32 bits), parent (32).
const _: () = assert!(MAX_CHANNELS <= u16::MAX as usize);
