//! Model-based tests of the state tree: random operation sequences against a per-byte model (bits and tag per
//! byte, plus a plain list model of held locks and the FIFO of waiters). After every operation the tree's
//! invariants are checked and its whole content compared with the model.

use nvstack_cache::tree::lock::LockOutcome;
use nvstack_cache::{Bits, CacheError, State, StateTree, Tag, Test, TreeConfig};
use proptest::prelude::*;

/// Model address space in bytes (each byte is a "block" of the bitmap model).
const SPACE: u64 = 256;

#[derive(Debug, Clone)]
enum Op {
    Set(u64, u64, u8, u16),
    Clear(u64, u64, u8),
    Convert(u64, u64, u8, u8, u16),
    Lock(u64, u64),
    Unlock(usize),
    TryLock(u64, u64),
}

/// Bits the set/clear/convert ops may touch: everything but LOCKED, which belongs to the lock model.
const PLAIN: u8 = Bits::ALL.0 & !Bits::LOCKED.0;

fn range() -> impl Strategy<Value = (u64, u64)> {
    (0..SPACE, 1..48u64).prop_map(|(s, l)| (s, (s + l).min(SPACE)))
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (range(), 1..64u8, 1..4u16).prop_map(|((s, e), b, c)| Op::Set(s, e, b & PLAIN, c)),
        3 => (range(), 1..64u8).prop_map(|((s, e), b)| Op::Clear(s, e, b & PLAIN)),
        2 => (range(), 1..64u8, 1..64u8, 1..4u16).prop_map(|((s, e), a, b, c)| Op::Convert(s, e, a & PLAIN, b & PLAIN, c)),
        3 => range().prop_map(|(s, e)| Op::Lock(s, e)),
        3 => (0..8usize).prop_map(Op::Unlock),
        1 => range().prop_map(|(s, e)| Op::TryLock(s, e)),
    ]
}

#[derive(Clone, Default)]
struct Model {
    bytes: Vec<State>,
    held: Vec<(u64, u64, u64)>,
    queue: Vec<(u64, u64, u64)>,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

impl Model {
    fn new() -> Model {
        Model { bytes: vec![State::default(); SPACE as usize], ..Default::default() }
    }
    fn change(&mut self, s: u64, e: u64, set: u8, clear: u8, tag: Tag) {
        for st in &mut self.bytes[s as usize..e as usize] {
            let was_dirty = st.bits.contains(Bits::DIRTY);
            st.bits = Bits((st.bits.0 & !clear) | set);
            if !st.bits.contains(Bits::DIRTY) {
                st.tag = Tag::NONE;
            } else if !was_dirty {
                st.tag = tag;
            }
        }
    }
    fn lockable(&self, s: u64, e: u64) -> bool {
        !self.held.iter().any(|h| overlaps((h.0, h.1), (s, e))) && !self.queue.iter().any(|q| overlaps((q.0, q.1), (s, e)))
    }
    fn grant_waiters(&mut self) -> Vec<u64> {
        let mut woken = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let w = self.queue[i];
            let blocked = self.held.iter().any(|h| overlaps((h.0, h.1), (w.0, w.1)))
                || self.queue[..i].iter().any(|q| overlaps((q.0, q.1), (w.0, w.1)));
            if blocked {
                i += 1;
            } else {
                self.queue.remove(i);
                self.held.push(w);
                self.change(w.0, w.1, Bits::LOCKED.0, 0, Tag::NONE);
                woken.push(w.2);
            }
        }
        woken
    }
}

fn compare(tree: &StateTree, m: &Model) -> Result<(), TestCaseError> {
    tree.check_invariants().map_err(TestCaseError::fail)?;
    let mut got = vec![State::default(); SPACE as usize];
    tree.for_each(0, SPACE, |x| {
        for st in &mut got[x.start as usize..x.end as usize] {
            *st = x.state;
        }
        true
    });
    for (i, (g, w)) in got.iter().zip(&m.bytes).enumerate() {
        prop_assert_eq!(g, w, "byte {}", i);
    }
    for b in 0..Bits::COUNT {
        let bit = Bits(1 << b);
        let want = m.bytes.iter().filter(|s| s.bits.contains(bit)).count() as u64;
        prop_assert_eq!(tree.total(bit), want);
    }
    // Held locks are pairwise exclusive.
    for (i, a) in m.held.iter().enumerate() {
        for b in &m.held[i + 1..] {
            prop_assert!(!overlaps((a.0, a.1), (b.0, b.1)));
        }
    }
    prop_assert_eq!(tree.waiter_count() as usize, m.queue.len());
    Ok(())
}

/// Check the query operations at a few points against the model.
fn check_queries(tree: &StateTree, m: &Model, from: u64, bits: u8, len: u64) -> Result<(), TestCaseError> {
    let bits = Bits(bits.max(1));
    let end = (from + len).min(SPACE);
    let has_all = |i: usize| m.bytes[i].bits.contains(bits);
    let has_any = |i: usize| m.bytes[i].bits.intersects(bits);
    let all = (from..end).all(|i| has_all(i as usize));
    let any = (from..end).any(|i| has_any(i as usize));
    prop_assert_eq!(tree.test(from, end, bits, Test::All), all);
    prop_assert_eq!(tree.test(from, end, bits, Test::Any), any);
    let count = (from..end).filter(|&i| has_all(i as usize)).count() as u64;
    prop_assert_eq!(tree.count(from, end, bits), count);
    // find_first: the first byte >= from with any of the bits, and the end of its stored range (same state).
    let first = (from..SPACE).find(|&i| has_any(i as usize));
    let got = tree.find_first(from, bits);
    prop_assert_eq!(got.map(|x| x.start), first);
    if let Some(x) = got {
        prop_assert!((x.start..x.end).all(|i| m.bytes[i as usize] == x.state));
    }
    // find_run with a cap.
    let run_start = (from..SPACE).find(|&i| has_all(i as usize));
    let got = tree.find_run(from, bits, len.max(1));
    match run_start {
        None => prop_assert_eq!(got, None),
        Some(s) => {
            let mut e = s;
            while e < SPACE && has_all(e as usize) && e - s < len.max(1) {
                e += 1;
            }
            prop_assert_eq!(got, Some((s, e)));
        }
    }
    // cluster_at from `from`: walk back then forward, capped.
    let got = tree.cluster_at(from, bits, len.max(1));
    if has_all(from as usize) {
        let mut s = from;
        while s > 0 && has_all(s as usize - 1) {
            s -= 1;
        }
        let mut e = s;
        while e < SPACE && has_all(e as usize) && e - s < len.max(1) {
            e += 1;
        }
        prop_assert_eq!(got, Some((s, e)));
    } else {
        prop_assert_eq!(got, None);
    }
    Ok(())
}

fn run(ops: Vec<Op>, probes: Vec<(u64, u8, u64)>, prefill: bool) -> Result<(), TestCaseError> {
    // With the prefill, tiny blocks (4 entries) so the container splits and merges blocks all the time.
    let block_entries = if prefill { 4 } else { 128 };
    let cfg = TreeConfig { max_ranges: 4096, max_waiters: 64 };
    let mut tree = StateTree::with_block_entries(cfg, block_entries).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let mut m = Model::new();
    if prefill {
        // Many small ranges in distinct states, so the tree spans several blocks and ops split and merge blocks.
        for i in 0..SPACE / 2 {
            let tag = Tag { client: (i % 3) as u16 + 1, time: i as u32 };
            let bits = if i % 2 == 0 { Bits::DIRTY } else { Bits::UPTODATE };
            tree.set(i * 2, i * 2 + 1, bits, tag).map_err(|e| TestCaseError::fail(e.to_string()))?;
            m.change(i * 2, i * 2 + 1, bits.0, 0, tag);
        }
        compare(&tree, &m)?;
    }
    let mut next_token = 1u64;
    let mut woken = Vec::with_capacity(64);
    let mut ever_queued: Vec<u64> = Vec::new();
    let mut granted: Vec<u64> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Set(s, e, b, c) => {
                let tag = Tag { client: c, time: step as u32 };
                tree.set(s, e, Bits(b), tag).map_err(|e| TestCaseError::fail(e.to_string()))?;
                m.change(s, e, b, 0, tag);
            }
            Op::Clear(s, e, b) => {
                tree.clear(s, e, Bits(b)).map_err(|e| TestCaseError::fail(e.to_string()))?;
                m.change(s, e, 0, b, Tag::NONE);
            }
            Op::Convert(s, e, set, clear, c) => {
                let tag = Tag { client: c, time: step as u32 };
                tree.convert(s, e, Bits(set), Bits(clear), tag).map_err(|e| TestCaseError::fail(e.to_string()))?;
                m.change(s, e, set, clear & !set, tag);
            }
            Op::Lock(s, e) => {
                let token = next_token;
                next_token += 1;
                let want_grant = m.lockable(s, e);
                let got = tree.lock(s, e, token).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got == LockOutcome::Granted, want_grant);
                if want_grant {
                    m.held.push((s, e, token));
                    m.change(s, e, Bits::LOCKED.0, 0, Tag::NONE);
                    granted.push(token);
                } else {
                    m.queue.push((s, e, token));
                    ever_queued.push(token);
                }
            }
            Op::TryLock(s, e) => {
                let want = m.lockable(s, e);
                let got = tree.try_lock(s, e).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, want);
                if got {
                    m.held.push((s, e, 0));
                    m.change(s, e, Bits::LOCKED.0, 0, Tag::NONE);
                }
            }
            Op::Unlock(i) => {
                if m.held.is_empty() {
                    // Unlocking an unlocked range is refused and changes nothing.
                    if !m.bytes[0].bits.contains(Bits::LOCKED) {
                        let r = tree.unlock(0, 1, &mut woken);
                        prop_assert!(matches!(r, Err(CacheError::NotLocked { .. })), "unlock of unlocked range: {:?}", r);
                    }
                    continue;
                }
                let h = m.held.remove(i % m.held.len());
                m.change(h.0, h.1, 0, Bits::LOCKED.0, Tag::NONE);
                woken.clear();
                tree.unlock(h.0, h.1, &mut woken).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let want = m.grant_waiters();
                prop_assert_eq!(&woken, &want, "woken tokens differ (FIFO order)");
                granted.extend_from_slice(&woken);
            }
        }
        compare(&tree, &m)?;
        for &(from, bits, len) in &probes {
            check_queries(&tree, &m, from, bits, len)?;
        }
    }
    // Nobody is lost: unlocking everything grants every queued waiter exactly once.
    let mut guard = 0;
    while let Some(h) = m.held.pop() {
        m.change(h.0, h.1, 0, Bits::LOCKED.0, Tag::NONE);
        woken.clear();
        tree.unlock(h.0, h.1, &mut woken).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let want = m.grant_waiters();
        prop_assert_eq!(&woken, &want);
        granted.extend_from_slice(&woken);
        compare(&tree, &m)?;
        guard += 1;
        prop_assert!(guard < 10_000);
    }
    prop_assert!(m.queue.is_empty());
    prop_assert_eq!(tree.waiter_count(), 0);
    for t in ever_queued {
        prop_assert_eq!(granted.iter().filter(|&&g| g == t).count(), 1, "token {} granted once", t);
    }
    Ok(())
}

/// Cases per property: `PROPTEST_CASES` when set (a longer soak or a quick run), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(1500), max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn tree_matches_bitmap_model(
        ops in proptest::collection::vec(op(), 1..48),
        probes in proptest::collection::vec((0..SPACE, 1..64u8, 1..96u64), 2),
    ) {
        run(ops, probes, false)?;
    }

    /// The same, starting from 128 small ranges in 4-entry blocks: the container splits and merges blocks.
    #[test]
    fn tree_matches_bitmap_model_many_ranges(
        ops in proptest::collection::vec(op(), 1..48),
        probes in proptest::collection::vec((0..SPACE, 1..64u8, 1..96u64), 1),
    ) {
        run(ops, probes, true)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(500), ..ProptestConfig::default() })]
    /// With a tiny pool, an operation either succeeds or fails with TreeFull leaving the tree exactly as it was.
    #[test]
    fn exhaustion_is_an_error_and_changes_nothing(ops in proptest::collection::vec(op(), 1..64)) {
        let cfg = TreeConfig { max_ranges: 20, max_waiters: 4 };
        let mut tree = StateTree::with_block_entries(cfg, 3).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut full = 0;
        for (step, op) in ops.into_iter().enumerate() {
            let mut before = Vec::new();
            tree.for_each(0, SPACE, |x| { before.push(x); true });
            let r = match op {
                Op::Set(s, e, b, c) => tree.set(s, e, Bits(b), Tag { client: c, time: step as u32 }),
                Op::Clear(s, e, b) => tree.clear(s, e, Bits(b)),
                Op::Convert(s, e, a, b, c) => tree.convert(s, e, Bits(a), Bits(b), Tag { client: c, time: 1 }),
                Op::Lock(s, e) | Op::TryLock(s, e) => tree.try_lock(s, e).map(|_| ()),
                Op::Unlock(_) => Ok(()),
            };
            tree.check_invariants().map_err(TestCaseError::fail)?;
            if let Err(e) = r {
                prop_assert!(matches!(e, CacheError::TreeFull { .. }), "unexpected error {}", e);
                full += 1;
                let mut after = Vec::new();
                tree.for_each(0, SPACE, |x| { after.push(x); true });
                prop_assert_eq!(before, after);
            }
        }
        let _ = full;
    }
}

#[test]
fn waiter_pool_full_is_an_error() {
    let mut tree = StateTree::new(TreeConfig { max_ranges: 64, max_waiters: 2 }).unwrap();
    assert_eq!(tree.lock(0, 10, 1).unwrap(), LockOutcome::Granted);
    assert_eq!(tree.lock(5, 6, 2).unwrap(), LockOutcome::Queued);
    assert_eq!(tree.lock(0, 1, 3).unwrap(), LockOutcome::Queued);
    assert!(matches!(tree.lock(9, 12, 4), Err(CacheError::WaitersFull { capacity: 2 })));
    // A lock that overlaps nothing held or queued is still granted.
    assert_eq!(tree.lock(20, 30, 5).unwrap(), LockOutcome::Granted);
    let mut woken = Vec::with_capacity(2);
    tree.unlock(0, 10, &mut woken).unwrap();
    assert_eq!(woken, vec![2, 3]);
}

#[test]
fn queued_large_lock_is_not_starved_by_small_ones() {
    let mut tree = StateTree::new(TreeConfig { max_ranges: 64, max_waiters: 8 }).unwrap();
    let mut woken = Vec::with_capacity(8);
    assert_eq!(tree.lock(0, 4, 1).unwrap(), LockOutcome::Granted);
    // A large request waits for [0,4).
    assert_eq!(tree.lock(0, 100, 2).unwrap(), LockOutcome::Queued);
    // A small, currently free range inside the large one must queue behind it.
    assert_eq!(tree.lock(50, 51, 3).unwrap(), LockOutcome::Queued);
    tree.unlock(0, 4, &mut woken).unwrap();
    assert_eq!(woken, vec![2]);
    woken.clear();
    tree.unlock(0, 100, &mut woken).unwrap();
    assert_eq!(woken, vec![3]);
}

#[test]
fn tags_record_the_first_dirtier() {
    let mut tree = StateTree::new(TreeConfig { max_ranges: 64, max_waiters: 1 }).unwrap();
    let a = Tag { client: 7, time: 100 };
    let b = Tag { client: 9, time: 200 };
    tree.set(0, 8192, Bits::DIRTY | Bits::UPTODATE, a).unwrap();
    tree.set(4096, 12288, Bits::DIRTY | Bits::UPTODATE, b).unwrap();
    assert_eq!(tree.state_at(5000).tag, a);
    assert_eq!(tree.state_at(9000).tag, b);
    assert_eq!(tree.range_count(), 2);
    tree.clear(0, 12288, Bits::DIRTY).unwrap();
    assert_eq!(tree.range_count(), 1, "clean neighbours merge once tags are gone");
    assert_eq!(tree.state_at(5000), State { bits: Bits::UPTODATE, tag: Tag::NONE });
}

#[test]
fn full_pool_is_an_error_not_a_panic() {
    let mut tree = StateTree::new(TreeConfig { max_ranges: 20, max_waiters: 1 }).unwrap();
    let mut full = None;
    for i in 0..100u64 {
        if let Err(e) = tree.set(i * 2, i * 2 + 1, Bits::UPTODATE, Tag::NONE) {
            full = Some((i, e));
            break;
        }
    }
    let (i, e) = full.expect("a 20-range pool must fill up");
    assert_eq!(i, 20);
    assert!(matches!(e, CacheError::TreeFull { capacity: 20, .. }), "{e}");
    tree.check_invariants().unwrap();
    // Merging needs no new range: filling the gaps with the same state collapses everything into one range.
    tree.set(0, 40, Bits::UPTODATE, Tag::NONE).unwrap();
    assert_eq!(tree.range_count(), 1);
}

#[test]
fn fragmented_blocks_compact_so_max_ranges_fit() {
    // 4-entry blocks filled in a scattered order: whatever the block fill, max_ranges ranges fit (the tree compacts
    // when splits run out of blocks; `blocks.rs` tests compaction itself).
    let cfg = TreeConfig { max_ranges: 256, max_waiters: 1 };
    let mut tree = StateTree::with_block_entries(cfg, 4).unwrap();
    for k in 0..256u64 {
        let i = (k * 97) % 256; // a permutation of 0..256
        let bits = if i % 2 == 0 { Bits::UPTODATE } else { Bits::DIRTY };
        tree.set(i * 2, i * 2 + 1, bits, Tag { client: 1, time: 1 }).unwrap();
        tree.check_invariants().unwrap();
    }
    assert_eq!(tree.range_count(), 256);
    assert!(matches!(tree.set(1000, 1001, Bits::UPTODATE, Tag::NONE), Err(CacheError::TreeFull { .. })));
    tree.check_invariants().unwrap();
}
