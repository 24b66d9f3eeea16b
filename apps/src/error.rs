//! The apps crate's one error type, with the exit status each variant maps to.

use nvstack_blockdev::BdevError;
use nvstack_driver::DriverError;

/// Failures of a subcommand.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Bad input from the command line or a config: exit status 2.
    #[error("{0}")]
    Usage(String),
    /// Setting up logging failed.
    #[error("logging: {0}")]
    Logging(String),
    /// A block-device step failed.
    #[error("block device")]
    Bdev(#[from] BdevError),
    /// A driver step failed.
    #[error("driver")]
    Driver(#[from] DriverError),
    /// Building a cache over a device failed.
    #[error("cache")]
    Cache(#[from] nvstack_cache::CacheError),
    /// Writing output failed.
    #[error("writing output")]
    Output(#[source] std::io::Error),
    /// Binding or accepting on a socket failed.
    #[error("listening on {what}")]
    Listen {
        /// The address or path.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A configuration file is unusable: exit status 2.
    #[error("config {path}: {reason}")]
    Config {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A run finished but found problems (verify mismatches, I/O errors).
    #[error("{0}")]
    Failed(String),
}

impl AppError {
    /// The process exit status: 2 for bad input, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            AppError::Usage(_) | AppError::Logging(_) | AppError::Config { .. } => 2,
            AppError::Bdev(BdevError::Spec { .. } | BdevError::Size { .. } | BdevError::CoreMask { .. }) => 2,
            AppError::Bdev(BdevError::FileOpen { .. } | BdevError::BlockSize { .. }) => 2,
            _ => 1,
        }
    }
}
