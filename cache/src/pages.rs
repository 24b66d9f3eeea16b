//! Cache pages: 4 KiB slots carved from the DMA arena, an index from device page to slot, and CLOCK replacement.
//!
//! - One [`DmaRegion`] holds every slot (carved once). A slot's bytes are touched only by raw copies, or by the
//!   backing device while an I/O that names the slot is in flight (the state tree's LOCKED bit guards that).
//! - The index is an open-addressing hash table (linear probing, backward-shift deletion) reserved at start: twice
//!   as many buckets as slots, so probes stay short and nothing allocates.
//! - CLOCK: a reference bit per slot, set on every hit; the hand clears bits until it finds a slot the caller's
//!   predicate says may go (clean, unlocked), within two sweeps.
//! - Pins: a count per slot of read loans to other reactors (see `crate::loans`), kept by the owning engine alone.
//!   A pinned slot is never evicted, and the engine keeps writes and invalidations off a pinned page until the
//!   loan ends.

use std::ptr::NonNull;
use std::sync::Arc;

use nvstack_driver::dma::{Arena, DmaRegion};

use crate::CacheError;

/// Bytes per cache page.
pub const PAGE_BYTES: u64 = 4096;
const EMPTY: u64 = u64::MAX;
/// A slot taken out of service (its memory was poisoned): never handed out again.
const RETIRED: u64 = u64::MAX - 1;

/// The page store of one cache channel.
#[derive(Debug)]
pub struct Pages {
    region: DmaRegion,
    /// Device page number cached by each slot (EMPTY when free).
    dev_page: Vec<u64>,
    referenced: Vec<bool>,
    free: Vec<u32>,
    /// Buckets: (device page, slot); device page EMPTY when the bucket is free.
    buckets: Vec<(u64, u32)>,
    mask: usize,
    hand: usize,
    /// Read loans per slot (see `crate::loans`).
    pins: Vec<u32>,
}

#[inline]
fn hash(p: u64) -> usize {
    (p.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 17) as usize
}

impl Pages {
    /// Carve `count` pages from `arena`.
    ///
    /// # Errors
    /// [`CacheError::Arena`] when the arena is too small.
    pub fn new(arena: &Arc<Arena>, count: u32) -> Result<Pages, CacheError> {
        if count == 0 {
            return Err(CacheError::Config { what: "cache size", reason: "must hold at least one 4 KiB page" });
        }
        let bytes = u64::from(count) * PAGE_BYTES;
        let region = arena
            .carve(bytes, PAGE_BYTES, "cache pages")
            .map_err(|source| CacheError::Arena { bytes, source: Box::new(source) })?;
        let nb = (count as usize * 2).next_power_of_two();
        let mut free = Vec::with_capacity(count as usize);
        free.extend((0..count).rev());
        Ok(Pages {
            region,
            dev_page: vec![EMPTY; count as usize],
            referenced: vec![false; count as usize],
            free,
            buckets: vec![(EMPTY, 0); nb],
            mask: nb - 1,
            hand: 0,
            pins: vec![0; count as usize],
        })
    }

    /// Number of slots.
    pub fn count(&self) -> u32 {
        self.dev_page.len() as u32
    }
    /// Slots not holding any page.
    pub fn free_count(&self) -> u32 {
        self.free.len() as u32
    }

    /// The slot caching device page `p`, if any.
    #[inline]
    pub fn lookup(&self, p: u64) -> Option<u32> {
        let mut i = hash(p) & self.mask;
        loop {
            let (k, v) = self.buckets[i];
            if k == p {
                return Some(v);
            }
            if k == EMPTY {
                return None;
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Slot `s` is lent to a reader on another thread.
    #[inline]
    pub fn pin(&mut self, s: u32) {
        if let Some(p) = self.pins.get_mut(s as usize) {
            *p += 1;
        }
    }

    /// A loan of slot `s` ended.
    #[inline]
    pub fn unpin(&mut self, s: u32) {
        if let Some(p) = self.pins.get_mut(s as usize) {
            *p = p.saturating_sub(1);
        }
    }

    /// Whether slot `s` is lent (as far as the owner has heard: a loan ends for it when it reclaims).
    #[inline]
    pub fn pinned(&self, s: u32) -> bool {
        self.pins.get(s as usize).is_some_and(|&p| p != 0)
    }

    /// Mark slot `s` recently used.
    #[inline]
    pub fn touch(&mut self, s: u32) {
        self.referenced[s as usize] = true;
    }

    fn index_insert(&mut self, p: u64, s: u32) {
        let mut i = hash(p) & self.mask;
        while self.buckets[i].0 != EMPTY {
            i = (i + 1) & self.mask;
        }
        self.buckets[i] = (p, s);
    }

    fn index_remove(&mut self, p: u64) {
        let mut i = hash(p) & self.mask;
        loop {
            let k = self.buckets[i].0;
            if k == EMPTY {
                return;
            }
            if k == p {
                break;
            }
            i = (i + 1) & self.mask;
        }
        // Backward-shift deletion: pull later entries of the probe run into the hole.
        let mut hole = i;
        let mut j = (i + 1) & self.mask;
        loop {
            let (k, v) = self.buckets[j];
            if k == EMPTY {
                break;
            }
            let home = hash(k) & self.mask;
            // Move (k, v) into the hole when its home is not cyclically in (hole, j].
            let dist_j = j.wrapping_sub(home) & self.mask;
            let dist_hole = hole.wrapping_sub(home) & self.mask;
            if dist_hole < dist_j {
                self.buckets[hole] = (k, v);
                hole = j;
            }
            j = (j + 1) & self.mask;
        }
        self.buckets[hole] = (EMPTY, 0);
    }

    /// A slot for device page `p`: the cached one, a free one, or one evicted by CLOCK among those `may_evict`
    /// accepts (given the device page it holds). The evicted page's device number is returned so the caller can
    /// update its state. `None` when nothing can be evicted now. A lent (pinned) slot is never evicted.
    pub fn get_or_alloc(&mut self, p: u64, mut may_evict: impl FnMut(u64) -> bool) -> Option<(u32, Option<u64>)> {
        if let Some(s) = self.lookup(p) {
            self.referenced[s as usize] = true;
            return Some((s, None));
        }
        let (slot, evicted) = if let Some(s) = self.free.pop() {
            (s, None)
        } else {
            let n = self.dev_page.len();
            let mut found = None;
            for _ in 0..2 * n {
                let h = self.hand;
                self.hand = (self.hand + 1) % n;
                if self.dev_page[h] == RETIRED {
                    continue;
                }
                if self.referenced[h] {
                    self.referenced[h] = false;
                    continue;
                }
                if self.pinned(h as u32) {
                    continue;
                }
                if may_evict(self.dev_page[h]) {
                    found = Some(h as u32);
                    break;
                }
            }
            let s = found?;
            let old = self.dev_page[s as usize];
            self.index_remove(old);
            (s, Some(old))
        };
        self.dev_page[slot as usize] = p;
        self.referenced[slot as usize] = true;
        self.index_insert(p, slot);
        Some((slot, evicted))
    }

    /// Take the slot holding device page `p` out of service for good (its memory is poisoned): the page is
    /// forgotten and the slot is never handed out again. Returns the slot, if `p` was cached.
    pub fn retire_page(&mut self, p: u64) -> Option<u32> {
        let s = self.lookup(p)?;
        self.index_remove(p);
        self.dev_page[s as usize] = RETIRED;
        self.referenced[s as usize] = false;
        Some(s)
    }

    /// Take slot `s` out of service for good if it is free (its memory is poisoned): it is never handed out.
    /// True when it was free; a slot holding a page goes through [`Pages::retire_page`], a retired one stays so.
    pub fn retire_free_slot(&mut self, s: u32) -> bool {
        let Some(i) = self.free.iter().position(|&f| f == s) else { return false };
        self.free.swap_remove(i);
        self.dev_page[s as usize] = RETIRED;
        self.referenced[s as usize] = false;
        true
    }

    /// Whether slot `s` is free (holds no page and is not retired).
    pub fn is_free(&self, s: u32) -> bool {
        self.dev_page.get(s as usize).is_some_and(|&p| p == EMPTY)
    }

    /// Let the slots' memory go back to the arena when these pages are dropped, for a later cache to use: called by
    /// the engine once no device I/O into them is in flight. Not when a slot was retired: poisoned memory is never
    /// handed out again (the whole region then stays out of use).
    pub fn give_back_on_drop(&mut self) {
        let retired = self.retired_count();
        self.region.reuse_on_drop(retired == 0);
        if retired > 0 {
            tracing::info!(retired, "cache pages: poisoned slots, so the memory is not reused");
        }
    }

    /// Whether slot `s` is out of service (its memory was poisoned).
    pub fn is_retired(&self, s: u32) -> bool {
        self.dev_page.get(s as usize).is_some_and(|&p| p == RETIRED)
    }

    /// Slots taken out of service.
    pub fn retired_count(&self) -> u32 {
        self.dev_page.iter().filter(|&&p| p == RETIRED).count() as u32
    }

    /// Host address of slot 0 and the bytes of all slots (for channels that copy out of lent pages).
    pub fn region(&self) -> (NonNull<u8>, u64) {
        // The region is never empty (at least one slot), so its address is not null.
        (NonNull::new(self.region.as_ptr()).unwrap_or(NonNull::dangling()), self.region.len())
    }

    /// The arena byte range of all slots.
    pub fn arena_range(&self, arena: &Arena) -> Option<(u64, u64)> {
        let base = arena.offset_of(self.region.as_ptr() as usize)?;
        Some((base, base.checked_add(self.region.len())?))
    }

    /// Forget device page `p` (its data is no longer wanted).
    pub fn drop_page(&mut self, p: u64) {
        if let Some(s) = self.lookup(p) {
            self.index_remove(p);
            self.dev_page[s as usize] = EMPTY;
            self.referenced[s as usize] = false;
            self.free.push(s);
        }
    }

    /// Host address and IOVA of byte `off` of slot `s`, valid for `len` bytes within the slot.
    #[inline]
    pub fn ptr(&self, s: u32, off: u64, len: u64) -> Option<(NonNull<u8>, u64)> {
        if off.checked_add(len)? > PAGE_BYTES {
            return None;
        }
        self.region.slice(u64::from(s) * PAGE_BYTES + off, len)
    }

    /// The device page cached by slot `s`.
    pub fn dev_page_of(&self, s: u32) -> Option<u64> {
        self.dev_page.get(s as usize).copied().filter(|&p| p != EMPTY && p != RETIRED)
    }

    /// The slot holding arena byte `arena_offset`, if it is one of these pages: `(slot, offset in page)`.
    pub fn slot_of_arena_offset(&self, arena: &Arena, arena_offset: u64) -> Option<(u32, u64)> {
        let base = arena.offset_of(self.region.as_ptr() as usize)?;
        let rel = arena_offset.checked_sub(base)?;
        if rel >= self.region.len() {
            return None;
        }
        Some(((rel / PAGE_BYTES) as u32, rel % PAGE_BYTES))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvstack_driver::dma::ArenaConfig;

    #[test]
    fn index_survives_many_inserts_and_removes() {
        let arena = Arena::new(ArenaConfig { size_bytes: 4 << 20, ..Default::default() }).unwrap();
        let mut pg = Pages::new(&arena, 64).unwrap();
        let mut model = std::collections::HashMap::new();
        let mut x = 12345u64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let p = x % 200;
            if x.is_multiple_of(3) {
                pg.drop_page(p);
                model.remove(&p);
            } else if let Some((s, ev)) = pg.get_or_alloc(p, |_| true) {
                if let Some(old) = ev {
                    model.remove(&old);
                }
                model.insert(p, s);
            }
            for (&p, &s) in &model {
                assert_eq!(pg.lookup(p), Some(s));
            }
            assert_eq!(model.len() + pg.free_count() as usize, 64);
        }
    }
}
