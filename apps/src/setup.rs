//! `nvstack setup`: prepare a machine for nvstack, as SPDK's `scripts/setup.sh` does.
//!
//! - `setup` (or `setup config`): reserve 2 MiB hugepages (HUGEMEM in MiB, or NRHUGE pages, on the HUGENODE nodes
//!   or system-wide) and bind NVMe functions to vfio-pci: those in PCI_ALLOWED, or all, less PCI_BLOCKED. A
//!   function whose namespaces are mounted, used as swap or held by device-mapper/md is skipped, and says so.
//!   A function without an IOMMU group is skipped too (vfio-pci cannot take it).
//! - `setup status`: hugepages per node, and every NVMe function with its driver, IOMMU group and block devices.
//! - `setup reset`: give functions bound to vfio-pci back to the kernel driver (nvme).
//!
//! Binding writes `driver_override`, unbinds the old driver, and writes the address to `drivers_probe`; each step
//! waits for sysfs to show the result, with a deadline. `driver_override` stays `vfio-pci` while bound, so a
//! rescan does not hand the function back to nvme; `reset` clears it.
//!
//! The sysfs root moves with `NVSTACK_SYSFS_ROOT` (or the hidden `--sysfs-root`), so all of this runs against a
//! fake tree in tests.

mod hugepages;
mod inuse;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use nvstack_driver::vfio::sysfs::VFIO_PCI;
use nvstack_driver::vfio::{PciAddress, PciFunction, Sysfs};

use crate::cli::GlobalOpts;
use crate::error::AppError;

/// What `nvstack setup` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Reserve hugepages and bind NVMe functions to vfio-pci.
    Config,
    /// Show hugepages and what is bound where.
    Status,
    /// Give vfio-pci functions back to the kernel nvme driver.
    Reset,
}

/// Arguments of `nvstack setup`.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {
    /// config (default), status or reset.
    #[arg(value_enum, default_value_t = Mode::Config)]
    pub mode: Mode,
    /// Hugepage memory to reserve, in MiB (rounded up to 2 MiB pages). 0 leaves hugepages as they are.
    #[arg(long = "hugemem", env = "HUGEMEM", default_value_t = 2048)]
    pub hugemem_mb: u64,
    /// Number of 2 MiB hugepages to reserve; overrides --hugemem.
    #[arg(long = "nr-huge", env = "NRHUGE")]
    pub nr_huge: Option<u64>,
    /// NUMA nodes to reserve on (comma-separated); each node gets the full count. Default: system-wide.
    #[arg(long = "huge-node", env = "HUGENODE", value_delimiter = ',')]
    pub huge_node: Vec<String>,
    /// PCI addresses to bind or reset (space- or comma-separated); default: every NVMe function.
    #[arg(long = "allow", env = "PCI_ALLOWED", value_delimiter = ' ')]
    pub allow: Vec<String>,
    /// PCI addresses to leave alone (space- or comma-separated).
    #[arg(long = "block", env = "PCI_BLOCKED", value_delimiter = ' ')]
    pub block: Vec<String>,
    /// Print `status` as JSON.
    #[arg(long)]
    pub json: bool,
    /// Root of the sysfs/procfs/dev tree (tests use a fake tree).
    #[arg(long = "sysfs-root", env = "NVSTACK_SYSFS_ROOT", hide = true)]
    pub sysfs_root: Option<PathBuf>,
    /// How long to wait for each driver change to show in sysfs, in milliseconds.
    #[arg(long = "bind-timeout-ms", default_value_t = 10_000, hide = true)]
    pub bind_timeout_ms: u64,
}

/// Parse a list of PCI addresses given space- or comma-separated (and possibly split already by clap).
fn parse_list(items: &[String], what: &str) -> Result<Vec<PciAddress>, AppError> {
    let mut out = Vec::new();
    for tok in items.iter().flat_map(|s| s.split([' ', ',', '\n', '\t'])).filter(|s| !s.is_empty()) {
        out.push(tok.parse::<PciAddress>().map_err(|e| AppError::Usage(format!("{what}: {e}")))?);
    }
    Ok(out)
}

/// Run `nvstack setup`.
///
/// # Errors
/// [`AppError::Usage`] for bad addresses or nodes; [`AppError::Driver`] when sysfs cannot be read or written;
/// [`AppError::Failed`] when a bind or unbind did not happen in time or fewer hugepages were reserved than asked.
pub fn run(args: SetupArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    let sysfs = match &args.sysfs_root {
        Some(r) if !r.as_os_str().is_empty() => Sysfs::new(r),
        _ => Sysfs::system(),
    };
    let allow = parse_list(&args.allow, "PCI_ALLOWED")?;
    let block = parse_list(&args.block, "PCI_BLOCKED")?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if args.mode != Mode::Status && sysfs.is_system() && euid != 0 {
        return Err(AppError::Failed(
            "nvstack setup changes drivers and hugepages through sysfs: run it as root (sudo nvstack setup); \
             `nvstack setup status` works as any user"
                .into(),
        ));
    }
    let mut out = std::io::stdout().lock();
    match args.mode {
        Mode::Status => status(&sysfs, args.json, &mut out),
        Mode::Config => config(&sysfs, &args, &allow, &block, &mut out),
        Mode::Reset => reset(&sysfs, &args, &allow, &block, &mut out),
    }
}

fn emit(out: &mut impl Write, line: std::fmt::Arguments<'_>) -> Result<(), AppError> {
    writeln!(out, "{line}").map_err(AppError::Output)
}

/// The NVMe functions to act on: the allowed ones (all when the list is empty) less the blocked ones. Blocked
/// functions are reported; an allowed address that is not an NVMe function is an error.
fn selected(
    sysfs: &Sysfs,
    allow: &[PciAddress],
    block: &[PciAddress],
    out: &mut impl Write,
) -> Result<Vec<PciFunction>, AppError> {
    let all = sysfs.nvme_functions()?;
    for a in allow {
        if !all.iter().any(|f| f.bdf == *a) {
            let what = if sysfs.exists(*a) { "is not an NVMe controller" } else { "does not exist" };
            return Err(AppError::Usage(format!("PCI_ALLOWED: {a} {what}; see `nvstack setup status`")));
        }
    }
    let mut chosen = Vec::new();
    for f in all {
        if !allow.is_empty() && !allow.contains(&f.bdf) {
            continue;
        }
        if block.contains(&f.bdf) {
            emit(out, format_args!("{} ({:04x} {:04x}): skipping: in PCI_BLOCKED", f.bdf, f.vendor, f.device))?;
            continue;
        }
        chosen.push(f);
    }
    Ok(chosen)
}

fn node_list(items: &[String]) -> Result<Vec<u32>, AppError> {
    items
        .iter()
        .flat_map(|s| s.split([',', ' ']))
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim_start_matches("node")
                .parse::<u32>()
                .map_err(|_| AppError::Usage(format!("HUGENODE: `{s}` is not a node number")))
        })
        .collect()
}

fn config(
    sysfs: &Sysfs,
    args: &SetupArgs,
    allow: &[PciAddress],
    block: &[PciAddress],
    out: &mut impl Write,
) -> Result<ExitCode, AppError> {
    let mut failed = Vec::new();
    let pages = hugepages::pages_wanted(args.hugemem_mb, args.nr_huge)
        .ok_or_else(|| AppError::Usage(format!("HUGEMEM={} MiB is too large", args.hugemem_mb)))?;
    if pages > 0 {
        let nodes = node_list(&args.huge_node)?;
        for r in hugepages::reserve(sysfs, pages, &nodes)? {
            let at = r.node.map_or_else(|| "system-wide".to_string(), |n| format!("on node {n}"));
            emit(out, format_args!("hugepages: {} of {} 2 MiB pages reserved {at}", r.got, r.asked))?;
            if r.got < r.asked {
                failed.push(format!("only {} of {} hugepages reserved {at} (memory is fragmented or short: free memory, or reserve at boot with hugepages=N)", r.got, r.asked));
            }
        }
    }
    let timeout = Duration::from_millis(args.bind_timeout_ms);
    let functions = selected(sysfs, allow, block, out)?;
    if functions.is_empty() {
        emit(out, format_args!("no NVMe functions to bind"))?;
    }
    for f in functions {
        let head = format!("{} ({:04x} {:04x})", f.bdf, f.vendor, f.device);
        let current = f.driver.clone().unwrap_or_else(|| "no driver".into());
        if f.driver.as_deref() == Some(VFIO_PCI) {
            emit(
                out,
                format_args!(
                    "{head}: already bound to vfio-pci (/dev/vfio/{})",
                    f.iommu_group.map_or("?".into(), |g| g.to_string())
                ),
            )?;
            continue;
        }
        if f.iommu_group.is_none() {
            emit(
                out,
                format_args!(
                    "{head}: skipping: no IOMMU group (the IOMMU is off: boot with intel_iommu=on or amd_iommu=on)"
                ),
            )?;
            failed.push(format!("{} has no IOMMU group", f.bdf));
            continue;
        }
        let users = inuse::users(sysfs, f.bdf);
        if !users.is_empty() {
            emit(out, format_args!("{head}: skipping: in use by the host: {}", users.join("; ")))?;
            continue;
        }
        ensure_driver(sysfs, VFIO_PCI)?;
        match bind(sysfs, &f, Some(VFIO_PCI), timeout) {
            Ok(now) => {
                let group = f.iommu_group.map(|g| sysfs.vfio_group_file(g));
                let dev =
                    group.as_ref().filter(|p| p.exists()).map_or(String::new(), |p| format!(" ({})", p.display()));
                emit(out, format_args!("{head}: {current} -> {now}{dev}"))?;
            }
            Err(e) => {
                emit(out, format_args!("{head}: {current} -> vfio-pci FAILED: {e}"))?;
                failed.push(e);
            }
        }
    }
    finish(failed)
}

fn reset(
    sysfs: &Sysfs,
    args: &SetupArgs,
    allow: &[PciAddress],
    block: &[PciAddress],
    out: &mut impl Write,
) -> Result<ExitCode, AppError> {
    let timeout = Duration::from_millis(args.bind_timeout_ms);
    let mut failed = Vec::new();
    let functions = selected(sysfs, allow, block, out)?;
    for f in functions {
        let head = format!("{} ({:04x} {:04x})", f.bdf, f.vendor, f.device);
        match f.driver.as_deref() {
            Some(VFIO_PCI) | None => {}
            Some(d) => {
                emit(out, format_args!("{head}: already bound to {d}"))?;
                continue;
            }
        }
        ensure_driver(sysfs, "nvme")?;
        let current = f.driver.clone().unwrap_or_else(|| "no driver".into());
        match bind(sysfs, &f, None, timeout) {
            Ok(now) => emit(out, format_args!("{head}: {current} -> {now}"))?,
            Err(e) => {
                emit(out, format_args!("{head}: {current} -> kernel driver FAILED: {e}"))?;
                failed.push(e);
            }
        }
    }
    finish(failed)
}

fn finish(failed: Vec<String>) -> Result<ExitCode, AppError> {
    if failed.is_empty() {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(AppError::Failed(format!("setup: {}", failed.join("; "))))
    }
}

/// Make sure `driver` is registered; on a real system load its module.
fn ensure_driver(sysfs: &Sysfs, driver: &str) -> Result<(), AppError> {
    if sysfs.driver_dir(driver).is_dir() {
        return Ok(());
    }
    if sysfs.is_system() {
        let module = driver.replace('-', "_");
        let status = std::process::Command::new("modprobe").arg(&module).status();
        tracing::info!(module, ?status, "modprobe");
        if driver == VFIO_PCI {
            // The type1 IOMMU backend is only a soft dependency of vfio; nvstack's container needs it.
            let status = std::process::Command::new("modprobe").arg("vfio_iommu_type1").status();
            tracing::info!(module = "vfio_iommu_type1", ?status, "modprobe");
        }
        if sysfs.driver_dir(driver).is_dir() {
            return Ok(());
        }
    }
    Err(AppError::Failed(format!(
        "the {driver} driver is not available: load it with `modprobe {}`",
        driver.replace('-', "_")
    )))
}

/// Wait until `cond` holds, polling every millisecond, for at most `timeout`.
fn wait_for(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Move `f` to `target` (vfio-pci), or with `None` back to the kernel's own choice (override cleared). Returns the
/// driver now bound, or what went wrong.
fn bind(sysfs: &Sysfs, f: &PciFunction, target: Option<&str>, timeout: Duration) -> Result<String, String> {
    let bdf = f.bdf;
    let dir = sysfs.device_dir(bdf);
    let name = bdf.to_string();
    // An override line of "\n" clears it.
    sysfs.write_attr(&dir.join("driver_override"), &format!("{}\n", target.unwrap_or(""))).map_err(|e| chain(&e))?;
    if let Some(old) = &f.driver {
        sysfs.write_attr(&sysfs.driver_dir(old).join("unbind"), &name).map_err(|e| chain(&e))?;
        if !wait_for(timeout, || matches!(sysfs.driver(bdf), Ok(None))) {
            return Err(format!("{old} did not release {bdf} within {} ms", timeout.as_millis()));
        }
    }
    sysfs.write_attr(&sysfs.path("/sys/bus/pci/drivers_probe"), &name).map_err(|e| chain(&e))?;
    let mut now = None;
    let ok = wait_for(timeout, || {
        now = sysfs.driver(bdf).ok().flatten();
        match target {
            Some(t) => now.as_deref() == Some(t),
            None => now.is_some(),
        }
    });
    if ok {
        Ok(now.unwrap_or_default())
    } else {
        let want = target.unwrap_or("a kernel driver");
        let is = now.unwrap_or_else(|| "no driver".into());
        Err(format!("{bdf} is bound to {is}, not {want}, after {} ms (see `dmesg`)", timeout.as_millis()))
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(x) = src {
        s.push_str(": ");
        s.push_str(&x.to_string());
        src = x.source();
    }
    s
}

/// One NVMe function in `setup status`.
#[derive(Debug, serde::Serialize)]
struct StatusRow {
    bdf: String,
    vendor: String,
    device: String,
    numa_node: Option<u32>,
    driver: Option<String>,
    driver_override: Option<String>,
    iommu_group: Option<u32>,
    vfio_group_file: Option<String>,
    controllers: Vec<String>,
    block_devices: Vec<String>,
    in_use: Vec<String>,
}

fn status(sysfs: &Sysfs, json: bool, out: &mut impl Write) -> Result<ExitCode, AppError> {
    let huge = hugepages::report(sysfs)?;
    let rows: Vec<StatusRow> = sysfs
        .nvme_functions()?
        .into_iter()
        .map(|f| StatusRow {
            bdf: f.bdf.to_string(),
            vendor: format!("{:04x}", f.vendor),
            device: format!("{:04x}", f.device),
            numa_node: f.numa_node,
            driver_override: f.driver_override.clone(),
            vfio_group_file: f
                .iommu_group
                .map(|g| sysfs.vfio_group_file(g))
                .filter(|p| f.driver.as_deref() == Some(VFIO_PCI) && p.exists())
                .map(|p| p.display().to_string()),
            iommu_group: f.iommu_group,
            controllers: inuse::controllers(sysfs, f.bdf),
            block_devices: inuse::block_devices(sysfs, f.bdf),
            in_use: inuse::users(sysfs, f.bdf),
            driver: f.driver,
        })
        .collect();
    if json {
        let v = serde_json::json!({ "hugepages": huge, "nvme": rows });
        let s = serde_json::to_string_pretty(&v).map_err(|e| AppError::Output(std::io::Error::other(e)))?;
        emit(out, format_args!("{s}"))?;
        return Ok(ExitCode::SUCCESS);
    }
    emit(out, format_args!("Hugepages"))?;
    emit(out, format_args!("{:<8} {:>10} {:>8} / {:>6}", "node", "hugesize", "free", "total"))?;
    for l in &huge {
        let node = l.node.map_or_else(|| "system".to_string(), |n| format!("node{n}"));
        emit(out, format_args!("{:<8} {:>8}kB {:>8} / {:>6}", node, l.size_kb, l.free, l.total))?;
    }
    emit(out, format_args!(""))?;
    emit(
        out,
        format_args!(
            "{:<6} {:<13} {:<6} {:<6} {:<5} {:<9} {:<6} {:<12} {}",
            "Type", "BDF", "Vendor", "Device", "NUMA", "Driver", "Group", "Device", "Block devices"
        ),
    )?;
    for r in &rows {
        let numa = r.numa_node.map_or_else(|| "-".to_string(), |n| n.to_string());
        let driver = r.driver.as_deref().unwrap_or("-");
        let group = r.iommu_group.map_or_else(|| "-".to_string(), |g| g.to_string());
        let dev = if r.controllers.is_empty() {
            r.vfio_group_file.clone().unwrap_or_else(|| "-".into())
        } else {
            r.controllers.join(",")
        };
        let mut blocks = if r.block_devices.is_empty() { "-".to_string() } else { r.block_devices.join(" ") };
        if !r.in_use.is_empty() {
            blocks.push_str(&format!("  (in use: {})", r.in_use.join("; ")));
        }
        emit(
            out,
            format_args!(
                "{:<6} {:<13} {:<6} {:<6} {:<5} {:<9} {:<6} {:<12} {}",
                "NVMe", r.bdf, r.vendor, r.device, numa, driver, group, dev, blocks
            ),
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_split_on_spaces_and_commas() {
        let v = parse_list(&["0000:00:04.0 00:05.0".into(), "0000:00:06.0,0000:00:07.0".into(), String::new()], "x")
            .unwrap();
        assert_eq!(v.len(), 4);
        assert_eq!(v[1].to_string(), "0000:00:05.0");
        assert!(
            matches!(parse_list(&["nonsense".into()], "PCI_ALLOWED"), Err(AppError::Usage(m)) if m.contains("PCI_ALLOWED"))
        );
        assert_eq!(node_list(&["0,1".into(), "node2".into()]).unwrap(), vec![0, 1, 2]);
        assert!(node_list(&["x".into()]).is_err());
    }
}
