//! The controller: bring-up as a polled state machine with deadlines from CAP.TO, the admin queue (identify, set
//! features, create/delete I/O queues, get log page, asynchronous events, abort), controller reset for recovery,
//! and shutdown notification (CC.SHN) on close.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use super::ns::Namespace;
use super::qpair::{read_pod, IoFailure, IoQpair, QpairOpts, Ring};
use super::regs::{shn, shst, Aqa, Cap, Cc, Csts, Regs, Version};
use super::spec::{admin_opc, cns, fid, lid, sgls, CompletionEntry, ErrorLogEntry, IdentifyController, IdentifyNamespace, SmartLog, SubmissionEntry};
use super::status::NvmeStatus;
use super::transport::Transport;
use crate::dma::DmaRegion;
use crate::DriverError;

/// Controller options (limits in DESIGN.md).
#[derive(Debug, Clone, Copy)]
pub struct CtrlrOpts {
    /// Admin queue entries.
    pub admin_entries: u16,
    /// I/O queue pairs to ask for (Set Features, Number of Queues).
    pub io_queues: u16,
    /// Deadline of one admin command.
    pub admin_timeout: Duration,
    /// Deadline of one I/O command before it is aborted (and, if still stuck, the controller reset).
    pub io_timeout: Duration,
    /// Resubmissions of one command (after an abort or a reset) before it fails.
    pub max_retries: u8,
    /// Asynchronous event requests kept outstanding (capped by the controller's AERL).
    pub aer_count: u8,
    /// Cap on bytes per command (besides MDTS). At most 2 MiB: one command's PRP list slot is one page.
    pub max_cmd_bytes: u32,
    /// Deadline of the shutdown notification.
    pub shutdown_timeout: Duration,
}

impl Default for CtrlrOpts {
    fn default() -> Self {
        CtrlrOpts {
            admin_entries: 32,
            io_queues: 64,
            admin_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            max_retries: 3,
            aer_count: 4,
            max_cmd_bytes: 2 << 20,
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// What `identify` users look for, decoded from Identify Controller and the registers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrlrInfo {
    /// Transport name (PCI address or simulator).
    pub name: String,
    /// PCI vendor ID.
    pub vendor_id: u16,
    /// Model number.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Firmware revision.
    pub firmware: String,
    /// Controller ID.
    pub cntlid: u16,
    /// NVMe version (VS register).
    pub version: String,
    /// Maximum data transfer size in bytes (`None`: no limit).
    pub mdts_bytes: Option<u64>,
    /// Maximum entries per I/O queue (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// I/O queue pairs granted by Set Features.
    pub io_queues_granted: u16,
    /// SGL support: `None`, or `Some(dword_alignment_required)`.
    pub sgl: Option<bool>,
    /// Volatile write cache present.
    pub volatile_write_cache: bool,
    /// Optional NVM commands (ONCS).
    pub oncs: u16,
    /// Number of namespaces (NN).
    pub namespace_count: u32,
    /// Asynchronous event request limit (AERL + 1).
    pub aer_limit: u16,
    /// Abort command limit (ACL + 1).
    pub abort_limit: u16,
    /// Subsystem NQN.
    pub subnqn: String,
    /// CAP.TO in milliseconds.
    pub ready_timeout_ms: u64,
}

/// An asynchronous event the controller reported (Base 5.2, figure 147), with what its log page said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AsyncEvent {
    /// Event type (0 error, 1 SMART/health, 2 notice, 6 I/O command set, 7 vendor).
    pub event_type: u8,
    /// Event information.
    pub event_info: u8,
    /// Log page that holds the details (read and cleared by the driver).
    pub log_page: u8,
    /// What that log page said.
    pub detail: EventDetail,
}

/// Details read from an event's log page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventDetail {
    /// Not read (no log page, or reading it failed).
    None,
    /// SMART / health summary.
    Smart {
        /// Critical warning bits.
        critical_warning: u8,
        /// Composite temperature, kelvins.
        temperature_k: u16,
        /// Media and data integrity errors (low 64 bits).
        media_errors: u64,
    },
    /// The newest error information entry.
    Error {
        /// Error count.
        error_count: u64,
        /// Status of the failed command.
        status: NvmeStatus,
        /// First LBA of the error.
        lba: u64,
        /// Namespace.
        nsid: u32,
    },
}

const STATE_LIVE: u8 = 0;
const STATE_FAILED: u8 = 1;
const STATE_GONE: u8 = 2;
const STATE_SHUTDOWN: u8 = 3;
/// Events kept for [`Controller::take_event`] (oldest dropped when full).
pub const EVENT_QUEUE_ENTRIES: usize = 64;
const ADMIN_BUF_BYTES: u64 = 4096;

struct Admin {
    ring: Ring,
    busy: Vec<bool>,
    aer_cids: Vec<u16>,
    aer_pending: Vec<CompletionEntry>,
    buf: DmaRegion,
}

struct QueueMem {
    entries: u16,
    depth: u16,
    sq: DmaRegion,
    cq: DmaRegion,
    lists: DmaRegion,
}

/// An attached NVMe controller. Shared (`Arc`) by every queue pair and bdev of it.
pub struct Controller {
    t: Arc<dyn Transport>,
    name: String,
    opts: CtrlrOpts,
    cap: Cap,
    version: Version,
    admin: Mutex<Admin>,
    gen: AtomicU64,
    state: AtomicU8,
    resets: AtomicU64,
    id: Box<IdentifyController>,
    namespaces: Vec<Namespace>,
    io_queues_granted: u16,
    free_qids: Mutex<Vec<u16>>,
    mem_pool: Mutex<Vec<QueueMem>>,
    events: ArrayQueue<AsyncEvent>,
    max_cmd_bytes: u32,
    aer_target: u8,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller").field("name", &self.name).field("namespaces", &self.namespaces.len()).finish()
    }
}

fn ascii(b: &[u8]) -> String {
    String::from_utf8_lossy(b).trim_end_matches([' ', '\0']).to_string()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Poll `cond` until it yields a value or `deadline` passes; reads of all ones or fatal status end the wait early
/// through `cond`'s own error. Sleeps 1 ms between polls after a short spin (a control-path wait).
fn wait_until<T>(deadline: Instant, mut cond: impl FnMut() -> Result<Option<T>, DriverError>) -> Result<Option<T>, DriverError> {
    let mut spins = 0u32;
    loop {
        if let Some(v) = cond()? {
            return Ok(Some(v));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        spins += 1;
        if spins < 200 {
            std::hint::spin_loop();
        } else if spins < 2000 {
            std::thread::yield_now();
        } else {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

/// The steps of bring-up (Base 3.5.1), each polled with its own deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BringUp {
    /// Look at CC.EN / CSTS.RDY as found.
    Inspect,
    /// EN=1 but RDY=0: wait for RDY=1 before clearing EN (3.5.2 note).
    WaitReadyBeforeDisable,
    /// Clear EN.
    Disable,
    /// Wait for RDY=0.
    WaitNotReady,
    /// Program AQA/ASQ/ACQ and CC, then set EN.
    Configure,
    /// Wait for RDY=1.
    WaitReady,
    /// Ready.
    Done,
}

impl Controller {
    /// Bring up the controller behind `t`, identify it and its namespaces, ask for I/O queues, arm asynchronous
    /// events.
    ///
    /// # Errors
    /// [`DriverError::NvmeGone`], `NvmeFatal`, `NvmeTimeout` (bring-up deadlines from CAP.TO), `NvmeCommand` (an
    /// admin command failed), `NvmeUnsupported` (page size, command set, entry sizes), arena errors.
    pub fn attach(t: Arc<dyn Transport>, opts: CtrlrOpts) -> Result<Arc<Controller>, DriverError> {
        let name = t.name().to_string();
        let regs = Regs(&*t);
        let cap = regs.cap();
        if cap.0 == u64::MAX {
            return Err(DriverError::NvmeGone { ctrlr: name, step: "reading CAP" });
        }
        let unsupported = |what: &str, reason: String| DriverError::NvmeUnsupported { ctrlr: name.clone(), what: what.into(), reason };
        if cap.css() & 1 == 0 {
            return Err(unsupported("CAP.CSS", "the NVM command set is not supported".into()));
        }
        if cap.mpsmin() > 0 {
            return Err(unsupported("CAP.MPSMIN", format!("minimum page size {} bytes; nvstack uses 4096", 4096u64 << cap.mpsmin())));
        }
        let version = regs.vs();
        let arena = Arc::clone(t.arena());
        let entries = opts.admin_entries.clamp(2, 4096).min(cap.mqes().saturating_add(1).max(2));
        let sq = arena.carve(u64::from(entries) * 64, 4096, "NVMe admin SQ")?;
        let cq = arena.carve(u64::from(entries) * 16, 4096, "NVMe admin CQ")?;
        let buf = arena.carve(ADMIN_BUF_BYTES, 4096, "NVMe admin data buffer")?;
        let admin = Admin {
            ring: Ring::new(0, entries, sq, cq, cap.dstrd()),
            busy: vec![false; usize::from(entries - 1)],
            aer_cids: Vec::with_capacity(8),
            aer_pending: Vec::with_capacity(8),
            buf,
        };
        let mut c = Controller {
            t,
            name,
            opts,
            cap,
            version,
            admin: Mutex::new(admin),
            gen: AtomicU64::new(0),
            state: AtomicU8::new(STATE_LIVE),
            resets: AtomicU64::new(0),
            id: Box::new(<IdentifyController as super::spec::Pod>::zeroed()),
            namespaces: Vec::new(),
            io_queues_granted: 0,
            free_qids: Mutex::new(Vec::new()),
            mem_pool: Mutex::new(Vec::new()),
            events: ArrayQueue::new(EVENT_QUEUE_ENTRIES),
            max_cmd_bytes: 0,
            aer_target: 0,
        };
        let (id, namespaces, max_cmd_bytes, granted) = {
            let mut admin = lock(&c.admin);
            c.enable(&mut admin)?;
            Regs(&*c.t).mask_interrupts();
            let (id, namespaces, max_cmd_bytes) = c.identify_all(&mut admin)?;
            (id, namespaces, max_cmd_bytes, c.set_queue_count(&mut admin)?)
        };
        c.aer_target = opts.aer_count.min(id.aerl.saturating_add(1)).min(4);
        c.id = id;
        c.namespaces = namespaces;
        c.max_cmd_bytes = max_cmd_bytes;
        c.io_queues_granted = granted;
        {
            let mut admin = lock(&c.admin);
            c.arm_aers(&mut admin);
        }
        *lock(&c.free_qids) = (1..=c.io_queues_granted).rev().collect();
        tracing::info!(
            ctrlr = c.name, model = %ascii(&c.id.mn), version = %c.version, namespaces = c.namespaces.len(),
            io_queues = c.io_queues_granted, max_cmd_bytes = c.max_cmd_bytes, "NVMe controller attached"
        );
        Ok(Arc::new(c))
    }

    /// The controller's name (its transport's).
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The transport.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.t
    }
    /// Options in force.
    pub fn opts(&self) -> &CtrlrOpts {
        &self.opts
    }
    /// Reset generation: bumped by every controller reset; queue pairs recreate themselves when it changes.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }
    /// Controller resets done so far.
    pub fn reset_count(&self) -> u64 {
        self.resets.load(Ordering::Relaxed)
    }
    /// Whether the device was found gone.
    pub fn is_gone(&self) -> bool {
        self.state.load(Ordering::Acquire) == STATE_GONE
    }
    /// Largest byte count of one command: MDTS, capped by the options and the list slot.
    pub fn max_cmd_bytes(&self) -> u32 {
        self.max_cmd_bytes
    }
    /// SGL support: `None`, or `Some(dword_alignment_required)`.
    pub fn sgl_support(&self) -> Option<bool> {
        match self.id.sgls & sgls::SUPPORT_MASK {
            1 => Some(false),
            2 => Some(true),
            _ => None,
        }
    }
    /// Raw Identify Controller data.
    pub fn identify_data(&self) -> &IdentifyController {
        &self.id
    }
    /// Active namespaces (usable or refused, see [`Namespace::refused`]).
    pub fn namespaces(&self) -> &[Namespace] {
        &self.namespaces
    }
    /// One namespace by ID.
    pub fn namespace(&self, nsid: u32) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.nsid == nsid)
    }

    /// The decoded summary for `identify`.
    pub fn info(&self) -> CtrlrInfo {
        let id = &self.id;
        CtrlrInfo {
            name: self.name.clone(),
            vendor_id: id.vid,
            model: ascii(&id.mn),
            serial: ascii(&id.sn),
            firmware: ascii(&id.fr),
            cntlid: id.cntlid,
            version: self.version.to_string(),
            mdts_bytes: (id.mdts != 0).then(|| 4096u64.checked_shl(u32::from(id.mdts)).unwrap_or(u64::MAX)),
            max_queue_entries: u32::from(self.cap.mqes()) + 1,
            io_queues_granted: self.io_queues_granted,
            sgl: self.sgl_support(),
            volatile_write_cache: id.vwc & 1 == 1,
            oncs: id.oncs,
            namespace_count: id.nn,
            aer_limit: u16::from(id.aerl) + 1,
            abort_limit: u16::from(id.acl) + 1,
            subnqn: ascii(&id.subnqn),
            ready_timeout_ms: self.cap.timeout_ms(),
        }
    }

    fn gone(&self, step: &'static str) -> DriverError {
        self.state.store(STATE_GONE, Ordering::Release);
        tracing::error!(ctrlr = self.name, step, "NVMe device is gone (registers read all ones)");
        DriverError::NvmeGone { ctrlr: self.name.clone(), step }
    }

    fn ready_deadline(&self) -> (Instant, u64) {
        let ms = self.cap.timeout_ms().max(500);
        (Instant::now() + Duration::from_millis(ms), ms)
    }

    /// Bring-up (3.5.1): disable, wait RDY=0, program the admin queue and CC, enable, wait RDY=1.
    fn enable(&self, admin: &mut Admin) -> Result<(), DriverError> {
        let regs = Regs(&*self.t);
        let mut step = BringUp::Inspect;
        let (mut deadline, to_ms) = self.ready_deadline();
        let timeout = |what: &'static str| DriverError::NvmeTimeout { ctrlr: self.name.clone(), step: what, timeout_ms: to_ms };
        while step != BringUp::Done {
            step = match step {
                BringUp::Inspect => {
                    let (cc, csts) = (regs.cc(), regs.csts());
                    if csts.is_all_ones() {
                        return Err(self.gone("bring-up: reading CSTS"));
                    }
                    match (cc.en(), csts.rdy()) {
                        (true, false) => BringUp::WaitReadyBeforeDisable,
                        (false, false) => BringUp::Configure,
                        _ => BringUp::Disable,
                    }
                }
                BringUp::WaitReadyBeforeDisable => {
                    // A controller that reports CFS never becomes ready: disable it at once.
                    let r = wait_until(deadline, || {
                        let s = regs.csts();
                        if s.is_all_ones() {
                            return Err(self.gone("bring-up: waiting for RDY=1 before disabling"));
                        }
                        Ok((s.rdy() || s.cfs()).then_some(()))
                    })?;
                    if r.is_none() {
                        tracing::warn!(ctrlr = self.name, "CC.EN=1 but RDY stayed 0; disabling anyway");
                    }
                    BringUp::Disable
                }
                BringUp::Disable => {
                    regs.set_cc(regs.cc().with_en(false));
                    (deadline, _) = self.ready_deadline();
                    BringUp::WaitNotReady
                }
                BringUp::WaitNotReady => {
                    let r = wait_until(deadline, || {
                        let s = regs.csts();
                        if s.is_all_ones() {
                            return Err(self.gone("bring-up: waiting for RDY=0"));
                        }
                        Ok((!s.rdy()).then_some(()))
                    })?;
                    r.ok_or_else(|| timeout("disabling the controller (waiting for CSTS.RDY=0)"))?;
                    BringUp::Configure
                }
                BringUp::Configure => {
                    admin.ring.reset();
                    let n = admin.ring.entries() - 1;
                    regs.set_aqa(Aqa::build(n, n));
                    regs.set_asq(admin.ring.sq_iova());
                    regs.set_acq(admin.ring.cq_iova());
                    let cc = Cc::default().with_css(0).with_mps(0).with_shn(shn::NONE).with_iosqes(6).with_iocqes(4);
                    regs.set_cc(cc);
                    regs.set_cc(cc.with_en(true));
                    (deadline, _) = self.ready_deadline();
                    BringUp::WaitReady
                }
                BringUp::WaitReady => {
                    let r = wait_until(deadline, || {
                        let s = regs.csts();
                        if s.is_all_ones() {
                            return Err(self.gone("bring-up: waiting for RDY=1"));
                        }
                        if s.cfs() {
                            return Err(DriverError::NvmeFatal { ctrlr: self.name.clone(), step: "bring-up: waiting for RDY=1" });
                        }
                        Ok(s.rdy().then_some(()))
                    })?;
                    r.ok_or_else(|| timeout("enabling the controller (waiting for CSTS.RDY=1)"))?;
                    BringUp::Done
                }
                BringUp::Done => BringUp::Done,
            };
        }
        for b in admin.busy.iter_mut() {
            *b = false;
        }
        admin.aer_cids.clear();
        admin.aer_pending.clear();
        Ok(())
    }

    /// Run one admin command and wait for it (bounded by the admin timeout). Completions of asynchronous event
    /// requests met on the way are recorded for [`Controller::service_events`].
    fn exec(&self, admin: &mut Admin, mut e: SubmissionEntry, command: &'static str) -> Result<CompletionEntry, DriverError> {
        let Some(cid) = admin.busy.iter().position(|b| !b) else {
            return Err(DriverError::NvmeResources {
                ctrlr: self.name.clone(),
                what: "admin command ids",
                hint: "earlier admin commands never completed: reset the controller",
            });
        };
        e.cid = cid as u16;
        admin.busy[cid] = true;
        if !admin.ring.push(&e) {
            admin.busy[cid] = false;
            return Err(DriverError::NvmeResources { ctrlr: self.name.clone(), what: "admin queue slots", hint: "reset the controller" });
        }
        admin.ring.ring_sq(&*self.t);
        let deadline = Instant::now() + self.opts.admin_timeout;
        let mut checks = 0u32;
        let found = wait_until(deadline, || {
            let mut got = None;
            while let Some(c) = admin.ring.next_cqe() {
                let ccid = usize::from(c.cid);
                if ccid == cid {
                    got = Some(c);
                    break;
                }
                if let Some(pos) = admin.aer_cids.iter().position(|&a| usize::from(a) == ccid) {
                    admin.aer_cids.swap_remove(pos);
                    admin.aer_pending.push(c);
                }
                if let Some(b) = admin.busy.get_mut(ccid) {
                    *b = false;
                }
            }
            admin.ring.ring_cq(&*self.t);
            checks += 1;
            if got.is_none() && checks.is_multiple_of(64) {
                let s = Regs(&*self.t).csts();
                if s.is_all_ones() {
                    return Err(self.gone(command));
                }
                if s.cfs() {
                    return Err(DriverError::NvmeFatal { ctrlr: self.name.clone(), step: command });
                }
            }
            Ok(got)
        })?;
        let Some(c) = found else {
            // The id stays busy (abandoned) until its completion arrives or the controller is reset.
            return Err(DriverError::NvmeTimeout {
                ctrlr: self.name.clone(),
                step: command,
                timeout_ms: self.opts.admin_timeout.as_millis() as u64,
            });
        };
        admin.busy[cid] = false;
        let status = NvmeStatus::from_cqe_word(c.status);
        if !status.is_success() {
            return Err(DriverError::NvmeCommand { ctrlr: self.name.clone(), command, status });
        }
        Ok(c)
    }

    fn identify_into(&self, admin: &mut Admin, cns_value: u8, nsid: u32, command: &'static str) -> Result<(), DriverError> {
        admin.buf.zero(0, ADMIN_BUF_BYTES);
        let e = SubmissionEntry {
            opc: admin_opc::IDENTIFY,
            nsid,
            dptr1: admin.buf.iova(),
            cdw10: u32::from(cns_value),
            ..Default::default()
        };
        self.exec(admin, e, command).map(|_| ())
    }

    fn identify_all(&self, admin: &mut Admin) -> Result<(Box<IdentifyController>, Vec<Namespace>, u32), DriverError> {
        self.identify_into(admin, cns::CONTROLLER, 0, "identify controller")?;
        let id: IdentifyController = read_pod(&admin.buf, 0).ok_or_else(|| self.bad("identify controller", "buffer"))?;
        if id.sqes & 0xf > 6 || id.cqes & 0xf > 4 {
            return Err(self.bad("identify controller", "requires SQ/CQ entries larger than 64/16 bytes"));
        }
        let mdts = if id.mdts == 0 { u64::MAX } else { 4096u64.checked_shl(u32::from(id.mdts)).unwrap_or(u64::MAX) };
        let max_cmd_bytes = mdts.min(u64::from(self.opts.max_cmd_bytes)).min(2 << 20) as u32;
        self.identify_into(admin, cns::ACTIVE_NS_LIST, 0, "identify active namespace list")?;
        let mut nsids = Vec::new();
        for i in 0..1024u64 {
            let v = admin.buf.read_u64(i * 8).unwrap_or(0);
            for n in [v as u32, (v >> 32) as u32] {
                if n != 0 && n <= id.nn.max(1) && nsids.last().is_none_or(|&l| n > l) {
                    nsids.push(n);
                }
            }
        }
        let mut list = Vec::with_capacity(nsids.len());
        for nsid in nsids {
            self.identify_into(admin, cns::NAMESPACE, nsid, "identify namespace")?;
            let idns: IdentifyNamespace = read_pod(&admin.buf, 0).ok_or_else(|| self.bad("identify namespace", "buffer"))?;
            let ns = Namespace::from_identify(nsid, &idns);
            if let Some(why) = &ns.refused {
                tracing::warn!(ctrlr = self.name, nsid, reason = %why, "namespace refused");
            }
            list.push(ns);
        }
        Ok((Box::new(id), list, max_cmd_bytes))
    }

    fn bad(&self, what: &str, reason: &str) -> DriverError {
        DriverError::NvmeUnsupported { ctrlr: self.name.clone(), what: what.into(), reason: reason.into() }
    }

    /// Set Features, Number of Queues (5.27.1.5). Returns the I/O queue pairs granted.
    fn set_queue_count(&self, admin: &mut Admin) -> Result<u16, DriverError> {
        let want = u32::from(self.opts.io_queues.clamp(1, 0xfffe) - 1);
        let e = SubmissionEntry {
            opc: admin_opc::SET_FEATURES,
            cdw10: u32::from(fid::NUMBER_OF_QUEUES),
            cdw11: want | (want << 16),
            ..Default::default()
        };
        let c = self.exec(admin, e, "set features (number of queues)")?;
        let nsqa = (c.dw0 & 0xffff) as u16;
        let ncqa = (c.dw0 >> 16) as u16;
        Ok(nsqa.min(ncqa).saturating_add(1).min(self.opts.io_queues.max(1)))
    }

    fn arm_aers(&self, admin: &mut Admin) {
        while admin.aer_cids.len() < usize::from(self.aer_target) {
            // Always leave one admin command id for ordinary admin commands.
            if admin.busy.iter().filter(|b| !**b).count() < 2 {
                break;
            }
            let Some(cid) = admin.busy.iter().position(|b| !b) else { return };
            let e = SubmissionEntry { opc: admin_opc::ASYNC_EVENT, cid: cid as u16, ..Default::default() };
            if !admin.ring.push(&e) {
                return;
            }
            admin.busy[cid] = true;
            admin.aer_cids.push(cid as u16);
        }
        admin.ring.ring_sq(&*self.t);
    }

    /// Reap admin completions (asynchronous events), read each event's log page, report the event (tracing and
    /// the event queue), and re-arm. Returns events handled. Never waits for the admin lock.
    pub fn service_events(&self) -> usize {
        let Ok(mut admin) = self.admin.try_lock() else { return 0 };
        if self.state.load(Ordering::Acquire) != STATE_LIVE {
            return 0;
        }
        while let Some(c) = admin.ring.next_cqe() {
            let ccid = usize::from(c.cid);
            if let Some(pos) = admin.aer_cids.iter().position(|&a| usize::from(a) == ccid) {
                admin.aer_cids.swap_remove(pos);
                admin.aer_pending.push(c);
            }
            if let Some(b) = admin.busy.get_mut(ccid) {
                *b = false;
            }
        }
        admin.ring.ring_cq(&*self.t);
        let mut n = 0;
        while let Some(c) = admin.aer_pending.pop() {
            n += 1;
            let status = NvmeStatus::from_cqe_word(c.status);
            if !status.is_success() {
                tracing::warn!(ctrlr = self.name, %status, "asynchronous event request failed; not re-arming it");
                continue;
            }
            let (event_type, event_info, log_page) = ((c.dw0 & 7) as u8, (c.dw0 >> 8) as u8, (c.dw0 >> 16) as u8);
            let detail = self.read_event_log(&mut admin, log_page);
            let ev = AsyncEvent { event_type, event_info, log_page, detail };
            tracing::warn!(ctrlr = self.name, event_type, event_info, log_page, ?detail, "NVMe asynchronous event");
            if let Err(ev) = self.events.push(ev) {
                let _ = self.events.pop();
                let _ = self.events.push(ev);
            }
        }
        if n > 0 {
            self.arm_aers(&mut admin);
        }
        n
    }

    fn read_event_log(&self, admin: &mut Admin, log_page: u8) -> EventDetail {
        match log_page {
            lid::SMART_HEALTH => match self.get_log(admin, lid::SMART_HEALTH, 512) {
                Ok(()) => read_pod::<SmartLog>(&admin.buf, 0).map_or(EventDetail::None, |s| EventDetail::Smart {
                    critical_warning: s.critical_warning,
                    temperature_k: u16::from_le_bytes(s.temperature),
                    media_errors: u128::from_le_bytes(s.media_errors) as u64,
                }),
                Err(_) => EventDetail::None,
            },
            lid::ERROR_INFO => match self.get_log(admin, lid::ERROR_INFO, 64) {
                Ok(()) => read_pod::<ErrorLogEntry>(&admin.buf, 0).map_or(EventDetail::None, |e| EventDetail::Error {
                    error_count: e.error_count,
                    status: NvmeStatus::from_cqe_word(e.status),
                    lba: e.lba,
                    nsid: e.nsid,
                }),
                Err(_) => EventDetail::None,
            },
            _ => EventDetail::None,
        }
    }

    /// Get Log Page (5.16) of `bytes` (a multiple of 4, at most 4096) into the admin buffer.
    fn get_log(&self, admin: &mut Admin, log_id: u8, bytes: u32) -> Result<(), DriverError> {
        let numd = bytes / 4 - 1;
        admin.buf.zero(0, ADMIN_BUF_BYTES);
        let e = SubmissionEntry {
            opc: admin_opc::GET_LOG_PAGE,
            nsid: u32::MAX,
            dptr1: admin.buf.iova(),
            cdw10: u32::from(log_id) | ((numd & 0xffff) << 16),
            cdw11: numd >> 16,
            ..Default::default()
        };
        self.exec(admin, e, "get log page").map(|_| ())
    }

    /// The next reported asynchronous event, oldest first.
    pub fn take_event(&self) -> Option<AsyncEvent> {
        self.events.pop()
    }

    /// Read the SMART / health log.
    ///
    /// # Errors
    /// As for any admin command.
    pub fn smart_log(&self) -> Result<SmartLog, DriverError> {
        let mut admin = lock(&self.admin);
        self.get_log(&mut admin, lid::SMART_HEALTH, 512)?;
        read_pod(&admin.buf, 0).ok_or_else(|| self.bad("SMART log", "buffer"))
    }

    /// Read up to `max` error information entries (newest first), skipping empty ones.
    ///
    /// # Errors
    /// As for any admin command.
    pub fn error_log(&self, max: usize) -> Result<Vec<ErrorLogEntry>, DriverError> {
        let n = max.clamp(1, 64).min(usize::from(self.id.elpe) + 1);
        let mut admin = lock(&self.admin);
        self.get_log(&mut admin, lid::ERROR_INFO, (n * 64) as u32)?;
        Ok((0..n)
            .filter_map(|i| read_pod::<ErrorLogEntry>(&admin.buf, (i * 64) as u64))
            .filter(|e| e.error_count != 0)
            .collect())
    }

    /// Abort command `cid` on SQ `qid` (5.1). Returns whether the controller says it aborted it.
    ///
    /// # Errors
    /// As for any admin command.
    pub fn abort(&self, qid: u16, cid: u16) -> Result<bool, DriverError> {
        let mut admin = lock(&self.admin);
        let e = SubmissionEntry {
            opc: admin_opc::ABORT,
            cdw10: u32::from(qid) | (u32::from(cid) << 16),
            ..Default::default()
        };
        let c = self.exec(&mut admin, e, "abort")?;
        Ok(c.dw0 & 1 == 0)
    }

    /// Whether the controller can take commands: `Ok(true)` healthy, `Ok(false)` fatal status (reset it),
    /// `Err(Gone)` when registers read all ones.
    pub fn check_alive(&self, step: &'static str) -> Result<bool, IoFailure> {
        let s = Regs(&*self.t).csts();
        if s.is_all_ones() {
            let _ = self.gone(step);
            return Err(IoFailure::Gone);
        }
        if s.cfs() {
            tracing::error!(ctrlr = self.name, step, "controller fatal status (CSTS.CFS)");
        }
        Ok(!s.cfs())
    }

    /// Create I/O CQ and SQ `qid` over the given memory (5.4, 5.5): physically contiguous, no interrupts.
    pub(crate) fn create_io_queues(&self, qid: u16, entries: u16, sq_iova: u64, cq_iova: u64) -> Result<(), DriverError> {
        let mut admin = lock(&self.admin);
        let size = u32::from(entries - 1) << 16;
        let cq = SubmissionEntry {
            opc: admin_opc::CREATE_CQ,
            dptr1: cq_iova,
            cdw10: u32::from(qid) | size,
            cdw11: 1,
            ..Default::default()
        };
        self.exec(&mut admin, cq, "create I/O completion queue")?;
        let sq = SubmissionEntry {
            opc: admin_opc::CREATE_SQ,
            dptr1: sq_iova,
            cdw10: u32::from(qid) | size,
            cdw11: 1 | (u32::from(qid) << 16),
            ..Default::default()
        };
        self.exec(&mut admin, sq, "create I/O submission queue")?;
        Ok(())
    }

    /// Open an I/O queue pair with `opts.depth` request slots and `opts.commands` command ids (clamped to
    /// CAP.MQES).
    ///
    /// # Errors
    /// [`DriverError::NvmeResources`] when every granted queue ID is in use, arena errors, admin command errors.
    pub fn io_qpair(self: &Arc<Self>, opts: QpairOpts) -> Result<IoQpair, DriverError> {
        let commands = opts.commands.max(opts.depth).clamp(1, self.cap.mqes().max(1));
        let depth = opts.depth.clamp(1, commands);
        let entries = commands + 1;
        let Some(qid) = lock(&self.free_qids).pop() else {
            return Err(DriverError::NvmeResources {
                ctrlr: self.name.clone(),
                what: "I/O queue pairs",
                hint: "the controller granted fewer queue pairs than channels asked for: use fewer reactors",
            });
        };
        let mem = {
            let mut pool = lock(&self.mem_pool);
            pool.iter().position(|m| m.entries == entries && m.depth == commands).map(|i| pool.swap_remove(i))
        };
        let mem = match mem {
            Some(m) => m,
            None => {
                let arena = self.t.arena();
                let carve = || -> Result<QueueMem, DriverError> {
                    Ok(QueueMem {
                        entries,
                        depth: commands,
                        sq: arena.carve(u64::from(entries) * 64, 4096, "NVMe I/O SQ")?,
                        cq: arena.carve(u64::from(entries) * 16, 4096, "NVMe I/O CQ")?,
                        lists: arena.carve(u64::from(commands) * 4096, 4096, "NVMe PRP/SGL lists")?,
                    })
                };
                match carve() {
                    Ok(m) => m,
                    Err(e) => {
                        lock(&self.free_qids).push(qid);
                        return Err(e);
                    }
                }
            }
        };
        if let Err(e) = self.create_io_queues(qid, entries, mem.sq.iova(), mem.cq.iova()) {
            lock(&self.free_qids).push(qid);
            lock(&self.mem_pool).push(mem);
            return Err(e);
        }
        let ring = Ring::new(qid, entries, mem.sq, mem.cq, self.cap.dstrd());
        tracing::debug!(ctrlr = self.name, qid, depth, "I/O queue pair created");
        Ok(IoQpair::new(Arc::clone(self), ring, mem.lists, depth, commands))
    }

    /// A queue pair is dropped: delete its queues (if the controller is live), keep its memory for reuse.
    pub(crate) fn release_io_qpair(&self, ring: Ring, lists: DmaRegion) {
        let qid = ring.qid();
        if self.state.load(Ordering::Acquire) == STATE_LIVE {
            let mut admin = lock(&self.admin);
            for (opc, what) in [(admin_opc::DELETE_SQ, "delete I/O submission queue"), (admin_opc::DELETE_CQ, "delete I/O completion queue")] {
                let e = SubmissionEntry { opc, cdw10: u32::from(qid), ..Default::default() };
                if let Err(err) = self.exec(&mut admin, e, what) {
                    tracing::warn!(ctrlr = self.name, qid, error = %err, "deleting an I/O queue failed");
                }
            }
        }
        let entries = ring.entries();
        let depth = (lists.len() / 4096) as u16;
        let (sq, cq) = ring.into_mem();
        lock(&self.mem_pool).push(QueueMem { entries, depth, sq, cq, lists });
        lock(&self.free_qids).push(qid);
    }

    /// Reset the controller (recovery): disable it (a function reset if it will not disable), bring it up again,
    /// ask for the same queues, re-arm events, and bump the generation so every queue pair recreates itself.
    /// A no-op when another caller already reset it since `seen_generation`.
    ///
    /// # Errors
    /// [`DriverError::NvmeGone`] when the device is gone; bring-up errors. The controller is marked failed then.
    pub fn reset(&self, seen_generation: u64) -> Result<(), DriverError> {
        let mut admin = lock(&self.admin);
        if self.generation() != seen_generation {
            return Ok(());
        }
        match self.state.load(Ordering::Acquire) {
            STATE_GONE => return Err(DriverError::NvmeGone { ctrlr: self.name.clone(), step: "controller reset" }),
            STATE_SHUTDOWN => return Err(self.bad("controller reset", "the controller was shut down")),
            _ => {}
        }
        self.resets.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(ctrlr = self.name, "resetting the NVMe controller");
        let regs = Regs(&*self.t);
        if regs.csts().is_all_ones() {
            return Err(self.gone("controller reset"));
        }
        let r = match self.enable(&mut admin) {
            Err(DriverError::NvmeTimeout { .. }) | Err(DriverError::NvmeFatal { .. }) => {
                tracing::warn!(ctrlr = self.name, "controller did not come back: trying a function reset");
                self.t.reset().and_then(|()| self.enable(&mut admin))
            }
            other => other,
        };
        let r = r.and_then(|()| {
            Regs(&*self.t).mask_interrupts();
            let granted = self.set_queue_count(&mut admin)?;
            if granted < self.io_queues_granted {
                tracing::warn!(ctrlr = self.name, granted, before = self.io_queues_granted, "fewer queues granted after reset");
            }
            self.arm_aers(&mut admin);
            Ok(())
        });
        match r {
            Ok(()) => {
                self.state.store(STATE_LIVE, Ordering::Release);
                self.gen.fetch_add(1, Ordering::AcqRel);
                Ok(())
            }
            Err(e) => {
                if !self.is_gone() {
                    self.state.store(STATE_FAILED, Ordering::Release);
                }
                tracing::error!(ctrlr = self.name, error = %e, "controller reset failed");
                Err(e)
            }
        }
    }

    /// Shutdown notification (CC.SHN normal, wait for CSTS.SHST complete). Called by `Drop` if not before.
    ///
    /// # Errors
    /// [`DriverError::NvmeTimeout`] when shutdown does not complete in time; `NvmeGone`.
    pub fn shutdown(&self) -> Result<(), DriverError> {
        let _admin = lock(&self.admin);
        let prev = self.state.swap(STATE_SHUTDOWN, Ordering::AcqRel);
        if prev == STATE_GONE || prev == STATE_SHUTDOWN {
            self.state.store(prev, Ordering::Release);
            return Ok(());
        }
        let regs = Regs(&*self.t);
        let cc = regs.cc();
        if cc.0 == u32::MAX {
            return Err(self.gone("shutdown"));
        }
        regs.set_cc(cc.with_shn(shn::NORMAL));
        let deadline = Instant::now() + self.opts.shutdown_timeout;
        let r = wait_until(deadline, || {
            let s: Csts = regs.csts();
            if s.is_all_ones() {
                return Err(self.gone("shutdown: waiting for CSTS.SHST"));
            }
            Ok((s.shst() == shst::COMPLETE).then_some(()))
        })?;
        r.ok_or_else(|| DriverError::NvmeTimeout {
            ctrlr: self.name.clone(),
            step: "shutdown notification (waiting for CSTS.SHST=complete)",
            timeout_ms: self.opts.shutdown_timeout.as_millis() as u64,
        })?;
        tracing::info!(ctrlr = self.name, "NVMe controller shut down");
        Ok(())
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(ctrlr = self.name, error = %e, "shutdown on close failed");
        }
    }
}
