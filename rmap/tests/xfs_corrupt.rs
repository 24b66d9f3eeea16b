//! Corrupt XFS images give the right `RmapError`, never a panic: targeted corruption of the superblock, AGFs and
//! rmap btree blocks (with the CRC fixed up where the test aims past it), then random byte flips in metadata blocks.
//! The images come from scripts/make-xfs-images.sh; the corruption lives in an overlay, never in the image.

mod xfs_support;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use nvstack_rmap::error::XfsStructure;
use nvstack_rmap::xfs::{crc, XfsMetaKind, XfsOptions, XfsOwnerKind, XfsRmap, XfsSuperblock};
use nvstack_rmap::RmapError;
use proptest::prelude::*;
use xfs_support::imagedev::ImageDev;
use xfs_support::{arena, fsmap, oracle_images};

/// The 1 KiB-block image: its fullest AG has a three-level rmap btree.
fn image() -> PathBuf {
    static IMAGE: OnceLock<PathBuf> = OnceLock::new();
    IMAGE.get_or_init(|| oracle_images()[1].clone()).clone()
}

struct Fs {
    dev: Arc<ImageDev>,
    sb: XfsSuperblock,
}

impl Fs {
    fn new() -> Fs {
        let dev = ImageDev::open(&image()).unwrap();
        let sb = XfsRmap::open(dev.clone(), &arena()).unwrap().superblock().clone();
        Fs { dev, sb }
    }
    fn read(&self, off: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.dev.read_at(off, &mut v);
        v
    }
    fn agf_off(&self, agno: u32) -> u64 {
        self.sb.ag_block_bytes(agno, 0) + u64::from(self.sb.sector_size)
    }
    fn block_off(&self, agno: u32, agbno: u32) -> u64 {
        self.sb.ag_block_bytes(agno, agbno)
    }
    /// Change a structure of `len` bytes at `off` with `f`, fixing its CRC at `crc_off` when asked.
    fn edit(&self, off: u64, len: usize, crc_off: Option<usize>, f: impl FnOnce(&mut [u8])) {
        let mut b = self.read(off, len);
        f(&mut b);
        if let Some(c) = crc_off {
            assert!(crc::update(&mut b, c));
        }
        self.dev.patch(off, &b);
    }
    fn edit_agf(&self, agno: u32, fix_crc: bool, f: impl FnOnce(&mut [u8])) {
        self.edit(self.agf_off(agno), usize::from(self.sb.sector_size), fix_crc.then_some(216), f);
    }
    fn edit_block(&self, agno: u32, agbno: u32, fix_crc: bool, f: impl FnOnce(&mut [u8])) {
        self.edit(self.block_off(agno, agbno), self.sb.block_size as usize, fix_crc.then_some(52), f);
    }
    /// (AG, root block, levels) of the tallest rmap btree.
    fn tallest(&self) -> (u32, u32, u32) {
        (0..self.sb.ag_count)
            .map(|ag| {
                let agf = self.read(self.agf_off(ag), 512);
                (ag, be32(&agf, 24), be32(&agf, 36))
            })
            .max_by_key(|t| t.2)
            .unwrap()
    }
    fn open(&self) -> Result<XfsRmap, RmapError> {
        XfsRmap::open_with(self.dev.clone(), &arena(), XfsOptions { cache_bytes: 4 * 4096, ..XfsOptions::default() })
    }
    /// Open, then walk everything.
    fn walk_err(&self) -> RmapError {
        match self.open() {
            Err(e) => e,
            Ok(rm) => rm.walk(&mut |_| {}).expect_err("corruption must be found"),
        }
    }
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}
fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn superblock_corruption() {
    let fs = Fs::new();
    fs.edit(0, 512, None, |b| b[0] = b'Y');
    assert!(matches!(fs.open(), Err(RmapError::XfsBadMagic { what: XfsStructure::Superblock, found, .. }) if found == 0x5946_5342));
    fs.dev.clear_patches();
    fs.edit(0, 512, None, |b| b[110] ^= 0x40); // the label: only the CRC notices
    assert!(matches!(fs.open(), Err(RmapError::XfsBadCrc { what: XfsStructure::Superblock, .. })));
    fs.dev.clear_patches();
    fs.edit(0, 512, Some(224), |b| put32(b, 4, 3000));
    assert!(matches!(fs.open(), Err(RmapError::XfsSuperblock { field: "sb_blocksize", value: 3000, .. })));
    fs.dev.clear_patches();
    fs.edit(0, 512, Some(224), |b| put32(b, 88, 0));
    assert!(matches!(fs.open(), Err(RmapError::XfsSuperblock { field: "sb_agcount", .. })));
    fs.dev.clear_patches();
    fs.edit(0, 512, Some(224), |b| b[215] &= !2); // ro_compat: no rmapbt
    assert!(matches!(fs.open(), Err(RmapError::XfsFeature { .. })));
    fs.dev.clear_patches();
    fs.edit(0, 512, Some(224), |b| b[100..102].copy_from_slice(&4u16.to_be_bytes()));
    assert!(matches!(fs.open(), Err(RmapError::XfsFeature { .. })));
}

#[test]
fn truncated_device() {
    let img = image();
    let size = std::fs::metadata(&img).unwrap().len();
    let dev = ImageDev::open_sized(&img, size / 2, 512).unwrap();
    match XfsRmap::open(dev, &arena()) {
        Err(RmapError::XfsTruncated { device_bytes, needed_bytes, .. }) => assert!(device_bytes < needed_bytes),
        other => panic!("expected XfsTruncated, got {other:?}"),
    }
    let dev = ImageDev::open_sized(&img, 256, 256).unwrap();
    assert!(XfsRmap::open(dev, &arena()).is_err());
}

#[test]
fn agf_corruption() {
    let fs = Fs::new();
    let last = fs.sb.ag_count - 1;
    fs.edit_agf(last, false, |b| b[1] = 0);
    let rm = fs.open().unwrap();
    // Other AGs still answer; the corrupt one names itself.
    assert!(rm.owners(fs.block_off(0, 0), 4096).is_ok());
    assert!(matches!(rm.owners(fs.block_off(last, 10), 1), Err(RmapError::XfsBadMagic { what: XfsStructure::Agf, .. })));
    // A corrupt (or poisoned) AGF is itself answerable: the header blocks belong to the AG headers.
    let hdr = rm.owners(fs.agf_off(last), 512).expect("header blocks answer without the AGF");
    assert!(hdr.len() == 1 && hdr[0].kind == XfsOwnerKind::Metadata(XfsMetaKind::AgHeaders), "{hdr:?}");
    fs.dev.clear_patches();
    fs.edit_agf(last, false, |b| b[100] ^= 1);
    assert!(matches!(fs.walk_err(), RmapError::XfsBadCrc { what: XfsStructure::Agf, .. }));
    fs.dev.clear_patches();
    fs.edit_agf(0, true, |b| put32(b, 36, 50)); // rmap levels
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeTooDeep { agno: 0, levels: 50, .. }));
    fs.dev.clear_patches();
    fs.edit_agf(0, true, |b| put32(b, 24, 0xfff_ffff)); // rmap root
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreePointer { agno: 0, ptr: 0xfff_ffff, .. }));
    fs.dev.clear_patches();
    fs.edit_agf(0, true, |b| put32(b, 8, 7)); // seqno
    assert!(matches!(fs.walk_err(), RmapError::XfsAgf { agno: 0, field: "agf_seqno", .. }));
    fs.dev.clear_patches();
    let (ag, _, levels) = fs.tallest();
    assert!(levels >= 2);
    fs.edit_agf(ag, true, |b| put32(b, 80, 1)); // rmap_blocks: fewer than the walk meets
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeVisitLimit { .. }));
}

#[test]
fn btree_corruption() {
    let fs = Fs::new();
    let (ag, root, levels) = fs.tallest();
    assert!(levels >= 3, "the 1 KiB image should have a three-level rmap btree");
    let node_max = (fs.sb.block_size as usize - 56) / 44;
    let ptr0 = 56 + node_max * 40;
    let root_block = fs.read(fs.block_off(ag, root), fs.sb.block_size as usize);
    let child = be32(&root_block, ptr0);

    // A pointer to itself, and one from a child back to the root: loops.
    fs.edit_block(ag, root, true, |b| put32(b, ptr0, root));
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeLoop { ptr, .. } if ptr == root));
    fs.dev.clear_patches();
    fs.edit_block(ag, child, true, |b| put32(b, ptr0 + 4, root));
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeLoop { ptr, .. } if ptr == root));
    fs.dev.clear_patches();
    // A pointer past the AG.
    fs.edit_block(ag, root, true, |b| put32(b, ptr0, 0x7fff_fff0));
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreePointer { ptr: 0x7fff_fff0, .. }));
    fs.dev.clear_patches();
    // Two pointers to the same child: the keys of the second disagree with it.
    fs.edit_block(ag, root, true, |b| {
        let p = be32(b, ptr0);
        put32(b, ptr0 + 4, p)
    });
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeKeys { .. }));
    fs.dev.clear_patches();
    // A level too deep in a block header.
    fs.edit_block(ag, root, true, |b| b[4..6].copy_from_slice(&7u16.to_be_bytes()));
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeBlock { field: "bb_level", value: 7, .. }));
    fs.dev.clear_patches();
    // Bad magic, bad CRC, wrong owner AG, a misdirected block.
    fs.edit_block(ag, child, false, |b| b[0] = 0);
    assert!(matches!(fs.walk_err(), RmapError::XfsBadMagic { what: XfsStructure::RmapBlock, .. }));
    fs.dev.clear_patches();
    fs.edit_block(ag, child, false, |b| b[200] ^= 0x10);
    assert!(matches!(fs.walk_err(), RmapError::XfsBadCrc { what: XfsStructure::RmapBlock, .. }));
    fs.dev.clear_patches();
    fs.edit_block(ag, child, true, |b| put32(b, 48, ag + 1));
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeBlock { field: "bb_owner", .. }));
    fs.dev.clear_patches();
    let root_copy = root_block.clone();
    fs.dev.patch(fs.block_off(ag, child), &root_copy);
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeBlock { field: "bb_blkno", .. }));
    fs.dev.clear_patches();
    // numrecs larger than the block holds.
    fs.edit_block(ag, root, true, |b| b[6..8].copy_from_slice(&0xffffu16.to_be_bytes()));
    assert!(matches!(fs.walk_err(), RmapError::XfsBtreeBlock { field: "bb_numrecs", .. }));
    fs.dev.clear_patches();
}

#[test]
fn record_corruption() {
    let fs = Fs::new();
    // Find a leaf: follow first pointers from the root.
    let (ag, mut blk, levels) = fs.tallest();
    let node_max = (fs.sb.block_size as usize - 56) / 44;
    for _ in 1..levels {
        let b = fs.read(fs.block_off(ag, blk), fs.sb.block_size as usize);
        blk = be32(&b, 56 + node_max * 40);
    }
    let leaf = fs.read(fs.block_off(ag, blk), fs.sb.block_size as usize);
    assert_eq!(u16::from_be_bytes([leaf[4], leaf[5]]), 0);
    // Record 1: zero length; an unknown special owner; a block count past the AG; reserved offset bits.
    let r = 56 + 24;
    type Edit = Box<dyn Fn(&mut [u8])>;
    let cases: [(&str, Edit); 4] = [
        ("zero block count", Box::new(move |b: &mut [u8]| put32(b, r + 4, 0))),
        ("unknown special owner", Box::new(move |b: &mut [u8]| b[r + 8..r + 16].copy_from_slice(&(-42i64).to_be_bytes()))),
        ("extent runs past the end of the AG", Box::new(move |b: &mut [u8]| put32(b, r + 4, 0x7fff_0000))),
        ("reserved offset bits are set", Box::new(move |b: &mut [u8]| b[r + 17] |= 0x40)),
    ];
    for (want, f) in cases {
        fs.edit_block(ag, blk, true, |b| f(b));
        match fs.walk_err() {
            RmapError::XfsRecord { reason, .. } => assert_eq!(reason, want),
            other => panic!("{want}: got {other:?}"),
        }
        fs.dev.clear_patches();
    }
}

/// Where metadata lives: the superblock, every AGF, and every block owned by the free-space btrees (which include
/// the rmap btree).
fn metadata_targets(fs: &Fs) -> &'static [(u64, usize, usize)] {
    static TARGETS: OnceLock<Vec<(u64, usize, usize)>> = OnceLock::new();
    TARGETS.get_or_init(|| metadata_targets_uncached(fs))
}

fn metadata_targets_uncached(fs: &Fs) -> Vec<(u64, usize, usize)> {
    let mut t = vec![(0u64, 512usize, 224usize)];
    for ag in 0..fs.sb.ag_count {
        t.push((fs.agf_off(ag), 512, 216));
    }
    for r in fsmap(&image()).iter().filter(|r| r.owner as i64 == -5) {
        for i in 0..r.block_count {
            t.push((fs.block_off(r.agno, r.agbno + i), fs.sb.block_size as usize, 52));
        }
    }
    t
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn random_metadata_flips_never_panic(
        target in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 1..8),
        fix_crc in any::<bool>(),
        probes in prop::collection::vec(any::<u64>(), 4),
    ) {
        let fs = Fs::new();
        let targets = metadata_targets(&fs);
        let (off, len, crc_off) = *target.get(targets);
        fs.edit(off, len, fix_crc.then_some(crc_off), |b| {
            for (at, x) in &flips {
                let i = at.index(b.len());
                b[i] ^= x;
            }
        });
        if let Ok(rm) = fs.open() {
            let _ = rm.walk(&mut |_| {});
            let bytes = fs.sb.data_bytes();
            for p in probes {
                let _ = rm.owners(p % bytes, 1 + p % 70000);
            }
        }
    }
}
