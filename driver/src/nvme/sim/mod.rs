//! A simulated NVMe controller behind [`Transport`]: registers, admin and I/O queues processed by a simulator
//! thread that polls the doorbells, RAM-backed namespaces, MDTS, and fault injection for what QEMU cannot do:
//! dropped commands (timeouts), error statuses on chosen LBA ranges, controller fatal status, surprise removal,
//! slow and out-of-order completions, tiny queues.
//!
//! A test instrument: it never replaces the QEMU tests.

mod engine;
mod mem;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;

use super::regs::{Cap, CAP, CSTS, DOORBELL_BASE};
use super::status::NvmeStatus;
use super::transport::Transport;
use crate::dma::Arena;
use crate::DriverError;

/// One simulated namespace.
#[derive(Debug, Clone, Copy)]
pub struct SimNamespace {
    /// Block size: 512 or 4096 (any power of two 512..=65536 works).
    pub block_size: u32,
    /// Blocks.
    pub block_count: u64,
    /// Metadata bytes per block advertised (nonzero to test refusal; data is still unformatted RAM).
    pub metadata_bytes: u16,
}

/// How the simulated controller looks.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Transport name.
    pub name: String,
    /// Namespaces (NSID 1, 2, ...).
    pub namespaces: Vec<SimNamespace>,
    /// MDTS (2^MDTS × 4 KiB per command; 0: no limit).
    pub mdts: u8,
    /// I/O queue pairs the controller grants at most.
    pub max_io_queues: u16,
    /// Maximum queue entries (CAP.MQES + 1), at least 2.
    pub max_queue_entries: u16,
    /// SGLS support field (0 none, 1 any alignment, 2 dword aligned).
    pub sgls: u32,
    /// Volatile write cache present.
    pub vwc: bool,
    /// ONCS (write zeroes and DSM by default).
    pub oncs: u16,
    /// CAP.TO in 500 ms units.
    pub ready_timeout_500ms: u8,
    /// Time the simulated controller takes to become ready after CC.EN=1.
    pub ready_delay: Duration,
    /// Asynchronous event request limit, 0-based (AERL).
    pub aerl: u8,
    /// Serial number reported.
    pub serial: String,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            name: "sim0".into(),
            namespaces: vec![SimNamespace { block_size: 4096, block_count: 4096, metadata_bytes: 0 }],
            mdts: 5,
            max_io_queues: 8,
            max_queue_entries: 1024,
            sgls: 1,
            vwc: true,
            oncs: super::spec::oncs::DSM | super::spec::oncs::WRITE_ZEROES,
            ready_timeout_500ms: 4,
            ready_delay: Duration::from_millis(1),
            aerl: 3,
            serial: "NVSTACKSIM0001".into(),
        }
    }
}

/// Which commands an LBA-range fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SimOpFilter {
    /// Reads only.
    Read,
    /// Writes only.
    Write,
    /// Reads, writes, write zeroes and deallocates.
    Any,
}

/// A fault to inject.
#[derive(Debug, Clone, Copy)]
pub enum Fault {
    /// The next `count` I/O commands vanish (no completion). `abortable`: an Abort finds them and completes them
    /// with "command abort requested"; otherwise only a controller reset clears them.
    DropCommands {
        /// How many.
        count: u32,
        /// Whether Abort finds them.
        abortable: bool,
    },
    /// Commands touching blocks `slba..slba+nlb` of `nsid` complete with `status` (media errors are also logged
    /// in the error log). `count`: how many times (None: until cleared).
    LbaError {
        /// Namespace.
        nsid: u32,
        /// First block.
        slba: u64,
        /// Blocks.
        nlb: u64,
        /// Which commands.
        ops: SimOpFilter,
        /// The status to return.
        status: NvmeStatus,
        /// How many times.
        count: Option<u32>,
    },
    /// Every completion waits this long before it is posted.
    Delay(Duration),
    /// Completions are held until `window` are pending (or 2 ms pass), then posted in reverse order.
    Reorder(usize),
    /// The controller reports fatal status (CSTS.CFS) and stops processing until it is reset.
    Fatal,
    /// Raise an asynchronous event (type, information, log page).
    Event {
        /// Event type.
        event_type: u8,
        /// Event information.
        event_info: u8,
        /// Log page.
        log_page: u8,
    },
    /// Remove every fault (drop, LBA errors, delay, reorder).
    ClearAll,
}

/// Counters the simulator keeps.
#[derive(Debug, Default)]
pub struct SimStats {
    /// Commands fetched from any SQ.
    pub commands: AtomicU64,
    /// I/O commands fetched.
    pub io_commands: AtomicU64,
    /// Commands dropped by fault injection.
    pub dropped: AtomicU64,
    /// Aborts that found their command.
    pub aborted: AtomicU64,
    /// Controller enables (CC.EN 0 -> 1).
    pub enables: AtomicU64,
    /// Function resets through the transport.
    pub function_resets: AtomicU64,
    /// Largest data transfer of one command seen, bytes.
    pub max_transfer_bytes: AtomicU64,
    /// Commands using SGLs.
    pub sgl_commands: AtomicU64,
}

/// Register file slots (32-bit index = offset / 4) the host sees.
const REG_WORDS: usize = 16;

pub(crate) struct Shared {
    cfg: SimConfig,
    arena: Arc<Arena>,
    regs: [AtomicU32; REG_WORDS],
    doorbells: Box<[AtomicU32]>,
    removed: AtomicBool,
    stop: AtomicBool,
    reset_req: AtomicU64,
    reset_ack: AtomicU64,
    faults: ArrayQueue<Fault>,
    stats: SimStats,
    namespaces: Vec<Mutex<Vec<u8>>>,
}

/// The simulated controller: a [`Transport`] plus the fault-injection and inspection API. Dropping it stops the
/// simulator thread.
pub struct SimController {
    sh: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for SimController {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimController").field("name", &self.sh.cfg.name).finish()
    }
}

impl SimController {
    /// Start a simulated controller whose DMA reaches `arena`.
    ///
    /// # Errors
    /// [`DriverError::NvmeUnsupported`] for a bad configuration (namespace sizes overflow memory, a block size
    /// that is not a power of two); [`DriverError::ArenaMap`]-style OS errors when the thread cannot start.
    pub fn start(arena: Arc<Arena>, cfg: SimConfig) -> Result<Arc<SimController>, DriverError> {
        let name = cfg.name.clone();
        let bad = |reason: String| DriverError::NvmeUnsupported { ctrlr: name.clone(), what: "simulator configuration".into(), reason };
        let mut namespaces = Vec::with_capacity(cfg.namespaces.len());
        for ns in &cfg.namespaces {
            if !ns.block_size.is_power_of_two() || !(512..=65536).contains(&ns.block_size) {
                return Err(bad(format!("block size {} is not a power of two in 512..=65536", ns.block_size)));
            }
            let bytes = ns.block_count.checked_mul(u64::from(ns.block_size)).filter(|&b| b <= 8 << 30);
            let bytes = bytes.ok_or_else(|| bad("namespace larger than 8 GiB of RAM".into()))?;
            namespaces.push(Mutex::new(vec![0u8; bytes as usize]));
        }
        if cfg.max_queue_entries < 2 {
            return Err(bad("queues need at least 2 entries".into()));
        }
        let cap = Cap::build(cfg.max_queue_entries - 1, cfg.ready_timeout_500ms, 0, 1, 0, 4);
        let regs: [AtomicU32; REG_WORDS] = std::array::from_fn(|_| AtomicU32::new(0));
        regs[CAP / 4].store(cap.0 as u32, Ordering::Relaxed);
        regs[CAP / 4 + 1].store((cap.0 >> 32) as u32, Ordering::Relaxed);
        regs[super::regs::VS / 4].store(0x0001_0400, Ordering::Relaxed);
        let doorbells = (0..2 * (usize::from(cfg.max_io_queues) + 1)).map(|_| AtomicU32::new(0)).collect();
        let sh = Arc::new(Shared {
            cfg,
            arena,
            regs,
            doorbells,
            removed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            reset_req: AtomicU64::new(0),
            reset_ack: AtomicU64::new(0),
            faults: ArrayQueue::new(256),
            stats: SimStats::default(),
            namespaces,
        });
        let sh2 = Arc::clone(&sh);
        let thread = std::thread::Builder::new()
            .name(format!("nvme-sim-{}", sh.cfg.name))
            .spawn(move || engine::run(sh2))
            .map_err(|e| bad(format!("starting the simulator thread: {e}")))?;
        Ok(Arc::new(SimController { sh, thread: Mutex::new(Some(thread)) }))
    }

    /// Inject a fault. Faults take effect in order, before the next command the simulator fetches.
    ///
    /// Returns `false` when the fault queue is full.
    pub fn inject(&self, f: Fault) -> bool {
        if matches!(f, Fault::Fatal) {
            // Visible at once to register reads, like hardware.
            let csts = self.sh.regs[CSTS / 4].load(Ordering::Acquire);
            self.sh.regs[CSTS / 4].store(csts | 2, Ordering::Release);
        }
        self.sh.faults.push(f).is_ok()
    }

    /// Surprise removal: from now on every register reads all ones and nothing is processed.
    pub fn surprise_remove(&self) {
        self.sh.removed.store(true, Ordering::Release);
    }

    /// Counters.
    pub fn stats(&self) -> &SimStats {
        &self.sh.stats
    }

    /// Read blocks straight from namespace `nsid`'s backing RAM (for checks that bypass the driver).
    pub fn read_backing(&self, nsid: u32, offset_bytes: u64, dst: &mut [u8]) -> bool {
        let Some(ns) = self.sh.namespaces.get((nsid as usize).wrapping_sub(1)) else { return false };
        let data = ns.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(end) = (offset_bytes as usize).checked_add(dst.len()).filter(|&e| e <= data.len()) else { return false };
        dst.copy_from_slice(&data[offset_bytes as usize..end]);
        true
    }

    /// The configuration.
    pub fn config(&self) -> &SimConfig {
        &self.sh.cfg
    }
}

impl Drop for SimController {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            let _ = t.join();
        }
    }
}

impl Transport for SimController {
    fn name(&self) -> &str {
        &self.sh.cfg.name
    }

    fn read32(&self, offset: usize) -> u32 {
        if self.sh.removed.load(Ordering::Acquire) {
            return u32::MAX;
        }
        match self.sh.regs.get(offset / 4) {
            Some(r) if offset.is_multiple_of(4) => r.load(Ordering::Acquire),
            _ => 0,
        }
    }

    #[inline]
    fn write32(&self, offset: usize, value: u32) {
        if offset >= DOORBELL_BASE {
            // Doorbells: the simulator thread polls these (Release pairs with its Acquire load, so the entries
            // written before the doorbell are visible to it).
            if let Some(d) = self.sh.doorbells.get((offset - DOORBELL_BASE) / 4) {
                d.store(value, Ordering::Release);
            }
            return;
        }
        if self.sh.removed.load(Ordering::Acquire) || !offset.is_multiple_of(4) {
            return;
        }
        // CAP, VS and CSTS are read-only.
        if offset / 4 <= 2 || offset == CSTS {
            return;
        }
        if let Some(r) = self.sh.regs.get(offset / 4) {
            r.store(value, Ordering::Release);
        }
    }

    fn read64(&self, offset: usize) -> u64 {
        let lo = self.read32(offset);
        let hi = self.read32(offset + 4);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    fn arena(&self) -> &Arc<Arena> {
        &self.sh.arena
    }

    fn reset(&self) -> Result<(), DriverError> {
        if self.sh.removed.load(Ordering::Acquire) {
            return Err(DriverError::NvmeGone { ctrlr: self.sh.cfg.name.clone(), step: "function reset" });
        }
        let want = self.sh.reset_req.fetch_add(1, Ordering::AcqRel) + 1;
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.sh.reset_ack.load(Ordering::Acquire) < want {
            if Instant::now() > deadline || self.sh.stop.load(Ordering::Acquire) {
                return Err(DriverError::NvmeTimeout { ctrlr: self.sh.cfg.name.clone(), step: "simulated function reset", timeout_ms: 2000 });
            }
            std::thread::yield_now();
        }
        self.sh.stats.function_resets.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
