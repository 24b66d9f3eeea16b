//! `nvstack identify` (being built in the NVMe issue).

use std::process::ExitCode;

use crate::cli::GlobalOpts;
use crate::error::AppError;

/// Arguments of `nvstack identify`.
#[derive(Debug, clap::Args)]
pub struct IdentifyArgs {}

/// Run `nvstack identify`.
///
/// # Errors
/// Always, until the NVMe driver lands: it says so.
pub fn run(_args: IdentifyArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    Err(AppError::Failed("nvstack identify: not available in this build yet (NVMe driver issue)".into()))
}
