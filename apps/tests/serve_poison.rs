//! The poison listener inside `nvstack serve`: explain and inject (the `--poison-test-rpc` test aid) through the
//! appliance's reverse maps, the journal over RPC and in DATA_DIR/poison.log, and the errors.

mod serve_common;

use std::process::Command;

use serde_json::{json, Value};
use serve_common::*;

fn err(v: &Value) -> (i64, String) {
    (v["error"]["code"].as_i64().unwrap_or_else(|| panic!("no error: {v}")), v["error"]["message"].as_str().unwrap().to_string())
}

fn events(s: &Server, params: Value) -> Vec<Value> {
    let v = s.rpc("nvstack_get_poison_events", params);
    v["result"].as_array().unwrap_or_else(|| panic!("{v}")).clone()
}

#[test]
fn events_name_the_owning_export_and_are_journaled() {
    let s = Server::start("poison", &["--volume", "malloc:8M,name=Vol0", "--poison-test-rpc", "--no-cache"]);
    assert!(events(&s, json!({})).is_empty());

    // Explain: the chain, nothing journaled, nothing done.
    let v = s.rpc("nvstack_poison_explain", json!({"device": "Vol0", "offset": 4096}));
    let e = &v["result"];
    assert_eq!(e["source"], "explain", "{v}");
    assert_eq!(e["exports"], json!(["disk0"]), "{v}");
    assert_eq!(e["owners"][0]["owner"], json!({"kind": "volume", "name": "export:disk0", "offset": 4096}), "{v}");
    assert_eq!(e["action"]["action"], "none");
    assert!(e["outcome"].as_str().unwrap().contains("would do"), "{v}");
    assert!(events(&s, json!({})).is_empty(), "explain journals nothing");

    // Inject: through the same pipeline as a real report; an export with nothing known inside is not free space.
    let v = s.rpc("nvstack_poison_inject", json!({"device": "Vol0", "offset": 8192}));
    let e = &v["result"];
    assert_eq!(e["source"], "injected", "{v}");
    assert_eq!((e["device"].as_str(), e["offset"].as_u64(), e["len"].as_u64()), (Some("Vol0"), Some(8192), Some(4096)), "{v}");
    assert_eq!(e["exports"], json!(["disk0"]));
    assert_eq!(e["action"]["action"], "no_owner_known", "{v}");
    assert!(e["time_unix_ms"].as_u64().unwrap() > 0, "{v}");
    let first_id = e["id"].as_u64().unwrap();

    // A bdev nobody exports has no owner at all.
    assert_eq!(s.rpc("bdev_malloc_create", json!({"name": "M1", "num_blocks": 8192, "block_size": 512}))["result"], "M1");
    let v = s.rpc("nvstack_poison_inject", json!({"device": "M1", "offset": 0, "len": 512}));
    assert_eq!(v["result"]["owners"], json!([]), "{v}");
    assert_eq!(v["result"]["exports"], json!([]));

    // Stacked: base -> cache -> export. The chain follows the cache to its export.
    let v = s.rpc("nvstack_cache_create", json!({"base_bdev_name": "M1", "cache_mb": 4}));
    let cache = v["result"].as_str().unwrap_or_else(|| panic!("{v}")).to_string();
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "c1", "bdev_name": cache}))["result"], true);
    let v = s.rpc("nvstack_poison_inject", json!({"device": "M1", "offset": 65536}));
    let e = &v["result"];
    let chain: Vec<(u64, String)> = e["owners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["depth"].as_u64().unwrap(), p["owner"]["name"].as_str().unwrap_or("").to_string()))
        .collect();
    assert_eq!(chain, vec![(0, cache.clone()), (1, "export:c1".to_string())], "{v}");
    assert_eq!(e["exports"], json!(["c1"]));
    assert_eq!(e["action"]["action"], "no_owner_known", "the cache registers no map of its pages yet: {v}");

    // Deleting the export takes it out of the chain.
    assert_eq!(s.rpc("nvstack_export_delete", json!({"name": "disk0"}))["result"], true);
    let v = s.rpc("nvstack_poison_explain", json!({"device": "Vol0", "offset": 0}));
    assert_eq!(v["result"]["exports"], json!([]), "{v}");

    // Errors: unknown device, out of range, bad lengths, unknown keys, missing parameters.
    let (c, m) = err(&s.rpc("nvstack_poison_inject", json!({"device": "nope", "offset": 0})));
    assert_eq!(c, -19);
    assert!(m.contains("nope") && m.contains("Vol0"), "the message lists the bdevs: {m}");
    let (c, m) = err(&s.rpc("nvstack_poison_explain", json!({"device": "Vol0", "offset": 8u64 << 20})));
    assert_eq!(c, -32602);
    assert!(m.contains("beyond the end") && m.contains(&(8u64 << 20).to_string()), "{m}");
    let (c, m) = err(&s.rpc("nvstack_poison_inject", json!({"device": "Vol0", "offset": (8u64 << 20) - 512, "len": 4096})));
    assert_eq!(c, -32602);
    assert!(m.contains("beyond the end"), "{m}");
    let (c, _) = err(&s.rpc("nvstack_poison_inject", json!({"device": "Vol0", "offset": 0, "len": 0})));
    assert_eq!(c, -32602);
    let (c, _) = err(&s.rpc("nvstack_poison_inject", json!({"device": "Vol0", "offset": 4096, "len": u64::MAX})));
    assert_eq!(c, -32602);
    let (c, m) = err(&s.rpc("nvstack_poison_explain", json!({"device": "Vol0", "offset": 0, "colour": 1})));
    assert_eq!(c, -32602);
    assert!(m.contains("colour"), "{m}");
    let (c, m) = err(&s.rpc("nvstack_poison_explain", json!({"device": "Vol0"})));
    assert_eq!(c, -32602);
    assert!(m.contains("offset"), "{m}");
    // Refused requests journal nothing.
    let all = events(&s, json!({}));
    assert_eq!(all.len(), 3, "{all:?}");
    let last = events(&s, json!({"limit": 1}));
    assert_eq!(last.len(), 1);
    assert_eq!(last[0]["id"], all[2]["id"]);

    // `nvstack poison list --data-dir` reads the appliance's journal file.
    let out = run_ok(Command::new(BIN).args(["poison", "list", "--json", "--data-dir"]).arg(&s.dir));
    let listed: Value = serde_json::from_str(&out).unwrap();
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed.iter().all(|e| e["source"] == "injected"), "{listed:?}");
    let out = run_ok(Command::new(BIN).args(["poison", "list", "--data-dir"]).arg(&s.dir));
    assert!(out.contains("Injected") && out.contains("Vol0"), "{out}");
    let dir = s.dir.clone();
    assert!(s.stop().success());

    // A restarted appliance appends to the same journal and continues its numbering.
    let s = Server::start_in(&dir, &["--volume", "malloc:8M,name=Vol0", "--poison-test-rpc", "--no-cache"]);
    assert!(events(&s, json!({})).is_empty(), "the RPC shows this run's events; the log file keeps all");
    let v = s.rpc("nvstack_poison_inject", json!({"device": "Vol0", "offset": 0}));
    assert_eq!(v["result"]["id"].as_u64(), Some(first_id + 3), "{v}");
    assert!(s.stop().success());
    let log = std::fs::read_to_string(dir.join("poison.log")).unwrap();
    assert_eq!(log.lines().count(), 4);
}

#[test]
fn inject_needs_the_flag_and_no_poison_turns_the_listener_off() {
    let s = Server::start("poison-noflag", &["--volume", "malloc:1M,name=Vol0"]);
    let (c, m) = err(&s.rpc("nvstack_poison_inject", json!({"device": "Vol0", "offset": 0})));
    assert_eq!(c, -1);
    assert!(m.contains("--poison-test-rpc"), "{m}");
    // Explain needs no flag.
    let v = s.rpc("nvstack_poison_explain", json!({"device": "Vol0", "offset": 0}));
    assert_eq!(v["result"]["exports"], json!(["disk0"]), "{v}");
    assert!(events(&s, json!({})).is_empty());
    assert!(s.stop().success());

    let s = Server::start("poison-off", &["--volume", "malloc:1M", "--no-poison", "--poison-test-rpc"]);
    let (c, m) = err(&s.rpc("nvstack_get_poison_events", json!({})));
    assert_eq!(c, -95);
    assert!(m.contains("--no-poison"), "{m}");
    assert!(!s.dir.join("poison.log").exists());
    assert!(s.stop().success());
}

#[test]
fn sigbus_on_a_pmem_bdev_reaches_the_listener() {
    let s = Server::start("poison-pmem", &["--volume", "malloc:1M", "--poison-test-rpc"]);
    let img = s.dir.join("pm.img");
    let v = s.rpc("nvstack_bdev_create", json!({"spec": format!("pmem:{}:4M,name=Pm0", img.display())}));
    assert_eq!(v["result"], "Pm0", "{v}");
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "pm", "bdev_name": "Pm0"}))["result"], true);
    // A SIGBUS BUS_MCEERR_AO for a page of the mapping, as the kernel sends on a machine check: the listener thread
    // drains it, translates the address to (Pm0, offset) and finds the export.
    let v = s.rpc("nvstack_poison_inject", json!({"device": "Pm0", "offset": 12288 + 100, "via": "sigbus"}));
    let e = &v["result"];
    assert_eq!(e["source"], "sigbus_action_optional", "{v}");
    assert!(e["vaddr"].as_u64().is_some(), "{v}");
    assert_eq!((e["device"].as_str(), e["offset"].as_u64()), (Some("Pm0"), Some(12288)), "{v}");
    assert!(e["translation"]["via"].as_str().unwrap().contains("Pm0"), "{v}");
    assert_eq!(e["exports"], json!(["pm"]));
    assert_eq!(e["action"]["action"], "no_owner_known");
    // Only mapped (pmem) bdevs can take a SIGBUS; unknown modes are refused.
    let (c, m) = err(&s.rpc("nvstack_poison_inject", json!({"device": "Malloc0", "offset": 0, "via": "sigbus"})));
    assert_eq!(c, -32602);
    assert!(m.contains("pmem"), "{m}");
    let (c, _) = err(&s.rpc("nvstack_poison_inject", json!({"device": "Pm0", "offset": 0, "via": "laser"})));
    assert_eq!(c, -32602);
    // The pmem bdev's mapping leaves the translator with the bdev.
    assert_eq!(s.rpc("nvstack_export_delete", json!({"name": "pm"}))["result"], true);
    assert_eq!(s.rpc("nvstack_bdev_delete", json!({"name": "Pm0"}))["result"], true);
    assert_eq!(events(&s, json!({})).len(), 1);
    assert!(s.stop().success());
}

#[test]
fn nvme_media_error_through_nbd_becomes_an_event() {
    let s = Server::start("poison-nvme", &["--volume", "malloc:1M"]);
    assert_eq!(s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme0", "trtype": "sim"}))["result"], json!(["Nvme0n1", "Nvme0n2"]));
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "nv", "bdev_name": "Nvme0n1"}))["result"], true);
    // Block 3 of namespace 1 (4 KiB blocks) fails reads with Unrecovered Read Error.
    let v = s.rpc("nvstack_nvme_sim_inject_error", json!({"name": "Nvme0", "nsid": 1, "slba": 3}));
    assert_eq!(v["result"], true, "{v}");
    let (c, _) = err(&s.rpc("nvstack_nvme_sim_inject_error", json!({"name": "Nvme0", "slba": 4096})));
    assert_eq!(c, -32602, "beyond the namespace");
    let (c, _) = err(&s.rpc("nvstack_nvme_sim_inject_error", json!({"name": "Nvme7", "slba": 0})));
    assert_eq!(c, -19);
    // An NBD read of blocks 2..4 fails with EIO; the request's range reaches the listener as a media error.
    let mut cl = RawClient::connect(&s.nbd_sock, "nv", false);
    cl.send(0, 0, 1, 8192, 8192, &[]);
    assert_eq!(cl.reply().0, 5, "EIO");
    cl.send(0, 0, 2, 0, 4096, &[]);
    let (e, _, _) = cl.reply();
    assert_eq!(e, 0, "other blocks still read");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    let ev = loop {
        if let Some(ev) = events(&s, json!({})).into_iter().find(|e| e["source"] == "nvme_media_error") {
            break ev;
        }
        assert!(std::time::Instant::now() < deadline, "no media-error event within 5 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    assert_eq!((ev["device"].as_str(), ev["offset"].as_u64(), ev["len"].as_u64()), (Some("Nvme0n1"), Some(8192), Some(8192)), "{ev}");
    assert_eq!(ev["exports"], json!(["nv"]));
    assert_eq!(ev["action"]["action"], "no_owner_known");
    drop(cl);
    let log = std::fs::read_to_string(s.dir.join("poison.log")).unwrap();
    assert!(log.contains("nvme_media_error"), "{log}");
    assert!(s.stop().success());
}

/// The first dirtier in a poison report is the NBD connection that wrote: the appliance numbers connections from 1
/// and tags what each dirties. Connections 1 and 2 only read; the third writes a page, still dirty (writeback every
/// hour); explaining the arena (where the cache's pages are) names connection 3 for that page.
#[test]
fn a_poison_report_names_the_nbd_connection_that_dirtied_the_page() {
    let s = Server::start("poison-client", &["--volume", "malloc:8M,name=Vol0", "--poison-test-rpc", "--no-cache"]);
    assert_eq!(s.rpc("bdev_malloc_create", json!({"name": "M2", "num_blocks": 8192, "block_size": 512}))["result"], "M2");
    let v = s.rpc("nvstack_cache_create", json!({"base_bdev_name": "M2", "cache_mb": 4, "writeback_interval_ms": 3_600_000}));
    let cache = v["result"].as_str().unwrap_or_else(|| panic!("{v}")).to_string();
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "c2", "bdev_name": cache}))["result"], true);
    assert_eq!(s.rpc("bdev_malloc_create", json!({"name": "M3", "num_blocks": 8192, "block_size": 512}))["result"], "M3");
    let (c, m) = err(&s.rpc("nvstack_cache_create", json!({"base_bdev_name": "M3", "writeback_interval_ms": 0})));
    assert_eq!(c, -32602);
    assert!(m.contains("writeback_interval_ms") && m.contains("1..="), "{m}");

    let mut readers: Vec<RawClient> = (0..2).map(|_| RawClient::connect(&s.nbd_sock, "c2", false)).collect();
    for (i, r) in readers.iter_mut().enumerate() {
        r.send(0, 0, i as u64, 0, 4096, &[]);
        assert_eq!(r.reply().0, 0, "read by connection {}", i + 1);
    }
    let mut writer = RawClient::connect(&s.nbd_sock, "c2", false);
    writer.send(0, 1, 9, 65536, 4096, &[0x5au8; 4096]);
    assert_eq!(writer.reply(), (0, 9, Vec::new()));

    // Walk the arena 16 MiB (one query's most) at a time until the page caching device byte 65536 shows up.
    let mut found = None;
    let mut free_slots = 0;
    let mut off = 0u64;
    while found.is_none() {
        let v = s.rpc("nvstack_poison_explain", json!({"device": "arena", "offset": off, "len": 16u64 << 20}));
        let v = if v["error"].is_null() {
            v
        } else {
            // The last piece of the arena is shorter than 16 MiB.
            let (_, m) = err(&v);
            assert!(m.contains("beyond the end"), "{m}");
            let v = s.rpc("nvstack_poison_explain", json!({"device": "arena", "offset": off}));
            assert!(v["error"].is_null(), "{v}");
            v
        };
        let owners = v["result"]["owners"].as_array().unwrap_or_else(|| panic!("{v}")).clone();
        let page = owners.iter().find(|p| p["owner"]["kind"] == "volume" && p["owner"]["name"] == cache.as_str() && p["owner"]["offset"] == 65536);
        if let Some(page) = page {
            free_slots = owners.iter().filter(|p| p["owner"]["kind"] == "cache_slot_free").count();
            let at = page["offset"].clone();
            found = owners.iter().find(|p| p["offset"] == at && p["owner"]["kind"] == "cache_page").cloned();
            assert!(found.is_some(), "no cache page beside the volume piece at {at}: {owners:?}");
        }
        off += 16 << 20;
        assert!(off < 1 << 40, "the written page never showed up in the arena");
    }
    let owner = &found.unwrap()["owner"];
    assert_eq!(owner["dirty"], true, "{owner}");
    assert_eq!(owner["first_dirtier"], 3, "the third connection wrote the page: {owner}");
    // The cache's free slots are claimed too (a poisoned one would be retired, not zeroed as free space).
    assert!(free_slots > 0, "no free cache slot was claimed in the arena window that holds the cache");
    drop(readers);
    drop(writer);
    assert!(s.stop().success());
}
