//! `nvstack rpc METHOD [PARAMS]`: a JSON-RPC 2.0 client for the appliance's Unix socket (as SPDK's rpc.py).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::{json, Value};

use crate::cli::GlobalOpts;
use crate::error::AppError;

/// Arguments of `nvstack rpc`.
#[derive(Debug, clap::Args)]
pub struct RpcArgs {
    /// The RPC socket (as rpc.py -s).
    #[arg(short = 's', long = "server", default_value = "./nvstack-data/nvstack.sock")]
    pub socket: PathBuf,
    /// Seconds to wait for the answer.
    #[arg(short = 't', long = "timeout", default_value_t = 60)]
    pub timeout_s: u64,
    /// The method (bdev_get_bdevs, save_config, nvstack_export_list, rpc_get_methods...).
    pub method: String,
    /// Parameters as one JSON object, e.g. '{"name":"Malloc0","num_blocks":32768,"block_size":512}'.
    pub params: Option<String>,
}

/// Send one request and print the result (pretty JSON) or the error.
///
/// # Errors
/// [`AppError::Usage`] for bad params JSON, [`AppError::Failed`] for a connection failure or an error reply.
pub fn run(args: RpcArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    let params: Option<Value> = match &args.params {
        Some(p) => Some(serde_json::from_str(p).map_err(|e| AppError::Usage(format!("params are not valid JSON: {e}")))?),
        None => None,
    };
    let mut req = json!({"jsonrpc": "2.0", "method": args.method, "id": 1});
    if let Some(p) = params {
        req["params"] = p;
    }
    let mut s = UnixStream::connect(&args.socket).map_err(|e| {
        AppError::Failed(format!("cannot connect to {}: {e} (is `nvstack serve` running? -s sets the socket)", args.socket.display()))
    })?;
    let t = Duration::from_secs(args.timeout_s.max(1));
    let _ = s.set_read_timeout(Some(t));
    s.write_all(req.to_string().as_bytes()).map_err(AppError::Output)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let reply: Value = loop {
        let n = s.read(&mut chunk).map_err(|e| AppError::Failed(format!("reading the answer: {e}")))?;
        if n == 0 {
            return Err(AppError::Failed("the server closed the connection without an answer".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        match serde_json::from_slice::<Value>(&buf) {
            Ok(v) => break v,
            Err(e) if e.is_eof() => continue,
            Err(e) => return Err(AppError::Failed(format!("bad answer: {e}"))),
        }
    };
    if let Some(err) = reply.get("error") {
        let code = err.get("code").and_then(Value::as_i64).unwrap_or(0);
        let msg = err.get("message").and_then(Value::as_str).unwrap_or("");
        return Err(AppError::Failed(format!("{} failed: {msg} (code {code})", args.method)));
    }
    let result = reply.get("result").cloned().unwrap_or(Value::Null);
    let text = serde_json::to_string_pretty(&result).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Ok(()) => Ok(ExitCode::SUCCESS),
        // A reader that stopped early (`| head`, `| grep -q`) is not an error of ours.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(ExitCode::SUCCESS),
        Err(e) => Err(AppError::Output(e)),
    }
}
