//! A QMP client over a Unix socket (docs/interop/qmp-spec.rst): one JSON object per line; the server greets,
//! `qmp_capabilities` leaves negotiation mode, then each command gets one `return` or `error`, with asynchronous
//! `event`s in between. Every read has a deadline.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::error::HarnessError;

/// A connected, negotiated QMP session.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    pending: Vec<u8>,
    /// Events received while waiting for replies (their `event` names).
    pub events: Vec<String>,
}

fn qerr(step: &str, reason: impl Into<String>) -> HarnessError {
    HarnessError::Qmp { step: step.to_string(), reason: reason.into() }
}

impl Qmp {
    /// Read the greeting from `stream` and negotiate capabilities, by `deadline`.
    ///
    /// # Errors
    /// [`HarnessError::Qmp`] when QEMU does not greet or refuses, or the deadline passes.
    pub fn handshake(stream: UnixStream, deadline: Instant) -> Result<Qmp, HarnessError> {
        let writer = stream.try_clone().map_err(|e| qerr("connect", e.to_string()))?;
        let mut q = Qmp { reader: BufReader::new(stream), writer, pending: Vec::new(), events: Vec::new() };
        let greeting = q.read_message("greeting", deadline)?;
        if greeting.get("QMP").is_none() {
            return Err(qerr("greeting", format!("unexpected first message {greeting}")));
        }
        q.execute("qmp_capabilities", None, deadline)?;
        Ok(q)
    }

    fn read_message(&mut self, step: &str, deadline: Instant) -> Result<Value, HarnessError> {
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(qerr(step, "no answer before the deadline"));
            }
            let left = (deadline - now).max(Duration::from_millis(1));
            self.reader.get_ref().set_read_timeout(Some(left)).map_err(|e| qerr(step, e.to_string()))?;
            // Partial lines stay in `pending` across timeouts.
            match self.reader.read_until(b'\n', &mut self.pending) {
                Ok(0) => return Err(qerr(step, "QEMU closed the monitor")),
                Ok(_) if self.pending.ends_with(b"\n") => {
                    let line = std::mem::take(&mut self.pending);
                    let text = String::from_utf8_lossy(&line);
                    if text.trim().is_empty() {
                        continue;
                    }
                    return serde_json::from_str(text.trim())
                        .map_err(|e| qerr(step, format!("bad JSON {:?}: {e}", text.trim())));
                }
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted) => {
                    continue
                }
                Err(e) => return Err(qerr(step, e.to_string())),
            }
        }
    }

    /// Run `command` with optional `arguments`, return its `return` value.
    ///
    /// # Errors
    /// [`HarnessError::Qmp`] on an `error` reply, a closed socket or the deadline.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, HarnessError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer.set_write_timeout(Some(Duration::from_secs(5))).map_err(|e| qerr(command, e.to_string()))?;
        self.writer.write_all(line.as_bytes()).map_err(|e| qerr(command, e.to_string()))?;
        loop {
            let v = self.read_message(command, deadline)?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(qerr(command, e.to_string()));
            }
            if let Some(ev) = v.get("event").and_then(Value::as_str) {
                self.events.push(ev.to_string());
            }
        }
    }

    /// Run a human-monitor (HMP) command line, return its text output.
    ///
    /// # Errors
    /// As [`Qmp::execute`].
    pub fn hmp(&mut self, command_line: &str, deadline: Instant) -> Result<String, HarnessError> {
        let r = self.execute("human-monitor-command", Some(json!({ "command-line": command_line })), deadline)?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake QMP server on a socket pair: greeting, capabilities, an event, then replies.
    #[test]
    fn handshake_events_and_errors() {
        let (client, server) = UnixStream::pair().unwrap();
        let t = std::thread::spawn(move || {
            let mut r = BufReader::new(server.try_clone().unwrap());
            let mut w = server;
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n").unwrap();
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            assert!(l.contains("qmp_capabilities"));
            w.write_all(b"{\"return\": {}}\r\n").unwrap();
            l.clear();
            r.read_line(&mut l).unwrap();
            assert!(l.contains("human-monitor-command") && l.contains("info status"));
            // A reply split across writes, after an event.
            w.write_all(b"{\"event\": \"RESUME\"}\r\n{\"return\": \"VM status").unwrap();
            std::thread::sleep(Duration::from_millis(50));
            w.write_all(b": running\\r\\n\"}\r\n").unwrap();
            l.clear();
            r.read_line(&mut l).unwrap();
            w.write_all(b"{\"error\": {\"class\": \"GenericError\", \"desc\": \"nope\"}}\r\n").unwrap();
            l.clear();
            let _ = r.read_line(&mut l);
        });
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut q = Qmp::handshake(client, deadline).unwrap();
        assert_eq!(q.hmp("info status", deadline).unwrap(), "VM status: running\r\n");
        assert_eq!(q.events, ["RESUME"]);
        let e = q.execute("bogus", None, deadline).unwrap_err().to_string();
        assert!(e.contains("nope"), "{e}");
        // Nothing more comes: the deadline ends the wait.
        let e = q.execute("quiet", None, Instant::now() + Duration::from_millis(200)).unwrap_err().to_string();
        assert!(e.contains("deadline") || e.contains("closed"), "{e}");
        t.join().unwrap();
    }
}
