//! NBD over TLS: credentials in qemu's x509 layout and one connection's rustls session over a non-blocking
//! socket.
//!
//! # Credentials
//! `--tls-creds DIR` names a directory laid out as QEMU's `tls-creds-x509` object with `endpoint=server` expects
//! (and as `qemu-nbd --tls-creds` uses): `server-cert.pem` (the certificate chain, leaf first), `server-key.pem`
//! (PKCS#8, PKCS#1 or SEC1 key) and `ca-cert.pem` (the CA clients verify us with; the server only checks that it
//! parses, so a directory that clients cannot use is refused at start).
//! With `--tls-verify-peer` (QEMU's `verify-peer=on`) clients must present a certificate signed by `ca-cert.pem`
//! (libnbd and QEMU send `client-cert.pem`/`client-key.pem` from their credentials directory); without it client
//! certificates are not requested (QEMU's `verify-peer=off`).
//!
//! # The session
//! [`TlsConn`] is rustls's sans-I/O [`rustls::ServerConnection`] driven with `read_tls`/`process_new_packets`/
//! `reader()` on input and `writer()`/`write_tls` on output, over the connection's non-blocking socket: every
//! call returns at `EAGAIN`, nothing blocks the reactor. Plaintext replies are copied into a 16 KiB staging buffer
//! (allocated with the session) and handed to rustls, whose outgoing buffer is bounded (64 KiB): a full buffer
//! stops the sender like a full socket does. A TLS failure ends that connection only, with a log line.

use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::error::AppError;

/// Plaintext staging buffer per TLS connection (one TLS record's worth).
const STAGE_BYTES: usize = 16 << 10;
/// Bound on rustls's buffered outgoing TLS bytes per connection.
const SEND_BUFFER_BYTES: usize = 64 << 10;

/// Whether TLS is required or merely offered (`--tls-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Clients must send `NBD_OPT_STARTTLS` before anything else (qemu-nbd's behaviour).
    Required,
    /// TLS is offered; plaintext clients are served too.
    Optional,
}

/// The server's TLS setup, shared by every connection.
#[derive(Debug)]
pub struct TlsSetup {
    /// rustls configuration (certificate chain and key).
    pub config: Arc<rustls::ServerConfig>,
    /// Required or optional.
    pub mode: TlsMode,
    /// The credentials directory (for messages).
    pub dir: PathBuf,
    /// Clients must present a certificate signed by the CA.
    pub verify_peer: bool,
}

fn creds_err(path: &Path, reason: impl Into<String>) -> AppError {
    AppError::Config { path: path.display().to_string(), reason: reason.into() }
}

/// Load `server-cert.pem`, `server-key.pem` and `ca-cert.pem` from `dir` and build the rustls configuration;
/// with `verify_peer`, client certificates signed by `ca-cert.pem` are required.
///
/// # Errors
/// [`AppError::Config`] naming the file when one is missing, unreadable or not usable by rustls.
pub fn load_creds(dir: &Path, mode: TlsMode, verify_peer: bool) -> Result<TlsSetup, AppError> {
    let cert_path = dir.join("server-cert.pem");
    let key_path = dir.join("server-key.pem");
    let ca_path = dir.join("ca-cert.pem");
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .map_err(|e| creds_err(&cert_path, format!("reading the server certificate: {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| creds_err(&cert_path, format!("parsing the server certificate: {e}")))?;
    if chain.is_empty() {
        return Err(creds_err(&cert_path, "no CERTIFICATE block in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .map_err(|e| creds_err(&key_path, format!("reading the server key: {e}")))?;
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ca_path)
        .map_err(|e| creds_err(&ca_path, format!("reading the CA certificate (clients need it too): {e}")))?
        .collect::<Result<_, _>>()
        .map_err(|e| creds_err(&ca_path, format!("parsing the CA certificate: {e}")))?;
    if cas.is_empty() {
        return Err(creds_err(&ca_path, "no CERTIFICATE block in the file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| creds_err(dir, format!("TLS protocol versions: {e}")))?;
    let builder = if verify_peer {
        let mut roots = rustls::RootCertStore::empty();
        for ca in cas {
            roots.add(ca).map_err(|e| creds_err(&ca_path, format!("CA certificate not usable as a trust anchor: {e}")))?;
        }
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .map_err(|e| creds_err(&ca_path, format!("client certificate verifier: {e}")))?;
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| creds_err(&cert_path, format!("certificate and key do not form a usable pair: {e}")))?;
    config.alpn_protocols.clear();
    Ok(TlsSetup { config: Arc::new(config), mode, dir: dir.to_path_buf(), verify_peer })
}

/// The socket as `Read`/`Write` for rustls (non-blocking: `EAGAIN` comes back as `WouldBlock`).
struct Fd(i32);

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid, writable slice of buf.len() bytes; fd is the connection's open socket.
        let n = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is a valid slice; MSG_NOSIGNAL: a closed peer gives EPIPE, not SIGPIPE.
        let n = unsafe { libc::send(self.0, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Result of one TLS read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsIo {
    /// This many plaintext bytes were read or accepted.
    Done(usize),
    /// Nothing now: wait for the socket.
    Again,
    /// The peer closed the connection.
    Eof,
    /// The session failed (already logged): close the connection.
    Err,
}

/// One connection's TLS session.
pub struct TlsConn {
    conn: rustls::ServerConnection,
    stage: Vec<u8>,
    index: usize,
    eof: bool,
    established: bool,
    /// The last read filled the caller's buffer: rustls may hold more plaintext, so poll rather than wait.
    more: bool,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn").field("index", &self.index).field("established", &self.established).finish()
    }
}

fn is_again(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted)
}

impl TlsConn {
    /// Start the server side of a TLS handshake. `early` holds bytes the client sent after `NBD_OPT_STARTTLS`
    /// that were already read from the socket (its first TLS records).
    ///
    /// # Errors
    /// The rustls error when the session cannot be created or the early bytes are not TLS (logged).
    pub fn new(setup: &TlsSetup, index: usize, early: &[u8]) -> Result<TlsConn, rustls::Error> {
        let mut conn = rustls::ServerConnection::new(Arc::clone(&setup.config))?;
        conn.set_buffer_limit(Some(SEND_BUFFER_BYTES));
        let mut rest = early;
        while !rest.is_empty() {
            match conn.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {
                    if let Err(e) = conn.process_new_packets() {
                        tracing::warn!(conn = index, error = %e, "nbd: TLS handshake failed; closing this connection");
                        return Err(e);
                    }
                }
                Err(e) => {
                    tracing::warn!(conn = index, error = %e, "nbd: TLS handshake failed; closing this connection");
                    return Err(rustls::Error::General(e.to_string()));
                }
            }
        }
        Ok(TlsConn { conn, stage: vec![0u8; STAGE_BYTES], index, eof: false, established: false, more: false })
    }

    /// Whether encrypted bytes wait to be written, or decrypted bytes may wait to be read.
    pub fn needs_polling(&self) -> bool {
        self.conn.wants_write() || self.more
    }

    /// Whether encrypted bytes wait to be written to the socket.
    pub fn pending_output(&self) -> bool {
        self.conn.wants_write()
    }

    fn fail(&mut self, fd: i32, what: &str, e: &dyn std::fmt::Display) -> TlsIo {
        if self.conn.is_handshaking() {
            tracing::warn!(conn = self.index, step = what, error = %e, "nbd: TLS handshake failed; closing this connection");
        } else {
            tracing::warn!(conn = self.index, error = %e, "nbd: TLS {what} failed; closing this connection");
        }
        // Send the alert rustls queued, if the socket takes it.
        let _ = self.flush(fd);
        TlsIo::Err
    }

    fn eof_seen(&self) -> TlsIo {
        if self.conn.is_handshaking() {
            // A client that rejects our certificate may hang up without an alert: say so.
            tracing::warn!(
                conn = self.index,
                phase = "handshake",
                error = "the client closed the connection during the TLS handshake (did it trust our CA?)",
                "nbd: TLS handshake failed; closing this connection"
            );
        }
        TlsIo::Eof
    }

    /// Read decrypted bytes into `buf`, reading and processing TLS records from the socket as needed (and
    /// writing the handshake messages they call for).
    pub fn read(&mut self, fd: i32, buf: &mut [u8]) -> TlsIo {
        self.more = false;
        if buf.is_empty() {
            return TlsIo::Again;
        }
        loop {
            match self.conn.reader().read(buf) {
                Ok(0) => return TlsIo::Eof, // close_notify
                Ok(n) => {
                    self.more = n == buf.len();
                    return TlsIo::Done(n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return self.eof_seen(),
                Err(e) => return self.fail(fd, "read", &e),
            }
            if self.eof {
                return self.eof_seen();
            }
            match self.conn.read_tls(&mut Fd(fd)) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if is_again(&e) => {
                    if self.flush(fd).is_err() {
                        return TlsIo::Err;
                    }
                    return TlsIo::Again;
                }
                Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => {
                    self.eof = true;
                    return self.eof_seen();
                }
                Err(e) => return self.fail(fd, "socket read", &e),
            }
            if let Err(e) = self.conn.process_new_packets() {
                return self.fail(fd, "record processing", &e);
            }
            if !self.established && !self.conn.is_handshaking() {
                self.established = true;
                tracing::info!(
                    conn = self.index,
                    version = ?self.conn.protocol_version(),
                    suite = ?self.conn.negotiated_cipher_suite().map(|s| s.suite()),
                    "nbd: TLS established"
                );
            }
            if self.conn.wants_write() && self.flush(fd).is_err() {
                return TlsIo::Err;
            }
        }
    }

    /// Write buffered TLS records to the socket until it is full. Returns whether anything was written.
    ///
    /// # Errors
    /// `Err(())` when the socket failed (the connection is lost).
    pub fn flush(&mut self, fd: i32) -> Result<bool, ()> {
        let mut wrote = false;
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut Fd(fd)) {
                Ok(0) => break,
                Ok(_) => wrote = true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::debug!(conn = self.index, error = %e, "nbd: TLS socket write failed");
                    return Err(());
                }
            }
        }
        Ok(wrote)
    }

    /// Encrypt as much of `data` as the session buffer takes and push it to the socket.
    pub fn write(&mut self, fd: i32, data: &[u8]) -> TlsIo {
        let iov = [libc::iovec { iov_base: data.as_ptr() as *mut libc::c_void, iov_len: data.len() }];
        // SAFETY: the iovec describes `data`, a live slice not modified during the call.
        unsafe { self.write_iov(fd, &iov) }
    }

    /// Encrypt as much of the bytes the iovecs describe as the session buffer takes (in order), and push
    /// records to the socket. Returns how many plaintext bytes were taken.
    ///
    /// # Safety
    /// Every iovec must describe memory that is valid for reads of `iov_len` bytes and not written by anyone
    /// (CPU or device) during the call.
    pub unsafe fn write_iov(&mut self, fd: i32, iov: &[libc::iovec]) -> TlsIo {
        if self.flush(fd).is_err() {
            return TlsIo::Err;
        }
        let mut total = 0usize;
        'pieces: for v in iov {
            let mut off = 0usize;
            while off < v.iov_len {
                let k = (v.iov_len - off).min(self.stage.len());
                // SAFETY: the caller guarantees iov_base..iov_base+iov_len is readable and stable; off + k <=
                // iov_len; the staging buffer holds at least k bytes and is a different allocation. Copying
                // (rather than borrowing) keeps Rust references out of arena memory.
                unsafe { std::ptr::copy_nonoverlapping(v.iov_base.cast::<u8>().add(off), self.stage.as_mut_ptr(), k) };
                let n = match self.conn.writer().write(&self.stage[..k]) {
                    Ok(n) => n,
                    Err(e) => return self.fail(fd, "write", &e),
                };
                total += n;
                off += n;
                if n < k {
                    break 'pieces; // The session's send buffer is full.
                }
            }
        }
        if self.flush(fd).is_err() {
            return TlsIo::Err;
        }
        if total == 0 {
            TlsIo::Again
        } else {
            TlsIo::Done(total)
        }
    }

    /// Queue a close_notify alert and try once to send it (best effort, before the socket is shut down).
    pub fn close_notify(&mut self, fd: i32) {
        self.conn.send_close_notify();
        let _ = self.flush(fd);
    }
}
