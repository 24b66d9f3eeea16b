//! `nvstack perf`: the equivalent of spdk_nvme_perf and bdevperf, on any bdev.

use std::process::ExitCode;

use crate::cli::GlobalOpts;
use crate::error::AppError;

/// Arguments of `nvstack perf`.
#[derive(Debug, clap::Args)]
pub struct PerfArgs {}

/// Run `nvstack perf`.
///
/// # Errors
/// As the run goes.
pub fn run(_args: PerfArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    Err(AppError::Failed("nvstack perf: being built".into()))
}
