//! One core's I/O generator: a [`Poller`] that keeps `queue_depth` I/Os in flight on its own [`IoChannel`].
//!
//! Everything is allocated in [`Job::new`], on the reactor's thread: the channel, a [`BufPool`] carved from the
//! arena, and one boxed [`IoDesc`] per queue slot with its buffer attached for good. In steady state a round is:
//! poll the channel into a preallocated vector, read the TSC once, and for each completion record its latency and
//! resubmit the same descriptor with a new offset. No allocation, no lock, no system call.
//!
//! Phases: `Prefill` (read-only workloads with `--verify`: write every slot of the slice once) → `Ready` (wait for the
//! start signal, so all cores start together) → `Running` → `Draining` (stop submitting, reap what is in flight) →
//! `Finished` (results handed to the main thread; the poller leaves).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use nvstack_blockdev::bdev::{ChannelOpts, Rejected};
use nvstack_blockdev::reactor::{PollOutcome, Poller, ReactorCtx};
use nvstack_blockdev::{BlockDev, IoChannel, IoDesc, IoOp, IoStatus, SubmitError};
use nvstack_driver::dma::{Arena, BufPool};

use super::clock::{thread_cpu_ns, ticks};
use super::histogram::Histogram;
use super::verify::{VerifyState, VerifyStats};
use crate::error::AppError;

/// What one core does: fixed before it starts.
#[derive(Debug, Clone)]
pub struct JobParams {
    /// Reactor index (0-based, in core-mask order).
    pub reactor_index: usize,
    /// OS core id.
    pub core: usize,
    /// I/Os kept in flight.
    pub queue_depth: u32,
    /// Bytes per I/O.
    pub io_bytes: u32,
    /// Device block size.
    pub block_size: u32,
    /// Buffer alignment the device needs.
    pub buf_align_bytes: u32,
    /// Read share: `Some(threshold)` draws a random number per I/O and reads when it is below; `None` uses `reads`.
    pub mix_threshold: Option<u64>,
    /// For unmixed workloads: read (true) or write (false).
    pub reads: bool,
    /// Random offsets (else sequential).
    pub random: bool,
    /// First block of this core's range.
    pub range_start_blocks: u64,
    /// I/O-size slots in the range.
    pub slot_count: u64,
    /// First slot of a sequential workload.
    pub seq_start_slot: u64,
    /// PRNG seed of this core.
    pub seed: u64,
    /// Stop after submitting this many I/Os.
    pub io_limit: u64,
    /// Run this many ticks.
    pub duration_ticks: u64,
    /// Keep a verify table and pattern every write.
    pub verify: bool,
    /// Write every slot once before starting (read-only workloads with verify).
    pub prefill: bool,
}

/// Signals shared by all jobs of a run.
#[derive(Debug, Default)]
pub struct RunControl {
    /// Start: every job is ready.
    pub go: AtomicBool,
    /// Stop early (an error elsewhere, or the main thread's deadline).
    pub stop: AtomicBool,
}

/// What one job reports while and after it runs.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct JobShared {
    /// I/Os completed so far (updated once per poll round, for the progress line).
    pub completed: AtomicU64,
    /// The job is set up (and pre-filled) and waits for `go`.
    pub ready: AtomicBool,
    /// The job has put its outcome in `outcome`.
    pub done: AtomicBool,
    /// The result, or the set-up error.
    pub outcome: Mutex<Option<Result<JobResult, AppError>>>,
}

impl JobShared {
    /// Store the outcome and raise `done`.
    pub fn finish(&self, r: Result<JobResult, AppError>) {
        match self.outcome.lock() {
            Ok(mut g) => *g = Some(r),
            Err(p) => *p.into_inner() = Some(r),
        }
        self.done.store(true, Ordering::Release);
    }
}

/// One core's results.
#[derive(Debug)]
pub struct JobResult {
    /// Reactor index.
    pub reactor_index: usize,
    /// OS core id.
    pub core: usize,
    /// Reads completed (successfully or not).
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// I/Os that failed (pre-fill writes included).
    pub errors: u64,
    /// The first failure, described.
    pub first_error: Option<String>,
    /// Latencies, in ticks.
    pub hist: Histogram,
    /// Ticks from the start signal to the last completion.
    pub elapsed_ticks: u64,
    /// CPU time the reactor thread ran from the start signal to the end, in nanoseconds.
    pub cpu_ns: u64,
    /// Verify counters (with `--verify`).
    pub verify: Option<VerifyStats>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Prefill,
    Ready,
    Running,
    Draining,
    Finished,
}

/// wyrand: one multiply per number, passes BigCrush, 64-bit state.
#[derive(Debug, Clone, Copy)]
struct WyRand(u64);

impl WyRand {
    #[inline(always)]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) as u64) ^ (t as u64)
    }
}

/// `r` scaled into `0..n` without a division (Lemire's multiply-high).
#[inline(always)]
fn below(r: u64, n: u64) -> u64 {
    ((u128::from(r) * u128::from(n)) >> 64) as u64
}

/// With `--verify`, slot and generation travel in the descriptor's `ctx2`: the slot in the low 32 bits (the verify
/// table limit keeps slot numbers below 2^28) and a write's generation in the high 32.
#[inline]
fn pack_ctx2(slot: u64, gen: u32) -> u64 {
    (u64::from(gen) << 32) | (slot & 0xffff_ffff)
}

/// The per-core I/O generator.
pub struct Job {
    p: JobParams,
    ch: Box<dyn IoChannel>,
    /// Descriptors not in flight (all of them at start; afterwards only those refused with Busy or parked at the end).
    #[allow(clippy::vec_box)] // the channel API moves boxed descriptors in and out: no re-boxing, no copies
    free: Vec<Box<IoDesc>>,
    /// Completions reaped by one poll.
    #[allow(clippy::vec_box)] // as above
    done: Vec<Box<IoDesc>>,
    phase: Phase,
    rng: WyRand,
    next_seq_slot: u64,
    blocks_per_io: u64,
    in_flight: u32,
    submitted: u64,
    reads: u64,
    writes: u64,
    errors: u64,
    first_error: Option<String>,
    /// A request was refused as Invalid: it would be refused again, so the job stops.
    fatal: bool,
    hist: Histogram,
    start_tick: u64,
    start_cpu_ns: u64,
    end_tick: u64,
    last_tick: u64,
    verify: Option<VerifyState>,
    shared: Arc<JobShared>,
    ctl: Arc<RunControl>,
    /// Keeps the buffers' arena region alive; dropped after the descriptors (field order).
    _pool: BufPool,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job").field("params", &self.p).field("phase", &self.phase).finish()
    }
}

impl Job {
    /// Set up a job: open its channel, carve its buffers, build its descriptors. Call on the reactor's thread.
    ///
    /// # Errors
    /// [`AppError::Bdev`] when the channel cannot be opened, [`AppError::Driver`] when the arena is too small.
    pub fn new(
        p: JobParams,
        bdev: &dyn BlockDev,
        arena: &Arc<Arena>,
        shared: Arc<JobShared>,
        ctl: Arc<RunControl>,
    ) -> Result<Job, AppError> {
        let ch = bdev.open_channel(ChannelOpts { reactor_index: p.reactor_index, queue_depth: p.queue_depth })?;
        let qd = p.queue_depth.min(ch.queue_depth().max(1));
        if qd < p.queue_depth {
            tracing::warn!(asked = p.queue_depth, got = qd, "perf: the channel takes fewer I/Os in flight than -q");
        }
        let align = u64::from(p.buf_align_bytes.max(4096));
        let mut pool = BufPool::new(arena, p.io_bytes, qd, align, "perf I/O buffers")?;
        let mut free = Vec::with_capacity(qd as usize);
        for i in 0..qd {
            let mut io = IoDesc::new(1);
            let Some(mut buf) = pool.get() else {
                return Err(AppError::Failed(format!("perf: buffer pool ran out at {i} of {qd}")));
            };
            // Something other than zeroes for plain writes; reads overwrite it.
            buf.fill(0x5a);
            if io.attach_buf(buf).is_err() {
                return Err(AppError::Failed("perf: a descriptor refused its buffer".into()));
            }
            free.push(io);
        }
        let blocks_per_io = u64::from(p.io_bytes / p.block_size.max(1));
        let verify = p.verify.then(|| {
            let core_tag = u16::try_from(p.reactor_index).unwrap_or(u16::MAX);
            VerifyState::new(core_tag, p.block_size, blocks_per_io, p.slot_count as usize)
        });
        let phase = if p.prefill { Phase::Prefill } else { Phase::Ready };
        if phase == Phase::Ready {
            shared.ready.store(true, Ordering::Release);
        }
        Ok(Job {
            rng: WyRand(p.seed),
            next_seq_slot: p.seq_start_slot % p.slot_count.max(1),
            ch,
            free,
            done: Vec::with_capacity(qd as usize),
            phase,
            blocks_per_io,
            in_flight: 0,
            submitted: 0,
            reads: 0,
            writes: 0,
            errors: 0,
            first_error: None,
            fatal: false,
            hist: Histogram::new(),
            start_tick: 0,
            start_cpu_ns: 0,
            end_tick: 0,
            last_tick: 0,
            verify,
            shared,
            ctl,
            _pool: pool,
            p,
        })
    }

    /// Pick the next operation and slot, and fill the descriptor.
    #[inline(always)]
    fn prepare(&mut self, io: &mut IoDesc, now: u64) {
        let read = match self.p.mix_threshold {
            None => self.p.reads,
            Some(th) => self.rng.next() < th,
        };
        let mut slot = if self.p.random {
            below(self.rng.next(), self.p.slot_count)
        } else {
            let s = self.next_seq_slot;
            self.next_seq_slot = if s + 1 >= self.p.slot_count { 0 } else { s + 1 };
            s
        };
        let op = if read { IoOp::Read } else { IoOp::Write };
        if self.verify.is_some() {
            slot = self.prepare_verify(io, slot, read);
        }
        io.prepare(op, self.p.range_start_blocks + slot * self.blocks_per_io, self.blocks_per_io);
        io.ctx = now;
    }

    /// Verify: claim a slot with nothing in flight (the one drawn, or the next free one), and pattern a write.
    #[cold]
    fn prepare_verify(&mut self, io: &mut IoDesc, slot: u64, read: bool) -> u64 {
        let Some(v) = self.verify.as_mut() else { return slot };
        let slot = if v.try_claim(slot as usize) {
            slot
        } else {
            // Config checks guarantee more slots than the queue depth, so a free one exists.
            v.claim_from(slot as usize).unwrap_or(slot as usize) as u64
        };
        let first_lba = self.p.range_start_blocks + slot * self.blocks_per_io;
        let gen = if read {
            0
        } else {
            match io.bufs_mut().first_mut() {
                Some(buf) => v.fill(buf, first_lba),
                None => 0,
            }
        };
        io.ctx2 = pack_ctx2(slot, gen);
        slot
    }

    /// Submit; a Busy refusal parks the descriptor for the next round, an Invalid one stops the job.
    #[inline(always)]
    fn submit(&mut self, io: Box<IoDesc>) {
        match self.ch.submit(io) {
            Ok(()) => {
                self.in_flight += 1;
                self.submitted += 1;
            }
            Err(r) => self.refused(r),
        }
    }

    #[cold]
    fn refused(&mut self, r: Rejected) {
        let Rejected { io, why } = r;
        if let SubmitError::Invalid(e) = why {
            self.errors += 1;
            if self.first_error.is_none() {
                self.first_error =
                    Some(format!("{} of blocks {}+{} refused: {e}", io.op.name(), io.offset_blocks, io.num_blocks));
            }
            self.fatal = true;
            if self.phase == Phase::Running {
                self.phase = Phase::Draining;
            }
            self.release_verify_claim(&io);
        } else if self.verify.is_some() {
            // Busy: the descriptor will be prepared afresh, so drop this slot's claim.
            self.release_verify_claim(&io);
        }
        self.free.push(io);
    }

    #[cold]
    fn release_verify_claim(&mut self, io: &IoDesc) {
        if let Some(v) = self.verify.as_mut() {
            let slot = (io.ctx2 & 0xffff_ffff) as usize;
            // Nothing reached the device: the slot's contents and generation are unchanged.
            v.release(slot);
        }
    }

    /// One completion while running or draining.
    #[inline(always)]
    fn complete(&mut self, mut io: Box<IoDesc>, now: u64) {
        self.in_flight -= 1;
        self.hist.record(now.wrapping_sub(io.ctx));
        if io.op == IoOp::Read {
            self.reads += 1;
        } else {
            self.writes += 1;
        }
        let ok = matches!(io.status, IoStatus::Success);
        if !ok {
            self.failed(&io);
        }
        if self.verify.is_some() {
            self.verify_done(&io, ok);
        }
        if self.phase == Phase::Running && self.submitted < self.p.io_limit {
            self.prepare(&mut io, now);
            self.submit(io);
        } else {
            self.free.push(io);
        }
    }

    #[cold]
    fn failed(&mut self, io: &IoDesc) {
        self.errors += 1;
        if self.first_error.is_none() {
            let why = match io.status {
                IoStatus::Failed(e) => e.to_string(),
                IoStatus::Pending => "completed with status still pending".into(),
                IoStatus::Success => "success".into(),
            };
            self.first_error = Some(format!("{} of blocks {}+{}: {why}", io.op.name(), io.offset_blocks, io.num_blocks));
        }
    }

    #[cold]
    fn verify_done(&mut self, io: &IoDesc, ok: bool) {
        let Some(v) = self.verify.as_mut() else { return };
        let slot = (io.ctx2 & 0xffff_ffff) as usize;
        if io.op == IoOp::Write {
            v.write_done(slot, (io.ctx2 >> 32) as u32, ok);
        } else if let Some(buf) = io.bufs().first() {
            let _ = v.read_done(slot, buf, io.offset_blocks, ok);
        }
    }

    /// Submit from the free list (at start, after Busy refusals).
    #[cold]
    fn refill(&mut self, now: u64) {
        while self.phase == Phase::Running && self.submitted < self.p.io_limit {
            let Some(mut io) = self.free.pop() else { break };
            self.prepare(&mut io, now);
            let before = self.free.len();
            self.submit(io);
            if self.free.len() > before {
                break; // refused: try again next round
            }
        }
    }

    fn start(&mut self) {
        self.start_cpu_ns = thread_cpu_ns();
        let now = ticks();
        self.start_tick = now;
        self.last_tick = now;
        self.end_tick = now.saturating_add(self.p.duration_ticks);
        self.phase = if self.fatal { Phase::Draining } else { Phase::Running };
        self.refill(now);
    }

    /// One round of the running (or draining) job.
    #[inline(always)]
    fn io_round(&mut self, ctx: &ReactorCtx) -> PollOutcome {
        let n = self.ch.poll(&mut self.done);
        let now = ticks();
        if self.phase == Phase::Running
            && (now >= self.end_tick || self.ctl.stop.load(Ordering::Relaxed) || ctx.stopping())
        {
            self.phase = Phase::Draining;
        }
        if n > 0 {
            let mut done = std::mem::take(&mut self.done);
            for io in done.drain(..) {
                self.complete(io, now);
            }
            self.done = done;
            self.last_tick = now;
            self.shared.completed.store(self.reads + self.writes, Ordering::Relaxed);
        }
        if !self.free.is_empty() && self.phase == Phase::Running {
            self.refill(now);
        }
        if self.in_flight == 0 && (self.phase == Phase::Draining || self.submitted >= self.p.io_limit) {
            self.finish();
            return PollOutcome::Done;
        }
        // Busy while anything is in flight, so the reactor never backs off in the middle of a run.
        PollOutcome::Busy
    }

    /// One round of the pre-fill: write every slot of the range once, sequentially, QD deep.
    fn prefill_round(&mut self, ctx: &ReactorCtx) -> PollOutcome {
        let n = self.ch.poll(&mut self.done);
        let stop = self.fatal || self.ctl.stop.load(Ordering::Relaxed) || ctx.stopping();
        if n > 0 {
            let mut done = std::mem::take(&mut self.done);
            for io in done.drain(..) {
                self.in_flight -= 1;
                let ok = matches!(io.status, IoStatus::Success);
                if !ok {
                    self.failed(&io);
                }
                self.verify_done(&io, ok);
                self.free.push(io);
            }
            self.done = done;
        }
        while !stop && self.next_seq_slot < self.p.slot_count {
            let Some(mut io) = self.free.pop() else { break };
            let slot = self.next_seq_slot;
            self.next_seq_slot += 1;
            let slot = self.prepare_verify(&mut io, slot, false);
            io.prepare(IoOp::Write, self.p.range_start_blocks + slot * self.blocks_per_io, self.blocks_per_io);
            let before = self.free.len();
            match self.ch.submit(io) {
                Ok(()) => self.in_flight += 1,
                Err(r) => self.refused(r),
            }
            if self.free.len() > before {
                self.next_seq_slot -= 1;
                break;
            }
        }
        if self.in_flight == 0 && (stop || self.next_seq_slot >= self.p.slot_count) {
            self.next_seq_slot = self.p.seq_start_slot % self.p.slot_count.max(1);
            self.phase = Phase::Ready;
            self.shared.ready.store(true, Ordering::Release);
        }
        PollOutcome::Busy
    }

    fn finish(&mut self) {
        self.phase = Phase::Finished;
        self.shared.completed.store(self.reads + self.writes, Ordering::Relaxed);
        let result = JobResult {
            reactor_index: self.p.reactor_index,
            core: self.p.core,
            reads: self.reads,
            writes: self.writes,
            errors: self.errors,
            first_error: self.first_error.take(),
            hist: std::mem::take(&mut self.hist),
            elapsed_ticks: self.last_tick.saturating_sub(self.start_tick),
            cpu_ns: if self.start_tick == 0 { 0 } else { thread_cpu_ns().saturating_sub(self.start_cpu_ns) },
            verify: self.verify.as_mut().map(VerifyState::take_stats),
        };
        self.shared.finish(Ok(result));
    }
}

impl Poller for Job {
    fn poll(&mut self, ctx: &mut ReactorCtx) -> PollOutcome {
        match self.phase {
            Phase::Running | Phase::Draining => self.io_round(ctx),
            Phase::Ready => {
                if self.ctl.go.load(Ordering::Acquire) {
                    self.start();
                    PollOutcome::Busy
                } else if self.ctl.stop.load(Ordering::Relaxed) || ctx.stopping() {
                    self.finish();
                    PollOutcome::Done
                } else {
                    PollOutcome::Idle
                }
            }
            Phase::Prefill => self.prefill_round(ctx),
            Phase::Finished => PollOutcome::Done,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn below_stays_in_range_and_spreads() {
        let mut r = WyRand(42);
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            let v = below(r.next(), 10);
            hits[v as usize] += 1;
        }
        for h in hits {
            assert!((9_000..11_000).contains(&h), "{hits:?}");
        }
        assert_eq!(below(u64::MAX, 7), 6);
        assert_eq!(below(0, 7), 0);
    }

    #[test]
    fn ctx2_round_trips() {
        let c = pack_ctx2(123_456, 0x7fff_fffe);
        assert_eq!(c & 0xffff_ffff, 123_456);
        assert_eq!((c >> 32) as u32, 0x7fff_fffe);
    }
}
