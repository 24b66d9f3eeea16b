//! The poison path on the host, end to end: a synthetic machine-check SIGBUS (rt_tgsigqueueinfo to ourselves; the
//! host kernel has no MADV_HWPOISON) at an address inside a pmem mapping is caught by the async-signal-safe handler,
//! drained by the listener thread, translated to a device offset, resolved through a volume map into the volume's
//! own reverse map, acted on and journaled.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_driver::pmem::mc_copy::inject_synthetic_sigbus;
use nvstack_driver::pmem::PmemDevice;
use nvstack_rmap::journal::{read_log, Action, Journal, Source};
use nvstack_rmap::listener::{PoisonPath, RawReport};
use nvstack_rmap::owner::{Owner, OwnerPiece, Rmap, VolumeMap};
use nvstack_rmap::plugins::PmemTarget;
use nvstack_rmap::translate::Mapping;
use nvstack_rmap::RmapError;

const MIB: u64 = 1 << 20;

/// A file system stand-in for the volume: inode 131 owns the first MiB, the rest is free.
struct OneFile;
impl Rmap for OneFile {
    fn name(&self) -> &str {
        "onefile"
    }
    fn device(&self) -> &str {
        "vol0"
    }
    fn owners(&self, offset: u64, len: u64, out: &mut Vec<OwnerPiece>) -> Result<(), RmapError> {
        let owner = if offset < MIB {
            Owner::File { ino: 131, file_offset: offset, attr_fork: false, bmbt: false, unwritten: false }
        } else {
            Owner::Free
        };
        out.push(OwnerPiece { device: "vol0".into(), offset, len, owner, rmap: "onefile".into(), depth: 0 });
        Ok(())
    }
}

fn wait_for(path: &PoisonPath, n: usize) -> Vec<nvstack_rmap::journal::PoisonEvent> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = path.journal.list();
        if l.len() >= n || Instant::now() > deadline {
            return l;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn synthetic_sigbus_walks_the_whole_chain() {
    let dir = std::env::temp_dir().join(format!("nvstack-poison-host-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let dev = Arc::new(PmemDevice::open(&dir.join("pm0.img"), Some(4 * MIB)).unwrap());
    let pattern = vec![0x5au8; 8192];
    // SAFETY: a valid buffer outside the mapping.
    unsafe { dev.write_from(2 * MIB, pattern.as_ptr(), pattern.len()) }.unwrap();

    let log = dir.join("poison.log");
    let path = PoisonPath::new(Journal::new(64, Some(&log)).unwrap());
    path.translator.add(Mapping { device: "pm0".into(), vaddr: Some(dev.base_addr()), len: dev.len(), device_offset: 0, phys: None });
    let vm = Arc::new(VolumeMap::new("pm0"));
    vm.add("vol0", MIB, 2 * MIB).unwrap();
    path.registry.register(vm);
    path.registry.register(Arc::new(OneFile));
    path.add_target(Arc::new(PmemTarget::new("pm0", Arc::clone(&dev))));
    let listener = path.spawn(Duration::from_millis(2)).unwrap();

    // 1. Free space inside the volume: zeroed and cleared.
    inject_synthetic_sigbus(dev.base_addr() + (2 * MIB) as usize + 100, false, 12).unwrap();
    let evs = wait_for(&path, 1);
    let e = evs.last().expect("an event");
    assert_eq!(e.source, Source::SigbusActionOptional);
    let t = e.translation.as_ref().expect("translated");
    assert_eq!((t.device.as_str(), t.offset), ("pm0", 2 * MIB));
    assert_eq!(e.len, 4096);
    assert_eq!(e.action, Action::ZeroAndClear);
    assert!(e.outcome.contains("ok"), "{}", e.outcome);
    let mut back = vec![0xffu8; 8192];
    // SAFETY: valid buffer outside the mapping.
    unsafe { dev.read_into(2 * MIB, back.as_mut_ptr(), back.len()) }.unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0), "the poisoned free page is zeroed");
    assert!(back[4096..].iter().all(|&b| b == 0x5a), "its neighbour is untouched");

    // 2. File data inside the volume: reported with its owner, nothing touched. (Action-optional again: an
    // action-required report outside a guarded copy means poison was consumed by code that cannot recover, so the
    // handler hands SIGBUS back to the previous disposition, as it must for a real one.)
    inject_synthetic_sigbus(dev.base_addr() + (MIB + 8192) as usize, false, 12).unwrap();
    let evs = wait_for(&path, 2);
    let e = evs.last().unwrap();
    assert_eq!(e.source, Source::SigbusActionOptional);
    assert_eq!(e.action, Action::ReportFileData);
    let leaf = e.owners.iter().find(|p| p.depth == 1).expect("followed into the volume");
    assert_eq!(leaf.owner, Owner::File { ino: 131, file_offset: 8192, attr_fork: false, bmbt: false, unwritten: false });

    // 3. Outside every volume: no owner known, nothing touched.
    inject_synthetic_sigbus(dev.base_addr() + 4096, false, 12).unwrap();
    let evs = wait_for(&path, 3);
    assert_eq!(evs.last().unwrap().action, Action::NoOwnerKnown);

    listener.stop();
    // The journal file holds the three events with their chains.
    let disk = read_log(&log).unwrap();
    assert_eq!(disk.len(), 3);
    assert_eq!(disk[1].owners.len(), 2);

    // Explain answers the same question without acting or journaling.
    let ex = path.explain(RawReport::Device { source: Source::Explain, device: "pm0".into(), offset: 2 * MIB, len: 4096 });
    assert_eq!(ex.action, Action::None);
    assert!(ex.outcome.contains("zero and clear"));
    assert_eq!(path.journal.list().len(), 3);
    drop(dev);
    let _ = std::fs::remove_dir_all(&dir);
}
