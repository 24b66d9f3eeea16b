//! Data pointers: PRP entries and lists (Base spec 4.1.1), SGL descriptors (4.1.8). Pure functions over IOVAs:
//! they write list entries into a caller's `&mut [u64]` (the command's list slot, copied to the arena by the
//! queue-pair code) and never touch device memory themselves.
//!
//! # PRP rules (4.1.1)
//! - PRP1 is the first page's address and may carry an offset (dword aligned).
//! - If the transfer spans two pages, PRP2 is the second page's address; if more, PRP2 points to a PRP list.
//! - Every entry after the first is page aligned. A list page's last entry points to the next list page when more
//!   entries follow.
//! - So a multi-segment transfer is PRP-describable only when every segment but the first starts on a page boundary
//!   and every segment but the last ends on one. Otherwise SGLs are needed (where the controller has them).

/// A piece of DMA memory as the device sees it.
pub trait DmaSeg {
    /// IOVA of the first byte.
    fn iova(&self) -> u64;
    /// Length in bytes.
    fn len(&self) -> u32;
    /// Whether the piece is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DmaSeg for (u64, u32) {
    fn iova(&self) -> u64 {
        self.0
    }
    fn len(&self) -> u32 {
        self.1
    }
}

/// Why a transfer cannot be described.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DptrError {
    /// No data.
    Empty,
    /// A piece's address or length is not dword aligned.
    NotDwordAligned {
        /// Piece index.
        index: usize,
    },
    /// A piece boundary inside the transfer is not on a page boundary (PRP cannot describe it).
    NotPageAligned {
        /// Index of the piece whose start (or whose predecessor's end) is not page aligned.
        index: usize,
    },
    /// More entries or descriptors than the list slot holds.
    ListFull {
        /// Slot capacity in entries.
        capacity: usize,
    },
}

/// A built data pointer: the two DPTR quadwords and how many list `u64`s were written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dptr {
    /// DPTR bytes 7:0 (PRP1, or SGL1 address).
    pub dptr1: u64,
    /// DPTR bytes 15:8 (PRP2, or SGL1 length and identifier).
    pub dptr2: u64,
    /// `u64`s written to the list slot (0 when no list).
    pub list_len: usize,
}

/// The bytes `[offset, offset + len)` of a list of segments, as pieces. Clone to walk again.
#[derive(Debug)]
pub struct Window<'a, S: DmaSeg> {
    segs: &'a [S],
    index: usize,
    skip: u64,
    remaining: u64,
}

impl<S: DmaSeg> Clone for Window<'_, S> {
    fn clone(&self) -> Self {
        Window { segs: self.segs, index: self.index, skip: self.skip, remaining: self.remaining }
    }
}

impl<'a, S: DmaSeg> Window<'a, S> {
    /// The window `[offset, offset + len)` of `segs`. Pieces past the segments' end are simply not produced.
    pub fn new(segs: &'a [S], offset: u64, len: u64) -> Self {
        let mut index = 0;
        let mut skip = offset;
        while index < segs.len() && skip >= u64::from(segs[index].len()) {
            skip -= u64::from(segs[index].len());
            index += 1;
        }
        Window { segs, index, skip, remaining: len }
    }
}

impl<S: DmaSeg> Iterator for Window<'_, S> {
    type Item = (u64, u32);
    #[inline]
    fn next(&mut self) -> Option<(u64, u32)> {
        if self.remaining == 0 {
            return None;
        }
        let s = self.segs.get(self.index)?;
        let avail = u64::from(s.len()) - self.skip;
        let take = avail.min(self.remaining);
        let out = (s.iova() + self.skip, take as u32);
        self.remaining -= take;
        self.skip = 0;
        self.index += 1;
        Some(out)
    }
}

/// Build PRP1/PRP2 (and a PRP list in `list`, whose first byte the device sees at `list_iova`, page aligned and
/// contiguous) for `pieces`, with memory page size `page_size` (a power of two, at least 8).
///
/// # Errors
/// [`DptrError`] when the pieces are empty, misaligned, not PRP-describable, or need more list entries than `list`.
#[inline]
pub fn build_prp<I>(pieces: I, page_size: u64, list: &mut [u64], list_iova: u64) -> Result<Dptr, DptrError>
where
    I: Iterator<Item = (u64, u32)>,
{
    let mask = page_size - 1;
    let per_page = (page_size / 8) as usize;
    let capacity = list.len();
    let mut prp1 = None;
    let mut pending: Option<u64> = None;
    let mut slot = 0usize;
    let mut prev_end_aligned = true;
    // Place an entry that is known not to be the last one.
    let mut place = |x: u64, slot: &mut usize| -> Result<(), DptrError> {
        if *slot % per_page == per_page - 1 {
            // The last slot of a list page, with more entries to come: chain to the next list page.
            let next = list_iova + (*slot as u64 + 1) * 8;
            *list.get_mut(*slot).ok_or(DptrError::ListFull { capacity })? = next;
            *slot += 1;
        }
        *list.get_mut(*slot).ok_or(DptrError::ListFull { capacity })? = x;
        *slot += 1;
        Ok(())
    };
    for (index, (iova, len)) in pieces.enumerate() {
        if iova & 3 != 0 || len & 3 != 0 {
            return Err(DptrError::NotDwordAligned { index });
        }
        if len == 0 {
            continue;
        }
        if index > 0 && (iova & mask != 0 || !prev_end_aligned) {
            return Err(DptrError::NotPageAligned { index });
        }
        let end = iova + u64::from(len);
        prev_end_aligned = end & mask == 0;
        let mut addr = iova;
        while addr < end {
            if prp1.is_none() {
                prp1 = Some(addr);
            } else {
                if let Some(p) = pending.take() {
                    place(p, &mut slot)?;
                }
                pending = Some(addr);
            }
            addr = (addr & !mask) + page_size;
        }
    }
    let prp1 = prp1.ok_or(DptrError::Empty)?;
    let prp2 = match pending {
        None => 0,
        Some(x) if slot == 0 => x,
        Some(x) => {
            *list.get_mut(slot).ok_or(DptrError::ListFull { capacity })? = x;
            slot += 1;
            list_iova
        }
    };
    Ok(Dptr { dptr1: prp1, dptr2: prp2, list_len: slot })
}

/// Build an SGL for `pieces`: one data block descriptor in SGL1 when there is one piece, else a last-segment
/// descriptor in SGL1 pointing at data block descriptors written to `list` (two `u64`s each) at `list_iova`.
/// Physically adjacent pieces are merged. `dword_aligned` applies the controller's dword-alignment rule (SGLS = 2).
///
/// # Errors
/// [`DptrError`] for no data, misalignment under the rule, or more descriptors than `list` holds.
#[inline]
pub fn build_sgl<I>(pieces: I, dword_aligned: bool, list: &mut [u64], list_iova: u64) -> Result<Dptr, DptrError>
where
    I: Iterator<Item = (u64, u32)>,
{
    use super::spec::{sgl_type, SglDescriptor};
    let mut count = 0usize;
    let mut cur: Option<(u64, u64)> = None;
    let mut emit = |d: (u64, u64), count: &mut usize| -> Result<(), DptrError> {
        let len = u32::try_from(d.1).map_err(|_| DptrError::ListFull { capacity: list.len() / 2 })?;
        let (a, b) = SglDescriptor::new(d.0, len, sgl_type::DATA_BLOCK).to_dptr();
        let i = *count * 2;
        if i + 1 >= list.len() {
            return Err(DptrError::ListFull { capacity: list.len() / 2 });
        }
        list[i] = a;
        list[i + 1] = b;
        *count += 1;
        Ok(())
    };
    for (index, (iova, len)) in pieces.enumerate() {
        if dword_aligned && (iova & 3 != 0 || len & 3 != 0) {
            return Err(DptrError::NotDwordAligned { index });
        }
        if len == 0 {
            continue;
        }
        cur = match cur {
            Some((a, l)) if a + l == iova && l + u64::from(len) <= u64::from(u32::MAX) => Some((a, l + u64::from(len))),
            Some(d) => {
                emit(d, &mut count)?;
                Some((iova, u64::from(len)))
            }
            None => Some((iova, u64::from(len))),
        };
    }
    let last = cur.ok_or(DptrError::Empty)?;
    if count == 0 {
        let (a, b) = SglDescriptor::new(last.0, last.1 as u32, sgl_type::DATA_BLOCK).to_dptr();
        return Ok(Dptr { dptr1: a, dptr2: b, list_len: 0 });
    }
    emit(last, &mut count)?;
    let (a, b) = SglDescriptor::new(list_iova, (count * 16) as u32, sgl_type::LAST_SEGMENT).to_dptr();
    Ok(Dptr { dptr1: a, dptr2: b, list_len: count * 2 })
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIST_IOVA: u64 = 0x7000_0000;

    /// The device's side, written from the spec independently of the builder: walk PRP1/PRP2/lists for `total`
    /// bytes and return the byte ranges transferred (adjacent ranges merged).
    fn walk_prp(d: Dptr, list: &[u64], total: u64, page: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |a: u64, l: u64| match out.last_mut() {
            Some(last) if last.0 + last.1 == a => last.1 += l,
            _ => out.push((a, l)),
        };
        let first = (page - (d.dptr1 % page)).min(total);
        push(d.dptr1, first);
        let mut left = total - first;
        if left == 0 {
            return out;
        }
        if left <= page {
            assert_eq!(d.dptr2 % page, 0, "PRP2 must be page aligned");
            push(d.dptr2, left);
            return out;
        }
        let per = (page / 8) as usize;
        let mut at = ((d.dptr2 - LIST_IOVA) / 8) as usize;
        while left > 0 {
            let entries_left = left.div_ceil(page) as usize;
            if at % per == per - 1 && entries_left > 1 {
                at = ((list[at] - LIST_IOVA) / 8) as usize;
                continue;
            }
            let e = list[at];
            assert_eq!(e % page, 0, "list entries must be page aligned");
            let n = left.min(page);
            push(e, n);
            left -= n;
            at += 1;
        }
        out
    }

    fn merged(pieces: &[(u64, u32)]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(a, l) in pieces.iter().filter(|p| p.1 > 0) {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == a => last.1 += u64::from(l),
                _ => out.push((a, u64::from(l))),
            }
        }
        out
    }

    /// Independent statement of PRP-describability.
    fn prp_ok(pieces: &[(u64, u32)], page: u64) -> bool {
        let p: Vec<_> = pieces.iter().filter(|p| p.1 > 0).collect();
        !p.is_empty()
            && pieces.iter().all(|x| x.0 % 4 == 0 && x.1 % 4 == 0)
            && p.iter().enumerate().all(|(i, x)| {
                (i == 0 || x.0 % page == 0) && (i == p.len() - 1 || (x.0 + u64::from(x.1)) % page == 0)
            })
    }

    fn check(pieces: &[(u64, u32)], page: u64, list_cap: usize) {
        let mut list = vec![0u64; list_cap];
        let total: u64 = pieces.iter().map(|p| u64::from(p.1)).sum();
        let r = build_prp(pieces.iter().copied(), page, &mut list, LIST_IOVA);
        if !prp_ok(pieces, page) {
            assert!(r.is_err(), "{pieces:?} accepted");
            return;
        }
        match r {
            Ok(d) => assert_eq!(walk_prp(d, &list, total, page), merged(pieces), "{pieces:?} page {page}"),
            Err(DptrError::ListFull { .. }) => {
                let pages: u64 = total.div_ceil(page) + 1;
                assert!(pages as usize > list_cap, "{pieces:?} refused as full with {list_cap} slots");
            }
            Err(e) => panic!("{pieces:?}: {e:?}"),
        }
    }

    #[test]
    fn prp_single_piece_exhaustive() {
        // Small page sizes make the exhaustive sweep cover list chaining many times over.
        for page in [64u64, 128] {
            for off in (0..2 * page).step_by(4) {
                for len in (4..=40 * page).step_by(4) {
                    check(&[(0x10_0000 + off, len as u32)], page, 64);
                }
            }
        }
    }

    #[test]
    fn prp_two_and_three_pieces_exhaustive() {
        let page = 64u64;
        for off0 in (0..page).step_by(4) {
            for len0 in (4..=3 * page).step_by(4) {
                for off1 in [0, 4, page / 2] {
                    for len1 in (4..=3 * page).step_by(4) {
                        let a = (0x20_0000 + off0, len0 as u32);
                        let b = (0x40_0000 + off1, len1 as u32);
                        check(&[a, b], page, 32);
                        check(&[a, b, (0x60_0000, 2 * page as u32)], page, 32);
                    }
                }
            }
        }
    }

    #[test]
    fn prp_4k_pages_sampled() {
        let page = 4096u64;
        for off in [0u64, 4, 512, 4092] {
            for pages in 1..=520u64 {
                for tail in [0u64, 4, 4092] {
                    let len = pages * page - off.min(pages * page - 4) + tail;
                    check(&[(0x1_0000_0000 + off, len as u32)], page, 1024);
                }
            }
        }
        // Exactly the slot a queue pair carves (one page, 512 entries): 2 MiB unaligned still fits.
        let mut list = vec![0u64; 512];
        let d = build_prp([(0x1_0000_0200u64, 2u32 << 20)].into_iter(), page, &mut list, LIST_IOVA).unwrap();
        assert_eq!(d.list_len, 512);
        assert!(build_prp([(0x1_0000_0200u64, (2u32 << 20) + 4096)].into_iter(), page, &mut list, LIST_IOVA).is_err());
    }

    #[test]
    fn prp_rejects() {
        let mut list = [0u64; 8];
        assert_eq!(build_prp(std::iter::empty(), 4096, &mut list, 0), Err(DptrError::Empty));
        assert_eq!(build_prp([(2u64, 8u32)].into_iter(), 4096, &mut list, 0), Err(DptrError::NotDwordAligned { index: 0 }));
        assert_eq!(
            build_prp([(0u64, 512u32), (4096, 512)].into_iter(), 4096, &mut list, 0),
            Err(DptrError::NotPageAligned { index: 1 })
        );
    }

    fn walk_sgl(d: Dptr, list: &[u64]) -> Vec<(u64, u64)> {
        let id = (d.dptr2 >> 56) as u8;
        let len = d.dptr2 & 0xffff_ffff;
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut push = |a: u64, l: u64| match out.last_mut() {
            Some(last) if last.0 + last.1 == a => last.1 += l,
            _ => out.push((a, l)),
        };
        match id >> 4 {
            0 => push(d.dptr1, len),
            3 => {
                assert_eq!(d.dptr1, LIST_IOVA);
                for i in 0..(len / 16) as usize {
                    assert_eq!(list[2 * i + 1] >> 56, 0, "data block descriptors only");
                    push(list[2 * i], list[2 * i + 1] & 0xffff_ffff);
                }
            }
            t => panic!("unexpected SGL descriptor type {t}"),
        }
        out
    }

    #[test]
    fn sgl_exhaustive_small() {
        for n in 1..=4usize {
            for off in (0..64u64).step_by(1) {
                for len in 1..=70u32 {
                    let pieces: Vec<(u64, u32)> =
                        (0..n).map(|i| (0x1000 * (i as u64 + 1) + off, len + i as u32)).collect();
                    let mut list = [0u64; 16];
                    let r = build_sgl(pieces.iter().copied(), true, &mut list, LIST_IOVA);
                    let dword = pieces.iter().all(|p| p.0 % 4 == 0 && p.1 % 4 == 0);
                    if !dword {
                        assert!(r.is_err());
                        let d = build_sgl(pieces.iter().copied(), false, &mut list, LIST_IOVA).unwrap();
                        assert_eq!(walk_sgl(d, &list), merged(&pieces));
                        continue;
                    }
                    let d = r.unwrap();
                    assert_eq!(walk_sgl(d, &list), merged(&pieces));
                    assert_eq!(d.list_len, if n == 1 { 0 } else { 2 * n });
                }
            }
        }
        let mut small = [0u64; 4];
        let many: Vec<(u64, u32)> = (0..3).map(|i| (0x10_000 * (i + 1), 16)).collect();
        assert!(matches!(build_sgl(many.into_iter(), true, &mut small, LIST_IOVA), Err(DptrError::ListFull { .. })));
    }

    #[test]
    fn window_cuts_segments() {
        let segs = [(0x1000u64, 100u32), (0x5000, 200), (0x9000, 50)];
        let w: Vec<_> = Window::new(&segs, 0, 350).collect();
        assert_eq!(w, segs.to_vec());
        let w: Vec<_> = Window::new(&segs, 90, 120).collect();
        assert_eq!(w, vec![(0x1000 + 90, 10), (0x5000, 110)]);
        let w: Vec<_> = Window::new(&segs, 300, 50).collect();
        assert_eq!(w, vec![(0x9000, 50)]);
        for off in 0..350u64 {
            for len in 0..=(350 - off) {
                let total: u64 = Window::new(&segs, off, len).map(|p| u64::from(p.1)).sum();
                assert_eq!(total, len);
            }
        }
    }
}
