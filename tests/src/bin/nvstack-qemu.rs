//! `nvstack-qemu`: run the QEMU emulation scenarios (tests/scenarios/*.toml) and print a summary table.
//!
//! Exit status: 0 when every selected scenario passed (self-tests by failing as they must), 1 when one failed,
//! 2 when the harness could not prepare (missing package, kernel, binary). Pending scenarios are listed as
//! NOT RUN, never as passed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use nvstack_tests::runner::{self, error_chain, Harness, Outcome, Verdict};
use nvstack_tests::scenario::{self, Scenario};

/// Run nvstack's QEMU emulation scenarios.
#[derive(Debug, Parser)]
#[command(name = "nvstack-qemu")]
struct Args {
    /// Run only these scenarios (repeatable); default: all but pending ones.
    #[arg(long = "scenario", short = 's')]
    scenarios: Vec<String>,
    /// List the scenarios and exit.
    #[arg(long)]
    list: bool,
    /// Also run the scenarios under pending/.
    #[arg(long)]
    include_pending: bool,
    /// Only prepare the kernel and initramfs (fills the cache).
    #[arg(long)]
    prepare_only: bool,
    /// Scenario directory.
    #[arg(long, default_value_os_t = nvstack_tests::host::repo_root().join("tests/scenarios"))]
    scenarios_dir: PathBuf,
    /// Directory holding the `nvstack` binary and the guest helpers (default: this program's directory).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Keep each run's directory (images, console log, sockets) under /dev/shm (or $NVSTACK_QEMU_RUN_ROOT).
    #[arg(long)]
    keep: bool,
    /// Print the whole console log of every scenario, not only of failed ones.
    #[arg(long)]
    console: bool,
}

fn fmt_s(d: std::time::Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn main() -> ExitCode {
    let args = Args::parse();
    let t0 = Instant::now();
    let all = match scenario::load_dir(&args.scenarios_dir) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("nvstack-qemu: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    if args.list {
        for s in &all {
            let tag = match (&s.pending, s.expect_failure) {
                (Some(p), _) => format!("pending: {p}"),
                (None, true) => "self-test, must fail".into(),
                (None, false) => "runs".into(),
            };
            println!("{:<28} {:<24} {}\n{:<28} {}", s.name, tag, s.description, "", s.shape());
        }
        return ExitCode::SUCCESS;
    }
    for name in &args.scenarios {
        if !all.iter().any(|s| &s.name == name) {
            eprintln!("nvstack-qemu: {}", nvstack_tests::HarnessError::UnknownScenario(name.clone()));
            return ExitCode::from(2);
        }
    }
    let selected: Vec<&Scenario> =
        all.iter().filter(|s| args.scenarios.is_empty() || args.scenarios.contains(&s.name)).collect();
    let cleaned = runner::clean_stale_run_dirs();
    if cleaned > 0 {
        println!("removed {cleaned} stale run directories");
    }
    let bin_dir = args.bin_dir.clone().or_else(|| std::env::current_exe().ok()?.parent().map(PathBuf::from));
    let Some(bin_dir) = bin_dir else {
        eprintln!("nvstack-qemu: cannot find the binary directory: pass --bin-dir");
        return ExitCode::from(2);
    };
    let mut bins = vec![(bin_dir.join("nvstack"), "nvstack".to_string())];
    bins.extend(runner::guest_helper_names().into_iter().map(|n| (bin_dir.join(&n), n)));
    println!("=== preparing (cache {})", nvstack_tests::host::cache_dir().display());
    let owned: Vec<Scenario> = all.to_vec();
    let h = match Harness::prepare(&owned, &bins, args.keep) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("nvstack-qemu: preparing failed: {}", error_chain(&e));
            return ExitCode::from(2);
        }
    };
    let reuse = |r: bool| if r { "reused from cache" } else { "built" };
    println!(
        "kernel {} ({})",
        h.kernel.version,
        if h.kernel.reused { "reused from cache" } else { "downloaded and unpacked" }
    );
    match &h.boot_image_note {
        None => println!("booting the extracted ELF kernel {} (PVH entry, no decompression)", h.boot_image.display()),
        Some(why) => println!("booting the bzImage: {why}"),
    }
    println!(
        "initramfs base {} KiB ({}), bins {} KiB ({})",
        h.base.size_bytes / 1024,
        reuse(h.base.reused),
        h.bins.size_bytes / 1024,
        reuse(h.bins.reused)
    );
    println!("prepared in {}", fmt_s(h.prepare_time));
    if args.prepare_only {
        return ExitCode::SUCCESS;
    }
    let mut outcomes: Vec<Outcome> = Vec::new();
    for s in selected {
        if let (Some(why), false) = (&s.pending, args.include_pending) {
            println!("\n=== scenario {} [{}]: NOT RUN (pending: {why})", s.name, s.shape());
            outcomes.push(Outcome::not_run(s, why));
            continue;
        }
        println!(
            "\n=== scenario {} [{}]{}",
            s.name,
            s.shape(),
            if s.expect_failure { " (self-test: must fail)" } else { "" }
        );
        let o = h.run(s, &mut |line| println!("{line}"));
        println!(
            "{} {} in {}{}",
            o.verdict.word(),
            o.name,
            fmt_s(o.elapsed),
            o.boot.map(|b| format!(" (boot {})", fmt_s(b))).unwrap_or_default()
        );
        if let Some(r) = &o.reason {
            println!("  reason: {r}");
        }
        if o.verdict == Verdict::FailedAsExpected && !args.console {
            // Show that the failure came with the guest's console: its last lines.
            if let Some(t) = &o.console_tail {
                println!("  console attached to the expected failure, last lines:");
                for l in nvstack_tests::host::tail(t, 6).lines() {
                    println!("  | {l}");
                }
            }
        }
        if o.verdict == Verdict::Failed || args.console {
            if let Some(t) = &o.console_tail {
                println!("{t}");
            } else if let Some(log) = &o.console_log {
                println!("{}", std::fs::read_to_string(log).unwrap_or_default());
            }
        }
        if let Some(log) = &o.console_log {
            println!("  console log: {}", log.display());
        }
        outcomes.push(o);
    }
    let leftovers = runner::leftover_qemu_pids();
    println!("\n=== summary");
    println!("{:<30} {:<26} {:>8} {:>7}  shape", "scenario", "result", "time", "boot");
    for o in &outcomes {
        let boot = o.boot.map(fmt_s).unwrap_or_else(|| "-".into());
        println!("{:<30} {:<26} {:>8} {:>7}  {}", o.name, o.verdict.word(), fmt_s(o.elapsed), boot, o.shape);
        if o.verdict != Verdict::Passed {
            if let Some(r) = &o.reason {
                println!("{:<30}   {r}", "");
            }
        }
    }
    let count = |v: Verdict| outcomes.iter().filter(|o| o.verdict == v).count();
    let passed = count(Verdict::Passed) + count(Verdict::FailedAsExpected);
    let failed = count(Verdict::Failed) + usize::from(!leftovers.is_empty());
    if !leftovers.is_empty() {
        println!("leftover QEMU processes: {leftovers:?}");
    } else {
        println!("leftover QEMU processes: none");
    }
    println!("total {} (prepare {})", fmt_s(t0.elapsed()), fmt_s(h.prepare_time));
    println!("{passed} passed, {failed} failed, {} not run (pending)", count(Verdict::NotRun));
    if failed > 0 || passed == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
