//! From a poison event (a device byte offset) to its resolved XFS owners, on an image with more than 100 k
//! reverse-map records (scripts/make-xfs-images.sh --bench), read through the io_uring file backend.
//!
//! Cold: every lookup starts with an empty metadata cache (AGF and every btree level read from the device, O_DIRECT).
//! Warm: after one walk has filled the default 4 MiB cache with the tree. Prints percentiles of both; exits 1 when
//! the warm p99 is 1 ms or more (the cold figure is the device's latency times the tree height, reported as is).
//!
//! Run: `cargo bench -p nvstack-rmap --bench xfs_lookup` (or bench/xfs-lookup.sh). Needs root, as the image script.

#[path = "../tests/xfs_support/mod.rs"]
mod xfs_support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::file::{FileBdev, FileConfig};
use nvstack_blockdev::BlockDev;
use nvstack_driver::dma::{Arena, ArenaConfig};
use nvstack_rmap::xfs::{XfsOwnerKind, XfsRmap};
use xfs_support::{images_dir, Rng};

const LOOKUPS: usize = 5000;
const BUDGET: Duration = Duration::from_millis(1);

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn run(label: &str, rm: &XfsRmap, offsets: &[u64], cold: bool) -> Vec<Duration> {
    let mut t = Vec::with_capacity(offsets.len());
    let mut owned = 0usize;
    for &off in offsets {
        if cold {
            rm.invalidate();
        }
        let start = Instant::now();
        let owners = rm.owners(off, 1).expect("lookup");
        t.push(start.elapsed());
        owned += usize::from(owners.iter().any(|o| o.record.is_some()));
        assert!(!owners.is_empty());
        std::hint::black_box(&owners);
    }
    t.sort_unstable();
    println!(
        "{label:<5} lookups: {} ({} owned, {} free)  p50 {:.1} us  p90 {:.1} us  p99 {:.1} us  max {:.1} us",
        t.len(),
        owned,
        t.len() - owned,
        us(pct(&t, 0.5)),
        us(pct(&t, 0.9)),
        us(pct(&t, 0.99)),
        us(*t.last().unwrap_or(&Duration::ZERO))
    );
    t
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing: then do a short smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let img: PathBuf = images_dir(true).join("bench-100k.img");
    let arena = Arena::new(ArenaConfig { size_bytes: 4 << 20, require_hugepages: false, try_1g: false }).expect("arena");
    let cfg = FileConfig { path: img.clone(), size_bytes: None, block_size: None };
    let dev = FileBdev::open("xfsbench", &cfg, &arena).expect("open the image with the file backend");
    let direct = dev.is_direct();
    let dev: Arc<dyn BlockDev> = dev;
    let rm = XfsRmap::open(dev, &arena).expect("open xfs");
    let sb = rm.superblock().clone();

    let start = Instant::now();
    let stats = rm.walk(&mut |_| {}).expect("walk");
    let walk = start.elapsed();
    println!(
        "image {}: {} AGs, {} rmap records in {} btree blocks (up to {} levels); full checked walk {:.1} ms (O_DIRECT: {direct})",
        img.display(),
        sb.ag_count,
        stats.records,
        stats.blocks,
        stats.max_levels,
        walk.as_secs_f64() * 1e3
    );
    assert!(stats.records >= 100_000, "the benchmark image must hold at least 100 k extents");

    let n = if smoke { 200 } else { LOOKUPS };
    let mut rng = Rng(0xbe7c);
    // Events: half at random device offsets, half inside the fragmented file (its extents fill the first AGs).
    let records = rm.records().expect("records");
    let offsets: Vec<u64> = (0..n)
        .map(|i| {
            if i % 2 == 0 {
                rng.below(sb.data_bytes())
            } else {
                let r = &records[rng.below(records.len() as u64) as usize];
                sb.ag_block_bytes(r.agno, r.agbno) + rng.below(u64::from(sb.block_size))
            }
        })
        .collect();
    let cold = run("cold", &rm, &offsets, true);
    // Warm: one walk fills the cache with the whole tree, as a long-running service would at start.
    let start = Instant::now();
    rm.walk(&mut |_| {}).expect("walk");
    println!("preload (one walk into the cache): {:.1} ms", start.elapsed().as_secs_f64() * 1e3);
    let warm = run("warm", &rm, &offsets, false);
    let cs = rm.cache_stats();
    println!("metadata cache: {} hits, {} misses", cs.hits, cs.misses);
    let sample = rm.owners(offsets[1], 1).expect("lookup");
    if let Some(o) = sample.iter().find(|o| matches!(o.kind, XfsOwnerKind::Inode { .. })) {
        println!("example: device byte {} -> {:?}", offsets[1], o.kind);
    }
    let (p50_cold, p99) = (pct(&cold, 0.5), pct(&warm, 0.99));
    println!("cold (every level read from the device, O_DIRECT): p50 {:.1} us", us(p50_cold));
    if p99 < BUDGET {
        println!("PASS: event -> owners with the tree cached: p99 {:.1} us < 1 ms", us(p99));
    } else {
        println!("FAIL: event -> owners with the tree cached: p99 {:.1} us >= 1 ms", us(p99));
        std::process::exit(1);
    }
}
