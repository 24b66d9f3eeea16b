//! `nvstack poison`: the poison journal and the "ask the owner" chain from the command line.
//!
//! - `list`: the events journaled by a running or past appliance (its `poison.log`).
//! - `explain`: the whole chain for a device offset or a physical address — translation, every owner, the action
//!   that would be taken — without injecting or changing anything.
//! - `inject`: a test aid. Maps a pmem device or file, poisons one page of it (a synthetic SIGBUS on a host; real
//!   `MADV_HWPOISON` or debugfs `corrupt-pfn` in a guest), and prints the event the listener made of it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use nvstack_blockdev::spec::{open_bdev, parse_size};
use nvstack_driver::dma::{Arena, ArenaConfig};
use nvstack_driver::pmem::mc_copy;
use nvstack_driver::pmem::sysfs::PhysRange;
use nvstack_driver::pmem::PmemDevice;
use nvstack_rmap::journal::{read_log, Journal, PoisonEvent, Source};
use nvstack_rmap::listener::{action_name, PoisonPath, RawReport};
use nvstack_rmap::owner::{Owner, VolumeMap};
use nvstack_rmap::plugins::{BdevTarget, PmemTarget, XfsPlugin};
use nvstack_rmap::translate::Mapping;
use nvstack_rmap::xfs::{XfsOptions, XfsRmap};

use crate::cli::GlobalOpts;
use crate::error::AppError;

/// Arguments of `nvstack poison`.
#[derive(Debug, Args)]
pub struct PoisonArgs {
    /// What to do.
    #[command(subcommand)]
    pub cmd: PoisonCmd,
}

/// `nvstack poison` subcommands.
#[derive(Debug, Subcommand)]
pub enum PoisonCmd {
    /// Print the journaled poison events.
    List {
        /// The journal log file.
        #[arg(long, default_value = "nvstack-data/poison.log")]
        journal: PathBuf,
        /// The appliance's data directory (`nvstack serve --data-dir`): reads DATA_DIR/poison.log.
        #[arg(long = "data-dir", conflicts_with = "journal")]
        data_dir: Option<PathBuf>,
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the chain for a device offset (--device/--offset) or a physical address (--phys); changes nothing.
    Explain(ExplainArgs),
    /// Poison one page of a pmem mapping and print the event (a test aid).
    Inject(InjectArgs),
    /// Map the device, listen (SIGBUS, tracefs, badblocks) and print events as they arrive, acting on them.
    Watch(WatchArgs),
}

/// Arguments of `poison watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Where the owners are looked up.
    #[command(flatten)]
    chain: ChainArgs,
    /// tracefs mount point (mce:mce_record and ras:memory_failure_event are enabled there).
    #[arg(long, default_value = "/sys/kernel/tracing")]
    tracefs: PathBuf,
    /// Do not use tracefs.
    #[arg(long)]
    no_tracefs: bool,
    /// Watch this badblocks list (relative to /sys, e.g. block/pmem0/badblocks) for the device.
    #[arg(long)]
    badblocks: Option<String>,
    /// Stop after this many events.
    #[arg(long, default_value_t = 1)]
    count: usize,
    /// Give up after this many milliseconds (exit status 1).
    #[arg(long, default_value_t = 60_000)]
    timeout_ms: u64,
    /// Append events to this journal file.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// Print `@@NVSTACK phys=0x.. len=0x..` (the device's physical placement) for a test harness.
    #[arg(long)]
    marker: bool,
}

/// What the chain is built from.
#[derive(Debug, Args)]
pub struct ChainArgs {
    /// A device spec as `perf --bdev` takes it (file:IMG, pmem:/dev/dax0.0, nvme:BDF...).
    #[arg(long)]
    device: Option<String>,
    /// A pmem device or file to map (for --phys, and for inject).
    #[arg(long)]
    pmem: Option<PathBuf>,
    /// Physical address of the pmem mapping's first byte, when sysfs cannot tell (fsdax, a file).
    #[arg(long, value_parser = parse_u64)]
    phys_base: Option<u64>,
    /// A volume inside the device: NAME:START:LEN (sizes as 1G, 4096...). Repeatable.
    #[arg(long = "volume")]
    volumes: Vec<String>,
    /// Read the XFS reverse-map btree of the device, or of the volume named here.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    xfs: Option<String>,
    /// One JSON document instead of text.
    #[arg(long)]
    json: bool,
}

/// Arguments of `poison explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// Where the owners are looked up.
    #[command(flatten)]
    chain: ChainArgs,
    /// Device byte offset.
    #[arg(long, value_parser = parse_u64)]
    offset: Option<u64>,
    /// Bytes (default one 4 KiB page).
    #[arg(long, value_parser = parse_u64, default_value = "4096")]
    len: u64,
    /// A physical address instead of a device offset.
    #[arg(long, value_parser = parse_u64)]
    phys: Option<u64>,
}

/// How `inject` poisons the page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InjectMethod {
    /// A synthetic SIGBUS BUS_MCEERR_AO sent to ourselves (works anywhere).
    Synthetic,
    /// madvise(MADV_HWPOISON): real poison (root, a kernel with memory-failure support).
    Madvise,
    /// debugfs hwpoison/corrupt-pfn with the page's PFN (root, hwpoison_inject loaded).
    CorruptPfn,
}

/// Arguments of `poison inject`.
#[derive(Debug, Args)]
pub struct InjectArgs {
    /// Where the owners are looked up (needs --pmem).
    #[command(flatten)]
    chain: ChainArgs,
    /// Byte offset in the pmem mapping of the page to poison.
    #[arg(long, value_parser = parse_u64)]
    offset: u64,
    /// How to poison it.
    #[arg(long, value_enum, default_value_t = InjectMethod::Synthetic)]
    method: InjectMethod,
    /// Append the event to this journal file.
    #[arg(long)]
    journal: Option<PathBuf>,
    /// How long to wait for the event, in milliseconds.
    #[arg(long, default_value_t = 5000)]
    wait_ms: u64,
}

fn parse_u64(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        return u64::from_str_radix(h, 16).map_err(|_| format!("{s:?} is not a hex number"));
    }
    parse_size(t)
}

/// Run `nvstack poison`.
///
/// # Errors
/// Bad arguments (exit 2), or a failure to open, map or read.
pub fn run(args: PoisonArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    match args.cmd {
        PoisonCmd::List { journal, data_dir, json } => {
            let journal = data_dir.map_or(journal, |d| nvstack_rmap::listener::default_journal_path(&d));
            list(&journal, json)
        }
        PoisonCmd::Explain(a) => explain(a),
        PoisonCmd::Inject(a) => inject(a),
        PoisonCmd::Watch(a) => watch(a),
    }
}

fn list(journal: &std::path::Path, json: bool) -> Result<ExitCode, AppError> {
    if !journal.exists() {
        return Err(AppError::Usage(format!(
            "no poison journal at {}: give --data-dir DIR or --journal PATH (the appliance writes DATA_DIR/poison.log)",
            journal.display()
        )));
    }
    let events = read_log(journal).map_err(|e| AppError::Failed(format!("{e}")))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&events).map_err(|e| AppError::Failed(e.to_string()))?);
    } else if events.is_empty() {
        println!("no poison events");
    } else {
        println!("{:>5}  {:<24}  {:<16}  {:>14}  {:<40}", "id", "source", "device", "offset", "action");
        for e in &events {
            let (dev, off) = e.translation.as_ref().map(|t| (t.device.as_str(), format!("{:#x}", t.offset))).unwrap_or(("-", "-".into()));
            println!("{:>5}  {:<24}  {:<16}  {:>14}  {:<40}", e.id, format!("{:?}", e.source), dev, off, action_name(&e.action));
        }
    }
    Ok(ExitCode::SUCCESS)
}

struct Built {
    path: Arc<PoisonPath>,
    /// The outermost device's registry name (events on it are resolved through volumes below it).
    device: String,
    pmem: Option<(String, Arc<PmemDevice>)>,
    phys: Option<PhysRange>,
    _arena: Arc<Arena>,
}

fn parse_volume(text: &str) -> Result<(String, u64, u64), AppError> {
    let bad = || AppError::Usage(format!("--volume {text:?}: expected NAME:START:LEN, e.g. vol0:1M:1G"));
    let mut it = text.splitn(3, ':');
    let (name, start, len) = (it.next().ok_or_else(bad)?, it.next().ok_or_else(bad)?, it.next().ok_or_else(bad)?);
    if name.is_empty() {
        return Err(bad());
    }
    Ok((name.to_owned(), parse_u64(start).map_err(|_| bad())?, parse_u64(len).map_err(|_| bad())?))
}

fn build(c: &ChainArgs, journal: Option<&std::path::Path>) -> Result<Built, AppError> {
    let journal = Journal::new(nvstack_rmap::journal::DEFAULT_JOURNAL_EVENTS, journal).map_err(|e| AppError::Failed(e.to_string()))?;
    let path = PoisonPath::new(journal);
    let arena = Arena::new(ArenaConfig { size_bytes: 16 << 20, ..Default::default() })?;
    let mut pmem = None;
    let mut device_name = None;
    let mut bdev = None;
    if let Some(p) = &c.pmem {
        let dev = Arc::new(PmemDevice::open(p, None)?);
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("pmem0").to_owned();
        let phys = match c.phys_base {
            Some(start) => Some(PhysRange { start, len: dev.len() }),
            None => dev.phys_range(),
        };
        path.translator.add(Mapping { device: name.clone(), vaddr: Some(dev.base_addr()), len: dev.len(), device_offset: 0, phys });
        path.add_target(Arc::new(PmemTarget::new(&name, Arc::clone(&dev))));
        device_name = Some(name.clone());
        pmem = Some((name, dev));
    }
    if let Some(spec) = &c.device {
        let b = open_bdev(spec, &arena)?;
        let name = b.name().to_owned();
        if c.pmem.is_none() {
            if let Some(start) = c.phys_base {
                // The device is not mapped here: only its physical placement is known.
                let len = b.geometry().size_bytes();
                path.translator.add(Mapping { device: name.clone(), vaddr: None, len, device_offset: 0, phys: Some(PhysRange { start, len }) });
            }
            path.add_target(Arc::new(BdevTarget::new(&name, Arc::clone(&b))));
        }
        device_name = Some(name);
        bdev = Some(b);
    }
    let Some(dev_name) = device_name else {
        return Err(AppError::Usage("give --device SPEC or --pmem PATH".into()));
    };
    let vm = VolumeMap::new(&dev_name);
    let mut vols = Vec::new();
    for v in &c.volumes {
        let (name, start, len) = parse_volume(v)?;
        vm.add(&name, start, len).map_err(|e| AppError::Usage(e.to_string()))?;
        vols.push((name, start));
    }
    if !vols.is_empty() {
        path.registry.register(Arc::new(vm));
    }
    if let Some(target) = &c.xfs {
        let (answer_for, base) = if target.is_empty() {
            (dev_name.clone(), 0)
        } else {
            let (_, start) = vols
                .iter()
                .find(|(n, _)| n == target)
                .ok_or_else(|| AppError::Usage(format!("--xfs {target}: no --volume of that name")))?;
            (target.clone(), *start)
        };
        let b = match bdev.clone() {
            Some(b) => b,
            None => {
                let p = c.pmem.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
                open_bdev(&format!("pmem:{p}"), &arena)?
            }
        };
        let xfs = XfsRmap::open_with(b, &arena, XfsOptions { base_offset_bytes: base, ..Default::default() })
            .map_err(|e| AppError::Failed(format!("opening the XFS reverse map: {e}")))?;
        path.registry.register(Arc::new(XfsPlugin::new(&answer_for, xfs)));
    }
    let phys = path.translator.mappings().iter().find(|m| m.device == dev_name).and_then(|m| m.phys);
    Ok(Built { path, device: dev_name, pmem, phys, _arena: arena })
}

fn print_event(e: &PoisonEvent, json: bool) -> Result<(), AppError> {
    if json {
        println!("{}", serde_json::to_string_pretty(e).map_err(|x| AppError::Failed(x.to_string()))?);
        return Ok(());
    }
    println!("source:      {:?}", e.source);
    if let Some(v) = e.vaddr {
        println!("vaddr:       {v:#x}");
    }
    if let Some(p) = e.phys {
        println!("phys:        {p:#x}");
    }
    println!("length:      {} bytes", e.len);
    match &e.translation {
        Some(t) => println!("device:      {} offset {:#x} ({})", t.device, t.offset, t.via),
        None => println!("device:      not translated"),
    }
    if e.owners.is_empty() {
        println!("owners:      none known");
    }
    for p in &e.owners {
        let indent = "  ".repeat(p.depth);
        let what = match &p.owner {
            Owner::Free => "free space".to_owned(),
            Owner::CachePage { page_index, dirty, first_dirtier, .. } => {
                let who = first_dirtier.map_or_else(|| "none".to_string(), nvstack_blockdev::client::describe);
                format!("cache page {page_index} ({}, first dirtier: {who})", if *dirty { "dirty" } else { "clean" })
            }
            Owner::CacheSlotFree { page_index } => format!("free cache slot {page_index}"),
            Owner::CacheSlotRetired { page_index } => format!("retired cache slot {page_index} (poisoned before)"),
            Owner::Volume { name, offset } => format!("volume {name} at {offset:#x}"),
            Owner::File { ino, file_offset, attr_fork, bmbt, unwritten } => format!(
                "inode {ino} offset {file_offset}{}{}{}",
                if *attr_fork { " attr-fork" } else { "" },
                if *bmbt { " bmbt" } else { "" },
                if *unwritten { " unwritten" } else { "" }
            ),
            Owner::Metadata { what } => format!("metadata: {what}"),
            Owner::Outside => "outside the file system".into(),
        };
        println!("owner:       {indent}{} {:#x}+{:#x} [{}] {what}", p.device, p.offset, p.len, p.rmap);
    }
    for f in &e.rmap_failures {
        println!("rmap error:  {f}");
    }
    println!("action:      {}", action_name(&e.action));
    println!("outcome:     {}", e.outcome);
    Ok(())
}

fn explain(a: ExplainArgs) -> Result<ExitCode, AppError> {
    let built = build(&a.chain, None)?;
    let raw = match (a.phys, a.offset) {
        (Some(pa), None) => RawReport::Phys { source: Source::Explain, addr: pa, len: a.len },
        (None, Some(offset)) => RawReport::Device { source: Source::Explain, device: built.device.clone(), offset, len: a.len },
        _ => return Err(AppError::Usage("give exactly one of --offset (with --device/--pmem) or --phys".into())),
    };
    let ev = built.path.explain(raw);
    print_event(&ev, a.chain.json)?;
    Ok(ExitCode::SUCCESS)
}

fn inject(a: InjectArgs) -> Result<ExitCode, AppError> {
    if a.chain.pmem.is_none() {
        return Err(AppError::Usage("inject needs --pmem PATH (the mapping whose page is poisoned)".into()));
    }
    let built = build(&a.chain, a.journal.as_deref())?;
    let Some((_, dev)) = &built.pmem else {
        return Err(AppError::Usage("inject needs --pmem PATH".into()));
    };
    if a.offset >= dev.len() {
        return Err(AppError::Usage(format!("--offset {:#x} is beyond the mapping's {:#x} bytes", a.offset, dev.len())));
    }
    let addr = dev.base_addr() + (a.offset & !4095) as usize;
    let listener = built.path.spawn(Duration::from_millis(2)).map_err(|e| AppError::Failed(e.to_string()))?;
    match a.method {
        InjectMethod::Synthetic => mc_copy::inject_synthetic_sigbus(addr, false, 12)?,
        InjectMethod::Madvise => {
            // SAFETY: madvise on a page of our own mapping; MADV_HWPOISON marks it poisoned (the kernel then sends
            // SIGBUS, which our handler records). No Rust reference into the mapping exists.
            let rc = unsafe { libc::madvise(addr as *mut libc::c_void, 4096, libc::MADV_HWPOISON) };
            if rc != 0 {
                return Err(AppError::Failed(format!(
                    "madvise(MADV_HWPOISON) failed: {} (needs root and a kernel with memory-failure support; on a host use --method synthetic)",
                    std::io::Error::last_os_error()
                )));
            }
        }
        InjectMethod::CorruptPfn => {
            // Touch the page so it is mapped, then find its PFN.
            let mut b = [0u8; 1];
            // SAFETY: reading one byte of our own mapping through the guarded copy.
            unsafe { dev.read_into(a.offset & !4095, b.as_mut_ptr(), 1) }.map_err(|e| AppError::Failed(format!("{e:?}")))?;
            let pfn = pagemap_pfn(addr)?;
            std::fs::write("/sys/kernel/debug/hwpoison/corrupt-pfn", format!("{pfn:#x}\n")).map_err(|e| {
                AppError::Failed(format!("writing debugfs hwpoison/corrupt-pfn: {e} (needs root, debugfs and hwpoison_inject)"))
            })?;
        }
    }
    let deadline = Instant::now() + Duration::from_millis(a.wait_ms);
    let ev = loop {
        if let Some(e) = built.path.journal.list().into_iter().last() {
            break Some(e);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    listener.stop();
    match ev {
        Some(e) => {
            print_event(&e, a.chain.json)?;
            Ok(ExitCode::SUCCESS)
        }
        None => Err(AppError::Failed(format!("no poison event arrived within {} ms", a.wait_ms))),
    }
}

fn pagemap_pfn(addr: usize) -> Result<u64, AppError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").map_err(|e| AppError::Failed(format!("opening /proc/self/pagemap: {e}")))?;
    f.seek(SeekFrom::Start(addr as u64 / 4096 * 8)).map_err(|e| AppError::Failed(e.to_string()))?;
    let mut e = [0u8; 8];
    f.read_exact(&mut e).map_err(|e| AppError::Failed(e.to_string()))?;
    let pfn = u64::from_le_bytes(e) & ((1 << 55) - 1);
    if pfn == 0 {
        return Err(AppError::Failed("pagemap shows no PFN for the page (needs root)".into()));
    }
    Ok(pfn)
}

fn watch(a: WatchArgs) -> Result<ExitCode, AppError> {
    let built = build(&a.chain, a.journal.as_deref())?;
    if let Some((_, dev)) = &built.pmem {
        // Fault every page in, so the kernel knows we map it and early-kill reports (SIGBUS AO) reach us.
        let mut b = [0u8; 1];
        let mut off = 0;
        while off < dev.len() {
            // SAFETY: one byte of our own mapping into a local buffer, through the guarded copy.
            let _ = unsafe { dev.read_into(off, b.as_mut_ptr(), 1) };
            off += 4096;
        }
    }
    if !a.no_tracefs {
        if let Err(e) = built.path.enable_tracefs(&a.tracefs) {
            eprintln!("nvstack: warning: {e}; tracefs events will not be seen (use --no-tracefs to silence)");
        }
    }
    if let Some(bb) = &a.badblocks {
        built.path.watch_badblocks(&built.device, bb, 0);
        built.path.poll_badblocks(true);
    }
    let before = built.path.journal.list().len();
    let listener = built.path.spawn(Duration::from_millis(5)).map_err(|e| AppError::Failed(e.to_string()))?;
    if a.marker {
        match built.phys {
            Some(p) => println!("@@NVSTACK phys={:#x} len={:#x} dev={}", p.start, p.len, built.device),
            None => {
                return Err(AppError::Usage(format!(
                    "--marker: the physical placement of {} is unknown; give --phys-base",
                    built.device
                )))
            }
        }
    }
    let deadline = Instant::now() + Duration::from_millis(a.timeout_ms);
    let mut printed = before;
    loop {
        let evs = built.path.journal.list();
        for e in evs.iter().skip(printed) {
            print_event(e, a.chain.json)?;
            println!();
        }
        printed = evs.len().max(printed);
        if printed - before >= a.count || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    listener.stop();
    if printed - before >= a.count {
        Ok(ExitCode::SUCCESS)
    } else {
        Err(AppError::Failed(format!("{} of {} poison events arrived within {} ms", printed - before, a.count, a.timeout_ms)))
    }
}
