//! The scenario format: one TOML file per scenario in `tests/scenarios/` (see tests/README.md for the reference).
//!
//! A scenario describes the machine (memory, CPUs, intel-iommu), its NVMe controllers and namespaces, its NVDIMMs,
//! the steps `/init` runs in the guest, the host actions triggered by markers the guest prints, a deadline, and
//! whether the scenario is expected to fail (harness self-tests).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::HarnessError;

/// Default whole-scenario deadline, boot included.
pub const DEFAULT_DEADLINE_S: u64 = 300;
/// Default per-step timeout.
pub const DEFAULT_STEP_TIMEOUT_S: u64 = 120;
/// Default deadline for the guest's `/init` to report that it started.
pub const DEFAULT_BOOT_TIMEOUT_S: u64 = 120;
/// Kernel command line used unless a scenario replaces it (EMULATION.md).
pub const DEFAULT_KERNEL_ARGS: &str =
    "console=ttyS0 intel_iommu=on iommu=pt panic=-1 nohz_full=1 isolcpus=1 rcu_nocbs=1";
/// First PCI slot given to NVMe controllers on the root bus (0000:00:04.0, 0000:00:05.0, ...).
pub const FIRST_NVME_SLOT: u8 = 4;

/// One scenario, as written in its TOML file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Name used on the command line and in the log; defaults to the file name without `.toml`.
    #[serde(default)]
    pub name: String,
    /// One line saying what the scenario shows.
    #[serde(default)]
    pub description: String,
    /// Whole-scenario deadline in seconds, boot included.
    #[serde(default = "default_deadline")]
    pub deadline_s: u64,
    /// Deadline in seconds for the guest's `/init` to start.
    #[serde(default = "default_boot_timeout")]
    pub boot_timeout_s: u64,
    /// The scenario must fail; it passes only if it fails, with a reason containing `expect_failure_match`.
    #[serde(default)]
    pub expect_failure: bool,
    /// Substring the failure reason must contain when `expect_failure` is set, so a self-test cannot pass because
    /// of an unrelated failure (a boot that never happened).
    #[serde(default)]
    pub expect_failure_match: Option<String>,
    /// With `expect_failure`: a substring the console log attached to the failure must contain (shows that a
    /// failure comes with the guest's log, e.g. the panic message).
    #[serde(default)]
    pub expect_failure_console: Option<String>,
    /// Set in files under `pending/`: why the scenario does not run yet (it is listed as NOT RUN).
    #[serde(default)]
    pub pending: Option<String>,
    /// The machine.
    #[serde(default)]
    pub machine: Machine,
    /// NVMe controllers, placed at 0000:00:04.0, 0000:00:05.0, ... unless `slot` says otherwise.
    #[serde(default)]
    pub nvme: Vec<NvmeCtrl>,
    /// NVMe subsystems that controllers may join.
    #[serde(default)]
    pub subsystem: Vec<Subsystem>,
    /// NVDIMMs (pmem), in order: the first is region0/namespace0.0.
    #[serde(default)]
    pub nvdimm: Vec<Nvdimm>,
    /// Guest steps, run in order by `/init`; the first failing step ends the run.
    #[serde(default)]
    pub step: Vec<Step>,
    /// Host actions triggered by markers the guest prints.
    #[serde(default)]
    pub action: Vec<Action>,
    /// Where the file was read from (not part of the format).
    #[serde(skip)]
    pub path: PathBuf,
}

fn default_deadline() -> u64 {
    DEFAULT_DEADLINE_S
}
fn default_boot_timeout() -> u64 {
    DEFAULT_BOOT_TIMEOUT_S
}
fn default_step_timeout() -> u64 {
    DEFAULT_STEP_TIMEOUT_S
}
fn default_true() -> bool {
    true
}

/// The emulated machine.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// Guest RAM in MiB (NVDIMMs come on top).
    #[serde(default = "default_memory")]
    pub memory_mb: u64,
    /// Number of vCPUs.
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// Emulated Intel IOMMU (needed for VFIO).
    #[serde(default = "default_true")]
    pub intel_iommu: bool,
    /// Replaces the kernel command line (default: [`DEFAULT_KERNEL_ARGS`]).
    #[serde(default)]
    pub kernel_args: Option<String>,
    /// Appended to the kernel command line.
    #[serde(default)]
    pub extra_kernel_args: String,
    /// Kernel modules `/init` loads (with `modprobe`) before the steps. NVDIMMs add the pmem stack themselves.
    #[serde(default)]
    pub modules: Vec<String>,
    /// 2 MiB hugepages `/init` reserves before the steps.
    #[serde(default)]
    pub hugepages: u32,
}

fn default_memory() -> u64 {
    2048
}
fn default_cpus() -> u32 {
    2
}

impl Default for Machine {
    fn default() -> Self {
        Machine {
            memory_mb: default_memory(),
            cpus: default_cpus(),
            intel_iommu: true,
            kernel_args: None,
            extra_kernel_args: String::new(),
            modules: Vec::new(),
            hugepages: 0,
        }
    }
}

/// An NVMe subsystem (`-device nvme-subsys`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subsystem {
    /// Identifier that controllers name in `subsystem`.
    pub id: String,
    /// NQN; defaults to one derived from `id`.
    #[serde(default)]
    pub nqn: Option<String>,
}

/// An emulated NVMe controller (`-device nvme`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvmeCtrl {
    /// Serial number; defaults to `nvstack<N>`.
    #[serde(default)]
    pub serial: Option<String>,
    /// PCI slot on the root bus; defaults to 4 + index.
    #[serde(default)]
    pub slot: Option<u8>,
    /// Maximum data transfer size as a power of two of the minimum page size (QEMU default 7).
    #[serde(default)]
    pub mdts: Option<u8>,
    /// Number of I/O queue pairs offered (QEMU default 64).
    #[serde(default)]
    pub max_ioqpairs: Option<u32>,
    /// Controller memory buffer in MiB (0: none).
    #[serde(default)]
    pub cmb_size_mb: Option<u32>,
    /// Joins this subsystem (an `id` from `[[subsystem]]`).
    #[serde(default)]
    pub subsystem: Option<String>,
    /// Namespaces, nsid 1, 2, ... in order.
    #[serde(default)]
    pub namespace: Vec<Namespace>,
}

/// A namespace of an emulated controller (`-device nvme-ns`), backed by a fresh sparse raw image.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Size in MiB.
    pub size_mb: u64,
    /// Logical block size in bytes (512 or 4096).
    #[serde(default = "default_lba")]
    pub lba_size: u32,
}

fn default_lba() -> u32 {
    512
}

/// How `/init` sets up an NVDIMM before the steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PmemMode {
    /// Leave it as the kernel shows it: `/dev/pmemN`.
    #[default]
    Raw,
    /// `ndctl create-namespace -f -e namespaceN.0 -m devdax`: `/dev/daxN.0`.
    Devdax,
    /// `-m fsdax`, `mkfs.xfs -m rmapbt=1`, mounted with `-o dax=always` at `/mnt/pmemN`.
    Fsdax,
}

/// An emulated NVDIMM (`-device nvdimm`), backed by a fresh sparse file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nvdimm {
    /// Size in MiB (a multiple of 128).
    pub size_mb: u64,
    /// How `/init` sets it up.
    #[serde(default)]
    pub mode: PmemMode,
}

/// A guest step: a shell script `/init` runs with `sh`, under `set -e`, with a timeout.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    /// Name in markers and logs: letters, digits, `-`, `_`, `.`.
    pub name: String,
    /// The shell commands.
    pub run: String,
    /// Expected exit status.
    #[serde(default)]
    pub expect_rc: i32,
    /// Substrings that must appear in the step's output (stdout and stderr).
    #[serde(default)]
    pub expect_output: Vec<String>,
    /// Substrings that must not appear in the step's output.
    #[serde(default)]
    pub reject_output: Vec<String>,
    /// Seconds before the guest kills the step (and a little later the host gives up on the guest).
    #[serde(default = "default_step_timeout")]
    pub timeout_s: u64,
}

/// What a host action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// A machine check, action optional (uncorrected, no action required): `mce -b CPU 9 0xbd000000000000c0 0x5
    /// ADDR 0x86`.
    MceAo,
    /// A machine check, action required (the victim must run on `cpu`): `mce -b CPU 9 0xbd80000000000134 0x7 ADDR
    /// 0x86`.
    MceAr,
    /// Any human-monitor command, `command` with `{value}` and `{addr}` replaced.
    Hmp,
}

/// A host action: when the guest prints `@@NVSTACK KEY=VALUE`, run it, then answer `ack KEY` so that a step waiting
/// with `host-wait KEY` goes on.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// The marker key that triggers the action (every time it is printed).
    pub on_marker: String,
    /// What to do.
    pub kind: ActionKind,
    /// For `hmp`: the monitor command; `{value}` is the marker's value, `{addr}` the value plus `offset` in hex.
    #[serde(default)]
    pub command: Option<String>,
    /// Added to the marker's value (a number, `0x` hex or decimal) to form `{addr}`.
    #[serde(default)]
    pub offset: u64,
    /// The CPU the machine check is raised on.
    #[serde(default = "default_mce_cpu")]
    pub cpu: u32,
}

fn default_mce_cpu() -> u32 {
    1
}

/// Parse a marker value as a number: `0x` hex or decimal.
pub fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => s.parse().ok(),
    }
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl NvmeCtrl {
    /// The PCI slot of controller number `index`.
    pub fn slot_for(&self, index: usize) -> u8 {
        self.slot.unwrap_or_else(|| FIRST_NVME_SLOT.saturating_add(u8::try_from(index).unwrap_or(u8::MAX)))
    }

    /// The guest PCI address of controller number `index` (`0000:00:SS.0`).
    pub fn bdf_for(&self, index: usize) -> String {
        format!("0000:00:{:02x}.0", self.slot_for(index))
    }
}

impl Scenario {
    /// Parse a scenario from TOML text; `path` names it in errors and gives the default name.
    ///
    /// # Errors
    /// When the text is not a valid scenario ([`HarnessError::ScenarioParse`], [`HarnessError::ScenarioInvalid`]).
    pub fn parse(text: &str, path: &Path) -> Result<Scenario, HarnessError> {
        let mut s: Scenario =
            toml::from_str(text).map_err(|source| HarnessError::ScenarioParse { path: path.to_path_buf(), source })?;
        s.path = path.to_path_buf();
        if s.name.is_empty() {
            s.name = path.file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        }
        s.validate().map_err(|reason| HarnessError::ScenarioInvalid { path: path.to_path_buf(), reason })?;
        Ok(s)
    }

    /// Read and parse a scenario file.
    ///
    /// # Errors
    /// When the file cannot be read or is not a valid scenario.
    pub fn load(path: &Path) -> Result<Scenario, HarnessError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| HarnessError::ScenarioRead { path: path.to_path_buf(), source })?;
        Scenario::parse(&text, path)
    }

    fn validate(&self) -> Result<(), String> {
        if !valid_name(&self.name) {
            return Err(format!("name {:?}: use letters, digits, '-', '_', '.'", self.name));
        }
        if self.step.is_empty() {
            return Err("no [[step]]: a scenario must run something".into());
        }
        if self.deadline_s == 0 || self.boot_timeout_s == 0 {
            return Err("deadline_s and boot_timeout_s must be positive".into());
        }
        if self.expect_failure && self.expect_failure_match.as_deref().is_none_or(str::is_empty) {
            return Err("expect_failure needs expect_failure_match (a substring of the expected failure)".into());
        }
        let m = &self.machine;
        if !(1..=16).contains(&m.cpus) {
            return Err(format!("machine.cpus = {}: between 1 and 16", m.cpus));
        }
        if !(256..=16384).contains(&m.memory_mb) {
            return Err(format!("machine.memory_mb = {}: between 256 and 16384", m.memory_mb));
        }
        for module in &m.modules {
            if !valid_name(module) {
                return Err(format!("machine.modules: bad module name {module:?}"));
            }
        }
        let mut names = BTreeSet::new();
        for st in &self.step {
            if !valid_name(&st.name) {
                return Err(format!("step name {:?}: use letters, digits, '-', '_', '.'", st.name));
            }
            if st.name.starts_with("setup-") {
                return Err(format!("step {}: names starting with setup- belong to the harness", st.name));
            }
            if st.run.trim().is_empty() {
                return Err(format!("step {}: run is empty", st.name));
            }
            if !names.insert(st.name.as_str()) {
                return Err(format!("two steps named {:?}", st.name));
            }
            if st.timeout_s == 0 {
                return Err(format!("step {}: timeout_s must be positive", st.name));
            }
            if !(0..=255).contains(&st.expect_rc) {
                return Err(format!("step {}: expect_rc {} is not an exit status", st.name, st.expect_rc));
            }
            for s in st.expect_output.iter().chain(&st.reject_output) {
                if s.is_empty() || s.contains('\n') {
                    return Err(format!("step {}: output substrings must be one non-empty line", st.name));
                }
            }
        }
        let subsystems: BTreeSet<&str> = self.subsystem.iter().map(|s| s.id.as_str()).collect();
        for s in &self.subsystem {
            if !valid_name(&s.id) {
                return Err(format!("subsystem id {:?}: use letters, digits, '-', '_', '.'", s.id));
            }
        }
        let mut slots = BTreeSet::new();
        for (i, c) in self.nvme.iter().enumerate() {
            let slot = c.slot_for(i);
            if !(3..=0x1f).contains(&slot) || !slots.insert(slot) {
                return Err(format!("nvme[{i}]: slot {slot} is taken or outside 3..=31"));
            }
            if c.namespace.is_empty() {
                return Err(format!("nvme[{i}]: give at least one [[nvme.namespace]]"));
            }
            if let Some(sub) = &c.subsystem {
                if !subsystems.contains(sub.as_str()) {
                    return Err(format!("nvme[{i}]: subsystem {sub:?} is not declared in [[subsystem]]"));
                }
            }
            if let Some(serial) = &c.serial {
                if !valid_name(serial) || serial.len() > 20 {
                    return Err(format!("nvme[{i}]: serial {serial:?}: up to 20 letters/digits"));
                }
            }
            for (j, ns) in c.namespace.iter().enumerate() {
                if ns.lba_size != 512 && ns.lba_size != 4096 {
                    return Err(format!("nvme[{i}].namespace[{j}]: lba_size {} (512 or 4096)", ns.lba_size));
                }
                if !(1..=65536).contains(&ns.size_mb) {
                    return Err(format!("nvme[{i}].namespace[{j}]: size_mb {} (1..=65536)", ns.size_mb));
                }
            }
        }
        for (i, d) in self.nvdimm.iter().enumerate() {
            if d.size_mb == 0 || d.size_mb % 128 != 0 || d.size_mb > 16384 {
                return Err(format!("nvdimm[{i}]: size_mb {} (a multiple of 128, at most 16384)", d.size_mb));
            }
        }
        for a in &self.action {
            if !valid_name(&a.on_marker) || ["step", "done", "boot", "user"].contains(&a.on_marker.as_str()) {
                return Err(format!("action on_marker {:?}: a plain key, not a reserved one", a.on_marker));
            }
            if a.kind == ActionKind::Hmp && a.command.as_deref().is_none_or(str::is_empty) {
                return Err(format!("action on {}: kind = \"hmp\" needs command", a.on_marker));
            }
            if a.cpu >= m.cpus {
                return Err(format!("action on {}: cpu {} does not exist", a.on_marker, a.cpu));
            }
        }
        Ok(())
    }

    /// The device shape in one line, for the CI log.
    pub fn shape(&self) -> String {
        let m = &self.machine;
        let mut parts = vec![format!("{}cpu {}M{}", m.cpus, m.memory_mb, if m.intel_iommu { " iommu" } else { "" })];
        for (i, c) in self.nvme.iter().enumerate() {
            let ns: Vec<String> = c.namespace.iter().map(|n| format!("{}M/{}", n.size_mb, n.lba_size)).collect();
            let mut p = format!("nvme@{:02x}[{}]", c.slot_for(i), ns.join(","));
            if let Some(v) = c.mdts {
                p.push_str(&format!(" mdts={v}"));
            }
            if let Some(v) = c.max_ioqpairs {
                p.push_str(&format!(" qp={v}"));
            }
            if let Some(v) = c.cmb_size_mb {
                p.push_str(&format!(" cmb={v}M"));
            }
            if let Some(v) = &c.subsystem {
                p.push_str(&format!(" subsys={v}"));
            }
            parts.push(p);
        }
        for d in &self.nvdimm {
            parts.push(format!("nvdimm {}M {:?}", d.size_mb, d.mode).to_lowercase());
        }
        parts.join("; ")
    }

    /// Total NVDIMM size in MiB.
    pub fn nvdimm_total_mb(&self) -> u64 {
        self.nvdimm.iter().map(|d| d.size_mb).sum()
    }
}

/// The scenarios of a directory: `DIR/*.toml` to run and `DIR/pending/*.toml` listed as not run, sorted by name.
///
/// # Errors
/// When a file cannot be read or parsed, when a pending file lacks `pending = "reason"`, or when two scenarios
/// share a name.
pub fn load_dir(dir: &Path) -> Result<Vec<Scenario>, HarnessError> {
    let mut all = Vec::new();
    for (sub, pending) in [(dir.to_path_buf(), false), (dir.join("pending"), true)] {
        let rd = match std::fs::read_dir(&sub) {
            Ok(rd) => rd,
            Err(e) if pending && e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(HarnessError::io("listing scenarios", &sub, e)),
        };
        let mut files = Vec::new();
        for entry in rd {
            let p = entry.map_err(|e| HarnessError::io("listing scenarios", &sub, e))?.path();
            if p.extension().is_some_and(|e| e == "toml") {
                files.push(p);
            }
        }
        files.sort();
        for p in files {
            let s = Scenario::load(&p)?;
            if pending && s.pending.is_none() {
                return Err(HarnessError::ScenarioInvalid {
                    path: p,
                    reason: "a file under pending/ needs `pending = \"why it does not run yet\"`".into(),
                });
            }
            if !pending && s.pending.is_some() {
                return Err(HarnessError::ScenarioInvalid {
                    path: p,
                    reason: "`pending` is only for files under pending/ (move it there or drop the key)".into(),
                });
            }
            all.push(s);
        }
    }
    let mut seen = BTreeSet::new();
    for s in &all {
        if !seen.insert(s.name.clone()) {
            return Err(HarnessError::ScenarioInvalid {
                path: s.path.clone(),
                reason: format!("another scenario is also named {:?}", s.name),
            });
        }
    }
    Ok(all)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Scenario, HarnessError> {
        Scenario::parse(t, Path::new("/x/sample.toml"))
    }

    #[test]
    fn full_scenario_parses_with_defaults() {
        let s = parse(
            r#"
            description = "d"
            [machine]
            cpus = 2
            [[subsystem]]
            id = "s0"
            [[nvme]]
            mdts = 2
            subsystem = "s0"
            [[nvme.namespace]]
            size_mb = 64
            lba_size = 4096
            [[nvme.namespace]]
            size_mb = 32
            [[nvdimm]]
            size_mb = 1024
            mode = "devdax"
            [[step]]
            name = "a"
            run = "true"
            [[action]]
            on_marker = "phys"
            kind = "mce-ao"
            "#,
        )
        .unwrap();
        assert_eq!(s.name, "sample");
        assert_eq!(s.deadline_s, DEFAULT_DEADLINE_S);
        assert_eq!(s.machine.memory_mb, 2048);
        assert_eq!(s.nvme[0].namespace[1].lba_size, 512);
        assert_eq!(s.nvme[0].bdf_for(0), "0000:00:04.0");
        assert_eq!(s.nvdimm[0].mode, PmemMode::Devdax);
        assert_eq!(s.action[0].cpu, 1);
        assert_eq!(s.shape(), "2cpu 2048M iommu; nvme@04[64M/4096,32M/512] mdts=2 subsys=s0; nvdimm 1024m devdax");
    }

    #[test]
    fn rejects_mistakes() {
        let bad = [
            ("", "no [[step]]"),
            ("[[step]]\nname='a b'\nrun='x'", "step name"),
            ("[[step]]\nname='a'\nrun='x'\n[[step]]\nname='a'\nrun='y'", "two steps"),
            ("expect_failure = true\n[[step]]\nname='a'\nrun='x'", "expect_failure_match"),
            ("[[nvme]]\n[[step]]\nname='a'\nrun='x'", "namespace"),
            ("[[nvme]]\nsubsystem='z'\n[[nvme.namespace]]\nsize_mb=1\n[[step]]\nname='a'\nrun='x'", "not declared"),
            ("[[nvme]]\n[[nvme.namespace]]\nsize_mb=1\nlba_size=1024\n[[step]]\nname='a'\nrun='x'", "lba_size"),
            ("[[nvdimm]]\nsize_mb=100\n[[step]]\nname='a'\nrun='x'", "multiple of 128"),
            ("[[action]]\non_marker='step'\nkind='mce-ao'\n[[step]]\nname='a'\nrun='x'", "reserved"),
            ("[[action]]\non_marker='p'\nkind='hmp'\n[[step]]\nname='a'\nrun='x'", "needs command"),
        ];
        for (text, want) in bad {
            let e = parse(text).unwrap_err();
            assert!(matches!(e, HarnessError::ScenarioInvalid { .. }), "{text}: {e}");
            assert!(e.to_string().contains(want), "{text}: {e} lacks {want}");
        }
        let e = parse("[[step]]\nname='a'\nrun='x'\ntypo=1").unwrap_err();
        assert!(matches!(e, HarnessError::ScenarioParse { .. }), "{e}");
    }

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0x1000"), Some(4096));
        assert_eq!(parse_number("17"), Some(17));
        assert_eq!(parse_number("zz"), None);
        assert_eq!(parse_number("0xffffffffffffffffff"), None);
    }

    #[test]
    fn pending_files_need_a_reason_and_are_marked() {
        let dir = std::env::temp_dir().join(format!("nvstack-scen-test.{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("pending")).unwrap();
        let step = "[[step]]\nname = 'a'\nrun = 'true'\n";
        std::fs::write(dir.join("b.toml"), step).unwrap();
        std::fs::write(dir.join("pending/a.toml"), format!("pending = 'driver not there'\n{step}")).unwrap();
        let all = load_dir(&dir).unwrap();
        let names: Vec<(&str, Option<&str>)> = all.iter().map(|s| (s.name.as_str(), s.pending.as_deref())).collect();
        assert_eq!(names, [("b", None), ("a", Some("driver not there"))]);
        std::fs::write(dir.join("pending/c.toml"), step).unwrap();
        assert!(load_dir(&dir).unwrap_err().to_string().contains("needs `pending"));
        std::fs::remove_file(dir.join("pending/c.toml")).unwrap();
        std::fs::write(dir.join("a.toml"), step).unwrap();
        assert!(load_dir(&dir).unwrap_err().to_string().contains("also named"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_repository_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let all = load_dir(&dir).unwrap();
        assert!(all.iter().any(|s| s.expect_failure), "the harness self-test scenario is missing");
    }
}
