//! What the appliance serves: bdevs (with how they were made, for `save_config`) and NBD exports, with I/O
//! statistics. Control paths (RPC, handshakes) take the locks here; the I/O path holds `Arc`s and only bumps
//! relaxed atomic counters.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use nvstack_blockdev::{BlockDev, IoError};
use nvstack_driver::nvme::Controller;
use nvstack_driver::pmem::PmemDevice;
use serde_json::{json, Value};

use nvstack_rmap::listener::PoisonPath;

use super::nbd::conn::MAX_REQUEST_BYTES;
use super::nbd::handshake::{ExportDirectory, ExportInfo};
use super::nbd::proto::{cmd, tflag, BlockSizes, ExportLimits};

/// I/O counters (SPDK's `bdev_get_iostat` names).
#[derive(Debug, Default)]
pub struct IoStats {
    /// Reads.
    pub num_read_ops: AtomicU64,
    /// Bytes read.
    pub bytes_read: AtomicU64,
    /// Writes.
    pub num_write_ops: AtomicU64,
    /// Bytes written.
    pub bytes_written: AtomicU64,
    /// Trims.
    pub num_unmap_ops: AtomicU64,
    /// Bytes trimmed.
    pub bytes_unmapped: AtomicU64,
    /// Write-zeroes.
    pub num_write_zeroes_ops: AtomicU64,
    /// Bytes zeroed.
    pub bytes_zeroed: AtomicU64,
    /// Flushes.
    pub num_flush_ops: AtomicU64,
    /// Requests answered with an error.
    pub num_errors: AtomicU64,
    /// Sum of read latencies (ns).
    pub read_latency_ns: AtomicU64,
    /// Sum of write latencies (ns).
    pub write_latency_ns: AtomicU64,
}

impl IoStats {
    /// Count one finished request.
    pub fn record(&self, kind: u16, bytes: u64, failed: bool, started: Instant) {
        let r = Ordering::Relaxed;
        if failed {
            self.num_errors.fetch_add(1, r);
            return;
        }
        let ns = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
        match kind {
            cmd::READ => {
                self.num_read_ops.fetch_add(1, r);
                self.bytes_read.fetch_add(bytes, r);
                self.read_latency_ns.fetch_add(ns, r);
            }
            cmd::WRITE => {
                self.num_write_ops.fetch_add(1, r);
                self.bytes_written.fetch_add(bytes, r);
                self.write_latency_ns.fetch_add(ns, r);
            }
            cmd::TRIM => {
                self.num_unmap_ops.fetch_add(1, r);
                self.bytes_unmapped.fetch_add(bytes, r);
            }
            cmd::WRITE_ZEROES => {
                self.num_write_zeroes_ops.fetch_add(1, r);
                self.bytes_zeroed.fetch_add(bytes, r);
            }
            cmd::FLUSH => {
                self.num_flush_ops.fetch_add(1, r);
            }
            _ => {}
        }
    }

    /// As JSON fields (SPDK names, plus nvstack's latency sums in ns).
    pub fn to_json(&self) -> Value {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "bytes_read": g(&self.bytes_read),
            "num_read_ops": g(&self.num_read_ops),
            "bytes_written": g(&self.bytes_written),
            "num_write_ops": g(&self.num_write_ops),
            "bytes_unmapped": g(&self.bytes_unmapped),
            "num_unmap_ops": g(&self.num_unmap_ops),
            "bytes_copied": 0,
            "num_copy_ops": 0,
            "num_write_zeroes_ops": g(&self.num_write_zeroes_ops),
            "bytes_zeroed": g(&self.bytes_zeroed),
            "num_flush_ops": g(&self.num_flush_ops),
            "num_errors": g(&self.num_errors),
            "read_latency_ns": g(&self.read_latency_ns),
            "write_latency_ns": g(&self.write_latency_ns),
        })
    }
}

/// One bdev the appliance knows.
pub struct BdevEntry {
    /// Registry id (channels are keyed by it).
    pub id: u64,
    /// The device.
    pub bdev: Arc<dyn BlockDev>,
    /// The RPC method that made it (for `save_config`).
    pub method: String,
    /// Its parameters (for `save_config`).
    pub params: Value,
    /// I/O counters (through NBD).
    pub stats: IoStats,
    /// Name of the bdev stacked on this one (the cache), if any: a claimed bdev is not exported or deleted.
    pub claimed_by: RwLock<Option<String>>,
    /// A reactor held a channel to this bdev and flushed it on shutdown (it may not allow a second channel).
    pub reactor_flushed: AtomicBool,
    /// NBD connections using the bdev now (a connection keeps its bdev after its export is deleted).
    pub connections: AtomicU32,
    /// What else the appliance knows about the device (pmem mapping, NVMe controller).
    pub extra: BdevExtra,
    /// Where media errors go (the poison path), once serve has started it.
    media_sink: Arc<OnceLock<Arc<PoisonPath>>>,
}

impl BdevEntry {
    /// Hand a media error seen on the I/O path to the poison listener (a bounded lock-free queue: never blocks; a
    /// full queue is counted there). Other errors, pmem bdevs (their poison arrives as SIGBUS) and a serve without
    /// the listener are ignored. Returns whether the error was queued. The NBD completion path calls it for every
    /// failed request.
    pub fn report_io_error(&self, e: &IoError) -> bool {
        let IoError::Media { offset_blocks, num_blocks } = *e else { return false };
        if self.extra.pmem.is_some() {
            return false;
        }
        let Some(sink) = self.media_sink.get() else { return false };
        let bs = u64::from(self.bdev.geometry().block_size);
        match (offset_blocks.checked_mul(bs), num_blocks.checked_mul(bs)) {
            (Some(offset), Some(len)) => sink.report_media_error(self.bdev.name(), offset, len),
            _ => false,
        }
    }
}

/// Facts about a bdev beyond the [`BlockDev`] trait, kept for the poison path and `bdev_get_bdevs`.
#[derive(Debug, Default, Clone)]
pub struct BdevExtra {
    /// The mapping of a pmem bdev (the poison listener translates addresses inside it).
    pub pmem: Option<Arc<PmemDevice>>,
    /// The NVMe controller (by its `bdev_nvme_attach_controller` name) and namespace ID of an NVMe bdev.
    pub nvme: Option<(String, u32)>,
    /// The cache of an `nvstack_cache_create` bdev (for its poison-path plugin: page owners, actions).
    pub cache: Option<Arc<nvstack_cache::CacheBdev>>,
}

/// An NVMe controller attached with `bdev_nvme_attach_controller`: it owns the bdevs of its namespaces.
pub struct NvmeCtrlrEntry {
    /// The controller's name (`Nvme0`); its bdevs are `Nvme0n1`, `Nvme0n2`...
    pub name: String,
    /// Transport type as given (`PCIe`, or nvstack's `sim`).
    pub trtype: String,
    /// Transport address (a PCI BDF; for `sim`, a label).
    pub traddr: String,
    /// The parameters to save (`save_config`).
    pub params: Value,
    /// The attached controller. Dropping the last reference shuts it down (CC.SHN).
    pub ctrlr: Arc<Controller>,
    /// The simulator behind a `sim` controller (to inject faults: `nvstack_nvme_sim_inject_error`).
    pub sim: Option<Arc<nvstack_driver::nvme::sim::SimController>>,
    /// Names of its bdevs, in NSID order.
    pub bdevs: Vec<String>,
}

impl std::fmt::Debug for NvmeCtrlrEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeCtrlrEntry").field("name", &self.name).field("traddr", &self.traddr).finish()
    }
}

impl std::fmt::Debug for BdevEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BdevEntry").field("id", &self.id).field("name", &self.bdev.name()).finish()
    }
}

/// One NBD export.
#[derive(Debug)]
pub struct ExportEntry {
    /// What the handshake tells clients.
    pub info: ExportInfo,
    /// The bdev behind it.
    pub bdev: Arc<BdevEntry>,
    /// Per-export counters.
    pub stats: IoStats,
    /// Read-only export.
    pub read_only: bool,
}

impl ExportEntry {
    /// Count one finished request for the export and its bdev.
    pub fn record(&self, kind: u16, bytes: u64, failed: bool, started: Instant) {
        self.stats.record(kind, bytes, failed, started);
        self.bdev.stats.record(kind, bytes, failed, started);
    }
}

/// Why a registry change was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryError {
    /// The name is taken.
    Exists(String),
    /// Nothing has that name.
    NotFound(String),
    /// The object is in use (exported, or claimed by a stacked bdev).
    InUse(String),
    /// A parameter is unusable.
    Invalid(String),
}

impl std::fmt::Display for RegistryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RegistryError::Exists(s) | RegistryError::NotFound(s) | RegistryError::InUse(s) | RegistryError::Invalid(s) => {
                f.write_str(s)
            }
        }
    }
}

/// Bdevs and exports.
#[derive(Default)]
pub struct Registry {
    bdevs: RwLock<Vec<Arc<BdevEntry>>>,
    exports: RwLock<Vec<Arc<ExportEntry>>>,
    controllers: RwLock<Vec<Arc<NvmeCtrlrEntry>>>,
    media_sink: Arc<OnceLock<Arc<PoisonPath>>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    /// Counts bdev removals: a reactor that sees it change closes its idle channels to bdevs that are gone.
    removals: AtomicU64,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish()
    }
}

fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry { next_id: AtomicU64::new(1), ..Default::default() })
    }

    /// Send media errors of every bdev (see [`BdevEntry::report_io_error`]) to `path`. Set once; later calls are
    /// ignored.
    pub fn set_media_sink(&self, path: Arc<PoisonPath>) {
        let _ = self.media_sink.set(path);
    }

    /// Mark the server as stopping (handshakes then answer `NBD_REP_ERR_SHUTDOWN`).
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    /// Add a bdev with what else is known about it.
    ///
    /// # Errors
    /// [`RegistryError::Exists`] if the name is taken.
    pub fn add_bdev_with(
        &self,
        bdev: Arc<dyn BlockDev>,
        method: &str,
        params: Value,
        extra: BdevExtra,
    ) -> Result<Arc<BdevEntry>, RegistryError> {
        let mut g = write(&self.bdevs);
        if g.iter().any(|b| b.bdev.name() == bdev.name()) {
            return Err(RegistryError::Exists(format!("a bdev named {:?} already exists", bdev.name())));
        }
        let e = self.entry(bdev, method, params, extra);
        g.push(Arc::clone(&e));
        Ok(e)
    }

    fn entry(&self, bdev: Arc<dyn BlockDev>, method: &str, params: Value, extra: BdevExtra) -> Arc<BdevEntry> {
        Arc::new(BdevEntry {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            bdev,
            method: method.to_string(),
            params,
            stats: IoStats::default(),
            claimed_by: RwLock::new(None),
            reactor_flushed: AtomicBool::new(false),
            connections: AtomicU32::new(0),
            extra,
            media_sink: Arc::clone(&self.media_sink),
        })
    }

    /// Add an attached NVMe controller and the bdevs of its namespaces (each `(bdev, nsid)`), all or nothing.
    ///
    /// # Errors
    /// [`RegistryError::Exists`] when the controller name, its transport address or a bdev name is taken.
    pub fn add_controller(
        &self,
        mut ctrl: NvmeCtrlrEntry,
        method: &str,
        bdevs: Vec<(Arc<dyn BlockDev>, u32)>,
    ) -> Result<Arc<NvmeCtrlrEntry>, RegistryError> {
        let mut bg = write(&self.bdevs);
        let mut cg = write(&self.controllers);
        if cg.iter().any(|c| c.name == ctrl.name) {
            return Err(RegistryError::Exists(format!("a controller named {:?} is already attached", ctrl.name)));
        }
        if let Some(c) = cg.iter().find(|c| c.trtype.eq_ignore_ascii_case(&ctrl.trtype) && c.traddr == ctrl.traddr) {
            return Err(RegistryError::Exists(format!("{} is already attached as controller {:?}", ctrl.traddr, c.name)));
        }
        if let Some((b, _)) = bdevs.iter().find(|(b, _)| bg.iter().any(|x| x.bdev.name() == b.name())) {
            return Err(RegistryError::Exists(format!("a bdev named {:?} already exists", b.name())));
        }
        ctrl.bdevs = bdevs.iter().map(|(b, _)| b.name().to_string()).collect();
        for (bdev, nsid) in bdevs {
            let extra = BdevExtra { nvme: Some((ctrl.name.clone(), nsid)), ..BdevExtra::default() };
            let e = self.entry(bdev, method, Value::Null, extra);
            bg.push(e);
        }
        let ctrl = Arc::new(ctrl);
        cg.push(Arc::clone(&ctrl));
        Ok(ctrl)
    }

    /// Remove an NVMe controller and its bdevs, unless one of them is exported or claimed. The caller drops the
    /// returned entry to shut the controller down (once no channel holds one of its bdevs any more).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] or [`RegistryError::InUse`] (naming the export or the claiming bdev).
    pub fn remove_controller(&self, name: &str) -> Result<Arc<NvmeCtrlrEntry>, RegistryError> {
        let exports = read(&self.exports);
        let mut bg = write(&self.bdevs);
        let mut cg = write(&self.controllers);
        let Some(ci) = cg.iter().position(|c| c.name == name) else {
            return Err(RegistryError::NotFound(format!("no NVMe controller named {name:?}")));
        };
        for b in &cg[ci].bdevs {
            if let Some(x) = exports.iter().find(|x| x.bdev.bdev.name() == b) {
                return Err(RegistryError::InUse(format!(
                    "bdev {b:?} of controller {name:?} is exported as {:?}: delete the export first (nvstack_export_delete)",
                    x.info.name
                )));
            }
            if let Some(by) = bg.iter().find(|x| x.bdev.name() == b).and_then(|x| read(&x.claimed_by).clone()) {
                return Err(RegistryError::InUse(format!("bdev {b:?} of controller {name:?} is claimed by {by:?}: delete that first")));
            }
        }
        let c = cg.remove(ci);
        bg.retain(|x| !c.bdevs.iter().any(|b| b == x.bdev.name()));
        self.removals.fetch_add(1, Ordering::Release);
        Ok(c)
    }

    /// The NVMe controller called `name`.
    pub fn controller(&self, name: &str) -> Option<Arc<NvmeCtrlrEntry>> {
        read(&self.controllers).iter().find(|c| c.name == name).cloned()
    }

    /// Every attached NVMe controller, in attach order.
    pub fn controllers(&self) -> Vec<Arc<NvmeCtrlrEntry>> {
        read(&self.controllers).clone()
    }

    /// Remove a bdev that is neither exported nor claimed.
    ///
    /// # Errors
    /// [`RegistryError::NotFound`] or [`RegistryError::InUse`].
    pub fn remove_bdev(&self, name: &str) -> Result<Arc<BdevEntry>, RegistryError> {
        let exports = read(&self.exports);
        let mut g = write(&self.bdevs);
        let i = Self::removable(&exports, &g, name)?;
        let e = g.remove(i);
        self.removals.fetch_add(1, Ordering::Release);
        Ok(e)
    }

    /// Whether [`Registry::remove_bdev`] would remove `name` now.
    ///
    /// # Errors
    /// As [`Registry::remove_bdev`].
    pub fn check_removable(&self, name: &str) -> Result<(), RegistryError> {
        Self::removable(&read(&self.exports), &read(&self.bdevs), name).map(|_| ())
    }

    fn removable(exports: &[Arc<ExportEntry>], bdevs: &[Arc<BdevEntry>], name: &str) -> Result<usize, RegistryError> {
        if let Some(x) = exports.iter().find(|x| x.bdev.bdev.name() == name) {
            return Err(RegistryError::InUse(format!(
                "bdev {name:?} is exported as {:?}: delete the export first (nvstack_export_delete)",
                x.info.name
            )));
        }
        let Some(i) = bdevs.iter().position(|b| b.bdev.name() == name) else {
            return Err(RegistryError::NotFound(format!("no bdev named {name:?}")));
        };
        if let Some(by) = read(&bdevs[i].claimed_by).clone() {
            return Err(RegistryError::InUse(format!("bdev {name:?} is claimed by {by:?}: delete that first")));
        }
        Ok(i)
    }

    /// How many bdevs have been removed so far (see [`Registry::remove_bdev`]).
    pub fn removals(&self) -> u64 {
        self.removals.load(Ordering::Acquire)
    }

    /// The bdev called `name`.
    pub fn bdev(&self, name: &str) -> Option<Arc<BdevEntry>> {
        read(&self.bdevs).iter().find(|b| b.bdev.name() == name).cloned()
    }

    /// Every bdev, in creation order.
    pub fn bdevs(&self) -> Vec<Arc<BdevEntry>> {
        read(&self.bdevs).clone()
    }

    /// Export `bdev_name` as `name`.
    ///
    /// # Errors
    /// [`RegistryError`] when the name is taken, the bdev is unknown or claimed, or the name is invalid.
    pub fn add_export(&self, name: &str, bdev_name: &str, description: &str, read_only: bool) -> Result<Arc<ExportEntry>, RegistryError> {
        if name.is_empty() || name.len() > 256 || name.contains('\0') {
            return Err(RegistryError::Invalid("an export name is 1 to 256 bytes, without NUL".into()));
        }
        if description.len() > 4096 || description.contains('\0') {
            return Err(RegistryError::Invalid("a description is at most 4096 bytes, without NUL".into()));
        }
        let Some(b) = self.bdev(bdev_name) else {
            return Err(RegistryError::NotFound(format!("no bdev named {bdev_name:?}")));
        };
        if let Some(by) = read(&b.claimed_by).clone() {
            return Err(RegistryError::InUse(format!("bdev {bdev_name:?} is claimed by {by:?}: export {by:?} instead")));
        }
        let mut g = write(&self.exports);
        if g.iter().any(|x| x.info.name == name) {
            return Err(RegistryError::Exists(format!("an export named {name:?} already exists")));
        }
        let geo = b.bdev.geometry();
        let feat = b.bdev.features();
        let min = geo.block_size.max(1);
        let mut tflags = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::SEND_TRIM
            | tflag::SEND_WRITE_ZEROES
            | tflag::SEND_DF
            | tflag::SEND_CACHE
            | tflag::CAN_MULTI_CONN;
        if feat.write_zeroes {
            tflags |= tflag::SEND_FAST_ZERO;
        }
        if read_only {
            tflags |= tflag::READ_ONLY;
        }
        let block = BlockSizes { min, preferred: min.max(4096), max: (MAX_REQUEST_BYTES / min).max(1) * min };
        let info = ExportInfo {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            name: name.to_string(),
            description: description.to_string(),
            limits: ExportLimits { size_bytes: geo.size_bytes(), block, tflags },
        };
        let e = Arc::new(ExportEntry { info, bdev: b, stats: IoStats::default(), read_only });
        g.push(Arc::clone(&e));
        Ok(e)
    }

    /// Stop exporting `name` (connections already open keep running until they disconnect).
    ///
    /// # Errors
    /// [`RegistryError::NotFound`].
    pub fn remove_export(&self, name: &str) -> Result<(), RegistryError> {
        let mut g = write(&self.exports);
        let Some(i) = g.iter().position(|x| x.info.name == name) else {
            return Err(RegistryError::NotFound(format!("no export named {name:?}")));
        };
        g.remove(i);
        Ok(())
    }

    /// Every export.
    pub fn exports(&self) -> Vec<Arc<ExportEntry>> {
        read(&self.exports).clone()
    }

    /// The export with registry id `id`.
    pub fn export_by_id(&self, id: u64) -> Option<Arc<ExportEntry>> {
        read(&self.exports).iter().find(|x| x.info.id == id).cloned()
    }
}

impl ExportDirectory for Registry {
    fn find(&self, name: &str) -> Option<ExportInfo> {
        let g = read(&self.exports);
        if name.is_empty() {
            return g.first().map(|x| x.info.clone());
        }
        g.iter().find(|x| x.info.name == name).map(|x| x.info.clone())
    }
    fn list(&self) -> Vec<(String, String)> {
        read(&self.exports).iter().map(|x| (x.info.name.clone(), x.info.description.clone())).collect()
    }
    fn shutting_down(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }
}
