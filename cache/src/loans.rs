//! Read loans across reactors: which cache pages a shard has lent to which channel, and when the loans end.
//!
//! A read hit that arrives from another reactor is not copied by the shard: writing the caller's buffer from here
//! would pull each of its cache lines over from the caller's core. The shard lends the page instead (its address
//! travels back in the piece), and the channel copies on its own core. While lent, a page's bytes must not
//! change and its slot must not be reused.
//!
//! No atomic operation per loan: the shard numbers its loans per channel and keeps them in a FIFO with a local pin
//! count per slot ([`LoanBook`]); the channel marks loans done in any order and publishes a watermark (every loan
//! below it is done) with one release store at the end of each of its polls ([`LoanWindow`]); the shard reads the
//! watermark now and then (each poll while loans are out, and before it changes a pinned page) and unpins what lies
//! below it.

/// Loans a shard may have out to one channel before it copies instead of lending (a limit in DESIGN.md).
pub const LOAN_WINDOW: u64 = 1024;
/// Bits of a loan's number that travel with it (the window is far smaller, so the rest is implied).
pub(crate) const SEQ_BITS: u32 = 24;
const SEQ_MASK: u32 = (1 << SEQ_BITS) - 1;
const WORDS: usize = (LOAN_WINDOW / 64) as usize;

/// One channel's loans from this shard, in lend order.
struct LoanFifo {
    slots: Box<[u32]>,
    issued: u64,
    released: u64,
}

/// A shard's record of its loans, per channel id.
pub(crate) struct LoanBook {
    fifos: Box<[LoanFifo]>,
    outstanding: u64,
    /// Bit `ch` set: channel `ch` has loans not yet released (channel ids are below 64).
    active: u64,
}

impl LoanBook {
    /// A book for `channels` channel ids, at most 64 (allocates `channels * LOAN_WINDOW` slot numbers, once).
    pub(crate) fn new(channels: usize) -> LoanBook {
        LoanBook {
            fifos: (0..channels.min(64))
                .map(|_| LoanFifo { slots: vec![0; LOAN_WINDOW as usize].into_boxed_slice(), issued: 0, released: 0 })
                .collect(),
            outstanding: 0,
            active: 0,
        }
    }

    /// Loans not yet released (lent, or copied but not yet seen in a watermark).
    #[inline]
    pub(crate) fn outstanding(&self) -> u64 {
        self.outstanding
    }

    /// Record a loan of `slot` to channel `ch`: its number, or `None` when the channel's window is full (or the id
    /// is unknown); then the caller copies instead.
    pub(crate) fn lend(&mut self, ch: usize, slot: u32) -> Option<u64> {
        let f = self.fifos.get_mut(ch)?;
        if f.issued - f.released >= LOAN_WINDOW {
            return None;
        }
        let seq = f.issued;
        f.slots[(seq % LOAN_WINDOW) as usize] = slot;
        f.issued += 1;
        self.outstanding += 1;
        if ch < 64 {
            self.active |= 1 << ch;
        }
        Some(seq)
    }

    /// Release every loan below each channel's watermark (`acked(ch)`), calling `unpin(slot)` for each.
    pub(crate) fn reclaim(&mut self, acked: impl Fn(usize) -> u64, mut unpin: impl FnMut(u32)) {
        if self.outstanding == 0 {
            return;
        }
        let mut bits = self.active;
        while bits != 0 {
            let ch = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            let Some(f) = self.fifos.get_mut(ch) else { continue };
            // A watermark never passes what was issued; clamp anyway (a confused channel must not unpin the future).
            let upto = acked(ch).min(f.issued);
            while f.released < upto {
                unpin(f.slots[(f.released % LOAN_WINDOW) as usize]);
                f.released += 1;
                self.outstanding -= 1;
            }
            if f.released == f.issued {
                self.active &= !(1 << ch);
            }
        }
    }

    /// The next loan number for channel `ch`.
    #[cfg(test)]
    pub(crate) fn issued(&self, ch: usize) -> u64 {
        self.fifos.get(ch).map_or(0, |f| f.issued)
    }
}

/// A channel's view of one shard's loans: which are done, and the watermark below which all are.
#[derive(Debug, Clone)]
pub(crate) struct LoanWindow {
    base: u64,
    done: [u64; WORDS],
}

impl LoanWindow {
    /// A window whose first loan is number `base`.
    pub(crate) fn starting_at(base: u64) -> LoanWindow {
        LoanWindow { base, done: [0; WORDS] }
    }

    /// Loan `seq` (its low [`SEQ_BITS`] bits, as it travels) is done. Returns the new watermark, or `None` when the
    /// number is outside the window (a bug: nothing changes).
    pub(crate) fn finish(&mut self, seq_low: u32) -> Option<u64> {
        let off = u64::from(seq_low.wrapping_sub(self.base as u32) & SEQ_MASK);
        if off >= LOAN_WINDOW {
            return None;
        }
        let i = ((self.base + off) % LOAN_WINDOW) as usize;
        if self.done[i / 64] & (1 << (i % 64)) != 0 {
            return None;
        }
        self.done[i / 64] |= 1 << (i % 64);
        loop {
            let j = (self.base % LOAN_WINDOW) as usize;
            if self.done[j / 64] & (1 << (j % 64)) == 0 {
                break;
            }
            self.done[j / 64] &= !(1 << (j % 64));
            self.base += 1;
        }
        Some(self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[test]
    fn out_of_order_finishes_release_only_below_the_watermark() {
        let mut book = LoanBook::new(2);
        let mut win = LoanWindow::starting_at(book.issued(1));
        let seqs: Vec<u64> = (0..5u32).map(|s| book.lend(1, 100 + s).unwrap()).collect();
        assert_eq!(seqs, vec![0, 1, 2, 3, 4]);
        let acked = Cell::new(0u64);
        let mut unpinned = Vec::new();
        // Loan 2 and 1 finish first: the watermark stays at 0 until loan 0 finishes.
        assert_eq!(win.finish(2), Some(0));
        assert_eq!(win.finish(1), Some(0));
        book.reclaim(|_| acked.get(), |s| unpinned.push(s));
        assert!(unpinned.is_empty());
        acked.set(win.finish(0).unwrap());
        assert_eq!(acked.get(), 3);
        book.reclaim(|_| acked.get(), |s| unpinned.push(s));
        assert_eq!(unpinned, vec![100, 101, 102]);
        assert_eq!(book.outstanding(), 2);
        // A finish outside the window or twice is refused.
        assert_eq!(win.finish(2), None);
        assert_eq!(win.finish(3 + LOAN_WINDOW as u32), None);
        assert_eq!(win.finish(SEQ_MASK), None, "far behind the window");
        acked.set(win.finish(4).unwrap());
        assert_eq!(acked.get(), 3);
        acked.set(win.finish(3).unwrap());
        book.reclaim(|_| acked.get(), |s| unpinned.push(s));
        assert_eq!(unpinned, vec![100, 101, 102, 103, 104]);
        assert_eq!(book.outstanding(), 0);
    }

    #[test]
    fn a_full_window_refuses_loans_until_released_and_numbers_wrap() {
        let mut book = LoanBook::new(1);
        for s in 0..LOAN_WINDOW {
            assert!(book.lend(0, s as u32).is_some());
        }
        assert_eq!(book.lend(0, 7), None);
        assert_eq!(book.lend(5, 7), None, "unknown channel id");
        book.reclaim(|_| LOAN_WINDOW, |_| {});
        assert_eq!(book.outstanding(), 0);
        // Windows near the wrap of the travelling number.
        let low = |x: u64| (x as u32) & SEQ_MASK;
        let base = u64::from(SEQ_MASK) - 1 + (5 << SEQ_BITS);
        let mut win = LoanWindow::starting_at(base);
        assert_eq!(win.finish(low(base + 2)), Some(base));
        assert_eq!(win.finish(low(base)), Some(base + 1));
        assert_eq!(win.finish(low(base + 1)), Some(base + 3));
    }
}
