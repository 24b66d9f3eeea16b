//! One PCI function opened through VFIO: its group joined to a container, BAR0 mapped, config space reachable,
//! bus mastering on, and a function reset.

use std::fs::File;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    VFIO_BASE, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX, VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE,
};
use vfio_ioctls::VfioRegionInfoCap;

use super::container::{classify_open, VfioContainer};
use super::mmio::{Bar, MappedBar};
use super::sysfs::{check_vfio_ready, PciAddress, Sysfs};
use crate::DriverError;

/// PCI config space: the command register (PCI Local Bus 3.0, 6.2.2).
pub const PCI_COMMAND: u64 = 0x04;
/// Command register: respond to memory-space accesses (BARs).
pub const PCI_COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA).
pub const PCI_COMMAND_MASTER: u16 = 1 << 2;
/// Command register: legacy INTx disabled (nvstack polls).
pub const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// `VFIO_DEVICE_RESET`: `_IO(VFIO_TYPE, VFIO_BASE + 11)` (linux/vfio.h). `_IO` has no direction or size bits.
const VFIO_DEVICE_RESET: libc::c_ulong = ((VFIO_TYPE as libc::c_ulong) << 8) | (VFIO_BASE as libc::c_ulong + 11);

/// The smallest BAR0 an NVMe controller can have: registers up to 0x1000 and the admin doorbells.
pub const NVME_BAR0_MIN_BYTES: u64 = 0x1008;

/// A PCI function opened through VFIO.
///
/// Field order is drop order: the BAR mapping goes first, then our hold on the container (which unmaps the arena
/// while the group is still attached, when this is the last user), then the vfio-ioctls device (which closes the
/// device and detaches the group).
pub struct VfioDevice {
    bar0: Bar,
    config: File,
    config_offset: u64,
    config_size: u64,
    container: Arc<VfioContainer>,
    dev: vfio_ioctls::VfioDevice,
    bdf: PciAddress,
    name: String,
    group: u32,
}

impl std::fmt::Debug for VfioDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioDevice")
            .field("bdf", &self.name)
            .field("group", &self.group)
            .field("bar0_bytes", &self.bar0.size())
            .field("bar0_mapped_bytes", &self.bar0.mapped_len())
            .finish()
    }
}

fn open_err(bdf: PciAddress, step: &'static str, e: vfio_ioctls::VfioError, sysfs: &Sysfs, group: u32) -> DriverError {
    let name = bdf.to_string();
    match e {
        vfio_ioctls::VfioError::OpenGroup(io, g) => {
            classify_open(&name, &std::path::Path::new("/dev/vfio").join(g), io)
        }
        vfio_ioctls::VfioError::GroupViable => {
            let others = super::sysfs::group_blockers(sysfs, bdf, group)
                .map(
                    |b| if b.is_empty() { "another function of the group is in use".to_string() } else { b.join(", ") },
                )
                .unwrap_or_else(|e| format!("its members could not be read ({e})"));
            DriverError::VfioGroupNotViable { bdf: name, group, others }
        }
        other => DriverError::VfioOpen { bdf: name, step, source: other },
    }
}

/// Which part of BAR0 to map: the whole region, or the sparse-mmap area that starts at offset 0.
fn mappable_prefix(dev: &vfio_ioctls::VfioDevice, index: u32, size: u64) -> u64 {
    if dev.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
        return 0;
    }
    for cap in dev.get_region_caps(index) {
        if let VfioRegionInfoCap::SparseMmap(s) = cap {
            return s.areas.iter().find(|a| a.offset == 0).map_or(0, |a| a.size.min(size));
        }
    }
    size
}

impl VfioDevice {
    /// Open `bdf` into `container`: check sysfs (bound to vfio-pci, IOMMU group, viable group, permission), get the
    /// device, map BAR0, and turn on memory space and bus mastering.
    ///
    /// # Errors
    /// The sysfs errors of [`check_vfio_ready`]; [`DriverError::VfioOpen`] for a failed VFIO step;
    /// [`DriverError::VfioBar`] / [`DriverError::VfioMmap`] when BAR0 cannot be used;
    /// [`DriverError::VfioConfig`] when config space cannot be written.
    pub fn open(sysfs: &Sysfs, bdf: PciAddress, container: &Arc<VfioContainer>) -> Result<VfioDevice, DriverError> {
        let ready = check_vfio_ready(sysfs, bdf)?;
        let name = bdf.to_string();
        let dev = vfio_ioctls::VfioDevice::new(&sysfs.device_dir(bdf), container.ops(), false)
            .map_err(|e| open_err(bdf, "opening the group and device", e, sysfs, ready.group))?;

        // A second handle on the device file, for pread/pwrite with errors reported (vfio-ioctls' region_read
        // and region_write log and drop them).
        // SAFETY: the raw fd belongs to `dev`, which is alive for this statement; try_clone_to_owned dup()s it, so
        // the File we keep owns its own descriptor.
        let config: File =
            unsafe { BorrowedFd::borrow_raw(dev.as_raw_fd()) }.try_clone_to_owned().map(File::from).map_err(|e| {
                DriverError::VfioConfig { bdf: name.clone(), op: "dup of the device file", offset: 0, source: e }
            })?;

        let index = VFIO_PCI_BAR0_REGION_INDEX;
        let size = dev.get_region_size(index);
        if size < NVME_BAR0_MIN_BYTES {
            return Err(DriverError::VfioBar {
                bdf: name,
                index,
                reason: format!("{size} bytes, an NVMe BAR0 needs at least {NVME_BAR0_MIN_BYTES}"),
            });
        }
        let offset = dev.get_region_offset(index);
        let prefix = mappable_prefix(&dev, index, size);
        let map = if prefix > 0 {
            let len = usize::try_from(prefix).map_err(|_| DriverError::VfioBar {
                bdf: name.clone(),
                index,
                reason: format!("{prefix} bytes do not fit the address space"),
            })?;
            Some(MappedBar::map(&config, offset, len).map_err(|source| DriverError::VfioMmap {
                bdf: name.clone(),
                index,
                size_bytes: prefix,
                source,
            })?)
        } else {
            tracing::warn!(bdf = %name, "BAR0 is not mappable: register access goes through the device file (slow)");
            None
        };
        let bar_file = config.try_clone().map_err(|e| DriverError::VfioConfig {
            bdf: name.clone(),
            op: "dup of the device file",
            offset: 0,
            source: e,
        })?;
        let bar0 = Bar::new(map, bar_file, offset, size);

        let cfg_index = VFIO_PCI_CONFIG_REGION_INDEX;
        let d = VfioDevice {
            bar0,
            config,
            config_offset: dev.get_region_offset(cfg_index),
            config_size: dev.get_region_size(cfg_index),
            container: Arc::clone(container),
            dev,
            bdf,
            name,
            group: ready.group,
        };
        d.enable()?;
        tracing::info!(bdf = %d.name, group = d.group, bar0_bytes = size, mapped_bytes = prefix, "VFIO device open");
        Ok(d)
    }

    /// The PCI address.
    pub fn bdf(&self) -> PciAddress {
        self.bdf
    }

    /// The PCI address as text ("0000:00:04.0").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IOMMU group.
    pub fn group(&self) -> u32 {
        self.group
    }

    /// The container the device is in.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// BAR0 size in bytes.
    pub fn bar0_size(&self) -> u64 {
        self.bar0.size()
    }

    /// 32-bit read of BAR0 (all ones when the device is gone).
    #[inline]
    pub fn read32(&self, offset: usize) -> u32 {
        self.bar0.read32(offset)
    }

    /// 32-bit write of BAR0.
    #[inline]
    pub fn write32(&self, offset: usize, value: u32) {
        self.bar0.write32(offset, value);
    }

    /// 64-bit read of BAR0 (low then high).
    #[inline]
    pub fn read64(&self, offset: usize) -> u64 {
        self.bar0.read64(offset)
    }

    /// 64-bit write of BAR0 (low then high).
    #[inline]
    pub fn write64(&self, offset: usize, value: u64) {
        self.bar0.write64(offset, value);
    }

    fn config_at(&self, offset: u64, width: u64) -> Option<u64> {
        (offset.checked_add(width)? <= self.config_size).then(|| self.config_offset.checked_add(offset)).flatten()
    }

    /// Read a 16-bit config-space register.
    ///
    /// # Errors
    /// [`DriverError::VfioConfig`] when the read fails or is out of range.
    pub fn config_read16(&self, offset: u64) -> Result<u16, DriverError> {
        let err = |source| DriverError::VfioConfig { bdf: self.name.clone(), op: "read", offset, source };
        let at =
            self.config_at(offset, 2).ok_or_else(|| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
        let mut b = [0u8; 2];
        self.config.read_exact_at(&mut b, at).map_err(err)?;
        Ok(u16::from_le_bytes(b))
    }

    /// Write a 16-bit config-space register.
    ///
    /// # Errors
    /// [`DriverError::VfioConfig`] when the write fails or is out of range.
    pub fn config_write16(&self, offset: u64, value: u16) -> Result<(), DriverError> {
        let err = |source| DriverError::VfioConfig { bdf: self.name.clone(), op: "write", offset, source };
        let at =
            self.config_at(offset, 2).ok_or_else(|| err(std::io::Error::from(std::io::ErrorKind::InvalidInput)))?;
        self.config.write_all_at(&value.to_le_bytes(), at).map_err(err)
    }

    /// Turn on memory space and bus mastering (and turn off INTx: nvstack polls). Needed after open and after a
    /// reset: with memory space off, the kernel faults BAR accesses with SIGBUS.
    ///
    /// # Errors
    /// [`DriverError::VfioConfig`] when config space cannot be read or written, or the bits do not stick.
    pub fn enable(&self) -> Result<(), DriverError> {
        let cmd = self.config_read16(PCI_COMMAND)?;
        let want = cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE;
        if want != cmd {
            self.config_write16(PCI_COMMAND, want)?;
        }
        let now = self.config_read16(PCI_COMMAND)?;
        let need = PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER;
        if now & need != need {
            return Err(DriverError::VfioConfig {
                bdf: self.name.clone(),
                op: "write (memory space and bus master did not stick)",
                offset: PCI_COMMAND,
                source: std::io::Error::other(format!("command register reads {now:#06x}")),
            });
        }
        tracing::debug!(bdf = %self.name, command = now, "memory space and bus mastering on");
        Ok(())
    }

    /// Whether bus mastering is on.
    ///
    /// # Errors
    /// [`DriverError::VfioConfig`] when config space cannot be read.
    pub fn bus_master_enabled(&self) -> Result<bool, DriverError> {
        Ok(self.config_read16(PCI_COMMAND)? & PCI_COMMAND_MASTER != 0)
    }

    /// Reset the function (`VFIO_DEVICE_RESET`: FLR or another method the kernel picks), then turn memory space and
    /// bus mastering back on. The controller is disabled afterwards; the NVMe layer brings it up again.
    ///
    /// # Errors
    /// [`DriverError::VfioReset`] when the kernel refuses (no reset method: ENOTTY/EINVAL); the errors of
    /// [`VfioDevice::enable`].
    pub fn reset(&self) -> Result<(), DriverError> {
        // SAFETY: VFIO_DEVICE_RESET takes no argument; the fd is the open VFIO device file owned by `self.dev`.
        let rc = unsafe { libc::ioctl(self.dev.as_raw_fd(), VFIO_DEVICE_RESET as _) };
        if rc != 0 {
            return Err(DriverError::VfioReset { bdf: self.name.clone(), source: std::io::Error::last_os_error() });
        }
        tracing::info!(bdf = %self.name, "function reset");
        self.enable()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_ioctl_number_matches_linux() {
        // linux/vfio.h: VFIO_DEVICE_RESET = _IO(';', 100 + 11) = 0x3b6f.
        assert_eq!(VFIO_DEVICE_RESET, 0x3b6f);
    }
}
