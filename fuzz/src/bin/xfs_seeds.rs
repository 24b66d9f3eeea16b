//! Write a seed for the xfs_rmap fuzz target from a real image: its superblock, every AGF and every rmap btree
//! block (found by walking from each AGF), in the sparse format, CRC-fixing flag set.
//!
//! `cargo run --bin xfs_seeds -- IMAGE OUT`

#[path = "../sparse.rs"]
mod sparse;

use std::fs::File;
use std::os::unix::fs::FileExt;

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes(b[off..off + 4].try_into().unwrap())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    assert!(args.len() == 3, "usage: xfs_seeds IMAGE OUT");
    let img = File::open(&args[1]).expect("open image");
    let read = |off: u64, len: usize| {
        let mut v = vec![0u8; len];
        img.read_exact_at(&mut v, off).expect("read image");
        v
    };
    let sb = read(0, 512);
    let block = u64::from(be32(&sb, 4));
    let sect = u64::from(u16::from_be_bytes([sb[102], sb[103]]));
    let agblocks = u64::from(be32(&sb, 84));
    let agcount = be32(&sb, 88);
    let node_max = (block as usize - 56) / 44;
    let mut chunks = vec![(0u64, read(0, sect as usize))];
    for ag in 0..u64::from(agcount) {
        let agf_off = ag * agblocks * block + sect;
        let agf = read(agf_off, sect as usize);
        chunks.push((agf_off, agf.clone()));
        let mut level = vec![u64::from(be32(&agf, 24))];
        while !level.is_empty() {
            let mut next = Vec::new();
            for agbno in level {
                let off = (ag * agblocks + agbno) * block;
                let b = read(off, block as usize);
                let (lvl, n) = (u16::from_be_bytes([b[4], b[5]]), usize::from(u16::from_be_bytes([b[6], b[7]])));
                if lvl > 0 {
                    next.extend((0..n).map(|i| u64::from(be32(&b, 56 + node_max * 40 + i * 4))));
                }
                chunks.push((off, b));
            }
            level = next;
        }
    }
    let out = sparse::encode(1, &chunks);
    std::fs::write(&args[2], &out).expect("write seed");
    println!("{}: {} chunks, {} bytes", args[2], chunks.len(), out.len());
}
