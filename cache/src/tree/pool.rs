//! The memory under a state tree's blocks: one anonymous mapping reserved when the tree is made, on transparent
//! hugepages when it is at least one hugepage long.
//!
//! Why not a `Vec`: the global allocator hands out 4 KiB pages (THP is `madvise`-only on Debian), and a tree of
//! 1 M ranges is ~36 MiB of blocks reached at random, so nearly every lookup also missed the TLB. On 2 MiB pages the
//! whole pool needs a few dozen TLB entries; measured on the 2-vCPU VM (`bench/state-tree.sh`, same binary, pool on
//! 4 KiB vs 2 MiB pages, 3 runs each): set, find, clear and lock 5-10 % faster.

use std::ops::{Deref, DerefMut};

use nvstack_driver::anon::{AnonMap, THP_BYTES};

use super::blocks::Block;

/// `n` blocks in one anonymous mapping. Reached as a slice (`Deref<Target = [Block]>`).
pub(super) struct BlockPool {
    map: AnonMap,
    n: usize,
}

impl BlockPool {
    /// `n` empty blocks (length 0: zeroed memory is an empty block).
    pub(super) fn new(n: usize) -> std::io::Result<BlockPool> {
        let bytes = n
            .checked_mul(std::mem::size_of::<Block>())
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "block pool size overflows"))?;
        let map = AnonMap::new(bytes, bytes >= THP_BYTES)?;
        Ok(BlockPool { map, n })
    }
}

// The slice casts below rely on these: the mapping's base (page-aligned) suits a Block, and a Block is plain integers.
const _: () = assert!(std::mem::align_of::<Block>() <= 4096);

impl Deref for BlockPool {
    type Target = [Block];
    fn deref(&self) -> &[Block] {
        // SAFETY: the mapping is page-aligned (enough for Block's alignment, asserted above) and at least
        // `n * size_of::<Block>()` bytes (checked in `new`); it was zeroed by the kernel, and a Block is integer
        // arrays only, so every byte pattern, zero included, is a valid Block; `self` owns the mapping and hands out
        // no other pointer into it, so the borrow of `self` is the borrow of the blocks.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().as_ptr().cast::<Block>(), self.n) }
    }
}

impl DerefMut for BlockPool {
    fn deref_mut(&mut self) -> &mut [Block] {
        // SAFETY: as in `deref`; `&mut self` makes this the only borrow of the blocks.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_ptr().as_ptr().cast::<Block>(), self.n) }
    }
}
