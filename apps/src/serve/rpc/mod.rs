//! JSON-RPC 2.0 over a Unix socket, with SPDK's method names and parameter shapes where a method exists.
//!
//! Framing follows SPDK's `rpc.py`: each request is one JSON object; the server parses objects from the byte
//! stream as they complete and answers each with one JSON object followed by a newline.

pub mod methods;
pub mod nvme;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use crate::error::AppError;
pub use methods::{call, Appliance};

/// JSON-RPC error codes.
pub mod code {
    /// Parse error.
    pub const PARSE_ERROR: i64 = -32700;
    /// Invalid request.
    pub const INVALID_REQUEST: i64 = -32600;
    /// Method not found.
    pub const METHOD_NOT_FOUND: i64 = -32601;
    /// Invalid params.
    pub const INVALID_PARAMS: i64 = -32602;
    /// SPDK's "no such device" (-ENODEV).
    pub const NO_DEVICE: i64 = -19;
    /// SPDK's "exists" (-EEXIST).
    pub const EXISTS: i64 = -17;
    /// SPDK's "busy" (-EBUSY).
    pub const BUSY: i64 = -16;
    /// "Not permitted" (-EPERM): a test aid that serve was not started to allow.
    pub const NOT_PERMITTED: i64 = -1;
    /// "Not supported" (-EOPNOTSUPP): the feature is off in this serve.
    pub const NOT_SUPPORTED: i64 = -95;
    /// "I/O error" (-EIO): a test aid's event did not arrive.
    pub const IO_ERROR: i64 = -5;
}

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcError {
    /// Code.
    pub code: i64,
    /// Message.
    pub message: String,
}

impl RpcError {
    /// An error with a code and message.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        RpcError { code, message: message.into() }
    }
    /// -32602.
    pub fn params(message: impl Into<String>) -> Self {
        Self::new(code::INVALID_PARAMS, message)
    }
}

/// Largest request accepted (bytes).
const MAX_REQUEST_BYTES: usize = 1 << 20;
/// A connection idle this long is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// Answer one parsed request value (None for a notification).
pub fn handle_value(app: &Appliance, v: Value) -> Option<Value> {
    let Value::Object(obj) = v else {
        return Some(error_reply(Value::Null, RpcError::new(code::INVALID_REQUEST, "a request is a JSON object")));
    };
    let id = obj.get("id").cloned();
    if obj.get("jsonrpc").and_then(Value::as_str) != Some("2.0") {
        return Some(error_reply(id.unwrap_or(Value::Null), RpcError::new(code::INVALID_REQUEST, "\"jsonrpc\" must be \"2.0\"")));
    }
    let Some(method) = obj.get("method").and_then(Value::as_str) else {
        return Some(error_reply(id.unwrap_or(Value::Null), RpcError::new(code::INVALID_REQUEST, "\"method\" must be a string")));
    };
    let params = obj.get("params").cloned();
    let res = call(app, method, params);
    let id = id?;
    Some(match res {
        Ok(result) => json!({"jsonrpc": "2.0", "id": id, "result": result}),
        Err(e) => error_reply(id, e),
    })
}

fn error_reply(id: Value, e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}

fn serve_conn(app: &Appliance, mut s: UnixStream, stop: &AtomicBool) {
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 8192];
    let mut idle = Duration::ZERO;
    loop {
        // Answer every complete value in the buffer.
        loop {
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<Value>();
            match it.next() {
                Some(Ok(v)) => {
                    let used = it.byte_offset();
                    buf.drain(..used);
                    if let Some(reply) = handle_value(app, v) {
                        let mut out = reply.to_string().into_bytes();
                        out.push(b'\n');
                        if s.write_all(&out).is_err() {
                            return;
                        }
                    }
                }
                Some(Err(e)) if e.is_eof() => break,
                Some(Err(e)) => {
                    let reply = error_reply(Value::Null, RpcError::new(code::PARSE_ERROR, format!("parse error: {e}")));
                    let _ = s.write_all(format!("{reply}\n").as_bytes());
                    return;
                }
                None => {
                    buf.clear();
                    break;
                }
            }
        }
        if stop.load(Ordering::Acquire) || idle > IDLE_TIMEOUT {
            return;
        }
        match s.read(&mut chunk) {
            Ok(0) => return,
            Ok(n) => {
                idle = Duration::ZERO;
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() > MAX_REQUEST_BYTES {
                    let reply = error_reply(Value::Null, RpcError::new(code::INVALID_REQUEST, "request larger than 1 MiB"));
                    let _ = s.write_all(format!("{reply}\n").as_bytes());
                    return;
                }
            }
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                idle += Duration::from_millis(200);
            }
            Err(_) => return,
        }
    }
}

/// The running RPC server.
#[derive(Debug)]
pub struct RpcServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

impl RpcServer {
    /// Bind `path` and serve requests on a thread (one more thread per client connection).
    ///
    /// # Errors
    /// [`AppError::Listen`] when the socket cannot be bound.
    pub fn start(path: &Path, app: Arc<Appliance>) -> Result<RpcServer, AppError> {
        if path.exists() {
            use std::os::unix::fs::FileTypeExt;
            if std::fs::symlink_metadata(path).map(|m| m.file_type().is_socket()).unwrap_or(false) {
                let _ = std::fs::remove_file(path);
            }
        }
        let l = UnixListener::bind(path).map_err(|source| AppError::Listen { what: path.display().to_string(), source })?;
        l.set_nonblocking(true).map_err(|source| AppError::Listen { what: path.display().to_string(), source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("rpc".into())
            .spawn(move || {
                let mut workers: Vec<JoinHandle<()>> = Vec::new();
                while !st.load(Ordering::Acquire) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let app = Arc::clone(&app);
                            let st2 = Arc::clone(&st);
                            if let Ok(h) = std::thread::Builder::new().name("rpc-conn".into()).spawn(move || serve_conn(&app, s, &st2)) {
                                workers.push(h);
                            }
                            workers.retain(|h| !h.is_finished());
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                for h in workers {
                    let _ = h.join();
                }
            })
            .map_err(|source| AppError::Listen { what: "rpc thread".into(), source })?;
        Ok(RpcServer { stop, thread: Some(thread), path: path.to_path_buf() })
    }

    /// Stop serving and remove the socket.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for RpcServer {
    fn drop(&mut self) {
        self.stop();
    }
}
