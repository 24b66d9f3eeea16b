//! `nvstack setup` against a fake sysfs tree (NVSTACK_SYSFS_ROOT) with a fake kernel answering the binds.
//! The real thing (kernel nvme -> vfio-pci -> nvme) runs in the QEMU guest: tests/scenarios/vfio_setup.

use std::process::{Command, Output};

use nvstack_driver::vfio::fake::FakeTree;

fn nvstack(tree: &FakeTree, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nvstack"));
    c.args(args).env("NVSTACK_SYSFS_ROOT", tree.root());
    for k in ["HUGEMEM", "NRHUGE", "HUGENODE", "PCI_ALLOWED", "PCI_BLOCKED", "RUST_LOG"] {
        c.env_remove(k);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("run nvstack")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn read(tree: &FakeTree, rel: &str) -> String {
    std::fs::read_to_string(tree.root().join(rel)).unwrap().trim().to_string()
}

#[test]
fn binds_all_nvme_reserves_hugepages_and_resets() {
    let t = FakeTree::new();
    t.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
    t.add_block("0000:00:04.0", "nvme0", &["nvme0n1"], &[]);
    t.add_nvme("0000:00:05.0", None, Some(4));
    t.add_function("0000:00:02.0", 0x1234, 0x1111, 0x030000, Some("bochs-drm"), Some(1));
    let _k = t.kernel();

    let o = nvstack(&t, &["setup"], &[("HUGEMEM", "64")]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("32 of 32 2 MiB pages reserved system-wide"), "{out}");
    assert!(out.contains("0000:00:04.0 (1b36 0010): nvme -> vfio-pci (") && out.contains("dev/vfio/3"), "{out}");
    assert!(out.contains("0000:00:05.0 (1b36 0010): no driver -> vfio-pci"), "{out}");
    assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("vfio-pci"));
    assert_eq!(t.driver_of("0000:00:05.0").as_deref(), Some("vfio-pci"));
    assert_eq!(t.driver_of("0000:00:02.0").as_deref(), Some("bochs-drm"), "not NVMe: left alone");
    assert_eq!(read(&t, "sys/bus/pci/devices/0000:00:04.0/driver_override"), "vfio-pci");

    // Running it again changes nothing.
    let o = nvstack(&t, &["setup", "--hugemem", "0"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("0000:00:04.0 (1b36 0010): already bound to vfio-pci (/dev/vfio/3)"), "{}", text(&o));

    let o = nvstack(&t, &["setup", "status"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("node0") && out.contains("2048kB") && out.contains("32 /     32"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("NVMe") && l.contains("0000:00:04.0") && l.contains("vfio-pci")),
        "{out}"
    );

    let o = nvstack(&t, &["setup", "status", "--json"], &[]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&o)));
    assert_eq!(v["nvme"][0]["bdf"], "0000:00:04.0");
    assert_eq!(v["nvme"][0]["driver"], "vfio-pci");
    assert_eq!(v["nvme"][0]["iommu_group"], 3);
    assert_eq!(v["hugepages"][0]["total"], 32);

    let o = nvstack(&t, &["setup", "reset"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("0000:00:04.0 (1b36 0010): vfio-pci -> nvme"), "{out}");
    assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("nvme"));
    assert_eq!(t.driver_of("0000:00:05.0").as_deref(), Some("nvme"));
    let f = t.sysfs().function("0000:00:04.0".parse().unwrap()).unwrap();
    assert_eq!(f.driver_override, None, "reset clears the override");
}

#[test]
fn honours_allow_and_block_lists() {
    let t = FakeTree::new();
    for (bdf, g) in [("0000:00:04.0", 3), ("0000:00:05.0", 4), ("0000:00:06.0", 5)] {
        t.add_nvme(bdf, Some("nvme"), Some(g));
    }
    let _k = t.kernel();
    let o = nvstack(
        &t,
        &["setup"],
        &[("HUGEMEM", "0"), ("PCI_ALLOWED", "0000:00:04.0 0000:00:05.0"), ("PCI_BLOCKED", "0000:00:05.0")],
    );
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("0000:00:05.0 (1b36 0010): skipping: in PCI_BLOCKED"), "{out}");
    assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("vfio-pci"));
    assert_eq!(t.driver_of("0000:00:05.0").as_deref(), Some("nvme"));
    assert_eq!(t.driver_of("0000:00:06.0").as_deref(), Some("nvme"));

    // Flags work as the environment does, and reset honours the list too.
    let o = nvstack(&t, &["setup", "--hugemem", "0", "--allow", "0000:00:06.0"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(t.driver_of("0000:00:06.0").as_deref(), Some("vfio-pci"));
    let o = nvstack(&t, &["setup", "reset", "--block", "0000:00:06.0"], &[]);
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("nvme"));
    assert_eq!(t.driver_of("0000:00:06.0").as_deref(), Some("vfio-pci"));

    // An allowed address that is not there is a usage error (exit 2).
    let o = nvstack(&t, &["setup", "--hugemem", "0"], &[("PCI_ALLOWED", "0000:00:09.0")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("0000:00:09.0 does not exist"), "{}", text(&o));
}

#[test]
fn skips_mounted_and_iommu_less_devices() {
    let t = FakeTree::new();
    t.add_nvme("0000:00:04.0", Some("nvme"), Some(3));
    t.add_block("0000:00:04.0", "nvme0", &["nvme0n1"], &["nvme0n1p1"]);
    t.add_mount("/dev/nvme0n1p1", "/mnt/data", "xfs");
    t.add_nvme("0000:00:05.0", Some("nvme"), Some(4));
    t.add_block("0000:00:05.0", "nvme1", &["nvme1n1"], &[]);
    t.add_holder("nvme1n1", "dm-0");
    let _k = t.kernel();
    let o = nvstack(&t, &["setup", "--hugemem", "0"], &[]);
    let out = text(&o);
    assert!(o.status.success(), "in-use devices are skipped, not failures: {out}");
    assert!(
        out.contains("0000:00:04.0 (1b36 0010): skipping: in use by the host: nvme0n1p1 is mounted on /mnt/data"),
        "{out}"
    );
    assert!(out.contains("0000:00:05.0 (1b36 0010): skipping: in use by the host: nvme1n1 is held by dm-0"), "{out}");
    assert_eq!(t.driver_of("0000:00:04.0").as_deref(), Some("nvme"));
    assert_eq!(t.driver_of("0000:00:05.0").as_deref(), Some("nvme"));

    let t2 = FakeTree::new();
    t2.add_nvme("0000:00:04.0", Some("nvme"), None);
    let _k2 = t2.kernel();
    let o = nvstack(&t2, &["setup", "--hugemem", "0"], &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("no IOMMU group") && text(&o).contains("intel_iommu=on"), "{}", text(&o));
    assert_eq!(t2.driver_of("0000:00:04.0").as_deref(), Some("nvme"), "never unbound when vfio-pci cannot take it");
}

#[test]
fn hugepages_per_node() {
    let t = FakeTree::new();
    t.add_node(1);
    let _k = t.kernel();
    let o = nvstack(&t, &["setup"], &[("NRHUGE", "8"), ("HUGENODE", "1")]);
    let out = text(&o);
    assert!(o.status.success(), "{out}");
    assert!(out.contains("8 of 8 2 MiB pages reserved on node 1"), "{out}");
    assert_eq!(read(&t, "sys/devices/system/node/node1/hugepages/hugepages-2048kB/nr_hugepages"), "8");
    assert_eq!(read(&t, "sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"), "0");
    let o = nvstack(&t, &["setup"], &[("NRHUGE", "8"), ("HUGENODE", "7")]);
    assert!(!o.status.success(), "node 7 does not exist: {}", text(&o));
}

#[test]
fn a_bind_that_never_happens_times_out_clearly() {
    let t = FakeTree::new();
    t.add_nvme("0000:00:04.0", None, Some(3));
    // No fake kernel: nothing answers drivers_probe.
    let o = nvstack(&t, &["setup", "--hugemem", "0", "--bind-timeout-ms", "50"], &[]);
    let out = text(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("0000:00:04.0 is bound to no driver, not vfio-pci, after 50 ms"), "{out}");
}
