//! The XFS reverse-map reader against `xfs_db -r -c fsmap`, on images built by scripts/make-xfs-images.sh
//! (`mkfs.xfs -m rmapbt=1,reflink=1`, filled through a loop mount). The full record set must be equal, and for
//! thousands of random blocks per image the owners we report must be exactly xfs_db's records covering that block.
//! Without root, a loop device or xfsprogs this test fails, naming what is missing.

mod xfs_support;

use std::collections::BTreeSet;

use nvstack_rmap::xfs::{XfsOptions, XfsOwnerKind, XfsRmap, XfsRmapRecord};
use xfs_support::imagedev::ImageDev;
use xfs_support::{arena, fsmap, oracle_images, Rng};

const RANDOM_BLOCK_PROBES: usize = 3000;
const RANGE_PROBES: usize = 300;

fn covering(oracle: &[XfsRmapRecord], agno: u32, first: u32, last: u32) -> Vec<XfsRmapRecord> {
    let mut v: Vec<XfsRmapRecord> = oracle
        .iter()
        .filter(|r| r.agno == agno && r.agbno <= last && r.agbno + r.block_count > first)
        .copied()
        .collect();
    v.sort_unstable();
    v
}

#[test]
fn xfs_rmap_agrees_with_xfs_db_fsmap() {
    let mut total_probes = 0usize;
    for img in oracle_images() {
        let mut oracle = fsmap(&img);
        oracle.sort_unstable();
        let dev = ImageDev::open(&img).expect("open image");
        let a = arena();
        // A small cache, so that probes evict and re-read blocks.
        let rm = XfsRmap::open_with(dev, &a, XfsOptions { cache_bytes: 8 * 4096, ..XfsOptions::default() }).expect("open xfs");
        let sb = rm.superblock().clone();
        assert!(sb.ag_count >= 2 && sb.has_reflink, "{}: images must have several AGs and reflink", img.display());

        // 1. The whole record set.
        let mut ours = Vec::new();
        let stats = rm.walk(&mut |r| ours.push(*r)).expect("full walk");
        let mut sorted = ours.clone();
        sorted.sort_unstable();
        assert_eq!(sorted.len(), oracle.len(), "{}: record count differs from xfs_db", img.display());
        for (i, (a, b)) in sorted.iter().zip(&oracle).enumerate() {
            assert_eq!(a, b, "{}: record {i} differs from xfs_db's", img.display());
        }
        let shared = oracle.windows(2).filter(|w| w[0].agno == w[1].agno && w[0].agbno == w[1].agbno).count();
        let attr = oracle.iter().filter(|r| r.attr_fork).count();
        let bmbt = oracle.iter().filter(|r| r.bmbt).count();
        let unwritten = oracle.iter().filter(|r| r.unwritten).count();
        assert!(shared > 0 && attr > 0 && bmbt > 0 && unwritten > 0, "{}: image lacks variety", img.display());
        eprintln!(
            "{}: {} records ({} blocks, up to {} levels): {shared} shared starts, {attr} attr-fork, {bmbt} bmbt, {unwritten} unwritten",
            img.display(),
            stats.records,
            stats.blocks,
            stats.max_levels
        );

        // 2. Random blocks, plus the first and last block of records, each asked as a random piece of the block.
        let bs = u64::from(sb.block_size);
        let mut rng = Rng(0x5eed ^ bs);
        let mut blocks: Vec<u64> = (0..RANDOM_BLOCK_PROBES).map(|_| rng.below(sb.data_blocks)).collect();
        for r in oracle.iter().step_by(3) {
            let base = u64::from(r.agno) * u64::from(sb.ag_blocks) + u64::from(r.agbno);
            blocks.push(base);
            blocks.push(base + u64::from(r.block_count) - 1);
            blocks.push(base + u64::from(r.block_count)); // often free space or the next owner
        }
        blocks.retain(|&b| b < sb.data_blocks);
        let mut free_seen = 0usize;
        for &b in &blocks {
            let agno = (b / u64::from(sb.ag_blocks)) as u32;
            let agbno = (b % u64::from(sb.ag_blocks)) as u32;
            let within = rng.below(bs);
            let len = 1 + rng.below(bs - within);
            let got = rm.owners(b * bs + within, len).expect("owners");
            let want = covering(&oracle, agno, agbno, agbno);
            let mut recs: Vec<XfsRmapRecord> = got.iter().filter_map(|o| o.record).collect();
            recs.sort_unstable();
            assert_eq!(recs, want, "{}: block {agno}/{agbno}: owners differ from xfs_db", img.display());
            for o in &got {
                assert_eq!((o.offset_bytes, o.len_bytes), (b * bs + within, len), "piece must be the asked range");
                match (o.kind, o.record) {
                    (XfsOwnerKind::Inode { ino, file_offset_blocks, attr_fork, bmbt, unwritten }, Some(r)) => {
                        assert_eq!((ino, attr_fork, bmbt, unwritten), (r.owner, r.attr_fork, r.bmbt, r.unwritten));
                        let expect_off = if r.bmbt { 0 } else { r.offset + u64::from(agbno - r.agbno) };
                        assert_eq!(file_offset_blocks, expect_off, "file offset of {agno}/{agbno}");
                    }
                    (XfsOwnerKind::Metadata(kind), Some(r)) => assert_eq!(kind.owner_value(), r.owner as i64),
                    (XfsOwnerKind::Free, None) => {
                        assert!(want.is_empty(), "free piece over owned block {agno}/{agbno}");
                        free_seen += 1;
                    }
                    other => panic!("unexpected piece {other:?} at {agno}/{agbno}"),
                }
            }
            assert!(!got.is_empty(), "no answer for block {agno}/{agbno}");
        }
        assert!(free_seen > 0, "{}: no free block was probed", img.display());
        total_probes += blocks.len();

        // 3. Ranges of up to 64 blocks (crossing records, free space and AG boundaries).
        for i in 0..RANGE_PROBES {
            let b = if i % 10 == 0 {
                // Straddle an AG boundary.
                let ag = 1 + rng.below(u64::from(sb.ag_count - 1));
                ag * u64::from(sb.ag_blocks) - 1 - rng.below(8)
            } else {
                rng.below(sb.data_blocks)
            };
            let nblocks = (1 + rng.below(64)).min(sb.data_blocks - b);
            let got = rm.owners(b * bs, nblocks * bs).expect("owners of a range");
            let mut want = BTreeSet::new();
            for blk in b..b + nblocks {
                let agno = (blk / u64::from(sb.ag_blocks)) as u32;
                let agbno = (blk % u64::from(sb.ag_blocks)) as u32;
                let cov = covering(&oracle, agno, agbno, agbno);
                if cov.is_empty() {
                    // The free block must be inside exactly one Free piece.
                    let at = blk * bs;
                    let n = got
                        .iter()
                        .filter(|o| o.kind == XfsOwnerKind::Free && o.offset_bytes <= at && at < o.offset_bytes + o.len_bytes)
                        .count();
                    assert_eq!(n, 1, "free block {agno}/{agbno} not reported free exactly once");
                }
                want.extend(cov);
            }
            let recs: BTreeSet<XfsRmapRecord> = got.iter().filter_map(|o| o.record).collect();
            assert_eq!(recs, want, "{}: range {b}+{nblocks} blocks: owners differ", img.display());
            let bytes: u64 = got.iter().filter(|o| o.kind == XfsOwnerKind::Free).map(|o| o.len_bytes).sum::<u64>();
            assert!(bytes <= nblocks * bs);
        }
        total_probes += RANGE_PROBES;

        // 4. Outside the filesystem and malformed ranges.
        let fs_end = sb.data_blocks * bs;
        if let Ok(got) = rm.owners(fs_end, 4096) {
            assert!(got.iter().all(|o| o.kind == XfsOwnerKind::OutsideFilesystem));
        }
        assert!(rm.owners(0, 0).is_err());
        assert!(rm.owners(u64::MAX, 2).is_err());
        let cs = rm.cache_stats();
        eprintln!("{}: {} probes; metadata cache {} hits / {} misses", img.display(), blocks.len() + RANGE_PROBES, cs.hits, cs.misses);
    }
    assert!(total_probes >= 6000);
}

#[test]
fn device_block_sizes_and_offsets_do_not_change_answers() {
    let img = &oracle_images()[0];
    let oracle = {
        let mut v = fsmap(img);
        v.sort_unstable();
        v
    };
    let size = std::fs::metadata(img).unwrap().len();
    // A 4 KiB-block device, no cache.
    let dev = ImageDev::open_sized(img, size, 4096).unwrap();
    let rm = XfsRmap::open_with(dev, &arena(), XfsOptions { cache_bytes: 0, ..XfsOptions::default() }).unwrap();
    let mut recs = rm.records().unwrap();
    recs.sort_unstable();
    assert_eq!(recs, oracle);
    // The same records after invalidation.
    rm.invalidate();
    assert_eq!(rm.records().unwrap().len(), oracle.len());

    // The filesystem 1 MiB into a volume: answers shift with it; the bytes before it are outside the filesystem.
    let shift = 1u64 << 20;
    let dev = ImageDev::open_shifted(img, shift).unwrap();
    let rm = XfsRmap::open_with(dev, &arena(), XfsOptions { base_offset_bytes: shift, ..XfsOptions::default() }).unwrap();
    let bs = u64::from(rm.superblock().block_size);
    for r in oracle.iter().step_by(7) {
        let at = shift + rm.superblock().ag_block_bytes(r.agno, r.agbno) + bs / 2;
        let got = rm.owners(at, 1).unwrap();
        assert!(got.iter().any(|o| o.record == Some(*r)), "record {r:?} not found at shifted byte {at}");
    }
    let before = rm.owners(shift - 4096, 8192).unwrap();
    assert_eq!(before[0].kind, XfsOwnerKind::OutsideFilesystem);
    assert_eq!((before[0].offset_bytes, before[0].len_bytes), (shift - 4096, 4096));
    assert!(before[1..].iter().all(|o| o.offset_bytes >= shift && o.record.is_some()));
}
