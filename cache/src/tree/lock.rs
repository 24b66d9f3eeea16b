//! Exclusive range locks on a state tree, with queued continuations instead of sleeping threads.
//!
//! - [`StateTree::lock`] grants at once when no byte of the range is LOCKED *and* no queued waiter overlaps it
//!   (so a stream of small locks cannot overtake a queued large one: no starvation). Otherwise it queues the
//!   caller's token (a continuation id: a request slot, a message) and returns [`LockOutcome::Queued`].
//! - [`StateTree::unlock`] clears LOCKED, then walks the queue in FIFO order and grants every waiter whose range is
//!   now free and overlaps no waiter still queued ahead of it, setting LOCKED for it and handing its token back in
//!   the caller's `Vec`. The caller then runs those continuations: each holds its lock when it runs.
//! - Waiters live in a fixed pool; a full pool is [`CacheError::WaitersFull`] (back-pressure).

use super::{Bits, Change, StateTree, Tag, Test, UNLOCK_RESERVE};
use crate::CacheError;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Waiter {
    start: u64,
    end: u64,
    token: u64,
    next: u32,
}

/// The FIFO of queued lock requests, in a preallocated pool.
#[derive(Debug)]
pub(crate) struct WaitQueue {
    w: Vec<Waiter>,
    head: u32,
    tail: u32,
    free: u32,
    len: u32,
    /// A grant was refused for want of tree nodes: waiters may be grantable until `retry_waiters` runs.
    stalled: bool,
}

impl WaitQueue {
    pub(crate) fn with_capacity(cap: u32) -> WaitQueue {
        let mut w = Vec::with_capacity(cap as usize);
        for i in 0..cap {
            w.push(Waiter { start: 0, end: 0, token: 0, next: if i + 1 < cap { i + 1 } else { NIL } });
        }
        WaitQueue { w, head: NIL, tail: NIL, free: if cap > 0 { 0 } else { NIL }, len: 0, stalled: false }
    }

    fn overlaps_any(&self, start: u64, end: u64, stop_at: u32) -> bool {
        let mut i = self.head;
        while i != NIL && i != stop_at {
            let w = &self.w[i as usize];
            if w.start < end && start < w.end {
                return true;
            }
            i = w.next;
        }
        false
    }

    fn push(&mut self, start: u64, end: u64, token: u64) -> Result<(), CacheError> {
        let i = self.free;
        if i == NIL {
            return Err(CacheError::WaitersFull { capacity: self.w.len() as u32 });
        }
        self.free = self.w[i as usize].next;
        self.w[i as usize] = Waiter { start, end, token, next: NIL };
        if self.tail == NIL {
            self.head = i;
        } else {
            self.w[self.tail as usize].next = i;
        }
        self.tail = i;
        self.len += 1;
        Ok(())
    }

    /// Unlink `i` whose predecessor in the queue is `prev` (NIL: it is the head).
    fn unlink(&mut self, prev: u32, i: u32) {
        let next = self.w[i as usize].next;
        if prev == NIL {
            self.head = next;
        } else {
            self.w[prev as usize].next = next;
        }
        if self.tail == i {
            self.tail = prev;
        }
        self.w[i as usize].next = self.free;
        self.free = i;
        self.len -= 1;
    }

    pub(crate) fn check(&self, tree: &StateTree) -> Result<(), String> {
        let mut n = 0u32;
        let mut i = self.head;
        let mut last = NIL;
        while i != NIL {
            let w = self.w[i as usize];
            let blocked = tree.test(w.start, w.end, Bits::LOCKED, Test::Any) || self.overlaps_any(w.start, w.end, i);
            if !blocked && !self.stalled {
                return Err(format!("waiter {}..{} (token {}) is grantable but still queued", w.start, w.end, w.token));
            }
            n += 1;
            last = i;
            i = w.next;
            if n > self.len {
                return Err("waiter queue has a cycle".into());
            }
        }
        if n != self.len || last != self.tail {
            return Err(format!("waiter queue length {n} != {} or tail wrong", self.len));
        }
        Ok(())
    }
}

/// What [`StateTree::lock`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOutcome {
    /// The caller holds the lock now.
    Granted,
    /// The token is queued; it comes back from an `unlock` when the lock is granted to it.
    Queued,
}

impl StateTree {
    /// Lock `[start, end)` exclusively, or queue `token` to be granted it later (see the module docs).
    ///
    /// # Errors
    /// [`CacheError::BadRange`] for an empty or reversed range; [`CacheError::WaitersFull`] when it must queue and
    /// the waiter pool is full; [`CacheError::TreeFull`] when the tree cannot record the lock. On error nothing
    /// changed.
    pub fn lock(&mut self, start: u64, end: u64, token: u64) -> Result<LockOutcome, CacheError> {
        if start >= end {
            return Err(CacheError::BadRange { start, end });
        }
        let conflict = (self.waiters.len > 0 && self.waiters.overlaps_any(start, end, NIL))
            || self.test(start, end, Bits::LOCKED, Test::Any);
        if conflict {
            self.waiters.push(start, end, token)?;
            return Ok(LockOutcome::Queued);
        }
        self.change(start, end, Change { set: Bits::LOCKED.0, clear: 0, tag: Tag::NONE }, UNLOCK_RESERVE)?;
        Ok(LockOutcome::Granted)
    }

    /// Lock `[start, end)` only if that can be done now; never queues.
    ///
    /// # Errors
    /// As [`StateTree::lock`], less `WaitersFull`.
    pub fn try_lock(&mut self, start: u64, end: u64) -> Result<bool, CacheError> {
        if start >= end {
            return Err(CacheError::BadRange { start, end });
        }
        if (self.waiters.len > 0 && self.waiters.overlaps_any(start, end, NIL))
            || self.test(start, end, Bits::LOCKED, Test::Any)
        {
            return Ok(false);
        }
        self.change(start, end, Change { set: Bits::LOCKED.0, clear: 0, tag: Tag::NONE }, UNLOCK_RESERVE)?;
        Ok(true)
    }

    /// Unlock `[start, end)` (all of it must be locked) and grant queued waiters whose ranges became free, pushing
    /// their tokens onto `woken` in FIFO order. Reserve `woken`'s capacity (the waiter pool size) at start so this
    /// never allocates.
    ///
    /// # Errors
    /// [`CacheError::NotLocked`] when some byte of the range is not locked (nothing changes);
    /// [`CacheError::TreeFull`] when even the unlock reserve cannot split the end ranges.
    pub fn unlock(&mut self, start: u64, end: u64, woken: &mut Vec<u64>) -> Result<(), CacheError> {
        if start >= end || !self.test(start, end, Bits::LOCKED, Test::All) {
            return Err(CacheError::NotLocked { start, end });
        }
        self.change(start, end, Change { set: 0, clear: Bits::LOCKED.0, tag: Tag::NONE }, 0)?;
        self.retry_waiters(woken);
        Ok(())
    }

    /// Grant every queued waiter that can be granted now (FIFO; a waiter is passed over only while an earlier one
    /// overlapping it still waits). `unlock` calls this; call it yourself after a [`CacheError::TreeFull`] left
    /// waiters stalled and nodes were freed.
    pub fn retry_waiters(&mut self, woken: &mut Vec<u64>) {
        self.waiters.stalled = false;
        let mut prev = NIL;
        let mut i = self.waiters.head;
        while i != NIL {
            let w = self.waiters.w[i as usize];
            let blocked = self.waiters.overlaps_any(w.start, w.end, i) || self.test(w.start, w.end, Bits::LOCKED, Test::Any);
            if !blocked {
                let set = Change { set: Bits::LOCKED.0, clear: 0, tag: Tag::NONE };
                if self.change(w.start, w.end, set, UNLOCK_RESERVE).is_err() {
                    self.waiters.stalled = true;
                    return;
                }
                self.waiters.unlink(prev, i);
                woken.push(w.token);
                i = w.next;
                continue;
            }
            prev = i;
            i = w.next;
        }
    }

    /// Lock requests queued now.
    pub fn waiter_count(&self) -> u32 {
        self.waiters.len
    }
}
