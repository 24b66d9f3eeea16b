//! The end-of-run report: per core and in total, as tables laid out like bdevperf / spdk_nvme_perf, or as one JSON
//! document with the same numbers.

use std::io::Write;

use serde::Serialize;

use super::args::PerfConfig;
use super::clock::TickScale;
use super::histogram::Histogram;
use super::job::JobResult;
use super::verify::VerifyStats;
use crate::error::AppError;

/// The device measured.
#[derive(Debug, Clone, Serialize)]
pub struct BdevInfo {
    /// Device name.
    pub name: String,
    /// Kind ("Null disk", "Malloc disk"...).
    pub product_name: String,
    /// Block size in bytes.
    pub block_size: u32,
    /// Blocks.
    pub block_count: u64,
}

/// The run's parameters, as used.
#[derive(Debug, Clone, Serialize)]
pub struct RunInfo {
    /// `-w`.
    pub workload: &'static str,
    /// Read percentage.
    pub rwmixread: u32,
    /// `-q` per core.
    pub queue_depth: u32,
    /// `-o` in bytes.
    pub io_size: u32,
    /// `-t` in seconds.
    pub time_s: u64,
    /// `--io-count` per core, if given.
    pub io_count: Option<u64>,
    /// Core mask, hex.
    pub core_mask: String,
    /// `--verify`.
    pub verify: bool,
    /// `--seed`.
    pub seed: u64,
    /// TSC ticks per second used for the latencies.
    pub tsc_hz: u64,
}

/// Latency summary in microseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    /// Mean.
    pub avg: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// 99.99th percentile.
    pub p99_99: f64,
}

impl Latency {
    fn of(h: &Histogram, s: TickScale) -> Latency {
        let us = |t: u64| round3(s.us(t as f64));
        Latency {
            avg: round3(s.us(h.mean())),
            min: us(h.min()),
            max: us(h.max()),
            p50: us(h.percentile(50.0)),
            p90: us(h.percentile(90.0)),
            p99: us(h.percentile(99.0)),
            p99_9: us(h.percentile(99.9)),
            p99_99: us(h.percentile(99.99)),
        }
    }
}

fn round3(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// One core's (or the total's) figures.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Reactor index (absent in the total).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reactor: Option<usize>,
    /// OS core id (absent in the total).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub core: Option<usize>,
    /// Seconds from start to last completion (the longest, in the total).
    pub runtime_s: f64,
    /// I/Os completed.
    pub ios: u64,
    /// Reads completed.
    pub reads: u64,
    /// Writes completed.
    pub writes: u64,
    /// I/Os that failed.
    pub errors: u64,
    /// I/Os per second (the sum of the cores', in the total).
    pub iops: f64,
    /// CPU seconds the reactor thread(s) ran during the run (less than `runtime_s` when other processes took the
    /// core).
    pub cpu_s: f64,
    /// I/Os per CPU second: what a core given to the reactor alone would do (equal to `iops` on a quiet machine;
    /// for the total, the sum of the cores').
    pub iops_per_cpu_s: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency.
    pub latency_us: Latency,
    /// Verify counters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyStats>,
    /// The first failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_error: Option<String>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The device.
    pub bdev: BdevInfo,
    /// The parameters.
    pub run: RunInfo,
    /// Per core, in core-mask order.
    pub cores: Vec<Row>,
    /// All cores together.
    pub total: Row,
}

impl Report {
    /// Build the report from the jobs' results.
    pub fn build(cfg: &PerfConfig, bdev: BdevInfo, results: &[JobResult], s: TickScale) -> Report {
        let mib = |iops: f64| round3(iops * f64::from(cfg.io_bytes) / f64::from(1u32 << 20));
        let mut merged = Histogram::new();
        let mut cores = Vec::with_capacity(results.len());
        let mut total_verify: Option<VerifyStats> = None;
        for r in results {
            merged.merge(&r.hist);
            let runtime = s.secs(r.elapsed_ticks);
            let ios = r.reads + r.writes;
            let iops = if runtime > 0.0 { ios as f64 / runtime } else { 0.0 };
            let cpu_s = r.cpu_ns as f64 / 1e9;
            let iops_per_cpu_s = if cpu_s > 0.0 { ios as f64 / cpu_s } else { 0.0 };
            if let Some(v) = &r.verify {
                let t = total_verify.get_or_insert_with(VerifyStats::default);
                t.checked_blocks += v.checked_blocks;
                t.mismatches += v.mismatches;
                t.unchecked_reads += v.unchecked_reads;
                t.first.extend(v.first.iter().copied().take(super::verify::MAX_REPORTED.saturating_sub(t.first.len())));
            }
            cores.push(Row {
                reactor: Some(r.reactor_index),
                core: Some(r.core),
                runtime_s: round3(runtime),
                ios,
                reads: r.reads,
                writes: r.writes,
                errors: r.errors,
                iops: round3(iops),
                cpu_s: round3(cpu_s),
                iops_per_cpu_s: round3(iops_per_cpu_s),
                mib_s: mib(iops),
                latency_us: Latency::of(&r.hist, s),
                verify: r.verify.clone(),
                first_error: r.first_error.clone(),
            });
        }
        let iops: f64 = cores.iter().map(|c| c.iops).sum();
        let total = Row {
            reactor: None,
            core: None,
            runtime_s: cores.iter().map(|c| c.runtime_s).fold(0.0, f64::max),
            ios: cores.iter().map(|c| c.ios).sum(),
            reads: cores.iter().map(|c| c.reads).sum(),
            writes: cores.iter().map(|c| c.writes).sum(),
            errors: cores.iter().map(|c| c.errors).sum(),
            iops: round3(iops),
            cpu_s: round3(cores.iter().map(|c| c.cpu_s).sum()),
            iops_per_cpu_s: round3(cores.iter().map(|c| c.iops_per_cpu_s).sum()),
            mib_s: mib(iops),
            latency_us: Latency::of(&merged, s),
            verify: total_verify,
            first_error: cores.iter().find_map(|c| c.first_error.clone()),
        };
        let run = RunInfo {
            workload: cfg.workload.name(),
            rwmixread: cfg.read_pct,
            queue_depth: cfg.queue_depth,
            io_size: cfg.io_bytes,
            time_s: cfg.time_s,
            io_count: (cfg.io_count != u64::MAX).then_some(cfg.io_count),
            core_mask: nvstack_blockdev::coremask::to_hex(&cfg.cores),
            verify: cfg.verify,
            seed: cfg.seed,
            tsc_hz: s.hz(),
        };
        Report { bdev, run, cores, total }
    }

    /// Failures that make the exit status 1: I/O errors and verify mismatches, described; `None` if clean.
    pub fn failure(&self) -> Option<String> {
        let mismatches = self.total.verify.as_ref().map_or(0, |v| v.mismatches);
        match (self.total.errors, mismatches) {
            (0, 0) => None,
            (e, 0) => Some(format!("{e} I/O error(s)")),
            (0, m) => Some(format!("verify found {m} mismatching block(s)")),
            (e, m) => Some(format!("{e} I/O error(s) and {m} mismatching block(s)")),
        }
    }

    /// Print as one JSON document.
    ///
    /// # Errors
    /// [`AppError::Output`] when stdout cannot be written.
    pub fn print_json(&self, out: &mut dyn Write) -> Result<(), AppError> {
        serde_json::to_writer_pretty(&mut *out, self).map_err(|e| AppError::Output(std::io::Error::other(e)))?;
        writeln!(out).map_err(AppError::Output)
    }

    /// Print as tables.
    ///
    /// # Errors
    /// [`AppError::Output`] when stdout cannot be written.
    pub fn print_text(&self, out: &mut dyn Write) -> Result<(), AppError> {
        self.write_text(out).map_err(AppError::Output)
    }

    fn write_text(&self, out: &mut dyn Write) -> std::io::Result<()> {
        const W: usize = 38;
        let b = &self.bdev;
        let r = &self.run;
        writeln!(
            out,
            "Job: {} ({}), core mask {}, workload {}{}, depth {}, IO size {}{}",
            b.name,
            b.product_name,
            r.core_mask,
            r.workload,
            if r.workload.contains("rw") { format!(" (read {}%)", r.rwmixread) } else { String::new() },
            r.queue_depth,
            r.io_size,
            if r.verify { ", verify" } else { "" }
        )?;
        writeln!(out, "{:>w$}", "Latency(us)", w = W + 2 + 11 * 5 + 11 * 3 - 10)?;
        writeln!(
            out,
            "{:<W$}: {:>10} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10}",
            "Device Information", "runtime(s)", "IOPS", "MiB/s", "Fail/s", "Average", "min", "max"
        )?;
        let line = |out: &mut dyn Write, label: &str, row: &Row| -> std::io::Result<()> {
            let fails = if row.runtime_s > 0.0 { row.errors as f64 / row.runtime_s } else { 0.0 };
            writeln!(
                out,
                "{:<W$}: {:>10.2} {:>12.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}",
                label,
                row.runtime_s,
                row.iops,
                row.mib_s,
                fails,
                row.latency_us.avg,
                row.latency_us.min,
                row.latency_us.max
            )
        };
        let label = |row: &Row| format!("{} from core {:>2}", b.name, row.core.unwrap_or(0));
        for row in &self.cores {
            line(out, &label(row), row)?;
        }
        writeln!(out, "{}", "=".repeat(W + 2 + 10 + 13 + 11 * 5))?;
        line(out, "Total", &self.total)?;
        writeln!(out)?;
        writeln!(
            out,
            "{:<W$}: {:>10} {:>10} {:>10} {:>10} {:>10}",
            "Latency percentiles(us)", "p50", "p90", "p99", "p99.9", "p99.99"
        )?;
        let pct = |out: &mut dyn Write, label: &str, l: &Latency| -> std::io::Result<()> {
            writeln!(out, "{label:<W$}: {:>10.2} {:>10.2} {:>10.2} {:>10.2} {:>10.2}", l.p50, l.p90, l.p99, l.p99_9, l.p99_99)
        };
        for row in &self.cores {
            pct(out, &label(row), &row.latency_us)?;
        }
        pct(out, "Total", &self.total.latency_us)?;
        for row in &self.cores {
            let core = row.core.unwrap_or(0);
            if row.runtime_s > 0.0 && row.cpu_s < 0.9 * row.runtime_s {
                writeln!(
                    out,
                    "Note core {core:>2}: the reactor ran {:.2} of {:.2} s (other processes took the core): {:.2} IOPS \
                     per CPU second",
                    row.cpu_s, row.runtime_s, row.iops_per_cpu_s
                )?;
            }
            if let Some(v) = &row.verify {
                writeln!(
                    out,
                    "Verify core {core:>2}: {} blocks checked, {} mismatches, {} reads not checked (slot not written by \
                     this run)",
                    v.checked_blocks, v.mismatches, v.unchecked_reads
                )?;
                for m in &v.first {
                    writeln!(out, "  mismatch: {m}")?;
                }
                if v.mismatches > v.first.len() as u64 {
                    writeln!(out, "  ... and {} more", v.mismatches - v.first.len() as u64)?;
                }
            }
            if row.errors > 0 {
                writeln!(
                    out,
                    "Errors core {core:>2}: {} failed I/O(s); first: {}",
                    row.errors,
                    row.first_error.as_deref().unwrap_or("?")
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::perf::args::Workload;

    fn cfg() -> PerfConfig {
        PerfConfig {
            bdev: "null:1G".into(),
            queue_depth: 8,
            io_bytes: 4096,
            workload: Workload::Randread,
            read_pct: 100,
            time_s: 1,
            cores: vec![0, 1],
            json: false,
            verify: false,
            arena_mb: None,
            seed: 1,
            io_count: u64::MAX,
            progress: false,
        }
    }

    fn result(core: usize, lat: u64, n: u64) -> JobResult {
        let mut hist = Histogram::new();
        for _ in 0..n {
            hist.record(lat);
        }
        JobResult {
            reactor_index: core,
            core,
            reads: n,
            writes: 0,
            errors: 0,
            first_error: None,
            hist,
            elapsed_ticks: 1_000_000_000,
            cpu_ns: 500_000_000,
            verify: None,
        }
    }

    #[test]
    fn totals_sum_iops_and_merge_latency() {
        let s = TickScale::fixed(1_000_000_000);
        let bdev = BdevInfo { name: "null0".into(), product_name: "Null disk".into(), block_size: 512, block_count: 8 };
        let rep = Report::build(&cfg(), bdev, &[result(0, 1000, 1000), result(1, 3000, 3000)], s);
        assert_eq!(rep.cores[0].iops, 1000.0);
        assert_eq!(rep.total.iops, 4000.0);
        assert_eq!(rep.cores[0].iops_per_cpu_s, 2000.0);
        assert_eq!(rep.total.cpu_s, 1.0);
        assert_eq!(rep.total.ios, 4000);
        assert!((rep.total.mib_s - 4000.0 * 4096.0 / 1048576.0).abs() < 0.01);
        assert_eq!(rep.total.latency_us.min, 1.0);
        assert_eq!(rep.total.latency_us.max, 3.0);
        assert_eq!(rep.total.latency_us.avg, 2.5);
        assert_eq!(rep.total.latency_us.p99, 3.0);
        assert!(rep.failure().is_none());
        let mut text = Vec::new();
        rep.print_text(&mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        assert!(text.contains("null0 from core  1"), "{text}");
        assert!(text.contains("Total"));
        let mut js = Vec::new();
        rep.print_json(&mut js).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&js).unwrap();
        assert_eq!(v["total"]["iops"], 4000.0);
        assert_eq!(v["cores"][1]["core"], 1);
    }
}
