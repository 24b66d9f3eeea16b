//! Running scenarios: prepare the kernel and initramfs layers once, then per scenario a fresh run directory with
//! fresh images, a QEMU, the marker loop (steps, host actions, deadlines), and a verdict with the console log
//! attached on failure.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::error::HarnessError;
use crate::guest;
use crate::host::{self, find_tool, tail};
use crate::initramfs::{self, Layer};
use crate::kernel::{self, Kernel};
use crate::marker::{self, Marker};
use crate::qemu::{self, Qemu, RunPaths};
use crate::qmp::Qmp;
use crate::scenario::{parse_number, ActionKind, Scenario, Step};

/// Prefix of run directories (under [`run_root`]) and the tag used to find leftover QEMU processes.
pub const RUN_DIR_PREFIX: &str = "nvstack-qemu.";
/// How long after a step's own timeout the host waits for its end marker before giving up on the guest.
const STEP_GRACE: Duration = Duration::from_secs(30);
/// Lines of console log attached to a failure.
const CONSOLE_TAIL_LINES: usize = 80;

/// Everything prepared once for all scenarios.
#[derive(Debug)]
pub struct Harness {
    /// The cache directory.
    pub cache: PathBuf,
    /// `qemu-system-x86_64`.
    pub qemu: PathBuf,
    /// The guest kernel.
    pub kernel: Kernel,
    /// The image QEMU boots: the extracted ELF kernel (PVH entry) or, failing that, the bzImage.
    pub boot_image: PathBuf,
    /// Why the bzImage is booted, when it is.
    pub boot_image_note: Option<String>,
    /// The base initramfs layer.
    pub base: Layer,
    /// The project binaries' layer.
    pub bins: Layer,
    /// How long preparation took.
    pub prepare_time: Duration,
    /// Keep run directories after the run (for debugging).
    pub keep: bool,
}

/// How a scenario ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It ran and every expectation held.
    Passed,
    /// A self-test that had to fail failed as it should.
    FailedAsExpected,
    /// It failed (or a self-test passed).
    Failed,
    /// Pending: not run.
    NotRun,
}

impl Verdict {
    /// The word for the log.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Passed => "PASS",
            Verdict::FailedAsExpected => "PASS (failed as expected)",
            Verdict::Failed => "FAIL",
            Verdict::NotRun => "NOT RUN",
        }
    }
}

/// One step's result as the host saw it.
#[derive(Debug, Clone)]
pub struct StepReport {
    /// The step.
    pub name: String,
    /// Whether it met its expectations.
    pub ok: bool,
    /// Its exit status.
    pub rc: i32,
    /// From its begin marker to its end marker.
    pub elapsed: Duration,
}

/// A scenario's result.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The scenario.
    pub name: String,
    /// Its device shape.
    pub shape: String,
    /// The verdict.
    pub verdict: Verdict,
    /// Why it failed (or, for a self-test, how it failed) or why it did not run.
    pub reason: Option<String>,
    /// Wall time, QEMU start to end.
    pub elapsed: Duration,
    /// QEMU start to the guest's `/init` marker.
    pub boot: Option<Duration>,
    /// Steps in the order they ended.
    pub steps: Vec<StepReport>,
    /// Host actions performed.
    pub actions: Vec<String>,
    /// The end of the console log (and QEMU's stderr) when it failed.
    pub console_tail: Option<String>,
    /// Where the whole console log was saved.
    pub console_log: Option<PathBuf>,
}

impl Outcome {
    /// A pending scenario's outcome.
    pub fn not_run(s: &Scenario, why: &str) -> Outcome {
        Outcome {
            name: s.name.clone(),
            shape: s.shape(),
            verdict: Verdict::NotRun,
            reason: Some(why.to_string()),
            elapsed: Duration::ZERO,
            boot: None,
            steps: Vec::new(),
            actions: Vec::new(),
            console_tail: None,
            console_log: None,
        }
    }
}

/// The guest helper binaries: every `tests/src/bin/*.rs` except the runner itself.
pub fn guest_helper_names() -> Vec<String> {
    let dir = host::repo_root().join("tests/src/bin");
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|e| {
            let p = e.path();
            let stem = p.file_stem()?.to_string_lossy().into_owned();
            (p.extension()? == "rs" && stem != "nvstack-qemu").then_some(stem)
        })
        .collect();
    names.sort();
    names
}

/// Environment variable naming where run directories go.
pub const RUN_ROOT_ENV: &str = "NVSTACK_QEMU_RUN_ROOT";

/// Where run directories go: `$NVSTACK_QEMU_RUN_ROOT`, else `/dev/shm` when it is a directory (tmpfs: images
/// cost no disk I/O, and deleting a written image on a disk mounted with `discard` took 16 s here), else the
/// system temp dir.
pub fn run_root() -> PathBuf {
    match std::env::var_os(RUN_ROOT_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ if Path::new("/dev/shm").is_dir() => PathBuf::from("/dev/shm"),
        _ => std::env::temp_dir(),
    }
}

/// Remove run directories left by runs whose process is gone (never those of a live run).
pub fn clean_stale_run_dirs() -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(run_root()).into_iter().flatten().filter_map(Result::ok) {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(RUN_DIR_PREFIX) else { continue };
        let pid = rest.split('.').next().unwrap_or("");
        if !pid.is_empty() && !Path::new("/proc").join(pid).exists() && std::fs::remove_dir_all(e.path()).is_ok() {
            n += 1;
        }
    }
    n
}

/// Pids of QEMU processes started by any run of this harness that are still alive.
pub fn leftover_qemu_pids() -> Vec<u32> {
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().filter_map(Result::ok) {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd);
        if (cmd.starts_with("qemu-system") || cmd.contains("/qemu-system")) && cmd.contains(RUN_DIR_PREFIX) {
            pids.push(pid);
        }
    }
    pids
}

impl Harness {
    /// Prepare the kernel and initramfs layers (from the cache when their inputs did not change).
    /// `bins` are `(host path, guest name)` of the project binaries.
    ///
    /// # Errors
    /// When a package, tool, binary or module is missing, or the kernel cannot be fetched.
    pub fn prepare(scenarios: &[Scenario], bins: &[(PathBuf, String)], keep: bool) -> Result<Harness, HarnessError> {
        let t0 = Instant::now();
        let cache = host::cache_dir();
        std::fs::create_dir_all(&cache).map_err(|e| HarnessError::io("creating the cache", &cache, e))?;
        let qemu = find_tool("qemu-system-x86_64", "qemu-system-x86")?;
        let kernel = kernel::prepare(&cache)?;
        let (boot_image, boot_image_note) = match kernel::pvh_vmlinux(&kernel) {
            Ok(p) => (p, None),
            Err(why) => (kernel.vmlinuz.clone(), Some(why)),
        };
        let mut modules: BTreeSet<String> = initramfs::BASE_MODULES.iter().map(|m| m.to_string()).collect();
        modules.extend(scenarios.iter().flat_map(|s| s.machine.modules.iter().cloned()));
        let (base, base_tree) = initramfs::base_layer(&cache, &kernel, &modules)?;
        let bins = initramfs::bins_layer(&cache, bins, &base_tree)?;
        Ok(Harness { cache, qemu, kernel, boot_image, boot_image_note, base, bins, prepare_time: t0.elapsed(), keep })
    }

    /// Run one scenario in a fresh guest; `progress` receives one line per event as it happens.
    pub fn run(&self, s: &Scenario, progress: &mut dyn FnMut(&str)) -> Outcome {
        // Short enough for a Unix socket path (108 bytes) whatever the scenario's name.
        let short: String = s.name.chars().take(40).collect();
        let dir = run_root().join(format!("{RUN_DIR_PREFIX}{}.{short}", std::process::id()));
        let paths = RunPaths { dir: dir.clone(), kernel: self.boot_image.clone(), initrd: dir.join("initrd.img") };
        let mut run = Run { steps: Vec::new(), actions: Vec::new(), boot: None };
        let t0 = Instant::now();
        let result = self.attempt(s, &paths, &mut run, progress);
        let elapsed = t0.elapsed();
        let console = std::fs::read_to_string(paths.console()).unwrap_or_default();
        let logs = self.cache.join("logs");
        let console_log = logs.join(format!("{}.console.log", s.name));
        let saved = std::fs::create_dir_all(&logs).and_then(|()| std::fs::write(&console_log, &console)).is_ok();
        let tail_text = || {
            let err = std::fs::read_to_string(paths.stderr()).unwrap_or_default();
            let mut t =
                format!("--- console (last {CONSOLE_TAIL_LINES} lines) ---\n{}", tail(&console, CONSOLE_TAIL_LINES));
            if !err.trim().is_empty() {
                t.push_str(&format!("\n--- qemu stderr ---\n{}", tail(&err, 20)));
            }
            t
        };
        let (verdict, reason, console_tail) = match (result, s.expect_failure) {
            (Ok(()), false) => (Verdict::Passed, None, None),
            (Ok(()), true) => (
                Verdict::Failed,
                Some("this self-test must fail but every step passed: the harness may pass vacuously".into()),
                Some(tail_text()),
            ),
            (Err(r), false) => (Verdict::Failed, Some(r), Some(tail_text())),
            (Err(r), true) => {
                let want = s.expect_failure_match.as_deref().unwrap_or_default();
                let tail = tail_text();
                let console_want = s.expect_failure_console.as_deref().unwrap_or_default();
                if r.contains(want) && tail.contains(console_want) {
                    (Verdict::FailedAsExpected, Some(r), Some(tail))
                } else if r.contains(want) {
                    let why = format!("failed as expected, but the attached console lacks {console_want:?}: {r}");
                    (Verdict::Failed, Some(why), Some(tail))
                } else {
                    (Verdict::Failed, Some(format!("failed, but not with {want:?}: {r}")), Some(tail_text()))
                }
            }
        };
        if !self.keep {
            let _ = std::fs::remove_dir_all(&dir);
        }
        Outcome {
            name: s.name.clone(),
            shape: s.shape(),
            verdict,
            reason,
            elapsed,
            boot: run.boot,
            steps: run.steps,
            actions: run.actions,
            console_tail,
            console_log: saved.then_some(console_log),
        }
    }

    fn attempt(&self, s: &Scenario, p: &RunPaths, run: &mut Run, progress: &mut dyn FnMut(&str)) -> Result<(), String> {
        let start = Instant::now();
        let deadline = start + Duration::from_secs(s.deadline_s);
        let _ = std::fs::remove_dir_all(&p.dir);
        std::fs::create_dir_all(&p.dir).map_err(|e| format!("creating {}: {e}", p.dir.display()))?;
        self.write_initrd(s, p).map_err(|e| error_chain(&e))?;
        qemu::create_images(s, p).map_err(|e| error_chain(&e))?;
        let args = qemu::args(s, p);
        let (mut vm, qmp_stream, ctl) =
            Qemu::start(&self.qemu, &args, p, (start + Duration::from_secs(30)).min(deadline))
                .map_err(|e| error_chain(&e))?;
        progress(&format!("  qemu pid {} started", vm.pid()));
        let mut qmp = Qmp::handshake(qmp_stream, (Instant::now() + Duration::from_secs(20)).min(deadline))
            .map_err(|e| error_chain(&e))?;
        let mut ctl_w = ctl.try_clone().map_err(|e| format!("control socket: {e}"))?;
        let rx = spawn_reader(ctl);
        let steps = guest::all_steps(s);
        let boot_deadline = start + Duration::from_secs(s.boot_timeout_s);
        let mut next = 0usize;
        let mut current: Option<(&Step, Instant)> = None;
        let mut failure: Option<String> = None;
        let result = loop {
            let now = Instant::now();
            let where_ = match current {
                Some((st, _)) => format!("in step {}", st.name),
                None if run.boot.is_none() => "before /init started".to_string(),
                None => format!("after {} of {} steps", next, steps.len()),
            };
            if now >= deadline {
                break Err(format!("scenario deadline of {} s passed {where_}", s.deadline_s));
            }
            if run.boot.is_none() && now >= boot_deadline {
                break Err(format!("the guest's /init did not start within {} s (boot hang?)", s.boot_timeout_s));
            }
            if let Some((st, t)) = current {
                if now >= t + Duration::from_secs(st.timeout_s) + STEP_GRACE {
                    break Err(format!(
                        "step {} gave no end marker within {} s + {} s grace (guest hung?)",
                        st.name,
                        st.timeout_s,
                        STEP_GRACE.as_secs()
                    ));
                }
            }
            let line = match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(Some(l)) => l,
                Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let st = if vm.wait_exit(Duration::from_secs(5)) { "exited" } else { "closed its control port" };
                    break Err(format!("QEMU {st} {where_} without the done marker (kernel panic, /init died?)"));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = vm.try_wait() {
                        break Err(format!("QEMU exited ({status}) {where_} without the done marker (kernel panic?)"));
                    }
                    continue;
                }
            };
            let Some(m) = marker::parse(&line) else { continue };
            match m {
                Marker::Boot { uptime_s } => {
                    run.boot = Some(start.elapsed());
                    let up = uptime_s.map(|u| format!(", guest uptime {u:.1} s")).unwrap_or_default();
                    progress(&format!("  booted in {:.1} s{up}", start.elapsed().as_secs_f64()));
                }
                Marker::StepBegin(name) => {
                    let Some(st) = steps.get(next).filter(|st| st.name == name) else {
                        break Err(format!("guest began step {name} out of order (expected #{next})"));
                    };
                    current = Some((st, Instant::now()));
                }
                Marker::StepEnd { name, ok, rc, missing, unwanted } => {
                    let Some((st, t)) = current.take().filter(|(st, _)| st.name == name) else {
                        break Err(format!("guest ended step {name} that had not begun"));
                    };
                    let mut why = Vec::new();
                    if rc != st.expect_rc {
                        why.push(format!("exit status {rc}, expected {}", st.expect_rc));
                    }
                    for i in &missing {
                        let text = st.expect_output.get(*i).map_or("?", String::as_str);
                        why.push(format!("output lacks {text:?}"));
                    }
                    for i in &unwanted {
                        let text = st.reject_output.get(*i).map_or("?", String::as_str);
                        why.push(format!("output has {text:?}"));
                    }
                    let host_ok = why.is_empty();
                    if host_ok != ok {
                        break Err(format!("step {name}: guest said {ok}, host computed {host_ok}"));
                    }
                    let elapsed = t.elapsed();
                    progress(&format!(
                        "  step {name}: {} rc={rc} {:.1} s{}",
                        if ok { "ok" } else { "FAILED" },
                        elapsed.as_secs_f64(),
                        if ok { String::new() } else { format!(" ({})", why.join("; ")) }
                    ));
                    run.steps.push(StepReport { name: name.clone(), ok, rc, elapsed });
                    next += 1;
                    if !ok {
                        failure = Some(format!("step {name}: {}", why.join("; ")));
                    }
                }
                Marker::Done { ok } => {
                    if let Some(f) = failure.take() {
                        break Err(f);
                    }
                    if !ok {
                        break Err("guest reported failure without a failed step".into());
                    }
                    if next != steps.len() {
                        break Err(format!("guest finished after {next} of {} steps", steps.len()));
                    }
                    break Ok(());
                }
                Marker::User { step, pairs } => {
                    for (k, v) in &pairs {
                        for a in s.action.iter().filter(|a| &a.on_marker == k) {
                            let cmd = action_command(a.kind, a.command.as_deref(), v, a.offset, a.cpu)?;
                            let out = qmp.hmp(&cmd, (Instant::now() + Duration::from_secs(15)).min(deadline)).map_err(
                                |e| {
                                    format!(
                                        "host action `{cmd}` (marker {k}={v} from step {step}): {}",
                                        error_chain(&e)
                                    )
                                },
                            )?;
                            let note = format!(
                                "{cmd}{}",
                                if out.trim().is_empty() { String::new() } else { format!(" -> {}", out.trim()) }
                            );
                            progress(&format!("  host action: {note}"));
                            run.actions.push(note);
                        }
                        if s.action.iter().any(|a| &a.on_marker == k) {
                            ctl_w
                                .write_all(format!("ack {k}\n").as_bytes())
                                .map_err(|e| format!("acknowledging {k} to the guest: {e}"))?;
                        }
                    }
                }
            }
        };
        // A guest that finished powers off by itself; one that did not is killed now.
        if result.is_ok() && !vm.wait_exit(Duration::from_secs(20)) {
            progress("  guest did not power off within 20 s: killing QEMU");
        }
        vm.kill();
        result
    }

    fn write_initrd(&self, s: &Scenario, p: &RunPaths) -> Result<(), HarnessError> {
        let mut data = Vec::new();
        for layer in [&self.base, &self.bins] {
            let bytes =
                std::fs::read(&layer.path).map_err(|e| HarnessError::io("reading a cached layer", &layer.path, e))?;
            data.extend_from_slice(&bytes);
            // Each archive starts 4-byte aligned; gzip members may end anywhere.
            data.resize(data.len().div_ceil(4) * 4, 0);
        }
        data = guest::scenario_tree(s).write(data)?;
        std::fs::write(&p.initrd, &data).map_err(|e| HarnessError::io("writing the initramfs", &p.initrd, e))
    }
}

struct Run {
    steps: Vec<StepReport>,
    actions: Vec<String>,
    boot: Option<Duration>,
}

/// The monitor command for an action triggered by a marker with `value`.
fn action_command(
    kind: ActionKind,
    template: Option<&str>,
    value: &str,
    offset: u64,
    cpu: u32,
) -> Result<String, String> {
    let addr = || {
        parse_number(value)
            .and_then(|v| v.checked_add(offset))
            .ok_or_else(|| format!("marker value {value:?} plus offset {offset:#x} is not an address"))
    };
    Ok(match kind {
        ActionKind::MceAo => format!("mce -b {cpu} 9 0xbd000000000000c0 0x5 {:#x} 0x86", addr()?),
        ActionKind::MceAr => format!("mce -b {cpu} 9 0xbd80000000000134 0x7 {:#x} 0x86", addr()?),
        ActionKind::Hmp => {
            let t = template.unwrap_or_default();
            let mut c = t.replace("{value}", value);
            if c.contains("{addr}") {
                c = c.replace("{addr}", &format!("{:#x}", addr()?));
            }
            c
        }
    })
}

/// Read control-port lines on a thread; `None` when the port closes.
fn spawn_reader(stream: UnixStream) -> mpsc::Receiver<Option<String>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => {
                    let _ = tx.send(None);
                    return;
                }
                Ok(_) => {
                    if tx.send(Some(String::from_utf8_lossy(&buf).into_owned())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// An error and its sources on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(&format!(": {x}"));
        src = x.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn action_commands() {
        assert_eq!(
            action_command(ActionKind::MceAo, None, "0x1000", 0x10, 1).unwrap(),
            "mce -b 1 9 0xbd000000000000c0 0x5 0x1010 0x86"
        );
        assert_eq!(
            action_command(ActionKind::MceAr, None, "4096", 0, 0).unwrap(),
            "mce -b 0 9 0xbd80000000000134 0x7 0x1000 0x86"
        );
        assert_eq!(action_command(ActionKind::Hmp, Some("info {value}"), "status", 0, 0).unwrap(), "info status");
        assert!(action_command(ActionKind::MceAo, None, "zz", 0, 0).is_err());
        assert!(action_command(ActionKind::MceAo, None, "0xffffffffffffffff", 1, 0).is_err());
    }

    #[test]
    fn helper_names_exclude_the_runner() {
        let n = guest_helper_names();
        assert!(n.contains(&"dax-map".to_string()) && !n.contains(&"nvstack-qemu".to_string()), "{n:?}");
    }
}
