//! The extent cache's reverse map and actions: poisoned arena memory → the cache page there → the device bytes it
//! caches (and from there, through the registry, the export or file system that owns them).
//!
//! [`CacheMaps`] answers for the arena device (the name the translator gives arena memory, "arena" in the
//! appliance). For each 4 KiB arena page asked about, it asks each registered cache whether the page is one of its
//! slots and what the slot caches, through the cache's control path (a message to the owning reactor; nothing on
//! the I/O path). A slot holding data answers with a [`Owner::CachePage`] (dirty or clean, and who first dirtied it)
//! and a [`Owner::Volume`] piece naming the cache bdev at the cached offset, which the registry follows to the
//! exports and file systems above.
//!
//! As an [`ActionTarget`] it carries out every cache action the same way, page by page: a page holding data goes
//! through [`CacheBdev::poison_arena_page`] (clean data is dropped, and the next read refetches it from the backing
//! device; dirty data is lost: its bytes become IOERR and reads of them fail until a full overwrite), a free slot
//! through [`CacheBdev::retire_free_arena_page`]. Either way the slot is retired and never reused. (Page by page at
//! action time, not by what the owners said: a slot filled or emptied in between is still dealt with.)
//!
//! A free slot (holding nothing) answers with [`Owner::CacheSlotFree`]: its memory is not free space to zero but
//! a page the cache would hand out later, so the action retires it (never handed out again; no data lost). A slot
//! given to a page whose fill has not landed, or one retired already, answers nothing.

use std::sync::{Arc, RwLock, Weak};

use nvstack_cache::{Bits, CacheBdev};

use crate::action::ActionTarget;
use crate::listener::PoisonPath;
use crate::owner::{Owner, OwnerPiece, Rmap};
use crate::RmapError;

const PAGE: u64 = 4096;

/// The device name arena memory is known by in the poison path.
pub const ARENA_DEVICE: &str = "arena";

/// Most pages one query walks (a 1 GiB hugepage event would be 262144 pages: the rest is left unanswered).
pub const MAX_PAGES_PER_QUERY: u64 = 4096;

/// The caches whose pages live in one arena, as a reverse map and action target for that arena's device.
pub struct CacheMaps {
    device: String,
    caches: RwLock<Vec<(String, Weak<CacheBdev>)>>,
}

impl std::fmt::Debug for CacheMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.caches.read().map(|v| v.iter().map(|(n, _)| n.clone()).collect()).unwrap_or_default();
        f.debug_struct("CacheMaps").field("device", &self.device).field("caches", &names).finish()
    }
}

impl CacheMaps {
    /// Maps for the arena known to the translator as `device`.
    pub fn new(device: &str) -> Arc<CacheMaps> {
        Arc::new(CacheMaps { device: device.to_string(), caches: RwLock::new(Vec::new()) })
    }

    /// Hook the caches of `arena` into `path`: the arena goes into the translator as [`ARENA_DEVICE`], and the
    /// returned (still empty) map is registered as that device's reverse map and action target. Add caches to it.
    pub fn attach(path: &PoisonPath, arena: &nvstack_driver::dma::Arena) -> Arc<CacheMaps> {
        path.translator.add_arena(ARENA_DEVICE, arena);
        let maps = CacheMaps::new(ARENA_DEVICE);
        path.registry.register(Arc::clone(&maps) as Arc<dyn Rmap>);
        path.add_target(Arc::clone(&maps) as Arc<dyn ActionTarget>);
        maps
    }

    /// Answer for `cache` (named `name`) too. Holds it weakly: a deleted cache drops out by itself.
    pub fn add(&self, name: &str, cache: &Arc<CacheBdev>) {
        if let Ok(mut v) = self.caches.write() {
            v.retain(|(n, _)| n != name);
            v.push((name.to_string(), Arc::downgrade(cache)));
        }
    }

    /// Stop answering for the cache named `name`.
    pub fn remove(&self, name: &str) {
        if let Ok(mut v) = self.caches.write() {
            v.retain(|(n, _)| n != name);
        }
    }

    /// Call `f(arena page offset, cache name, cache)` for each 4 KiB page of `[offset, offset+len)` (at most
    /// [`MAX_PAGES_PER_QUERY`]) that lies in a live cache's slots; stops at the first error.
    fn for_each_page<E>(&self, offset: u64, len: u64, mut f: impl FnMut(u64, &str, &CacheBdev) -> Result<(), E>) -> Result<(), E> {
        let caches: Vec<(String, Arc<CacheBdev>)> =
            self.caches.read().map(|v| v.iter().filter_map(|(n, w)| w.upgrade().map(|c| (n.clone(), c))).collect()).unwrap_or_default();
        let first = offset / PAGE;
        let last = offset.saturating_add(len.max(1)).div_ceil(PAGE).min(first.saturating_add(MAX_PAGES_PER_QUERY));
        for page in (first..last).map(|p| p * PAGE) {
            for (name, cache) in &caches {
                if cache.owns_arena_offset(page).is_some() {
                    f(page, name, cache)?;
                }
            }
        }
        Ok(())
    }

    /// Poison every cache page of `[offset, offset+len)` and retire every free slot there: what
    /// [`ActionTarget::drop_and_refetch`], [`ActionTarget::mark_ioerr`] and [`ActionTarget::retire_free_slots`] all do.
    fn poison(&self, offset: u64, len: u64) -> Result<(), String> {
        let mut done = 0u64;
        let mut retired = 0u64;
        let mut errors = Vec::new();
        let _ = self.for_each_page(offset, len, |page, name, cache| -> Result<(), ()> {
            match cache.poison_arena_page(page) {
                Ok(Some(p)) => {
                    done += 1;
                    tracing::warn!(
                        cache = name,
                        arena_offset = page,
                        device_start = p.start,
                        dirty_bytes = p.dirty_bytes,
                        first_dirtier = ?p.first_dirtier.map(|t| t.client),
                        retired = p.slot_retired,
                        "cache page poisoned: {}",
                        if p.dirty_bytes > 0 { "dirty data lost, range marked IOERR" } else { "clean data dropped, refetched on the next read" }
                    );
                }
                // No data there (now): a free slot is retired. (The slot may have changed since the owners were
                // asked: a page evicted since is retired here, one filled since was poisoned above.)
                Ok(None) => match cache.retire_free_arena_page(page) {
                    Ok(true) => retired += 1,
                    Ok(false) => {}
                    Err(e) => errors.push(format!("{name}: {e}")),
                },
                Err(e) => errors.push(format!("{name}: {e}")),
            }
            Ok(())
        });
        if errors.is_empty() {
            tracing::info!(pages = done, free_slots_retired = retired, "cache poison action done");
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }
}

impl Rmap for CacheMaps {
    fn name(&self) -> &str {
        "cache"
    }
    fn device(&self) -> &str {
        &self.device
    }
    fn owners(&self, offset: u64, len: u64, out: &mut Vec<OwnerPiece>) -> Result<(), RmapError> {
        self.for_each_page(offset, len, |page, name, cache| {
            let ask = |step: &'static str, source: nvstack_cache::CacheError| RmapError::CacheQuery {
                cache: name.to_string(),
                arena_offset: page,
                step,
                source,
            };
            let piece = |owner| OwnerPiece { device: self.device.clone(), offset: page, len: PAGE, owner, rmap: "cache".into(), depth: 0 };
            let Some((start, end)) = cache.device_range_of(page).map_err(|e| ask("device range", e))? else {
                if cache.slot_free_at(page).map_err(|e| ask("slot", e))? {
                    out.push(piece(Owner::CacheSlotFree { page_index: page / PAGE }));
                } else if cache.slot_retired_at(page).map_err(|e| ask("slot", e))? {
                    out.push(piece(Owner::CacheSlotRetired { page_index: page / PAGE }));
                }
                return Ok(());
            };
            let pieces = cache.query_range(start, end).map_err(|e| ask("state", e))?;
            if pieces.iter().all(|p| !p.state.bits.contains(Bits::UPTODATE) && !p.state.bits.contains(Bits::DIRTY)) {
                return Ok(()); // A slot given to a page whose fill has not landed: nothing cached yet.
            }
            let dirty = pieces.iter().find(|p| p.state.bits.contains(Bits::DIRTY));
            out.push(piece(Owner::CachePage {
                page_index: page / PAGE,
                dirty: dirty.is_some(),
                first_dirtier: dirty.map(|p| u32::from(p.state.tag.client)),
                dirtied_at_ms: dirty.map(|p| u64::from(p.state.tag.time)),
            }));
            out.push(piece(Owner::Volume { name: name.to_string(), offset: start }));
            Ok(())
        })
    }
}

impl ActionTarget for CacheMaps {
    fn owns(&self, device: &str) -> bool {
        device == self.device
    }
    fn drop_and_refetch(&self, _device: &str, offset: u64, len: u64) -> Result<(), String> {
        self.poison(offset, len)
    }
    fn mark_ioerr(&self, _device: &str, offset: u64, len: u64) -> Result<(), String> {
        self.poison(offset, len)
    }
    fn retire_free_slots(&self, _device: &str, offset: u64, len: u64) -> Result<(), String> {
        self.poison(offset, len)
    }
}
