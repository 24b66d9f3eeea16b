//! The VFIO PCIe transport: the nvme [`Transport`] over a [`VfioDevice`] and the DMA arena mapped into its container.

use std::sync::Arc;

use super::container::VfioContainer;
use super::device::VfioDevice;
use super::sysfs::{PciAddress, Sysfs};
use crate::dma::Arena;
use crate::nvme::Transport;
use crate::DriverError;

/// An NVMe function reached through VFIO. BAR0 is the register file; the arena is mapped for DMA at IOVA = its
/// guest address, so the controller code puts arena IOVAs in commands as they are.
#[derive(Debug)]
pub struct VfioTransport {
    device: VfioDevice,
    arena: Arc<Arena>,
}

impl VfioTransport {
    /// Open `bdf` in a new container and map `arena` for DMA.
    ///
    /// # Errors
    /// As [`VfioTransport::open_in`].
    pub fn open(sysfs: &Sysfs, bdf: PciAddress, arena: &Arc<Arena>) -> Result<VfioTransport, DriverError> {
        if !arena.backing().is_huge() {
            return Err(DriverError::VfioArenaNotHuge { backing: arena.backing().describe() });
        }
        let container = VfioContainer::open()?;
        Self::open_in(sysfs, bdf, arena, &container)
    }

    /// Open `bdf` into `container` (shared by several devices) and map `arena` there if it is not yet.
    ///
    /// # Errors
    /// [`DriverError::VfioArenaNotHuge`] when the arena is not hugepage-backed (checked first); the errors of
    /// [`VfioDevice::open`] and [`VfioContainer::map_arena`].
    pub fn open_in(
        sysfs: &Sysfs,
        bdf: PciAddress,
        arena: &Arc<Arena>,
        container: &Arc<VfioContainer>,
    ) -> Result<VfioTransport, DriverError> {
        if !arena.backing().is_huge() {
            return Err(DriverError::VfioArenaNotHuge { backing: arena.backing().describe() });
        }
        let device = VfioDevice::open(sysfs, bdf, container)?;
        container.map_arena(arena)?;
        Ok(VfioTransport { device, arena: Arc::clone(arena) })
    }

    /// The VFIO device (config space, reset, group).
    pub fn device(&self) -> &VfioDevice {
        &self.device
    }
}

impl Transport for VfioTransport {
    fn name(&self) -> &str {
        self.device.name()
    }

    #[inline]
    fn read32(&self, offset: usize) -> u32 {
        self.device.read32(offset)
    }

    #[inline]
    fn write32(&self, offset: usize, value: u32) {
        self.device.write32(offset, value);
    }

    #[inline]
    fn read64(&self, offset: usize) -> u64 {
        self.device.read64(offset)
    }

    #[inline]
    fn write64(&self, offset: usize, value: u64) {
        self.device.write64(offset, value);
    }

    fn arena(&self) -> &Arc<Arena> {
        &self.arena
    }

    fn reset(&self) -> Result<(), DriverError> {
        self.device.reset()
    }
}
