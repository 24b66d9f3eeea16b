//! State-tree benchmark: set, find, clear and lock over a tree of 1 M ranges, against `rangemap::RangeMap` doing the
//! same work, and the per-core design (one tree per thread) against one shared tree behind one `Mutex` used from 2
//! threads.
//!
//! Environment: `STATE_TREE_RANGES` (default 1048576), `STATE_TREE_OPS` (operations per phase, default 200000).
//! Run with `bench/state-tree.sh`. Prints one line per figure.

use std::hint::black_box;
use std::ops::Range;
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use nvstack_cache::{Bits, StateTree, Tag, TreeConfig};
use rangemap::RangeMap;

const STRIDE: u64 = 8192;
const RANGE_LEN: u64 = 4096;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// xorshift64*: a fixed, cheap sequence of range indices.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Distinct random range indices (a partial Fisher-Yates shuffle).
fn pick(n: u64, count: u64, seed: u64) -> Vec<u64> {
    let mut all: Vec<u64> = (0..n).collect();
    let mut r = Rng(seed);
    let count = count.min(n) as usize;
    for i in 0..count {
        let j = i + (r.next() % (n as usize - i) as u64) as usize;
        all.swap(i, j);
    }
    all.truncate(count);
    all
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
struct St {
    bits: u8,
    client: u16,
    time: u32,
}

/// The rangemap version of a state change over `r`: read what overlaps, then write back each changed piece
/// (including gaps when bits are set). RangeMap coalesces equal neighbours itself.
fn rm_change(m: &mut RangeMap<u64, St>, r: Range<u64>, set: u8, clear: u8, tag: (u16, u32), scratch: &mut Vec<(Range<u64>, St)>) {
    scratch.clear();
    scratch.extend(m.overlapping(&r).map(|(k, v)| (k.clone(), *v)));
    let apply = |old: St| {
        let bits = (old.bits & !clear) | set;
        let (client, time) = if bits & Bits::DIRTY.0 == 0 {
            (0, 0)
        } else if old.bits & Bits::DIRTY.0 == 0 {
            tag
        } else {
            (old.client, old.time)
        };
        St { bits, client, time }
    };
    let mut pos = r.start;
    for (k, v) in scratch.iter() {
        let s = k.start.max(r.start);
        let e = k.end.min(r.end);
        if s > pos && set != 0 {
            m.insert(pos..s, apply(St { bits: 0, client: 0, time: 0 }));
        }
        let new = apply(*v);
        if new != *v {
            if new.bits == 0 {
                m.remove(s..e);
            } else {
                m.insert(s..e, new);
            }
        }
        pos = e;
    }
    if pos < r.end && set != 0 {
        m.insert(pos..r.end, apply(St { bits: 0, client: 0, time: 0 }));
    }
}

fn report(what: &str, ops: u64, secs: f64) -> f64 {
    let mops = ops as f64 / secs / 1e6;
    println!("{what:<44} {mops:>8.3} Mops/s  ({:>7.1} ns/op)", secs * 1e9 / ops as f64);
    mops
}

fn bench_tree(n: u64, idx: &[u64]) -> [f64; 4] {
    let mut t = StateTree::new(TreeConfig { max_ranges: (n * 3 + 64) as u32, max_waiters: 64 }).expect("tree");
    let t0 = Instant::now();
    for i in 0..n {
        t.set(i * STRIDE, i * STRIDE + RANGE_LEN, Bits::UPTODATE, Tag::NONE).expect("build");
    }
    report("statetree build (insert)", n, t0.elapsed().as_secs_f64());
    let ops = idx.len() as u64;
    let tag = Tag { client: 1, time: 7 };
    let t0 = Instant::now();
    for &i in idx {
        let b = i * STRIDE;
        t.set(b + 1024, b + 2048, Bits::DIRTY, tag).expect("set");
    }
    let set = report("statetree set DIRTY (splits 1 range in 3)", ops, t0.elapsed().as_secs_f64());
    let mut r = Rng(99);
    let t0 = Instant::now();
    for _ in 0..ops {
        let from = r.next() % (n * STRIDE);
        black_box(t.find_first(from, Bits::DIRTY));
    }
    let find = report("statetree find_first DIRTY", ops, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for &i in idx {
        let b = i * STRIDE;
        t.clear(b + 1024, b + 2048, Bits::DIRTY).expect("clear");
    }
    let clear = report("statetree clear DIRTY (merges 3 ranges in 1)", ops, t0.elapsed().as_secs_f64());
    let mut woken = Vec::with_capacity(64);
    let t0 = Instant::now();
    for &i in idx {
        let b = i * STRIDE;
        t.lock(b, b + 2048, i).expect("lock");
        t.unlock(b, b + 2048, &mut woken).expect("unlock");
    }
    let lock = report("statetree lock+unlock (split, merge back)", ops, t0.elapsed().as_secs_f64());
    assert_eq!(t.range_count() as u64, n);
    [set, find, clear, lock]
}

fn bench_rangemap(n: u64, idx: &[u64]) -> [f64; 4] {
    let mut m: RangeMap<u64, St> = RangeMap::new();
    let up = St { bits: Bits::UPTODATE.0, client: 0, time: 0 };
    let t0 = Instant::now();
    for i in 0..n {
        m.insert(i * STRIDE..i * STRIDE + RANGE_LEN, up);
    }
    report("rangemap build (insert)", n, t0.elapsed().as_secs_f64());
    let ops = idx.len() as u64;
    let mut scratch = Vec::with_capacity(64);
    let t0 = Instant::now();
    for &i in idx {
        let b = i * STRIDE;
        rm_change(&mut m, b + 1024..b + 2048, Bits::DIRTY.0, 0, (1, 7), &mut scratch);
    }
    let set = report("rangemap set DIRTY", ops, t0.elapsed().as_secs_f64());
    let mut r = Rng(99);
    let t0 = Instant::now();
    for _ in 0..ops {
        let from = r.next() % (n * STRIDE);
        black_box(m.overlapping(&(from..u64::MAX)).find(|(_, v)| v.bits & Bits::DIRTY.0 != 0).map(|(k, _)| k.start.max(from)));
    }
    let find = report("rangemap find_first DIRTY", ops, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for &i in idx {
        let b = i * STRIDE;
        rm_change(&mut m, b + 1024..b + 2048, 0, Bits::DIRTY.0, (0, 0), &mut scratch);
    }
    let clear = report("rangemap clear DIRTY", ops, t0.elapsed().as_secs_f64());
    let t0 = Instant::now();
    for &i in idx {
        let b = i * STRIDE;
        let r = b..b + 2048;
        let busy = m.overlapping(&r).any(|(_, v)| v.bits & Bits::LOCKED.0 != 0);
        assert!(!busy);
        rm_change(&mut m, r.clone(), Bits::LOCKED.0, 0, (0, 0), &mut scratch);
        rm_change(&mut m, r, 0, Bits::LOCKED.0, (0, 0), &mut scratch);
    }
    let lock = report("rangemap lock+unlock", ops, t0.elapsed().as_secs_f64());
    assert_eq!(m.iter().count() as u64, n);
    [set, find, clear, lock]
}

/// A set+clear pair per op on each of 2 threads: per-core trees (each thread owns one) vs one tree in a Mutex.
fn bench_threads(n: u64, ops: u64) -> (f64, f64) {
    let half = n / 2;
    let work = |t: &mut StateTree, base_range: u64, i: u64| {
        let b = (base_range + i) * STRIDE;
        t.set(b + 1024, b + 2048, Bits::DIRTY, Tag { client: 1, time: 1 }).expect("set");
        t.clear(b + 1024, b + 2048, Bits::DIRTY).expect("clear");
    };
    let build = |t: &mut StateTree, from: u64, to: u64| {
        for i in from..to {
            t.set(i * STRIDE, i * STRIDE + RANGE_LEN, Bits::UPTODATE, Tag::NONE).expect("build");
        }
    };
    // Per-core: each thread builds and works on its own tree.
    let barrier = Arc::new(Barrier::new(2));
    let mut handles = Vec::new();
    for th in 0..2u64 {
        let barrier = Arc::clone(&barrier);
        handles.push(std::thread::spawn(move || {
            let mut t = StateTree::new(TreeConfig { max_ranges: (half * 3 + 64) as u32, max_waiters: 8 }).expect("tree");
            build(&mut t, th * half, (th + 1) * half);
            let idx = pick(half, ops / 2, 5 + th);
            barrier.wait();
            let t0 = Instant::now();
            for &i in &idx {
                work(&mut t, th * half, i);
            }
            t0.elapsed().as_secs_f64()
        }));
    }
    let per_core_secs = handles.into_iter().map(|h| h.join().expect("thread")).fold(0.0f64, f64::max);
    // Shared: one tree with both halves, behind one Mutex.
    let mut t = StateTree::new(TreeConfig { max_ranges: (n * 3 + 64) as u32, max_waiters: 8 }).expect("tree");
    build(&mut t, 0, n);
    let shared = Arc::new(Mutex::new(t));
    let barrier = Arc::new(Barrier::new(2));
    let mut handles = Vec::new();
    for th in 0..2u64 {
        let barrier = Arc::clone(&barrier);
        let shared = Arc::clone(&shared);
        handles.push(std::thread::spawn(move || {
            let idx = pick(half, ops / 2, 5 + th);
            barrier.wait();
            let t0 = Instant::now();
            for &i in &idx {
                let mut g = shared.lock().expect("lock");
                work(&mut g, th * half, i);
            }
            t0.elapsed().as_secs_f64()
        }));
    }
    let shared_secs = handles.into_iter().map(|h| h.join().expect("thread")).fold(0.0f64, f64::max);
    let a = report("2 threads, per-core trees (set+clear pairs)", ops, per_core_secs);
    let b = report("2 threads, one tree behind a Mutex", ops, shared_secs);
    (a, b)
}

fn main() {
    // `cargo bench` passes `--bench`; any other argument is a filter we do not use.
    let n = env_u64("STATE_TREE_RANGES", 1 << 20);
    let ops = env_u64("STATE_TREE_OPS", 200_000).min(n);
    println!("state tree benchmark: {n} ranges, {ops} operations per phase, pool bytes per range {}", nvstack_cache::tree::POOL_BYTES_PER_RANGE);
    let idx = pick(n, ops, 42);
    let ours = bench_tree(n, &idx);
    let theirs = bench_rangemap(n, &idx);
    for (name, (a, b)) in ["set", "find", "clear", "lock"].iter().zip(ours.iter().zip(theirs.iter())) {
        println!("speed-up vs rangemap, {name:<5}: {:.2}x", a / b);
    }
    let (per_core, shared) = bench_threads(n, ops);
    println!("speed-up per-core vs shared Mutex tree (2 threads): {:.2}x", per_core / shared);
}
