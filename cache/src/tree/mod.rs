//! State trees: byte ranges of a device mapped to state bits and a small tag, after btrfs's extent-io tree.
//!
//! A [`StateTree`] keeps a sorted set of non-overlapping ranges `[start, end)`, each with [`Bits`] and a [`Tag`].
//! Bytes in no range have no bits. Operations split ranges where a change begins or ends inside one, and merge
//! neighbours that touch and carry the same bits and tag, so the tree always holds the fewest ranges that describe
//! the state.
//!
//! - One tree per reactor: it is `Send` but deliberately not shared; nothing inside takes a lock.
//! - Nodes come from a pool sized at creation ([`TreeConfig`]); an operation that would need more nodes than are free
//!   fails with [`CacheError::TreeFull`] *before changing anything*, never panics and never allocates. Waiters come
//!   from a second fixed pool.
//! - Locking is exclusive and never sleeps: [`StateTree::lock`] either grants at once or queues the caller's token;
//!   [`StateTree::unlock`] hands back the tokens whose ranges it could grant, in FIFO order (see [`lock`]).
//! - The tag: setting DIRTY on bytes that were not dirty stamps them with the given tag (first dirtier, time);
//!   bytes already dirty keep theirs; clearing DIRTY clears the tag.
//!
//! Storage is a two-level sorted array of fixed blocks (see `blocks.rs` for why not a binary tree). Memory per
//! tracked range: a slot is 23 bytes ([`SLOT_BYTES`]); the pool reserves 1.5 slots per configured range plus block
//! headers ([`POOL_BYTES_PER_RANGE`], 36 bytes with 64-entry blocks), asserted `<= 48` at compile time. When splits
//! have used every block, the tree compacts itself (an O(n) repack into full blocks), so `max_ranges` always fit. btrfs's `struct extent_state` on x86_64 is 72 bytes: `start`, `end` (16), `rb_node` (24), `wait_queue_head_t` (spinlock 4 + pad 4 + list 16 =
//! 24), `refcount_t` (4), `u32 state` (4); 88 with CONFIG_BTRFS_DEBUG's leak list; plus slab overhead.

mod blocks;
pub mod lock;
mod pool;

use crate::CacheError;
use blocks::{Blocks, Entry, Pos, CAP};
pub use blocks::{POOL_BYTES_PER_RANGE, SLOT_BYTES};

/// The limit the issue sets on memory per tracked range; the pool's reservation per configured range stays below.
pub const MAX_BYTES_PER_RANGE: usize = 48;
const _: () = assert!(POOL_BYTES_PER_RANGE <= MAX_BYTES_PER_RANGE);

/// State bits of a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Bits(pub u8);

impl Bits {
    /// No bits.
    pub const NONE: Bits = Bits(0);
    /// The cache page holds the device's current data.
    pub const UPTODATE: Bits = Bits(1 << 0);
    /// The cache page holds data newer than the device.
    pub const DIRTY: Bits = Bits(1 << 1);
    /// Locked exclusively (I/O in progress, direct I/O); see [`StateTree::lock`].
    pub const LOCKED: Bits = Bits(1 << 2);
    /// Being written back.
    pub const WRITEBACK: Bits = Bits(1 << 3);
    /// A read from the device failed here.
    pub const IOERR: Bits = Bits(1 << 4);
    /// The memory holding this range was reported poisoned.
    pub const POISONED: Bits = Bits(1 << 5);
    /// Every defined bit.
    pub const ALL: Bits = Bits(0x3f);
    /// Number of defined bits.
    pub const COUNT: usize = 6;

    /// Union.
    #[inline]
    #[must_use]
    pub const fn with(self, o: Bits) -> Bits {
        Bits(self.0 | o.0)
    }
    /// Whether every bit of `o` is set.
    #[inline]
    pub const fn contains(self, o: Bits) -> bool {
        self.0 & o.0 == o.0
    }
    /// Whether any bit of `o` is set.
    #[inline]
    pub const fn intersects(self, o: Bits) -> bool {
        self.0 & o.0 != 0
    }
    /// Whether no bit is set.
    #[inline]
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Bits {
    type Output = Bits;
    fn bitor(self, o: Bits) -> Bits {
        Bits(self.0 | o.0)
    }
}

/// Who first dirtied a range and when (in the caller's clock units, e.g. milliseconds since the cache started).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Tag {
    /// The first dirtier's client id (0: none).
    pub client: u16,
    /// When it was first dirtied.
    pub time: u32,
}

impl Tag {
    /// The empty tag (ranges that are not dirty).
    pub const NONE: Tag = Tag { client: 0, time: 0 };
}

/// The state of a byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct State {
    /// State bits.
    pub bits: Bits,
    /// Tag (meaningful while DIRTY is set, otherwise [`Tag::NONE`]).
    pub tag: Tag,
}

/// One range as reported by queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Its state.
    pub state: State,
}

/// A change of bits over a range: the one primitive every set/clear/convert goes through.
#[derive(Debug, Clone, Copy)]
struct Change {
    set: u8,
    clear: u8,
    tag: Tag,
}

impl Change {
    #[inline]
    fn apply(&self, old: State) -> State {
        let bits = (old.bits.0 & !self.clear) | self.set;
        let tag = if bits & Bits::DIRTY.0 == 0 {
            Tag::NONE
        } else if old.bits.0 & Bits::DIRTY.0 == 0 {
            self.tag
        } else {
            old.tag
        };
        State { bits: Bits(bits), tag }
    }
    /// Whether applying this to an empty gap creates a range.
    #[inline]
    fn fills_gaps(&self) -> bool {
        self.set != 0
    }
}

/// Whether a range test needs all bytes or any byte to carry the bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Test {
    /// Every byte of the range has every one of the bits.
    All,
    /// Some byte of the range has some of the bits.
    Any,
}

/// How big a tree's pools are.
#[derive(Debug, Clone, Copy)]
pub struct TreeConfig {
    /// Most ranges tracked at once (sizes the block pool).
    pub max_ranges: u32,
    /// Most lock requests queued at once (the waiter pool).
    pub max_waiters: u32,
}

/// Ranges an unlock may need (it can split the two end ranges); other operations leave these free.
const UNLOCK_RESERVE: u32 = 16;

/// A state tree. See the module docs.
#[derive(Debug)]
pub struct StateTree {
    t: Blocks,
    max_ranges: u32,
    compactions: u64,
    bytes_with: [u64; Bits::COUNT],
    waiters: lock::WaitQueue,
}

#[inline]
fn state_of(e: &Entry) -> State {
    State { bits: Bits(e.bits), tag: Tag { client: e.client, time: e.time } }
}

#[inline]
fn entry(start: u64, end: u64, s: State) -> Entry {
    Entry { start, end, time: s.tag.time, client: s.tag.client, bits: s.bits.0 }
}

impl StateTree {
    /// A tree with pools sized by `cfg`. Allocates now, never afterwards.
    ///
    /// # Errors
    /// [`CacheError::Config`] when `max_ranges` is below the reserve the tree keeps for unlocks (16) or too large;
    /// [`CacheError::TreeMemory`] when the block pool's memory cannot be reserved.
    pub fn new(cfg: TreeConfig) -> Result<StateTree, CacheError> {
        Self::with_block_entries(cfg, CAP as u32)
    }

    /// As [`StateTree::new`], with blocks used only up to `block_entries` entries (2..=128): tests use tiny blocks
    /// to exercise block splits and merges.
    ///
    /// # Errors
    /// As [`StateTree::new`].
    #[doc(hidden)]
    pub fn with_block_entries(cfg: TreeConfig, block_entries: u32) -> Result<StateTree, CacheError> {
        if cfg.max_ranges <= UNLOCK_RESERVE || cfg.max_ranges > u32::MAX / 4 {
            return Err(CacheError::Config { what: "state tree max_ranges", reason: "must be in 17..=2^30" });
        }
        // Two slots per range (blocks at least about half full) plus slack for splits in flight.
        let per_block = block_entries.clamp(2, CAP as u32) as usize;
        let blocks = (cfg.max_ranges as usize * blocks::POOL_SLACK_NUM).div_ceil(per_block * blocks::POOL_SLACK_DEN) as u32 + 4;
        let t = Blocks::with_blocks(blocks, per_block as u32).map_err(|source| CacheError::TreeMemory {
            max_ranges: cfg.max_ranges,
            bytes: u64::from(blocks).saturating_mul(blocks::BLOCK_BYTES as u64),
            source,
        })?;
        Ok(StateTree {
            t,
            max_ranges: cfg.max_ranges,
            compactions: 0,
            bytes_with: [0; Bits::COUNT],
            waiters: lock::WaitQueue::with_capacity(cfg.max_waiters),
        })
    }

    /// Ranges tracked now.
    pub fn range_count(&self) -> u32 {
        self.t.entries()
    }
    /// Ranges that can still be added.
    pub fn free_ranges(&self) -> u32 {
        self.max_ranges - self.t.entries()
    }
    /// How many times the tree repacked its blocks because splits had used them all.
    pub fn compactions(&self) -> u64 {
        self.compactions
    }
    /// Most ranges the tree can track.
    pub fn capacity(&self) -> u32 {
        self.max_ranges
    }

    fn check_range(start: u64, end: u64) -> Result<(), CacheError> {
        if start > end {
            return Err(CacheError::BadRange { start, end });
        }
        Ok(())
    }

    /// Set `bits` on `[start, end)`; bytes that become DIRTY here get `tag`.
    ///
    /// # Errors
    /// [`CacheError::BadRange`] when `start > end`; [`CacheError::TreeFull`] when the pool cannot hold the result (the
    /// tree is then unchanged).
    pub fn set(&mut self, start: u64, end: u64, bits: Bits, tag: Tag) -> Result<(), CacheError> {
        self.change(start, end, Change { set: bits.0, clear: 0, tag }, 0)
    }

    /// Clear `bits` on `[start, end)`.
    ///
    /// # Errors
    /// As [`StateTree::set`].
    pub fn clear(&mut self, start: u64, end: u64, bits: Bits) -> Result<(), CacheError> {
        self.change(start, end, Change { set: 0, clear: bits.0, tag: Tag::NONE }, 0)
    }

    /// Clear `clear` and set `set` on `[start, end)` in one pass (`set` wins where both name a bit).
    ///
    /// # Errors
    /// As [`StateTree::set`].
    pub fn convert(&mut self, start: u64, end: u64, set: Bits, clear: Bits, tag: Tag) -> Result<(), CacheError> {
        self.change(start, end, Change { set: set.0, clear: clear.0 & !set.0, tag }, 0)
    }

    /// Apply a change over `[start, end)`, keeping `reserve` ranges free. Atomic: either the whole change happens or
    /// (pool exhausted) nothing does.
    fn change(&mut self, start: u64, end: u64, c: Change, reserve: u32) -> Result<(), CacheError> {
        Self::check_range(start, end)?;
        if start == end {
            return Ok(());
        }
        // A change needs at most 2 splits plus one range per gap, and there are at most (ranges + 1) gaps; each new
        // range may split a block. With that much free it cannot fail; otherwise count exactly first.
        let used = self.t.entries();
        let bound = used.saturating_add(3).saturating_add(reserve);
        let room = self.t.cap() - self.t.cap().div_ceil(2);
        let block_bound = self.t.used_blocks().saturating_add(1).saturating_add(bound / room);
        if self.free_ranges() < bound || self.t.free_blocks() < block_bound {
            let (needed, spanned) = self.ranges_needed(start, end, c);
            if needed.saturating_add(reserve) > self.free_ranges() {
                return Err(CacheError::TreeFull { capacity: self.max_ranges, needed, free: self.free_ranges() });
            }
            // Each block the change spans may split once, and new ranges split a block again each time they fill the
            // room a split leaves (at least `room` entries).
            let blocks_needed = if needed == 0 { 0 } else { spanned + 1 + needed / room };
            if blocks_needed > self.t.free_blocks() {
                self.t.compact();
                self.compactions += 1;
                if blocks_needed > self.t.free_blocks() {
                    return Err(CacheError::TreeFull { capacity: self.max_ranges, needed, free: self.free_ranges() });
                }
            }
        }
        let first = self.t.seek(start);
        if let Some(p) = first {
            if self.change_one(p, start, end, c) {
                return Ok(());
            }
        }
        self.apply(first, start, end, c);
        self.merge_around(start, end);
        Ok(())
    }

    /// The common shapes, done in place: the change lies strictly inside the range at `p` (it splits in three, or in
    /// two around a gap; no neighbour can merge, as the middle differs from the old state on both sides), covers a
    /// prefix or a suffix of it (it splits in two; the changed part may join the neighbour on its side), or covers
    /// exactly that range
    /// (its state changes, then it merges with equal neighbours that touch it). False: not one of these; nothing
    /// changed. Capacity was checked by the caller.
    fn change_one(&mut self, p: Pos, start: u64, end: u64, c: Change) -> bool {
        let e = self.t.get(p);
        let inside = e.start < start && end < e.end;
        let exact = e.start == start && e.end == end;
        let prefix = e.start == start && end < e.end;
        let suffix = e.start < start && end == e.end;
        if !inside && !exact && !prefix && !suffix {
            return false;
        }
        let old = state_of(&e);
        let new = c.apply(old);
        if new == old {
            return true;
        }
        if prefix && new.bits.is_empty() {
            // The range would start later: a key change, left to the general walk.
            return false;
        }
        self.account(old.bits, new.bits, end - start);
        if prefix {
            // [start, end) takes the new state and may join the range before it; [end, e.end) keeps the old.
            self.t.set_end(p, end);
            self.t.set_state(p, new.bits.0, new.tag.client, new.tag.time);
            let q = self.put(Blocks::slot_after(p), entry(end, e.end, old));
            if let Some(x) = self.t.prev(q) {
                if let Some(b) = self.t.prev(x) {
                    let be = self.t.get(b);
                    if be.end == start && state_of(&be) == new {
                        self.t.set_end(b, end);
                        self.t.remove(x);
                    }
                }
            }
            return true;
        }
        if suffix {
            // [e.start, start) keeps the old state; [start, end) takes the new one and may join the range after it.
            self.t.set_end(p, start);
            if new.bits.is_empty() {
                return true;
            }
            let q = self.put(Blocks::slot_after(p), entry(start, end, new));
            if let Some(n) = self.t.next(q) {
                let ne = self.t.get(n);
                if ne.start == end && state_of(&ne) == new {
                    self.t.set_end(q, ne.end);
                    self.t.remove(n);
                }
            }
            return true;
        }
        if inside {
            self.t.set_end(p, start);
            // No bits left in the middle: it becomes a gap.
            if new.bits.is_empty() {
                self.put(Blocks::slot_after(p), entry(end, e.end, old));
            } else if self.t.insert_two(Blocks::slot_after(p), entry(start, end, new), entry(end, e.end, old)).is_none() {
                let q = self.put(Blocks::slot_after(p), entry(start, end, new));
                self.put(Blocks::slot_after(q), entry(end, e.end, old));
            }
            return true;
        }
        if new.bits.is_empty() {
            // Nothing left: the neighbours (if any) are now separated by a gap.
            self.t.remove(p);
            return true;
        }
        self.t.set_state(p, new.bits.0, new.tag.client, new.tag.time);
        let (prev, next) = (self.t.prev(p), self.t.next(p));
        if let (Some(b), Some(n)) = (prev, next) {
            if n.t == p.t {
                let (be, ne) = (self.t.get(b), self.t.get(n));
                if be.end == start && ne.start == end && state_of(&be) == new && state_of(&ne) == new {
                    // Both neighbours join (three ranges become one): stretch the one before over both, and remove
                    // this one and the one after (same block) with one shift.
                    self.t.set_end(b, ne.end);
                    self.t.remove_n(p, 2);
                    return true;
                }
            }
        }
        let mut p = p;
        let mut cur_end = end;
        if let Some(n) = self.t.next(p) {
            let ne = self.t.get(n);
            if ne.start == end && state_of(&ne) == new {
                self.t.set_end(p, ne.end);
                cur_end = ne.end;
                if self.t.remove(n) {
                    // Blocks were restructured: find the range again by its start.
                    match self.t.seek(start) {
                        Some(q) => p = q,
                        None => return true,
                    }
                }
            }
        }
        if let Some(b) = self.t.prev(p) {
            let be = self.t.get(b);
            if be.end == start && state_of(&be) == new {
                self.t.set_end(b, cur_end);
                self.t.remove(p);
            }
        }
        true
    }

    /// Exactly how many new ranges [`StateTree::apply`] will add for this change, and how many blocks it spans.
    fn ranges_needed(&self, start: u64, end: u64, c: Change) -> (u32, u32) {
        let mut needed = 0u32;
        let mut pos = start;
        let mut p = self.t.seek(pos);
        let first_block = p.map_or(0, |p| p.t);
        let mut last_block = first_block;
        // The piece ending where the walk stands, with its state after the change (for gap extension).
        let before = match p {
            Some(q) => self.t.prev(q),
            None => self.t.last(),
        };
        let mut prev = before.map(|q| self.t.get(q)).map(|e| (e.end, state_of(&e)));
        let gap = |prev: Option<(u64, State)>, at: u64| -> u32 {
            let s = c.apply(State::default());
            u32::from(c.fills_gaps() && prev != Some((at, s)))
        };
        while pos < end {
            let Some(q) = p else {
                needed += gap(prev, pos);
                break;
            };
            last_block = q.t;
            let e = self.t.get(q);
            if e.start >= end {
                needed += gap(prev, pos);
                break;
            }
            if e.start > pos {
                needed += gap(prev, pos);
                prev = Some((e.start, c.apply(State::default())));
                pos = e.start;
                continue;
            }
            let old = state_of(&e);
            let new = c.apply(old);
            if new != old {
                needed += u32::from(e.start < pos) + u32::from(e.end > end);
            }
            prev = Some((e.end.min(end), new));
            pos = e.end;
            p = self.t.next(q);
        }
        (needed, last_block - first_block + 1)
    }

    /// Fill the gap `[pos, gap_end)` (just before position `next`, or at the very end) with state `s`: stretch the
    /// range before it when that one ends at `pos` with the same state, else insert a range.
    fn fill_gap(&mut self, next: Option<Pos>, pos: u64, gap_end: u64, s: State) -> Option<Pos> {
        self.account(Bits::NONE, s.bits, gap_end - pos);
        let before = match next {
            Some(q) => self.t.prev(q),
            None => self.t.last(),
        };
        if let Some(b) = before {
            let be = self.t.get(b);
            if be.end == pos && state_of(&be) == s {
                self.t.set_end(b, gap_end);
                return next;
            }
        }
        let at = self.t.slot_before(next);
        let q = self.put(at, entry(pos, gap_end, s));
        self.t.next(q)
    }

    #[inline]
    fn account(&mut self, old: Bits, new: Bits, len: u64) {
        let diff = old.0 ^ new.0;
        if diff == 0 {
            return;
        }
        for (b, total) in self.bytes_with.iter_mut().enumerate() {
            let m = 1u8 << b;
            if diff & m != 0 {
                if new.0 & m != 0 {
                    *total += len;
                } else {
                    *total -= len;
                }
            }
        }
    }

    /// Insert a range; capacity was checked by the caller.
    #[inline]
    fn put(&mut self, at: Pos, e: Entry) -> Pos {
        match self.t.insert(at, e) {
            Some(p) => p,
            None => {
                debug_assert!(false, "state tree pool exhausted after the capacity check");
                at
            }
        }
    }

    /// The walk that changes state over `[start, end)`, from `first` (the seek of `start`). Capacity must have been
    /// checked.
    fn apply(&mut self, first: Option<Pos>, start: u64, end: u64, c: Change) {
        let mut pos = start;
        let mut p = first;
        while pos < end {
            let cur = match p {
                Some(q) if self.t.start_of(q) < end => q,
                _ => {
                    // A gap up to `end`.
                    if c.fills_gaps() {
                        self.fill_gap(p, pos, end, c.apply(State::default()));
                    }
                    return;
                }
            };
            let e = self.t.get(cur);
            if e.start > pos {
                if c.fills_gaps() {
                    p = self.fill_gap(Some(cur), pos, e.start, c.apply(State::default()));
                }
                pos = e.start;
                continue;
            }
            let old = state_of(&e);
            let new = c.apply(old);
            if new == old {
                pos = e.end;
                p = self.t.next(cur);
                continue;
            }
            let mid_end = e.end.min(end);
            self.account(old.bits, new.bits, mid_end - pos);
            let mut last = cur;
            if e.start < pos {
                // Front piece keeps the old state; the middle goes in after it.
                self.t.set_end(cur, pos);
                if !new.bits.is_empty() {
                    last = self.put(Blocks::slot_after(cur), entry(pos, mid_end, new));
                }
            } else if new.bits.is_empty() {
                if e.end > end {
                    // Only the back piece survives: shrink from the front. Keys stay sorted: the start moves right
                    // but stays below the next range's start.
                    self.t.remove(cur);
                    let at = self.t.slot_before(self.t.seek(end));
                    self.put(at, entry(end, e.end, old));
                    return;
                }
                self.t.remove(cur);
                pos = mid_end;
                p = self.t.seek(pos);
                continue;
            } else {
                self.t.set_end(cur, mid_end);
                self.t.set_state(cur, new.bits.0, new.tag.client, new.tag.time);
            }
            if e.end > end {
                // Back piece keeps the old state.
                self.put(Blocks::slot_after(last), entry(end, e.end, old));
                return;
            }
            pos = mid_end;
            p = self.t.next(last);
        }
    }

    /// Merge equal touching neighbours from the range ending at `start` to the one starting at `end`.
    fn merge_around(&mut self, start: u64, end: u64) {
        let mut p = self.t.seek(start.saturating_sub(1));
        while let Some(x) = p {
            let xe = self.t.get(x);
            if xe.start >= end {
                break;
            }
            let Some(y) = self.t.next(x) else { break };
            let ye = self.t.get(y);
            if xe.end == ye.start && state_of(&xe) == state_of(&ye) {
                self.t.set_end(x, ye.end);
                if self.t.remove(y) {
                    // Blocks were restructured: find x again by its start.
                    p = self.t.seek(xe.start);
                }
            } else {
                p = Some(y);
            }
        }
    }

    /// The first range at or after `from` having any of `bits`, clipped to start at `from`.
    pub fn find_first(&self, from: u64, bits: Bits) -> Option<Extent> {
        let q = self.t.find_bits(from, |b| b & bits.0 != 0)?;
        let e = self.t.get(q);
        Some(Extent { start: e.start.max(from), end: e.end, state: state_of(&e) })
    }

    /// From the first byte at or after `from` that has all of `bits`, the longest contiguous run of bytes having all
    /// of them (whatever their other bits and tags), capped at `max_len` bytes. Returns `(start, end)`.
    pub fn find_run(&self, from: u64, bits: Bits, max_len: u64) -> Option<(u64, u64)> {
        let q = self.t.find_bits(from, |b| b & bits.0 == bits.0)?;
        let start = self.t.start_of(q).max(from);
        Some((start, self.run_end(q, bits, start.saturating_add(max_len))))
    }

    /// Where the run of `bits` that contains position `q` ends, capped at `cap`.
    fn run_end(&self, mut q: Pos, bits: Bits, cap: u64) -> u64 {
        let mut end = self.t.end_of(q);
        while end < cap {
            let Some(y) = self.t.next(q) else { break };
            if self.t.start_of(y) != end || self.t.bits_of(y) & bits.0 != bits.0 {
                break;
            }
            end = self.t.end_of(y);
            q = y;
        }
        end.min(cap)
    }

    /// The cluster around byte `pos` for writeback: if `pos` has all of `bits`, walk back to the first byte of the
    /// contiguous run holding it, then forward from there, capped at `max_len` bytes. Returns `(start, end)`.
    pub fn cluster_at(&self, pos: u64, bits: Bits, max_len: u64) -> Option<(u64, u64)> {
        let q = self.t.seek(pos)?;
        if self.t.start_of(q) > pos || self.t.bits_of(q) & bits.0 != bits.0 {
            return None;
        }
        let mut first = q;
        while let Some(p) = self.t.prev(first) {
            if self.t.end_of(p) != self.t.start_of(first) || self.t.bits_of(p) & bits.0 != bits.0 {
                break;
            }
            first = p;
        }
        let start = self.t.start_of(first);
        Some((start, self.run_end(first, bits, start.saturating_add(max_len))))
    }

    /// Whether `[start, end)` has `bits` on every byte ([`Test::All`]) or on some byte ([`Test::Any`]). An empty
    /// range passes `All` and fails `Any`.
    pub fn test(&self, start: u64, end: u64, bits: Bits, how: Test) -> bool {
        if start >= end {
            return how == Test::All;
        }
        let mut pos = start;
        let mut p = self.t.seek(start);
        while let Some(q) = p {
            let (s, b) = (self.t.start_of(q), self.t.bits_of(q));
            if s >= end {
                break;
            }
            match how {
                Test::Any if b & bits.0 != 0 => return true,
                Test::All if s > pos || b & bits.0 != bits.0 => return false,
                _ => {}
            }
            pos = self.t.end_of(q);
            if pos >= end {
                break;
            }
            p = self.t.next(q);
        }
        match how {
            Test::Any => false,
            Test::All => pos >= end,
        }
    }

    /// Bytes of `[start, end)` having all of `bits`.
    pub fn count(&self, start: u64, end: u64, bits: Bits) -> u64 {
        let mut total = 0u64;
        let mut p = self.t.seek(start);
        while let Some(q) = p {
            let e = self.t.get(q);
            if e.start >= end {
                break;
            }
            if e.bits & bits.0 == bits.0 {
                total += e.end.min(end) - e.start.max(start);
            }
            p = self.t.next(q);
        }
        total
    }

    /// Bytes in the whole tree having the single bit `bit` (kept up to date on every change: O(1)). Returns 0 for a
    /// value naming no bit or several.
    pub fn total(&self, bit: Bits) -> u64 {
        if bit.0.count_ones() != 1 {
            return 0;
        }
        self.bytes_with.get(bit.0.trailing_zeros() as usize).copied().unwrap_or(0)
    }

    /// Call `f` for each range overlapping `[start, end)`, clipped to it, in order. Stops early when `f` returns
    /// false.
    pub fn for_each(&self, start: u64, end: u64, mut f: impl FnMut(Extent) -> bool) {
        let mut p = self.t.seek(start);
        while let Some(q) = p {
            let e = self.t.get(q);
            if e.start >= end {
                break;
            }
            if !f(Extent { start: e.start.max(start), end: e.end.min(end), state: state_of(&e) }) {
                break;
            }
            p = self.t.next(q);
        }
    }

    /// The state of the single byte at `pos`.
    pub fn state_at(&self, pos: u64) -> State {
        match self.t.seek(pos) {
            Some(q) if self.t.start_of(q) <= pos => state_of(&self.t.get(q)),
            _ => State::default(),
        }
    }

    /// Check every invariant: index and block shape, ranges sorted, non-empty, non-overlapping, merged, no empty
    /// state, tags only on dirty ranges, byte totals right, no grantable waiter left queued. For tests and
    /// diagnostics (it allocates).
    ///
    /// # Errors
    /// A description of the first broken invariant.
    pub fn check_invariants(&self) -> Result<(), String> {
        let all = self.t.check_shape()?;
        let mut totals = [0u64; Bits::COUNT];
        let mut prev: Option<Entry> = None;
        for n in all {
            if n.start >= n.end {
                return Err(format!("empty range {}..{}", n.start, n.end));
            }
            if n.bits == 0 {
                return Err(format!("range {}..{} carries no bits", n.start, n.end));
            }
            if n.bits & Bits::DIRTY.0 == 0 && (n.client != 0 || n.time != 0) {
                return Err(format!("range {}..{} has a tag but is not dirty", n.start, n.end));
            }
            if let Some(p) = prev {
                if p.end > n.start {
                    return Err(format!("ranges {}..{} and {}..{} overlap or are unsorted", p.start, p.end, n.start, n.end));
                }
                if p.end == n.start && state_of(&p) == state_of(&n) {
                    return Err(format!("equal neighbours {}..{} and {}..{} not merged", p.start, p.end, n.start, n.end));
                }
            }
            for (b, t) in totals.iter_mut().enumerate() {
                if n.bits & (1 << b) != 0 {
                    *t += n.end - n.start;
                }
            }
            prev = Some(n);
        }
        if totals != self.bytes_with {
            return Err(format!("byte totals {:?} != recomputed {:?}", self.bytes_with, totals));
        }
        self.waiters.check(self)
    }
}

#[cfg(test)]
mod tests {
    //! The in-place fast paths (split one range in three or two, merge three into one, block splits and spills made
    //! for two entries at once) on trees with many ranges and small blocks, against a per-byte model.
    use super::*;
    use proptest::prelude::*;

    const RANGES: u64 = 300;
    const STRIDE: u64 = 8;
    const SPACE: u64 = RANGES * STRIDE;

    #[derive(Debug, Clone, Copy)]
    enum Op {
        /// Set DIRTY (tag client) on `[s, e)` inside range `r`.
        SetIn(u64, u64, u64, u16),
        /// Clear DIRTY on `[s, e)` inside range `r`.
        ClearIn(u64, u64, u64),
        /// Lock then unlock `[s, e)` inside range `r`, checking the lock in between.
        LockIn(u64, u64, u64),
        /// Set UPTODATE over a span of ranges and the gaps between them.
        SetSpan(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        // Offsets inside a 4-byte range: start 0..4, length 1..=4-start.
        let sub = (0..RANGES, 0..4u64, 1..5u64).prop_map(|(r, s, l)| (r, s, (s + l).min(4)));
        prop_oneof![
            4 => (sub.clone(), 1..4u16).prop_map(|((r, s, e), c)| Op::SetIn(r, s, e, c)),
            3 => sub.clone().prop_map(|(r, s, e)| Op::ClearIn(r, s, e)),
            3 => sub.prop_map(|(r, s, e)| Op::LockIn(r, s, e)),
            1 => (0..SPACE, 1..40u64).prop_map(|(s, l)| Op::SetSpan(s, (s + l).min(SPACE))),
        ]
    }

    fn apply(m: &mut [State], s: u64, e: u64, c: Change) {
        for st in &mut m[s as usize..e as usize] {
            *st = c.apply(*st);
        }
    }

    fn compare(t: &StateTree, m: &[State]) -> Result<(), TestCaseError> {
        t.check_invariants().map_err(TestCaseError::fail)?;
        let mut got = vec![State::default(); m.len()];
        t.for_each(0, SPACE, |x| {
            for st in &mut got[x.start as usize..x.end as usize] {
                *st = x.state;
            }
            true
        });
        prop_assert_eq!(&got[..], m);
        Ok(())
    }

    fn run(block_entries: u32, ops: &[Op]) -> Result<(), TestCaseError> {
        let cfg = TreeConfig { max_ranges: 4096, max_waiters: 4 };
        let mut t = StateTree::with_block_entries(cfg, block_entries).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut m = vec![State::default(); SPACE as usize];
        let up = Change { set: Bits::UPTODATE.0, clear: 0, tag: Tag::NONE };
        for r in 0..RANGES {
            let (s, e) = (r * STRIDE, r * STRIDE + 4);
            t.set(s, e, Bits::UPTODATE, Tag::NONE).map_err(|e| TestCaseError::fail(e.to_string()))?;
            apply(&mut m, r * STRIDE, r * STRIDE + 4, up);
        }
        compare(&t, &m)?;
        let mut woken = Vec::with_capacity(4);
        for (step, &o) in ops.iter().enumerate() {
            match o {
                Op::SetIn(r, s, e, client) => {
                    let (s, e) = (r * STRIDE + s, r * STRIDE + e);
                    let tag = Tag { client, time: step as u32 };
                    t.set(s, e, Bits::DIRTY, tag).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    apply(&mut m, s, e, Change { set: Bits::DIRTY.0, clear: 0, tag });
                }
                Op::ClearIn(r, s, e) => {
                    let (s, e) = (r * STRIDE + s, r * STRIDE + e);
                    t.clear(s, e, Bits::DIRTY).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    apply(&mut m, s, e, Change { set: 0, clear: Bits::DIRTY.0, tag: Tag::NONE });
                }
                Op::LockIn(r, s, e) => {
                    let (s, e) = (r * STRIDE + s, r * STRIDE + e);
                    let got = t.lock(s, e, step as u64).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert_eq!(got, lock::LockOutcome::Granted);
                    apply(&mut m, s, e, Change { set: Bits::LOCKED.0, clear: 0, tag: Tag::NONE });
                    compare(&t, &m)?;
                    woken.clear();
                    t.unlock(s, e, &mut woken).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    prop_assert!(woken.is_empty());
                    apply(&mut m, s, e, Change { set: 0, clear: Bits::LOCKED.0, tag: Tag::NONE });
                }
                Op::SetSpan(s, e) => {
                    t.set(s, e, Bits::UPTODATE, Tag::NONE).map_err(|e| TestCaseError::fail(e.to_string()))?;
                    apply(&mut m, s, e, up);
                }
            }
            compare(&t, &m)?;
        }
        Ok(())
    }

    proptest! {
        // 300 cases unless PROPTEST_CASES asks for another number.
        #![proptest_config(ProptestConfig {
            cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300),
            ..ProptestConfig::default()
        })]
        /// Sub-range sets, clears and lock/unlock pairs over 300 ranges, in blocks of 4, 5, 8 and 64 entries.
        #[test]
        fn sub_range_changes_match_a_byte_model(
            block_entries in prop_oneof![Just(4u32), Just(5), Just(8), Just(64)],
            ops in proptest::collection::vec(op(), 1..200),
        ) {
            run(block_entries, &ops)?;
        }
    }
}
