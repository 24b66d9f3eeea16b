//! VFIO: user-space access to a PCI function through the IOMMU. The only user of vfio-ioctls.
//!
//! - [`sysfs`]: PCI addresses, drivers, IOMMU groups, and the checks made before opening (each failure says what
//!   to do: no such device, bound to another driver, no IOMMU, group not viable, no permission, module missing).
//! - [`container`]: the container (type1v2) and the DMA map of the arena, once per container.
//! - [`device`]: one function: BAR0 mapped, config space, memory space and bus mastering on, function reset.
//! - `mmio`: the BAR's volatile accesses (all of this layer's MMIO, in one file).
//! - [`transport`]: [`VfioTransport`], the nvme `Transport` over VFIO.
//! - [`fake`]: a fake sysfs tree and kernel for tests on machines without an IOMMU.
//!
//! Bring-up order: [`VfioContainer::open`], [`VfioDevice::open`] (its group joins the container and sets the IOMMU
//! type), then [`VfioContainer::map_arena`]. [`VfioTransport::open`] does all three. The arena must be backed by
//! hugepages (`ArenaConfig { require_hugepages: true, .. }`).

pub mod container;
pub mod device;
pub mod fake;
mod mmio;
pub mod sysfs;
pub mod transport;

pub use container::VfioContainer;
pub use device::VfioDevice;
pub use sysfs::{check_vfio_ready, PciAddress, PciFunction, Sysfs, VfioReady};
pub use transport::VfioTransport;
