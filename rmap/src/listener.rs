//! The poison listener: gathers reports from every source, and for each one translates, asks the owners, acts and
//! journals.
//!
//! Sources:
//! - SIGBUS (`BUS_MCEERR_AR`/`_AO`, and faults inside guarded copies): recorded by the driver's async-signal-safe
//!   handler in a preallocated ring (`nvstack_driver::pmem::mc_copy`), drained here.
//! - tracefs `mce:mce_record` and `ras:memory_failure_event`, read from `trace_pipe` without blocking.
//! - New entries in watched pmem badblocks lists.
//! - NVMe media errors reported by the I/O path through [`PoisonPath::report_media_error`] (a lock-free bounded
//!   queue: a reactor never blocks on it).
//!
//! Nothing here runs on the I/O path while there are no errors: the listener thread sleeps between polls and the
//! only I/O-path hook is the bounded queue push on a media error.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use nvstack_driver::pmem::mc_copy::{self, SigbusEvent, SigbusKind};
use nvstack_driver::pmem::sysfs;

use crate::action::{decide, ActionTarget};
use crate::journal::{Action, Journal, PoisonEvent, Source};
use crate::owner::{Owner, Registry};
use crate::translate::Translator;
use crate::RmapError;

/// Entries in the media-error queue (a limit in DESIGN.md).
pub const MEDIA_QUEUE_ENTRIES: usize = 1024;
/// How often the listener thread polls its sources.
pub const DEFAULT_POLL_PERIOD: Duration = Duration::from_millis(10);
/// How often watched badblocks lists are re-read.
pub const BADBLOCKS_PERIOD: Duration = Duration::from_secs(1);

/// A raw report, before translation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawReport {
    /// A virtual address of this process.
    Vaddr {
        /// Where it came from.
        source: Source,
        /// The address.
        addr: u64,
        /// Granule length in bytes.
        len: u64,
    },
    /// A physical address.
    Phys {
        /// Where it came from.
        source: Source,
        /// The address.
        addr: u64,
        /// Granule length in bytes.
        len: u64,
    },
    /// Already a device range (badblocks, NVMe media errors, explain).
    Device {
        /// Where it came from.
        source: Source,
        /// The device.
        device: String,
        /// Byte offset.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
}

struct BadblocksWatch {
    device: String,
    sysfs_rel: String,
    /// Byte offset on the device of sector 0 of the list.
    base_offset: u64,
    seen: BTreeSet<(u64, u64)>,
}

/// The poison path: translator, reverse maps, journal, action targets, and the sources' state.
pub struct PoisonPath {
    /// Address translation.
    pub translator: Arc<Translator>,
    /// Reverse maps.
    pub registry: Arc<Registry>,
    /// The journal.
    pub journal: Arc<Journal>,
    targets: RwLock<Vec<Arc<dyn ActionTarget>>>,
    media: ArrayQueue<(String, u64, u64)>,
    media_dropped: std::sync::atomic::AtomicU64,
    badblocks: Mutex<Vec<BadblocksWatch>>,
    trace_pipe: Mutex<Option<std::fs::File>>,
    last_badblocks: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for PoisonPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PoisonPath").field("registry", &self.registry).finish()
    }
}

fn source_of(kind: SigbusKind) -> Source {
    match kind {
        SigbusKind::McErrActionRequired => Source::SigbusActionRequired,
        SigbusKind::McErrActionOptional => Source::SigbusActionOptional,
        SigbusKind::AddressError => Source::SigbusAddressError,
    }
}

impl PoisonPath {
    /// A poison path with an empty registry and translator.
    pub fn new(journal: Journal) -> Arc<PoisonPath> {
        Arc::new(PoisonPath {
            translator: Arc::new(Translator::new()),
            registry: Arc::new(Registry::new()),
            journal: Arc::new(journal),
            targets: RwLock::new(Vec::new()),
            media: ArrayQueue::new(MEDIA_QUEUE_ENTRIES),
            media_dropped: std::sync::atomic::AtomicU64::new(0),
            badblocks: Mutex::new(Vec::new()),
            trace_pipe: Mutex::new(None),
            last_badblocks: Mutex::new(None),
        })
    }

    /// Register a layer that carries out actions.
    pub fn add_target(&self, t: Arc<dyn ActionTarget>) {
        if let Ok(mut v) = self.targets.write() {
            v.push(t);
        }
    }

    /// Report a media error from the I/O path. Lock-free; never blocks. Returns false (and counts it) when the
    /// queue is full.
    pub fn report_media_error(&self, device: &str, offset: u64, len: u64) -> bool {
        if self.media.push((device.to_owned(), offset, len)).is_err() {
            self.media_dropped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Watch a badblocks list (`block/pmem0/badblocks` relative to sysfs) for `device`, whose sector 0 is at
    /// `base_offset` bytes on the device. Entries present now are taken as known (journaled once, as badblocks).
    pub fn watch_badblocks(&self, device: &str, sysfs_rel: &str, base_offset: u64) {
        if let Ok(mut v) = self.badblocks.lock() {
            v.push(BadblocksWatch { device: device.to_owned(), sysfs_rel: sysfs_rel.to_owned(), base_offset, seen: BTreeSet::new() });
        }
    }

    /// Enable the tracefs events and open `trace_pipe` (root only; tracefs mounted).
    ///
    /// # Errors
    /// [`RmapError::Listener`] naming the file that could not be written or opened.
    pub fn enable_tracefs(&self, tracefs: &Path) -> Result<(), RmapError> {
        for ev in ["mce/mce_record", "ras/memory_failure_event"] {
            let p = tracefs.join("events").join(ev).join("enable");
            std::fs::write(&p, "1").map_err(|source| RmapError::Listener { step: format!("enabling {}", p.display()), source })?;
        }
        let pipe = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(tracefs.join("trace_pipe"))
            .map_err(|source| RmapError::Listener { step: "opening trace_pipe".into(), source })?;
        if let Ok(mut t) = self.trace_pipe.lock() {
            *t = Some(pipe);
        }
        Ok(())
    }

    /// Translate, resolve, decide, act, journal. Returns the journaled event.
    pub fn handle(&self, raw: RawReport) -> PoisonEvent {
        self.process(raw, true)
    }

    /// Translate and resolve only: the chain an event would have, with no action and nothing journaled.
    pub fn explain(&self, raw: RawReport) -> PoisonEvent {
        self.process(raw, false)
    }

    fn process(&self, raw: RawReport, act: bool) -> PoisonEvent {
        let (source, vaddr, phys, len) = match &raw {
            RawReport::Vaddr { source, addr, len } => (*source, Some(*addr), None, *len),
            RawReport::Phys { source, addr, len } => (*source, None, Some(*addr), *len),
            RawReport::Device { source, len, .. } => (*source, None, None, *len),
        };
        let mut failures = Vec::new();
        let translation = match &raw {
            RawReport::Vaddr { addr, .. } => self.translator.vaddr(*addr as usize),
            RawReport::Phys { addr, .. } => match self.translator.phys(*addr) {
                Ok(t) => t,
                Err(e) => {
                    failures.push(e.to_string());
                    None
                }
            },
            RawReport::Device { device, offset, .. } => Some(crate::translate::Translation {
                device: device.clone(),
                offset: *offset,
                via: "reported as a device range".into(),
            }),
        };
        let mut ev = PoisonEvent {
            id: 0,
            time_unix_ms: 0,
            source,
            vaddr,
            phys,
            len,
            translation: translation.clone(),
            owners: Vec::new(),
            rmap_failures: failures,
            action: Action::Untranslated,
            outcome: String::new(),
        };
        if let Some(t) = &translation {
            let res = self.registry.resolve(&t.device, t.offset, len.max(1));
            ev.action = decide(&res);
            ev.owners = res.pieces;
            ev.rmap_failures.extend(res.failures);
        }
        if !act {
            ev.outcome = format!("explain only; would do: {}", action_name(&ev.action));
            ev.action = Action::None;
            return ev;
        }
        ev.outcome = match (&ev.action, &translation) {
            (Action::Untranslated, _) => "no registered mapping holds the address".into(),
            (Action::NoOwnerKnown, _) => "no reverse map claims the range: nothing touched".into(),
            (a, Some(t)) => self.carry_out(a, &ev.owners, t, len.max(1)),
            (_, None) => "no translation".into(),
        };
        match self.journal.record(ev.clone()) {
            Ok(id) => ev.id = id,
            Err(e) => tracing::error!(error = %e, "poison journal append failed"),
        }
        ev
    }

    fn carry_out(&self, action: &Action, owners: &[crate::owner::OwnerPiece], t: &crate::translate::Translation, len: u64) -> String {
        let targets: Vec<Arc<dyn ActionTarget>> = self.targets.read().map(|v| v.clone()).unwrap_or_default();
        let pick = |dev: &str| targets.iter().find(|x| x.owns(dev)).cloned();
        let leaves = || owners.iter().filter(|p| !matches!(p.owner, Owner::Volume { .. }));
        let mut results = Vec::new();
        match action {
            Action::ZeroAndClear => {
                // Every leaf said Free (decide() proved it), so the whole translated range is free: zero it on the
                // device the event was translated to (outermost coordinates, whatever volumes lie between).
                let r = pick(&t.device).map(|x| x.zero_and_clear(&t.device, t.offset, len));
                results.push(fmt_result("zero", &t.device, r));
            }
            Action::DropAndRefetch | Action::DataLoss { .. } | Action::RetireSlot => {
                // Every cache page and free slot of the event, whichever decided the action: dirty data is lost
                // (IOERR), clean data dropped, free slots retired.
                for p in leaves() {
                    let (what, r) = match p.owner {
                        Owner::CachePage { dirty: true, .. } => ("mark IOERR", pick(&p.device).map(|x| x.mark_ioerr(&p.device, p.offset, p.len))),
                        Owner::CachePage { dirty: false, .. } => ("drop", pick(&p.device).map(|x| x.drop_and_refetch(&p.device, p.offset, p.len))),
                        Owner::CacheSlotFree { .. } => {
                            ("retire free slot", pick(&p.device).map(|x| x.retire_free_slots(&p.device, p.offset, p.len)))
                        }
                        _ => continue,
                    };
                    results.push(fmt_result(what, &p.device, r));
                }
            }
            Action::Degraded { volume } => {
                let r = pick(volume).map(|x| x.mark_degraded(volume));
                results.push(fmt_result("degrade", volume, r));
            }
            Action::ReportFileData => results.push("reported to the owners' file system (no data touched)".into()),
            Action::AlreadyRetired | Action::Untranslated | Action::NoOwnerKnown | Action::None => {}
        }
        if results.is_empty() {
            return "ok".into();
        }
        // One line per distinct result, counted (a hugepage event acts on hundreds of cache pages alike).
        let mut merged: Vec<(String, usize)> = Vec::new();
        for r in results {
            match merged.iter_mut().find(|(m, _)| *m == r) {
                Some((_, n)) => *n += 1,
                None => merged.push((r, 1)),
            }
        }
        merged.into_iter().map(|(r, n)| if n > 1 { format!("{r} (x{n})") } else { r }).collect::<Vec<_>>().join("; ")
    }

    /// Poll every source once; handle what arrived. Returns the number of events handled.
    pub fn poll_once(&self, sigbus_buf: &mut Vec<SigbusEvent>) -> usize {
        let mut n = 0;
        sigbus_buf.clear();
        let dropped = mc_copy::drain_sigbus_events(sigbus_buf);
        if dropped > 0 {
            tracing::error!(dropped, "SIGBUS event ring overflowed: events lost");
        }
        for e in sigbus_buf.iter() {
            let len = if e.addr_lsb >= 9 && e.addr_lsb < 40 { 1u64 << e.addr_lsb } else { 4096 };
            let base = (e.addr as u64) & !(len - 1);
            self.handle(RawReport::Vaddr { source: source_of(e.kind), addr: base, len });
            n += 1;
        }
        while let Some((device, offset, len)) = self.media.pop() {
            self.handle(RawReport::Device { source: Source::NvmeMediaError, device, offset, len });
            n += 1;
        }
        n += self.poll_tracefs();
        n += self.poll_badblocks(false);
        n
    }

    fn poll_tracefs(&self) -> usize {
        let mut text = String::new();
        if let Ok(mut g) = self.trace_pipe.lock() {
            if let Some(f) = g.as_mut() {
                let mut buf = [0u8; 8192];
                loop {
                    match f.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => text.push_str(&String::from_utf8_lossy(&buf[..k])),
                        Err(_) => break,
                    }
                }
            }
        }
        let mut n = 0;
        for line in text.lines() {
            if let Some(r) = parse_trace_line(line) {
                self.handle(r);
                n += 1;
            }
        }
        n
    }

    /// Re-read watched badblocks lists (at most once per [`BADBLOCKS_PERIOD`] unless `force`); new entries become
    /// events.
    pub fn poll_badblocks(&self, force: bool) -> usize {
        if let Ok(mut last) = self.last_badblocks.lock() {
            if !force && last.is_some_and(|t| t.elapsed() < BADBLOCKS_PERIOD) {
                return 0;
            }
            *last = Some(Instant::now());
        }
        let mut fresh = Vec::new();
        if let Ok(mut v) = self.badblocks.lock() {
            for w in v.iter_mut() {
                match sysfs::read_badblocks(&w.sysfs_rel) {
                    Ok(list) => {
                        for b in list {
                            if let Some((off, len)) = b.bytes() {
                                if w.seen.insert((off, len)) {
                                    fresh.push((w.device.clone(), w.base_offset.saturating_add(off), len));
                                }
                            }
                        }
                    }
                    Err(e) => tracing::debug!(path = %w.sysfs_rel, error = %e, "badblocks not readable"),
                }
            }
        }
        let n = fresh.len();
        for (device, offset, len) in fresh {
            self.handle(RawReport::Device { source: Source::Badblocks, device, offset, len });
        }
        n
    }

    /// Run the listener thread until the returned handle is stopped.
    ///
    /// # Errors
    /// [`RmapError::ListenerThread`] if the thread cannot start; installing the SIGBUS handler can fail too
    /// ([`RmapError::Listener`]).
    pub fn spawn(self: &Arc<Self>, period: Duration) -> Result<Listener, RmapError> {
        mc_copy::install_sigbus_handler()
            .map_err(|e| RmapError::Listener { step: "installing the SIGBUS handler".into(), source: std::io::Error::other(e.to_string()) })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (me, st) = (Arc::clone(self), Arc::clone(&stop));
        let handle = std::thread::Builder::new()
            .name("poison-listener".into())
            .spawn(move || {
                let mut buf = Vec::with_capacity(mc_copy::SIGBUS_RING_SLOTS);
                while !st.load(Ordering::Acquire) {
                    me.poll_once(&mut buf);
                    std::thread::sleep(period);
                }
                me.poll_once(&mut buf);
            })
            .map_err(|source| RmapError::ListenerThread { source })?;
        Ok(Listener { stop, handle: Some(handle) })
    }
}

fn fmt_result(what: &str, dev: &str, r: Option<Result<(), String>>) -> String {
    match r {
        Some(Ok(())) => format!("{what} {dev}: ok"),
        Some(Err(e)) => format!("{what} {dev}: failed: {e}"),
        None => format!("{what} {dev}: no layer registered to act on it"),
    }
}

/// A short name of an action, for explain output.
pub fn action_name(a: &Action) -> &'static str {
    match a {
        Action::ZeroAndClear => "zero and clear (free space)",
        Action::DropAndRefetch => "drop and refetch (clean cached data)",
        Action::RetireSlot => "retire the slot (free cache slot, no data)",
        Action::DataLoss { .. } => "mark IOERR and report data loss (dirty cached data)",
        Action::ReportFileData => "report to the file's owners (file data)",
        Action::Degraded { .. } => "mark the volume degraded (metadata)",
        Action::AlreadyRetired => "nothing (cache slot already retired by an earlier event)",
        Action::Untranslated => "nothing (address not in any registered mapping)",
        Action::NoOwnerKnown => "nothing (no reverse map claims the range)",
        Action::None => "nothing",
    }
}

/// Parse one `trace_pipe` line of `mce_record` or `memory_failure_event` into a physical report.
pub fn parse_trace_line(line: &str) -> Option<RawReport> {
    if line.contains("memory_failure_event:") {
        let rest = &line[line.find("pfn ")? + 4..];
        // "pfn 0x111205: recovery action for dax page: Recovered" (6.1); older kernels print no colon.
        let hex = rest.split_whitespace().next()?.trim_end_matches(':');
        let pfn = u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok()?;
        return Some(RawReport::Phys { source: Source::TraceMemoryFailure, addr: pfn.checked_mul(4096)?, len: 4096 });
    }
    if line.contains("mce_record:") {
        let key = if line.contains("ADDR/MISC/SYND: ") { "ADDR/MISC/SYND: " } else { "ADDR/MISC: " };
        let rest = &line[line.find(key)? + key.len()..];
        let hex = rest.split('/').next()?.trim();
        let addr = u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok()?;
        if addr == 0 {
            return None;
        }
        return Some(RawReport::Phys { source: Source::TraceMce, addr: addr & !4095, len: 4096 });
    }
    None
}

/// The running listener thread.
#[derive(Debug)]
pub struct Listener {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl Listener {
    /// Stop and join (it finishes its current poll first).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Default log file of the journal inside a data directory.
pub fn default_journal_path(data_dir: &Path) -> PathBuf {
    data_dir.join("poison.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_lines() {
        let mf = "  kworker/0:1-12 [000] .... 123.4: memory_failure_event: pfn 0x23ff00 dax page recovery: Recovered";
        assert_eq!(parse_trace_line(mf), Some(RawReport::Phys { source: Source::TraceMemoryFailure, addr: 0x23ff00 * 4096, len: 4096 }));
        let mf61 = "nvstack-122 [001] ..... 11.86: memory_failure_event: pfn 0x111205: recovery action for dax page: Recovered";
        assert_eq!(parse_trace_line(mf61), Some(RawReport::Phys { source: Source::TraceMemoryFailure, addr: 0x111205 * 4096, len: 4096 }));
        let mce = "  <idle>-0 [001] 99.1: mce_record: CPU: 1, MCGc/s: 1000c09/5, MC9: bd000000000000c0, IPID: 0000000000000000, ADDR/MISC: 0000000140201000/0000000000000086, RIP: 00:<0000000000000000>, TSC: 0";
        assert_eq!(parse_trace_line(mce), Some(RawReport::Phys { source: Source::TraceMce, addr: 0x1_4020_1000, len: 4096 }));
        assert_eq!(parse_trace_line("random line"), None);
        assert_eq!(parse_trace_line("x memory_failure_event: pfn zz"), None);
    }
}
