//! One-way rings of piece descriptors between one channel and one shard.
//!
//! Each (channel, shard) pair has two: the channel's pieces to the shard, and the shard's finished pieces back.
//! A ring has one producer and one consumer (Lamport's queue), and each side keeps a private copy of the other's
//! position, read again only when its copy says the ring is empty (consumer) or full (producer). So the consumer
//! pulls the producer's position and the written slots across once per pass, however many pieces it finds, and
//! never writes a slot; the producer hardly ever reads the consumer's position. (A shared multi-producer queue
//! moves its tail, its head and a slot stamp for every entry, with a locked instruction on each side.)

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicUsize, Ordering};

/// One side's state on its own cache line: the position it publishes and its private copy of the other side's.
/// Most slot lines a consumer asks for ahead when it finds new entries.
const PREFETCH_LINES: usize = 8;

#[repr(align(128))]
struct Side {
    /// Published: the producer's tail (entries below it are written) or the consumer's head (slots below it are
    /// free again).
    mine: AtomicUsize,
    /// Private (only this side reads or writes it): the other side's position as last read.
    seen: AtomicUsize,
}

/// A single-producer single-consumer ring of `T` (boxed descriptors, or small messages kept inline).
///
/// `push` may run on one thread at a time and `pop`/`is_empty` on one thread at a time (its callers' invariants,
/// see each call).
pub(crate) struct Ring<T> {
    slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
    mask: usize,
    prod: Side,
    cons: Side,
}

// SAFETY: a slot is written only by the one producer while it lies outside [head, tail) and read only by the one
// consumer while inside; the release/acquire pairs on the positions hand each slot over between them. `T: Send`
// because entries move from one thread to the other.
unsafe impl<T: Send> Sync for Ring<T> {}
// SAFETY: as above: the ring owns its entries, which may move to another thread.
unsafe impl<T: Send> Send for Ring<T> {}

/// The ring of piece descriptors.
pub(crate) type PieceRing = Ring<Box<nvstack_blockdev::IoDesc>>;

impl<T> Ring<T> {
    /// A ring of at least `entries` slots (rounded up to a power of two, at least 8).
    pub(crate) fn new(entries: usize) -> Ring<T> {
        let n = entries.max(8).next_power_of_two();
        Ring {
            slots: (0..n).map(|_| UnsafeCell::new(MaybeUninit::uninit())).collect(),
            mask: n - 1,
            prod: Side { mine: AtomicUsize::new(0), seen: AtomicUsize::new(0) },
            cons: Side { mine: AtomicUsize::new(0), seen: AtomicUsize::new(0) },
        }
    }

    /// Slots in the ring.
    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Hand `v` to the consumer; gives it back when the ring is full.
    ///
    /// # Safety
    /// No other `push` on this ring runs at the same time (one producer).
    #[inline]
    pub(crate) unsafe fn push(&self, v: T) -> Result<(), T> {
        let t = self.prod.mine.load(Ordering::Relaxed);
        let n = self.slots.len();
        if t.wrapping_sub(self.prod.seen.load(Ordering::Relaxed)) >= n {
            // Acquire: the consumer's reads of the slots below its head happen before we write them again.
            let h = self.cons.mine.load(Ordering::Acquire);
            self.prod.seen.store(h, Ordering::Relaxed);
            if t.wrapping_sub(h) >= n {
                return Err(v);
            }
        }
        // SAFETY: slot `t` is outside [head, tail) (checked above: fewer than `n` entries are in the ring), so the
        // consumer does not touch it; we are the one producer (the caller's contract).
        unsafe { (*self.slots[t & self.mask].get()).write(v) };
        // Release: the slot is written before the consumer sees the new tail.
        self.prod.mine.store(t.wrapping_add(1), Ordering::Release);
        Ok(())
    }

    /// The next entry, if any.
    ///
    /// # Safety
    /// No other `pop` or `is_empty` on this ring runs at the same time (one consumer).
    #[inline]
    pub(crate) unsafe fn pop(&self) -> Option<T> {
        let h = self.cons.mine.load(Ordering::Relaxed);
        if h == self.cons.seen.load(Ordering::Relaxed) {
            // Acquire: pairs with the producer's release of its tail, so the slots below it are visible here.
            let t = self.prod.mine.load(Ordering::Acquire);
            self.cons.seen.store(t, Ordering::Relaxed);
            if t == h {
                return None;
            }
            self.prefetch_slots(h, t);
        }
        // SAFETY: slot `h` is inside [head, tail): written by the producer (visible through the acquire above or an
        // earlier one) and not yet taken; with one consumer (the caller's contract) it is taken once, here.
        let v = unsafe { (*self.slots[h & self.mask].get()).assume_init_read() };
        // Release: we are done with the slot before the producer may write it again.
        self.cons.mine.store(h.wrapping_add(1), Ordering::Release);
        Some(v)
    }

    /// Ask for the lines of the new slots `h..t` (at most [`PREFETCH_LINES`]) at once, so their cross-core misses
    /// overlap instead of each stalling the consumer in turn.
    #[inline]
    fn prefetch_slots(&self, h: usize, t: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let per_line = (64 / std::mem::size_of::<T>().max(1)).max(1);
            let n = t.wrapping_sub(h).min(PREFETCH_LINES * per_line);
            let mut i = per_line; // the first slot's line is read right away
            while i < n {
                let at = self.slots[h.wrapping_add(i) & self.mask].get().cast::<i8>();
                // SAFETY: a prefetch is a hint: it never faults and changes no memory.
                unsafe { std::arch::x86_64::_mm_prefetch(at, std::arch::x86_64::_MM_HINT_T0) };
                i += per_line;
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (h, t);
    }

    /// Whether the consumer would find nothing now.
    ///
    /// # Safety
    /// As for [`Ring::pop`]: called by the ring's one consumer.
    #[inline]
    pub(crate) unsafe fn is_empty(&self) -> bool {
        self.cons.mine.load(Ordering::Relaxed) == self.prod.mine.load(Ordering::Acquire)
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        let (mut h, t) = (*self.cons.mine.get_mut(), *self.prod.mine.get_mut());
        while h != t {
            // SAFETY: an entry between head and tail: written, not taken; `&mut self` makes us its only owner.
            unsafe { self.slots[h & self.mask].get_mut().assume_init_drop() };
            h = h.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvstack_blockdev::IoDesc;

    fn desc(tag: u64) -> Box<IoDesc> {
        let mut d = IoDesc::new(1);
        d.ctx = tag;
        d
    }
    // Each test's ring has one producer thread and one consumer thread.
    fn push(r: &PieceRing, d: Box<IoDesc>) -> Result<(), Box<IoDesc>> {
        // SAFETY: one producer per ring in these tests.
        unsafe { r.push(d) }
    }
    fn pop(r: &PieceRing) -> Option<u64> {
        // SAFETY: one consumer per ring in these tests.
        unsafe { r.pop() }.map(|d| d.ctx)
    }
    fn empty(r: &PieceRing) -> bool {
        // SAFETY: as in `pop`.
        unsafe { r.is_empty() }
    }

    #[test]
    fn fifo_full_and_empty() {
        let r = PieceRing::new(5);
        assert_eq!(r.capacity(), 8);
        assert!(empty(&r));
        for i in 0..8 {
            assert!(push(&r, desc(i)).is_ok());
        }
        let back = push(&r, desc(99)).expect_err("a full ring refuses");
        assert_eq!(back.ctx, 99);
        for i in 0..8 {
            assert_eq!(pop(&r), Some(i));
        }
        assert_eq!(pop(&r), None);
        assert!(empty(&r));
    }

    #[test]
    fn wraps_against_a_queue_model_and_frees_what_is_left() {
        let r = PieceRing::new(8);
        let mut model = std::collections::VecDeque::new();
        // Two in, one out per step until full, then drain: the positions wrap the ring many times.
        let mut next = 0u64;
        for _ in 0..50 {
            while model.len() < 8 {
                push(&r, desc(next)).expect("room");
                model.push_back(next);
                next += 1;
                assert_eq!(pop(&r), model.pop_front());
                if model.len() < 8 {
                    push(&r, desc(next)).expect("room");
                    model.push_back(next);
                    next += 1;
                }
            }
            assert!(push(&r, desc(u64::MAX)).is_err());
            while let Some(want) = model.pop_front() {
                assert_eq!(pop(&r), Some(want));
            }
            assert!(empty(&r));
        }
        push(&r, desc(7)).expect("room");
        push(&r, desc(8)).expect("room");
        drop(r); // the entries still inside are freed (a leak checker would say otherwise)
    }

    #[test]
    fn two_threads_keep_order() {
        const N: u64 = 200_000;
        let r = std::sync::Arc::new(PieceRing::new(64));
        let p = std::sync::Arc::clone(&r);
        let producer = std::thread::spawn(move || {
            let mut i = 0;
            let mut next = desc(0);
            while i < N {
                next.ctx = i;
                match push(&p, next) {
                    Ok(()) => {
                        i += 1;
                        next = desc(0);
                    }
                    Err(back) => {
                        next = back;
                        std::hint::spin_loop();
                    }
                }
            }
        });
        let mut want = 0;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while want < N {
            assert!(std::time::Instant::now() < deadline, "the consumer saw only {want} of {N} entries");
            if let Some(got) = pop(&r) {
                assert_eq!(got, want);
                want += 1;
            }
        }
        producer.join().expect("producer");
        assert!(empty(&r));
    }
}
