//! NVMe driver against the simulated controller: bring-up, identify, I/O with verify, splitting, SGL, tiny queues.

#[path = "nvme_common/mod.rs"]
mod common;

use common::*;
use nvstack_driver::nvme::sim::{SimConfig, SimNamespace};
use nvstack_driver::nvme::{CtrlrOpts, IoCmd, NvmOp, SubmitFail};

#[test]
fn bring_up_and_identify() {
    let r = rig(default_cfg(), fast_opts());
    let info = r.ctrl.info();
    assert_eq!(info.model, "nvstack simulated NVMe");
    assert_eq!(info.serial, "NVSTACKSIM0001");
    assert_eq!(info.mdts_bytes, Some(4096 << 5));
    assert_eq!(info.io_queues_granted, 8);
    assert_eq!(info.sgl, Some(false));
    assert!(info.volatile_write_cache);
    let nss = r.ctrl.namespaces();
    assert_eq!(nss.len(), 2);
    assert_eq!((nss[0].nsid, nss[0].block_size, nss[0].block_count), (1, 4096, 8192));
    assert_eq!((nss[1].nsid, nss[1].block_size, nss[1].block_count), (2, 512, 65536));
    assert!(nss.iter().all(|n| n.refused.is_none()));
    assert_eq!(r.ctrl.max_cmd_bytes(), 4096 << 5);
    let smart = r.ctrl.smart_log().expect("smart");
    assert_eq!(u16::from_le_bytes(smart.temperature), 310);
    assert!(r.ctrl.error_log(8).expect("error log").is_empty());
}

#[test]
fn metadata_format_is_refused_clearly() {
    let cfg = SimConfig { namespaces: vec![SimNamespace { block_size: 4096, block_count: 64, metadata_bytes: 8 }], ..SimConfig::default() };
    let r = rig(cfg, fast_opts());
    let why = r.ctrl.namespaces()[0].refused.clone().expect("refused");
    assert!(why.contains("metadata"), "{why}");
}

#[test]
fn write_read_verify_both_block_sizes() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 32);
    let mut pool = pool(&r.arena, 64 << 10, 4);
    for (nsid, shift) in [(1u32, 12u8), (2, 9)] {
        for (i, &blocks_bytes) in [512u32, 4096, 8192, 65536].iter().enumerate() {
            if blocks_bytes < (1 << shift) {
                continue;
            }
            let mut w = pool.get().unwrap();
            let mut rd = pool.get().unwrap();
            pattern(&mut w, i as u64 + u64::from(nsid) * 100);
            rd.fill(0);
            let nlb = u64::from(blocks_bytes >> shift);
            let slba = 17 * nlb;
            run(&mut qp, NvmOp::Write, nsid, shift, slba, nlb, &[(w.iova(), blocks_bytes)]).expect("write");
            run(&mut qp, NvmOp::Read, nsid, shift, slba, nlb, &[(rd.iova(), blocks_bytes)]).expect("read");
            let mut a = vec![0u8; blocks_bytes as usize];
            let mut b = vec![0u8; blocks_bytes as usize];
            w.read_at(0, &mut a).unwrap();
            rd.read_at(0, &mut b).unwrap();
            assert_eq!(a, b, "ns {nsid} {blocks_bytes} bytes");
            let mut back = vec![0u8; blocks_bytes as usize];
            assert!(r.sim.read_backing(nsid, slba << shift, &mut back));
            assert_eq!(a, back);
            pool.put(w).unwrap();
            pool.put(rd).unwrap();
        }
    }
}

#[test]
fn large_requests_split_at_mdts() {
    // MDTS 2 = 16 KiB per command; a 256 KiB request must become 16 commands.
    let cfg = SimConfig { mdts: 2, namespaces: vec![ns(4096, 4096)], ..SimConfig::default() };
    let r = rig(cfg, fast_opts());
    let mut qp = qpair(&r.ctrl, 64);
    let mut pool = pool(&r.arena, 256 << 10, 2);
    let mut w = pool.get().unwrap();
    let r_buf = pool.get().unwrap();
    pattern(&mut w, 42);
    let before = r.sim.stats().io_commands.load(std::sync::atomic::Ordering::Relaxed);
    run(&mut qp, NvmOp::Write, 1, 12, 100, 64, &[(w.iova(), 256 << 10)]).expect("write");
    let after = r.sim.stats().io_commands.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(after - before, 16);
    assert_eq!(r.sim.stats().max_transfer_bytes.load(std::sync::atomic::Ordering::Relaxed), 16 << 10);
    run(&mut qp, NvmOp::Read, 1, 12, 100, 64, &[(r_buf.iova(), 256 << 10)]).expect("read");
    let mut a = vec![0u8; 256 << 10];
    let mut b = vec![0u8; 256 << 10];
    w.read_at(0, &mut a).unwrap();
    r_buf.read_at(0, &mut b).unwrap();
    assert_eq!(a, b);
}

#[test]
fn multi_segment_prp_and_sgl() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 32);
    let mut pool = pool(&r.arena, 8192, 8);
    let mut bufs: Vec<_> = (0..4).map(|_| pool.get().unwrap()).collect();
    for (i, b) in bufs.iter_mut().enumerate() {
        pattern(b, 1000 + i as u64);
    }
    // Page-aligned segments: PRP. 4 × 8 KiB to ns 2 (512-byte blocks).
    let segs: Vec<(u64, u32)> = bufs.iter().map(|b| (b.iova(), 8192)).collect();
    run(&mut qp, NvmOp::Write, 2, 9, 0, 64, &segs).expect("prp write");
    // Segments breaking inside pages: needs SGL (the simulator has it). 512-byte pieces at odd offsets.
    let sgl_before = r.sim.stats().sgl_commands.load(std::sync::atomic::Ordering::Relaxed);
    let rd = pool.get().unwrap();
    // 1 KiB made of two 512-byte pieces in different places of the buffer: not PRP-describable.
    let pieces = vec![(rd.iova() + 4096 - 512, 512u32), (rd.iova() + 512, 512)];
    run(&mut qp, NvmOp::Read, 2, 9, 0, 2, &pieces).expect("sgl read");
    assert!(r.sim.stats().sgl_commands.load(std::sync::atomic::Ordering::Relaxed) > sgl_before);
    let mut got = vec![0u8; 512];
    rd.read_at(4096 - 512, &mut got).unwrap();
    let mut want = vec![0u8; 512];
    bufs[0].read_at(0, &mut want).unwrap();
    assert_eq!(got, want);
    rd.read_at(512, &mut got).unwrap();
    bufs[0].read_at(512, &mut want).unwrap();
    assert_eq!(got, want);
}

#[test]
fn no_sgl_controller_rejects_unaligned_segments_clearly() {
    let cfg = SimConfig { sgls: 0, ..default_cfg() };
    let r = rig(cfg, fast_opts());
    let mut qp = qpair(&r.ctrl, 8);
    let pool = pool(&r.arena, 8192, 1);
    let _ = pool;
    let segs = [(0x1_0000_0000u64 + 4096 - 512, 512u32), (0x1_0000_0000 + 512, 512)];
    let cmd = IoCmd { op: NvmOp::Read, nsid: 2, lba_shift: 9, slba: 0, nlb: 2, segs: &segs[..], fua: false, tag: 0 };
    match qp.submit(&cmd) {
        Err(SubmitFail::Invalid(why)) => assert!(why.contains("SGL"), "{why}"),
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(qp.outstanding(), 0);
}

#[test]
fn flush_write_zeroes_deallocate() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 32);
    let mut pool = pool(&r.arena, 65536, 2);
    let mut w = pool.get().unwrap();
    w.fill(0xab);
    run(&mut qp, NvmOp::Write, 1, 12, 10, 16, &[(w.iova(), 65536)]).expect("write");
    run(&mut qp, NvmOp::Flush, 1, 12, 0, 0, &[] as &[(u64, u32)]).expect("flush");
    run(&mut qp, NvmOp::WriteZeroes, 1, 12, 12, 2, &[] as &[(u64, u32)]).expect("write zeroes");
    run(&mut qp, NvmOp::Deallocate, 1, 12, 20, 4, &[] as &[(u64, u32)]).expect("deallocate");
    let mut back = vec![0u8; 16 * 4096];
    assert!(r.sim.read_backing(1, 10 * 4096, &mut back));
    for (blk, chunk) in back.chunks(4096).enumerate() {
        let lba = 10 + blk;
        let zero = (12..14).contains(&lba) || (20..24).contains(&lba);
        assert!(chunk.iter().all(|&b| b == if zero { 0 } else { 0xab }), "lba {lba}");
    }
    // Write zeroes longer than one command's 65536 blocks: split into several commands.
    run(&mut qp, NvmOp::WriteZeroes, 2, 9, 0, 65536, &[] as &[(u64, u32)]).expect("big write zeroes");
    let _ = pool.put(w);
}

#[test]
fn tiny_queues_wrap_the_phase_tag_many_times() {
    let cfg = SimConfig { max_queue_entries: 2, ..default_cfg() };
    let r = rig(cfg, CtrlrOpts { admin_entries: 2, ..fast_opts() });
    let mut qp = qpair(&r.ctrl, 4);
    assert_eq!(qp.depth(), 1, "MQES 1 allows one request in flight");
    let mut pool = pool(&r.arena, 4096, 2);
    let mut w = pool.get().unwrap();
    let rd = pool.get().unwrap();
    for i in 0..200u64 {
        pattern(&mut w, i);
        run(&mut qp, NvmOp::Write, 1, 12, i % 64, 1, &[(w.iova(), 4096)]).expect("write");
        run(&mut qp, NvmOp::Read, 1, 12, i % 64, 1, &[(rd.iova(), 4096)]).expect("read");
        assert!(check_pattern(&rd, i), "iteration {i}");
    }
}

#[test]
fn many_in_flight_with_verify() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 64);
    let mut pool = pool(&r.arena, 4096, 64);
    // Fill 64 blocks concurrently, each with its own pattern.
    let mut bufs = Vec::new();
    for i in 0..64u64 {
        let mut b = pool.get().unwrap();
        pattern(&mut b, 5000 + i);
        let segs = [(b.iova(), 4096u32)];
        let cmd = IoCmd { op: NvmOp::Write, nsid: 1, lba_shift: 12, slba: i * 3, nlb: 1, segs: &segs[..], fua: i % 2 == 0, tag: i };
        qp.submit(&cmd).expect("submit");
        bufs.push(b);
    }
    let mut done = 0;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while done < 64 {
        qp.poll(64, &mut |_, _, res| {
            res.expect("write ok");
            done += 1;
        });
        assert!(std::time::Instant::now() < deadline);
    }
    for (i, b) in bufs.iter().enumerate() {
        let mut back = vec![0u8; 4096];
        assert!(r.sim.read_backing(1, i as u64 * 3 * 4096, &mut back));
        let mut want = vec![0u8; 4096];
        b.read_at(0, &mut want).unwrap();
        assert_eq!(back, want, "block {i}");
    }
}

#[test]
fn queue_ids_run_out_clearly_and_come_back() {
    let cfg = SimConfig { max_io_queues: 1, ..default_cfg() };
    let r = rig(cfg, fast_opts());
    let q1 = qpair(&r.ctrl, 8);
    let err = r.ctrl.io_qpair(nvstack_driver::nvme::QpairOpts::depth(8)).expect_err("second queue pair");
    assert!(err.to_string().contains("fewer reactors") || err.to_string().contains("queue pairs"), "{err}");
    drop(q1);
    let _q2 = qpair(&r.ctrl, 8);
}

#[test]
fn close_shuts_down_and_reattach_works() {
    let arena = arena(64);
    let sim = nvstack_driver::nvme::sim::SimController::start(arena.clone(), default_cfg()).unwrap();
    for round in 0..3u64 {
        let ctrl = nvstack_driver::nvme::Controller::attach(sim.clone(), fast_opts()).expect("attach");
        let mut qp = qpair(&ctrl, 8);
        let mut pool = pool(&arena, 4096, 1);
        let mut b = pool.get().unwrap();
        if round > 0 {
            run(&mut qp, NvmOp::Read, 1, 12, 5, 1, &[(b.iova(), 4096)]).expect("read");
            assert!(check_pattern(&b, round - 1), "data survives re-attach");
        }
        pattern(&mut b, round);
        run(&mut qp, NvmOp::Write, 1, 12, 5, 1, &[(b.iova(), 4096)]).expect("write");
        drop(qp);
        ctrl.shutdown().expect("shutdown");
        use nvstack_driver::nvme::Transport;
        let csts = sim.read32(0x1c);
        assert_eq!((csts >> 2) & 3, 2, "CSTS.SHST = shutdown complete");
        let _ = pool.put(b);
    }
}
