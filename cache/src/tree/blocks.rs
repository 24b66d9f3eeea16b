//! The ordered container under a state tree: a two-level sorted array ("blocked array", a B+tree of height two).
//!
//! - Ranges live in fixed-size blocks of [`CAP`] entries, stored column-wise (all starts together, all ends...), so a
//!   search in a block touches a few cache lines of starts or ends. Blocks come from a pool reserved at start.
//! - A top-level index holds, per block in order, its first start and its pool id, in two `Vec`s reserved at start
//!   (`Vec::insert`/`remove` within capacity never allocate). A summary of every 64th key (a few KiB, stays in cache)
//!   is searched first, then one 64-key segment of the index, whose lines are prefetched together.
//! - A lookup prefetches the whole block before searching it (1 M ranges are ~36 MiB: the block is rarely cached), so
//!   its misses overlap: about one memory latency per lookup. The columns are laid out (and prefetched) in the order a
//!   lookup waits on them: `end` (the search), then the line holding `bits` and `len`, then the rest. A finger
//!   remembers the block of the last lookup (checked against the index keys), so the several lookups of one operation
//!   skip the index.
//! - A full block first spills entries into a neighbour with room (no index insert); only when neither has room does it
//!   split in two halves (an index insert, a memmove of the index). Appends at the very end of the tree (a sequential
//!   fill) leave each block an eighth empty, as B-tree bulk loads do. After a removal a block merges with a neighbour
//!   when both fit in half a block (a neighbour's length, another miss, is read only when this block is under half
//!   full); an empty block returns to the pool. A split of one range in three makes room for both new entries at once
//!   (one spill or split, one shift); a merge of three ranges in one removes two with one shift. Positions ([`Pos`])
//!   are valid until the next insert or remove.
//!
//! Why not a binary tree: with 1 M ranges a pointer-linked tree costs ~20-30 cache misses per lookup and one more
//! descent per successor; this layout costs a handful, and walking to the next range is an index increment.

use super::pool::BlockPool;

/// Hint the CPU to fetch the cache lines holding bytes `from..to` of `*v` (no effect on other architectures).
#[inline(always)]
fn prefetch_bytes<T: ?Sized>(v: &T, from: usize, to: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let base = (v as *const T).cast::<i8>();
        let to = to.min(std::mem::size_of_val(v));
        // From the line holding byte `from` to the line holding byte `to - 1`.
        let mut off = from.saturating_sub(base.wrapping_add(from) as usize % 64);
        while off < to {
            // SAFETY: a prefetch is a hint that never faults or changes memory (even for an address outside `v`,
            // which this is not: `off` is in `from..to` or on the start of the line holding `from`).
            unsafe { std::arch::x86_64::_mm_prefetch(base.wrapping_add(off), std::arch::x86_64::_MM_HINT_T0) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (v, from, to);
}

/// Hint the CPU to fetch the cache lines of `s`.
#[inline(always)]
fn prefetch<T>(s: &[T]) {
    prefetch_bytes(s, 0, std::mem::size_of_val(s));
}

/// Keys per segment of the top-level index (one summary entry each).
const SEG: usize = 64;

/// Entries per block.
pub(crate) const CAP: usize = 64;

/// One range, as copied out of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Entry {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) time: u32,
    pub(crate) client: u16,
    pub(crate) bits: u8,
}

/// Bytes one range slot takes in a block: start 8 + end 8 + time 4 + client 2 + bits 1.
pub const SLOT_BYTES: usize = 8 + 8 + 4 + 2 + 1;

/// Columns in the order a lookup needs them: `end` (the search), then `bits` and `len` on the next line (the
/// length bounds the search; `bits` is what a find tests first), then the rest.
///
/// Integers only: the pool's memory starts zeroed by the kernel and is reached as blocks (see `pool.rs`), so every
/// byte pattern must be a valid block, and all zeroes is an empty one.
#[derive(Clone, Copy)]
#[repr(C)]
pub(super) struct Block {
    end: [u64; CAP],
    bits: [u8; CAP],
    len: u32,
    client: [u16; CAP],
    time: [u32; CAP],
    start: [u64; CAP],
}

/// Bytes of one block.
pub(super) const BLOCK_BYTES: usize = std::mem::size_of::<Block>();

/// Byte offset of `bits` in a block (the line that also holds `len`).
const BITS_OFFSET: usize = 8 * CAP;
/// Byte offset just past `len`.
const LEN_END: usize = BITS_OFFSET + CAP + 4;

// The slot size above is what a block really spends per entry (plus a 4-byte length per block).
const _: () = assert!(std::mem::size_of::<Block>() <= SLOT_BYTES * CAP + 8);

impl Block {
    /// Move the entries in `from` to start at `to` (every column; the ranges may overlap).
    #[inline]
    fn shift(&mut self, from: std::ops::Range<usize>, to: usize) {
        self.start.copy_within(from.clone(), to);
        self.end.copy_within(from.clone(), to);
        self.time.copy_within(from.clone(), to);
        self.client.copy_within(from.clone(), to);
        self.bits.copy_within(from, to);
    }

    /// Copy `src`'s entries in `from` into slots starting at `to` (every column).
    #[inline]
    fn copy_from(&mut self, to: usize, src: &Block, from: std::ops::Range<usize>) {
        let n = from.len();
        self.start[to..to + n].copy_from_slice(&src.start[from.clone()]);
        self.end[to..to + n].copy_from_slice(&src.end[from.clone()]);
        self.time[to..to + n].copy_from_slice(&src.time[from.clone()]);
        self.client[to..to + n].copy_from_slice(&src.client[from.clone()]);
        self.bits[to..to + n].copy_from_slice(&src.bits[from]);
    }

    /// Write `e` into slot `k`.
    #[inline]
    fn put(&mut self, k: usize, e: Entry) {
        self.start[k] = e.start;
        self.end[k] = e.end;
        self.time[k] = e.time;
        self.client[k] = e.client;
        self.bits[k] = e.bits;
    }
}

/// Blocks the pool holds per block's worth of configured ranges, as a ratio (3/2): room to split before the tree
/// must compact.
pub(crate) const POOL_SLACK_NUM: usize = 3;
/// Denominator of the slack ratio.
pub(crate) const POOL_SLACK_DEN: usize = 2;

/// Bytes the pool reserves per configured range: 1.5 slots (compaction guarantees that `max_ranges` ranges fit in
/// full blocks, the slack lets blocks split in between) plus the amortised block header, index entry and free-list
/// entry, rounded up. [`super::StateTree::new`] sizes the pool this way.
pub const POOL_BYTES_PER_RANGE: usize =
    (POOL_SLACK_NUM * (SLOT_BYTES * CAP + 4 + 8 + 4 + 4)).div_ceil(POOL_SLACK_DEN * CAP) + 1;

/// A position: index in the top-level array, slot in that block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Pos {
    pub(crate) t: u32,
    pub(crate) i: u32,
}

/// The blocked array.
pub(crate) struct Blocks {
    pool: BlockPool,
    free: Vec<u32>,
    keys: Vec<u64>,
    /// Every [`SEG`]-th key (`summary[j] == keys[j * SEG]`): a few KiB that stay in cache, so a lookup searches it
    /// and then one segment of `keys` whose lines it fetches at once, instead of a binary search whose last steps
    /// each miss.
    summary: Vec<u64>,
    /// The block the last seek landed in (a hint: checked against the keys before use).
    finger: std::cell::Cell<u32>,
    ids: Vec<u32>,
    entries: u32,
    /// Entries per block actually used (`CAP`, or fewer to exercise splits and merges in tests).
    cap: u32,
}

impl std::fmt::Debug for Blocks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blocks").field("blocks", &self.keys.len()).field("entries", &self.entries).finish()
    }
}

impl Blocks {
    /// A pool of `blocks` blocks. Allocates once.
    ///
    /// # Errors
    /// The OS error when the pool's memory cannot be reserved.
    pub(crate) fn with_blocks(blocks: u32, cap: u32) -> std::io::Result<Blocks> {
        let n = blocks.max(2) as usize;
        let pool = BlockPool::new(n)?;
        let mut free = Vec::with_capacity(n);
        free.extend((0..n as u32).rev());
        let cap = cap.clamp(2, CAP as u32);
        Ok(Blocks {
            pool,
            free,
            keys: Vec::with_capacity(n),
            summary: Vec::with_capacity(n / SEG + 1),
            finger: std::cell::Cell::new(0),
            ids: Vec::with_capacity(n),
            entries: 0,
            cap,
        })
    }

    #[inline]
    pub(crate) fn entries(&self) -> u32 {
        self.entries
    }
    #[inline]
    pub(crate) fn cap(&self) -> u32 {
        self.cap
    }
    #[inline]
    pub(crate) fn free_blocks(&self) -> u32 {
        self.free.len() as u32
    }
    #[inline]
    pub(crate) fn used_blocks(&self) -> u32 {
        self.keys.len() as u32
    }
    #[inline]
    fn blk(&self, t: u32) -> &Block {
        &self.pool[self.ids[t as usize] as usize]
    }
    #[inline]
    fn blk_mut(&mut self, t: u32) -> &mut Block {
        let id = self.ids[t as usize] as usize;
        &mut self.pool[id]
    }
    #[inline]
    fn len_of(&self, t: u32) -> u32 {
        self.blk(t).len
    }

    /// The entry at `p`.
    #[inline]
    pub(crate) fn get(&self, p: Pos) -> Entry {
        let b = self.blk(p.t);
        let i = p.i as usize;
        Entry { start: b.start[i], end: b.end[i], time: b.time[i], client: b.client[i], bits: b.bits[i] }
    }
    #[inline]
    pub(crate) fn start_of(&self, p: Pos) -> u64 {
        self.blk(p.t).start[p.i as usize]
    }
    #[inline]
    pub(crate) fn end_of(&self, p: Pos) -> u64 {
        self.blk(p.t).end[p.i as usize]
    }
    #[inline]
    pub(crate) fn bits_of(&self, p: Pos) -> u8 {
        self.blk(p.t).bits[p.i as usize]
    }
    /// Move the end of the range at `p` (the caller keeps ranges sorted and disjoint).
    #[inline]
    pub(crate) fn set_end(&mut self, p: Pos, end: u64) {
        self.blk_mut(p.t).end[p.i as usize] = end;
    }
    /// Change the state of the range at `p`.
    #[inline]
    pub(crate) fn set_state(&mut self, p: Pos, bits: u8, client: u16, time: u32) {
        let i = p.i as usize;
        let b = self.blk_mut(p.t);
        b.bits[i] = bits;
        b.client[i] = client;
        b.time[i] = time;
    }

    /// The first range whose end is after `x`.
    #[inline]
    pub(crate) fn seek(&self, x: u64) -> Option<Pos> {
        let n = self.keys.len();
        if n == 0 {
            return None;
        }
        // An operation seeks the same block several times (test, change, merge): try the last one first.
        let f = self.finger.get() as usize;
        let t = if f < n && (f == 0 || self.keys[f] <= x) && (f + 1 == n || self.keys[f + 1] > x) {
            f
        } else {
            let j = self.summary.partition_point(|&k| k <= x).saturating_sub(1);
            let (lo, hi) = (j * SEG, (j * SEG + SEG).min(n));
            prefetch(&self.keys[lo..hi]);
            prefetch(&self.ids[lo..hi]);
            let t = (lo + self.keys[lo..hi].partition_point(|&k| k <= x)).saturating_sub(1);
            self.finger.set(t as u32);
            t
        };
        let b = self.blk(t as u32);
        // A block is ~1.5 KiB that is rarely in cache (1 M ranges are ~36 MiB): ask for all its lines at once (the
        // search, the caller's reads and an insert's shifts touch most of them), so their misses overlap instead of
        // following one another. Before reading anything of it, `len` included.
        // The `len` line and the `end` column first: the search waits on them.
        prefetch_bytes(b, BITS_OFFSET, LEN_END);
        prefetch_bytes(b, 0, BITS_OFFSET);
        prefetch_bytes(b, LEN_END, std::mem::size_of::<Block>());
        let len = b.len as usize;
        let i = b.end[..len].partition_point(|&e| e <= x);
        if i < b.len as usize {
            return Some(Pos { t: t as u32, i: i as u32 });
        }
        (t + 1 < n).then_some(Pos { t: t as u32 + 1, i: 0 })
    }

    /// The first range at or after the one [`Blocks::seek`] finds for `x` whose bits pass `want`: a scan of each
    /// block's `bits` column (one cache line) instead of a step, with its index and bounds checks, per entry.
    #[inline]
    pub(crate) fn find_bits(&self, x: u64, want: impl Fn(u8) -> bool) -> Option<Pos> {
        let mut p = self.seek(x)?;
        loop {
            let b = self.blk(p.t);
            let from = p.i as usize;
            if let Some(k) = b.bits.get(from..b.len as usize).and_then(|bits| bits.iter().position(|&v| want(v))) {
                return Some(Pos { t: p.t, i: (from + k) as u32 });
            }
            if p.t as usize + 1 >= self.keys.len() {
                return None;
            }
            p = Pos { t: p.t + 1, i: 0 };
        }
    }

    /// The last position.
    #[inline]
    pub(crate) fn last(&self) -> Option<Pos> {
        let n = self.keys.len() as u32;
        (n > 0).then(|| Pos { t: n - 1, i: self.len_of(n - 1) - 1 })
    }

    /// The position after `p`.
    #[inline]
    pub(crate) fn next(&self, p: Pos) -> Option<Pos> {
        if p.i + 1 < self.len_of(p.t) {
            return Some(Pos { t: p.t, i: p.i + 1 });
        }
        ((p.t as usize) + 1 < self.keys.len()).then_some(Pos { t: p.t + 1, i: 0 })
    }

    /// The position before `p`.
    #[inline]
    pub(crate) fn prev(&self, p: Pos) -> Option<Pos> {
        if p.i > 0 {
            return Some(Pos { t: p.t, i: p.i - 1 });
        }
        if p.t == 0 {
            return None;
        }
        Some(Pos { t: p.t - 1, i: self.len_of(p.t - 1) - 1 })
    }

    /// Where to insert so as to come right before `p` (or at the very end when `p` is `None`).
    #[inline]
    pub(crate) fn slot_before(&self, p: Option<Pos>) -> Pos {
        match p {
            Some(p) => p,
            None => match self.keys.len() {
                0 => Pos { t: 0, i: 0 },
                n => Pos { t: n as u32 - 1, i: self.len_of(n as u32 - 1) },
            },
        }
    }

    /// The slot right after `p` (possibly one past the end of its block: a valid insertion point).
    #[inline]
    pub(crate) fn slot_after(p: Pos) -> Pos {
        Pos { t: p.t, i: p.i + 1 }
    }

    /// Insert `e` at insertion point `at`. Returns where it landed, or `None` when a block split needed a free block
    /// and there was none (the caller checks capacity first, so this does not happen in practice).
    pub(crate) fn insert(&mut self, at: Pos, e: Entry) -> Option<Pos> {
        if self.keys.is_empty() {
            let id = self.free.pop()?;
            self.keys.push(e.start);
            self.ids.push(id);
            self.resummarize(0);
            let b = &mut self.pool[id as usize];
            b.len = 0;
        }
        let mut p = at;
        // Appending at the very end of the tree (a sequential fill) leaves each block an eighth empty, as B-tree bulk
        // loads do: the first later insert into it then fits, instead of splitting (or spilling) right away.
        let len = self.len_of(p.t);
        let last = p.t as usize + 1 == self.keys.len();
        if last && p.i == len && len >= self.cap - self.cap / 8 && len < self.cap && self.cap >= 16 {
            if let Some(id) = self.free.pop() {
                self.pool[id as usize].len = 0;
                self.keys.push(e.start);
                self.ids.push(id);
                self.resummarize(p.t as usize + 1);
                return Some(self.insert_here(Pos { t: p.t + 1, i: 0 }, e));
            }
        }
        if self.len_of(p.t) == self.cap {
            p = self.make_room(p, 1)?;
        }
        Some(self.insert_here(p, e))
    }

    /// Make room for `need` entries (1 or 2) at insertion point `p` of a block that lacks it: spill into a
    /// neighbour, else split the block (or start a new block when `p` is at either end of it). Returns where to
    /// insert now, or `None` when a split needed a free block and there was none (nothing changed then).
    fn make_room(&mut self, p: Pos, need: u32) -> Option<Pos> {
        let len = self.len_of(p.t);
        if len + need <= self.cap {
            return Some(p);
        }
        if let Some(q) = self.spill(p, need) {
            return Some(q);
        }
        let id = self.free.pop()?;
        self.pool[id as usize].len = 0;
        let t = p.t as usize;
        // The new block's index key is set by the insert that follows (it inserts at its slot 0) or, for a split,
        // here; until then it repeats its neighbour's, which keeps the index sorted.
        if p.i == len {
            // Appending to a full block: start a new one after it (sequential fills leave full blocks).
            self.keys.insert(t + 1, self.keys[t]);
            self.ids.insert(t + 1, id);
            self.resummarize(t + 1);
            Some(Pos { t: p.t + 1, i: 0 })
        } else if p.i == 0 {
            // Prepending: a new block before it.
            self.keys.insert(t, self.keys[t]);
            self.ids.insert(t, id);
            self.resummarize(t);
            Some(p)
        } else {
            let half = len as usize / 2;
            let src = self.ids[t];
            self.move_front(id, src, half, len as usize - half);
            let key = self.pool[id as usize].start[0];
            self.keys.insert(t + 1, key);
            self.ids.insert(t + 1, id);
            self.resummarize(t + 1);
            Some(if p.i as usize > half { Pos { t: p.t + 1, i: p.i - half as u32 } } else { p })
        }
    }

    /// Insert `e` at `p`, in a block that has room.
    fn insert_here(&mut self, p: Pos, e: Entry) -> Pos {
        let i = p.i as usize;
        let b = self.blk_mut(p.t);
        let len = b.len as usize;
        b.shift(i..len, i + 1);
        b.put(i, e);
        b.len += 1;
        if i == 0 {
            self.set_key(p.t as usize, e.start);
        }
        self.entries += 1;
        p
    }

    /// Insert `a` then `b` (consecutive) at `at`, making room for both at once (one spill or split, one shift).
    /// `None`: a split needed a free block and there was none; nothing changed.
    pub(crate) fn insert_two(&mut self, at: Pos, a: Entry, b: Entry) -> Option<Pos> {
        if self.cap < 4 || at.i > self.len_of(at.t) {
            // Tiny test blocks: a block may not hold both after a split; insert one by one.
            return None;
        }
        let at = self.make_room(at, 2)?;
        let i = at.i as usize;
        let blk = self.blk_mut(at.t);
        let len = blk.len as usize;
        blk.shift(i..len, i + 2);
        blk.put(i, a);
        blk.put(i + 1, b);
        blk.len += 2;
        if i == 0 {
            self.set_key(at.t as usize, a.start);
        }
        self.entries += 2;
        Some(at)
    }

    /// Block `p.t` lacks room for `need` entries: make room by shifting entries into a neighbour that has some,
    /// rather than splitting (a split inserts into the top-level index, a memmove of the whole index). Returns where
    /// to insert now, or `None` when neither neighbour has room for at least `2 * need`.
    fn spill(&mut self, p: Pos, need: u32) -> Option<Pos> {
        let cap = self.cap as usize;
        let t = p.t as usize;
        let len = self.len_of(p.t) as usize;
        let need = need as usize;
        if t + 1 < self.keys.len() {
            let room = cap - self.len_of(p.t + 1) as usize;
            if room >= 2 * need {
                // Block t keeps `len - k` entries and gains `k >= need` of room; block t + 1 keeps `room - k >= need`.
                let k = room / 2;
                self.move_tail_to_next(p.t, k);
                let keep = (len - k) as u32;
                return Some(if p.i > keep { Pos { t: p.t + 1, i: p.i - keep } } else { p });
            }
        }
        if t > 0 {
            let left_len = self.len_of(p.t - 1);
            let room = cap - left_len as usize;
            if room >= 2 * need {
                let k = room / 2;
                self.move_front(self.ids[t - 1], self.ids[t], 0, k);
                self.set_key(t, self.pool[self.ids[t] as usize].start[0]);
                let k = k as u32;
                return Some(if p.i < k { Pos { t: p.t - 1, i: left_len + p.i } } else { Pos { t: p.t, i: p.i - k } });
            }
        }
        None
    }

    /// Move the last `k` entries of block `t` to the front of block `t + 1` (which has room for them).
    fn move_tail_to_next(&mut self, t: u32, k: usize) {
        let (a, b) = (self.ids[t as usize] as usize, self.ids[t as usize + 1] as usize);
        let (src, dst) = if a < b {
            let (x, y) = self.pool.split_at_mut(b);
            (&mut x[a], &mut y[0])
        } else {
            let (x, y) = self.pool.split_at_mut(a);
            (&mut y[0], &mut x[b])
        };
        let (sl, dl) = (src.len as usize, dst.len as usize);
        let from = sl - k;
        dst.shift(0..dl, k);
        dst.copy_from(0, src, from..sl);
        dst.len += k as u32;
        src.len -= k as u32;
        let first = dst.start[0];
        self.set_key(t as usize + 1, first);
    }

    /// Remove the entry at `p`. Blocks that became empty return to the pool; a block merges with a neighbour when
    /// both fit in one. Returns whether blocks were restructured: if not, positions before `p` are still valid;
    /// if so, every position is invalid.
    pub(crate) fn remove(&mut self, p: Pos) -> bool {
        self.remove_n(p, 1)
    }

    /// Remove the `k` entries from `p` on, all in `p`'s block (`p.i + k` at most its length), with one shift.
    /// Returns as [`Blocks::remove`].
    pub(crate) fn remove_n(&mut self, p: Pos, k: u32) -> bool {
        let i = p.i as usize;
        let k_us = k as usize;
        let b = self.blk_mut(p.t);
        let len = b.len as usize;
        debug_assert!(k >= 1 && i + k_us <= len, "remove_n past the end of its block");
        b.shift(i + k_us..len, i);
        b.len -= k;
        let new_len = b.len;
        let first = b.start[0];
        self.entries -= k;
        if new_len == 0 {
            let id = self.ids.remove(p.t as usize);
            self.keys.remove(p.t as usize);
            self.resummarize(p.t as usize);
            self.free.push(id);
            return true;
        }
        if i == 0 {
            self.set_key(p.t as usize, first);
        }
        // Merge with a neighbour only when both fit in half a block: the hysteresis keeps a split and a merge from
        // alternating on the same blocks (each moves the top-level index). Capacity does not depend on merging:
        // `compact` repacks when blocks run out.
        let limit = self.cap / 2;
        if new_len >= limit {
            // No neighbour can fit too (it has at least one entry): skip reading its length, a cache miss.
            return false;
        }
        if (p.t as usize) + 1 < self.keys.len() && new_len + self.len_of(p.t + 1) <= limit {
            self.merge_with_next(p.t);
            // Block t grew at its end: positions before p are unchanged.
            return false;
        }
        if p.t > 0 && new_len + self.len_of(p.t - 1) <= limit {
            self.merge_with_next(p.t - 1);
            return true;
        }
        false
    }

    /// Move `count` entries starting at slot `from` of block `src` to the end of block `dst` (distinct pool ids),
    /// and close the hole in `src`.
    fn move_front(&mut self, dst: u32, src: u32, from: usize, count: usize) {
        let (d, s) = (dst as usize, src as usize);
        let (dst_b, src_b) = if d < s {
            let (x, y) = self.pool.split_at_mut(s);
            (&mut x[d], &mut y[0])
        } else {
            let (x, y) = self.pool.split_at_mut(d);
            (&mut y[0], &mut x[s])
        };
        let at = dst_b.len as usize;
        let (f, n, len) = (from, count, src_b.len as usize);
        dst_b.copy_from(at, src_b, f..f + n);
        dst_b.len += n as u32;
        src_b.shift(f + n..len, f);
        src_b.len -= n as u32;
    }

    /// Repack every block full, in order, and return the emptied blocks to the pool: O(entries), run only when a
    /// change needs more free blocks than there are. Positions are invalid afterwards.
    pub(crate) fn compact(&mut self) {
        let n = self.keys.len();
        let cap = self.cap as usize;
        // Invariant: blocks at top positions w+1 .. r-1 are empty, so moving entries forward keeps the order.
        let mut w = 0usize;
        for r in 1..n {
            loop {
                let src_len = self.pool[self.ids[r] as usize].len as usize;
                if src_len == 0 || w == r {
                    break;
                }
                let room = cap - self.pool[self.ids[w] as usize].len as usize;
                if room == 0 {
                    w += 1;
                    continue;
                }
                self.move_front(self.ids[w], self.ids[r], 0, room.min(src_len));
            }
        }
        let keep = if n == 0 { 0 } else { w + 1 };
        for t in keep..n {
            self.free.push(self.ids[t]);
        }
        self.ids.truncate(keep);
        self.keys.truncate(keep);
        for t in 0..keep {
            self.keys[t] = self.pool[self.ids[t] as usize].start[0];
        }
        self.resummarize(0);
    }

    /// Append block `t + 1`'s entries to block `t` and free block `t + 1`.
    fn merge_with_next(&mut self, t: u32) {
        let (a, b) = (self.ids[t as usize], self.ids[t as usize + 1]);
        let n = self.pool[b as usize].len as usize;
        self.move_front(a, b, 0, n);
        self.keys.remove(t as usize + 1);
        self.ids.remove(t as usize + 1);
        self.resummarize(t as usize + 1);
        self.free.push(b);
    }

    /// Set the index key of block `t`, keeping the summary in step.
    #[inline]
    fn set_key(&mut self, t: usize, k: u64) {
        self.keys[t] = k;
        if t.is_multiple_of(SEG) {
            self.summary[t / SEG] = k;
        }
    }

    /// Rebuild the summary from the segment holding index position `from` on (after keys moved there).
    fn resummarize(&mut self, from: usize) {
        let j = from / SEG;
        self.summary.truncate(j);
        let mut t = j * SEG;
        while t < self.keys.len() {
            // Within the capacity reserved at start (keys never outnumber blocks), so this does not allocate.
            self.summary.push(self.keys[t]);
            t += SEG;
        }
    }

    /// Every entry in order (tests and diagnostics; allocates), after checking the index and block shapes.
    pub(crate) fn check_shape(&self) -> Result<Vec<Entry>, String> {
        let mut out = Vec::with_capacity(self.entries as usize);
        for t in 0..self.keys.len() as u32 {
            let b = self.blk(t);
            if b.len == 0 || b.len > self.cap {
                return Err(format!("block {t} has {} entries", b.len));
            }
            if self.keys[t as usize] != b.start[0] {
                return Err(format!("index key of block {t} is stale"));
            }
            for i in 0..b.len {
                out.push(self.get(Pos { t, i }));
            }
        }
        if out.len() != self.entries as usize {
            return Err(format!("{} entries found, {} counted", out.len(), self.entries));
        }
        let want: Vec<u64> = self.keys.iter().step_by(SEG).copied().collect();
        if self.summary != want {
            return Err("the index summary is stale".into());
        }
        if self.keys.len() + self.free.len() != self.pool.len() {
            return Err("a block is lost from the pool".into());
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(i: u64) -> Entry {
        Entry { start: i * 2, end: i * 2 + 1, time: i as u32, client: 1, bits: 1 }
    }

    #[test]
    fn compaction_repacks_half_empty_blocks_in_order() {
        let mut b = Blocks::with_blocks(64, 4).expect("pool");
        for i in 0..100 {
            let at = b.slot_before(None);
            b.insert(at, e(i)).unwrap();
        }
        assert_eq!(b.used_blocks(), 25, "appends fill blocks completely");
        // Remove two of every four entries: blocks keep 2 entries, and pairs (4) are above the merge limit (2).
        for i in (0..100u64).rev().filter(|i| i % 4 == 1 || i % 4 == 2) {
            let p = b.seek(i * 2).unwrap();
            assert_eq!(b.start_of(p), i * 2);
            b.remove(p);
        }
        assert_eq!(b.used_blocks(), 25);
        assert_eq!(b.entries(), 50);
        b.compact();
        assert_eq!(b.used_blocks(), 13);
        assert_eq!(b.free_blocks(), 64 - 13);
        let all = b.check_shape().unwrap();
        let want: Vec<Entry> = (0..100u64).filter(|i| i % 4 == 0 || i % 4 == 3).map(e).collect();
        assert_eq!(all, want);
    }

    #[test]
    fn split_keeps_order_and_positions() {
        let mut b = Blocks::with_blocks(16, 4).expect("pool");
        for i in [0u64, 2, 4, 6] {
            let at = b.slot_before(None);
            b.insert(at, e(i)).unwrap();
        }
        // Insert in the middle of a full block: it splits in halves.
        let p = b.seek(3).unwrap();
        let got = b.insert(p, e(1)).unwrap();
        assert_eq!(b.get(got), e(1));
        assert_eq!(b.used_blocks(), 2);
        let starts: Vec<u64> = b.check_shape().unwrap().iter().map(|x| x.start).collect();
        assert_eq!(starts, vec![0, 2, 4, 8, 12]);
    }
}
