//! The VFIO container: one IOMMU address space (type1v2) shared by the devices opened into it, with the DMA arena
//! mapped once.
//!
//! Order matters: the kernel sets the IOMMU type when the first group joins the container, so the arena is mapped
//! after the first device is opened ([`super::VfioDevice::open`] then [`VfioContainer::map_arena`];
//! [`super::VfioTransport::open`] does both). The container keeps each mapped arena alive (an `Arc`) and unmaps it
//! when the container is dropped, before the last group leaves.

use std::sync::{Arc, Mutex};

use crate::dma::{Arena, ArenaRegionInfo};
use crate::DriverError;

/// An arena mapped into this container.
struct MappedArena {
    arena: Arc<Arena>,
    regions: Vec<ArenaRegionInfo>,
}

/// A VFIO container (`/dev/vfio/vfio`) with type1v2 IOMMU.
pub struct VfioContainer {
    inner: Arc<vfio_ioctls::VfioContainer>,
    mapped: Mutex<Vec<MappedArena>>,
}

impl std::fmt::Debug for VfioContainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.mapped.lock().map(|m| m.len()).unwrap_or(0);
        f.debug_struct("VfioContainer").field("mapped_arenas", &n).finish()
    }
}

/// Turn an open failure of a `/dev/vfio` file into the error that says what to do.
pub(crate) fn classify_open(bdf: &str, path: &std::path::Path, e: std::io::Error) -> DriverError {
    match e.kind() {
        std::io::ErrorKind::NotFound => DriverError::VfioModule { path: path.to_path_buf(), source: e },
        std::io::ErrorKind::PermissionDenied => {
            DriverError::VfioPermission { bdf: bdf.to_string(), path: path.to_path_buf(), source: e }
        }
        _ if e.raw_os_error() == Some(libc::EBUSY) => {
            DriverError::VfioBusy { bdf: bdf.to_string(), path: path.to_path_buf(), source: e }
        }
        _ => DriverError::Sysfs { op: "opening", path: path.to_path_buf(), source: e },
    }
}

impl VfioContainer {
    /// Open a new container.
    ///
    /// # Errors
    /// [`DriverError::VfioModule`] when `/dev/vfio/vfio` is missing, [`DriverError::VfioPermission`] when it cannot
    /// be opened, [`DriverError::VfioOpen`] when the kernel lacks the VFIO API version or type1v2.
    pub fn open() -> Result<Arc<VfioContainer>, DriverError> {
        let inner = vfio_ioctls::VfioContainer::new(None).map_err(|e| match e {
            vfio_ioctls::VfioError::OpenContainer(io) => {
                classify_open("container", std::path::Path::new("/dev/vfio/vfio"), io)
            }
            other => DriverError::VfioOpen {
                bdf: "container".into(),
                step: "checking the VFIO API and the type1v2 IOMMU (load it: `modprobe vfio_iommu_type1`)",
                source: other,
            },
        })?;
        tracing::debug!("VFIO container opened");
        Ok(Arc::new(VfioContainer { inner: Arc::new(inner), mapped: Mutex::new(Vec::new()) }))
    }

    /// The vfio-ioctls container, for opening devices into it.
    pub(crate) fn ops(&self) -> Arc<dyn vfio_ioctls::VfioOps> {
        Arc::clone(&self.inner) as Arc<dyn vfio_ioctls::VfioOps>
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Vec<MappedArena>>, DriverError> {
        self.mapped.lock().map_err(|_| DriverError::ArenaDescribe { detail: "VFIO container lock poisoned".into() })
    }

    /// Whether `arena` is mapped in this container.
    pub fn is_mapped(&self, arena: &Arc<Arena>) -> bool {
        self.mapped.lock().map(|m| m.iter().any(|a| Arc::ptr_eq(&a.arena, arena))).unwrap_or(false)
    }

    /// Map every region of `arena` for DMA at IOVA = its guest address, once: a second call for the same arena is a
    /// no-op. At least one device must be open in the container.
    ///
    /// # Errors
    /// [`DriverError::VfioArenaNotHuge`] when the arena is ordinary memory; [`DriverError::VfioDma`] when the IOMMU
    /// refuses (regions mapped before the failure are unmapped again).
    pub fn map_arena(&self, arena: &Arc<Arena>) -> Result<(), DriverError> {
        if !arena.backing().is_huge() {
            return Err(DriverError::VfioArenaNotHuge { backing: arena.backing().describe() });
        }
        let mut mapped = self.lock()?;
        if mapped.iter().any(|a| Arc::ptr_eq(&a.arena, arena)) {
            return Ok(());
        }
        let regions: Vec<ArenaRegionInfo> = arena.regions().collect();
        for (i, r) in regions.iter().enumerate() {
            let len = usize::try_from(r.len)
                .map_err(|_| DriverError::ArenaSize { size_bytes: r.len, reason: "does not fit the address space" })?;
            // SAFETY: vfio_dma_map requires that, while mapped, the range is touched only by volatile/atomic
            // accesses, raw-pointer copies and system calls, never through Rust references. That is the arena's
            // access rule (driver/src/dma.rs: no references into arena memory). The range stays mapped in the
            // process as long as the Arena lives, and this container holds an Arc to it until it unmaps the range.
            let res = unsafe { self.inner.vfio_dma_map(r.iova, len, r.host_addr as *mut u8) };
            if let Err(source) = res {
                for done in &regions[..i] {
                    if let Ok(l) = usize::try_from(done.len) {
                        let _ = self.inner.vfio_dma_unmap(done.iova, l);
                    }
                }
                return Err(DriverError::VfioDma { op: "map", iova: r.iova, size_bytes: r.len, source });
            }
            tracing::info!(iova = r.iova, size_bytes = r.len, "arena mapped for DMA");
        }
        mapped.push(MappedArena { arena: Arc::clone(arena), regions });
        Ok(())
    }

    /// Unmap `arena` (a no-op if it is not mapped). Devices must no longer DMA into it.
    ///
    /// # Errors
    /// [`DriverError::VfioDma`] when the IOMMU refuses; the arena stays recorded as mapped.
    pub fn unmap_arena(&self, arena: &Arc<Arena>) -> Result<(), DriverError> {
        let mut mapped = self.lock()?;
        let Some(pos) = mapped.iter().position(|a| Arc::ptr_eq(&a.arena, arena)) else { return Ok(()) };
        Self::unmap_regions(&self.inner, &mapped[pos].regions)?;
        mapped.swap_remove(pos);
        Ok(())
    }

    fn unmap_regions(inner: &vfio_ioctls::VfioContainer, regions: &[ArenaRegionInfo]) -> Result<(), DriverError> {
        for r in regions {
            let len = usize::try_from(r.len)
                .map_err(|_| DriverError::ArenaSize { size_bytes: r.len, reason: "does not fit the address space" })?;
            inner.vfio_dma_unmap(r.iova, len).map_err(|source| DriverError::VfioDma {
                op: "unmap",
                iova: r.iova,
                size_bytes: r.len,
                source,
            })?;
            tracing::debug!(iova = r.iova, size_bytes = r.len, "arena unmapped");
        }
        Ok(())
    }
}

impl Drop for VfioContainer {
    fn drop(&mut self) {
        let mapped = match self.mapped.get_mut() {
            Ok(m) => std::mem::take(m),
            Err(p) => std::mem::take(p.into_inner()),
        };
        for m in mapped {
            if let Err(e) = Self::unmap_regions(&self.inner, &m.regions) {
                // The arena stays alive only until this value is gone; once the last group leaves the container
                // the kernel drops every mapping anyway.
                tracing::warn!(error = %e, "unmapping the arena on container close failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_failures_say_what_to_do() {
        let p = std::path::Path::new("/dev/vfio/3");
        let e = classify_open("0000:00:04.0", p, std::io::Error::from_raw_os_error(libc::ENOENT));
        assert!(matches!(e, DriverError::VfioModule { .. }) && e.to_string().contains("modprobe vfio-pci"), "{e}");
        let e = classify_open("0000:00:04.0", p, std::io::Error::from_raw_os_error(libc::EACCES));
        assert!(matches!(e, DriverError::VfioPermission { .. }) && e.to_string().contains("run as root"), "{e}");
        let e = classify_open("0000:00:04.0", p, std::io::Error::from_raw_os_error(libc::EBUSY));
        assert!(matches!(e, DriverError::VfioBusy { .. }) && e.to_string().contains("another process"), "{e}");
    }

    #[test]
    fn an_ordinary_arena_is_refused_before_any_vfio_call() {
        // No container can be opened on a host without VFIO; the arena check needs none.
        let arena =
            Arena::new(crate::dma::ArenaConfig { size_bytes: 2 << 20, require_hugepages: false, try_1g: false });
        let Ok(arena) = arena else { return };
        if arena.backing().is_huge() {
            return; // hugepages reserved on this host: nothing to refuse
        }
        let sysfs = super::super::Sysfs::new("/nonexistent");
        let bdf = "0000:00:04.0".parse().unwrap_or_else(|e| panic!("{e}"));
        let e = super::super::VfioTransport::open(&sysfs, bdf, &arena).unwrap_err();
        assert!(matches!(e, DriverError::VfioArenaNotHuge { .. }), "{e}");
        assert!(e.to_string().contains("nvstack setup"), "{e}");
    }
}
