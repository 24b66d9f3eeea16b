//! nvstack system tests: the QEMU emulation harness.
//!
//! A scenario (a TOML file in `tests/scenarios/`, format in tests/README.md) describes an emulated machine with
//! NVMe controllers and NVDIMMs and the steps to run in it. The harness prepares a Debian kernel and an initramfs
//! holding the project's binaries, boots a fresh TCG guest per scenario, follows the markers the guest prints,
//! injects machine checks over QMP when asked, and fails with the console log when anything goes wrong.

pub mod cpio;
pub mod error;
pub mod guest;
pub mod host;
pub mod initramfs;
pub mod kernel;
pub mod marker;
pub mod qemu;
pub mod qmp;
pub mod runner;
pub mod scenario;

pub use error::HarnessError;
