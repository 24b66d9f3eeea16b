//! Fuzz the XFS reverse-map reader: a sparse image (see src/sparse.rs), optionally with its CRCs made valid, is
//! opened, walked and queried. Any panic is a bug; errors are expected.

#![no_main]

#[path = "../../rmap/tests/xfs_support/imagedev.rs"]
mod imagedev;
#[path = "../src/sparse.rs"]
mod sparse;

use libfuzzer_sys::fuzz_target;
use nvstack_driver::dma::{Arena, ArenaConfig};
use nvstack_rmap::xfs::{crc, XfsOptions, XfsRmap};

fn be32(b: &[u8], off: usize) -> u32 {
    b.get(off..off + 4).map_or(0, |s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// Make the superblock, AGF and rmap block CRCs valid (so the fuzzer gets past them).
fn fix_crcs(dev: &imagedev::ImageDev, chunks: &[sparse::Chunk<'_>]) {
    let mut sb = vec![0u8; 512];
    dev.read_at(0, &mut sb);
    crc::update(&mut sb, 224);
    dev.patch(0, &sb);
    let block = u64::from(be32(&sb, 4)).clamp(512, 65536).next_power_of_two();
    let sect = u64::from(u16::from_be_bytes([sb[102], sb[103]])).clamp(512, 32768).next_power_of_two();
    let agblocks = u64::from(be32(&sb, 84));
    for ag in 0..u64::from(be32(&sb, 88)).min(16) {
        let off = ag * agblocks * block + sect;
        if off + sect <= sparse::DEVICE_BYTES {
            let mut agf = vec![0u8; sect as usize];
            dev.read_at(off, &mut agf);
            crc::update(&mut agf, 216);
            dev.patch(off, &agf);
        }
    }
    for c in chunks {
        let mut at = c.offset / block * block;
        while at < c.offset + c.data.len() as u64 && at + block <= sparse::DEVICE_BYTES {
            let mut b = vec![0u8; block as usize];
            dev.read_at(at, &mut b);
            if b.starts_with(b"RMB3") {
                crc::update(&mut b, 52);
                dev.patch(at, &b);
            }
            at += block;
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let (flags, chunks) = sparse::parse(input);
    let dev = imagedev::ImageDev::from_bytes("fuzz", Vec::new(), sparse::DEVICE_BYTES);
    for c in &chunks {
        if !c.data.is_empty() {
            dev.patch(c.offset, c.data);
        }
    }
    if flags & 1 != 0 {
        fix_crcs(&dev, &chunks);
    }
    // A fresh small arena per run: the reader carves its buffers from it and nothing returns carved memory.
    let a = Arena::new(ArenaConfig { size_bytes: 2 << 20, require_hugepages: false, try_1g: false }).expect("arena");
    let opts = XfsOptions { cache_bytes: 64 << 10, ..XfsOptions::default() };
    if let Ok(rm) = XfsRmap::open_with(dev, &a, opts) {
        let _ = rm.walk(&mut |_| {});
        let bytes = rm.superblock().data_bytes().max(1);
        for (i, c) in chunks.iter().take(8).enumerate() {
            let _ = rm.owners(c.offset % bytes, 1 + (i as u64) * 4096);
        }
    }
});
