//! Host helpers: finding tools, running commands with their errors captured, cache keys, the cache directory.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::HarnessError;

/// Environment variable naming the cache directory.
pub const CACHE_ENV: &str = "NVSTACK_QEMU_CACHE";

/// The repository root (the workspace this crate belongs to).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// The cache directory: `$NVSTACK_QEMU_CACHE`, else `<repo>/.cache/qemu` (gitignored).
pub fn cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => repo_root().join(".cache").join("qemu"),
    }
}

/// Find `tool` in PATH or the sbin directories (root tools live there even when PATH lacks them).
///
/// # Errors
/// [`HarnessError::MissingTool`] naming `package`.
pub fn find_tool(tool: &str, package: &str) -> Result<PathBuf, HarnessError> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
    std::env::split_paths(&path)
        .chain(extra)
        .map(|d| d.join(tool))
        .find(|p| is_executable(p))
        .ok_or_else(|| HarnessError::MissingTool { tool: tool.to_string(), package: package.to_string() })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Run a command to completion and return its standard output.
///
/// # Errors
/// [`HarnessError::Spawn`] or, on a non-zero exit, [`HarnessError::Command`] with the tail of its stderr.
pub fn run(step: &str, cmd: &mut Command) -> Result<String, HarnessError> {
    let line = command_line(cmd);
    let out = cmd.stdin(std::process::Stdio::null()).output().map_err(|source| HarnessError::Spawn {
        step: step.into(),
        command: line.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(HarnessError::Command {
            step: step.into(),
            command: line,
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr), 20),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A command as one printable line.
pub fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program()).chain(cmd.get_args()).map(OsStr::to_string_lossy).collect::<Vec<_>>().join(" ")
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A cache key: FNV-1a (64 bit) over everything fed to it, each piece length-prefixed so that pieces cannot run
/// together. Not cryptographic; the inputs are our own files.
#[derive(Debug, Clone)]
pub struct KeyHasher(u64);

impl Default for KeyHasher {
    fn default() -> Self {
        KeyHasher(0xcbf2_9ce4_8422_2325)
    }
}

impl KeyHasher {
    fn bytes(&mut self, b: &[u8]) {
        for &x in b {
            self.0 ^= u64::from(x);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    /// Feed one piece.
    pub fn piece(&mut self, b: &[u8]) {
        self.bytes(&(b.len() as u64).to_le_bytes());
        self.bytes(b);
    }

    /// The key as 16 hex digits.
    pub fn hex(&self) -> String {
        format!("{:016x}", self.0)
    }
}

/// Write `data` to `path` atomically (a temporary file renamed over it), so that a concurrent or interrupted run
/// never sees half a cache entry.
///
/// # Errors
/// [`HarnessError::Io`].
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<(), HarnessError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, data).map_err(|e| HarnessError::io("writing cache file", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| HarnessError::io("renaming cache file", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_separates_pieces() {
        let mut a = KeyHasher::default();
        a.piece(b"ab");
        a.piece(b"c");
        let mut b = KeyHasher::default();
        b.piece(b"a");
        b.piece(b"bc");
        assert_ne!(a.hex(), b.hex());
        let mut c = KeyHasher::default();
        c.piece(b"ab");
        c.piece(b"c");
        assert_eq!(a.hex(), c.hex());
    }

    #[test]
    fn tail_and_tools() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert!(find_tool("sh", "dash").is_ok());
        let e = find_tool("no-such-tool-nvstack", "nvstack-pkg").unwrap_err().to_string();
        assert!(e.contains("nvstack-pkg"), "{e}");
    }

    #[test]
    fn run_reports_failures() {
        assert_eq!(run("t", Command::new("sh").args(["-c", "echo hi"])).unwrap(), "hi\n");
        let e = run("t", Command::new("sh").args(["-c", "echo bad >&2; exit 3"])).unwrap_err().to_string();
        assert!(e.contains("bad") && e.contains('3'), "{e}");
    }
}
