//! `nvstack setup` (being built in the NVMe issue).

use std::process::ExitCode;

use crate::cli::GlobalOpts;
use crate::error::AppError;

/// Arguments of `nvstack setup`.
#[derive(Debug, clap::Args)]
pub struct SetupArgs {}

/// Run `nvstack setup`.
///
/// # Errors
/// Always, until the NVMe driver lands: it says so.
pub fn run(_args: SetupArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    Err(AppError::Failed("nvstack setup: not available in this build yet (NVMe driver issue)".into()))
}
