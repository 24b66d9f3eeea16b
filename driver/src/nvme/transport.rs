//! The transport seam: how the controller code reaches BAR0 and the DMA arena.
//!
//! Two implementations: VFIO PCIe (`crate::vfio`) and the in-process simulator (`super::sim`). The controller
//! code (`ctrlr.rs`, `qpair.rs`) sees only this trait, so every fault the simulator injects reaches exactly the
//! code that runs against real hardware.

/// The register and DMA seam under the controller code: VFIO PCIe or the simulator.
pub trait Transport: Send + Sync {
    /// Name for logs and errors (PCI address such as "0000:00:04.0", or "sim0").
    fn name(&self) -> &str;
    /// 32-bit read of BAR0 at `offset`. All ones means the device is gone.
    fn read32(&self, offset: usize) -> u32;
    /// 32-bit write of BAR0 at `offset`.
    fn write32(&self, offset: usize, value: u32);
    /// 64-bit read of BAR0 at `offset` (two 32-bit reads, low then high, where the device needs it).
    fn read64(&self, offset: usize) -> u64;
    /// 64-bit write of BAR0 at `offset`.
    fn write64(&self, offset: usize, value: u64);
    /// The DMA arena the device can reach; IOVA = arena guest address (nvstack_driver::dma).
    fn arena(&self) -> &std::sync::Arc<crate::dma::Arena>;
    /// Reset the function (PCI function-level reset, or the simulator's reset).
    fn reset(&self) -> Result<(), crate::DriverError>;
}
