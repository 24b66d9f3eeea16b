//! `nvstack perf --bdev cache:...`: a cache over malloc runs clean under --verify and its counters are printed.

use std::process::Command;

fn perf(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nvstack"))
        .arg("perf")
        .arg("--no-progress")
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run nvstack");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn cache_over_malloc_verifies_and_reports_counters_in_json() {
    // 8 MiB backing, 2 MiB cache: the random writes overflow the cache, so misses, writeback and eviction all run.
    let (code, out, err) = perf(&[
        "--bdev", "cache:malloc:8M,size=2M", "-q", "16", "-o", "4k", "-w", "randrw", "--verify", "--io-count",
        "20000", "--json",
    ]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("one JSON document");
    let t = &v["total"];
    assert_eq!(t["ios"], 20000, "{t}");
    assert_eq!(t["verify"]["mismatches"], 0, "{t}");
    assert!(t["verify"]["checked_blocks"].as_u64().unwrap() > 1000, "{t}");
    let c = &v["cache"];
    let n = |k: &str| c[k].as_u64().unwrap_or_else(|| panic!("cache.{k} missing: {c}"));
    assert!(n("hits") > 0, "{c}");
    assert!(n("misses") > 0, "{c}");
    assert!(n("writeback_ios") > 0, "a 2 MiB cache under 8 MiB of random writes must write back: {c}");
    assert!(n("writeback_avg_bytes") >= 4096, "{c}");
    let _ = n("dirty_bytes");
    assert!(v["bdev"]["name"].as_str().unwrap().starts_with("cache:"), "{}", v["bdev"]);
}

#[test]
fn cache_counters_in_text_and_bad_cache_specs() {
    let (code, out, err) =
        perf(&["--bdev", "cache:malloc:4M,mode=wt", "-q", "8", "-o", "4k", "-w", "randrw", "--io-count", "4000"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("Cache: hits"), "{out}");
    assert!(out.contains("writeback I/Os"), "{out}");
    let (code, out, err) = perf(&["--bdev", "cache:malloc:4M,mode=xx", "--io-count", "10"]);
    assert_eq!(code, 2, "stdout:\n{out}\nstderr:\n{err}");
    assert!(err.contains("mode=xx"), "{err}");
}
