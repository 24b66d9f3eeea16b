//! `--verify`: what a written block holds, and the per-core table that says what each block should hold now.
//!
//! # Pattern
//! Every block (of the device's block size) a write carries holds, as little-endian 64-bit words:
//! word 0 the block's LBA; word 1 a tag `0x4e56 << 48 | core << 32 | generation`; every further word `i` a value
//! derived from words 0 and 1 and `i` (so a torn, stale or misplaced block differs somewhere).
//!
//! # Table
//! Each core owns a slice of the device (see `PerfConfig::sliced`) cut into I/O-size slots; I/Os are aligned to the
//! I/O size, so a request covers exactly one slot. The table holds, per slot, the generation of the last write to it
//! that completed successfully (0: not written by this run), and an in-flight bit. The job never sends an I/O to a
//! slot with any I/O in flight, so completions may come back in any order and a read always has one right answer.
//!
//! # What is checked
//! - Reads of slots this run wrote: every block, every word.
//! - Reads of slots never written: not checked (counted as `unchecked_reads`), except that read-only workloads with
//!   `--verify` first pre-fill each core's slice (generation 1), so every read is checked.
//! - A write that fails leaves its slot unknown: later reads of it are not checked (counted), the error is counted.
//!
//! Any mismatch is counted, the first [`MAX_REPORTED`] are kept with LBA, expected and found values, and the run
//! exits with status 1.

use nvstack_driver::dma::DmaBuf;

/// Mismatches kept per core for the report.
pub const MAX_REPORTED: usize = 16;
/// Tag bits that mark a block as written by nvstack perf.
const MAGIC: u64 = 0x4e56 << 48;
/// In-flight bit of a table entry.
const BUSY: u32 = 1 << 31;
/// Generation bits of a table entry.
const GEN_MASK: u32 = BUSY - 1;
/// Generation of a slot whose last write failed: contents unknown.
const GEN_UNKNOWN: u32 = GEN_MASK;
/// Largest generation handed out before wrapping to 1.
const GEN_MAX: u32 = GEN_MASK - 1;

#[inline]
fn tag(core: u16, gen: u32) -> u64 {
    MAGIC | (u64::from(core) << 32) | u64::from(gen)
}

#[inline]
fn body_word(lba: u64, tag: u64, i: u64) -> u64 {
    let seed = lba.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ tag.wrapping_mul(0xc2b2_ae3d_27d4_eb4f);
    seed.wrapping_add(i.wrapping_mul(0x1656_67b1_9e37_79f9)).rotate_left((i & 63) as u32)
}

/// One mismatch, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Mismatch {
    /// The block read.
    pub lba: u64,
    /// Generation it should hold.
    pub expected_gen: u32,
    /// Core (reactor index) that wrote it.
    pub expected_core: u16,
    /// LBA word found.
    pub found_lba: u64,
    /// Generation found (low 32 bits of the tag word).
    pub found_gen: u32,
    /// Core found (bits 32..48 of the tag word).
    pub found_core: u16,
    /// Whether the tag word carried nvstack's magic.
    pub found_magic: bool,
    /// First 64-bit word in the block that differs.
    pub word: u32,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LBA {}: expected generation {} from core {}, found ",
            self.lba, self.expected_gen, self.expected_core
        )?;
        if self.found_magic {
            write!(f, "LBA {} generation {} from core {}", self.found_lba, self.found_gen, self.found_core)?;
        } else {
            write!(f, "no nvstack pattern (first words {:#x})", self.found_lba)?;
        }
        write!(f, "; first differing word {}", self.word)
    }
}

/// Verify counters of one core.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct VerifyStats {
    /// Blocks compared.
    pub checked_blocks: u64,
    /// Blocks that did not match.
    pub mismatches: u64,
    /// Reads not checked (slot never written by this run, or its last write failed).
    pub unchecked_reads: u64,
    /// The first mismatches.
    pub first: Vec<Mismatch>,
}

/// One core's verify table (allocated at start).
#[derive(Debug)]
pub struct VerifyState {
    core: u16,
    block_size: u32,
    blocks_per_io: u64,
    slots: Vec<u32>,
    next_gen: u32,
    stats: VerifyStats,
}

impl VerifyState {
    /// A table for `slot_count` slots of `blocks_per_io` blocks of `block_size` bytes, for core `core`.
    pub fn new(core: u16, block_size: u32, blocks_per_io: u64, slot_count: usize) -> VerifyState {
        VerifyState {
            core,
            block_size,
            blocks_per_io,
            slots: vec![0; slot_count],
            next_gen: 1,
            stats: VerifyStats { first: Vec::with_capacity(MAX_REPORTED), ..VerifyStats::default() },
        }
    }

    /// Claim `slot` for one I/O: false if an I/O is in flight to it.
    #[inline]
    pub fn try_claim(&mut self, slot: usize) -> bool {
        match self.slots.get_mut(slot) {
            Some(e) if *e & BUSY == 0 => {
                *e |= BUSY;
                true
            }
            _ => false,
        }
    }

    /// The first slot at or after `slot` (wrapping) with nothing in flight, claimed; `None` if all are busy.
    pub fn claim_from(&mut self, slot: usize) -> Option<usize> {
        let n = self.slots.len();
        (0..n).map(|k| (slot + k) % n).find(|&s| self.try_claim(s))
    }

    /// Drop the claim on `slot` without an I/O having happened (a refused submission).
    pub fn release(&mut self, slot: usize) {
        if let Some(e) = self.slots.get_mut(slot) {
            *e &= !BUSY;
        }
    }

    /// Fill `buf` for a write of the slot starting at `first_lba`; returns the generation to pass to
    /// [`VerifyState::write_done`].
    pub fn fill(&mut self, buf: &mut DmaBuf, first_lba: u64) -> u32 {
        let gen = self.next_gen;
        self.next_gen = if gen >= GEN_MAX { 1 } else { gen + 1 };
        let t = tag(self.core, gen);
        let words = (self.block_size / 8) as usize;
        for b in 0..self.blocks_per_io {
            let lba = first_lba + b;
            let base = b as usize * self.block_size as usize;
            // Offsets are inside the buffer: it is blocks_per_io * block_size long (set up by the job).
            let _ = buf.write_u64(base, lba);
            let _ = buf.write_u64(base + 8, t);
            for i in 2..words {
                let _ = buf.write_u64(base + i * 8, body_word(lba, t, i as u64));
            }
        }
        gen
    }

    /// A write to `slot` finished: on success the slot now holds `gen`, else its contents are unknown.
    pub fn write_done(&mut self, slot: usize, gen: u32, ok: bool) {
        if let Some(e) = self.slots.get_mut(slot) {
            *e = if ok { gen & GEN_MASK } else { GEN_UNKNOWN };
        }
    }

    /// A read of `slot` (starting at `first_lba`) finished: check `buf` when it succeeded and the slot's contents are
    /// known. Returns the number of mismatching blocks.
    pub fn read_done(&mut self, slot: usize, buf: &DmaBuf, first_lba: u64, ok: bool) -> u64 {
        let Some(e) = self.slots.get_mut(slot) else { return 0 };
        *e &= !BUSY;
        let gen = *e;
        if !ok {
            return 0;
        }
        if gen == 0 || gen == GEN_UNKNOWN {
            self.stats.unchecked_reads += 1;
            return 0;
        }
        let mut bad = 0;
        for b in 0..self.blocks_per_io {
            if let Some(m) = self.check_block(buf, b, first_lba + b, gen) {
                bad += 1;
                self.stats.mismatches += 1;
                if self.stats.first.len() < MAX_REPORTED {
                    self.stats.first.push(m);
                }
            }
            self.stats.checked_blocks += 1;
        }
        bad
    }

    fn check_block(&self, buf: &DmaBuf, b: u64, lba: u64, gen: u32) -> Option<Mismatch> {
        let t = tag(self.core, gen);
        let base = b as usize * self.block_size as usize;
        let words = (self.block_size / 8) as usize;
        let w0 = buf.read_u64(base).unwrap_or(!lba);
        let w1 = buf.read_u64(base + 8).unwrap_or(!t);
        let mut first_bad = if w0 != lba {
            Some(0)
        } else if w1 != t {
            Some(1)
        } else {
            None
        };
        if first_bad.is_none() {
            first_bad = (2..words).find(|&i| buf.read_u64(base + i * 8) != Some(body_word(lba, t, i as u64)));
        }
        let word = first_bad?;
        Some(Mismatch {
            lba,
            expected_gen: gen,
            expected_core: self.core,
            found_lba: w0,
            found_gen: (w1 & 0xffff_ffff) as u32,
            found_core: ((w1 >> 32) & 0xffff) as u16,
            found_magic: w1 & (0xffff << 48) == MAGIC,
            word: u32::try_from(word).unwrap_or(u32::MAX),
        })
    }

    /// Counters so far.
    #[cfg(test)]
    pub fn stats(&self) -> &VerifyStats {
        &self.stats
    }

    /// Take the counters out (end of run).
    pub fn take_stats(&mut self) -> VerifyStats {
        std::mem::take(&mut self.stats)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use nvstack_driver::dma::{Arena, ArenaConfig, BufPool};

    use super::*;

    fn pool() -> BufPool {
        let a: Arc<Arena> = Arena::new(ArenaConfig { size_bytes: 4 << 20, ..Default::default() }).unwrap();
        BufPool::new(&a, 8192, 4, 4096, "verify test").unwrap()
    }

    #[test]
    fn written_pattern_reads_back_clean_and_corruption_is_found() {
        let mut p = pool();
        let mut v = VerifyState::new(3, 4096, 2, 8);
        let mut buf = p.get().unwrap();
        assert!(v.try_claim(5));
        assert!(!v.try_claim(5), "a busy slot cannot be claimed twice");
        let gen = v.fill(&mut buf, 10);
        v.write_done(5, gen, true);
        assert!(v.try_claim(5));
        assert_eq!(v.read_done(5, &buf, 10, true), 0);
        assert_eq!(v.stats().checked_blocks, 2);

        // Flip one word in the second block.
        let old = buf.read_u64(4096 + 800).unwrap();
        buf.write_u64(4096 + 800, old ^ 1).unwrap();
        assert!(v.try_claim(5));
        assert_eq!(v.read_done(5, &buf, 10, true), 1);
        let m = v.stats().first[0];
        assert_eq!((m.lba, m.expected_gen, m.expected_core, m.word), (11, gen, 3, 100));
        assert!(m.found_magic);

        // A stale generation is found at word 1 and decoded.
        let gen2 = v.fill(&mut buf, 10);
        let _ = v.fill(&mut buf, 10);
        v.write_done(5, gen2 + 1, true);
        assert!(v.try_claim(5));
        let mut scratch = p.get().unwrap();
        let g = v.fill(&mut scratch, 10);
        assert_eq!(v.read_done(5, &scratch, 10, true), 2, "generation {g} is not the one the table holds");
        assert_eq!(v.stats().first[1].word, 1);
        p.put(buf).unwrap();
        p.put(scratch).unwrap();
    }

    #[test]
    fn unwritten_and_failed_slots_are_not_checked() {
        let mut p = pool();
        let mut v = VerifyState::new(0, 4096, 2, 4);
        let mut buf = p.get().unwrap();
        buf.fill(0xaa);
        assert!(v.try_claim(0));
        assert_eq!(v.read_done(0, &buf, 0, true), 0);
        assert!(v.try_claim(1));
        v.write_done(1, 7, false);
        assert!(v.try_claim(1));
        assert_eq!(v.read_done(1, &buf, 2, true), 0);
        assert_eq!(v.stats().unchecked_reads, 2);
        assert_eq!(v.stats().mismatches, 0);
        // claim_from skips busy slots and wraps.
        assert!(v.try_claim(3));
        assert_eq!(v.claim_from(3), Some(0));
        p.put(buf).unwrap();
    }
}
