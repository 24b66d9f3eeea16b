//! The poison listener inside `nvstack serve`, and its RPC methods.
//!
//! At start, serve builds a [`PoisonPath`] whose journal keeps [`DEFAULT_JOURNAL_EVENTS`] events in memory and
//! appends every event to `DATA_DIR/poison.log` (JSON lines, what `nvstack poison list` reads), and runs the rmap
//! listener thread: it drains the SIGBUS ring (faults in guarded pmem copies, early-kill reports), optionally
//! tracefs (`serve --poison-tracefs`), and the media-error queue, every [`POLL_PERIOD`]. Nothing of this runs on
//! the I/O path but [`BdevEntry::report_io_error`], a bounded lock-free queue push when a request fails with a media
//! error.
//!
//! # What the reverse maps know
//! Each bdev of the appliance gets, by [`register_bdev`]:
//! - an "appliance" map answering from the live registry: the range is owned by the export(s) of the bdev
//!   (`Owner::Volume` named `export:NAME`, at the same offset: an export is the whole bdev) or by the bdev stacked on
//!   it (a cache: `Owner::Volume` named after that bdev, followed into its own maps);
//! - for a pmem bdev, its mapping in the translator, so a SIGBUS address inside it becomes a device offset.
//!
//! The DMA arena is registered in the translator as device `arena` (offsets inside the arena), for the cache's
//! plugin to answer for its pages.
//!
//! One action target acts for every bdev but caches: free space is zeroed through the pmem driver for pmem bdevs
//! (`PmemTarget`), with a write-zeroes request otherwise (`BdevTarget`). It looks the bdev up when it acts, so it
//! holds no bdev alive.
//!
//! **Caches are not registered yet**: no reverse map answers for a cache's pages and no target acts for a cache
//! bdev, so an event under a cache ends "no owner known" (nothing touched). The cache's plugin and target go in
//! [`register_bdev`], where the `nvstack_cache_create` case is marked.
//!
//! An export covering the whole device, with nothing known inside it, is not free: such events are journaled with
//! the owning export and the action "no owner known" (unknown is never free).
//!
//! # Test aid
//! `nvstack_poison_inject {device, offset[, len]}` feeds a synthetic device-range report (source `injected`)
//! through the same path as a real one (resolve, decide, act, journal). With `via: "sigbus"` (pmem bdevs only) it
//! sends the process a synthetic SIGBUS `BUS_MCEERR_AO` for that page instead, which the listener thread picks up
//! like a kernel machine-check report. It is refused unless serve runs with `--poison-test-rpc`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use nvstack_rmap::action::ActionTarget;
use nvstack_rmap::cache::{CacheMaps, ARENA_DEVICE};
use nvstack_rmap::journal::{Journal, PoisonEvent, Source, DEFAULT_JOURNAL_EVENTS};
use nvstack_rmap::listener::{action_name, Listener, PoisonPath, RawReport};
use nvstack_rmap::owner::{Owner, OwnerPiece, Rmap};
use nvstack_rmap::plugins::{BdevTarget, PmemTarget};
use nvstack_rmap::translate::Mapping;
use nvstack_rmap::RmapError;
use serde_json::{json, Map, Value};

use super::registry::{BdevEntry, Registry};
use super::rpc::methods::{check_keys, get_str, get_u64, need_str, need_u64};
use super::rpc::{code, RpcError};
use crate::error::AppError;

/// How often the listener polls its sources.
pub const POLL_PERIOD: Duration = Duration::from_millis(10);
/// How long shutdown waits for the listener thread.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Prefix of the volume names exports appear under in owner chains.
pub const EXPORT_PREFIX: &str = "export:";
/// Bytes an explain or inject covers when `len` is not given (one page, or less at the end of the device).
pub const DEFAULT_LEN_BYTES: u64 = 4096;

/// How serve runs the listener.
#[derive(Debug, Clone)]
pub struct PoisonOptions {
    /// The journal's log file (`DATA_DIR/poison.log`).
    pub log: PathBuf,
    /// tracefs mount point to read `mce_record` and `memory_failure_event` from (root), if any.
    pub tracefs: Option<PathBuf>,
    /// Accept `nvstack_poison_inject`.
    pub allow_inject: bool,
}

/// The poison path of the appliance and its listener thread.
pub struct ServePoison {
    path: Arc<PoisonPath>,
    /// The caches' reverse map and action target for arena memory.
    caches: Arc<CacheMaps>,
    /// Bdevs whose maps are registered: name → registry id (a bdev deleted and made again gets new maps).
    known: Mutex<BTreeMap<String, u64>>,
    allow_inject: bool,
    listener: Mutex<Option<Listener>>,
    log: PathBuf,
    /// Bytes of the DMA arena (device `arena` to explain and inject: cache pages live there).
    arena_bytes: u64,
}

impl std::fmt::Debug for ServePoison {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServePoison").field("log", &self.log).field("allow_inject", &self.allow_inject).finish()
    }
}

impl ServePoison {
    /// Build the poison path from the appliance's bdevs and start the listener thread.
    ///
    /// # Errors
    /// [`AppError::Failed`] when the journal file cannot be opened or the listener cannot start.
    pub fn start(opts: &PoisonOptions, registry: &Arc<Registry>, arena: &nvstack_driver::dma::Arena) -> Result<Arc<ServePoison>, AppError> {
        let journal = Journal::new(DEFAULT_JOURNAL_EVENTS, Some(&opts.log))
            .map_err(|e| AppError::Failed(format!("poison journal: {e}")))?;
        let path = PoisonPath::new(journal);
        path.add_target(Arc::new(ApplianceTarget { registry: Arc::downgrade(registry) }));
        let caches = CacheMaps::attach(&path, arena);
        registry.set_media_sink(Arc::clone(&path));
        if let Some(t) = &opts.tracefs {
            if let Err(e) = path.enable_tracefs(t) {
                tracing::warn!(error = %e, "poison: tracefs events will not be seen");
            }
        }
        let me = Arc::new(ServePoison {
            path,
            caches,
            known: Mutex::new(BTreeMap::new()),
            allow_inject: opts.allow_inject,
            listener: Mutex::new(None),
            log: opts.log.clone(),
            arena_bytes: arena.size_bytes(),
        });
        me.sync(registry);
        let l = me.path.spawn(POLL_PERIOD).map_err(|e| AppError::Failed(format!("poison listener: {e}")))?;
        *me.listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(l);
        tracing::info!(log = %opts.log.display(), "poison listener running");
        Ok(me)
    }

    /// Bring the reverse maps up to date with the registry's bdevs (after a bdev is made or deleted). Control path.
    pub fn sync(&self, registry: &Arc<Registry>) {
        let mut known = self.known.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let bdevs = registry.bdevs();
        let gone: Vec<String> = known
            .iter()
            .filter(|(name, id)| !bdevs.iter().any(|b| b.bdev.name() == name.as_str() && b.id == **id))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            unregister_bdev(&self.path, &self.caches, &name);
            known.remove(&name);
        }
        for b in bdevs {
            if !known.contains_key(b.bdev.name()) {
                register_bdev(&self.path, &self.caches, registry, &b);
                known.insert(b.bdev.name().to_string(), b.id);
            }
        }
    }

    /// Stop the listener thread: it finishes its current poll and polls once more. Waits at most `timeout`; returns
    /// false (and leaves the thread to end with the process) when it did not finish in time.
    pub fn stop(&self, timeout: Duration) -> bool {
        let Some(l) = self.listener.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() else {
            return true;
        };
        let (tx, rx) = std::sync::mpsc::channel();
        let joiner = std::thread::Builder::new().name("poison-stop".into()).spawn(move || {
            l.stop();
            let _ = tx.send(());
        });
        if joiner.is_err() {
            tracing::warn!("poison: could not start the joiner thread; listener left to end with the process");
            return false;
        }
        match rx.recv_timeout(timeout) {
            Ok(()) => true,
            Err(_) => {
                tracing::warn!(timeout_ms = timeout.as_millis() as u64, "poison listener did not stop in time");
                false
            }
        }
    }
}

/// Register what the poison path needs to know about one bdev of the appliance. Called for every bdev at start and
/// for each new one after an RPC made it; [`ServePoison::sync`] unregisters everything registered under the bdev's
/// name when it goes.
///
/// A cache (`nvstack_cache_create`) joins the arena's cache map: poison on arena memory holding one of its pages
/// resolves to that page (clean or dirty, first dirtier), the device bytes it caches and the exports above them, and
/// the cache drops (clean) or marks IOERR (dirty) the page and retires its slot.
pub fn register_bdev(path: &PoisonPath, caches: &CacheMaps, registry: &Arc<Registry>, b: &BdevEntry) {
    let name = b.bdev.name();
    path.registry.register(Arc::new(ApplianceMap { device: name.to_string(), registry: Arc::downgrade(registry) }));
    if let Some(dev) = &b.extra.pmem {
        path.translator.add(Mapping { device: name.to_string(), vaddr: Some(dev.base_addr()), len: dev.len(), device_offset: 0, phys: dev.phys_range() });
    }
    if let Some(cache) = &b.extra.cache {
        caches.add(name, cache);
    }
}

fn unregister_bdev(path: &PoisonPath, caches: &CacheMaps, name: &str) {
    caches.remove(name);
    path.registry.unregister_device(name);
    path.translator.remove_device(name);
}

/// Answers for one bdev from the live registry: its exports, or the bdev stacked on it.
struct ApplianceMap {
    device: String,
    registry: Weak<Registry>,
}

impl Rmap for ApplianceMap {
    fn name(&self) -> &str {
        "appliance"
    }
    fn device(&self) -> &str {
        &self.device
    }
    fn owners(&self, offset: u64, len: u64, out: &mut Vec<OwnerPiece>) -> Result<(), RmapError> {
        let Some(reg) = self.registry.upgrade() else { return Ok(()) };
        let Some(b) = reg.bdev(&self.device) else { return Ok(()) };
        let end = offset.saturating_add(len).min(b.bdev.geometry().size_bytes());
        if offset >= end {
            return Ok(());
        }
        let piece = |volume: String| OwnerPiece {
            device: self.device.clone(),
            offset,
            len: end - offset,
            owner: Owner::Volume { name: volume, offset },
            rmap: "appliance".into(),
            depth: 0,
        };
        for x in reg.exports().iter().filter(|x| x.bdev.id == b.id) {
            out.push(piece(format!("{EXPORT_PREFIX}{}", x.info.name)));
        }
        let claimed = b.claimed_by.read().map(|c| c.clone()).unwrap_or(None);
        if let Some(by) = claimed {
            out.push(piece(by));
        }
        Ok(())
    }
}

/// Acts for every bdev of the registry except caches (which register their own target).
struct ApplianceTarget {
    registry: Weak<Registry>,
}

impl ApplianceTarget {
    fn entry(&self, device: &str) -> Option<Arc<BdevEntry>> {
        self.registry.upgrade()?.bdev(device).filter(|b| b.method != "nvstack_cache_create")
    }
}

impl ActionTarget for ApplianceTarget {
    fn owns(&self, device: &str) -> bool {
        self.entry(device).is_some()
    }
    fn zero_and_clear(&self, device: &str, offset: u64, len: u64) -> Result<(), String> {
        let b = self.entry(device).ok_or_else(|| format!("bdev {device:?} is gone"))?;
        match &b.extra.pmem {
            Some(dev) => PmemTarget::new(device, Arc::clone(dev)).zero_and_clear(device, offset, len),
            None => BdevTarget::new(device, Arc::clone(&b.bdev)).zero_and_clear(device, offset, len),
        }
    }
}

/// An event as the RPC shows it: the journal's fields, plus `device`, `offset`, `address`, the owning `exports`
/// and a readable `action_name`.
pub fn event_json(ev: &PoisonEvent) -> Value {
    let mut v = serde_json::to_value(ev).unwrap_or(Value::Null);
    let exports: Vec<&str> = ev
        .owners
        .iter()
        .filter_map(|p| match &p.owner {
            Owner::Volume { name, .. } => name.strip_prefix(EXPORT_PREFIX),
            _ => None,
        })
        .collect();
    v["device"] = json!(ev.translation.as_ref().map(|t| t.device.clone()));
    v["offset"] = json!(ev.translation.as_ref().map(|t| t.offset));
    v["address"] = json!(ev.vaddr.or(ev.phys));
    v["exports"] = json!(exports);
    v["action_name"] = json!(action_name(&ev.action));
    v
}

/// The device range an explain or inject asks about, checked against the bdev (or the DMA arena, device `arena`,
/// where the caches' pages are).
fn device_range(p: &ServePoison, registry: &Registry, method: &str, m: &Map<String, Value>) -> Result<(String, u64, u64), RpcError> {
    let device = need_str(m, "device", method)?;
    let offset = need_u64(m, "offset", method)?;
    let size = if device == ARENA_DEVICE {
        p.arena_bytes
    } else {
        let Some(b) = registry.bdev(device) else {
            let names: Vec<String> = registry.bdevs().iter().map(|b| b.bdev.name().to_string()).collect();
            return Err(RpcError::new(
                code::NO_DEVICE,
                format!("{method}: no bdev named {device:?} (bdevs: {}; or {ARENA_DEVICE:?}, the DMA arena)", names.join(", ")),
            ));
        };
        b.bdev.geometry().size_bytes()
    };
    if offset >= size {
        return Err(RpcError::params(format!("{method}: offset {offset} is beyond the end of {device:?} ({size} bytes)")));
    }
    let len = match get_u64(m, "len", method)? {
        Some(0) => return Err(RpcError::params(format!("{method}: len must be at least 1"))),
        Some(l) => {
            if offset.checked_add(l).is_none_or(|e| e > size) {
                return Err(RpcError::params(format!("{method}: offset {offset} + len {l} is beyond the end of {device:?} ({size} bytes)")));
            }
            l
        }
        None => DEFAULT_LEN_BYTES.min(size - offset),
    };
    Ok((device.to_string(), offset, len))
}

/// `via: "sigbus"`: a synthetic SIGBUS `BUS_MCEERR_AO` for the page at `offset` of a pmem bdev's mapping, sent to
/// this thread as the kernel would on a machine check; the listener thread drains it from the handler's ring,
/// translates the address and journals the event. Answers with that event (waits up to [`SIGBUS_WAIT`]).
fn inject_sigbus(p: &ServePoison, registry: &Registry, method: &str, device: &str, offset: u64) -> Result<Value, RpcError> {
    let Some(dev) = registry.bdev(device).and_then(|b| b.extra.pmem.clone()) else {
        return Err(RpcError::params(format!("{method}: via \"sigbus\" needs a pmem bdev (mapped into serve); {device:?} is not one")));
    };
    let page = usize::try_from(offset & !4095).map_err(|_| RpcError::params(format!("{method}: offset too large")))?;
    let addr = dev.base_addr().checked_add(page).ok_or_else(|| RpcError::params(format!("{method}: offset too large")))?;
    let last_id = p.path.journal.list().last().map_or(0, |e| e.id);
    nvstack_driver::pmem::mc_copy::inject_synthetic_sigbus(addr, false, 12)
        .map_err(|e| RpcError::new(code::IO_ERROR, format!("{method}: {e}")))?;
    let deadline = std::time::Instant::now() + SIGBUS_WAIT;
    loop {
        let found = p.path.journal.list().into_iter().find(|e| e.id > last_id && e.vaddr == Some(addr as u64));
        if let Some(e) = found {
            return Ok(event_json(&e));
        }
        if std::time::Instant::now() > deadline {
            return Err(RpcError::new(
                code::IO_ERROR,
                format!("{method}: the listener journaled no event for {addr:#x} within {} ms", SIGBUS_WAIT.as_millis()),
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// How long `via: "sigbus"` waits for the listener's event.
pub const SIGBUS_WAIT: Duration = Duration::from_secs(2);

/// `nvstack_get_poison_events {limit}`, `nvstack_poison_explain {device, offset, len}` and
/// `nvstack_poison_inject {device, offset, len}`.
pub fn rpc(p: Option<&ServePoison>, registry: &Registry, method: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    let Some(p) = p else {
        return Err(RpcError::new(code::NOT_SUPPORTED, format!("{method}: the poison listener is off (serve --no-poison)")));
    };
    match method {
        "nvstack_get_poison_events" => {
            check_keys(&m, method, &["limit"])?;
            let events = p.path.journal.list();
            let limit = get_u64(&m, "limit", method)?.map_or(events.len(), |l| usize::try_from(l).unwrap_or(usize::MAX));
            let skip = events.len().saturating_sub(limit);
            Ok(Value::Array(events.iter().skip(skip).map(event_json).collect()))
        }
        "nvstack_poison_explain" => {
            check_keys(&m, method, &["device", "offset", "len"])?;
            let (device, offset, len) = device_range(p, registry, method, &m)?;
            Ok(event_json(&p.path.explain(RawReport::Device { source: Source::Explain, device, offset, len })))
        }
        "nvstack_poison_inject" => {
            check_keys(&m, method, &["device", "offset", "len", "via"])?;
            if !p.allow_inject {
                return Err(RpcError::new(
                    code::NOT_PERMITTED,
                    format!("{method} is a test aid: start `nvstack serve` with --poison-test-rpc to allow it"),
                ));
            }
            let (device, offset, len) = device_range(p, registry, method, &m)?;
            match get_str(&m, "via", method)?.unwrap_or("report") {
                "report" => {}
                "sigbus" => return inject_sigbus(p, registry, method, &device, offset),
                other => return Err(RpcError::params(format!("{method}: via {other:?} must be \"report\" or \"sigbus\""))),
            }
            let ev = p.path.handle(RawReport::Device { source: Source::Injected, device, offset, len });
            // The journal stamps its copy with the time: answer with that one.
            let journaled = p.path.journal.list().into_iter().rev().find(|e| e.id == ev.id);
            Ok(event_json(journaled.as_ref().unwrap_or(&ev)))
        }
        _ => Err(RpcError::new(code::METHOD_NOT_FOUND, format!("method {method:?} not found"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn malloc(name: &str) -> Arc<dyn nvstack_blockdev::BlockDev> {
        nvstack_blockdev::malloc::MallocBdev::new(name, 1 << 20, 512).unwrap()
    }

    #[test]
    fn maps_follow_the_registry() {
        let reg = Registry::new();
        let path = PoisonPath::new(Journal::new(8, None).unwrap());
        let p = ServePoison { path, caches: CacheMaps::new(nvstack_rmap::cache::ARENA_DEVICE), known: Mutex::new(BTreeMap::new()), allow_inject: false, listener: Mutex::new(None), log: PathBuf::new(), arena_bytes: 0 };
        reg.add_bdev_with(malloc("A"), "bdev_malloc_create", Value::Null, Default::default()).unwrap();
        reg.add_bdev_with(malloc("B"), "bdev_malloc_create", Value::Null, Default::default()).unwrap();
        reg.add_export("ea", "A", "", false).unwrap();
        p.sync(&reg);
        let r = p.path.registry.resolve("A", 4096, 4096);
        assert_eq!(r.pieces.len(), 1);
        assert_eq!(r.pieces[0].owner, Owner::Volume { name: "export:ea".into(), offset: 4096 });
        // Past the end: nothing; a bdev with no export: nothing.
        assert!(p.path.registry.resolve("A", 1 << 20, 4096).pieces.is_empty());
        assert!(p.path.registry.resolve("B", 0, 4096).pieces.is_empty());
        // A range crossing the end is clipped.
        assert_eq!(p.path.registry.resolve("A", (1 << 20) - 512, 4096).pieces[0].len, 512);
        // Answers are live: a new export shows without a sync; a deleted bdev's maps go with the sync.
        reg.add_export("eb", "B", "", false).unwrap();
        assert_eq!(p.path.registry.resolve("B", 0, 512).pieces.len(), 1);
        reg.remove_export("eb").unwrap();
        reg.remove_bdev("B").unwrap();
        p.sync(&reg);
        assert_eq!(p.path.registry.devices(), vec!["A".to_string()]);
        // The action target acts for registry bdevs only, and zeroes free space with write zeroes.
        let t = ApplianceTarget { registry: Arc::downgrade(&reg) };
        assert!(t.owns("A") && !t.owns("B"));
        assert!(t.zero_and_clear("A", 0, 4096).is_ok());
        assert!(t.zero_and_clear("A", 1, 4096).is_err(), "not whole blocks");
    }

    #[test]
    fn media_errors_from_the_io_path_become_events() {
        let reg = Registry::new();
        let path = PoisonPath::new(Journal::new(8, None).unwrap());
        let p = ServePoison { path, caches: CacheMaps::new(nvstack_rmap::cache::ARENA_DEVICE), known: Mutex::new(BTreeMap::new()), allow_inject: false, listener: Mutex::new(None), log: PathBuf::new(), arena_bytes: 0 };
        let a = reg.add_bdev_with(malloc("A"), "bdev_malloc_create", Value::Null, Default::default()).unwrap();
        reg.add_export("ea", "A", "", false).unwrap();
        p.sync(&reg);
        let media = nvstack_blockdev::IoError::Media { offset_blocks: 8, num_blocks: 2 };
        assert!(!a.report_io_error(&media), "no listener yet: dropped");
        reg.set_media_sink(Arc::clone(&p.path));
        assert!(!a.report_io_error(&nvstack_blockdev::IoError::Os { errno: 5 }), "only media errors");
        assert!(a.report_io_error(&media));
        assert_eq!(p.path.poll_once(&mut Vec::new()), 1);
        let ev = p.path.journal.list().pop().unwrap();
        assert_eq!(ev.source, Source::NvmeMediaError);
        let j = event_json(&ev);
        assert_eq!((j["device"].as_str(), j["offset"].as_u64(), j["len"].as_u64()), (Some("A"), Some(4096), Some(1024)));
        assert_eq!(j["exports"], json!(["ea"]));
    }
}
