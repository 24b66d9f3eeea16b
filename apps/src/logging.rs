//! The tracing subscriber: set up once, here, and nowhere else.

use tracing_subscriber::EnvFilter;

use crate::cli::{GlobalOpts, LogFormat};
use crate::error::AppError;

/// Install the global subscriber: `RUST_LOG` if set, else a level from `-v`; text or JSON lines on stderr.
///
/// # Errors
/// [`AppError::Logging`] if `RUST_LOG` does not parse or a subscriber is already set.
pub fn init(g: &GlobalOpts) -> Result<(), AppError> {
    let default = match g.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = match std::env::var("RUST_LOG") {
        Ok(s) if !s.is_empty() => EnvFilter::try_new(&s).map_err(|e| AppError::Logging(format!("RUST_LOG={s:?}: {e}")))?,
        _ => EnvFilter::new(default),
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let res = match g.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    res.map_err(|e| AppError::Logging(e.to_string()))
}
