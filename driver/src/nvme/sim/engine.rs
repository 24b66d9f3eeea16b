//! The simulator thread: reacts to CC, fetches commands from every SQ whose doorbell moved, executes them against
//! RAM namespaces, and posts completions (possibly delayed, reordered or dropped by injected faults).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::mem::DevMem;
use super::{Fault, Shared, SimOpFilter};
use crate::nvme::regs::{shn, shst, Aqa, Cc, Csts, ACQ, AQA, ASQ, CC, CSTS};
use crate::nvme::spec::{admin_opc, cns, fid, io_opc, lid, DsmRange, ErrorLogEntry, IdentifyController, IdentifyNamespace, LbaFormat, Pod, SmartLog, SubmissionEntry};
use crate::nvme::status::{command_specific, generic, sct, NvmeStatus};

#[derive(Debug, Clone, Copy)]
struct Sq {
    base: u64,
    entries: u16,
    head: u16,
    cqid: u16,
}

#[derive(Debug, Clone, Copy)]
struct Cq {
    base: u64,
    entries: u16,
    tail: u16,
    phase: bool,
}

#[derive(Debug, Clone, Copy)]
struct Done {
    due: Instant,
    sqid: u16,
    cid: u16,
    dw0: u32,
    status: NvmeStatus,
}

#[derive(Debug, Clone, Copy)]
struct LbaRule {
    nsid: u32,
    slba: u64,
    nlb: u64,
    ops: SimOpFilter,
    status: NvmeStatus,
    count: Option<u32>,
}

struct Engine {
    sh: Arc<Shared>,
    mem: DevMem,
    enabled: bool,
    ready_at: Option<Instant>,
    fatal: bool,
    shut_down: bool,
    sqs: Vec<Option<Sq>>,
    cqs: Vec<Option<Cq>>,
    pending: VecDeque<Done>,
    held: Vec<Done>,
    held_since: Option<Instant>,
    aers: Vec<u16>,
    events: VecDeque<u32>,
    dropped: Vec<(u16, u16, bool)>,
    drop_left: u32,
    drop_abortable: bool,
    lba_rules: Vec<LbaRule>,
    delay: Duration,
    reorder: usize,
    error_log: VecDeque<ErrorLogEntry>,
    error_count: u64,
    media_errors: u64,
    granted_queues: u16,
    scratch: Vec<u8>,
    seen_reset: u64,
}

const MAX_BATCH: usize = 64;

pub(super) fn run(sh: Arc<Shared>) {
    let n = usize::from(sh.cfg.max_io_queues) + 1;
    let mut e = Engine {
        mem: DevMem::new(Arc::clone(&sh.arena)),
        enabled: false,
        ready_at: None,
        fatal: false,
        shut_down: false,
        sqs: vec![None; n],
        cqs: vec![None; n],
        pending: VecDeque::with_capacity(4096),
        held: Vec::with_capacity(1024),
        held_since: None,
        aers: Vec::new(),
        events: VecDeque::new(),
        dropped: Vec::new(),
        drop_left: 0,
        drop_abortable: false,
        lba_rules: Vec::new(),
        delay: Duration::ZERO,
        reorder: 0,
        error_log: VecDeque::new(),
        error_count: 0,
        media_errors: 0,
        granted_queues: sh.cfg.max_io_queues,
        scratch: vec![0u8; 4 << 20],
        seen_reset: 0,
        sh,
    };
    let mut idle = 0u32;
    while !e.sh.stop.load(Ordering::Acquire) {
        let busy = if e.sh.removed.load(Ordering::Acquire) { false } else { e.step() };
        if busy {
            idle = 0;
        } else {
            idle = idle.saturating_add(1);
            if idle < 64 {
                std::hint::spin_loop();
            } else if idle < 256 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
}

impl Engine {
    fn reg(&self, off: usize) -> u32 {
        self.sh.regs[off / 4].load(Ordering::Acquire)
    }
    fn set_csts(&self, c: Csts) {
        self.sh.regs[CSTS / 4].store(c.0, Ordering::Release);
    }
    fn csts(&self) -> Csts {
        Csts(self.reg(CSTS))
    }

    /// One round. Returns whether anything happened.
    fn step(&mut self) -> bool {
        let mut busy = false;
        let req = self.sh.reset_req.load(Ordering::Acquire);
        if req != self.seen_reset {
            self.seen_reset = req;
            self.function_reset();
            self.sh.reset_ack.store(req, Ordering::Release);
            busy = true;
        }
        while let Some(f) = self.sh.faults.pop() {
            self.apply(f);
            busy = true;
        }
        busy |= self.handle_cc();
        if !self.enabled || self.fatal || self.ready_at.is_some() {
            return busy;
        }
        for qid in 0..self.sqs.len() {
            busy |= self.drain_sq(qid as u16);
        }
        if !self.aers.is_empty() {
            while let (Some(&cid), Some(&dw0)) = (self.aers.first(), self.events.front()) {
                self.aers.remove(0);
                self.events.pop_front();
                self.complete(0, cid, dw0, NvmeStatus::SUCCESS);
                busy = true;
            }
        }
        busy | self.post_due()
    }

    fn apply(&mut self, f: Fault) {
        match f {
            Fault::DropCommands { count, abortable } => {
                self.drop_left = count;
                self.drop_abortable = abortable;
            }
            Fault::LbaError { nsid, slba, nlb, ops, status, count } => {
                self.lba_rules.push(LbaRule { nsid, slba, nlb, ops, status, count });
            }
            Fault::Delay(d) => self.delay = d,
            Fault::Reorder(w) => self.reorder = w,
            Fault::Fatal => {
                self.fatal = true;
                let c = self.csts();
                self.set_csts(Csts(c.0 | 2));
            }
            Fault::Event { event_type, event_info, log_page } => {
                self.events.push_back(u32::from(event_type & 7) | (u32::from(event_info) << 8) | (u32::from(log_page) << 16));
            }
            Fault::ClearAll => {
                self.drop_left = 0;
                self.lba_rules.clear();
                self.delay = Duration::ZERO;
                self.reorder = 0;
            }
        }
    }

    fn function_reset(&mut self) {
        for i in [CC, AQA, ASQ, ASQ + 4, ACQ, ACQ + 4] {
            self.sh.regs[i / 4].store(0, Ordering::Release);
        }
        self.disable();
        self.set_csts(Csts(0));
        for d in self.sh.doorbells.iter() {
            d.store(0, Ordering::Release);
        }
    }

    fn disable(&mut self) {
        self.enabled = false;
        self.ready_at = None;
        self.fatal = false;
        self.shut_down = false;
        self.sqs.iter_mut().for_each(|q| *q = None);
        self.cqs.iter_mut().for_each(|q| *q = None);
        self.pending.clear();
        self.held.clear();
        self.aers.clear();
        self.dropped.clear();
        self.set_csts(Csts(0));
    }

    fn handle_cc(&mut self) -> bool {
        let cc = Cc(self.reg(CC));
        if let Some(at) = self.ready_at {
            if Instant::now() >= at {
                self.ready_at = None;
                self.set_csts(Csts::build(true, false, shst::NORMAL));
            }
            return true;
        }
        if cc.en() && !self.enabled {
            self.enabled = true;
            self.sh.stats.enables.fetch_add(1, Ordering::Relaxed);
            let aqa = Aqa(self.reg(AQA));
            let asq = u64::from(self.reg(ASQ)) | (u64::from(self.reg(ASQ + 4)) << 32);
            let acq = u64::from(self.reg(ACQ)) | (u64::from(self.reg(ACQ + 4)) << 32);
            if asq == 0 || acq == 0 || cc.iosqes() != 6 || cc.iocqes() != 4 || cc.mps() != 0 {
                self.fatal = true;
                self.set_csts(Csts::build(false, true, shst::NORMAL));
                return true;
            }
            self.sqs[0] = Some(Sq { base: asq, entries: aqa.asqs() + 1, head: 0, cqid: 0 });
            self.cqs[0] = Some(Cq { base: acq, entries: aqa.acqs() + 1, tail: 0, phase: true });
            self.sh.doorbells[0].store(0, Ordering::Release);
            self.sh.doorbells[1].store(0, Ordering::Release);
            self.ready_at = Some(Instant::now() + self.sh.cfg.ready_delay);
            return true;
        }
        if !cc.en() && self.enabled {
            self.disable();
            return true;
        }
        if self.enabled && cc.shn() != shn::NONE && !self.shut_down {
            self.shut_down = true;
            let c = self.csts();
            self.set_csts(Csts((c.0 & !0xc) | (shst::COMPLETE << 2)));
            return true;
        }
        false
    }

    fn drain_sq(&mut self, qid: u16) -> bool {
        let Some(mut sq) = self.sqs[usize::from(qid)] else { return false };
        let tail = self.sh.doorbells[2 * usize::from(qid)].load(Ordering::Acquire) as u16;
        if tail >= sq.entries || tail == sq.head {
            return false;
        }
        let mut n = 0;
        while sq.head != tail && n < MAX_BATCH {
            let Some(cmd) = self.mem.read_pod::<SubmissionEntry>(sq.base + u64::from(sq.head) * 64) else {
                self.go_fatal();
                return true;
            };
            sq.head = (sq.head + 1) % sq.entries;
            self.sqs[usize::from(qid)] = Some(sq);
            self.sh.stats.commands.fetch_add(1, Ordering::Relaxed);
            if qid == 0 {
                self.admin(cmd);
            } else {
                self.sh.stats.io_commands.fetch_add(1, Ordering::Relaxed);
                self.io(qid, cmd);
            }
            n += 1;
            match self.sqs[usize::from(qid)] {
                Some(q) => sq = q,
                None => return true,
            }
        }
        true
    }

    fn go_fatal(&mut self) {
        self.fatal = true;
        let c = self.csts();
        self.set_csts(Csts(c.0 | 2));
    }

    fn complete(&mut self, sqid: u16, cid: u16, dw0: u32, status: NvmeStatus) {
        let due = if self.delay.is_zero() { Instant::now() } else { Instant::now() + self.delay };
        let d = Done { due, sqid, cid, dw0, status };
        if self.reorder > 1 && sqid != 0 {
            if self.held.is_empty() {
                self.held_since = Some(Instant::now());
            }
            self.held.push(d);
            if self.held.len() >= self.reorder {
                while let Some(h) = self.held.pop() {
                    self.pending.push_back(h);
                }
            }
            return;
        }
        self.pending.push_back(d);
    }

    /// Post completions that are due, in order, while their CQ has room.
    fn post_due(&mut self) -> bool {
        if !self.held.is_empty() && self.held_since.is_some_and(|t| t.elapsed() > Duration::from_millis(2)) {
            while let Some(h) = self.held.pop() {
                self.pending.push_back(h);
            }
        }
        let mut any = false;
        let now = Instant::now();
        let mut i = 0;
        while i < self.pending.len() {
            let d = self.pending[i];
            if d.due > now {
                i += 1;
                continue;
            }
            if self.post(d) {
                self.pending.remove(i);
                any = true;
            } else {
                i += 1;
            }
        }
        any
    }

    fn post(&mut self, d: Done) -> bool {
        let Some(sq) = self.sqs.get(usize::from(d.sqid)).copied().flatten() else { return true };
        let Some(mut cq) = self.cqs[usize::from(sq.cqid)] else { return true };
        let head = self.sh.doorbells[2 * usize::from(sq.cqid) + 1].load(Ordering::Acquire) as u16;
        if (cq.tail + 1) % cq.entries == head % cq.entries {
            return false;
        }
        let words = [d.dw0, 0, u32::from(sq.head) | (u32::from(d.sqid) << 16)];
        if !self.mem.post_cqe(cq.base + u64::from(cq.tail) * 16, words, d.cid, d.status.to_cqe_word(cq.phase)) {
            self.go_fatal();
            return true;
        }
        cq.tail += 1;
        if cq.tail == cq.entries {
            cq.tail = 0;
            cq.phase = !cq.phase;
        }
        self.cqs[usize::from(sq.cqid)] = Some(cq);
        true
    }

    // ---- data pointers (the device's reading of PRPs and SGLs) ----

    /// The host memory pieces of a command's data pointer for `len` bytes, or `None` if malformed.
    fn data_pieces(&mut self, cmd: &SubmissionEntry, len: u64) -> Option<Vec<(u64, u64)>> {
        let mut out = Vec::new();
        if cmd.flags >> 6 != 0 {
            self.sh.stats.sgl_commands.fetch_add(1, Ordering::Relaxed);
            let kind = (cmd.dptr2 >> 60) as u8;
            let dlen = cmd.dptr2 & 0xffff_ffff;
            match kind {
                0 => out.push((cmd.dptr1, dlen)),
                3 => {
                    for i in 0..dlen / 16 {
                        let a: u64 = self.mem.read_pod(cmd.dptr1 + i * 16)?;
                        let b: u64 = self.mem.read_pod(cmd.dptr1 + i * 16 + 8)?;
                        if b >> 60 != 0 {
                            return None;
                        }
                        out.push((a, b & 0xffff_ffff));
                    }
                }
                _ => return None,
            }
            let total: u64 = out.iter().map(|p| p.1).sum();
            return (total == len).then_some(out);
        }
        let page = 4096u64;
        let first = (page - cmd.dptr1 % page).min(len);
        out.push((cmd.dptr1, first));
        let mut left = len - first;
        if left == 0 {
            return Some(out);
        }
        if left <= page {
            if !cmd.dptr2.is_multiple_of(page) {
                return None;
            }
            out.push((cmd.dptr2, left));
            return Some(out);
        }
        let mut at = cmd.dptr2;
        while left > 0 {
            let e: u64 = self.mem.read_pod(at)?;
            let last_in_page = (at + 8).is_multiple_of(page);
            if last_in_page && left > page {
                at = e;
                continue;
            }
            if !e.is_multiple_of(page) {
                return None;
            }
            let n = left.min(page);
            out.push((e, n));
            left -= n;
            at += 8;
        }
        Some(out)
    }

    fn dma_to_host(&mut self, cmd: &SubmissionEntry, src: &[u8]) -> bool {
        let Some(pieces) = self.data_pieces(cmd, src.len() as u64) else { return false };
        let mut off = 0usize;
        for (a, l) in pieces {
            if !self.mem.write(a, &src[off..off + l as usize]) {
                return false;
            }
            off += l as usize;
        }
        true
    }

    fn dma_from_host(&mut self, cmd: &SubmissionEntry, dst_len: usize) -> bool {
        let Some(pieces) = self.data_pieces(cmd, dst_len as u64) else { return false };
        let mut off = 0usize;
        for (a, l) in pieces {
            let mut buf = std::mem::take(&mut self.scratch);
            let ok = self.mem.read(a, &mut buf[off..off + l as usize]);
            self.scratch = buf;
            if !ok {
                return false;
            }
            off += l as usize;
        }
        true
    }

    fn write_struct<T: Pod>(&mut self, cmd: &SubmissionEntry, v: &T) -> bool {
        let n = std::mem::size_of::<T>();
        let mut bytes = vec![0u8; n];
        // SAFETY: T is Pod (plain integers, no padding), so viewing it as bytes is sound; the copy is into a Vec
        // of exactly size_of::<T>() bytes.
        unsafe { std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), bytes.as_mut_ptr(), n) };
        self.dma_to_host(cmd, &bytes)
    }

    // ---- admin ----

    fn admin(&mut self, cmd: SubmissionEntry) {
        let st = |sc| NvmeStatus::new(sct::GENERIC, sc);
        let cs = |sc| NvmeStatus::new(sct::COMMAND_SPECIFIC, sc);
        let (dw0, status) = match cmd.opc {
            admin_opc::IDENTIFY => (0, self.identify(&cmd)),
            admin_opc::SET_FEATURES => match (cmd.cdw10 & 0xff) as u8 {
                fid::NUMBER_OF_QUEUES => {
                    let want = (cmd.cdw11 & 0xffff).min(cmd.cdw11 >> 16) as u16;
                    let g = want.saturating_add(1).min(self.sh.cfg.max_io_queues).max(1);
                    if self.sqs.iter().skip(1).any(Option::is_some) && g != self.granted_queues {
                        (0, cs(0x0e)) // queues exist: sequence error in spirit; refuse a change
                    } else {
                        self.granted_queues = g;
                        let v = u32::from(g - 1);
                        (v | (v << 16), NvmeStatus::SUCCESS)
                    }
                }
                fid::ASYNC_EVENT_CONFIG | fid::VOLATILE_WRITE_CACHE => (0, NvmeStatus::SUCCESS),
                _ => (0, st(generic::INVALID_FIELD)),
            },
            admin_opc::GET_FEATURES => (0, NvmeStatus::SUCCESS),
            admin_opc::CREATE_CQ => (0, self.create_cq(&cmd)),
            admin_opc::CREATE_SQ => (0, self.create_sq(&cmd)),
            admin_opc::DELETE_SQ => {
                let q = (cmd.cdw10 & 0xffff) as usize;
                if q == 0 || q > usize::from(self.granted_queues) || self.sqs[q].is_none() {
                    (0, cs(command_specific::INVALID_QID))
                } else {
                    self.sqs[q] = None;
                    self.dropped.retain(|d| usize::from(d.0) != q);
                    (0, NvmeStatus::SUCCESS)
                }
            }
            admin_opc::DELETE_CQ => {
                let q = (cmd.cdw10 & 0xffff) as usize;
                if q == 0 || q > usize::from(self.granted_queues) || self.cqs[q].is_none() {
                    (0, cs(command_specific::INVALID_QID))
                } else if self.sqs.iter().flatten().any(|s| usize::from(s.cqid) == q) {
                    (0, cs(0x0c)) // invalid queue deletion
                } else {
                    self.cqs[q] = None;
                    (0, NvmeStatus::SUCCESS)
                }
            }
            admin_opc::GET_LOG_PAGE => (0, self.get_log(&cmd)),
            admin_opc::ABORT => {
                let sqid = (cmd.cdw10 & 0xffff) as u16;
                let cid = (cmd.cdw10 >> 16) as u16;
                match self.dropped.iter().position(|d| d.0 == sqid && d.1 == cid && d.2) {
                    Some(i) => {
                        self.dropped.swap_remove(i);
                        self.sh.stats.aborted.fetch_add(1, Ordering::Relaxed);
                        self.complete(sqid, cid, 0, st(generic::ABORT_REQUESTED));
                        (0, NvmeStatus::SUCCESS)
                    }
                    None => (1, NvmeStatus::SUCCESS),
                }
            }
            admin_opc::ASYNC_EVENT => {
                if self.aers.len() > usize::from(self.sh.cfg.aerl) {
                    (0, cs(command_specific::AER_LIMIT_EXCEEDED))
                } else {
                    self.aers.push(cmd.cid);
                    return;
                }
            }
            _ => (0, st(generic::INVALID_OPCODE)),
        };
        self.complete(0, cmd.cid, dw0, status);
    }

    fn identify(&mut self, cmd: &SubmissionEntry) -> NvmeStatus {
        let cfg = self.sh.cfg.clone();
        let ok = match (cmd.cdw10 & 0xff) as u8 {
            cns::CONTROLLER => {
                let mut id = IdentifyController::zeroed();
                id.vid = 0x1b36;
                id.ssvid = 0x1af4;
                fill(&mut id.sn, &cfg.serial);
                fill(&mut id.mn, "nvstack simulated NVMe");
                fill(&mut id.fr, "1.0");
                id.mdts = cfg.mdts;
                id.cntlid = 1;
                id.ver = 0x0001_0400;
                id.acl = 3;
                id.aerl = cfg.aerl;
                id.elpe = 63;
                id.sqes = 0x66;
                id.cqes = 0x44;
                id.nn = cfg.namespaces.len() as u32;
                id.oncs = cfg.oncs;
                id.vwc = u8::from(cfg.vwc);
                id.sgls = cfg.sgls;
                fill(&mut id.subnqn, "nqn.2026-01.org.nvstack:sim");
                self.write_struct(cmd, &id)
            }
            cns::NAMESPACE => {
                let Some(ns) = cfg.namespaces.get((cmd.nsid as usize).wrapping_sub(1)) else {
                    return NvmeStatus::new(sct::GENERIC, generic::INVALID_NAMESPACE);
                };
                let mut id = IdentifyNamespace::zeroed();
                id.nsze = ns.block_count;
                id.ncap = ns.block_count;
                id.nuse = ns.block_count;
                id.nlbaf = 1;
                id.lbaf[0] = LbaFormat { ms: 0, lbads: 9, rp: 0 };
                id.lbaf[1] = LbaFormat { ms: 0, lbads: 12, rp: 0 };
                let lbads = ns.block_size.trailing_zeros() as u8;
                let idx = if lbads == 9 { 0 } else if lbads == 12 { 1 } else { 2 };
                if idx == 2 || ns.metadata_bytes != 0 {
                    id.nlbaf = 2;
                    id.lbaf[2] = LbaFormat { ms: ns.metadata_bytes, lbads, rp: 0 };
                    id.flbas = 2;
                } else {
                    id.flbas = idx;
                }
                self.write_struct(cmd, &id)
            }
            cns::ACTIVE_NS_LIST => {
                let mut list = [0u32; 1024];
                let start = cmd.nsid;
                let mut k = 0;
                for n in 1..=cfg.namespaces.len() as u32 {
                    if n > start && k < list.len() {
                        list[k] = n;
                        k += 1;
                    }
                }
                let bytes: Vec<u8> = list.iter().flat_map(|v| v.to_le_bytes()).collect();
                self.dma_to_host(cmd, &bytes)
            }
            _ => return NvmeStatus::new(sct::GENERIC, generic::INVALID_FIELD),
        };
        if ok { NvmeStatus::SUCCESS } else { NvmeStatus::new(sct::GENERIC, generic::DATA_TRANSFER_ERROR) }
    }

    fn create_cq(&mut self, cmd: &SubmissionEntry) -> NvmeStatus {
        let q = (cmd.cdw10 & 0xffff) as usize;
        let size = (cmd.cdw10 >> 16) + 1;
        if q == 0 || q > usize::from(self.granted_queues) || self.cqs[q].is_some() {
            return NvmeStatus::new(sct::COMMAND_SPECIFIC, command_specific::INVALID_QID);
        }
        if size < 2 || size > u32::from(self.sh.cfg.max_queue_entries) {
            return NvmeStatus::new(sct::COMMAND_SPECIFIC, command_specific::INVALID_QUEUE_SIZE);
        }
        if cmd.cdw11 & 1 == 0 || !cmd.dptr1.is_multiple_of(4096) {
            return NvmeStatus::new(sct::GENERIC, generic::INVALID_FIELD);
        }
        self.cqs[q] = Some(Cq { base: cmd.dptr1, entries: size as u16, tail: 0, phase: true });
        self.sh.doorbells[2 * q + 1].store(0, Ordering::Release);
        NvmeStatus::SUCCESS
    }

    fn create_sq(&mut self, cmd: &SubmissionEntry) -> NvmeStatus {
        let q = (cmd.cdw10 & 0xffff) as usize;
        let size = (cmd.cdw10 >> 16) + 1;
        let cqid = (cmd.cdw11 >> 16) as u16;
        if q == 0 || q > usize::from(self.granted_queues) || self.sqs[q].is_some() {
            return NvmeStatus::new(sct::COMMAND_SPECIFIC, command_specific::INVALID_QID);
        }
        if cqid == 0 || self.cqs.get(usize::from(cqid)).copied().flatten().is_none() {
            return NvmeStatus::new(sct::COMMAND_SPECIFIC, command_specific::INVALID_CQ);
        }
        if size < 2 || size > u32::from(self.sh.cfg.max_queue_entries) {
            return NvmeStatus::new(sct::COMMAND_SPECIFIC, command_specific::INVALID_QUEUE_SIZE);
        }
        if cmd.cdw11 & 1 == 0 || !cmd.dptr1.is_multiple_of(4096) {
            return NvmeStatus::new(sct::GENERIC, generic::INVALID_FIELD);
        }
        self.sqs[q] = Some(Sq { base: cmd.dptr1, entries: size as u16, head: 0, cqid });
        self.sh.doorbells[2 * q].store(0, Ordering::Release);
        NvmeStatus::SUCCESS
    }

    fn get_log(&mut self, cmd: &SubmissionEntry) -> NvmeStatus {
        let numd = u64::from((cmd.cdw10 >> 16) | ((cmd.cdw11 & 0xffff) << 16)) + 1;
        let len = (numd * 4) as usize;
        let mut bytes = vec![0u8; len];
        match (cmd.cdw10 & 0xff) as u8 {
            lid::ERROR_INFO => {
                for (i, e) in self.error_log.iter().enumerate() {
                    let off = i * 64;
                    if off + 64 > len {
                        break;
                    }
                    // SAFETY: ErrorLogEntry is Pod (64 bytes, no padding); the destination range is in bounds.
                    unsafe { std::ptr::copy_nonoverlapping((e as *const ErrorLogEntry).cast::<u8>(), bytes[off..].as_mut_ptr(), 64) };
                }
            }
            lid::SMART_HEALTH => {
                let mut s = SmartLog::zeroed();
                s.temperature = 310u16.to_le_bytes();
                s.avail_spare = 100;
                s.spare_thresh = 10;
                s.media_errors = u128::from(self.media_errors).to_le_bytes();
                s.num_err_log_entries = u128::from(self.error_count).to_le_bytes();
                let n = len.min(512);
                // SAFETY: SmartLog is Pod (512 bytes); n <= 512 and n <= bytes.len().
                unsafe { std::ptr::copy_nonoverlapping((&s as *const SmartLog).cast::<u8>(), bytes.as_mut_ptr(), n) };
            }
            _ => return NvmeStatus::new(sct::COMMAND_SPECIFIC, command_specific::INVALID_LOG_PAGE),
        }
        if self.dma_to_host(cmd, &bytes) { NvmeStatus::SUCCESS } else { NvmeStatus::new(sct::GENERIC, generic::DATA_TRANSFER_ERROR) }
    }

    // ---- I/O ----

    fn io(&mut self, qid: u16, cmd: SubmissionEntry) {
        if self.drop_left > 0 && cmd.opc != io_opc::FLUSH {
            self.drop_left -= 1;
            self.sh.stats.dropped.fetch_add(1, Ordering::Relaxed);
            self.dropped.push((qid, cmd.cid, self.drop_abortable));
            return;
        }
        let status = self.exec_io(&cmd);
        self.complete(qid, cmd.cid, 0, status);
    }

    fn exec_io(&mut self, cmd: &SubmissionEntry) -> NvmeStatus {
        let g = |sc| NvmeStatus::new(sct::GENERIC, sc);
        let nsi = (cmd.nsid as usize).wrapping_sub(1);
        let Some(ns) = self.sh.cfg.namespaces.get(nsi).copied() else { return g(generic::INVALID_NAMESPACE) };
        let bs = u64::from(ns.block_size);
        let slba = u64::from(cmd.cdw10) | (u64::from(cmd.cdw11) << 32);
        let nlb = u64::from(cmd.cdw12 & 0xffff) + 1;
        let in_range = |s: u64, n: u64| s.checked_add(n).is_some_and(|e| e <= ns.block_count);
        match cmd.opc {
            io_opc::FLUSH => NvmeStatus::SUCCESS,
            io_opc::READ | io_opc::WRITE => {
                if !in_range(slba, nlb) {
                    return g(generic::LBA_OUT_OF_RANGE);
                }
                let bytes = nlb * bs;
                if self.sh.cfg.mdts != 0 && bytes > (4096u64 << self.sh.cfg.mdts) {
                    return g(generic::INVALID_FIELD);
                }
                self.sh.stats.max_transfer_bytes.fetch_max(bytes, Ordering::Relaxed);
                let filter = if cmd.opc == io_opc::READ { SimOpFilter::Read } else { SimOpFilter::Write };
                if let Some(s) = self.lba_fault(cmd.nsid, slba, nlb, filter) {
                    return s;
                }
                let off = (slba * bs) as usize;
                let len = bytes as usize;
                if cmd.opc == io_opc::WRITE {
                    if !self.dma_from_host(cmd, len) {
                        return g(generic::DATA_TRANSFER_ERROR);
                    }
                    let mut data = self.sh.namespaces[nsi].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    data[off..off + len].copy_from_slice(&self.scratch[..len]);
                } else {
                    let chunk: Vec<u8> = {
                        let data = self.sh.namespaces[nsi].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        data[off..off + len].to_vec()
                    };
                    if !self.dma_to_host(cmd, &chunk) {
                        return g(generic::DATA_TRANSFER_ERROR);
                    }
                }
                NvmeStatus::SUCCESS
            }
            io_opc::WRITE_ZEROES => {
                if self.sh.cfg.oncs & crate::nvme::spec::oncs::WRITE_ZEROES == 0 {
                    return g(generic::INVALID_OPCODE);
                }
                if !in_range(slba, nlb) {
                    return g(generic::LBA_OUT_OF_RANGE);
                }
                if let Some(s) = self.lba_fault(cmd.nsid, slba, nlb, SimOpFilter::Write) {
                    return s;
                }
                let mut data = self.sh.namespaces[nsi].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                data[(slba * bs) as usize..((slba + nlb) * bs) as usize].fill(0);
                NvmeStatus::SUCCESS
            }
            io_opc::DSM => {
                if self.sh.cfg.oncs & crate::nvme::spec::oncs::DSM == 0 {
                    return g(generic::INVALID_OPCODE);
                }
                let nr = (cmd.cdw10 & 0xff) + 1;
                for i in 0..u64::from(nr) {
                    let Some(r) = self.mem.read_pod::<DsmRange>(cmd.dptr1 + i * 16) else { return g(generic::DATA_TRANSFER_ERROR) };
                    let n = u64::from(r.nlb);
                    if !in_range(r.slba, n) {
                        return g(generic::LBA_OUT_OF_RANGE);
                    }
                    if cmd.cdw11 & crate::nvme::ns::DSM_CDW11_AD != 0 {
                        let mut data = self.sh.namespaces[nsi].lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        data[(r.slba * bs) as usize..((r.slba + n) * bs) as usize].fill(0);
                    }
                }
                NvmeStatus::SUCCESS
            }
            _ => g(generic::INVALID_OPCODE),
        }
    }

    fn lba_fault(&mut self, nsid: u32, slba: u64, nlb: u64, op: SimOpFilter) -> Option<NvmeStatus> {
        let i = self.lba_rules.iter().position(|r| {
            r.nsid == nsid
                && slba < r.slba.saturating_add(r.nlb)
                && r.slba < slba.saturating_add(nlb)
                && (r.ops == SimOpFilter::Any || r.ops == op)
        })?;
        let rule = &mut self.lba_rules[i];
        let status = rule.status;
        let first_bad = slba.max(rule.slba);
        if let Some(c) = rule.count.as_mut() {
            *c = c.saturating_sub(1);
            if *c == 0 {
                self.lba_rules.remove(i);
            }
        }
        if status.sct == sct::MEDIA {
            self.media_errors += 1;
        }
        self.error_count += 1;
        let mut e = ErrorLogEntry::default();
        e.error_count = self.error_count;
        e.lba = first_bad;
        e.nsid = nsid;
        e.status = status.to_cqe_word(false);
        self.error_log.push_front(e);
        self.error_log.truncate(64);
        Some(status)
    }
}

fn fill(dst: &mut [u8], s: &str) {
    dst.fill(b' ');
    let n = s.len().min(dst.len());
    dst[..n].copy_from_slice(&s.as_bytes()[..n]);
}
