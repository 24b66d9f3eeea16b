//! The block-device contract suite (`nvstack_blockdev::contract`) run against every backend in this crate.

use std::sync::Arc;

use nvstack_blockdev::contract::{self, ContractOpts, ContractReport};
use nvstack_blockdev::spec::open_bdev;
use nvstack_blockdev::BlockDev;
use nvstack_driver::dma::{Arena, ArenaConfig};

fn arena() -> Arc<Arena> {
    Arena::new(ArenaConfig { size_bytes: 64 << 20, ..Default::default() }).expect("arena")
}

fn run(spec: &str, opts: &ContractOpts) -> ContractReport {
    let a = arena();
    let make = || -> Result<Arc<dyn BlockDev>, String> { open_bdev(spec, &a).map_err(|e| e.to_string()) };
    match contract::run_all(&make, &a, opts) {
        Ok(r) => {
            assert_eq!(r.passed.len(), contract::check_names().len(), "{spec}: {r:?}");
            r
        }
        Err(e) => panic!("{spec}: contract failures:\n{e}"),
    }
}

#[test]
fn null_512() {
    let r = run("null:64M", &ContractOpts { verify_data: false, ..Default::default() });
    assert!(r.passed.contains(&"reactors"));
}

#[test]
fn null_4k() {
    run("null:1G,bs=4096", &ContractOpts { verify_data: false, ..Default::default() });
}

#[test]
fn malloc_512() {
    run("malloc:8M", &ContractOpts::default());
}

#[test]
fn malloc_4k() {
    run("malloc:16M,bs=4K", &ContractOpts::default());
}

#[test]
fn malloc_tiny_device() {
    // Four blocks: checks that need room say they were skipped, the rest still run.
    let r = run("malloc:2K", &ContractOpts { queue_depth: 4, ..Default::default() });
    assert!(!r.skipped.is_empty());
}
