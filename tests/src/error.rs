//! The harness's one error type. Each variant names the step that failed and carries what it was working on.

use std::path::PathBuf;

/// Failures of the QEMU harness itself (preparing, booting, talking to QEMU). A scenario whose guest steps fail is
/// not an error of this type: it is a failed [`crate::runner::Outcome`].
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// A scenario file could not be read.
    #[error("reading scenario {path}")]
    ScenarioRead {
        /// The scenario file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A scenario file is not valid TOML for the scenario format.
    #[error("parsing scenario {path}")]
    ScenarioParse {
        /// The scenario file.
        path: PathBuf,
        /// What failed.
        #[source]
        source: toml::de::Error,
    },
    /// A scenario parsed but says something impossible.
    #[error("scenario {path}: {reason}")]
    ScenarioInvalid {
        /// The scenario file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A host tool the harness needs is not installed.
    #[error("{tool} not found in PATH: install the Debian package {package} (scripts/install-deps.sh does)")]
    MissingTool {
        /// The program looked for.
        tool: String,
        /// The Debian package that provides it.
        package: String,
    },
    /// A host command ran and failed.
    #[error("{step}: `{command}` failed ({status}): {stderr}")]
    Command {
        /// What the harness was doing.
        step: String,
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// The tail of its standard error.
        stderr: String,
    },
    /// A host command could not be started.
    #[error("{step}: cannot run `{command}`")]
    Spawn {
        /// What the harness was doing.
        step: String,
        /// The command line.
        command: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// A file system operation failed.
    #[error("{step}: {path}")]
    Io {
        /// What the harness was doing.
        step: String,
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// Something the harness expected on this host or in the kernel tree is not there.
    #[error("{0}")]
    Environment(String),
    /// Talking to QEMU's monitor (QMP) failed.
    #[error("QMP {step}: {reason}")]
    Qmp {
        /// The QMP exchange.
        step: String,
        /// What went wrong.
        reason: String,
    },
    /// A selected scenario does not exist.
    #[error("no scenario named {0:?} (see --list)")]
    UnknownScenario(String),
}

impl HarnessError {
    /// Wrap an I/O error with the step and the path it concerned.
    pub fn io(step: &str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        HarnessError::Io { step: step.to_string(), path: path.into(), source }
    }
}
