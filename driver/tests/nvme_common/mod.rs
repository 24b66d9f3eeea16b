//! Helpers shared by the NVMe simulator tests (included with `#[path]`).
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_driver::dma::{Arena, ArenaConfig, BufPool, DmaBuf};
use nvstack_driver::nvme::sim::{SimConfig, SimController, SimNamespace};
use nvstack_driver::nvme::{Controller, CtrlrOpts, IoCmd, IoFailure, IoQpair, NvmOp, QpairOpts, SubmitFail};

/// A simulated controller attached through the driver.
pub struct Rig {
    /// The DMA arena.
    pub arena: Arc<Arena>,
    /// The simulated device.
    pub sim: Arc<SimController>,
    /// The attached controller.
    pub ctrl: Arc<Controller>,
}

/// An ordinary-memory arena of `mb` MiB.
pub fn arena(mb: u64) -> Arc<Arena> {
    Arena::new(ArenaConfig { size_bytes: mb << 20, require_hugepages: false, try_1g: false }).expect("arena")
}

/// Controller options with short deadlines, so fault tests stay quick.
pub fn fast_opts() -> CtrlrOpts {
    CtrlrOpts {
        admin_timeout: Duration::from_millis(2000),
        io_timeout: Duration::from_millis(300),
        shutdown_timeout: Duration::from_millis(2000),
        ..CtrlrOpts::default()
    }
}

/// Start a simulator and attach to it.
pub fn rig(cfg: SimConfig, opts: CtrlrOpts) -> Rig {
    let arena = arena(64);
    let sim = SimController::start(Arc::clone(&arena), cfg).expect("sim");
    let ctrl = Controller::attach(sim.clone(), opts).expect("attach");
    Rig { arena, sim, ctrl }
}

/// A namespace without metadata.
pub fn ns(block_size: u32, block_count: u64) -> SimNamespace {
    SimNamespace { block_size, block_count, metadata_bytes: 0 }
}

/// Submit one request and poll it to completion (bounded).
pub fn run(qp: &mut IoQpair, op: NvmOp, nsid: u32, lba_shift: u8, slba: u64, nlb: u64, segs: &[(u64, u32)]) -> Result<(), IoFailure> {
    let cmd = IoCmd { op, nsid, lba_shift, slba, nlb, segs, fua: false, tag: 7 };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match qp.submit(&cmd) {
            Ok(_) => break,
            Err(SubmitFail::Busy) => {
                qp.poll(64, &mut |_, _, _| {});
            }
            Err(SubmitFail::Dead(f)) => return Err(f),
            Err(SubmitFail::Invalid(why)) => panic!("invalid request: {why}"),
        }
        assert!(Instant::now() < deadline, "submit never accepted");
    }
    let mut result = None;
    while result.is_none() {
        qp.poll(64, &mut |_, tag, r| {
            assert_eq!(tag, 7);
            result = Some(r);
        });
        assert!(Instant::now() < deadline, "request never completed");
        std::hint::spin_loop();
    }
    result.unwrap_or(Err(IoFailure::Aborted))
}

/// An I/O queue pair of `depth`.
pub fn qpair(ctrl: &Arc<Controller>, depth: u16) -> IoQpair {
    ctrl.io_qpair(QpairOpts::depth(depth)).expect("qpair")
}

/// Fill a buffer with a pattern derived from `seed`.
pub fn pattern(buf: &mut DmaBuf, seed: u64) {
    let n = buf.len() as usize / 8;
    for i in 0..n {
        buf.write_u64(i * 8, seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i as u64)).unwrap();
    }
}

/// Whether a buffer holds the pattern of `seed`.
pub fn check_pattern(buf: &DmaBuf, seed: u64) -> bool {
    let n = buf.len() as usize / 8;
    (0..n).all(|i| buf.read_u64(i * 8) == Some(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(i as u64)))
}

/// A pool of `count` buffers of `bytes`.
pub fn pool(arena: &Arc<Arena>, bytes: u32, count: u32) -> BufPool {
    BufPool::new(arena, bytes, count, 4096, "test").expect("pool")
}

/// Two namespaces: 8192 × 4096 bytes (NSID 1) and 65536 × 512 bytes (NSID 2).
pub fn default_cfg() -> SimConfig {
    SimConfig { namespaces: vec![ns(4096, 8192), ns(512, 65536)], ..SimConfig::default() }
}
