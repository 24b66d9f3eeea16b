//! The cache's reverse map and actions through the real listener: a synthetic SIGBUS (BUS_MCEERR_AO) on the arena
//! memory of a cache page of a striped cache on 2 reactors is translated to the arena device, resolved by the cache
//! plugin to the page, the device bytes it caches and the volume above, and acted on:
//! - a clean page is dropped, its slot retired, and the next read refetches correct data from the backing device;
//! - a dirty page is lost: the event is a data loss naming the first dirtier, reads of it fail, neighbours are
//!   intact, and a full overwrite makes it readable again.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::bdev::{run_sync, ChannelOpts};
use nvstack_blockdev::malloc::MallocBdev;
use nvstack_blockdev::reactor::{ReactorConfig, Reactors};
use nvstack_blockdev::{BlockDev, IoChannel, IoDesc, IoError, IoOp, IoStatus};
use nvstack_cache::{CacheBdev, CacheConfig};
use nvstack_driver::dma::{Arena, ArenaConfig, BufPool};
use nvstack_driver::pmem::mc_copy::inject_synthetic_sigbus;
use nvstack_rmap::cache::CacheMaps;
use nvstack_rmap::journal::{Action, Journal, PoisonEvent, Source};
use nvstack_rmap::listener::PoisonPath;
use nvstack_rmap::owner::{Owner, VolumeMap};

const MIB: u64 = 1 << 20;
const BS: u64 = 512;

fn wait_for(path: &PoisonPath, n: usize) -> Vec<PoisonEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = path.journal.list();
        if l.len() >= n || Instant::now() > deadline {
            return l;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Io<'a> {
    ch: &'a mut dyn IoChannel,
    pool: BufPool,
}

impl Io<'_> {
    fn run(&mut self, op: IoOp, offset: u64, data: Option<&[u8]>, len: u64) -> (IoStatus, Vec<u8>) {
        let mut d = IoDesc::new(1);
        let mut buf = self.pool.get().expect("buffer");
        if let Some(src) = data {
            buf.write_at(0, src).expect("fill");
        }
        d.attach_buf(buf).expect("attach");
        d.clear_raw_segs();
        let mut bufs = Vec::new();
        d.take_bufs(&mut bufs);
        let buf = bufs.pop().expect("buffer");
        let ptr = std::ptr::NonNull::new(buf.as_ptr()).expect("ptr");
        // SAFETY: `len` bytes fit in the buffer (64 KiB), which this function keeps until the request completes.
        unsafe { d.push_seg_raw(ptr, buf.iova(), len as u32) }.expect("segment");
        if op == IoOp::Flush {
            d.clear_raw_segs();
            d.prepare(IoOp::Flush, 0, 0);
        } else {
            d.prepare(op, offset / BS, len / BS);
        }
        let d = run_sync(self.ch, d, Duration::from_secs(10)).expect("request");
        let mut out = vec![0u8; len as usize];
        buf.read_at(0, &mut out).expect("read");
        self.pool.put(buf).expect("put back");
        (d.status, out)
    }
}

#[test]
fn arena_poison_under_cache_pages_drops_clean_and_loses_dirty() {
    let arena = Arena::new(ArenaConfig { size_bytes: 8 * MIB, require_hugepages: false, try_1g: false }).expect("arena");
    let backing: Arc<dyn BlockDev> = MallocBdev::new("Malloc0", 4 * MIB, BS as u32).expect("malloc");
    let cores = nvstack_blockdev::coremask::allowed_cores();
    let mut rc = ReactorConfig::new(vec![cores[0], cores[cores.len() - 1]]);
    rc.pin = false;
    rc.idle_backoff_rounds = Some(1000);
    let reactors = Reactors::start(rc).expect("reactors");
    let cfg = CacheConfig { cache_bytes: 2 * MIB, writeback_interval: Duration::from_secs(3600), ..CacheConfig::default() };
    let cache = CacheBdev::new_striped(Arc::clone(&backing), Arc::clone(&arena), cfg, &reactors).expect("cache");
    let name = cache.name().to_string();

    let mut ch = cache.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).expect("channel");
    let mut io = Io { ch: ch.as_mut(), pool: BufPool::new(&arena, 64 << 10, 2, 4096, "test").expect("pool") };
    let a: Vec<u8> = (0..64 << 10).map(|i| (i % 251) as u8).collect();
    let b: Vec<u8> = (0..64 << 10).map(|i| (i % 241) as u8 ^ 0x5a).collect();
    // Clean data at 0 (shard 0), dirty data at 1 MiB (shard 1: stripes are 1 MiB).
    assert_eq!(io.run(IoOp::Write, 0, Some(&a), 64 << 10).0, IoStatus::Success);
    assert_eq!(io.run(IoOp::Flush, 0, None, 0).0, IoStatus::Success);
    assert_eq!(io.run(IoOp::Write, MIB, Some(&b), 64 << 10).0, IoStatus::Success);

    let path = PoisonPath::new(Journal::new(64, None).expect("journal"));
    CacheMaps::attach(&path, &arena).add(&name, &cache);
    // The volume above the cache: the chain goes arena → cache page → cache bdev → vol0.
    let vm = Arc::new(VolumeMap::new(&name));
    vm.add("vol0", 0, 4 * MIB).expect("volume");
    path.registry.register(vm);
    let listener = path.spawn(Duration::from_millis(2)).expect("listener");
    let base = arena.regions().next().expect("region").host_addr;

    // 1. A clean page (device bytes 8 KiB..12 KiB).
    let q = cache.query_range(8192, 12288).expect("query");
    let clean_at = q.first().and_then(|p| p.arena_offset).expect("page cached");
    inject_synthetic_sigbus(base + clean_at as usize + 64, false, 12).expect("inject");
    let evs = wait_for(&path, 1);
    let e = evs.last().expect("an event");
    assert_eq!(e.source, Source::SigbusActionOptional);
    assert_eq!(e.translation.as_ref().map(|t| (t.device.as_str(), t.offset)), Some(("arena", clean_at)));
    assert_eq!(e.action, Action::DropAndRefetch, "{e:?}");
    assert!(e.owners.iter().any(|p| matches!(p.owner, Owner::CachePage { dirty: false, .. })), "{:?}", e.owners);
    assert!(e.owners.iter().any(|p| matches!(&p.owner, Owner::Volume { name: n, offset: 8192 } if *n == name)), "{:?}", e.owners);
    assert!(e.owners.iter().any(|p| matches!(&p.owner, Owner::Volume { name: n, offset: 8192 } if n == "vol0")), "{:?}", e.owners);
    assert!(!e.outcome.contains("fail"), "{}", e.outcome);
    let misses = cache.stats().misses.load(std::sync::atomic::Ordering::Relaxed);
    let (st, data) = io.run(IoOp::Read, 0, None, 64 << 10);
    assert_eq!(st, IoStatus::Success);
    assert!(data == a, "reads after dropping a clean page return the backing device's data");
    assert_eq!(cache.stats().misses.load(std::sync::atomic::Ordering::Relaxed), misses + 1, "the dropped page was refetched");
    let again = cache.query_range(8192, 12288).expect("query");
    assert!(again.iter().all(|p| p.arena_offset != Some(clean_at)), "the poisoned slot is never reused: {again:?}");

    // 2. A dirty page (device bytes 1 MiB + 16 KiB..+20 KiB): lost.
    let q = cache.query_range(MIB + 16384, MIB + 20480).expect("query");
    let dirty_at = q.first().and_then(|p| p.arena_offset).expect("page cached");
    inject_synthetic_sigbus(base + dirty_at as usize, false, 12).expect("inject");
    let evs = wait_for(&path, 2);
    let e = evs.last().expect("an event");
    // The test's writes name no client: the first dirtier is its channel's reactor (0), as an internal client.
    let internal0 = u32::from(nvstack_blockdev::client::internal(0));
    assert_eq!(e.action, Action::DataLoss { first_dirtier: Some(internal0) }, "{e:?}");
    assert!(e.owners.iter().any(|p| matches!(p.owner, Owner::CachePage { dirty: true, first_dirtier: Some(c), .. } if c == internal0)));
    assert!(e.owners.iter().any(|p| matches!(&p.owner, Owner::Volume { name: n, offset } if n == "vol0" && *offset == MIB + 16384)));
    let (st, _) = io.run(IoOp::Read, MIB, None, 64 << 10);
    assert!(matches!(st, IoStatus::Failed(IoError::BadRange { .. })), "reads of lost data fail: {st:?}");
    let (st, data) = io.run(IoOp::Read, MIB, None, 16384);
    assert_eq!(st, IoStatus::Success);
    assert!(data[..] == b[..16384], "the lost page's neighbours are intact");
    // A full overwrite of the lost page makes it readable again.
    assert_eq!(io.run(IoOp::Write, MIB + 16384, Some(&a[..4096]), 4096).0, IoStatus::Success);
    let (st, data) = io.run(IoOp::Read, MIB + 16384, None, 4096);
    assert_eq!(st, IoStatus::Success);
    assert!(data[..] == a[..4096]);

    // 3. A free slot (holds nothing): claimed by the cache and retired, so a later fill never lands on it.
    let (lo, hi) = (0..arena.size_bytes() / 4096)
        .map(|p| p * 4096)
        .filter(|&off| cache.owns_arena_offset(off).is_some())
        .fold((u64::MAX, 0), |(lo, hi), off| (lo.min(off), hi.max(off + 4096)));
    let free_at = (lo..hi).step_by(4096).find(|&off| cache.slot_free_at(off).expect("slot")).expect("a free slot");
    inject_synthetic_sigbus(base + free_at as usize + 8, false, 12).expect("inject");
    let evs = wait_for(&path, 3);
    let e = evs.last().expect("an event");
    assert_eq!(e.action, Action::RetireSlot, "{e:?}");
    assert_eq!(e.owners.len(), 1, "{:?}", e.owners);
    assert!(matches!(e.owners[0].owner, Owner::CacheSlotFree { page_index } if page_index == free_at / 4096), "{:?}", e.owners);
    assert!(e.outcome.contains("retire free slot") && !e.outcome.contains("fail"), "{}", e.outcome);
    assert!(!cache.slot_free_at(free_at).expect("slot"), "the slot is out of service");
    // Fill every slot of the cache (2 MiB of slots, 3 MiB of writes): the retired one stays empty.
    for k in 0..48u64 {
        assert_eq!(io.run(IoOp::Write, 2 * MIB + (k % 32) * (64 << 10), Some(&a), 64 << 10).0, IoStatus::Success);
    }
    assert_eq!(cache.device_range_of(free_at).expect("query"), None, "a retired free slot was handed out");
    assert!((lo..hi).step_by(4096).all(|off| !cache.slot_free_at(off).expect("slot")), "the writes used every free slot");

    // 4. The retired slot poisoned again (a second machine check on the same memory): named as retired, nothing done.
    assert!(cache.slot_retired_at(free_at).expect("slot"));
    inject_synthetic_sigbus(base + free_at as usize + 16, false, 12).expect("inject");
    let evs = wait_for(&path, 4);
    let e = evs.last().expect("an event");
    assert_eq!(e.action, Action::AlreadyRetired, "{e:?}");
    assert_eq!(e.owners.len(), 1, "{:?}", e.owners);
    assert!(matches!(e.owners[0].owner, Owner::CacheSlotRetired { page_index } if page_index == free_at / 4096), "{:?}", e.owners);
    assert_eq!(e.outcome, "ok", "nothing is acted on");
    assert_eq!(cache.device_range_of(free_at).expect("query"), None, "still out of service");

    listener.stop();
    drop(io);
    drop(ch);
    let carved = arena.carved_bytes();
    drop(cache);
    reactors.stop().expect("stop");
    assert_eq!(arena.carved_bytes(), carved, "pages with poisoned slots never go back to the arena");
}
