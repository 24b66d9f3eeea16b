//! Guest helper: the extent cache on 2 MiB hugepages over the NVMe bdev (VFIO), with the poison listener, facing
//! real machine checks that the host raises through QMP.
//!
//! 1. Writes pattern A to device bytes 0..4 MiB and flushes (clean cache pages), then pattern B to 8..12 MiB
//!    without a flush (dirty pages, first dirtier client 1).
//! 2. Picks a 2 MiB hugepage of the arena holding only clean cache pages (a machine check poisons a whole hugetlb
//!    page), prints `@@NVSTACK clean=0xPHYS` and waits for the poison event (SIGBUS action-optional from the kernel's
//!    early kill → arena offset → cache page → action). Then reads 0..4 MiB back through the cache: it must equal A
//!    (the dropped pages are refetched from the NVMe namespace).
//! 3. The same with a hugepage of dirty pages (`@@NVSTACK dirty=0xPHYS`): the event must be a data loss naming first
//!    dirtier 1, and a read of a lost page must fail with an I/O error.
//!
//! Usage: `cache-poison-drill BDF`. Exit status 0 when every check held; messages name what differed.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::{run_sync, ChannelOpts};
use nvstack_blockdev::reactor::{ReactorConfig, Reactors};
use nvstack_blockdev::{BlockDev, IoChannel, IoDesc, IoError, IoOp, IoStatus};
use nvstack_cache::{CacheBdev, CacheConfig};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool, DmaBuf};
use nvstack_rmap::cache::CacheMaps;
use nvstack_rmap::journal::{Action, Journal, PoisonEvent};
use nvstack_rmap::listener::PoisonPath;
use nvstack_rmap::owner::VolumeMap;

const MIB: u64 = 1 << 20;
const HUGE: u64 = 2 * MIB;
const IO: u64 = 64 << 10;
const CLEAN: (u64, u64) = (0, 4 * MIB);
const DIRTY: (u64, u64) = (8 * MIB, 12 * MIB);

fn pattern(seed: u8, off: u64, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        let x = off + i as u64;
        *b = (x.wrapping_mul(0x9e37_79b9) >> 13) as u8 ^ seed;
    }
}

struct Io {
    ch: Box<dyn IoChannel>,
    buf: DmaBuf,
    bs: u64,
}

impl Io {
    /// One request of `len` bytes at `off` through the buffer; returns its status.
    fn run(&mut self, op: IoOp, off: u64, len: u64) -> Result<IoStatus, String> {
        let mut d = IoDesc::new(1);
        if op.has_data() {
            let ptr = std::ptr::NonNull::new(self.buf.as_ptr()).ok_or("null buffer")?;
            // SAFETY: `len` <= the buffer's 64 KiB, the buffer is ours and outlives the request (run_sync waits).
            unsafe { d.push_seg_raw(ptr, self.buf.iova(), len as u32) }.map_err(|()| "segment")?;
            d.prepare(op, off / self.bs, len / self.bs);
        } else {
            d.prepare(op, 0, 0);
        }
        // Named as an outside client would be (NBD connection 1): the data-loss report names it.
        d.client = 1;
        let d = run_sync(self.ch.as_mut(), d, Duration::from_secs(30)).map_err(|e| format!("{op:?} at {off:#x}: {e}"))?;
        Ok(d.status)
    }

    fn write_pattern(&mut self, seed: u8, (start, end): (u64, u64)) -> Result<(), String> {
        let mut tmp = vec![0u8; IO as usize];
        for off in (start..end).step_by(IO as usize) {
            pattern(seed, off, &mut tmp);
            self.buf.write_at(0, &tmp).ok_or("buffer write")?;
            match self.run(IoOp::Write, off, IO)? {
                IoStatus::Success => {}
                st => return Err(format!("write at {off:#x}: {st:?}")),
            }
        }
        Ok(())
    }

    fn check_pattern(&mut self, seed: u8, (start, end): (u64, u64)) -> Result<u64, String> {
        let (mut want, mut got) = (vec![0u8; IO as usize], vec![0u8; IO as usize]);
        for off in (start..end).step_by(IO as usize) {
            match self.run(IoOp::Read, off, IO)? {
                IoStatus::Success => {}
                st => return Err(format!("read at {off:#x}: {st:?}")),
            }
            self.buf.read_at(0, &mut got).ok_or("buffer read")?;
            pattern(seed, off, &mut want);
            if let Some(i) = (0..got.len()).find(|&i| got[i] != want[i]) {
                return Err(format!("byte {:#x} reads {:#04x}, wrote {:#04x}", off + i as u64, got[i], want[i]));
            }
        }
        Ok(end - start)
    }
}

fn pagemap_phys(vaddr: usize) -> Result<u64, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    f.seek(SeekFrom::Start(vaddr as u64 / 4096 * 8)).map_err(|e| format!("pagemap: {e}"))?;
    let mut e = [0u8; 8];
    f.read_exact(&mut e).map_err(|e| format!("pagemap: {e}"))?;
    let pfn = u64::from_le_bytes(e) & ((1 << 55) - 1);
    if pfn == 0 {
        return Err("pagemap shows no frame (not root?)".into());
    }
    Ok(pfn * 4096 + vaddr as u64 % 4096)
}

/// An arena offset inside a 2 MiB-aligned block of arena memory all of whose pages cache bytes of `range`.
fn hugepage_of(cache: &CacheBdev, range: (u64, u64)) -> Result<u64, String> {
    let pieces = cache.query_range(range.0, range.1).map_err(|e| format!("query: {e}"))?;
    let mut offs: Vec<u64> = pieces.iter().filter_map(|p| p.arena_offset).map(|o| o / 4096 * 4096).collect();
    offs.sort_unstable();
    offs.dedup();
    for &o in &offs {
        let block = o.div_ceil(HUGE) * HUGE;
        let all = (0..HUGE / 4096).all(|i| offs.binary_search(&(block + i * 4096)).is_ok());
        if all {
            return Ok(block + 0x5000);
        }
    }
    Err(format!("no 2 MiB arena block holds only pages of {:#x}..{:#x} ({} pages cached)", range.0, range.1, offs.len()))
}

fn wait_event(path: &PoisonPath, seen: usize, secs: u64) -> Result<PoisonEvent, String> {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let evs = path.journal.list();
        if let Some(e) = evs.into_iter().skip(seen).find(|e| e.action != Action::Untranslated) {
            return Ok(e);
        }
        if Instant::now() > deadline {
            return Err(format!("no translated poison event within {secs} s"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn print_event(what: &str, e: &PoisonEvent) {
    let t = e.translation.as_ref().map(|t| format!("{} +{:#x}", t.device, t.offset)).unwrap_or_default();
    println!("{what} event: source {:?}, {t}, len {:#x}, action {:?}, outcome {}", e.source, e.len, e.action, e.outcome);
    for o in e.owners.iter().take(2) {
        println!("  owner: {} +{:#x}: {:?} (depth {})", o.device, o.offset, o.owner, o.depth);
    }
    // The chain goes on through the cache bdev to the volume above it.
    if let Some(o) = e.owners.iter().find(|o| matches!(&o.owner, nvstack_rmap::owner::Owner::Volume { name, .. } if name == "vol0")) {
        println!("{what}: owner chain reaches vol0 ({} +{:#x}, depth {})", o.device, o.offset, o.depth);
    }
}

fn run() -> Result<(), String> {
    let bdf = std::env::args().nth(1).ok_or("usage: cache-poison-drill BDF")?;
    let arena = Arena::new(ArenaConfig { size_bytes: 64 * MIB, require_hugepages: true, try_1g: false })
        .map_err(|e| format!("arena on hugepages: {e}"))?;
    let nvme = nvstack_blockdev::spec::open_bdev(&format!("nvme:{bdf}"), &arena).map_err(|e| format!("nvme:{bdf}: {e}"))?;
    let mut rc = ReactorConfig::new(vec![0]);
    rc.pin = false;
    rc.idle_backoff_rounds = Some(1000);
    let reactors = Reactors::start(rc).map_err(|e| format!("reactors: {e}"))?;
    let cfg = CacheConfig { cache_bytes: 16 * MIB, writeback_interval: Duration::from_secs(3600), dirty_high_pct: 100, ..CacheConfig::default() };
    let cache = CacheBdev::new_striped(nvme, Arc::clone(&arena), cfg, &reactors).map_err(|e| format!("cache: {e}"))?;
    let bs = u64::from(cache.geometry().block_size);
    println!("cache {} over nvme:{bdf}: 16 MiB of pages on {:?}", cache.name(), arena.backing());

    let path = PoisonPath::new(Journal::new(256, None).map_err(|e| e.to_string())?);
    CacheMaps::attach(&path, &arena).add(cache.name(), &cache);
    let vm = Arc::new(VolumeMap::new(cache.name()));
    vm.add("vol0", 0, cache.geometry().size_bytes()).map_err(|e| e.to_string())?;
    path.registry.register(vm);
    let listener = path.spawn(Duration::from_millis(5)).map_err(|e| format!("listener: {e}"))?;

    let ch = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).map_err(|e| e.to_string())?;
    let mut pool = BufPool::new(&arena, IO as u32, 1, 4096, "drill").map_err(|e| e.to_string())?;
    let mut io = Io { ch, buf: pool.get().ok_or("buffer")?, bs };
    io.write_pattern(0xa1, CLEAN)?;
    match io.run(IoOp::Flush, 0, 0)? {
        IoStatus::Success => {}
        st => return Err(format!("flush: {st:?}")),
    }
    io.write_pattern(0xb2, DIRTY)?;
    println!("wrote {:#x}..{:#x} and flushed (clean), wrote {:#x}..{:#x} (dirty)", CLEAN.0, CLEAN.1, DIRTY.0, DIRTY.1);
    let base = arena.regions().next().ok_or("arena region")?.host_addr;

    // Clean pages.
    let at = hugepage_of(&cache, CLEAN)?;
    let phys = pagemap_phys(base + at as usize)?;
    println!("clean page: arena {at:#x}, phys {phys:#x}");
    println!("@@NVSTACK clean={phys:#x}");
    let seen = path.journal.list().len();
    let e = wait_event(&path, seen, 90)?;
    print_event("clean", &e);
    if e.action != Action::DropAndRefetch {
        return Err(format!("clean page: action {:?}, want DropAndRefetch", e.action));
    }
    let n = io.check_pattern(0xa1, CLEAN)?;
    println!("clean: dropped and refetched, {n} bytes read back correct");

    // Dirty pages.
    let at = hugepage_of(&cache, DIRTY)?;
    let phys = pagemap_phys(base + at as usize)?;
    let lost_dev = cache.device_range_of(at).map_err(|e| e.to_string())?.ok_or("the dirty page caches nothing")?;
    println!("dirty page: arena {at:#x}, phys {phys:#x}, caches device {:#x}..{:#x}", lost_dev.0, lost_dev.1);
    println!("@@NVSTACK dirty={phys:#x}");
    let seen = path.journal.list().len();
    let e = wait_event(&path, seen, 90)?;
    print_event("dirty", &e);
    match e.action {
        Action::DataLoss { first_dirtier: Some(1) } => println!("dirty: data loss, first dirtier client 1"),
        other => return Err(format!("dirty page: action {other:?}, want DataLoss naming first dirtier 1")),
    }
    match io.run(IoOp::Read, lost_dev.0, 4096)? {
        IoStatus::Failed(err @ IoError::BadRange { .. }) => println!("dirty: read failed as expected: {err}"),
        st => return Err(format!("read of the lost page {:#x}: {st:?}, want an I/O error", lost_dev.0)),
    }
    listener.stop();
    drop(io);
    drop(cache);
    reactors.stop().map_err(|e| e.to_string())?;
    println!("cache poison drill: ok");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("cache-poison-drill: {e}");
            ExitCode::FAILURE
        }
    }
}
