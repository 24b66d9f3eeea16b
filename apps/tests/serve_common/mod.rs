//! Shared helpers for the serve tests: start `nvstack serve` in a temporary data dir, wait until it is ready,
//! stop it, and insist that the client tools exist (a missing tool fails the test with the package to install).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_nvstack");

/// Fail (never skip) when a client tool is missing.
pub fn need(tool: &str, package: &str) {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).output().map(|o| o.status.success()).unwrap_or(false);
    assert!(ok, "{tool} is missing: install the Debian package {package} (listed in .ci/packages/serve.txt; scripts/install-deps.sh)");
}

pub struct Server {
    pub child: Child,
    pub dir: PathBuf,
    pub nbd_sock: PathBuf,
    pub rpc_sock: PathBuf,
    pub port: Option<u16>,
    pub banner: String,
}

static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Remove the data dirs of test processes that are gone (`nvstack-test-TAG-PID-N` with no /proc/PID): a test dir is
/// kept after its test (a failed run's logs and images are there to read), so without this repeated runs on one
/// machine fill its disk (the serve suite leaves ~0.8 GB per run).
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("nvstack-test-") else { continue };
        let mut fields = rest.rsplit('-');
        let (Some(_n), Some(pid)) = (fields.next(), fields.next()) else { continue };
        let Ok(pid) = pid.parse::<u32>() else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

pub fn tmpdir(tag: &str) -> PathBuf {
    static SWEEP: std::sync::Once = std::sync::Once::new();
    SWEEP.call_once(sweep_stale_dirs);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("nvstack-test-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

impl Server {
    /// Start with extra args, in a fresh data dir; TCP on a free port.
    pub fn start(tag: &str, extra: &[&str]) -> Server {
        Self::start_in(&tmpdir(tag), extra)
    }

    pub fn start_in(dir: &Path, extra: &[&str]) -> Server {
        let mut cmd = Command::new(BIN);
        cmd.arg("serve").arg("--data-dir").arg(dir).args(["--port", "0", "--no-pin", "--max-connections", "12"]);
        cmd.args(extra).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn nvstack serve");
        let stdout = child.stdout.take().unwrap();
        // Drain stderr (into a file in the data dir) so a chatty server never blocks on a full pipe.
        let mut stderr = child.stderr.take().unwrap();
        let log_path = dir.join("serve.log");
        std::thread::spawn(move || {
            if let Ok(mut f) = std::fs::File::create(&log_path) {
                let _ = std::io::copy(&mut stderr, &mut f);
            }
        });
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut banner = String::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                banner.push_str(&line);
                banner.push('\n');
                if line.contains("nvstack serve: ready") {
                    let _ = tx.send(banner.clone());
                }
            }
        });
        let banner = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(b) => b,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(200));
                let err = std::fs::read_to_string(dir.join("serve.log")).unwrap_or_default();
                panic!("nvstack serve did not become ready in 30 s; stderr:\n{err}");
            }
        };
        let port = banner
            .lines()
            .find_map(|l| l.split("nbd://127.0.0.1:").nth(1))
            .and_then(|r| r.split('/').next())
            .and_then(|p| p.parse().ok());
        Server { child, dir: dir.to_path_buf(), nbd_sock: dir.join("nbd.sock"), rpc_sock: dir.join("nvstack.sock"), port, banner }
    }

    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.nbd_sock.display())
    }

    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{export}", self.port.expect("tcp port"))
    }

    /// One JSON-RPC call; returns the whole reply object.
    pub fn rpc(&self, method: &str, params: serde_json::Value) -> serde_json::Value {
        rpc_call(&self.rpc_sock, method, params)
    }

    /// SIGTERM and wait (20 s) for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        // SAFETY: sending SIGTERM to our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(Instant::now() < deadline, "nvstack serve did not exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn rpc_call(sock: &Path, method: &str, params: serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(sock).expect("connect rpc socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = serde_json::json!({"jsonrpc": "2.0", "method": method, "params": params, "id": 1});
    s.write_all(req.to_string().as_bytes()).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    loop {
        let n = s.read(&mut chunk).expect("rpc read");
        assert!(n > 0, "rpc connection closed without an answer");
        buf.extend_from_slice(&chunk[..n]);
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&buf) {
            return v;
        }
    }
}

/// Run a command, assert success, return stdout.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A minimal NBD client (fixed newstyle, OPT_GO, structured replies) for protocol-level tests.
pub struct RawClient {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
}

pub fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b[..4].try_into().unwrap())
}
pub fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

impl RawClient {
    pub fn connect(sock: &Path, export: &str, structured: bool) -> RawClient {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        s.write_all(&1u32.to_be_bytes()).unwrap();
        let opt = |s: &mut UnixStream, o: u32, data: &[u8]| {
            let mut v = b"IHAVEOPT".to_vec();
            v.extend_from_slice(&o.to_be_bytes());
            v.extend_from_slice(&(data.len() as u32).to_be_bytes());
            v.extend_from_slice(data);
            s.write_all(&v).unwrap();
        };
        let read_reply = |s: &mut UnixStream| -> (u32, Vec<u8>) {
            let mut h = [0u8; 20];
            s.read_exact(&mut h).unwrap();
            let t = be32(&h[12..]);
            let mut d = vec![0u8; be32(&h[16..]) as usize];
            s.read_exact(&mut d).unwrap();
            (t, d)
        };
        if structured {
            opt(&mut s, 8, &[]);
            assert_eq!(read_reply(&mut s).0, 1);
        }
        let mut d = (export.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(export.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        opt(&mut s, 7, &d);
        let (mut size, mut flags) = (0, 0);
        loop {
            let (t, d) = read_reply(&mut s);
            if t == 3 && u16::from_be_bytes([d[0], d[1]]) == 0 {
                size = be64(&d[2..]);
                flags = u16::from_be_bytes([d[10], d[11]]);
            }
            if t == 1 {
                break;
            }
            assert!(t & 0x8000_0000 == 0, "GO failed with reply type {t:#x}");
        }
        RawClient { s, size, flags }
    }

    pub fn send(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        self.s.write_all(&v).unwrap();
    }

    /// Send, reporting a broken connection instead of panicking.
    pub fn try_send(&mut self, flags: u16, kind: u16, handle: u64, offset: u64, len: u32, payload: &[u8]) -> std::io::Result<()> {
        let mut v = 0x2560_9513u32.to_be_bytes().to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&handle.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v.extend_from_slice(payload);
        self.s.write_all(&v)
    }

    /// One simple reply (error, handle), reporting a broken connection instead of panicking.
    pub fn try_simple_reply(&mut self) -> std::io::Result<(u32, u64)> {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        if be32(&r) != 0x6744_6698 {
            return Err(std::io::Error::other("not a simple reply"));
        }
        Ok((be32(&r[4..]), be64(&r[8..])))
    }

    /// Read one simple reply (or a structured chunk); returns (error, handle, payload).
    pub fn reply(&mut self) -> (u32, u64, Vec<u8>) {
        let mut m = [0u8; 4];
        self.s.read_exact(&mut m).unwrap();
        match be32(&m) {
            0x6744_6698 => {
                let mut r = [0u8; 12];
                self.s.read_exact(&mut r).unwrap();
                (be32(&r), be64(&r[4..]), Vec::new())
            }
            0x668e_33ef => {
                let mut r = [0u8; 16];
                self.s.read_exact(&mut r).unwrap();
                let kind = u16::from_be_bytes([r[2], r[3]]);
                let handle = be64(&r[4..]);
                let mut p = vec![0u8; be32(&r[12..]) as usize];
                self.s.read_exact(&mut p).unwrap();
                let err = if kind & 0x8000 != 0 { be32(&p) } else { 0 };
                (err, handle, p)
            }
            other => panic!("bad reply magic {other:#x}"),
        }
    }
}
