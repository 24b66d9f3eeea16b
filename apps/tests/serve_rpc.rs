//! JSON-RPC and SPDK JSON config: methods, error objects, save_config round trip, `nvstack rpc`, bad configs.

mod serve_common;

use std::process::Command;

use serde_json::json;
use serve_common::*;

#[test]
fn rpc_methods_errors_and_save_config_round_trip() {
    let s = Server::start("rpc", &["--volume", "malloc:8M"]);
    let v = s.rpc("spdk_get_version", json!(null));
    assert!(v["result"]["version"].as_str().unwrap().starts_with("nvstack v"), "{v}");
    // Unknown method: -32601. Bad params: -32602. Missing device: -19.
    let v = s.rpc("bdev_frobnicate", json!({}));
    assert_eq!(v["error"]["code"], -32601, "{v}");
    let v = s.rpc("bdev_malloc_create", json!({"num_blocks": "lots"}));
    assert_eq!(v["error"]["code"], -32602, "{v}");
    let v = s.rpc("bdev_malloc_create", json!({"num_blocks": 16, "block_size": 512, "colour": "red"}));
    assert_eq!(v["error"]["code"], -32602);
    assert!(v["error"]["message"].as_str().unwrap().contains("colour"), "{v}");
    let v = s.rpc("bdev_get_bdevs", json!({"name": "nope"}));
    assert_eq!(v["error"]["code"], -19);
    // SPDK shapes.
    let v = s.rpc("bdev_malloc_create", json!({"name": "Malloc7", "num_blocks": 32768, "block_size": 512}));
    assert_eq!(v["result"], "Malloc7", "{v}");
    let v = s.rpc("bdev_null_create", json!({"name": "Null3", "num_blocks": 1024, "block_size": 4096}));
    assert_eq!(v["result"], "Null3", "{v}");
    let v = s.rpc("bdev_get_bdevs", json!({"name": "Malloc7"}));
    let b = &v["result"][0];
    assert_eq!(b["num_blocks"], 32768);
    assert_eq!(b["block_size"], 512);
    assert_eq!(b["product_name"], "Malloc disk");
    assert_eq!(b["supported_io_types"]["read"], true);
    let v = s.rpc("nvstack_export_create", json!({"name": "m7", "bdev_name": "Malloc7", "description": "ram"}));
    assert_eq!(v["result"], true, "{v}");
    let v = s.rpc("nvstack_export_create", json!({"name": "m7", "bdev_name": "Malloc7"}));
    assert_eq!(v["error"]["code"], -17);
    // An exported bdev cannot be deleted.
    let v = s.rpc("bdev_malloc_delete", json!({"name": "Malloc7"}));
    assert_eq!(v["error"]["code"], -16, "{v}");
    // I/O through the new export shows in the iostat.
    let mut c = RawClient::connect(&s.nbd_sock, "m7", false);
    c.send(0, 1, 1, 0, 4096, &[9u8; 4096]);
    assert_eq!(c.reply().0, 0);
    drop(c);
    let v = s.rpc("bdev_get_iostat", json!({"name": "Malloc7"}));
    assert_eq!(v["result"]["bdevs"][0]["num_write_ops"], 1, "{v}");
    assert_eq!(v["result"]["bdevs"][0]["bytes_written"], 4096);
    let v = s.rpc("nvstack_get_stats", json!({}));
    assert!(v["result"]["exports"].as_array().unwrap().iter().any(|e| e["name"] == "m7" && e["iostat"]["num_write_ops"] == 1));
    let v = s.rpc("framework_get_reactors", json!({}));
    assert_eq!(v["result"]["reactors"].as_array().unwrap().len(), 1);
    let v = s.rpc("nvstack_export_list", json!({}));
    assert_eq!(v["result"].as_array().unwrap().len(), 2);
    // save_config, through the `nvstack rpc` client (as rpc.py), then restart from it.
    let out = run_ok(Command::new(BIN).args(["rpc", "-s"]).arg(&s.rpc_sock).arg("save_config"));
    let cfg: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(cfg["subsystems"][0]["subsystem"], "bdev");
    let cfg_path = s.dir.join("saved.json");
    std::fs::write(&cfg_path, &out).unwrap();
    // The client reports an error reply with a clear message and a failing status.
    let o = Command::new(BIN).args(["rpc", "-s"]).arg(&s.rpc_sock).arg("no_such_method").output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("not found"), "{}", String::from_utf8_lossy(&o.stderr));
    let v = s.rpc("nvstack_export_delete", json!({"name": "m7"}));
    assert_eq!(v["result"], true);
    let v = s.rpc("bdev_malloc_delete", json!({"name": "Malloc7"}));
    assert_eq!(v["result"], true, "{v}");
    assert!(s.stop().success());

    let s2 = Server::start("rpc2", &["-c", cfg_path.to_str().unwrap()]);
    let v = s2.rpc("bdev_get_bdevs", json!({}));
    let names: Vec<&str> = v["result"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"Malloc7") && names.contains(&"Null3"), "{names:?}");
    let v = s2.rpc("nvstack_export_list", json!({}));
    assert!(v["result"].as_array().unwrap().iter().any(|e| e["name"] == "m7"));
    assert!(s2.stop().success());
}

#[test]
fn invalid_config_files_give_clear_errors() {
    let d = tmpdir("badcfg");
    let cases = [
        ("{ not json", "not valid JSON"),
        ("{\"subsystems\": 3}", "subsystems"),
        ("{\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[{\"method\":\"bdev_frob\",\"params\":{}}]}]}", "bdev_frob"),
        (
            "{\"subsystems\":[{\"subsystem\":\"bdev\",\"config\":[{\"method\":\"bdev_malloc_create\",\"params\":{\"name\":\"M\"}}]}]}",
            "num_blocks",
        ),
    ];
    for (i, (text, want)) in cases.iter().enumerate() {
        let p = d.join(format!("c{i}.json"));
        std::fs::write(&p, text).unwrap();
        let o = Command::new(BIN)
            .args(["serve", "--no-tcp", "-c"])
            .arg(&p)
            .arg("--data-dir")
            .arg(d.join(format!("data{i}")))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "bad config {i} must exit 2: {err}");
        assert!(err.contains(want) && err.contains(p.to_str().unwrap()), "error for config {i} should name {want:?} and the file: {err}");
    }
}

fn rpc_err(v: &serde_json::Value) -> (i64, String) {
    (v["error"]["code"].as_i64().unwrap_or_else(|| panic!("no error: {v}")), v["error"]["message"].as_str().unwrap_or_default().to_string())
}

/// A simple-reply read of `len` bytes at `offset`: (error, data).
fn nbd_read(cl: &mut RawClient, handle: u64, offset: u64, len: u32) -> (u32, Vec<u8>) {
    use std::io::Read;
    cl.send(0, 0, handle, offset, len, &[]);
    let (e, h, _) = cl.reply();
    assert_eq!(h, handle);
    let mut data = vec![0u8; if e == 0 { len as usize } else { 0 }];
    cl.s.read_exact(&mut data).expect("read payload");
    (e, data)
}

fn claimed(s: &Server, name: &str) -> bool {
    let v = s.rpc("bdev_get_bdevs", json!({"name": name}));
    v["result"][0]["claimed"].as_bool().unwrap_or_else(|| panic!("{v}"))
}

/// `nvstack_cache_delete`: refused with nothing changed while the cache is exported, still serves a connection, or
/// is not a cache; then it writes dirty data back, stops the cache and frees its base, which holds the data and can
/// be cached again.
#[test]
fn cache_delete_writes_back_stops_the_cache_and_frees_its_base() {
    let s = Server::start("cachedel", &["--no-cache"]);
    assert_eq!(s.rpc("bdev_malloc_create", json!({"name": "M9", "num_blocks": 16384, "block_size": 512}))["result"], "M9");
    // An hour between periodic write-backs: what the client writes stays dirty in the cache until the delete.
    let v = s.rpc("nvstack_cache_create", json!({"base_bdev_name": "M9", "cache_mb": 4, "writeback_interval_ms": 3_600_000}));
    let cache = v["result"].as_str().unwrap_or_else(|| panic!("{v}")).to_string();
    assert!(claimed(&s, "M9"));
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "cd", "bdev_name": cache}))["result"], true);
    let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 + 3) as u8).collect();
    let mut cl = RawClient::connect(&s.nbd_sock, "cd", false);
    cl.send(0, 1, 1, 1 << 20, 65536, &data);
    assert_eq!(cl.reply().0, 0, "write");

    // Refusals, each leaving everything as it was.
    let (c, m) = rpc_err(&s.rpc("nvstack_cache_delete", json!({"name": cache})));
    assert_eq!(c, -16, "{m}");
    assert!(m.contains("\"cd\"") && m.contains("nvstack_export_delete"), "{m}");
    let (c, m) = rpc_err(&s.rpc("nvstack_bdev_delete", json!({"name": cache})));
    assert_eq!(c, -32602);
    assert!(m.contains("nvstack_cache_delete"), "the error names the right method: {m}");
    let (c, m) = rpc_err(&s.rpc("nvstack_cache_delete", json!({"name": "M9"})));
    assert_eq!(c, -32602);
    assert!(m.contains("not a cache") && m.contains("bdev_malloc_delete"), "{m}");
    let (c, _) = rpc_err(&s.rpc("nvstack_cache_delete", json!({"name": "nope"})));
    assert_eq!(c, -19);
    let (c, m) = rpc_err(&s.rpc("nvstack_cache_delete", json!({"name": cache, "force": true})));
    assert_eq!(c, -32602, "{m}");
    // The export goes, the connection stays: the cache still serves it.
    assert_eq!(s.rpc("nvstack_export_delete", json!({"name": "cd"}))["result"], true);
    let (c, m) = rpc_err(&s.rpc("nvstack_cache_delete", json!({"name": cache})));
    assert_eq!(c, -16, "{m}");
    assert!(m.contains("1 NBD connection"), "{m}");
    let (e, got) = nbd_read(&mut cl, 2, 1 << 20, 4096);
    assert!(e == 0 && got[..] == data[..4096], "the connection is still served (error {e})");

    // Disconnected: the delete goes through (the reactor notices the connection's end within a few polls).
    drop(cl);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let v = s.rpc("nvstack_cache_delete", json!({"name": cache}));
        if v["result"] == true {
            break;
        }
        let (c, m) = rpc_err(&v);
        assert!(c == -16 && m.contains("NBD connection") && std::time::Instant::now() < deadline, "{m}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let names: Vec<String> =
        s.rpc("bdev_get_bdevs", json!({}))["result"].as_array().unwrap().iter().map(|b| b["name"].as_str().unwrap().to_string()).collect();
    assert!(!names.contains(&cache), "{names:?}");
    assert!(!claimed(&s, "M9"), "the base is free again");

    // The base holds what the client wrote (it was only in the cache before the delete).
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "raw", "bdev_name": "M9"}))["result"], true);
    let mut cl = RawClient::connect(&s.nbd_sock, "raw", false);
    let (e, got) = nbd_read(&mut cl, 3, 1 << 20, 65536);
    assert!(e == 0 && got == data, "the dirty data was written back (error {e})");
    drop(cl);
    assert_eq!(s.rpc("nvstack_export_delete", json!({"name": "raw"}))["result"], true);

    // Cached again and deleted again, five times over with 48 MiB of pages each: more than the whole arena
    // (about 118 MiB here), so each delete must give its pages back. Then the base itself goes.
    for round in 0..5 {
        let v = s.rpc("nvstack_cache_create", json!({"base_bdev_name": "M9", "cache_mb": 48}));
        assert_eq!(v["result"].as_str(), Some(cache.as_str()), "round {round}: {v}");
        assert_eq!(s.rpc("nvstack_cache_delete", json!({"name": cache}))["result"], true, "round {round}");
    }
    assert_eq!(s.rpc("bdev_malloc_delete", json!({"name": "M9"}))["result"], true);
    let cfg = s.rpc("save_config", json!({}))["result"].to_string();
    assert!(!cfg.contains("M9"), "{cfg}");
    assert!(s.stop().success());
}

/// A cache whose write-back fails is not deleted: the error says so, and the cache, its dirty data and the claim on
/// its base stay; once the base writes again, the delete goes through and the base holds the data.
#[test]
fn cache_delete_refused_when_the_write_back_fails() {
    let s = Server::start("cachedel-fail", &["--no-cache"]);
    assert_eq!(s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme0", "trtype": "sim"}))["result"], json!(["Nvme0n1", "Nvme0n2"]));
    let v = s.rpc("nvstack_cache_create", json!({"base_bdev_name": "Nvme0n1", "cache_mb": 4, "writeback_interval_ms": 3_600_000}));
    let cache = v["result"].as_str().unwrap_or_else(|| panic!("{v}")).to_string();
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "c", "bdev_name": cache}))["result"], true);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let mut cl = RawClient::connect(&s.nbd_sock, "c", false);
    cl.send(0, 1, 1, 3 * 4096, 8192, &data);
    assert_eq!(cl.reply().0, 0, "write (cached, dirty)");
    drop(cl);
    assert_eq!(s.rpc("nvstack_export_delete", json!({"name": "c"}))["result"], true);
    // The namespace fails the next write of block 3 (the write-back).
    let v = s.rpc("nvstack_nvme_sim_inject_error", json!({"name": "Nvme0", "nsid": 1, "slba": 3, "ops": "write", "count": 1}));
    assert_eq!(v["result"], true, "{v}");
    let delete = || {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let v = s.rpc("nvstack_cache_delete", json!({"name": cache}));
            let busy = v["error"]["code"] == -16 && v["error"]["message"].as_str().unwrap_or_default().contains("NBD connection");
            if !busy || std::time::Instant::now() > deadline {
                return v;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    let (c, m) = rpc_err(&delete());
    assert_eq!(c, -5, "{m}");
    assert!(m.contains("nothing was deleted") && m.contains("Nvme0n1"), "{m}");
    assert!(claimed(&s, "Nvme0n1"), "the base stays claimed");
    assert_eq!(s.rpc("bdev_get_bdevs", json!({"name": cache}))["result"][0]["name"], cache.as_str(), "the cache stays");
    // The fault was used up: the delete goes through now, and the base holds the data.
    assert_eq!(delete()["result"], true);
    assert!(!claimed(&s, "Nvme0n1"));
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "n", "bdev_name": "Nvme0n1"}))["result"], true);
    let mut cl = RawClient::connect(&s.nbd_sock, "n", false);
    let (e, got) = nbd_read(&mut cl, 2, 3 * 4096, 8192);
    assert!(e == 0 && got == data, "written back after the retry (error {e})");
    drop(cl);
    assert!(s.stop().success());
}
