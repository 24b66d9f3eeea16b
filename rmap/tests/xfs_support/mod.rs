//! Shared helpers of the XFS reverse-map tests: the cached images, the xfs_db oracle, an image device.

#![allow(dead_code)]

pub mod imagedev;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use nvstack_driver::dma::{Arena, ArenaConfig};
use nvstack_rmap::xfs::XfsRmapRecord;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("rmap/ has a parent").to_path_buf()
}

/// Build (or find cached) the images; panics with the script's message when it cannot, naming what is missing.
pub fn images_dir(bench: bool) -> PathBuf {
    let script = repo_root().join("scripts/make-xfs-images.sh");
    let mut cmd = Command::new("bash");
    cmd.arg(&script);
    if bench {
        cmd.arg("--bench");
    }
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "XFS test images could not be built ({}), so the XFS reverse-map tests cannot run. The script said:\n{stderr}",
        out.status
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().map(str::trim).unwrap_or_default();
    PathBuf::from(dir)
}

/// The oracle images.
pub fn oracle_images() -> Vec<PathBuf> {
    let dir = images_dir(false);
    let v = vec![dir.join("mixed-4k.img"), dir.join("mixed-1k.img")];
    for p in &v {
        assert!(p.exists(), "{} missing after make-xfs-images.sh", p.display());
    }
    v
}

/// One record as `xfs_db -r -c fsmap` prints it.
pub fn fsmap(img: &Path) -> Vec<XfsRmapRecord> {
    let out = Command::new("xfs_db")
        .args(["-r", "-c", "fsmap"])
        .arg(img)
        .output()
        .unwrap_or_else(|e| panic!("xfs_db (xfsprogs) is needed as the oracle: {e}"));
    assert!(out.status.success(), "xfs_db fsmap {} failed: {}", img.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let recs: Vec<XfsRmapRecord> = text.lines().map(parse_fsmap_line).collect();
    assert!(!recs.is_empty(), "xfs_db printed no fsmap records for {}", img.display());
    recs
}

/// `12: 0/24 len 74 owner 131 offset 0 bmbt 0 attrfork 0 extflag 0`.
fn parse_fsmap_line(line: &str) -> XfsRmapRecord {
    let f: Vec<&str> = line.split_whitespace().collect();
    assert!(f.len() == 14 && f[2] == "len" && f[4] == "owner", "unexpected xfs_db fsmap line: {line:?}");
    let (ag, bno) = f[1].split_once('/').unwrap_or_else(|| panic!("bad AG/block in {line:?}"));
    let num = |s: &str| -> u64 { s.parse().unwrap_or_else(|_| panic!("bad number {s:?} in {line:?}")) };
    let owner: i64 = f[5].parse().unwrap_or_else(|_| panic!("bad owner in {line:?}"));
    XfsRmapRecord {
        agno: num(ag) as u32,
        agbno: num(bno) as u32,
        block_count: num(f[3]) as u32,
        owner: owner as u64,
        offset: num(f[7]),
        bmbt: num(f[9]) != 0,
        attr_fork: num(f[11]) != 0,
        unwritten: num(f[13]) != 0,
    }
}

/// A small arena for a reader's buffers.
pub fn arena() -> Arc<Arena> {
    Arena::new(ArenaConfig { size_bytes: 2 << 20, require_hugepages: false, try_1g: false }).expect("arena")
}

/// A deterministic generator (splitmix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
}
