//! `nvstack perf`: the equivalent of spdk_nvme_perf and bdevperf, on any bdev.
//!
//! One reactor per core of the core mask, each running one [`job::Job`] poller with its own channel, buffers and
//! descriptors (all allocated before the start signal). The main thread sleeps, wakes once a second to print a
//! progress line from the jobs' atomic counters, and at the end prints a table per core and in total (or one JSON
//! document).
//!
//! - Timing: the TSC, calibrated once against `Instant` ([`clock`]); latencies go into a log-bucketed histogram
//!   ([`histogram`]).
//! - Offsets: wyrand, scaled into the range without a division, aligned to the I/O size. When anything writes (or
//!   with `--verify`), each core works on its own slice of the device; read-only workloads spread all cores over
//!   the whole device.
//! - `--verify`: see [`verify`] for the pattern, the generation table and what is and is not checked.
//! - Exit status: 0 clean; 1 when any I/O failed or any block mismatched; 2 for bad input.

mod args;
mod clock;
mod histogram;
mod job;
mod report;
mod verify;

#[cfg(test)]
mod testdev;

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::reactor::{Msg, ReactorConfig, Reactors};
use nvstack_blockdev::BlockDev;
use nvstack_cache::CacheStats;
use nvstack_driver::dma::{Arena, ArenaConfig, HUGE_2M};

pub use self::args::PerfArgs;
use self::args::PerfConfig;
use self::clock::TickScale;
use self::job::{Job, JobParams, JobResult, JobShared, RunControl};
use self::report::{BdevInfo, Report};
use crate::cli::GlobalOpts;
use crate::error::AppError;

/// Idle rounds after which a reactor with nothing to do sleeps between rounds. A running job reports itself busy, so
/// this only matters before the start and after the end (it keeps idle reactors from burning a core, and keeps
/// callgrind's instruction counts free of idle spinning).
const IDLE_BACKOFF_ROUNDS: u32 = 20_000;
/// How long set-up (channel open, buffer carving) may take per job.
const SETUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a `--verify` pre-fill of a read-only run may take.
const PREFILL_TIMEOUT: Duration = Duration::from_secs(1800);
/// Grace after `-t` for the jobs to drain what is in flight before the run is stopped from outside.
const DRAIN_GRACE: Duration = Duration::from_secs(30);
/// Slack added to the arena beyond the I/O buffers.
const ARENA_SLACK_BYTES: u64 = 4 << 20;
/// How often the main thread looks at the jobs while it waits (it sleeps in between).
const WATCH_INTERVAL: Duration = Duration::from_millis(10);

/// Run `nvstack perf`.
///
/// # Errors
/// [`AppError::Usage`] / [`AppError::Bdev`] (exit status 2) for bad input; [`AppError::Failed`] (exit status 1) when
/// I/Os failed or verify found mismatches (after the report is printed); others as set-up goes.
pub fn run(args: PerfArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    let cfg = PerfConfig::from_args(&args)?;
    let extra = crate::bdev_spec::extra_arena_bytes(&cfg.bdev)?.div_ceil(HUGE_2M) * HUGE_2M;
    let size_bytes = arena_bytes(&cfg)?
        .checked_add(extra)
        .ok_or_else(|| AppError::Usage(format!("{}: arena size overflows", cfg.bdev)))?;
    let arena = Arena::new(ArenaConfig { size_bytes, require_hugepages: false, try_1g: false })?;
    // The device opens once the reactors run: a cache spreads its shards over them.
    let mut cache = None;
    let rep = execute_with(&cfg, &arena, true, |reactors| {
        let (bdev, counters) = open_bdev(&cfg.bdev, &arena, reactors)?;
        cache = counters;
        Ok(bdev)
    })?;
    let cache = cache.map(|c| c.snapshot());
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match (cfg.json, &cache) {
        (true, None) => rep.print_json(&mut out)?,
        (true, Some(st)) => {
            let mut v = serde_json::to_value(&rep).map_err(|e| AppError::Output(std::io::Error::other(e)))?;
            if let Some(obj) = v.as_object_mut() {
                obj.insert("cache".into(), cache_json(st));
            }
            serde_json::to_writer_pretty(&mut out, &v).map_err(|e| AppError::Output(std::io::Error::other(e)))?;
            writeln!(out).map_err(AppError::Output)?;
        }
        (false, _) => {
            rep.print_text(&mut out)?;
            if let Some(st) = &cache {
                print_cache_text(&mut out, st).map_err(AppError::Output)?;
            }
        }
    }
    out.flush().map_err(AppError::Output)?;
    match rep.failure() {
        Some(why) => Err(AppError::Failed(format!("perf on {}: {why}", rep.bdev.name))),
        None => Ok(ExitCode::SUCCESS),
    }
}

/// The one place perf turns a spec into a device: the kinds of `open_bdev` and `cache:<backing>` (with its counters).
fn open_bdev(spec: &str, arena: &Arc<Arena>, reactors: &Reactors) -> Result<crate::bdev_spec::OpenedBdev, AppError> {
    crate::bdev_spec::open_with_stats(spec, arena, Some(reactors))
}

/// The cache counters as a JSON object.
fn cache_json(st: &CacheStats) -> serde_json::Value {
    serde_json::json!({
        "hits": st.hits.load(Ordering::Relaxed),
        "misses": st.misses.load(Ordering::Relaxed),
        "dirty_bytes": st.dirty_bytes.load(Ordering::Relaxed),
        "writeback_ios": st.writeback_ios.load(Ordering::Relaxed),
        "writeback_avg_bytes": st.writeback_avg_bytes(),
        "evictions": st.evictions.load(Ordering::Relaxed),
        "fill_ios": st.fill_ios.load(Ordering::Relaxed),
        "read_loans": st.loans.load(Ordering::Relaxed),
        "loan_waits": st.loan_waits.load(Ordering::Relaxed),
    })
}

/// The cache counters as text after the tables.
fn print_cache_text(out: &mut dyn Write, st: &CacheStats) -> std::io::Result<()> {
    writeln!(out)?;
    writeln!(
        out,
        "Cache: hits {}, misses {}, dirty bytes {}, writeback I/Os {} (avg {} bytes), evictions {}, fill I/Os {}, read loans {} ({} waits)",
        st.hits.load(Ordering::Relaxed),
        st.misses.load(Ordering::Relaxed),
        st.dirty_bytes.load(Ordering::Relaxed),
        st.writeback_ios.load(Ordering::Relaxed),
        st.writeback_avg_bytes(),
        st.evictions.load(Ordering::Relaxed),
        st.fill_ios.load(Ordering::Relaxed),
        st.loans.load(Ordering::Relaxed),
        st.loan_waits.load(Ordering::Relaxed),
    )
}

/// Arena size: `--arena-mb`, or the I/O buffers of every core plus slack, in 2 MiB pages.
fn arena_bytes(cfg: &PerfConfig) -> Result<u64, AppError> {
    if let Some(mb) = cfg.arena_mb {
        return mb.checked_mul(1 << 20).ok_or_else(|| AppError::Usage(format!("--arena-mb {mb} is too large")));
    }
    let stride = u64::from(cfg.io_bytes).div_ceil(4096) * 4096;
    let bufs = stride * u64::from(cfg.queue_depth) * cfg.cores.len() as u64;
    Ok((bufs + ARENA_SLACK_BYTES).div_ceil(HUGE_2M) * HUGE_2M)
}

/// Each core's share of the work.
fn plan(cfg: &PerfConfig, geo: &nvstack_blockdev::Geometry, scale: TickScale) -> Vec<JobParams> {
    let bpi = u64::from(cfg.io_bytes / geo.block_size);
    let slots_total = geo.block_count / bpi;
    let n = cfg.cores.len() as u64;
    let sliced = cfg.sliced();
    let (mix_threshold, reads) = match cfg.read_pct {
        100 => (None, true),
        0 => (None, false),
        pct => (Some(((u128::from(pct) << 64) / 100) as u64), true),
    };
    cfg.cores
        .iter()
        .enumerate()
        .map(|(i, &core)| {
            let i64_ = i as u64;
            let (range_start_blocks, slot_count, seq_start_slot) = if sliced {
                let per = slots_total / n;
                (i64_ * per * bpi, per, 0)
            } else {
                (0, slots_total, i64_ * (slots_total / n))
            };
            JobParams {
                reactor_index: i,
                core,
                queue_depth: cfg.queue_depth,
                io_bytes: cfg.io_bytes,
                block_size: geo.block_size,
                buf_align_bytes: geo.buf_align_bytes,
                mix_threshold,
                reads,
                random: cfg.workload.is_random(),
                range_start_blocks,
                slot_count,
                seq_start_slot,
                seed: splitmix(cfg.seed ^ (i64_ + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)),
                io_limit: cfg.io_count,
                duration_ticks: scale.ticks_for(Duration::from_secs(cfg.time_s)),
                verify: cfg.verify,
                prefill: cfg.verify && cfg.workload.is_read_only(),
            }
        })
        .collect()
}

fn splitmix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Run the jobs on their reactors and build the report. `pin` pins the reactors (tests on a busy machine do not).
#[cfg(test)]
pub(crate) fn execute(cfg: &PerfConfig, bdev: &Arc<dyn BlockDev>, arena: &Arc<Arena>, pin: bool) -> Result<Report, AppError> {
    execute_with(cfg, arena, pin, |_| Ok(Arc::clone(bdev)))
}

/// Start the reactors, open the device with `open` (given the reactors), run the jobs, build the report.
pub(crate) fn execute_with(
    cfg: &PerfConfig,
    arena: &Arc<Arena>,
    pin: bool,
    open: impl FnOnce(&Reactors) -> Result<Arc<dyn BlockDev>, AppError>,
) -> Result<Report, AppError> {
    let mut rc = ReactorConfig::new(cfg.cores.clone());
    rc.pin = pin;
    rc.idle_backoff_rounds = Some(IDLE_BACKOFF_ROUNDS);
    let reactors = Reactors::start(rc)?;
    let bdev = &open(&reactors)?;
    let geo = bdev.geometry();
    cfg.check_device(bdev.name(), &geo)?;
    let scale = TickScale::calibrated();
    let params = plan(cfg, &geo, scale);
    let ctl = Arc::new(RunControl::default());
    let shared: Vec<Arc<JobShared>> = params.iter().map(|_| Arc::new(JobShared::default())).collect();
    for (p, sh) in params.into_iter().zip(&shared) {
        let (dev, ar, sh2, ctl2) = (Arc::clone(bdev), Arc::clone(arena), Arc::clone(sh), Arc::clone(&ctl));
        let index = p.reactor_index;
        let msg = Msg::Run(Box::new(move |ctx| match Job::new(p, dev.as_ref(), &ar, Arc::clone(&sh2), ctl2) {
            Ok(job) => ctx.add_poller(Box::new(job)),
            Err(e) => sh2.finish(Err(e)),
        }));
        if reactors.send(index, msg).is_err() {
            ctl.stop.store(true, Ordering::Release);
            return Err(AppError::Bdev(nvstack_blockdev::BdevError::RingFull { index }));
        }
    }
    let result = drive(cfg, &shared, &ctl);
    ctl.stop.store(true, Ordering::Release);
    let stopped = reactors.stop();
    let results = result?;
    stopped?;
    let info = BdevInfo {
        name: bdev.name().to_owned(),
        product_name: bdev.product_name().to_owned(),
        block_size: geo.block_size,
        block_count: geo.block_count,
    };
    Ok(Report::build(cfg, info, &results, scale))
}

/// Wait for set-up, start the jobs, print progress, wait for the end, collect the results.
fn drive(cfg: &PerfConfig, shared: &[Arc<JobShared>], ctl: &RunControl) -> Result<Vec<JobResult>, AppError> {
    let prefill = cfg.verify && cfg.workload.is_read_only();
    if prefill && cfg.progress {
        eprintln!("Pre-filling each core's slice for --verify...");
    }
    let setup_deadline = Instant::now() + if prefill { PREFILL_TIMEOUT } else { SETUP_TIMEOUT };
    loop {
        if let Some(e) = take_error(shared) {
            return Err(e);
        }
        if shared.iter().all(|s| s.ready.load(Ordering::Acquire)) {
            break;
        }
        if Instant::now() > setup_deadline {
            return Err(AppError::Failed("perf: jobs did not finish setting up in time".into()));
        }
        std::thread::sleep(WATCH_INTERVAL);
    }
    if cfg.progress {
        eprintln!("Running I/O for {} seconds...", cfg.time_s);
    }
    let t0 = Instant::now();
    ctl.go.store(true, Ordering::Release);
    let run_deadline = t0 + Duration::from_secs(cfg.time_s) + DRAIN_GRACE;
    let mut next_print = t0 + Duration::from_secs(1);
    let (mut last_ios, mut last_t) = (0u64, t0);
    let mut stopped_at: Option<Instant> = None;
    while !shared.iter().all(|s| s.done.load(Ordering::Acquire)) {
        let now = Instant::now();
        if cfg.progress && now >= next_print {
            let ios: u64 = shared.iter().map(|s| s.completed.load(Ordering::Relaxed)).sum();
            let dt = now.duration_since(last_t).as_secs_f64().max(1e-9);
            let iops = (ios - last_ios.min(ios)) as f64 / dt;
            let mib = iops * f64::from(cfg.io_bytes) / f64::from(1u32 << 20);
            eprintln!("[{:>7.2} s] {:>14.2} IOPS, {:>10.2} MiB/s", now.duration_since(t0).as_secs_f64(), iops, mib);
            (last_ios, last_t) = (ios, now);
            next_print += Duration::from_secs(1);
        }
        match stopped_at {
            None if now > run_deadline => {
                tracing::warn!("perf: jobs still running {} s after -t; stopping them", DRAIN_GRACE.as_secs());
                ctl.stop.store(true, Ordering::Release);
                stopped_at = Some(now);
            }
            Some(t) if now > t + DRAIN_GRACE => {
                return Err(AppError::Failed("perf: jobs did not drain their I/O in time".into()));
            }
            _ => {}
        }
        std::thread::sleep(WATCH_INTERVAL.min(next_print.saturating_duration_since(now)).max(Duration::from_millis(1)));
    }
    if let Some(e) = take_error(shared) {
        return Err(e);
    }
    let mut results = Vec::with_capacity(shared.len());
    for s in shared {
        let slot = match s.outcome.lock() {
            Ok(mut g) => g.take(),
            Err(p) => p.into_inner().take(),
        };
        match slot {
            Some(Ok(r)) => results.push(r),
            Some(Err(e)) => return Err(e),
            None => return Err(AppError::Failed("perf: a job finished without a result".into())),
        }
    }
    Ok(results)
}

/// The first set-up error a job reported, if any.
fn take_error(shared: &[Arc<JobShared>]) -> Option<AppError> {
    for s in shared {
        if !s.done.load(Ordering::Acquire) {
            continue;
        }
        let mut g = match s.outcome.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if matches!(*g, Some(Err(_))) {
            if let Some(Err(e)) = g.take() {
                return Some(e);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::args::Workload;
    use super::testdev::ScrambleDev;
    use super::*;

    fn cfg(workload: Workload, cores: usize, verify: bool, io_count: u64) -> PerfConfig {
        let allowed = nvstack_blockdev::coremask::allowed_cores();
        PerfConfig {
            bdev: "test".into(),
            queue_depth: 16,
            io_bytes: 8192,
            workload,
            read_pct: match workload {
                Workload::Read | Workload::Randread => 100,
                Workload::Write | Workload::Randwrite => 0,
                _ => 50,
            },
            time_s: 20,
            cores: (0..cores).map(|i| allowed[i % allowed.len()]).collect(),
            json: false,
            verify,
            arena_mb: None,
            seed: 7,
            io_count,
            progress: false,
        }
    }

    fn run_on(c: &PerfConfig, dev: Arc<dyn BlockDev>) -> Report {
        let arena = Arena::new(ArenaConfig { size_bytes: arena_bytes(c).unwrap(), ..Default::default() }).unwrap();
        execute(c, &dev, &arena, false).unwrap()
    }

    #[test]
    fn randrw_verify_survives_out_of_order_completions() {
        let c = cfg(Workload::Randrw, 2, true, 6000);
        // 512 slots of 8 KiB per core: plenty of reads land on slots written earlier in the run.
        let rep = run_on(&c, ScrambleDev::new(8 << 20, 512, None));
        assert_eq!(rep.total.ios, 12_000);
        assert!(rep.total.reads > 4000 && rep.total.writes > 4000, "{:?}", rep.total);
        let v = rep.total.verify.as_ref().unwrap();
        assert_eq!(v.mismatches, 0, "{:?}", v.first);
        assert!(v.checked_blocks > 10_000, "{v:?}");
        assert!(rep.failure().is_none());
    }

    #[test]
    fn sequential_rw_verify_is_clean() {
        let c = cfg(Workload::Rw, 1, true, 3000);
        let rep = run_on(&c, ScrambleDev::new(1 << 20, 4096, None));
        let v = rep.total.verify.as_ref().unwrap();
        assert_eq!(v.mismatches, 0, "{:?}", v.first);
        assert!(v.checked_blocks > 1000);
    }

    #[test]
    fn corruption_is_caught_and_fails_the_run() {
        let c = cfg(Workload::Randrw, 1, true, 4000);
        let rep = run_on(&c, ScrambleDev::new(4 << 20, 512, Some(50)));
        let v = rep.total.verify.as_ref().unwrap();
        assert!(v.mismatches > 0);
        let m = v.first[0];
        assert_eq!(m.word, 8, "the flipped byte at offset 64 is word 8 of the first block");
        assert!(m.found_magic);
        assert!(rep.failure().unwrap().contains("mismatching"));
    }

    #[test]
    fn read_only_verify_prefills_so_every_read_is_checked() {
        let c = cfg(Workload::Randread, 2, true, 2000);
        let rep = run_on(&c, ScrambleDev::new(4 << 20, 512, None));
        let v = rep.total.verify.as_ref().unwrap();
        assert_eq!(v.unchecked_reads, 0);
        assert_eq!(v.mismatches, 0);
        assert_eq!(v.checked_blocks, 4000 * 16);
        assert_eq!(rep.total.writes, 0, "pre-fill writes are not counted");
    }

    #[test]
    fn plain_run_counts_and_times() {
        let c = cfg(Workload::Randwrite, 2, false, 5000);
        let rep = run_on(&c, ScrambleDev::new(4 << 20, 512, None));
        assert_eq!(rep.total.ios, 10_000);
        assert_eq!(rep.total.writes, 10_000);
        assert!(rep.total.iops > 0.0 && rep.total.latency_us.max >= rep.total.latency_us.p50);
        assert_eq!(rep.cores.len(), 2);
    }

    #[test]
    fn a_refused_request_ends_the_run_with_an_error() {
        for (w, verify) in [(Workload::Randwrite, false), (Workload::Randrw, true), (Workload::Randread, true)] {
            let c = cfg(w, 1, verify, 1_000_000);
            let rep = run_on(&c, ScrambleDev::refusing_writes(4 << 20, 512));
            assert!(rep.total.errors >= 1, "{w:?}: {:?}", rep.total);
            assert!(rep.total.first_error.as_deref().unwrap_or("").contains("refused"), "{:?}", rep.total.first_error);
            assert!(rep.failure().is_some());
            assert!(rep.total.ios < 1_000_000, "{w:?}: the run stopped at the refusal");
        }
    }

    #[test]
    fn plan_slices_writers_and_spreads_readers() {
        let geo = ScrambleDev::new(8 << 20, 512, None).geometry();
        let s = TickScale::fixed(1_000_000_000);
        let w = plan(&cfg(Workload::Randwrite, 2, false, 1), &geo, s);
        assert_eq!((w[0].range_start_blocks, w[0].slot_count), (0, 512));
        assert_eq!((w[1].range_start_blocks, w[1].slot_count), (512 * 16, 512));
        let r = plan(&cfg(Workload::Read, 2, false, 1), &geo, s);
        assert_eq!((r[1].range_start_blocks, r[1].slot_count, r[1].seq_start_slot), (0, 1024, 512));
        assert_ne!(w[0].seed, w[1].seed);
        let m = plan(&cfg(Workload::Randrw, 1, false, 1), &geo, s);
        assert_eq!(m[0].mix_threshold, Some(1 << 63));
    }
}
