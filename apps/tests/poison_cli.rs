//! `nvstack poison` from the command line: inject (synthetic SIGBUS on the host), list, explain, bad input.

use std::process::Command;

fn nvstack() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvstack"));
    c.env("RUST_LOG", "error");
    c
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("nvstack-poison-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&p).unwrap();
    p
}

#[test]
fn inject_list_explain() {
    let d = tempdir("a");
    let img = d.join("pm.img");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    let log = d.join("poison.log");
    let out = nvstack()
        .args(["poison", "inject", "--pmem", img.to_str().unwrap(), "--offset", "0x3010", "--volume", "vol0:0:512K"])
        .args(["--journal", log.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ev: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ev["source"], "sigbus_action_optional");
    assert_eq!(ev["translation"]["offset"], 0x3000);
    assert_eq!(ev["owners"][0]["owner"]["kind"], "volume");
    assert_eq!(ev["owners"][0]["owner"]["name"], "vol0");
    assert_eq!(ev["action"]["action"], "no_owner_known", "a volume alone does not prove free space");

    let out = nvstack().args(["poison", "list", "--journal", log.to_str().unwrap(), "--json"]).output().unwrap();
    assert!(out.status.success());
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);

    let out = nvstack()
        .args(["poison", "explain", "--pmem", img.to_str().unwrap(), "--offset", "8K", "--volume", "v:4K:8K"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("volume v at 0x1000"), "{text}");
    assert!(text.contains("explain only"), "{text}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn bad_input_exits_2() {
    let d = tempdir("b");
    let img = d.join("pm.img");
    std::fs::File::create(&img).unwrap().set_len(1 << 20).unwrap();
    for args in [
        vec!["poison", "explain", "--offset", "0"],
        vec!["poison", "explain", "--pmem", img.to_str().unwrap(), "--offset", "0", "--volume", "nolen"],
        vec!["poison", "explain", "--pmem", img.to_str().unwrap(), "--offset", "0", "--phys", "0x1000"],
        vec!["poison", "inject", "--offset", "0"],
        vec!["poison", "inject", "--pmem", img.to_str().unwrap(), "--offset", "16M"],
        vec!["poison", "list", "--journal", "/nonexistent/poison.log"],
        vec!["poison", "explain", "--pmem", img.to_str().unwrap(), "--offset", "zz"],
    ] {
        let out = nvstack().args(&args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!out.stderr.is_empty());
    }
    let _ = std::fs::remove_dir_all(&d);
}
