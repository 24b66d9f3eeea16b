//! Every injected fault ends in a clean retry or a clear error, bounded in time, with no acknowledged write lost.

#[path = "nvme_common/mod.rs"]
mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use nvstack_driver::nvme::sim::{Fault, SimConfig, SimOpFilter};
use nvstack_driver::nvme::status::{media, sct};
use nvstack_driver::nvme::{EventDetail, IoCmd, IoFailure, NvmOp, NvmeStatus, SubmitFail};

fn write_then_read(r: &Rig, qp: &mut nvstack_driver::nvme::IoQpair, lba: u64, seed: u64) {
    let mut pool = pool(&r.arena, 4096, 2);
    let mut w = pool.get().unwrap();
    let rd = pool.get().unwrap();
    pattern(&mut w, seed);
    run(qp, NvmOp::Write, 1, 12, lba, 1, &[(w.iova(), 4096)]).expect("write");
    run(qp, NvmOp::Read, 1, 12, lba, 1, &[(rd.iova(), 4096)]).expect("read");
    assert!(check_pattern(&rd, seed));
}

#[test]
fn dropped_command_is_aborted_and_retried() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 8);
    r.sim.inject(Fault::DropCommands { count: 1, abortable: true });
    let t0 = Instant::now();
    write_then_read(&r, &mut qp, 3, 11);
    assert_eq!(r.sim.stats().dropped.load(Ordering::Relaxed), 1);
    assert_eq!(r.sim.stats().aborted.load(Ordering::Relaxed), 1);
    assert_eq!(r.ctrl.reset_count(), 0, "abort was enough");
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn stuck_command_leads_to_reset_and_resubmission() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 8);
    r.sim.inject(Fault::DropCommands { count: 1, abortable: false });
    write_then_read(&r, &mut qp, 4, 12);
    assert_eq!(r.ctrl.reset_count(), 1);
    assert!(r.sim.stats().enables.load(Ordering::Relaxed) >= 2);
    // The queue pair works after the reset.
    write_then_read(&r, &mut qp, 5, 13);
}

#[test]
fn command_that_never_completes_fails_with_timeout() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 8);
    r.sim.inject(Fault::DropCommands { count: 1000, abortable: false });
    let mut pool = pool(&r.arena, 4096, 1);
    let b = pool.get().unwrap();
    let t0 = Instant::now();
    let res = run(&mut qp, NvmOp::Read, 1, 12, 0, 1, &[(b.iova(), 4096)]);
    assert_eq!(res, Err(IoFailure::Timeout));
    assert!(t0.elapsed() < Duration::from_secs(15));
    r.sim.inject(Fault::ClearAll);
    write_then_read(&r, &mut qp, 6, 14);
}

#[test]
fn media_error_carries_the_lba_range_and_is_logged() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 8);
    let status = NvmeStatus::new(sct::MEDIA, media::UNRECOVERED_READ_ERROR);
    r.sim.inject(Fault::LbaError { nsid: 1, slba: 40, nlb: 2, ops: SimOpFilter::Read, status, count: None });
    let mut pool = pool(&r.arena, 4096 * 8, 1);
    let b = pool.get().unwrap();
    let res = run(&mut qp, NvmOp::Read, 1, 12, 36, 8, &[(b.iova(), 4096 * 8)]);
    match res {
        Err(IoFailure::Media { status: s, slba, nlb }) => {
            assert_eq!(s, status);
            assert_eq!((slba, nlb), (36, 8), "the failed command's range");
        }
        other => panic!("expected a media error, got {other:?}"),
    }
    // Writes to the range and reads elsewhere are fine.
    run(&mut qp, NvmOp::Write, 1, 12, 36, 8, &[(b.iova(), 4096 * 8)]).expect("write");
    run(&mut qp, NvmOp::Read, 1, 12, 50, 8, &[(b.iova(), 4096 * 8)]).expect("read elsewhere");
    let log = r.ctrl.error_log(4).expect("error log");
    assert_eq!(log[0].lba, 40);
    assert_eq!(NvmeStatus::from_cqe_word(log[0].status), status);
    assert_eq!(u128::from_le_bytes(r.ctrl.smart_log().unwrap().media_errors), 1);
}

#[test]
fn other_error_status_is_named() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 8);
    let status = NvmeStatus::new(sct::GENERIC, 0x06);
    r.sim.inject(Fault::LbaError { nsid: 1, slba: 0, nlb: 1, ops: SimOpFilter::Write, status, count: Some(1) });
    let mut pool = pool(&r.arena, 4096, 1);
    let b = pool.get().unwrap();
    let res = run(&mut qp, NvmOp::Write, 1, 12, 0, 1, &[(b.iova(), 4096)]);
    assert_eq!(res, Err(IoFailure::Status(status)));
    assert_eq!(status.name(), "internal error");
    run(&mut qp, NvmOp::Write, 1, 12, 0, 1, &[(b.iova(), 4096)]).expect("count ran out");
}

#[test]
fn fatal_status_leads_to_reset_and_io_continues() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 8);
    write_then_read(&r, &mut qp, 1, 1);
    r.sim.inject(Fault::Fatal);
    let t0 = Instant::now();
    write_then_read(&r, &mut qp, 2, 2);
    assert_eq!(r.ctrl.reset_count(), 1);
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[test]
fn surprise_removal_fails_io_with_device_gone() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 8);
    let mut pool = pool(&r.arena, 4096, 1);
    let b = pool.get().unwrap();
    r.sim.surprise_remove();
    let t0 = Instant::now();
    let res = run(&mut qp, NvmOp::Read, 1, 12, 0, 1, &[(b.iova(), 4096)]);
    assert_eq!(res, Err(IoFailure::Gone));
    assert!(r.ctrl.is_gone());
    let segs = [(b.iova(), 4096u32)];
    let cmd = IoCmd { op: NvmOp::Read, nsid: 1, lba_shift: 12, slba: 0, nlb: 1, segs: &segs[..], fua: false, tag: 0 };
    assert_eq!(qp.submit(&cmd).err(), Some(SubmitFail::Dead(IoFailure::Gone)));
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Admin commands fail at once with a clear error, and close does not hang.
    let e = r.ctrl.smart_log().expect_err("gone");
    assert!(e.to_string().contains("gone"), "{e}");
    drop(qp);
    r.ctrl.shutdown().expect("shutdown of a gone device is a no-op");
}

#[test]
fn removal_during_attach_is_a_clear_error() {
    let arena = arena(16);
    let sim = nvstack_driver::nvme::sim::SimController::start(arena, default_cfg()).unwrap();
    sim.surprise_remove();
    let e = nvstack_driver::nvme::Controller::attach(sim.clone(), fast_opts()).expect_err("gone");
    assert!(e.to_string().contains("gone"), "{e}");
}

#[test]
fn slow_and_out_of_order_completions() {
    let r = rig(default_cfg(), fast_opts());
    let mut qp = qpair(&r.ctrl, 64);
    r.sim.inject(Fault::Delay(Duration::from_millis(3)));
    write_then_read(&r, &mut qp, 7, 7);
    r.sim.inject(Fault::Delay(Duration::ZERO));
    r.sim.inject(Fault::Reorder(8));
    let mut pool = pool(&r.arena, 4096, 64);
    let mut bufs = Vec::new();
    for i in 0..64u64 {
        let mut b = pool.get().unwrap();
        pattern(&mut b, 900 + i);
        let segs = [(b.iova(), 4096u32)];
        let cmd = IoCmd { op: NvmOp::Write, nsid: 1, lba_shift: 12, slba: 100 + i, nlb: 1, segs: &segs[..], fua: false, tag: i };
        qp.submit(&cmd).expect("submit");
        bufs.push(b);
    }
    let mut order = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while order.len() < 64 {
        qp.poll(64, &mut |_, tag, res| {
            res.expect("ok");
            order.push(tag);
        });
        assert!(Instant::now() < deadline);
    }
    let mut sorted = order.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, (0..64).collect::<Vec<_>>());
    assert_ne!(order, sorted, "completions came out of order");
    for (i, b) in bufs.iter().enumerate() {
        let mut back = vec![0u8; 4096];
        let mut want = vec![0u8; 4096];
        assert!(r.sim.read_backing(1, (100 + i as u64) * 4096, &mut back));
        b.read_at(0, &mut want).unwrap();
        assert_eq!(back, want);
    }
}

#[test]
fn async_events_are_reported_with_their_log_page() {
    let r = rig(default_cfg(), fast_opts());
    r.sim.inject(Fault::Event { event_type: 1, event_info: 0, log_page: 2 });
    let deadline = Instant::now() + Duration::from_secs(5);
    let ev = loop {
        r.ctrl.service_events();
        if let Some(ev) = r.ctrl.take_event() {
            break ev;
        }
        assert!(Instant::now() < deadline, "no event");
        std::thread::sleep(Duration::from_millis(1));
    };
    assert_eq!((ev.event_type, ev.log_page), (1, 2));
    assert!(matches!(ev.detail, EventDetail::Smart { temperature_k: 310, .. }), "{ev:?}");
    // Re-armed: a second event is reported too.
    r.sim.inject(Fault::Event { event_type: 0, event_info: 1, log_page: 1 });
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        r.ctrl.service_events();
        if let Some(ev) = r.ctrl.take_event() {
            assert_eq!(ev.log_page, 1);
            break;
        }
        assert!(Instant::now() < deadline, "no second event");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn reset_by_one_queue_pair_recovers_the_other() {
    let r = rig(default_cfg(), fast_opts());
    let mut a = qpair(&r.ctrl, 8);
    let mut b = qpair(&r.ctrl, 8);
    let mut pool = pool(&r.arena, 4096, 2);
    let mut wb = pool.get().unwrap();
    pattern(&mut wb, 77);
    // b has a write in flight that the simulator holds (slow) while a's command gets stuck and forces a reset.
    r.sim.inject(Fault::Delay(Duration::from_millis(100)));
    let segs = [(wb.iova(), 4096u32)];
    let cmd = IoCmd { op: NvmOp::Write, nsid: 1, lba_shift: 12, slba: 9, nlb: 1, segs: &segs[..], fua: false, tag: 1 };
    b.submit(&cmd).expect("submit");
    b.flush();
    std::thread::sleep(Duration::from_millis(5));
    r.sim.inject(Fault::Delay(Duration::ZERO));
    r.sim.inject(Fault::DropCommands { count: 1, abortable: false });
    let ra = pool.get().unwrap();
    run(&mut a, NvmOp::Read, 1, 12, 0, 1, &[(ra.iova(), 4096)]).expect("a recovers");
    assert_eq!(r.ctrl.reset_count(), 1);
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut res = None;
    while res.is_none() {
        b.poll(8, &mut |_, _, r| res = Some(r));
        assert!(Instant::now() < deadline, "b's write never completed");
    }
    res.unwrap().expect("b's write resubmitted after the reset");
    let mut back = vec![0u8; 4096];
    let mut want = vec![0u8; 4096];
    assert!(r.sim.read_backing(1, 9 * 4096, &mut back));
    wb.read_at(0, &mut want).unwrap();
    assert_eq!(back, want, "acknowledged write is on the media");
}

/// A random workload under random faults, checked against a model: every acknowledged write reads back.
#[test]
fn no_acknowledged_write_is_lost_under_faults() {
    let cfg = SimConfig { namespaces: vec![ns(4096, 256)], ..SimConfig::default() };
    let r = rig(cfg, fast_opts());
    let mut qp = qpair(&r.ctrl, 16);
    let mut pool = pool(&r.arena, 4096, 16);
    let mut model: Vec<Option<u64>> = vec![Some(u64::MAX); 256];
    let mut rng = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut inflight: Vec<Option<(u64, u64, nvstack_driver::dma::DmaBuf)>> = (0..16).map(|_| None).collect();
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut acked = 0;
    let mut round = 0u64;
    while acked < 400 {
        round += 1;
        assert!(Instant::now() < deadline, "workload too slow: {acked} acknowledged");
        match next() % 400 {
            0 => {
                r.sim.inject(Fault::DropCommands { count: 1, abortable: next() % 2 == 0 });
            }
            1 => {
                r.sim.inject(Fault::Reorder(4));
            }
            2 => {
                r.sim.inject(Fault::ClearAll);
            }
            _ => {}
        }
        let lba = next() % 256;
        if inflight.iter().flatten().any(|(l, _, _)| *l == lba) {
            continue;
        }
        let Some(slot) = inflight.iter().position(Option::is_none) else {
            let mut finished = Vec::new();
            qp.poll(16, &mut |_, tag, res| finished.push((tag as usize, res)));
            for (slot, res) in finished {
                let (lba, seed, b) = inflight[slot].take().unwrap();
                model[lba as usize] = if res.is_ok() { Some(seed) } else { None };
                acked += usize::from(res.is_ok());
                pool.put(b).unwrap();
            }
            continue;
        };
        let mut b = pool.get().unwrap();
        pattern(&mut b, round);
        let segs = [(b.iova(), 4096u32)];
        let cmd = IoCmd { op: NvmOp::Write, nsid: 1, lba_shift: 12, slba: lba, nlb: 1, segs: &segs[..], fua: false, tag: slot as u64 };
        match qp.submit(&cmd) {
            Ok(_) => inflight[slot] = Some((lba, round, b)),
            Err(SubmitFail::Busy) => pool.put(b).unwrap(),
            Err(e) => panic!("{e:?}"),
        }
        // Reap.
        let mut finished = Vec::new();
        qp.poll(16, &mut |_, tag, res| finished.push((tag as usize, res)));
        for (slot, res) in finished {
            let (lba, seed, b) = inflight[slot].take().unwrap();
            match res {
                Ok(()) => {
                    model[lba as usize] = Some(seed);
                    acked += 1;
                }
                Err(_) => model[lba as usize] = None,
            }
            pool.put(b).unwrap();
        }
        assert!(Instant::now() < deadline);
    }
    r.sim.inject(Fault::ClearAll);
    while inflight.iter().any(Option::is_some) {
        let mut finished = Vec::new();
        qp.poll(16, &mut |_, tag, res| finished.push((tag as usize, res)));
        for (slot, res) in finished {
            let (lba, seed, b) = inflight[slot].take().unwrap();
            model[lba as usize] = if res.is_ok() { Some(seed) } else { None };
            pool.put(b).unwrap();
        }
        assert!(Instant::now() < deadline, "drain");
    }
    assert!(r.sim.stats().dropped.load(Ordering::Relaxed) > 0, "no fault was injected");
    let rd = pool.get().unwrap();
    for (lba, m) in model.iter().enumerate() {
        let Some(seed) = m else { continue };
        if *seed == u64::MAX {
            continue;
        }
        run(&mut qp, NvmOp::Read, 1, 12, lba as u64, 1, &[(rd.iova(), 4096)]).expect("read back");
        assert!(check_pattern(&rd, *seed), "lba {lba}: acknowledged write lost");
    }
}
