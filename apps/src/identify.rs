//! `nvstack identify [BDF]`: an NVMe controller and its namespaces, as `spdk_nvme_identify` and `nvme id-ctrl` /
//! `nvme id-ns` show them: model, serial, firmware, version, MDTS, queue limits, SGL, VWC, ONCS, and per namespace
//! size, capacity and LBA formats (the one in use marked). Human-readable, or `--json`.
//!
//! With a PCI address, that function (bound to vfio-pci); without, every NVMe function bound to vfio-pci. The
//! controller is attached through [`nvstack_driver::vfio::VfioTransport`] with a hugepage arena, identified, and
//! shut down (CC.SHN) before the command returns.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use nvstack_driver::dma::{Arena, ArenaConfig};
use nvstack_driver::nvme::{Controller, CtrlrInfo, CtrlrOpts, Namespace, Transport};
use nvstack_driver::vfio::sysfs::VFIO_PCI;
use nvstack_driver::vfio::{PciAddress, PciFunction, Sysfs, VfioContainer, VfioTransport};

use crate::cli::GlobalOpts;
use crate::error::AppError;

/// Arguments of `nvstack identify`.
#[derive(Debug, clap::Args)]
pub struct IdentifyArgs {
    /// PCI address of the controller (e.g. 0000:00:04.0), or `sim` for the simulated controller. Default: every
    /// NVMe function bound to vfio-pci.
    pub bdf: Option<String>,
    /// Identify the simulated controller (same as `nvstack identify sim`).
    #[arg(long)]
    pub sim: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// DMA arena size in MiB (hugepages; the admin queue and one identify buffer need little).
    #[arg(long = "arena-mb", default_value_t = 8)]
    pub arena_mb: u64,
    /// Function-level reset each controller once (after a first attach, which leaves it enabled) and check that
    /// the reset disabled it, then attach again and identify.
    #[arg(long)]
    pub reset: bool,
    /// Attach, identify and close N times (a new VFIO container each time) and check every round reports the
    /// same thing: a re-attach check.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub repeat: u32,
    /// Root of the sysfs tree (tests use a fake tree).
    #[arg(long = "sysfs-root", env = "NVSTACK_SYSFS_ROOT", hide = true)]
    pub sysfs_root: Option<PathBuf>,
}

/// One LBA format in the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FormatReport {
    /// Format index.
    pub index: u8,
    /// Data bytes per block (0: not a valid size).
    pub block_size: u32,
    /// Metadata bytes per block.
    pub metadata_bytes: u16,
    /// Relative performance, 0 (best) to 3.
    pub relative_performance: u8,
    /// The format in use.
    pub in_use: bool,
}

/// One namespace in the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NamespaceReport {
    /// Namespace ID.
    pub nsid: u32,
    /// Size in bytes (NSZE x block size).
    pub size_bytes: u64,
    /// Size in blocks (NSZE).
    pub size_blocks: u64,
    /// Capacity in blocks (NCAP).
    pub capacity_blocks: u64,
    /// Block size in use.
    pub block_size: u32,
    /// Metadata bytes per block in use.
    pub metadata_bytes: u16,
    /// Optimal I/O boundary in blocks (0: none).
    pub optimal_io_boundary_blocks: u16,
    /// Every LBA format.
    pub lba_formats: Vec<FormatReport>,
    /// Why nvstack will not do I/O to it, if it will not.
    pub refused: Option<String>,
}

/// Optional NVM command names by ONCS bit (Base 5.17.2.1, figure 275, bytes 521:520).
const ONCS_NAMES: [(u16, &str); 9] = [
    (1 << 0, "compare"),
    (1 << 1, "write-uncorrectable"),
    (1 << 2, "dataset-management"),
    (1 << 3, "write-zeroes"),
    (1 << 4, "save-select-features"),
    (1 << 5, "reservations"),
    (1 << 6, "timestamp"),
    (1 << 7, "verify"),
    (1 << 8, "copy"),
];

/// One controller in the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ControllerReport {
    /// PCI address, or the simulator's name.
    pub name: String,
    /// PCI vendor and device ID as sysfs shows them ("1b36:0010"), for PCI functions.
    pub pci_id: Option<String>,
    /// NUMA node of the function, if known.
    pub numa_node: Option<u32>,
    /// PCI vendor ID from Identify.
    pub vendor_id: String,
    /// Model number.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// Firmware revision.
    pub firmware: String,
    /// NVMe version.
    pub version: String,
    /// Controller ID.
    pub controller_id: u16,
    /// Maximum data transfer size in bytes (`None`: unlimited).
    pub mdts_bytes: Option<u64>,
    /// Maximum entries per I/O queue (CAP.MQES + 1).
    pub max_queue_entries: u32,
    /// I/O queue pairs the controller grants.
    pub io_queue_pairs: u16,
    /// "not supported", "supported", or "supported (dword aligned)".
    pub sgl: String,
    /// Volatile write cache present.
    pub volatile_write_cache: bool,
    /// ONCS raw value.
    pub oncs: u16,
    /// ONCS decoded.
    pub optional_nvm_commands: Vec<String>,
    /// Number of namespaces (NN).
    pub namespace_count: u32,
    /// Asynchronous event request limit.
    pub aer_limit: u16,
    /// Abort command limit.
    pub abort_limit: u16,
    /// Ready timeout (CAP.TO) in milliseconds.
    pub ready_timeout_ms: u64,
    /// Subsystem NQN.
    pub subnqn: String,
    /// Active namespaces.
    pub namespaces: Vec<NamespaceReport>,
}

/// Build the report of one controller from its decoded identify data.
pub fn report(info: &CtrlrInfo, namespaces: &[Namespace], pci: Option<&PciFunction>) -> ControllerReport {
    let sgl = match info.sgl {
        None => "not supported",
        Some(false) => "supported",
        Some(true) => "supported (dword aligned)",
    };
    ControllerReport {
        name: info.name.clone(),
        pci_id: pci.map(|f| format!("{:04x}:{:04x}", f.vendor, f.device)),
        numa_node: pci.and_then(|f| f.numa_node),
        vendor_id: format!("{:04x}", info.vendor_id),
        model: info.model.clone(),
        serial: info.serial.clone(),
        firmware: info.firmware.clone(),
        version: info.version.clone(),
        controller_id: info.cntlid,
        mdts_bytes: info.mdts_bytes,
        max_queue_entries: info.max_queue_entries,
        io_queue_pairs: info.io_queues_granted,
        sgl: sgl.to_string(),
        volatile_write_cache: info.volatile_write_cache,
        oncs: info.oncs,
        optional_nvm_commands: ONCS_NAMES
            .iter()
            .filter(|(b, _)| info.oncs & b != 0)
            .map(|(_, n)| (*n).to_string())
            .collect(),
        namespace_count: info.namespace_count,
        aer_limit: info.aer_limit,
        abort_limit: info.abort_limit,
        ready_timeout_ms: info.ready_timeout_ms,
        subnqn: info.subnqn.clone(),
        namespaces: namespaces
            .iter()
            .map(|n| NamespaceReport {
                nsid: n.nsid,
                size_bytes: n.size_bytes(),
                size_blocks: n.block_count,
                capacity_blocks: n.capacity_blocks,
                block_size: n.block_size,
                metadata_bytes: n.metadata_bytes,
                optimal_io_boundary_blocks: n.optimal_boundary_blocks,
                lba_formats: n
                    .formats
                    .iter()
                    .map(|f| FormatReport {
                        index: f.index,
                        block_size: f.block_size,
                        metadata_bytes: f.metadata_bytes,
                        relative_performance: f.relative_performance,
                        in_use: f.in_use,
                    })
                    .collect(),
                refused: n.refused.clone(),
            })
            .collect(),
    }
}

/// Bytes in binary units ("512 MiB", "1.5 GiB").
fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.2} {}", UNITS[u])
    }
}

/// The text form of one controller.
pub fn render_text(r: &ControllerReport, out: &mut impl Write) -> std::io::Result<()> {
    let line = "=".repeat(60);
    writeln!(out, "{line}")?;
    match &r.pci_id {
        Some(id) => writeln!(out, "NVMe controller at {} [{id}]", r.name)?,
        None => writeln!(out, "NVMe controller {}", r.name)?,
    }
    writeln!(out, "{line}")?;
    let kv = |out: &mut dyn Write, k: &str, v: String| writeln!(out, "{k:<34} {v}");
    kv(out, "Vendor ID:", r.vendor_id.clone())?;
    kv(out, "Model Number:", r.model.clone())?;
    kv(out, "Serial Number:", r.serial.clone())?;
    kv(out, "Firmware Version:", r.firmware.clone())?;
    kv(out, "NVMe Version:", r.version.clone())?;
    kv(out, "Controller ID:", r.controller_id.to_string())?;
    if let Some(n) = r.numa_node {
        kv(out, "NUMA Node:", n.to_string())?;
    }
    kv(out, "Maximum Data Transfer Size:", r.mdts_bytes.map_or_else(|| "unlimited".into(), human_bytes))?;
    kv(out, "Maximum Queue Entries (MQES+1):", r.max_queue_entries.to_string())?;
    kv(out, "I/O Queue Pairs:", r.io_queue_pairs.to_string())?;
    kv(out, "SGL:", r.sgl.clone())?;
    kv(out, "Volatile Write Cache:", if r.volatile_write_cache { "present".into() } else { "not present".into() })?;
    let oncs = if r.optional_nvm_commands.is_empty() { "none".to_string() } else { r.optional_nvm_commands.join(" ") };
    kv(out, "Optional NVM Commands (ONCS):", format!("{:#06x}: {oncs}", r.oncs))?;
    kv(out, "Async Event Request Limit:", r.aer_limit.to_string())?;
    kv(out, "Abort Command Limit:", r.abort_limit.to_string())?;
    kv(out, "Ready Timeout (CAP.TO):", format!("{} ms", r.ready_timeout_ms))?;
    kv(out, "Subsystem NQN:", r.subnqn.clone())?;
    kv(out, "Namespaces (NN):", format!("{} ({} active)", r.namespace_count, r.namespaces.len()))?;
    for n in &r.namespaces {
        writeln!(out)?;
        writeln!(out, "Namespace {}", n.nsid)?;
        writeln!(out, "  {:<32} {} ({} blocks)", "Size:", human_bytes(n.size_bytes), n.size_blocks)?;
        writeln!(out, "  {:<32} {} blocks", "Capacity:", n.capacity_blocks)?;
        writeln!(out, "  {:<32} {} bytes + {} metadata", "Block Size:", n.block_size, n.metadata_bytes)?;
        if n.optimal_io_boundary_blocks != 0 {
            writeln!(out, "  {:<32} {} blocks", "Optimal I/O Boundary:", n.optimal_io_boundary_blocks)?;
        }
        if let Some(why) = &n.refused {
            writeln!(out, "  {:<32} {why}", "Not usable by nvstack:")?;
        }
        writeln!(out, "  LBA Formats:")?;
        for f in &n.lba_formats {
            let mark = if f.in_use { "  (in use)" } else { "" };
            writeln!(
                out,
                "    LBAF{:<2} data {:>5} metadata {:>3} rp {}{mark}",
                f.index, f.block_size, f.metadata_bytes, f.relative_performance
            )?;
        }
    }
    Ok(())
}

/// What to identify.
enum Target {
    Sim,
    Pci(Vec<PciFunction>),
}

fn targets(args: &IdentifyArgs, sysfs: &Sysfs) -> Result<Target, AppError> {
    if args.sim || args.bdf.as_deref() == Some("sim") {
        return Ok(Target::Sim);
    }
    match &args.bdf {
        Some(b) => {
            let bdf: PciAddress = b.parse().map_err(|e: nvstack_driver::DriverError| AppError::Usage(e.to_string()))?;
            let f = sysfs.function(bdf)?;
            if !f.is_nvme() {
                return Err(AppError::Usage(format!(
                    "{bdf} is not an NVMe controller (class {:06x}, {:04x}:{:04x}); see `nvstack setup status`",
                    f.class, f.vendor, f.device
                )));
            }
            Ok(Target::Pci(vec![f]))
        }
        None => {
            let found: Vec<PciFunction> =
                sysfs.nvme_functions()?.into_iter().filter(|f| f.driver.as_deref() == Some(VFIO_PCI)).collect();
            if found.is_empty() {
                return Err(AppError::Failed(
                    "no NVMe function is bound to vfio-pci: bind them with `nvstack setup` (see `nvstack setup status`), \
                     or name one: `nvstack identify 0000:00:04.0`"
                        .into(),
                ));
            }
            Ok(Target::Pci(found))
        }
    }
}

/// Attach, report, shut down.
fn identify_one(t: Arc<dyn Transport>, pci: Option<&PciFunction>) -> Result<ControllerReport, AppError> {
    // Ask for as many I/O queues as the controller has: Set Features answers with what it grants.
    let opts = CtrlrOpts { io_queues: 0xfffe, ..CtrlrOpts::default() };
    let ctrl = Controller::attach(t, opts)?;
    let r = report(&ctrl.info(), ctrl.namespaces(), pci);
    if let Err(e) = ctrl.shutdown() {
        tracing::warn!(ctrlr = ctrl.name(), error = %e, "shutdown notification failed");
    }
    Ok(r)
}

/// The simulated controller `identify --sim` shows: two namespaces (512- and 4096-byte blocks).
fn sim_transport(arena: &Arc<Arena>) -> Result<Arc<dyn Transport>, AppError> {
    use nvstack_driver::nvme::sim::{SimConfig, SimController, SimNamespace};
    let cfg = SimConfig {
        namespaces: vec![
            SimNamespace { block_size: 512, block_count: 8192, metadata_bytes: 0 },
            SimNamespace { block_size: 4096, block_count: 4096, metadata_bytes: 0 },
        ],
        ..SimConfig::default()
    };
    let sim: Arc<dyn Transport> = SimController::start(Arc::clone(arena), cfg)?;
    Ok(sim)
}

/// One round over the PCI functions: one container, every function opened into it (the arena mapped once), each
/// identified; with `reset`, each reset in between (see [`IdentifyArgs::reset`]).
fn pci_round(
    sysfs: &Sysfs,
    functions: &[PciFunction],
    arena: &Arc<Arena>,
    reset: bool,
    notes: &mut Vec<String>,
) -> Result<Vec<ControllerReport>, AppError> {
    let container = VfioContainer::open()?;
    let mut transports = Vec::with_capacity(functions.len());
    for f in functions {
        transports.push(Arc::new(VfioTransport::open_in(sysfs, f.bdf, arena, &container)?));
    }
    // The devices hold the container now: the last one to close unmaps the arena while its group is attached.
    drop(container);
    let mut reports = Vec::with_capacity(functions.len());
    for (t, f) in transports.into_iter().zip(functions) {
        if reset {
            notes.push(reset_check(&t)?);
        }
        reports.push(identify_one(t, Some(f))?);
    }
    Ok(reports)
}

/// Attach (which enables the controller), close, reset the function, and check the reset disabled it.
fn reset_check(t: &Arc<VfioTransport>) -> Result<String, AppError> {
    use nvstack_driver::nvme::regs::{CC, CSTS};
    let ctrl = Controller::attach(Arc::clone(t) as Arc<dyn Transport>, CtrlrOpts::default())?;
    drop(ctrl); // shutdown notification; CC.EN stays 1
    let cc_before = t.read32(CC);
    t.reset()?;
    let cc_after = t.read32(CC);
    let csts_after = t.read32(CSTS);
    let master = t.device().bus_master_enabled()?;
    let name = t.name().to_string();
    if cc_before & 1 != 1 || cc_after & 1 != 0 || csts_after & 1 != 0 || !master {
        return Err(AppError::Failed(format!(
            "{name}: function reset did not disable the controller: CC {cc_before:#x} -> {cc_after:#x}, CSTS {csts_after:#x}, bus master {master}"
        )));
    }
    Ok(format!("{name}: function reset: CC.EN 1 -> 0 (CC {cc_before:#x} -> {cc_after:#x}), CSTS.RDY 0, bus master on; attached again"))
}

/// Run `nvstack identify`.
///
/// # Errors
/// [`AppError::Usage`] for a bad address; [`AppError::Driver`] when VFIO or the controller fails (the message says
/// what to do: bind with `nvstack setup`, reserve hugepages, enable the IOMMU); [`AppError::Failed`] when no
/// function is bound to vfio-pci.
pub fn run(args: IdentifyArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    let sysfs = match &args.sysfs_root {
        Some(r) if !r.as_os_str().is_empty() => Sysfs::new(r),
        _ => Sysfs::system(),
    };
    let size_bytes = args
        .arena_mb
        .checked_mul(1 << 20)
        .filter(|&b| b > 0)
        .ok_or_else(|| AppError::Usage(format!("--arena-mb {} is out of range", args.arena_mb)))?;
    let mut notes: Vec<String> = Vec::new();
    let reports = match targets(&args, &sysfs)? {
        Target::Sim => {
            let arena = Arena::new(ArenaConfig { size_bytes, require_hugepages: false, try_1g: false })?;
            vec![identify_one(sim_transport(&arena)?, None)?]
        }
        Target::Pci(functions) => {
            // Check each function first, so an unbound one fails with its own advice before hugepages are taken.
            for f in &functions {
                nvstack_driver::vfio::check_vfio_ready(&sysfs, f.bdf)?;
            }
            let arena = Arena::new(ArenaConfig { size_bytes, require_hugepages: true, try_1g: false })?;
            let mut first: Option<Vec<ControllerReport>> = None;
            for round in 0..args.repeat {
                let reports = pci_round(&sysfs, &functions, &arena, args.reset && round == 0, &mut notes)?;
                match &first {
                    None => first = Some(reports),
                    Some(f) => {
                        let same = serde_json::to_value(f).ok() == serde_json::to_value(&reports).ok();
                        if !same {
                            return Err(AppError::Failed(format!(
                                "re-attach round {}: identify data differs from round 1",
                                round + 1
                            )));
                        }
                    }
                }
            }
            if args.repeat > 1 {
                notes.push(format!("re-attached {} times: identify data identical every round", args.repeat));
            }
            first.unwrap_or_default()
        }
    };
    let mut out = std::io::stdout().lock();
    if args.json {
        let v = serde_json::json!({ "controllers": reports });
        let s = serde_json::to_string_pretty(&v).map_err(|e| AppError::Output(std::io::Error::other(e)))?;
        writeln!(out, "{s}").map_err(AppError::Output)?;
    } else {
        for (i, r) in reports.iter().enumerate() {
            if i > 0 {
                writeln!(out).map_err(AppError::Output)?;
            }
            render_text(r, &mut out).map_err(AppError::Output)?;
        }
    }
    for n in &notes {
        if args.json {
            eprintln!("{n}");
        } else {
            writeln!(out, "{n}").map_err(AppError::Output)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvstack_driver::nvme::ns::LbaFormatInfo;

    fn sample() -> (CtrlrInfo, Vec<Namespace>) {
        let info = CtrlrInfo {
            name: "0000:00:04.0".into(),
            vendor_id: 0x1b36,
            model: "QEMU NVMe Ctrl".into(),
            serial: "deadbeef".into(),
            firmware: "7.2.0".into(),
            cntlid: 0,
            version: "1.4".into(),
            mdts_bytes: Some(512 << 10),
            max_queue_entries: 2048,
            io_queues_granted: 64,
            sgl: Some(false),
            volatile_write_cache: true,
            oncs: 0x015d,
            namespace_count: 256,
            aer_limit: 4,
            abort_limit: 4,
            subnqn: "nqn.2019-08.org.qemu:deadbeef".into(),
            ready_timeout_ms: 7500,
        };
        let ns = Namespace {
            nsid: 1,
            block_count: 262_144,
            capacity_blocks: 262_144,
            block_size: 4096,
            lba_shift: 12,
            metadata_bytes: 0,
            optimal_boundary_blocks: 0,
            formats: vec![
                LbaFormatInfo { index: 0, block_size: 512, metadata_bytes: 0, relative_performance: 0, in_use: false },
                LbaFormatInfo { index: 1, block_size: 512, metadata_bytes: 8, relative_performance: 0, in_use: false },
                LbaFormatInfo { index: 4, block_size: 4096, metadata_bytes: 0, relative_performance: 0, in_use: true },
            ],
            refused: None,
        };
        (info, vec![ns])
    }

    #[test]
    fn text_shows_what_identify_users_look_for() {
        let (info, ns) = sample();
        let r = report(&info, &ns, None);
        let mut out = Vec::new();
        render_text(&r, &mut out).unwrap();
        let s = String::from_utf8(out).unwrap();
        for want in [
            "Model Number:                      QEMU NVMe Ctrl",
            "Serial Number:                     deadbeef",
            "Firmware Version:                  7.2.0",
            "NVMe Version:                      1.4",
            "Maximum Data Transfer Size:        512 KiB",
            "Maximum Queue Entries (MQES+1):    2048",
            "I/O Queue Pairs:                   64",
            "SGL:                               supported",
            "Volatile Write Cache:              present",
            "0x015d: compare dataset-management write-zeroes save-select-features timestamp copy",
            "Size:                            1 GiB (262144 blocks)",
            "LBAF4  data  4096 metadata   0 rp 0  (in use)",
            "LBAF1  data   512 metadata   8 rp 0\n",
        ] {
            assert!(s.contains(want), "missing {want:?} in:\n{s}");
        }
    }

    #[test]
    fn json_has_the_fields() {
        let (info, ns) = sample();
        let v = serde_json::to_value(report(&info, &ns, None)).unwrap();
        assert_eq!(v["model"], "QEMU NVMe Ctrl");
        assert_eq!(v["mdts_bytes"], 512 << 10);
        assert_eq!(v["max_queue_entries"], 2048);
        assert_eq!(v["namespaces"][0]["size_bytes"], 1u64 << 30);
        assert_eq!(v["namespaces"][0]["lba_formats"][2]["in_use"], true);
        assert_eq!(v["optional_nvm_commands"][0], "compare");
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(128 << 10), "128 KiB");
        assert_eq!(human_bytes(1536 << 20), "1.50 GiB");
    }
}
