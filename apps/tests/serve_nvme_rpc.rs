//! `bdev_nvme_attach_controller` / `bdev_nvme_detach_controller` against the simulated controller (`trtype: "sim"`):
//! SPDK's shapes, errors, refusal while exported or claimed, save_config and loading an SPDK-style config.

mod serve_common;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use serve_common::*;

fn names(v: &Value) -> Vec<String> {
    v["result"].as_array().unwrap_or_else(|| panic!("not an array: {v}")).iter().map(|b| b["name"].as_str().unwrap().to_string()).collect()
}

fn err(v: &Value) -> (i64, String) {
    (v["error"]["code"].as_i64().unwrap_or_else(|| panic!("no error: {v}")), v["error"]["message"].as_str().unwrap().to_string())
}

fn wait_for_log(s: &Server, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if std::fs::read_to_string(s.dir.join("serve.log")).unwrap_or_default().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn attach_detach_errors_and_save_config() {
    let s = Server::start("nvme-rpc", &["--volume", "malloc:8M", "--no-cache", "-v"]);
    // Attach through the `nvstack rpc` client, as rpc.py would.
    let out = run_ok(Command::new(BIN).args(["rpc", "-s"]).arg(&s.rpc_sock).args([
        "bdev_nvme_attach_controller",
        r#"{"name":"Nvme0","trtype":"sim"}"#,
    ]));
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list, json!(["Nvme0n1", "Nvme0n2"]), "SPDK answers with the bdev names");
    let v = s.rpc("bdev_get_bdevs", json!({"name": "Nvme0n1"}));
    let b = &v["result"][0];
    assert_eq!(b["product_name"], "NVMe disk", "{v}");
    assert_eq!((b["block_size"].as_u64(), b["num_blocks"].as_u64()), (Some(4096), Some(4096)));
    let nv = &b["driver_specific"]["nvme"][0];
    assert_eq!(nv["ns_data"]["id"], 1, "{v}");
    assert_eq!(nv["trid"]["trtype"], "sim");
    assert!(nv["ctrlr_data"]["model_number"].as_str().unwrap().contains("simulated"), "{v}");
    let v = s.rpc("bdev_get_bdevs", json!({"name": "Nvme0n2"}));
    assert_eq!((v["result"][0]["block_size"].as_u64(), v["result"][0]["num_blocks"].as_u64()), (Some(512), Some(32768)));

    // Errors: transport, address, duplicates, keys.
    let (c, m) = err(&s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme9", "trtype": "RDMA", "traddr": "1.2.3.4"})));
    assert_eq!(c, -32602);
    assert!(m.contains("RDMA") && m.contains("PCIe") && m.contains("sim"), "{m}");
    let (c, m) = err(&s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme9", "trtype": "pcie", "traddr": "not-a-bdf"})));
    assert_eq!(c, -32602, "trtype is case-insensitive, so the address is what is wrong: {m}");
    assert!(m.contains("not-a-bdf"), "{m}");
    let (c, m) = err(&s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme9", "trtype": "PCIe"})));
    assert_eq!(c, -32602);
    assert!(m.contains("traddr"), "{m}");
    let (c, m) = err(&s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme0", "trtype": "sim", "traddr": "other"})));
    assert_eq!(c, -17, "{m}");
    let (c, m) = err(&s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme9", "trtype": "sim", "colour": "red"})));
    assert_eq!(c, -32602);
    assert!(m.contains("colour"), "{m}");
    let (c, m) = err(&s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme9", "trtype": "sim", "reconnect_delay_sec": 5})));
    assert_eq!(c, -32602);
    assert!(m.contains("reconnect_delay_sec"), "{m}");
    assert!(s.rpc("bdev_nvme_get_controllers", json!({"name": "Nvme9"}))["error"]["code"] == -19, "a failed attach leaves nothing");
    // SPDK's harmless optional keys are taken.
    let v = s.rpc(
        "bdev_nvme_attach_controller",
        json!({"name": "Nvme1", "trtype": "sim", "traddr": "simB", "prchk_reftag": false, "prchk_guard": false,
               "hostnqn": "nqn.2014-08.org.nvmexpress:uuid:1", "multipath": "disable", "ctrlr_loss_timeout_sec": 0,
               "num_io_queues": 2}),
    );
    assert_eq!(v["result"], json!(["Nvme1n1", "Nvme1n2"]), "{v}");
    let (c, m) = err(&s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme2", "trtype": "sim", "traddr": "simB"})));
    assert_eq!(c, -17);
    assert!(m.contains("simB") && m.contains("Nvme1"), "{m}");
    // Their bdevs are not deleted one by one.
    let (c, _) = err(&s.rpc("bdev_malloc_delete", json!({"name": "Nvme1n2"})));
    assert_eq!(c, -32602);

    // Exported and claimed bdevs hold their controller.
    assert_eq!(s.rpc("nvstack_export_create", json!({"name": "n1", "bdev_name": "Nvme0n1"}))["result"], true);
    let (c, m) = err(&s.rpc("bdev_nvme_detach_controller", json!({"name": "Nvme0"})));
    assert_eq!(c, -16);
    assert!(m.contains("\"n1\"") && m.contains("nvstack_export_delete"), "{m}");
    let v = s.rpc("nvstack_cache_create", json!({"base_bdev_name": "Nvme1n1", "cache_mb": 4}));
    let cache = v["result"].as_str().unwrap_or_else(|| panic!("cache: {v}")).to_string();
    let (c, m) = err(&s.rpc("bdev_nvme_detach_controller", json!({"name": "Nvme1"})));
    assert_eq!(c, -16);
    assert!(m.contains("claimed") && m.contains(&cache), "{m}");
    assert!(names(&s.rpc("bdev_get_bdevs", json!({}))).contains(&"Nvme1n2".to_string()), "a refused detach removes nothing");

    // save_config: one attach entry per controller, before the cache stacked on it; loadable.
    let cfg = s.rpc("save_config", json!({}))["result"].clone();
    let bdev_cfg = cfg["subsystems"][0]["config"].as_array().unwrap();
    let methods: Vec<&str> = bdev_cfg.iter().map(|e| e["method"].as_str().unwrap()).collect();
    assert_eq!(methods.iter().filter(|m| **m == "bdev_nvme_attach_controller").count(), 2, "{methods:?}");
    let attach1 = methods.iter().rposition(|m| *m == "bdev_nvme_attach_controller").unwrap();
    let cache_at = methods.iter().position(|m| *m == "nvstack_cache_create").unwrap();
    assert!(attach1 < cache_at, "{methods:?}");
    let p = &bdev_cfg[attach1]["params"];
    assert_eq!((p["name"].as_str(), p["trtype"].as_str(), p["traddr"].as_str()), (Some("Nvme1"), Some("sim"), Some("simB")), "{p}");
    let saved = s.dir.join("saved.json");
    std::fs::write(&saved, cfg.to_string()).unwrap();

    // An NBD write reaches the simulated namespace (this also leaves a reactor channel open on Nvme0n1).
    let mut cl = RawClient::connect(&s.nbd_sock, "n1", false);
    cl.send(0, 1, 7, 4096, 4096, &[0x5au8; 4096]);
    assert_eq!(cl.reply().0, 0);
    drop(cl);
    let v = s.rpc("bdev_get_iostat", json!({"name": "Nvme0n1"}));
    assert_eq!(v["result"]["bdevs"][0]["num_write_ops"], 1, "{v}");

    // Detach once nothing uses the bdevs; unknown names and wrong paths are refused.
    assert_eq!(s.rpc("nvstack_export_delete", json!({"name": "n1"}))["result"], true);
    let (c, m) = err(&s.rpc("bdev_nvme_detach_controller", json!({"name": "Nvme0", "traddr": "elsewhere"})));
    assert_eq!(c, -19, "{m}");
    assert_eq!(s.rpc("bdev_nvme_detach_controller", json!({"name": "Nvme0"}))["result"], true);
    let all = names(&s.rpc("bdev_get_bdevs", json!({})));
    assert!(!all.iter().any(|n| n.starts_with("Nvme0")), "{all:?}");
    let v = s.rpc("bdev_nvme_get_controllers", json!({}));
    let ctrls: Vec<&str> = v["result"].as_array().unwrap().iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(ctrls, vec!["Nvme1"]);
    let (c, _) = err(&s.rpc("bdev_nvme_detach_controller", json!({"name": "Nvme0"})));
    assert_eq!(c, -19);
    // The reactor's channel keeps Nvme0 until serve stops; then it is shut down (CC.SHN).
    assert!(wait_for_log(&s, "shutdown happens when serve stops"), "the deferred shutdown is logged");
    let dir = s.dir.clone();
    assert!(s.stop().success());
    let log = std::fs::read_to_string(dir.join("serve.log")).unwrap();
    assert!(log.matches("NVMe controller shut down").count() >= 2, "both controllers shut down at exit:\n{log}");

    // The saved config brings back both controllers, the cache and the export.
    let s2 = Server::start("nvme-rpc2", &["-c", saved.to_str().unwrap()]);
    let all = names(&s2.rpc("bdev_get_bdevs", json!({})));
    for n in ["Nvme0n1", "Nvme0n2", "Nvme1n1", "Nvme1n2", cache.as_str()] {
        assert!(all.iter().any(|x| x == n), "{n} missing from {all:?}");
    }
    let v = s2.rpc("nvstack_export_list", json!({}));
    assert!(v["result"].as_array().unwrap().iter().any(|e| e["name"] == "n1" && e["bdev_name"] == "Nvme0n1"), "{v}");
    assert!(s2.stop().success());
}

#[test]
fn spdk_config_with_nvme_controller_loads_and_detaches() {
    let dir = tmpdir("nvme-cfg");
    let cfg = json!({"subsystems": [
        {"subsystem": "accel", "config": []},
        {"subsystem": "bdev", "config": [
            {"method": "bdev_set_options", "params": {"bdev_io_pool_size": 65535, "bdev_io_cache_size": 256}},
            {"method": "bdev_nvme_set_options", "params": {"action_on_timeout": "none", "timeout_us": 0}},
            {"method": "bdev_nvme_set_hotplug", "params": {"period_us": 100000, "enable": false}},
            {"method": "bdev_nvme_attach_controller", "params": {
                "name": "Nvme0", "trtype": "sim", "traddr": "sim0", "prchk_reftag": false, "prchk_guard": false,
                "ctrlr_loss_timeout_sec": 0, "reconnect_delay_sec": 0, "fast_io_fail_timeout_sec": 0,
                "hdgst": false, "ddgst": false}},
            {"method": "bdev_wait_for_examine"}
        ]},
        {"subsystem": "nvstack_nbd", "config": [
            {"method": "nvstack_export_create", "params": {"name": "nv", "bdev_name": "Nvme0n2"}}
        ]}
    ]});
    let path = dir.join("spdk.json");
    std::fs::write(&path, cfg.to_string()).unwrap();
    let s = Server::start_in(&dir, &["-c", path.to_str().unwrap()]);
    let all = names(&s.rpc("bdev_get_bdevs", json!({})));
    assert_eq!(all, vec!["Nvme0n1", "Nvme0n2"]);
    assert!(s.banner.contains("export nv"), "{}", s.banner);
    let (c, _) = err(&s.rpc("bdev_nvme_detach_controller", json!({"name": "Nvme0"})));
    assert_eq!(c, -16);
    assert_eq!(s.rpc("nvstack_export_delete", json!({"name": "nv"}))["result"], true);
    assert_eq!(s.rpc("bdev_nvme_detach_controller", json!({"name": "Nvme0"}))["result"], true);
    assert!(names(&s.rpc("bdev_get_bdevs", json!({}))).is_empty());
    // Attach again under the same name after detach.
    assert_eq!(s.rpc("bdev_nvme_attach_controller", json!({"name": "Nvme0", "trtype": "sim", "traddr": "sim0"}))["result"], json!(["Nvme0n1", "Nvme0n2"]));
    assert!(s.stop().success());

    // A config naming an unsupported transport fails at start with the entry and the reason.
    let bad = json!({"subsystems": [{"subsystem": "bdev", "config": [
        {"method": "bdev_nvme_attach_controller", "params": {"name": "Nvme0", "trtype": "TCP", "traddr": "10.0.0.1", "trsvcid": "4420"}}
    ]}]});
    let bad_path = dir.join("bad.json");
    std::fs::write(&bad_path, bad.to_string()).unwrap();
    let o = Command::new(BIN)
        .args(["serve", "--no-tcp", "--no-pin", "--data-dir"])
        .arg(dir.join("bad"))
        .arg("-c")
        .arg(&bad_path)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("bdev_nvme_attach_controller") && e.contains("TCP") && e.contains("PCIe"), "{e}");
}
