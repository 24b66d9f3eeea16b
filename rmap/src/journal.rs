//! The poison journal: every event with its whole chain (source, address, device offset, owners, action, time),
//! bounded in memory and appended to a log file as JSON lines.

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::owner::OwnerPiece;
use crate::translate::Translation;
use crate::RmapError;

/// Where an event came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// SIGBUS BUS_MCEERR_AR: poison consumed by this process.
    SigbusActionRequired,
    /// SIGBUS BUS_MCEERR_AO: poison found in a page this process maps (early kill).
    SigbusActionOptional,
    /// SIGBUS BUS_ADRERR inside a guarded copy (a mapping that lost its backing).
    SigbusAddressError,
    /// tracefs mce:mce_record.
    TraceMce,
    /// tracefs ras:memory_failure_event.
    TraceMemoryFailure,
    /// A new entry in a pmem badblocks list.
    Badblocks,
    /// An NVMe media-error completion or error-log entry.
    NvmeMediaError,
    /// `nvstack poison explain`: a question, nothing injected, no action taken.
    Explain,
    /// A test aid (`serve`'s `nvstack_poison_inject` RPC): a synthetic device-range report run through the whole
    /// path, acting and journaling as a real one would.
    Injected,
}

/// What the poison path did about an event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Free space: zeroed and the error cleared.
    ZeroAndClear,
    /// Clean cached data: dropped, to be re-read from the backing device.
    DropAndRefetch,
    /// Free cache slots only: taken out of service (never handed out); no data lost.
    RetireSlot,
    /// Dirty cached data lost: the range is marked IOERR and the loss reported.
    DataLoss {
        /// The client that first dirtied the lost data, when known.
        first_dirtier: Option<u32>,
    },
    /// File data on pmem: reported with its owners (the file system decides).
    ReportFileData,
    /// File-system metadata: the volume is marked degraded.
    Degraded {
        /// The volume.
        volume: String,
    },
    /// Cache slots already out of service only (poisoned before): nothing to do, nothing lost.
    AlreadyRetired,
    /// The address could not be turned into a device offset.
    Untranslated,
    /// No reverse map knows the range: nothing is touched (unknown is not free).
    NoOwnerKnown,
    /// Explain only: no action.
    None,
}

/// One event and its whole chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoisonEvent {
    /// Sequence number (from 1).
    pub id: u64,
    /// Wall-clock time, ms since the Unix epoch.
    pub time_unix_ms: u64,
    /// Where it came from.
    pub source: Source,
    /// Virtual address, when the source gave one.
    pub vaddr: Option<u64>,
    /// Physical address, when the source gave one.
    pub phys: Option<u64>,
    /// Bytes in the poisoned granule (4096, 2 MiB, a badblocks range...).
    pub len: u64,
    /// The translation to a device offset, when it succeeded.
    pub translation: Option<Translation>,
    /// Owners found (outermost first).
    pub owners: Vec<OwnerPiece>,
    /// Reverse maps that failed while answering.
    pub rmap_failures: Vec<String>,
    /// What was done.
    pub action: Action,
    /// How the action went ("ok", or the error).
    pub outcome: String,
}

/// Events kept in memory by default (a limit in DESIGN.md).
pub const DEFAULT_JOURNAL_EVENTS: usize = 4096;

/// The journal.
#[derive(Debug)]
pub struct Journal {
    ring: Mutex<VecDeque<PoisonEvent>>,
    capacity: usize,
    file: Option<(PathBuf, Mutex<std::fs::File>)>,
    next_id: AtomicU64,
}

impl Journal {
    /// A journal keeping `capacity` events in memory and, if `log` is given, appending each to that file.
    ///
    /// # Errors
    /// [`RmapError::Journal`] if the log file cannot be opened for appending.
    pub fn new(capacity: usize, log: Option<&Path>) -> Result<Journal, RmapError> {
        let file = match log {
            Some(p) => {
                let f = std::fs::OpenOptions::new().create(true).append(true).open(p).map_err(|source| RmapError::Journal {
                    path: p.display().to_string(),
                    step: "opening for append",
                    source,
                })?;
                Some((p.to_path_buf(), Mutex::new(f)))
            }
            None => None,
        };
        let start = match log {
            Some(p) if p.exists() => read_log(p).map(|v| v.last().map(|e| e.id).unwrap_or(0)).unwrap_or(0),
            _ => 0,
        };
        Ok(Journal { ring: Mutex::new(VecDeque::with_capacity(capacity.max(1))), capacity: capacity.max(1), file, next_id: AtomicU64::new(start + 1) })
    }

    /// Record an event (its id and time are set here). Returns the id.
    ///
    /// # Errors
    /// [`RmapError::Journal`] when appending to the log file fails (the event is still kept in memory).
    pub fn record(&self, mut ev: PoisonEvent) -> Result<u64, RmapError> {
        ev.id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if ev.time_unix_ms == 0 {
            ev.time_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
        }
        let id = ev.id;
        tracing::warn!(id, source = ?ev.source, device = ?ev.translation.as_ref().map(|t| &t.device),
            offset = ?ev.translation.as_ref().map(|t| t.offset), owners = ev.owners.len(), action = ?ev.action, "poison event");
        let line = serde_json::to_string(&ev).unwrap_or_default();
        if let Ok(mut r) = self.ring.lock() {
            if r.len() == self.capacity {
                r.pop_front();
            }
            r.push_back(ev);
        }
        if let Some((path, f)) = &self.file {
            let mut f = f.lock().map_err(|_| RmapError::Journal {
                path: path.display().to_string(),
                step: "locking",
                source: std::io::Error::other("journal file lock poisoned"),
            })?;
            writeln!(f, "{line}")
                .and_then(|()| f.flush())
                .map_err(|source| RmapError::Journal { path: path.display().to_string(), step: "appending", source })?;
        }
        Ok(id)
    }

    /// The events in memory, oldest first.
    pub fn list(&self) -> Vec<PoisonEvent> {
        self.ring.lock().map(|r| r.iter().cloned().collect()).unwrap_or_default()
    }
}

/// Read a journal log file.
///
/// # Errors
/// [`RmapError::Journal`] if it cannot be read, [`RmapError::JournalParse`] naming the first bad line.
pub fn read_log(path: &Path) -> Result<Vec<PoisonEvent>, RmapError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| RmapError::Journal { path: path.display().to_string(), step: "reading", source })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let ev = serde_json::from_str(line)
            .map_err(|source| RmapError::JournalParse { path: path.display().to_string(), line: i + 1, source })?;
        out.push(ev);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev() -> PoisonEvent {
        PoisonEvent {
            id: 0,
            time_unix_ms: 0,
            source: Source::Explain,
            vaddr: Some(0x1000),
            phys: None,
            len: 4096,
            translation: None,
            owners: vec![],
            rmap_failures: vec![],
            action: Action::DataLoss { first_dirtier: Some(7) },
            outcome: "ok".into(),
        }
    }

    #[test]
    fn bounded_and_persisted() {
        let dir = std::env::temp_dir().join(format!("nvstack-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("poison.log");
        let j = Journal::new(2, Some(&log)).unwrap();
        for _ in 0..3 {
            j.record(ev()).unwrap();
        }
        let mem = j.list();
        assert_eq!(mem.iter().map(|e| e.id).collect::<Vec<_>>(), vec![2, 3]);
        let disk = read_log(&log).unwrap();
        assert_eq!(disk.len(), 3);
        assert_eq!(disk[2].action, Action::DataLoss { first_dirtier: Some(7) });
        // A reopened journal continues the numbering.
        let j2 = Journal::new(2, Some(&log)).unwrap();
        assert_eq!(j2.record(ev()).unwrap(), 4);
        std::fs::write(&log, "not json\n").unwrap();
        assert!(matches!(read_log(&log), Err(RmapError::JournalParse { line: 1, .. })));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
