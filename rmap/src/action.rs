//! The action policy: from the owners of a poisoned range to what is done about it.
//!
//! The decision ([`decide`]) is pure and tested on its own; carrying it out goes through [`ActionTarget`]s that the
//! layers owning the data register (the pmem bdev zeroes, the cache drops or marks pages, volumes degrade).
//!
//! Order of precedence, most serious first: dirty cached data lost → metadata (volume degraded) → file data
//! (reported) → clean cached data (drop and refetch) → free cache slots (retired) → cache slots retired by an
//! earlier event (nothing to do) → free space (zero and clear).
//! Whatever the action, every cache page and free slot of the event is dealt with (a hugepage event spans many:
//! dirty ones lose their data, clean ones are dropped, free ones retired). Unknown is never free: with no
//! owner at all, nothing is touched.

use crate::journal::Action;
use crate::owner::{Owner, Resolution};

/// Decide the action for a resolved range.
pub fn decide(res: &Resolution) -> Action {
    let leaves: Vec<_> = res.leaves().collect();
    if leaves.is_empty() {
        return Action::NoOwnerKnown;
    }
    if let Some(first_dirtier) = leaves.iter().find_map(|p| match p.owner {
        Owner::CachePage { dirty: true, first_dirtier, .. } => Some(first_dirtier),
        _ => None,
    }) {
        return Action::DataLoss { first_dirtier };
    }
    if leaves.iter().any(|p| matches!(p.owner, Owner::Metadata { .. })) {
        // The volume is the device the metadata lives on (the innermost device of the chain).
        let volume = leaves.iter().find(|p| matches!(p.owner, Owner::Metadata { .. })).map(|p| p.device.clone()).unwrap_or_default();
        return Action::Degraded { volume };
    }
    if leaves.iter().any(|p| matches!(p.owner, Owner::File { .. })) {
        return Action::ReportFileData;
    }
    if leaves.iter().any(|p| matches!(p.owner, Owner::CachePage { dirty: false, .. })) {
        return Action::DropAndRefetch;
    }
    if leaves.iter().any(|p| matches!(p.owner, Owner::CacheSlotFree { .. })) {
        return Action::RetireSlot;
    }
    if !res.failures.is_empty() {
        // A plugin failed: we cannot prove the range is free.
        return Action::NoOwnerKnown;
    }
    if leaves.iter().all(|p| matches!(p.owner, Owner::CacheSlotRetired { .. })) {
        return Action::AlreadyRetired;
    }
    if leaves.iter().all(|p| matches!(p.owner, Owner::Free)) {
        return Action::ZeroAndClear;
    }
    Action::NoOwnerKnown
}

/// A layer that can carry out actions on the devices it owns.
pub trait ActionTarget: Send + Sync {
    /// Whether this target acts for `device`.
    fn owns(&self, device: &str) -> bool;
    /// Zero `[offset, offset+len)` and clear the error (free space).
    ///
    /// # Errors
    /// A description of the failure.
    fn zero_and_clear(&self, device: &str, offset: u64, len: u64) -> Result<(), String> {
        let _ = (device, offset, len);
        Err("this target cannot zero".into())
    }
    /// Drop clean cached data of the range so it is re-read from the backing device.
    ///
    /// # Errors
    /// A description of the failure.
    fn drop_and_refetch(&self, device: &str, offset: u64, len: u64) -> Result<(), String> {
        let _ = (device, offset, len);
        Err("this target holds no cache".into())
    }
    /// Mark the range IOERR: reads of it fail until it is fully overwritten.
    ///
    /// # Errors
    /// A description of the failure.
    fn mark_ioerr(&self, device: &str, offset: u64, len: u64) -> Result<(), String> {
        let _ = (device, offset, len);
        Err("this target cannot mark ranges".into())
    }
    /// Take free cache slots in the range out of service (their memory is poisoned; they hold no data).
    ///
    /// # Errors
    /// A description of the failure.
    fn retire_free_slots(&self, device: &str, offset: u64, len: u64) -> Result<(), String> {
        let _ = (device, offset, len);
        Err("this target holds no cache".into())
    }
    /// Mark a volume degraded.
    ///
    /// # Errors
    /// A description of the failure.
    fn mark_degraded(&self, volume: &str) -> Result<(), String> {
        let _ = volume;
        Err("this target has no volumes".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::owner::OwnerPiece;

    fn piece(owner: Owner) -> OwnerPiece {
        OwnerPiece { device: "d".into(), offset: 0, len: 4096, owner, rmap: "t".into(), depth: 0 }
    }
    fn res(owners: Vec<Owner>) -> Resolution {
        Resolution { pieces: owners.into_iter().map(piece).collect(), failures: vec![] }
    }

    #[test]
    fn precedence() {
        let dirty = Owner::CachePage { page_index: 1, dirty: true, first_dirtier: Some(3), dirtied_at_ms: Some(5) };
        let clean = Owner::CachePage { page_index: 2, dirty: false, first_dirtier: None, dirtied_at_ms: None };
        let file = Owner::File { ino: 131, file_offset: 0, attr_fork: false, bmbt: false, unwritten: false };
        let meta = Owner::Metadata { what: "log".into() };
        assert_eq!(decide(&res(vec![])), Action::NoOwnerKnown);
        assert_eq!(decide(&res(vec![Owner::Free])), Action::ZeroAndClear);
        assert_eq!(decide(&res(vec![clean.clone()])), Action::DropAndRefetch);
        let slot = Owner::CacheSlotFree { page_index: 3 };
        assert_eq!(decide(&res(vec![slot.clone()])), Action::RetireSlot);
        assert_eq!(decide(&res(vec![slot.clone(), clean.clone()])), Action::DropAndRefetch);
        let retired = Owner::CacheSlotRetired { page_index: 4 };
        assert_eq!(decide(&res(vec![retired.clone()])), Action::AlreadyRetired, "retired before: nothing left to do");
        assert_eq!(decide(&res(vec![retired.clone(), slot.clone()])), Action::RetireSlot, "the free slot beside it is retired");
        assert_eq!(decide(&res(vec![retired, clean.clone()])), Action::DropAndRefetch);
        assert_eq!(decide(&res(vec![slot, dirty.clone()])), Action::DataLoss { first_dirtier: Some(3) });
        assert_eq!(decide(&res(vec![clean.clone(), file.clone()])), Action::ReportFileData);
        assert_eq!(decide(&res(vec![file.clone(), meta.clone()])), Action::Degraded { volume: "d".into() });
        assert_eq!(decide(&res(vec![meta, dirty, file])), Action::DataLoss { first_dirtier: Some(3) });
        let mut failed = res(vec![Owner::Free]);
        failed.failures.push("xfs: bad crc".into());
        assert_eq!(decide(&failed), Action::NoOwnerKnown, "a failed plugin means free space is not proven");
        // A volume piece alone is not a leaf: the volume's maps said nothing.
        assert_eq!(decide(&res(vec![Owner::Volume { name: "v".into(), offset: 0 }])), Action::NoOwnerKnown);
    }
}
