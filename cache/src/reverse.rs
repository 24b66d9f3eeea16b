//! Reverse queries and actions for the poison path, from any thread.
//!
//! Each call travels to the shard that owns the bytes (or the arena page) as a control message, runs there with the
//! shard's engine, and comes back with a deadline ([`crate::striped::CONTROL_TIMEOUT`]). Nothing here is on the I/O
//! path: with no errors, none of it runs.

use crate::bdev::{CacheBdev, CachedPiece, PoisonedPage};
use crate::pages::PAGE_BYTES;
use crate::CacheError;

impl CacheBdev {
    /// Which cache pages hold device bytes `[start, end)`: each cached piece with its state bits, first-dirtier
    /// tag, page slot and arena offset.
    ///
    /// # Errors
    /// [`CacheError::BadRange`] for an empty or reversed range; [`CacheError::Control`] when an owning shard does
    /// not answer.
    pub fn query_range(&self, start: u64, end: u64) -> Result<Vec<CachedPiece>, CacheError> {
        self.per_owner(start, end, |engine, a, b| {
            let mut v = Vec::new();
            engine.query_range(a, b, &mut v);
            Ok(v)
        })
    }

    /// Run `f(engine, a, b)` on the owning shard of each stripe piece `[a, b)` of `[start, end)`, in order, and
    /// gather the answers.
    fn per_owner<T: Send + 'static>(
        &self,
        start: u64,
        end: u64,
        f: fn(&mut crate::CacheChannel, u64, u64) -> Result<Vec<T>, CacheError>,
    ) -> Result<Vec<T>, CacheError> {
        if end <= start {
            return Err(CacheError::BadRange { start, end });
        }
        let mut parts = Vec::new();
        self.shared().stripes().split(start, end, |p| parts.push(p));
        let mut out = Vec::new();
        for p in parts {
            let (a, b) = (p.start, p.end);
            out.append(&mut self.shared().call(p.owner, move |engine| f(engine, a, b))??);
        }
        Ok(out)
    }

    /// Whether arena byte `arena_offset` lies in this cache's pages, and if so which shard owns them.
    pub fn owns_arena_offset(&self, arena_offset: u64) -> Option<u32> {
        self.shared().shard_of_arena_offset(arena_offset)
    }

    /// The device bytes cached by the page holding arena byte `arena_offset` (None: not one of our pages, or the
    /// page holds nothing now).
    ///
    /// # Errors
    /// [`CacheError::Control`] when the owning shard does not answer.
    pub fn device_range_of(&self, arena_offset: u64) -> Result<Option<(u64, u64)>, CacheError> {
        let Some(shard) = self.owns_arena_offset(arena_offset) else { return Ok(None) };
        self.shared().call(shard, move |engine| engine.device_range_of(arena_offset))
    }

    /// The poison action for arena memory under the cache: the page holding arena byte `arena_offset` is
    /// poisoned. Clean data is dropped (the next read refetches it from the backing device); dirty data is lost
    /// and its bytes become IOERR. The slot is never used again. None when the page held no device data.
    ///
    /// # Errors
    /// [`CacheError::Control`] when the owning shard does not answer; [`CacheError::TreeFull`] from the engine.
    pub fn poison_arena_page(&self, arena_offset: u64) -> Result<Option<PoisonedPage>, CacheError> {
        let Some(shard) = self.owns_arena_offset(arena_offset) else { return Ok(None) };
        self.shared().call(shard, move |engine| {
            let Some((dev_start, _)) = engine.device_range_of(arena_offset) else { return Ok(None) };
            engine.poison_page(dev_start / PAGE_BYTES).map(Some)
        })?
    }

    /// Whether the page holding arena byte `arena_offset` is a free slot of this cache (caches nothing now).
    ///
    /// # Errors
    /// [`CacheError::Control`] when the owning shard does not answer.
    pub fn slot_free_at(&self, arena_offset: u64) -> Result<bool, CacheError> {
        let Some(shard) = self.owns_arena_offset(arena_offset) else { return Ok(false) };
        self.shared().call(shard, move |engine| engine.slot_free_at(arena_offset))
    }

    /// Whether the page holding arena byte `arena_offset` is a slot of this cache taken out of service by an earlier
    /// poison event (it holds nothing and is never handed out).
    ///
    /// # Errors
    /// [`CacheError::Control`] when the owning shard does not answer.
    pub fn slot_retired_at(&self, arena_offset: u64) -> Result<bool, CacheError> {
        let Some(shard) = self.owns_arena_offset(arena_offset) else { return Ok(false) };
        self.shared().call(shard, move |engine| engine.slot_retired_at(arena_offset))
    }

    /// The poison action for a free slot: the page holding arena byte `arena_offset` is never handed out again.
    /// True when it was a free slot of this cache (false: not ours, holding data, or retired already).
    ///
    /// # Errors
    /// [`CacheError::Control`] when the owning shard does not answer.
    pub fn retire_free_arena_page(&self, arena_offset: u64) -> Result<bool, CacheError> {
        let Some(shard) = self.owns_arena_offset(arena_offset) else { return Ok(false) };
        self.shared().call(shard, move |engine| engine.retire_free_slot_at(arena_offset))
    }

    /// The poison action by device range: every cached page overlapping `[start, end)` is treated as
    /// [`CacheBdev::poison_arena_page`] treats one (used when the poison is known by device offset).
    ///
    /// # Errors
    /// As [`CacheBdev::query_range`].
    pub fn poison_device_range(&self, start: u64, end: u64) -> Result<Vec<PoisonedPage>, CacheError> {
        self.per_owner(start, end, |engine, a, b| {
            let mut v = Vec::new();
            for page in a / PAGE_BYTES..b.div_ceil(PAGE_BYTES) {
                if engine.holds_page(page) {
                    v.push(engine.poison_page(page)?);
                }
            }
            Ok(v)
        })
    }
}
