//! Stripes: which reactor owns which device bytes, and how a request is cut into per-owner pieces.
//!
//! Building block of the multi-reactor cache (see the crate docs): the device address space is cut into stripes
//! of `stripe_bytes` (a power of two, at least one cache page); stripe `k` belongs to reactor `k % reactors`. A
//! request is split at stripe boundaries into [`Piece`]s, each naming its owner and where its data starts inside
//! the request's buffer; [`seg_slices`] then names the parts of the request's segments a piece covers, so a piece
//! can travel to its owner as a descriptor of raw segments into the caller's buffer (no copy).
//! Pure arithmetic, no allocation.

use crate::CacheError;

/// The stripe layout of one cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StripeMap {
    shift: u32,
    reactors: u32,
}

/// A part of a request that one reactor serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// First device byte.
    pub start: u64,
    /// One past the last device byte.
    pub end: u64,
    /// The reactor that owns these bytes.
    pub owner: u32,
    /// Where the piece's data starts inside the request's buffer.
    pub buf_offset: u64,
}

impl StripeMap {
    /// Stripes of `stripe_bytes` over `reactors` reactors.
    ///
    /// # Errors
    /// [`CacheError::Config`] unless `stripe_bytes` is a power of two of at least 4 KiB and `reactors` is 1..=1024.
    pub fn new(stripe_bytes: u64, reactors: u32) -> Result<StripeMap, CacheError> {
        if !stripe_bytes.is_power_of_two() || stripe_bytes < crate::pages::PAGE_BYTES {
            return Err(CacheError::Config { what: "stripe size", reason: "must be a power of two of at least 4 KiB" });
        }
        if reactors == 0 || reactors > 1024 {
            return Err(CacheError::Config { what: "reactor count", reason: "must be 1..=1024" });
        }
        Ok(StripeMap { shift: stripe_bytes.trailing_zeros(), reactors })
    }

    /// Bytes per stripe.
    pub fn stripe_bytes(&self) -> u64 {
        1 << self.shift
    }

    /// The reactor owning byte `offset`.
    #[inline]
    pub fn owner(&self, offset: u64) -> u32 {
        let stripe = offset >> self.shift;
        // Power-of-two reactor counts (the usual case) take a mask instead of a division.
        if self.reactors.is_power_of_two() {
            (stripe & u64::from(self.reactors - 1)) as u32
        } else {
            (stripe % u64::from(self.reactors)) as u32
        }
    }

    /// Call `f` for each piece of `[start, end)`, in order. Consecutive stripes with the same owner (one reactor)
    /// stay one piece.
    pub fn split(&self, start: u64, end: u64, mut f: impl FnMut(Piece)) {
        let mut pos = start;
        while pos < end {
            let owner = self.owner(pos);
            let mut piece_end = pos;
            loop {
                let stripe_end = ((piece_end >> self.shift) + 1).checked_shl(self.shift).unwrap_or(u64::MAX);
                piece_end = stripe_end.min(end);
                if piece_end >= end || self.owner(piece_end) != owner {
                    break;
                }
            }
            f(Piece { start: pos, end: piece_end, owner, buf_offset: pos - start });
            pos = piece_end;
        }
    }
}

/// For the byte window `[offset, offset + len)` of a buffer made of segments of `seg_lens`, call `f(segment index,
/// offset in that segment, length)` for each part, in order. Returns false when the window runs past the segments.
pub fn seg_slices(seg_lens: impl IntoIterator<Item = u64>, offset: u64, len: u64, mut f: impl FnMut(usize, u64, u64)) -> bool {
    let end = match offset.checked_add(len) {
        Some(e) => e,
        None => return false,
    };
    let mut base = 0u64;
    let mut pos = offset;
    for (i, sl) in seg_lens.into_iter().enumerate() {
        let seg_end = base + sl;
        if pos < seg_end && pos < end {
            let take = seg_end.min(end) - pos;
            f(i, pos - base, take);
            pos += take;
        }
        if pos >= end {
            return true;
        }
        base = seg_end;
    }
    len == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_range_in_order_one_owner_each() {
        for reactors in 1..5u32 {
            let m = StripeMap::new(1 << 16, reactors).unwrap();
            for (start, len) in [(0u64, 4096u64), (60 << 10, 8 << 10), (1 << 16, 1 << 20), (12345 * 512, 777 * 512)] {
                let mut pieces = Vec::new();
                m.split(start, start + len, |p| pieces.push(p));
                let mut pos = start;
                for p in &pieces {
                    assert_eq!(p.start, pos);
                    assert_eq!(p.buf_offset, pos - start);
                    assert!(p.end > p.start);
                    for b in (p.start..p.end).step_by(4096) {
                        assert_eq!(m.owner(b), p.owner);
                    }
                    pos = p.end;
                }
                assert_eq!(pos, start + len);
                for w in pieces.windows(2) {
                    assert_ne!(w[0].owner, w[1].owner, "neighbouring pieces with one owner must be one piece");
                }
                if reactors == 1 {
                    assert_eq!(pieces.len(), 1);
                }
            }
        }
    }

    #[test]
    fn seg_slices_name_exactly_the_window() {
        let lens = [4096u64, 8192, 512, 4096];
        let total: u64 = lens.iter().sum();
        for offset in (0..total).step_by(512) {
            for len in (0..=total - offset).step_by(512) {
                let mut got = Vec::new();
                assert!(seg_slices(lens, offset, len, |i, o, l| got.push((i, o, l))));
                // Rebuild the byte positions the slices name and compare with the window.
                let mut bytes = Vec::new();
                for (i, o, l) in got {
                    assert!(l > 0 && o + l <= lens[i]);
                    let base: u64 = lens[..i].iter().sum();
                    bytes.push((base + o, base + o + l));
                }
                let mut pos = offset;
                for (s, e) in bytes {
                    assert_eq!(s, pos);
                    pos = e;
                }
                assert_eq!(pos, offset + len);
            }
        }
        assert!(!seg_slices(lens, total - 512, 1024, |_, _, _| {}));
    }

    #[test]
    fn bad_layouts_are_errors() {
        assert!(StripeMap::new(3000, 2).is_err());
        assert!(StripeMap::new(1024, 2).is_err());
        assert!(StripeMap::new(1 << 20, 0).is_err());
    }
}
