//! The polled NVMe driver: registers, queues, bring-up, admin and I/O over a [`Transport`].
//!
//! Files, one concern each: [`spec`] wire structs, [`regs`] MMIO, [`status`] completion status, [`prp`] data
//! pointers, [`qpair`] rings and command tables, [`ctrlr`] bring-up and admin, [`ns`] namespaces and command
//! builders, [`transport`] the seam, [`sim`] the simulated controller.

pub mod ctrlr;
pub mod ns;
pub mod prp;
pub mod qpair;
pub mod regs;
pub mod sim;
pub mod spec;
pub mod status;
pub mod transport;

pub use ctrlr::{AsyncEvent, Controller, CtrlrInfo, CtrlrOpts, EventDetail};
pub use ns::{Namespace, NvmOp};
pub use qpair::{IoCmd, IoFailure, IoQpair, QpairOpts, SubmitFail};
pub use status::NvmeStatus;
pub use transport::Transport;
