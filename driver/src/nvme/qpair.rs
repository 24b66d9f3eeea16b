//! Queue pairs: the SQ/CQ rings in the arena, phase tags, doorbells ([`Ring`]), and the I/O queue pair a reactor
//! owns ([`IoQpair`]): preallocated command-id and request tables, PRP/SGL list slots, splitting at MDTS,
//! per-command deadlines, and recovery (abort, then controller reset and resubmission).
//!
//! # Memory rules
//! Queue memory is device-writable: entries are written with volatile stores and read with volatile loads, never
//! through references. A PRP or SGL list is built in a private scratch array and copied into the command's list
//! slot in the arena.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::ctrlr::Controller;
use super::ns::{build_deallocate, build_flush, build_rw, rw_range, NvmOp};
use super::prp::{build_prp, build_sgl, DmaSeg, DptrError, Window};
use super::spec::{CompletionEntry, DsmRange, Pod, SubmissionEntry, PSDT_SGL_MPTR_CONTIG};
use super::status::NvmeStatus;
use super::transport::Transport;
use crate::dma::DmaRegion;
use crate::DriverError;

/// Copy a wire struct out of DMA memory at `offset` (volatile, so the compiler neither elides nor tears it into
/// a reference). `None` when out of bounds or misaligned.
pub fn read_pod<T: Pod>(region: &DmaRegion, offset: u64) -> Option<T> {
    let (p, _) = region.slice(offset, std::mem::size_of::<T>() as u64)?;
    if !(p.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return None;
    }
    // SAFETY: in bounds (slice checked) and aligned (checked); T is Pod so every byte pattern is valid; volatile
    // because the device may write this memory.
    Some(unsafe { std::ptr::read_volatile(p.as_ptr().cast::<T>()) })
}

/// Copy a wire struct into DMA memory at `offset` (volatile store). `None` when out of bounds or misaligned.
pub fn write_pod<T: Pod>(region: &DmaRegion, offset: u64, value: &T) -> Option<()> {
    let (p, _) = region.slice(offset, std::mem::size_of::<T>() as u64)?;
    if !(p.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()) {
        return None;
    }
    // SAFETY: in bounds and aligned (checked above); the region is ours to write (no device reads it concurrently
    // for the slots we fill: the caller hands it over only afterwards, by a doorbell or a command).
    unsafe { std::ptr::write_volatile(p.as_ptr().cast::<T>(), *value) };
    Some(())
}

/// One SQ/CQ pair: ring memory, head/tail/phase, doorbell offsets. The admin queue and every I/O queue use it.
#[derive(Debug)]
pub struct Ring {
    qid: u16,
    entries: u16,
    sq: DmaRegion,
    cq: DmaRegion,
    sq_tail: u16,
    sq_rung: u16,
    sq_head: u16,
    cq_head: u16,
    cq_rung: u16,
    phase: bool,
    sq_db: usize,
    cq_db: usize,
    sq_base: *mut u8,
    cq_base: *mut u8,
}

// SAFETY: the raw base pointers point into `sq`/`cq`, which the ring owns and which are themselves Send (arena
// memory, accessed only through volatile operations by whoever owns the ring).
unsafe impl Send for Ring {}

impl Ring {
    /// A ring over `sq` (`entries` × 64 bytes) and `cq` (`entries` × 16 bytes) for queue `qid`.
    pub fn new(qid: u16, entries: u16, sq: DmaRegion, cq: DmaRegion, dstrd: u8) -> Ring {
        // Invariant used by push and next_cqe: the regions hold `entries` entries each, and are 64-byte aligned
        // (carved with 4 KiB alignment). Slot indices are always < entries.
        assert!(sq.len() >= u64::from(entries) * 64 && cq.len() >= u64::from(entries) * 16, "ring memory too small");
        let (sq_base, cq_base) = (sq.as_ptr(), cq.as_ptr());
        let mut r = Ring {
            sq_base,
            cq_base,
            qid,
            entries,
            sq,
            cq,
            sq_tail: 0,
            sq_rung: 0,
            sq_head: 0,
            cq_head: 0,
            cq_rung: 0,
            phase: true,
            sq_db: super::regs::sq_doorbell(qid, dstrd),
            cq_db: super::regs::cq_doorbell(qid, dstrd),
        };
        r.reset();
        r
    }

    /// Back to the state of a freshly created queue: indices 0, phase 1, CQ zeroed (no stale phase tags).
    pub fn reset(&mut self) {
        self.sq_tail = 0;
        self.sq_rung = 0;
        self.sq_head = 0;
        self.cq_head = 0;
        self.cq_rung = 0;
        self.phase = true;
        let _ = self.cq.zero(0, self.cq.len());
    }

    /// Queue ID.
    pub fn qid(&self) -> u16 {
        self.qid
    }
    /// Entries per queue.
    pub fn entries(&self) -> u16 {
        self.entries
    }
    /// SQ memory IOVA.
    pub fn sq_iova(&self) -> u64 {
        self.sq.iova()
    }
    /// CQ memory IOVA.
    pub fn cq_iova(&self) -> u64 {
        self.cq.iova()
    }
    /// Give the memory back (for reuse by a later queue).
    pub fn into_mem(self) -> (DmaRegion, DmaRegion) {
        (self.sq, self.cq)
    }

    /// Write `e` at the SQ tail and advance it. `false` when the SQ is full (it never is when at most
    /// `entries - 1` commands are outstanding, which the command-id tables guarantee).
    #[inline]
    pub fn push(&mut self, e: &SubmissionEntry) -> bool {
        let next = if self.sq_tail + 1 == self.entries { 0 } else { self.sq_tail + 1 };
        if next == self.sq_head {
            return false;
        }
        // SAFETY: sq_tail < entries and the SQ region holds `entries` 64-byte slots, 64-aligned (invariant stated
        // in `new`); volatile because the device reads this memory; no reference into it is created.
        unsafe { std::ptr::write_volatile(self.sq_base.add(usize::from(self.sq_tail) * 64).cast::<SubmissionEntry>(), *e) };
        self.sq_tail = next;
        true
    }

    /// Ring the SQ tail doorbell if the tail moved since the last ring.
    #[inline]
    pub fn ring_sq(&mut self, t: &dyn Transport) {
        if self.sq_tail != self.sq_rung {
            // Orders the SQ entry stores (and PRP/SGL list stores) before the doorbell store that hands them over.
            fence(Ordering::Release);
            t.write32(self.sq_db, u32::from(self.sq_tail));
            self.sq_rung = self.sq_tail;
        }
    }

    /// The next completion entry, if the device has posted one (phase tag matches); advances the head.
    #[inline]
    pub fn next_cqe(&mut self) -> Option<CompletionEntry> {
        // SAFETY: cq_head < entries and the CQ region holds `entries` 16-byte slots, 64-aligned (invariant stated
        // in `new`), so the slot and its status word at offset 14 are in bounds and aligned.
        let slot = unsafe { self.cq_base.add(usize::from(self.cq_head) * 16) };
        // SAFETY: as above; volatile because the device writes it.
        let status = unsafe { std::ptr::read_volatile(slot.add(14).cast::<u16>()) };
        if (status & 1 == 1) != self.phase {
            return None;
        }
        // Orders the phase-tag load before the loads of the rest of the entry and of the data the command moved.
        fence(Ordering::Acquire);
        // SAFETY: as above (a 16-byte aligned CompletionEntry slot); a volatile copy, no reference kept.
        let e = unsafe { std::ptr::read_volatile(slot.cast::<CompletionEntry>()) };
        self.cq_head += 1;
        if self.cq_head == self.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        if e.sq_head < self.entries {
            self.sq_head = e.sq_head;
        }
        Some(e)
    }

    /// Ring the CQ head doorbell if the head moved since the last ring.
    #[inline]
    pub fn ring_cq(&mut self, t: &dyn Transport) {
        if self.cq_head != self.cq_rung {
            // Orders our loads of the consumed entries before the doorbell store that lets the device reuse them.
            fence(Ordering::Release);
            t.write32(self.cq_db, u32::from(self.cq_head));
            self.cq_rung = self.cq_head;
        }
    }
}

/// Why a request failed, as the driver sees it. Small and `Copy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoFailure {
    /// A media error on the blocks `slba..slba + nlb` (the failed command's range).
    Media {
        /// The status.
        status: NvmeStatus,
        /// First block of the failed command.
        slba: u64,
        /// Its block count.
        nlb: u64,
    },
    /// Another error status.
    Status(NvmeStatus),
    /// The command timed out and recovery (abort, reset, resubmission) did not complete it.
    Timeout,
    /// The device is gone.
    Gone,
    /// The controller failed (fatal status and a reset that did not bring it back) or the queue was torn down.
    Aborted,
}

/// Why a submission was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubmitFail {
    /// Not enough free command ids or request slots now: poll, then try again.
    Busy,
    /// The request can never be described (alignment, segment count): the reason.
    Invalid(&'static str),
    /// The controller is gone or failed.
    Dead(IoFailure),
}

/// Why the fast path ([`IoQpair::submit_rw`]) did not take a request. Small, so it returns in a register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FastFail {
    /// Needs the general path (a PRP list, splitting, misalignment): call [`IoQpair::submit`].
    NotEligible,
    /// No command id or request slot free now.
    Busy,
    /// The controller is gone or failed: [`IoQpair::submit`] says how.
    Dead,
}

/// One I/O request as the queue pair takes it. `segs` must stay valid (and untouched by the CPU) until the
/// request completes.
#[derive(Debug, Clone, Copy)]
pub struct IoCmd<'a, S: DmaSeg> {
    /// Operation.
    pub op: NvmOp,
    /// Namespace.
    pub nsid: u32,
    /// log2 of the namespace block size.
    pub lba_shift: u8,
    /// First block.
    pub slba: u64,
    /// Block count (0 for flush).
    pub nlb: u64,
    /// Data segments (read and write only).
    pub segs: &'a [S],
    /// Force unit access (write).
    pub fua: bool,
    /// Caller's tag, given back at completion.
    pub tag: u64,
}

/// Options for an I/O queue pair.
#[derive(Debug, Clone, Copy)]
pub struct QpairOpts {
    /// Requests in flight at once.
    pub depth: u16,
    /// Commands in flight at once (the command-id table; at least `depth`; a request split at MDTS uses several).
    /// The ring gets one more entry. Both are clamped to what CAP.MQES allows.
    pub commands: u16,
}

impl QpairOpts {
    /// `depth` requests and as many command ids.
    pub fn depth(depth: u16) -> QpairOpts {
        QpairOpts { depth, commands: depth }
    }
}

#[derive(Debug, Clone, Copy)]
struct Tracker {
    sqe: SubmissionEntry,
    /// Milliseconds since the queue pair's epoch when (re)submitted (wrapping).
    submitted: u32,
    /// The caller's tag, for single-command requests ([`SINGLE`]).
    tag: u64,
    /// Request index, or [`SINGLE`]: the command is the whole request and its slot is its command id.
    req: u16,
    busy: bool,
    abort_sent: bool,
    retries: u8,
}

#[derive(Debug, Clone, Copy)]
struct Request {
    tag: u64,
    op: NvmOp,
    nsid: u32,
    next_slba: u64,
    /// Blocks not yet issued (non-data ops are issued a few commands at a time).
    unissued: u64,
    max_blocks: u64,
    pending: u32,
    error: Option<IoFailure>,
    busy: bool,
}

const PAGE: u64 = 4096;
/// `Tracker::req` of a command that is a whole request by itself (no request-table entry).
const SINGLE: u16 = u16::MAX;
/// `u64`s in one command's list slot (one 4 KiB page).
const LIST_U64S: usize = (PAGE / 8) as usize;
/// Non-data commands (write zeroes, deallocate) a request keeps in flight at once.
const NON_DATA_WINDOW: u32 = 8;
/// Busy polls between deadline checks (idle polls always check).
const CHECK_EVERY_POLLS: u32 = 1024;

/// An I/O queue pair, owned by one reactor. Nothing here takes a lock or allocates on the I/O path.
pub struct IoQpair {
    ctrl: Arc<Controller>,
    t: Arc<dyn Transport>,
    ring: Option<Ring>,
    lists: Option<DmaRegion>,
    gen: u64,
    trackers: Box<[Tracker]>,
    free_cids: Vec<u16>,
    reqs: Box<[Request]>,
    free_reqs: Vec<u16>,
    in_flight: u16,
    scratch: Box<[u64; LIST_U64S]>,
    /// The cached clock: milliseconds since `epoch` (wrapping), read on idle polls.
    now: u32,
    epoch: Instant,
    polls_since_check: u32,
    next_check: Instant,
    timeout: Duration,
    max_cmd_bytes: u64,
    sgl: Option<bool>,
    dead: Option<IoFailure>,
}

impl std::fmt::Debug for IoQpair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoQpair")
            .field("ctrlr", &self.ctrl.name())
            .field("qid", &self.ring.as_ref().map(Ring::qid))
            .field("outstanding", &self.outstanding())
            .finish()
    }
}

impl IoQpair {
    /// Create queue `qid` on `ctrl` with `depth` request slots (the controller picks the qid and memory).
    pub(crate) fn new(ctrl: Arc<Controller>, ring: Ring, lists: DmaRegion, depth: u16, commands: u16) -> IoQpair {
        let now = Instant::now();
        let tracker = Tracker {
            sqe: SubmissionEntry::default(),
            submitted: 0,
            tag: 0,
            req: 0,
            busy: false,
            abort_sent: false,
            retries: 0,
        };
        let req = Request {
            tag: 0,
            op: NvmOp::Read,
            nsid: 0,
            next_slba: 0,
            unissued: 0,
            max_blocks: 1,
            pending: 0,
            error: None,
            busy: false,
        };
        let t = Arc::clone(ctrl.transport());
        IoQpair {
            gen: ctrl.generation(),
            timeout: ctrl.opts().io_timeout,
            max_cmd_bytes: u64::from(ctrl.max_cmd_bytes()),
            sgl: ctrl.sgl_support(),
            ctrl,
            t,
            ring: Some(ring),
            lists: Some(lists),
            trackers: vec![tracker; usize::from(commands)].into_boxed_slice(),
            free_cids: (0..commands).rev().collect(),
            reqs: vec![req; usize::from(depth)].into_boxed_slice(),
            free_reqs: (0..depth).rev().collect(),
            in_flight: 0,
            scratch: Box::new([0u64; LIST_U64S]),
            now: 0,
            epoch: now,
            next_check: now,
            polls_since_check: 0,
            dead: None,
        }
    }

    fn ms_since_epoch(&self, t: Instant) -> u32 {
        t.saturating_duration_since(self.epoch).as_millis() as u32
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }
    /// The queue ID.
    pub fn qid(&self) -> u16 {
        self.ring.as_ref().map_or(0, Ring::qid)
    }
    /// Request slots.
    pub fn depth(&self) -> u16 {
        self.reqs.len() as u16
    }
    /// Command ids.
    pub fn commands(&self) -> u16 {
        self.trackers.len() as u16
    }
    /// Requests in flight.
    #[inline]
    pub fn outstanding(&self) -> usize {
        usize::from(self.in_flight)
    }
    /// Completion slot numbers are below this: a single-command request's slot is its command id, a split
    /// request's is `commands() + index`.
    pub fn slots(&self) -> usize {
        self.trackers.len() + self.reqs.len()
    }
    /// Largest byte count one command carries (MDTS and the list slot).
    pub fn max_cmd_bytes(&self) -> u64 {
        self.max_cmd_bytes
    }

    /// Queue a request. The doorbell is rung by the next [`IoQpair::poll`] (or [`IoQpair::flush`]), once per batch.
    ///
    /// # Errors
    /// [`SubmitFail::Busy`] when command ids or request slots are short (poll and retry), `Invalid` for a request
    /// that cannot be described, `Dead` when the controller is gone or failed.
    #[inline]
    pub fn submit<S: DmaSeg>(&mut self, cmd: &IoCmd<'_, S>) -> Result<u16, SubmitFail> {
        if let Some(r) = self.submit_one_page_pair(cmd) {
            return r;
        }
        if self.gen != self.ctrl.generation() {
            self.recover_after_reset();
        }
        if let Some(f) = self.dead {
            return Err(SubmitFail::Dead(f));
        }
        let max_blocks = if cmd.op.has_data() {
            (self.max_cmd_bytes >> cmd.lba_shift).min(cmd.op.max_blocks())
        } else {
            cmd.op.max_blocks()
        };
        if cmd.op != NvmOp::Flush && cmd.nlb == 0 {
            return Err(SubmitFail::Invalid("zero blocks"));
        }
        let chunks = if cmd.op == NvmOp::Flush { 1 } else { cmd.nlb.div_ceil(max_blocks) };
        let issue_now = if cmd.op.has_data() { chunks } else { chunks.min(u64::from(NON_DATA_WINDOW)) };
        if cmd.op.has_data() && chunks > self.trackers.len() as u64 {
            return Err(SubmitFail::Invalid("request needs more commands than the queue pair has command ids"));
        }
        if issue_now > self.free_cids.len() as u64 {
            return Err(SubmitFail::Busy);
        }
        if usize::from(self.in_flight) >= self.reqs.len() {
            return Err(SubmitFail::Busy);
        }
        let Some(ri) = self.free_reqs.pop() else { return Err(SubmitFail::Busy) };
        self.in_flight += 1;
        self.reqs[usize::from(ri)] = Request {
            tag: cmd.tag,
            op: cmd.op,
            nsid: cmd.nsid,
            next_slba: cmd.slba,
            unissued: if cmd.op == NvmOp::Flush { 1 } else { cmd.nlb },
            max_blocks,
            pending: 0,
            error: None,
            busy: true,
        };
        if cmd.op.has_data() {
            let total = cmd.nlb << cmd.lba_shift;
            let seg_total: u64 = cmd.segs.iter().map(|s| u64::from(s.len())).sum();
            if seg_total != total {
                self.release_req(ri);
                return Err(SubmitFail::Invalid("segments do not add up to the block range"));
            }
            if let Err(why) = self.issue_data(ri, cmd, max_blocks, chunks) {
                self.release_req(ri);
                return Err(SubmitFail::Invalid(why));
            }
        } else {
            self.issue_non_data(ri);
        }
        Ok(self.trackers.len() as u16 + ri)
    }

    /// The common case without lists: one segment, one command, at most two pages (PRP1 and PRP2). `None` when
    /// the request needs the general path.
    #[inline]
    fn submit_one_page_pair<S: DmaSeg>(&mut self, cmd: &IoCmd<'_, S>) -> Option<Result<u16, SubmitFail>> {
        let write = match cmd.op {
            NvmOp::Read => false,
            NvmOp::Write => true,
            _ => return None,
        };
        let [seg] = cmd.segs else { return None };
        match self.submit_rw(write, cmd.nsid, cmd.lba_shift, cmd.slba, cmd.nlb, seg.iova(), seg.len(), cmd.fua, cmd.tag) {
            Ok(slot) => Some(Ok(slot)),
            Err(FastFail::Busy) => Some(Err(SubmitFail::Busy)),
            Err(FastFail::NotEligible | FastFail::Dead) => None,
        }
    }

    /// Fast path for a read or write of one segment (`iova`, `len` bytes) that needs no PRP list. On
    /// [`FastFail::NotEligible`] or [`FastFail::Dead`], use [`IoQpair::submit`] (which names the reason).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    pub fn submit_rw(
        &mut self,
        write: bool,
        nsid: u32,
        lba_shift: u8,
        slba: u64,
        nlb: u64,
        iova: u64,
        len: u32,
        fua: bool,
        tag: u64,
    ) -> Result<u16, FastFail> {
        let bytes = nlb << lba_shift;
        if nlb == 0 || nlb > super::ns::MAX_NLB_PER_COMMAND || u64::from(len) != bytes || iova & 3 != 0 || bytes > self.max_cmd_bytes {
            return Err(FastFail::NotEligible);
        }
        let page_end = (iova | (PAGE - 1)) + 1;
        let end = iova + bytes;
        let prp2 = if end <= page_end {
            0
        } else if end <= page_end + PAGE {
            page_end
        } else {
            return Err(FastFail::NotEligible);
        };
        if self.gen != self.ctrl.generation() {
            self.recover_after_reset();
        }
        if self.dead.is_some() {
            return Err(FastFail::Dead);
        }
        if usize::from(self.in_flight) >= self.reqs.len() {
            return Err(FastFail::Busy);
        }
        let Some(cid) = self.free_cids.pop() else { return Err(FastFail::Busy) };
        self.in_flight += 1;
        let t = &mut self.trackers[usize::from(cid)];
        t.sqe = SubmissionEntry {
            opc: if write { super::spec::io_opc::WRITE } else { super::spec::io_opc::READ },
            flags: 0,
            cid,
            nsid,
            cdw2: 0,
            cdw3: 0,
            mptr: 0,
            dptr1: iova,
            dptr2: prp2,
            cdw10: slba as u32,
            cdw11: (slba >> 32) as u32,
            cdw12: ((nlb - 1) as u32) | if fua { super::ns::CDW12_FUA } else { 0 },
            cdw13: 0,
            cdw14: 0,
            cdw15: 0,
        };
        t.submitted = self.now;
        t.tag = tag;
        t.req = SINGLE;
        t.busy = true;
        t.abort_sent = false;
        t.retries = 0;
        if let Some(ring) = self.ring.as_mut() {
            ring.push(&t.sqe);
        }
        Ok(cid)
    }

    fn release_req(&mut self, ri: u16) {
        self.reqs[usize::from(ri)].busy = false;
        self.free_reqs.push(ri);
        self.in_flight -= 1;
    }

    /// Build every chunk's command first (so a request that cannot be described leaves no trace), then queue them.
    #[inline]
    fn issue_data<S: DmaSeg>(&mut self, ri: u16, cmd: &IoCmd<'_, S>, max_blocks: u64, chunks: u64) -> Result<(), &'static str> {
        let first_free = self.free_cids.len() - chunks as usize;
        let mut slba = cmd.slba;
        let mut left = cmd.nlb;
        let mut byte_off = 0u64;
        for k in 0..chunks as usize {
            let cid = self.free_cids[self.free_cids.len() - 1 - k];
            let nlb = left.min(max_blocks);
            let bytes = nlb << cmd.lba_shift;
            let win = Window::new(cmd.segs, byte_off, bytes);
            let (list_iova, lists) = match self.lists.as_ref() {
                Some(l) => (l.iova() + u64::from(cid) * PAGE, l),
                None => return Err("queue pair has no list memory"),
            };
            let mut e = SubmissionEntry::default();
            build_rw(&mut e, cmd.op, cmd.nsid, slba, nlb, cmd.fua);
            e.cid = cid;
            let scratch = &mut self.scratch[..];
            let d = match build_prp(win.clone(), PAGE, scratch, list_iova) {
                Ok(d) => d,
                Err(DptrError::NotPageAligned { .. }) if self.sgl.is_some() => {
                    let dword = self.sgl == Some(true);
                    e.flags |= PSDT_SGL_MPTR_CONTIG;
                    build_sgl(win, dword, scratch, list_iova).map_err(dptr_reason)?
                }
                Err(err) => return Err(dptr_reason(err)),
            };
            e.dptr1 = d.dptr1;
            e.dptr2 = d.dptr2;
            if d.list_len > 0 {
                copy_list(lists, u64::from(cid) * PAGE, &self.scratch[..d.list_len])
                    .ok_or("list slot out of range")?;
            }
            let t = &mut self.trackers[usize::from(cid)];
            t.sqe = e;
            slba += nlb;
            left -= nlb;
            byte_off += bytes;
        }
        let now = self.now;
        for _ in 0..chunks {
            let Some(cid) = self.free_cids.pop() else { break };
            let t = &mut self.trackers[usize::from(cid)];
            t.req = ri;
            t.busy = true;
            t.abort_sent = false;
            t.retries = 0;
            t.submitted = now;
            if let Some(ring) = self.ring.as_mut() {
                ring.push(&t.sqe);
            }
        }
        debug_assert_eq!(self.free_cids.len(), first_free);
        let r = &mut self.reqs[usize::from(ri)];
        r.pending = chunks as u32;
        r.unissued = 0;
        Ok(())
    }

    /// Issue as many of a non-data request's commands as the window and free command ids allow.
    fn issue_non_data(&mut self, ri: u16) {
        let now = self.now;
        loop {
            let r = self.reqs[usize::from(ri)];
            if r.unissued == 0 || r.pending >= NON_DATA_WINDOW {
                return;
            }
            let Some(cid) = self.free_cids.pop() else { return };
            let mut e = SubmissionEntry::default();
            let nlb = r.unissued.min(r.max_blocks);
            match r.op {
                NvmOp::Flush => build_flush(&mut e, r.nsid),
                NvmOp::WriteZeroes => build_rw(&mut e, NvmOp::WriteZeroes, r.nsid, r.next_slba, nlb, false),
                _ => {
                    let range = DsmRange { cattr: 0, nlb: nlb as u32, slba: r.next_slba };
                    let Some(lists) = self.lists.as_ref() else { return };
                    let _ = write_pod(lists, u64::from(cid) * PAGE, &range);
                    build_deallocate(&mut e, r.nsid, lists.iova() + u64::from(cid) * PAGE);
                    // Keep the range in the entry's reserved dwords for error reporting (not sent: CDW2/3 are
                    // ignored by DSM).
                    e.cdw2 = r.next_slba as u32;
                    e.cdw3 = (r.next_slba >> 32) as u32;
                }
            }
            e.cid = cid;
            let t = &mut self.trackers[usize::from(cid)];
            *t = Tracker { sqe: e, submitted: now, tag: 0, req: ri, busy: true, abort_sent: false, retries: 0 };
            if let Some(ring) = self.ring.as_mut() {
                ring.push(&t.sqe);
            }
            let r = &mut self.reqs[usize::from(ri)];
            r.pending += 1;
            r.unissued -= if r.op == NvmOp::Flush { 1 } else { nlb };
            r.next_slba += nlb;
        }
    }

    /// Ring the SQ doorbell if commands were queued since the last ring.
    #[inline]
    pub fn flush(&mut self) {
        if let Some(ring) = self.ring.as_mut() {
            ring.ring_sq(&*self.t);
        }
    }

    /// Ring the doorbell, reap up to `max` finished requests (`done(request slot, tag, result)`), check deadlines.
    /// Returns the number of requests finished.
    #[inline]
    pub fn poll<F: FnMut(u16, u64, Result<(), IoFailure>)>(&mut self, max: usize, done: &mut F) -> usize {
        if self.gen != self.ctrl.generation() {
            self.recover_after_reset();
        }
        let mut n = 0;
        if let Some(ring) = self.ring.as_mut() {
            ring.ring_sq(&*self.t);
        }
        while n < max {
            let Some(e) = self.ring.as_mut().and_then(Ring::next_cqe) else { break };
            n += self.complete(&e, done);
        }
        if let Some(ring) = self.ring.as_mut() {
            ring.ring_cq(&*self.t);
            // Retries and non-data continuations queued while reaping.
            ring.ring_sq(&*self.t);
        }
        self.polls_since_check += 1;
        if n == 0 || self.polls_since_check >= CHECK_EVERY_POLLS {
            // The clock is read on idle polls and every CHECK_EVERY_POLLS busy ones: submissions are stamped with
            // this cached time, so a deadline may start up to that much early (deadlines are long: seconds).
            self.polls_since_check = 0;
            let clock = Instant::now();
            self.now = self.ms_since_epoch(clock);
            if self.outstanding() > 0 && clock >= self.next_check {
                self.next_check = clock + (self.timeout / 8).max(Duration::from_millis(1));
                n += self.check_deadlines(done);
            }
        }
        n
    }

    #[inline(always)]
    fn complete<F: FnMut(u16, u64, Result<(), IoFailure>)>(&mut self, e: &CompletionEntry, done: &mut F) -> usize {
        let cid = usize::from(e.cid);
        let qid = e.sq_id;
        let Some(t) = self.trackers.get_mut(cid).filter(|t| t.busy) else {
            tracing::warn!(ctrlr = self.ctrl.name(), qid, cid, "completion for a command not in flight: ignored");
            return 0;
        };
        // Status word without the phase tag is zero: success (the fast check; decoded only on error).
        if e.status & !1 != 0 {
            let status = NvmeStatus::from_cqe_word(e.status);
            if status.is_aborted() && !status.dnr && t.retries < self.ctrl.opts().max_retries {
                t.retries += 1;
                t.abort_sent = false;
                t.submitted = self.now;
                tracing::info!(ctrlr = self.ctrl.name(), qid, cid, %status, retry = t.retries, "command aborted: resubmitting");
                if self.ring.as_mut().is_some_and(|ring| ring.push(&t.sqe)) {
                    return 0;
                }
            }
            let failure = if status.is_media_error() {
                let (slba, nlb) = if t.sqe.opc == super::spec::io_opc::DSM {
                    (u64::from(t.sqe.cdw2) | (u64::from(t.sqe.cdw3) << 32), 0)
                } else {
                    rw_range(&t.sqe)
                };
                tracing::warn!(ctrlr = self.ctrl.name(), slba, nlb, %status, "media error");
                IoFailure::Media { status, slba, nlb }
            } else {
                tracing::warn!(ctrlr = self.ctrl.name(), qid, cid, opc = t.sqe.opc, %status, "command failed");
                IoFailure::Status(status)
            };
            return self.finish_cmd(e.cid, Some(failure), done);
        }
        self.finish_cmd(e.cid, None, done)
    }

    /// One command of a request is finished: free its id, and finish the request when it was the last.
    #[inline(always)]
    fn finish_cmd<F: FnMut(u16, u64, Result<(), IoFailure>)>(&mut self, cid: u16, failure: Option<IoFailure>, done: &mut F) -> usize {
        let t = &mut self.trackers[usize::from(cid)];
        t.busy = false;
        let ri = t.req;
        self.free_cids.push(cid);
        if ri == SINGLE {
            let tag = t.tag;
            self.in_flight -= 1;
            done(cid, tag, failure.map_or(Ok(()), Err));
            return 1;
        }
        let r = &mut self.reqs[usize::from(ri)];
        r.pending -= 1;
        if r.error.is_none() {
            r.error = failure;
        }
        if r.unissued > 0 && r.error.is_none() {
            self.issue_non_data(ri);
            return 0;
        }
        if r.pending > 0 {
            return 0;
        }
        let (tag, res) = (r.tag, r.error.map_or(Ok(()), Err));
        self.release_req(ri);
        done(self.trackers.len() as u16 + ri, tag, res);
        1
    }

    /// Look for commands past their deadline: abort them; when an aborted one is still stuck (or the controller
    /// reports fatal status), reset the controller, recreate this queue pair and resubmit.
    fn check_deadlines<F: FnMut(u16, u64, Result<(), IoFailure>)>(&mut self, done: &mut F) -> usize {
        let now = self.now;
        let timeout_ms = self.timeout.as_millis() as u64;
        let mut need_reset = false;
        let mut expired_any = false;
        for cid in 0..self.trackers.len() {
            let t = self.trackers[cid];
            if !t.busy || u64::from(now.wrapping_sub(t.submitted)) < timeout_ms {
                continue;
            }
            expired_any = true;
            if t.abort_sent {
                need_reset = true;
                continue;
            }
            match self.ctrl.check_alive("I/O command timeout") {
                Err(f) => return self.fail_all(f, done),
                Ok(false) => {
                    need_reset = true;
                    break;
                }
                Ok(true) => {}
            }
            let qid = self.qid();
            tracing::warn!(ctrlr = self.ctrl.name(), qid, cid, opc = t.sqe.opc, timeout_ms = self.timeout.as_millis() as u64, "command timed out: aborting it");
            let aborted = self.ctrl.abort(qid, cid as u16);
            let t = &mut self.trackers[cid];
            t.abort_sent = true;
            t.submitted = now;
            if let Err(e) = aborted {
                tracing::warn!(ctrlr = self.ctrl.name(), error = %e, "abort failed: resetting the controller");
                need_reset = true;
            }
        }
        if !expired_any || !need_reset {
            return 0;
        }
        // Commands that are still stuck count one retry; those past the limit fail with Timeout.
        let mut n = 0;
        for cid in 0..self.trackers.len() {
            let t = &mut self.trackers[cid];
            if t.busy && u64::from(now.wrapping_sub(t.submitted)) >= timeout_ms {
                t.retries += 1;
                if t.retries > self.ctrl.opts().max_retries {
                    tracing::error!(ctrlr = self.ctrl.name(), cid, "command timed out after every retry: failing it");
                    n += self.finish_cmd(cid as u16, Some(IoFailure::Timeout), done);
                }
            }
        }
        match self.ctrl.reset(self.gen) {
            Ok(()) => {
                self.recover_after_reset();
                n
            }
            Err(e) => {
                tracing::error!(ctrlr = self.ctrl.name(), error = %e, "controller reset failed: failing every request");
                let f = if self.ctrl.is_gone() { IoFailure::Gone } else { IoFailure::Aborted };
                n + self.fail_all(f, done)
            }
        }
    }

    /// Fail every request in flight with `f` and refuse new ones.
    fn fail_all<F: FnMut(u16, u64, Result<(), IoFailure>)>(&mut self, f: IoFailure, done: &mut F) -> usize {
        self.dead = Some(f);
        let mut n = 0;
        for cid in 0..self.trackers.len() {
            if self.trackers[cid].busy {
                if let Some(r) = self.reqs.get_mut(usize::from(self.trackers[cid].req)) {
                    r.unissued = 0;
                }
                n += self.finish_cmd(cid as u16, Some(f), done);
            }
        }
        n
    }

    /// The controller was reset (by us or another queue pair): recreate this queue pair's queues and resubmit
    /// every command in flight, in command-id order.
    fn recover_after_reset(&mut self) {
        self.gen = self.ctrl.generation();
        if self.dead.is_some() {
            return;
        }
        let Some(mut ring) = self.ring.take() else { return };
        ring.reset();
        let res = self.ctrl.create_io_queues(ring.qid(), ring.entries(), ring.sq_iova(), ring.cq_iova());
        match res {
            Ok(()) => {
                let now = self.ms_since_epoch(Instant::now());
                let mut count = 0;
                for t in self.trackers.iter_mut().filter(|t| t.busy) {
                    t.submitted = now;
                    t.abort_sent = false;
                    ring.push(&t.sqe);
                    count += 1;
                }
                ring.ring_sq(&*self.t);
                tracing::info!(ctrlr = self.ctrl.name(), qid = ring.qid(), resubmitted = count, "queue pair recreated after controller reset");
            }
            Err(e) => {
                tracing::error!(ctrlr = self.ctrl.name(), qid = ring.qid(), error = %e, "recreating the queue pair failed");
                self.dead = Some(if self.ctrl.is_gone() { IoFailure::Gone } else { IoFailure::Aborted });
            }
        }
        self.ring = Some(ring);
    }

    /// Fail every request still in flight (with [`IoFailure::Aborted`]), reporting each through `done`. For
    /// teardown: call before dropping a queue pair that still has requests.
    pub fn abort_all<F: FnMut(u16, u64, Result<(), IoFailure>)>(&mut self, done: &mut F) -> usize {
        let n = self.fail_all(IoFailure::Aborted, done);
        self.dead = None;
        n
    }
}

impl Drop for IoQpair {
    fn drop(&mut self) {
        if let (Some(ring), Some(lists)) = (self.ring.take(), self.lists.take()) {
            self.ctrl.release_io_qpair(ring, lists);
        }
    }
}

fn dptr_reason(e: DptrError) -> &'static str {
    match e {
        DptrError::Empty => "no data segments",
        DptrError::NotDwordAligned { .. } => "a segment is not dword aligned",
        DptrError::NotPageAligned { .. } => {
            "segments break inside a page and the controller has no SGL support: align inner segments to 4 KiB"
        }
        DptrError::ListFull { .. } => "too many segments for one command",
    }
}

fn copy_list(lists: &DmaRegion, offset: u64, src: &[u64]) -> Option<()> {
    let (p, _) = lists.slice(offset, (src.len() * 8) as u64)?;
    // SAFETY: the destination is inside this queue pair's list region (slice checked) and belongs to the command
    // id being built, which no device reads until the command is submitted; the source is our scratch array.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), p.as_ptr().cast::<u64>(), src.len()) };
    Some(())
}

/// Why creating a queue pair failed (the driver error).
pub type QpairError = DriverError;
