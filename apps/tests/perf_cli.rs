//! `nvstack perf` as a user runs it: the built binary, its exit status and what it prints.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

fn perf(args: &[&str]) -> Out {
    let out = Command::new(env!("CARGO_BIN_EXE_nvstack"))
        .arg("perf")
        .arg("--no-progress")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run nvstack");
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!("nvstack-perf-cli-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> String {
        self.0.join(name).to_string_lossy().into_owned()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Exit status 2 and a message on stderr containing every one of `words`.
fn assert_usage(args: &[&str], words: &[&str]) {
    let o = perf(args);
    assert_eq!(o.code, 2, "{args:?} should be refused with status 2; stderr:\n{}", o.stderr);
    for w in words {
        assert!(o.stderr.contains(w), "{args:?}: stderr should mention {w:?}:\n{}", o.stderr);
    }
    assert!(o.stdout.is_empty(), "{args:?}: nothing on stdout for bad input:\n{}", o.stdout);
}

#[test]
fn bad_core_masks() {
    assert_usage(&["--bdev", "null:1M", "-m", "0xZZ"], &["core mask", "0xZZ"]);
    assert_usage(&["--bdev", "null:1M", "-m", "0,255"], &["core 255 is not available"]);
    assert_usage(&["--bdev", "null:1M", "-m", "0x0"], &["names no core"]);
}

#[test]
fn bad_files() {
    let d = TempDir::new();
    let missing_dir = d.path("no-such-dir/disk.img");
    assert_usage(&["--bdev", &format!("file:{missing_dir}:1M")], &[&missing_dir]);
    // A directory cannot be opened as a device file (an unreadable file would do too, but these tests may run as
    // root, which reads anything).
    let dir = d.path("");
    let dir = dir.trim_end_matches('/');
    assert_usage(&["--bdev", &format!("file:{dir}")], &[dir]);
}

#[test]
fn bad_sizes() {
    assert_usage(&["--bdev", "null:1000"], &["1000", "block size"]);
    assert_usage(&["--bdev", "malloc:1M", "-o", "1000"], &["1000", "not a multiple", "block size 512"]);
    assert_usage(&["--bdev", "null:1M,bs=4096", "-o", "512"], &["512", "block size 4096"]);
    assert_usage(&["--bdev", "null:1M", "-o", "4q"], &["4q", "4k"]);
    assert_usage(&["--bdev", "null:1M", "-o", "64M"], &["larger than", "largest transfer"]);
    assert_usage(&["--bdev", "null:1M", "-m", "0x1", "-o", "2M"], &["too small"]);
}

#[test]
fn bad_numbers_and_workloads() {
    assert_usage(&["--bdev", "null:1M", "-q", "0"], &["queue depth", "-q 0"]);
    assert_usage(&["--bdev", "null:1M", "-w", "randomread"], &["randomread", "randread"]);
    assert_usage(&["--bdev", "null:1M", "-w", "randrw", "-M", "101"], &["-M 101", "over 100"]);
    assert_usage(&["--bdev", "null:1M", "-t", "0"], &["-t 0"]);
    assert_usage(&["--bdev", "floppy:1M"], &["unknown kind", "null"]);
    assert_usage(&["-q", "4"], &["--bdev"]);
    assert_usage(&["--bdev", "null:64K", "-q", "64", "-o", "4k", "--verify"], &["--verify", "queue depth"]);
}

fn json(args: &[&str]) -> serde_json::Value {
    let o = perf(args);
    assert_eq!(o.code, 0, "{args:?} failed:\n{}", o.stderr);
    serde_json::from_str(&o.stdout).unwrap_or_else(|e| panic!("stdout is not one JSON document ({e}):\n{}", o.stdout))
}

fn check_totals(v: &serde_json::Value, ios: u64) {
    let t = &v["total"];
    assert_eq!(t["ios"].as_u64(), Some(ios), "{t}");
    assert_eq!(t["errors"].as_u64(), Some(0));
    assert!(t["iops"].as_f64().unwrap() > 0.0);
    assert!(t["mib_s"].as_f64().unwrap() > 0.0);
    let l = &t["latency_us"];
    let f = |k: &str| l[k].as_f64().unwrap_or_else(|| panic!("latency_us.{k} missing: {l}"));
    assert!(f("min") <= f("p50") && f("p50") <= f("p90") && f("p90") <= f("p99"), "{l}");
    assert!(f("p99") <= f("p99_9") && f("p99_9") <= f("p99_99") && f("p99_99") <= f("max"), "{l}");
    assert!(f("min") <= f("avg") && f("avg") <= f("max"), "{l}");
}

#[test]
fn json_on_null() {
    let v = json(&["--bdev", "null:1G", "-q", "64", "-o", "4k", "-w", "randread", "--io-count", "50000", "--json"]);
    assert_eq!(v["bdev"]["product_name"], "Null disk");
    assert_eq!(v["run"]["workload"], "randread");
    assert_eq!(v["run"]["queue_depth"], 64);
    assert_eq!(v["run"]["io_size"], 4096);
    assert_eq!(v["cores"].as_array().map(Vec::len), Some(1));
    check_totals(&v, 50_000);
    assert_eq!(v["total"]["reads"], 50_000);
}

#[test]
fn json_on_malloc_two_cores_mixed() {
    let v = json(&[
        "--bdev", "malloc:16M", "-q", "16", "-o", "8192", "-w", "randrw", "-M", "70", "-m", "0,1", "--io-count", "20000",
        "--json",
    ]);
    assert_eq!(v["bdev"]["product_name"], "Malloc disk");
    assert_eq!(v["run"]["rwmixread"], 70);
    assert_eq!(v["run"]["core_mask"], "0x3");
    assert_eq!(v["cores"].as_array().map(Vec::len), Some(2));
    check_totals(&v, 40_000);
    let reads = v["total"]["reads"].as_u64().unwrap();
    assert!((24_000..32_000).contains(&reads), "about 70% reads, got {reads} of 40000");
}

#[test]
fn text_table_on_null() {
    let o = perf(&["--bdev", "null:64M", "-q", "8", "-w", "write", "--io-count", "1000"]);
    assert_eq!(o.code, 0, "{}", o.stderr);
    for w in ["Device Information", "IOPS", "MiB/s", "Average", "Total", "p99.99", "Null disk"] {
        assert!(o.stdout.contains(w), "table should show {w:?}:\n{}", o.stdout);
    }
}

#[test]
fn verify_on_malloc() {
    let v = json(&["--bdev", "malloc:8M", "-q", "16", "-o", "4k", "-w", "randrw", "--verify", "-t", "1", "--json"]);
    let ver = &v["total"]["verify"];
    assert_eq!(ver["mismatches"], 0, "{ver}");
    assert!(ver["checked_blocks"].as_u64().unwrap() > 0, "{ver}");
    let v = json(&["--bdev", "malloc:8M", "-q", "8", "-o", "4k", "-w", "randread", "--verify", "--io-count", "5000", "--json"]);
    let ver = &v["total"]["verify"];
    assert_eq!(ver["unchecked_reads"], 0, "read-only verify pre-fills, so every read is checked: {ver}");
    assert_eq!(ver["checked_blocks"], 5000 * 8);
}

#[test]
fn verify_on_a_file() {
    let d = TempDir::new();
    let img = d.path("disk.img");
    let v = json(&[
        "--bdev", &format!("file:{img}:4M"), "-q", "8", "-o", "4k", "-w", "randrw", "--verify", "--io-count", "4000",
        "--json",
    ]);
    let ver = &v["total"]["verify"];
    assert_eq!(ver["mismatches"], 0, "{ver}");
    assert!(ver["checked_blocks"].as_u64().unwrap() > 0, "{ver}");
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 << 20);
}
