//! `nvstack identify` on the host: the simulated controller end to end, and the VFIO error paths against a fake
//! sysfs tree. The real controller ("QEMU NVMe Ctrl") is identified in the QEMU guest: tests/scenarios/vfio-*.toml.

use std::process::{Command, Output};

use nvstack_driver::vfio::fake::FakeTree;

fn nvstack(args: &[&str], root: Option<&std::path::Path>) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvstack"));
    c.args(args).env_remove("RUST_LOG").env_remove("NVSTACK_SYSFS_ROOT");
    if let Some(r) = root {
        c.env("NVSTACK_SYSFS_ROOT", r);
    }
    c.output().expect("run nvstack")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[test]
fn identifies_the_simulator_as_text() {
    let o = nvstack(&["identify", "--sim"], None);
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "{}", text(&o));
    for want in [
        "NVMe controller sim0",
        "Model Number:                      nvstack simulated NVMe",
        "Serial Number:                     NVSTACKSIM0001",
        "NVMe Version:                      1.4",
        "Maximum Data Transfer Size:        128 KiB",
        "Maximum Queue Entries (MQES+1):    1024",
        "I/O Queue Pairs:                   8",
        "SGL:                               supported",
        "Volatile Write Cache:              present",
        "dataset-management write-zeroes",
        "Namespace 1",
        "Block Size:                      512 bytes",
        "Namespace 2",
        "LBAF1  data  4096 metadata   0 rp 0  (in use)",
    ] {
        assert!(out.contains(want), "missing {want:?}:\n{out}");
    }
}

#[test]
fn identifies_the_simulator_as_json() {
    let o = nvstack(&["identify", "sim", "--json"], None);
    assert!(o.status.success(), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    let c = &v["controllers"][0];
    assert_eq!(c["name"], "sim0");
    assert_eq!(c["serial"], "NVSTACKSIM0001");
    assert_eq!(c["mdts_bytes"], 131072);
    assert_eq!(c["io_queue_pairs"], 8);
    assert_eq!(c["namespaces"].as_array().map(Vec::len), Some(2));
    assert_eq!(c["namespaces"][0]["block_size"], 512);
    assert_eq!(c["namespaces"][1]["block_size"], 4096);
    assert_eq!(c["namespaces"][1]["size_bytes"], 16 << 20);
    let in_use: Vec<_> =
        c["namespaces"][1]["lba_formats"].as_array().unwrap().iter().filter(|f| f["in_use"] == true).collect();
    assert_eq!(in_use.len(), 1);
    assert_eq!(in_use[0]["block_size"], 4096);
}

#[test]
fn vfio_errors_say_what_to_do() {
    let t = FakeTree::new();
    t.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
    t.add_nvme("0000:00:05.0", Some("vfio-pci"), None);
    t.add_function("0000:00:06.0", 0x1af4, 0x1041, 0x020000, Some("virtio-pci"), Some(5));
    let root = Some(t.root());

    let o = nvstack(&["identify", "0000:00:04.0"], root);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("0000:00:04.0 is bound to nvme, not vfio-pci: run `nvstack setup`"), "{}", text(&o));

    let o = nvstack(&["identify", "0000:00:05.0"], root);
    assert!(text(&o).contains("has no IOMMU group") && text(&o).contains("intel_iommu=on"), "{}", text(&o));

    let o = nvstack(&["identify", "0000:00:09.0"], root);
    assert!(text(&o).contains("no PCI function 0000:00:09.0"), "{}", text(&o));

    let o = nvstack(&["identify", "0000:00:06.0"], root);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not an NVMe controller"), "{}", text(&o));

    let o = nvstack(&["identify", "00:04"], root);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("is not a PCI address"), "{}", text(&o));

    // No BDF: only functions bound to vfio-pci count; here the only one has no IOMMU group.
    let o = nvstack(&["identify"], root);
    assert!(text(&o).contains("0000:00:05.0 has no IOMMU group"), "{}", text(&o));
    let t2 = FakeTree::new();
    t2.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
    let o = nvstack(&["identify"], Some(t2.root()));
    assert!(text(&o).contains("no NVMe function is bound to vfio-pci"), "{}", text(&o));
}

#[test]
fn a_ready_function_on_a_host_without_vfio_fails_clearly() {
    // Bound to vfio-pci with an IOMMU group and a group file in the fake tree: the sysfs checks pass, and what
    // fails next is real: no hugepages reserved on this host, or no /dev/vfio/vfio. Both name the fix.
    let t = FakeTree::new();
    t.add_nvme("0000:00:04.0", Some("vfio-pci"), Some(3));
    t.add_vfio_group_file(3);
    let o = nvstack(&["identify", "0000:00:04.0"], Some(t.root()));
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    let hugepages = out.contains("hugepages are required for DMA") && out.contains("nvstack setup");
    let module = out.contains("/dev/vfio/vfio does not exist") && out.contains("modprobe vfio-pci");
    assert!(hugepages || module, "{out}");
}
