//! The NVMe bdev: one [`BlockDev`] per namespace of an attached [`Controller`], one I/O queue pair per channel
//! (so one per reactor).
//!
//! # Specifications
//! `nvme:BDF[/NSID]` attaches the controller at PCI address BDF through VFIO (bound to vfio-pci by
//! `nvstack setup`; the arena must be hugepages) and opens namespace NSID (default: the first usable one).
//! `nvme:sim[/NSID]` opens the in-process simulated controller (two namespaces: 4096- and 512-byte blocks).
//! A controller is attached once per process: a second specification naming it shares it.
//!
//! # Geometry
//! Block size and count from Identify Namespace; `max_transfer_bytes` is up to [`MAX_SPLIT`] commands of the
//! controller's per-command limit (MDTS), capped at 1 MiB: the queue pair splits larger requests; buffer
//! alignment 4 (PRP entries are dword aligned; segments breaking inside a page need SGL support).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

use nvstack_driver::nvme::prp::DmaSeg;
use nvstack_driver::nvme::sim::{SimConfig, SimController, SimNamespace};
use nvstack_driver::nvme::spec::oncs;
use nvstack_driver::nvme::qpair::FastFail;
use nvstack_driver::nvme::{Controller, CtrlrOpts, IoCmd, IoFailure, IoQpair, NvmOp, QpairOpts, SubmitFail, Transport};
use nvstack_driver::dma::Arena;

use crate::bdev::{validate, ChannelOpts, Rejected};
use crate::{BdevError, BlockDev, Features, Geometry, IoChannel, IoDesc, IoError, IoFlags, IoOp, IoStatus, Seg, SubmitError};

/// Most commands one request is split into (the bdev's max transfer is this many times the per-command limit).
pub const MAX_SPLIT: u32 = 16;
/// Largest request the bdev advertises.
pub const MAX_TRANSFER_BYTES: u32 = 1 << 20;
/// Most segments per request.
pub const MAX_SEGMENTS: u32 = 128;
/// Segment alignment the bdev asks for (PRP entries are dword aligned): `buf_align_bytes - 1`.
const ALIGN_MASK: usize = 3;
/// Channel polls between services of the admin queue (asynchronous events), on reactor 0's channel.
const EVENT_POLL_INTERVAL: u32 = 4096;

impl DmaSeg for Seg {
    #[inline]
    fn iova(&self) -> u64 {
        Seg::iova(self)
    }
    #[inline]
    fn len(&self) -> u32 {
        Seg::len(self)
    }
}

/// One namespace as a block device.
pub struct NvmeBdev {
    name: String,
    ctrl: Arc<Controller>,
    nsid: u32,
    lba_shift: u8,
    geo: Geometry,
    feat: Features,
    commands_per_channel_min: u16,
    /// The queue pair every channel shares when the controller grants only one (see [`SharedQp`]).
    shared: Mutex<Option<Arc<SharedQp>>>,
}

impl std::fmt::Debug for NvmeBdev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeBdev").field("name", &self.name).field("nsid", &self.nsid).finish()
    }
}

impl NvmeBdev {
    /// The bdev for namespace `nsid` of `ctrl`, named `name`.
    ///
    /// # Errors
    /// [`BdevError::Nvme`] when the namespace does not exist or is refused (metadata formats...).
    pub fn new(ctrl: Arc<Controller>, nsid: u32, name: &str) -> Result<Arc<NvmeBdev>, BdevError> {
        let nerr = |reason: String| BdevError::Nvme {
            name: name.to_owned(),
            source: nvstack_driver::DriverError::NvmeUnsupported { ctrlr: ctrl.name().to_owned(), what: format!("namespace {nsid}"), reason },
        };
        let Some(ns) = ctrl.namespace(nsid).cloned() else {
            let have: Vec<String> = ctrl.namespaces().iter().map(|n| n.nsid.to_string()).collect();
            return Err(nerr(format!("no such active namespace (active: {})", have.join(", "))));
        };
        if let Some(why) = &ns.refused {
            return Err(nerr(why.clone()));
        }
        let info = ctrl.info();
        let mqes = info.max_queue_entries.saturating_sub(1).max(1);
        let split = MAX_SPLIT.min(mqes);
        let max_transfer = ctrl.max_cmd_bytes().saturating_mul(split).min(MAX_TRANSFER_BYTES).max(ns.block_size);
        let geo = Geometry {
            block_size: ns.block_size,
            block_count: ns.block_count,
            max_transfer_bytes: max_transfer & !(ns.block_size - 1),
            optimal_boundary_bytes: u32::from(ns.optimal_boundary_blocks).saturating_mul(ns.block_size),
            buf_align_bytes: ALIGN_MASK as u32 + 1,
            max_segments: MAX_SEGMENTS,
        };
        let feat = Features {
            flush: info.volatile_write_cache,
            write_zeroes: info.oncs & oncs::WRITE_ZEROES != 0,
            deallocate: info.oncs & oncs::DSM != 0,
            fua: true,
            volatile_write_cache: info.volatile_write_cache,
        };
        tracing::info!(bdev = name, ctrlr = ctrl.name(), nsid, block_size = ns.block_size, block_count = ns.block_count, "nvme bdev opened");
        Ok(Arc::new(NvmeBdev {
            name: name.to_owned(),
            nsid,
            lba_shift: ns.lba_shift,
            geo,
            feat,
            commands_per_channel_min: split as u16,
            shared: Mutex::new(None),
            ctrl,
        }))
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }
    /// The namespace ID.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }
}

impl BlockDev for NvmeBdev {
    fn name(&self) -> &str {
        &self.name
    }
    fn product_name(&self) -> &'static str {
        "NVMe disk"
    }
    fn geometry(&self) -> Geometry {
        self.geo
    }
    fn features(&self) -> Features {
        self.feat
    }
    fn open_channel(&self, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        let depth = u16::try_from(opts.queue_depth.max(1)).unwrap_or(u16::MAX - 1);
        let commands = depth.max(self.commands_per_channel_min).saturating_mul(2).min(4095);
        if self.ctrl.info().io_queues_granted <= 1 {
            return self.open_shared_channel(depth, opts);
        }
        let qp = self
            .ctrl
            .io_qpair(QpairOpts { depth, commands })
            .map_err(|e| BdevError::Channel { name: self.name.clone(), reason: e.to_string() })?;
        let slots = qp.slots();
        Ok(Box::new(NvmeChannel {
            qp,
            table: (0..slots).map(|_| None).collect(),
            nsid: self.nsid,
            lba_shift: self.lba_shift,
            geo: self.geo,
            feat: self.feat,
            depth: u32::from(depth),
            max_blocks_per_io: u64::from(self.geo.max_transfer_bytes >> self.lba_shift),
            polls: 0,
            services_events: opts.reactor_index == 0,
        }))
    }
}

impl NvmeBdev {
    /// The controller grants a single I/O queue pair: every channel shares it under a lock (a degraded mode,
    /// logged once; with more queue pairs each channel owns one and takes no lock).
    fn open_shared_channel(&self, depth: u16, opts: ChannelOpts) -> Result<Box<dyn IoChannel>, BdevError> {
        let mut guard = self.shared.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let q = match guard.as_ref() {
            Some(q) => Arc::clone(q),
            None => {
                tracing::warn!(bdev = self.name, "the controller grants one I/O queue pair: channels share it under a lock");
                let qp = self
                    .ctrl
                    .io_qpair(QpairOpts { depth: SHARED_DEPTH, commands: SHARED_DEPTH.saturating_mul(2) })
                    .map_err(|e| BdevError::Channel { name: self.name.clone(), reason: e.to_string() })?;
                let slots = qp.slots();
                let q = Arc::new(SharedQp {
                    inner: Mutex::new(SharedInner { qp, table: (0..slots).map(|_| None).collect(), mailboxes: Vec::new() }),
                });
                *guard = Some(Arc::clone(&q));
                q
            }
        };
        drop(guard);
        let id = {
            let mut inner = q.lock();
            if inner.mailboxes.len() >= MAX_SHARED_CHANNELS {
                return Err(BdevError::Channel { name: self.name.clone(), reason: format!("more than {MAX_SHARED_CHANNELS} channels share one queue pair") });
            }
            inner.mailboxes.push(std::collections::VecDeque::with_capacity(usize::from(SHARED_DEPTH)));
            (inner.mailboxes.len() - 1) as u16
        };
        Ok(Box::new(SharedChannel {
            q,
            id,
            depth: u32::from(depth),
            in_flight: 0,
            nsid: self.nsid,
            lba_shift: self.lba_shift,
            geo: self.geo,
            feat: self.feat,
            services_events: opts.reactor_index == 0,
            polls: 0,
        }))
    }
}

/// Requests in flight on a shared queue pair, all channels together.
const SHARED_DEPTH: u16 = 512;
/// Channels that may share one queue pair.
const MAX_SHARED_CHANNELS: usize = 256;

/// One queue pair shared by every channel of a controller that grants only one.
struct SharedQp {
    inner: Mutex<SharedInner>,
}

/// A descriptor in flight on a shared queue pair, and the channel (mailbox index) that owns it.
type Owned = (Box<IoDesc>, u16);

struct SharedInner {
    qp: IoQpair,
    /// By completion slot: the descriptor and the channel it belongs to.
    table: Box<[Option<Owned>]>,
    /// Finished descriptors, per channel, waiting for that channel's poll.
    mailboxes: Vec<std::collections::VecDeque<Box<IoDesc>>>,
}

impl SharedQp {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A channel on a shared queue pair.
struct SharedChannel {
    q: Arc<SharedQp>,
    id: u16,
    depth: u32,
    in_flight: usize,
    nsid: u32,
    lba_shift: u8,
    geo: Geometry,
    feat: Features,
    services_events: bool,
    polls: u32,
}

impl IoChannel for SharedChannel {
    fn submit(&mut self, io: Box<IoDesc>) -> Result<(), Rejected> {
        if let Err(e) = validate(&self.geo, &self.feat, &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        if self.in_flight >= self.depth as usize {
            return Err(Rejected { io, why: SubmitError::Busy });
        }
        let op = nvm_op(io.op);
        let cmd = IoCmd {
            op,
            nsid: self.nsid,
            lba_shift: self.lba_shift,
            slba: io.offset_blocks,
            nlb: if op == NvmOp::Flush { 0 } else { io.num_blocks },
            segs: io.segs(),
            fua: io.flags.contains(IoFlags::FUA) && op == NvmOp::Write,
            tag: 0,
        };
        let mut inner = self.q.lock();
        match inner.qp.submit(&cmd) {
            Ok(slot) => {
                inner.table[usize::from(slot)] = Some((io, self.id));
                self.in_flight += 1;
                Ok(())
            }
            Err(SubmitFail::Busy) => Err(Rejected { io, why: SubmitError::Busy }),
            Err(SubmitFail::Invalid(detail)) => {
                let bytes = io.num_blocks << self.lba_shift;
                Err(Rejected { io, why: SubmitError::Invalid(IoError::BadLength { bytes, detail }) })
            }
            Err(SubmitFail::Dead(f)) => Err(Rejected { io, why: SubmitError::Invalid(map_failure(f)) }),
        }
    }

    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        self.polls = self.polls.wrapping_add(1);
        let mut inner = self.q.lock();
        if self.services_events && self.polls.is_multiple_of(EVENT_POLL_INTERVAL) {
            inner.qp.controller().service_events();
        }
        let SharedInner { qp, table, mailboxes } = &mut *inner;
        qp.poll(usize::MAX, &mut |slot, _tag, res| {
            if let Some((mut io, owner)) = table[usize::from(slot)].take() {
                io.status = match res {
                    Ok(()) => IoStatus::Success,
                    Err(f) => IoStatus::Failed(map_failure(f)),
                };
                if let Some(m) = mailboxes.get_mut(usize::from(owner)) {
                    m.push_back(io);
                }
            }
        });
        let mine = &mut mailboxes[usize::from(self.id)];
        let mut n = 0;
        while out.len() < out.capacity() {
            let Some(io) = mine.pop_front() else { break };
            out.push(io);
            n += 1;
        }
        self.in_flight -= n;
        n
    }

    fn outstanding(&self) -> usize {
        self.in_flight
    }

    fn queue_depth(&self) -> u32 {
        self.depth
    }
}

fn nvm_op(op: IoOp) -> NvmOp {
    match op {
        IoOp::Read => NvmOp::Read,
        IoOp::Write => NvmOp::Write,
        IoOp::Flush => NvmOp::Flush,
        IoOp::WriteZeroes => NvmOp::WriteZeroes,
        IoOp::Deallocate => NvmOp::Deallocate,
    }
}

/// One reactor's queue pair to the namespace.
struct NvmeChannel {
    qp: IoQpair,
    table: Box<[Option<Box<IoDesc>>]>,
    nsid: u32,
    lba_shift: u8,
    geo: Geometry,
    feat: Features,
    depth: u32,
    /// `max_transfer_bytes` in blocks.
    max_blocks_per_io: u64,
    polls: u32,
    services_events: bool,
}

#[inline]
fn map_failure(f: IoFailure) -> IoError {
    match f {
        IoFailure::Media { slba, nlb, .. } => IoError::Media { offset_blocks: slba, num_blocks: nlb },
        IoFailure::Status(s) => IoError::Device { sct: s.sct, sc: s.sc },
        IoFailure::Timeout => IoError::Timeout,
        IoFailure::Gone => IoError::DeviceGone,
        IoFailure::Aborted => IoError::Aborted,
    }
}

impl NvmeChannel {
    #[inline(always)]
    fn accepted(&mut self, io: Box<IoDesc>, r: Result<u16, SubmitFail>) -> Result<(), Rejected> {
        match r {
            Ok(slot) => {
                self.store(slot, io);
                Ok(())
            }
            Err(SubmitFail::Busy) => Err(Rejected { io, why: SubmitError::Busy }),
            Err(SubmitFail::Invalid(detail)) => {
                let bytes = io.num_blocks << self.lba_shift;
                Err(Rejected { io, why: SubmitError::Invalid(IoError::BadLength { bytes, detail }) })
            }
            Err(SubmitFail::Dead(f)) => Err(Rejected { io, why: SubmitError::Invalid(map_failure(f)) }),
        }
    }
}

impl IoChannel for NvmeChannel {
    #[inline]
    fn submit(&mut self, io: Box<IoDesc>) -> Result<(), Rejected> {
        // Fast path: a read or write of one segment that passes the same checks as `validate` (which runs, to name
        // the error, whenever one of them fails, and for every other request).
        if let (IoOp::Read | IoOp::Write, [seg]) = (io.op, io.segs()) {
            let write = io.op == IoOp::Write;
            let fua = io.flags.contains(IoFlags::FUA);
            let n = io.num_blocks;
            let valid = n.wrapping_sub(1) < self.max_blocks_per_io
                && io.offset_blocks < self.geo.block_count
                && n <= self.geo.block_count - io.offset_blocks
                && n << self.lba_shift == u64::from(seg.len())
                && (seg.ptr().as_ptr() as usize | seg.len() as usize) & ALIGN_MASK == 0
                && (write || !fua);
            if valid {
                match self.qp.submit_rw(write, self.nsid, self.lba_shift, io.offset_blocks, n, seg.iova(), seg.len(), fua && write, 0) {
                    Ok(slot) => {
                        self.store(slot, io);
                        return Ok(());
                    }
                    Err(FastFail::Busy) => return Err(Rejected { io, why: SubmitError::Busy }),
                    Err(FastFail::NotEligible | FastFail::Dead) => {}
                }
            }
        }
        self.submit_general(io)
    }

    fn poll(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        self.poll_inner(out)
    }

    fn outstanding(&self) -> usize {
        self.qp.outstanding()
    }

    fn queue_depth(&self) -> u32 {
        self.depth
    }
}

impl NvmeChannel {
    /// Keep a descriptor until its completion (its slot is free: the queue pair just handed it out).
    #[inline(always)]
    fn store(&mut self, slot: u16, io: Box<IoDesc>) {
        if let Some(old) = self.table[usize::from(slot)].replace(io) {
            tracing::error!(slot, "nvme channel: a request slot was reused while in use");
            drop(old);
        }
    }

    /// Every request the fast path does not take: validated, then split, listed or refused by the queue pair.
    #[inline(never)]
    fn submit_general(&mut self, io: Box<IoDesc>) -> Result<(), Rejected> {
        if let Err(e) = validate(&self.geo, &self.feat, &io) {
            return Err(Rejected { io, why: SubmitError::Invalid(e) });
        }
        let op = match io.op {
            IoOp::Read => NvmOp::Read,
            IoOp::Write => NvmOp::Write,
            IoOp::Flush => NvmOp::Flush,
            IoOp::WriteZeroes => NvmOp::WriteZeroes,
            IoOp::Deallocate => NvmOp::Deallocate,
        };
        let cmd = IoCmd {
            op,
            nsid: self.nsid,
            lba_shift: self.lba_shift,
            slba: io.offset_blocks,
            nlb: if op == NvmOp::Flush { 0 } else { io.num_blocks },
            segs: io.segs(),
            fua: io.flags.contains(IoFlags::FUA) && op == NvmOp::Write,
            tag: 0,
        };
        let r = self.qp.submit(&cmd);
        self.accepted(io, r)
    }

    // The IoChannel contract moves boxed descriptors (allocated once, reused): the Vec holds those boxes.
    #[allow(clippy::vec_box)]
    #[inline]
    fn poll_inner(&mut self, out: &mut Vec<Box<IoDesc>>) -> usize {
        self.polls = self.polls.wrapping_add(1);
        if self.services_events && self.polls.is_multiple_of(EVENT_POLL_INTERVAL) {
            self.qp.controller().service_events();
        }
        let room = out.capacity() - out.len();
        if room == 0 {
            self.qp.flush();
            return 0;
        }
        let table = &mut self.table;
        self.qp.poll(room, &mut |slot, _tag, res| {
            if let Some(mut io) = table[usize::from(slot)].take() {
                io.status = match res {
                    Ok(()) => IoStatus::Success,
                    Err(f) => IoStatus::Failed(map_failure(f)),
                };
                out.push(io);
            }
        })
    }

}

impl Drop for NvmeChannel {
    fn drop(&mut self) {
        if self.qp.outstanding() > 0 {
            tracing::warn!(outstanding = self.qp.outstanding(), "nvme channel closed with requests in flight: they are aborted");
            self.qp.abort_all(&mut |_, _, _| {});
        }
    }
}

/// Controllers attached in this process, by PCI address (or "sim") and arena, so that several bdevs share one.
type Registry = HashMap<String, (Weak<Controller>, u32)>;
static ATTACHED: Mutex<Option<Registry>> = Mutex::new(None);
static NEXT_INDEX: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn attached(key: &str, attach: impl FnOnce() -> Result<Arc<Controller>, BdevError>) -> Result<(Arc<Controller>, u32), BdevError> {
    let mut map = ATTACHED.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let map = map.get_or_insert_with(HashMap::new);
    if let Some((w, idx)) = map.get(key) {
        if let Some(c) = w.upgrade() {
            return Ok((c, *idx));
        }
    }
    let c = attach()?;
    let idx = NEXT_INDEX.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    map.insert(key.to_owned(), (Arc::downgrade(&c), idx));
    Ok((c, idx))
}

/// The simulated controller `nvme:sim` opens: 16 MiB of 4096-byte blocks (NSID 1), 16 MiB of 512-byte blocks
/// (NSID 2).
pub fn sim_config() -> SimConfig {
    SimConfig {
        name: "sim".into(),
        namespaces: vec![
            SimNamespace { block_size: 4096, block_count: 4096, metadata_bytes: 0 },
            SimNamespace { block_size: 512, block_count: 32768, metadata_bytes: 0 },
        ],
        max_io_queues: 16,
        ..SimConfig::default()
    }
}

/// Open `nvme:ARGS` (see the module doc). `name` overrides the default `NvmeXnY`.
///
/// # Errors
/// [`BdevError::Spec`] for a bad address or NSID, [`BdevError::Nvme`] when VFIO or the controller fails.
pub fn open(spec: &str, args: &str, name: Option<&str>, arena: &Arc<Arena>) -> Result<Arc<dyn BlockDev>, BdevError> {
    let spec_err = |reason: String| BdevError::Spec { spec: spec.to_owned(), reason };
    let (target, nsid) = match args.rsplit_once('/') {
        Some((t, n)) => (t, Some(n.parse::<u32>().map_err(|_| spec_err(format!("NSID {n:?} is not a number")))?)),
        None => (args, None),
    };
    if target.is_empty() {
        return Err(spec_err("nvme: missing the PCI address (nvme:0000:00:04.0[/NSID]) or `sim`".into()));
    }
    let label = name.unwrap_or(target).to_owned();
    let (ctrl, idx) = if target == "sim" {
        attached(&format!("sim@{:p}", Arc::as_ptr(arena)), || {
            let sim = SimController::start(Arc::clone(arena), sim_config()).map_err(|e| BdevError::Nvme { name: label.clone(), source: e })?;
            let t: Arc<dyn Transport> = sim;
            Controller::attach(t, CtrlrOpts::default()).map_err(|e| BdevError::Nvme { name: label.clone(), source: e })
        })?
    } else {
        let bdf: nvstack_driver::vfio::sysfs::PciAddress =
            target.parse().map_err(|e: nvstack_driver::DriverError| spec_err(e.to_string()))?;
        // Keyed by arena too: a controller's DMA reaches only the arena it was attached with.
        let key = format!("{bdf}@{:p}", Arc::as_ptr(arena));
        attached(&key, || {
            let sysfs = nvstack_driver::vfio::sysfs::Sysfs::from_env();
            let t = nvstack_driver::vfio::VfioTransport::open(&sysfs, bdf, arena)
                .map_err(|e| BdevError::Nvme { name: label.clone(), source: e })?;
            let t: Arc<dyn Transport> = Arc::new(t);
            Controller::attach(t, CtrlrOpts::default()).map_err(|e| BdevError::Nvme { name: label.clone(), source: e })
        })?
    };
    let nsid = match nsid {
        Some(n) => n,
        None => ctrl
            .namespaces()
            .iter()
            .find(|n| n.refused.is_none())
            .map(|n| n.nsid)
            .ok_or_else(|| spec_err(format!("{target}: no usable namespace")))?,
    };
    let bdev_name = name.map_or_else(|| format!("Nvme{idx}n{nsid}"), str::to_owned);
    Ok(NvmeBdev::new(ctrl, nsid, &bdev_name)?)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use nvstack_driver::dma::ArenaConfig;
    use nvstack_driver::nvme::sim::Fault;
    use nvstack_driver::nvme::status::{media, sct};
    use nvstack_driver::nvme::NvmeStatus;

    use super::*;
    use crate::bdev::run_sync;
    use crate::contract::{self, ContractOpts};

    fn arena() -> Arc<Arena> {
        Arena::new(ArenaConfig { size_bytes: 128 << 20, ..Default::default() }).expect("arena")
    }

    fn contract_on(nsid: u32) {
        let a = arena();
        let make = || -> Result<Arc<dyn BlockDev>, String> {
            crate::spec::open_bdev(&format!("nvme:sim/{nsid}"), &a).map_err(|e| e.to_string())
        };
        match contract::run_all(&make, &a, &ContractOpts { timeout: Duration::from_secs(20), ..Default::default() }) {
            Ok(r) => assert_eq!(r.passed.len(), contract::check_names().len(), "{r:?}"),
            Err(e) => panic!("nvme:sim/{nsid}: contract failures:\n{e}"),
        }
    }

    #[test]
    fn contract_4k_namespace() {
        contract_on(1);
    }

    #[test]
    fn contract_512_namespace() {
        contract_on(2);
    }

    #[test]
    fn contract_with_one_queue_pair_shared_by_channels() {
        let a = arena();
        let make = || -> Result<Arc<dyn BlockDev>, String> {
            let cfg = SimConfig { max_io_queues: 1, ..sim_config() };
            let sim = SimController::start(Arc::clone(&a), cfg).map_err(|e| e.to_string())?;
            let t: Arc<dyn Transport> = sim;
            let ctrl = Controller::attach(t, CtrlrOpts::default()).map_err(|e| e.to_string())?;
            let b: Arc<dyn BlockDev> = NvmeBdev::new(ctrl, 1, "NvmeQ1n1").map_err(|e| e.to_string())?;
            Ok(b)
        };
        match contract::run_all(&make, &a, &ContractOpts { timeout: Duration::from_secs(20), ..Default::default() }) {
            Ok(r) => assert_eq!(r.passed.len(), contract::check_names().len(), "{r:?}"),
            Err(e) => panic!("one queue pair: contract failures:\n{e}"),
        }
    }

    #[test]
    fn geometry_and_features_from_identify() {
        let a = arena();
        let b = crate::spec::open_bdev("nvme:sim/2", &a).expect("open");
        let g = b.geometry();
        assert_eq!((g.block_size, g.block_count), (512, 32768));
        assert_eq!(g.max_transfer_bytes, 1 << 20);
        assert_eq!(g.buf_align_bytes, 4);
        let f = b.features();
        assert!(f.flush && f.write_zeroes && f.deallocate && f.fua && f.volatile_write_cache);
        assert_eq!(b.product_name(), "NVMe disk");
        let e = crate::spec::open_bdev("nvme:sim/9", &a).err().expect("no namespace 9");
        let text = format!("{e}: {}", std::error::Error::source(&e).map(ToString::to_string).unwrap_or_default());
        assert!(text.contains("namespace 9"), "{text}");
        assert!(crate::spec::open_bdev("nvme:sim/1,bs=512", &a).is_err());
        assert!(crate::spec::open_bdev("nvme:zz:00.0", &a).is_err());
    }

    #[test]
    fn media_error_reaches_the_descriptor_with_its_range() {
        let a = arena();
        let sim = SimController::start(Arc::clone(&a), sim_config()).expect("sim");
        let t: Arc<dyn Transport> = sim.clone();
        let ctrl = Controller::attach(t, CtrlrOpts::default()).expect("attach");
        let b = NvmeBdev::new(ctrl, 1, "NvmeT").expect("bdev");
        let mut ch = b.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 8 }).expect("channel");
        sim.inject(Fault::LbaError {
            nsid: 1,
            slba: 10,
            nlb: 1,
            ops: nvstack_driver::nvme::sim::SimOpFilter::Read,
            status: NvmeStatus::new(sct::MEDIA, media::UNRECOVERED_READ_ERROR),
            count: None,
        });
        let mut pool = nvstack_driver::dma::BufPool::new(&a, 8192, 1, 4096, "t").expect("pool");
        let mut io = IoDesc::new(4);
        io.attach_buf(pool.get().expect("buf")).expect("attach");
        io.prepare(IoOp::Read, 9, 2);
        let io = run_sync(&mut *ch, io, Duration::from_secs(5)).expect("completes");
        assert_eq!(io.status, IoStatus::Failed(IoError::Media { offset_blocks: 9, num_blocks: 2 }));
    }
}
