//! The fixed newstyle handshake as a sans-I/O state machine: bytes in, bytes out, and finally the negotiated
//! export. It runs on a reactor without blocking and is fuzzable (see `fuzz/fuzz_targets/nbd_handshake.rs`).
//!
//! Supported options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and
//! `SET_META_CONTEXT` (for `base:allocation`), and `STARTTLS` when the server has TLS credentials ([`TlsPolicy`]).
//! Anything else gets `NBD_REP_ERR_UNSUP`.
//!
//! # TLS
//! With [`TlsPolicy::Required`] (qemu-nbd's behaviour with `--tls-creds`), before `STARTTLS` only `STARTTLS` and
//! `ABORT` are served: other options get `NBD_REP_ERR_TLS_REQD` and `EXPORT_NAME` (which cannot be answered with
//! an error) closes the connection. `STARTTLS` is answered `NBD_REP_ACK` and [`Outcome::StartTls`] tells the
//! caller to run the TLS handshake on the socket and to feed the decrypted bytes from then on; the option state
//! negotiated in plaintext (structured replies, meta context) is forgotten, as the protocol asks.

use super::proto::{self, info, opt, rep, BlockSizes, ExportLimits};

/// What the server knows of one export, as the handshake reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Stable id of the export (for the server's tables).
    pub id: u64,
    /// Name clients ask for.
    pub name: String,
    /// Free-form description.
    pub description: String,
    /// Size, block sizes and transmission flags.
    pub limits: ExportLimits,
}

/// Where the handshake looks exports up.
pub trait ExportDirectory {
    /// The export called `name` ("" is the default export).
    fn find(&self, name: &str) -> Option<ExportInfo>;
    /// Every export: (name, description).
    fn list(&self) -> Vec<(String, String)>;
    /// Whether the server is shutting down (options then get `NBD_REP_ERR_SHUTDOWN`).
    fn shutting_down(&self) -> bool;
}

/// Metadata context id of `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Option data larger than this is skipped and answered `NBD_REP_ERR_TOO_BIG`.
pub const MAX_OPTION_DATA_BYTES: u32 = 16 << 10;
/// Option data larger than this ends the connection (denial of service).
pub const MAX_SKIP_OPTION_BYTES: u32 = 1 << 20;
/// Most options one connection may send before it is dropped.
pub const MAX_OPTIONS: u32 = 1024;

/// The result of a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// The export chosen.
    pub export: ExportInfo,
    /// Structured replies are in use.
    pub structured: bool,
    /// `base:allocation` was selected (block status allowed).
    pub base_allocation: bool,
}

/// Whether and how the server offers TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS credentials: `STARTTLS` gets `NBD_REP_ERR_UNSUP`.
    Off,
    /// Every option but `STARTTLS`/`ABORT` needs TLS first (`NBD_REP_ERR_TLS_REQD`).
    Required,
    /// `STARTTLS` is offered but plaintext clients are served too.
    Optional,
}

/// What to do after feeding bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Send the output, then feed more input.
    Continue,
    /// Send the output; transmission starts (the bytes after `consumed` are requests).
    Transmission(Negotiated),
    /// Send the output, then close the connection.
    Close,
    /// Send the output in plaintext, then run the TLS handshake on the socket; the bytes after `consumed` are
    /// the client's first TLS records. Feed the decrypted stream from then on.
    StartTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    OptionHeader,
    OptionData { option: u32, len: usize },
    Skip { option: u32, left: u32 },
    Finished,
}

/// One connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    state: State,
    pending: Vec<u8>,
    out: Vec<u8>,
    no_zeroes: bool,
    structured: bool,
    meta_export: Option<String>,
    options_seen: u32,
    tls: TlsPolicy,
    tls_active: bool,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// Start a handshake without TLS: the greeting is already in the output.
    pub fn new() -> Self {
        Self::with_tls(TlsPolicy::Off)
    }

    /// Start a handshake with the given TLS policy: the greeting is already in the output.
    pub fn with_tls(tls: TlsPolicy) -> Self {
        let mut out = Vec::with_capacity(512);
        out.extend_from_slice(&proto::encode_greeting(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES));
        Handshake {
            state: State::ClientFlags,
            pending: Vec::with_capacity(64),
            out,
            no_zeroes: false,
            structured: false,
            meta_export: None,
            options_seen: 0,
            tls,
            tls_active: false,
        }
    }

    /// Bytes to send to the client (drain them).
    pub fn output(&mut self) -> &mut Vec<u8> {
        &mut self.out
    }

    fn need(&self) -> usize {
        match self.state {
            State::ClientFlags => 4,
            State::OptionHeader => proto::OPTION_HEADER_BYTES,
            State::OptionData { len, .. } => len,
            State::Skip { .. } | State::Finished => 0,
        }
    }

    /// Feed bytes from the client. Returns how many were consumed and what to do next. Bytes past a
    /// [`Outcome::Transmission`] are not consumed: they are the first requests.
    pub fn feed(&mut self, input: &[u8], dir: &dyn ExportDirectory) -> (usize, Outcome) {
        let mut used = 0usize;
        loop {
            if self.state == State::Finished {
                return (used, Outcome::Close);
            }
            if let State::Skip { option, left } = self.state {
                let take = (left as usize).min(input.len() - used);
                used += take;
                let left = left - take as u32;
                if left > 0 {
                    self.state = State::Skip { option, left };
                    return (used, Outcome::Continue);
                }
                self.reply_err(option, rep::ERR_TOO_BIG, "option data too large");
                self.state = State::OptionHeader;
                continue;
            }
            let need = self.need();
            let take = (need - self.pending.len()).min(input.len() - used);
            self.pending.extend_from_slice(&input[used..used + take]);
            used += take;
            if self.pending.len() < need {
                return (used, Outcome::Continue);
            }
            let data = std::mem::take(&mut self.pending);
            let outcome = self.step(&data, dir);
            self.pending = data;
            self.pending.clear();
            match outcome {
                Outcome::Continue => {}
                Outcome::StartTls => return (used, Outcome::StartTls),
                other => {
                    self.state = State::Finished;
                    return (used, other);
                }
            }
        }
    }

    fn step(&mut self, data: &[u8], dir: &dyn ExportDirectory) -> Outcome {
        match self.state {
            State::ClientFlags => {
                let flags = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                if flags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
                    tracing::debug!(flags, "nbd: unknown client flags; closing");
                    return Outcome::Close;
                }
                self.no_zeroes = flags & proto::FLAG_C_NO_ZEROES != 0;
                self.state = State::OptionHeader;
                Outcome::Continue
            }
            State::OptionHeader => {
                let Ok(h) = proto::parse_option_header(data) else {
                    tracing::debug!("nbd: bad option magic; closing");
                    return Outcome::Close;
                };
                self.options_seen += 1;
                if self.options_seen > MAX_OPTIONS {
                    return Outcome::Close;
                }
                if h.data_len > MAX_SKIP_OPTION_BYTES {
                    return Outcome::Close;
                }
                if h.data_len > MAX_OPTION_DATA_BYTES {
                    self.state = State::Skip { option: h.option, left: h.data_len };
                    return Outcome::Continue;
                }
                self.state = State::OptionData { option: h.option, len: h.data_len as usize };
                if h.data_len == 0 {
                    return self.option(h.option, &[], dir);
                }
                Outcome::Continue
            }
            State::OptionData { option, .. } => self.option(option, data, dir),
            State::Skip { .. } | State::Finished => Outcome::Close,
        }
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        proto::encode_option_reply(&mut self.out, option, kind, data);
    }

    fn reply_err(&mut self, option: u32, kind: u32, msg: &str) {
        self.reply(option, kind, msg.as_bytes());
    }

    fn option(&mut self, option: u32, data: &[u8], dir: &dyn ExportDirectory) -> Outcome {
        self.state = State::OptionHeader;
        if dir.shutting_down() && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                return Outcome::Close;
            }
            self.reply_err(option, rep::ERR_SHUTDOWN, "server is shutting down");
            return Outcome::Continue;
        }
        if option == opt::STARTTLS {
            return self.starttls(data);
        }
        if self.tls == TlsPolicy::Required && !self.tls_active && option != opt::ABORT {
            if option == opt::EXPORT_NAME {
                tracing::debug!("nbd: EXPORT_NAME before STARTTLS on a TLS-only server; closing");
                return Outcome::Close;
            }
            self.reply_err(option, rep::ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS first");
            return Outcome::Continue;
        }
        match option {
            opt::EXPORT_NAME => {
                let Ok(name) = proto::Reader::new(data).string(data.len()) else { return Outcome::Close };
                let Some(mut export) = dir.find(name) else {
                    tracing::debug!(name, "nbd: EXPORT_NAME for an unknown export; closing");
                    return Outcome::Close;
                };
                self.mask_flags(&mut export);
                proto::encode_export_name_reply(
                    &mut self.out,
                    export.limits.size_bytes,
                    export.limits.tflags,
                    self.no_zeroes,
                );
                let base_allocation = self.meta_export.as_deref() == Some(export.name.as_str());
                Outcome::Transmission(Negotiated { export, structured: self.structured, base_allocation })
            }
            opt::ABORT => {
                self.reply(option, rep::ACK, &[]);
                Outcome::Close
            }
            opt::LIST => {
                if !data.is_empty() {
                    self.reply_err(option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                    return Outcome::Continue;
                }
                for (name, desc) in dir.list() {
                    let d = proto::encode_rep_server(&name, &desc);
                    self.reply(option, rep::SERVER, &d);
                }
                self.reply(option, rep::ACK, &[]);
                Outcome::Continue
            }
            opt::INFO | opt::GO => self.info_or_go(option, data, dir),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.reply_err(option, rep::ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
                } else {
                    self.structured = true;
                    self.reply(option, rep::ACK, &[]);
                }
                Outcome::Continue
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data, dir);
                Outcome::Continue
            }
            _ => {
                self.reply_err(option, rep::ERR_UNSUP, "option not supported");
                Outcome::Continue
            }
        }
    }

    fn starttls(&mut self, data: &[u8]) -> Outcome {
        let option = opt::STARTTLS;
        if self.tls == TlsPolicy::Off {
            self.reply_err(option, rep::ERR_UNSUP, "TLS is not configured on this server");
        } else if self.tls_active {
            self.reply_err(option, rep::ERR_INVALID, "TLS is already in use on this connection");
        } else if !data.is_empty() {
            self.reply_err(option, rep::ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        } else {
            self.reply(option, rep::ACK, &[]);
            self.tls_active = true;
            // Nothing negotiated in plaintext survives the upgrade.
            self.structured = false;
            self.meta_export = None;
            return Outcome::StartTls;
        }
        Outcome::Continue
    }

    /// `NBD_FLAG_SEND_DF` only with structured replies (the protocol says so).
    fn mask_flags(&self, export: &mut ExportInfo) {
        if !self.structured {
            export.limits.tflags &= !proto::tflag::SEND_DF;
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8], dir: &dyn ExportDirectory) -> Outcome {
        let req = match proto::parse_info_request(data) {
            Ok(r) => r,
            Err(e) => {
                self.reply_err(option, rep::ERR_INVALID, &format!("malformed request: {e}"));
                return Outcome::Continue;
            }
        };
        let Some(mut export) = dir.find(req.name) else {
            self.reply_err(option, rep::ERR_UNKNOWN, &format!("no export named {:?}", req.name));
            return Outcome::Continue;
        };
        self.mask_flags(&mut export);
        let asked_block_size = req.requests.contains(&info::BLOCK_SIZE);
        if option == opt::GO && !asked_block_size && export.limits.block.min > 1 {
            self.reply_err(
                option,
                rep::ERR_BLOCK_SIZE_REQD,
                "this export needs aligned requests: ask for NBD_INFO_BLOCK_SIZE",
            );
            return Outcome::Continue;
        }
        let mut sent_name = false;
        let mut sent_desc = false;
        for &r in &req.requests {
            match r {
                info::NAME if !sent_name => {
                    sent_name = true;
                    let d = proto::encode_info_string(info::NAME, &export.name);
                    self.reply(option, rep::INFO, &d);
                }
                info::DESCRIPTION if !sent_desc && !export.description.is_empty() => {
                    sent_desc = true;
                    let d = proto::encode_info_string(info::DESCRIPTION, &export.description);
                    self.reply(option, rep::INFO, &d);
                }
                _ => {}
            }
        }
        let b: BlockSizes = export.limits.block;
        let d = proto::encode_info_block_size(b);
        self.reply(option, rep::INFO, &d);
        let d = proto::encode_info_export(export.limits.size_bytes, export.limits.tflags);
        self.reply(option, rep::INFO, &d);
        self.reply(option, rep::ACK, &[]);
        if option == opt::GO {
            let base_allocation = self.meta_export.as_deref() == Some(export.name.as_str())
                || (req.name.is_empty() && self.meta_export.as_deref() == Some(""));
            return Outcome::Transmission(Negotiated { export, structured: self.structured, base_allocation });
        }
        Outcome::Continue
    }

    fn meta_context(&mut self, option: u32, data: &[u8], dir: &dyn ExportDirectory) {
        if option == opt::SET_META_CONTEXT {
            self.meta_export = None;
        }
        if !self.structured {
            self.reply_err(option, rep::ERR_INVALID, "negotiate structured replies first");
            return;
        }
        let q = match proto::parse_meta_query(data) {
            Ok(q) => q,
            Err(e) => {
                self.reply_err(option, rep::ERR_INVALID, &format!("malformed request: {e}"));
                return;
            }
        };
        let Some(export) = dir.find(q.export) else {
            self.reply_err(option, rep::ERR_UNKNOWN, &format!("no export named {:?}", q.export));
            return;
        };
        let matches = if option == opt::LIST_META_CONTEXT {
            q.queries.is_empty() || q.queries.iter().any(|s| *s == "base:" || *s == proto::BASE_ALLOCATION)
        } else {
            q.queries.contains(&proto::BASE_ALLOCATION)
        };
        if matches {
            let id = if option == opt::SET_META_CONTEXT { BASE_ALLOCATION_ID } else { 0 };
            let d = proto::encode_meta_context(id, proto::BASE_ALLOCATION);
            self.reply(option, rep::META_CONTEXT, &d);
            if option == opt::SET_META_CONTEXT {
                // Remember the name as the client spelled it: GO must name the same export.
                self.meta_export = Some(if q.export.is_empty() { String::new() } else { export.name });
            }
        }
        self.reply(option, rep::ACK, &[]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::nbd::proto::{tflag, Reader};

    struct Dir;
    impl ExportDirectory for Dir {
        fn find(&self, name: &str) -> Option<ExportInfo> {
            (name == "disk0" || name.is_empty()).then(|| ExportInfo {
                id: 1,
                name: "disk0".into(),
                description: "test disk".into(),
                limits: ExportLimits {
                    size_bytes: 1 << 30,
                    block: BlockSizes { min: 512, preferred: 4096, max: 1 << 21 },
                    tflags: tflag::HAS_FLAGS | tflag::SEND_FLUSH,
                },
            })
        }
        fn list(&self) -> Vec<(String, String)> {
            vec![("disk0".into(), "test disk".into())]
        }
        fn shutting_down(&self) -> bool {
            false
        }
    }

    fn option(o: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        v.extend_from_slice(&o.to_be_bytes());
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        v.extend_from_slice(data);
        v
    }

    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut r = Reader::new(out);
        let mut v = Vec::new();
        while r.remaining() > 0 {
            assert_eq!(r.u64().unwrap(), proto::REPLY_MAGIC);
            let o = r.u32().unwrap();
            let t = r.u32().unwrap();
            let l = r.u32().unwrap() as usize;
            v.push((o, t, r.bytes(l).unwrap().to_vec()));
        }
        v
    }

    fn go_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    #[test]
    fn go_negotiates_with_structured_replies_and_meta_context() {
        let mut h = Handshake::new();
        assert_eq!(h.output().len(), proto::GREETING_BYTES);
        h.output().clear();
        let mut input = 3u32.to_be_bytes().to_vec();
        input.extend(option(opt::STRUCTURED_REPLY, &[]));
        let mut meta = Vec::new();
        meta.extend_from_slice(&5u32.to_be_bytes());
        meta.extend_from_slice(b"disk0");
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        input.extend(option(opt::SET_META_CONTEXT, &meta));
        input.extend(option(opt::GO, &go_data("disk0", &[info::BLOCK_SIZE, info::NAME])));
        input.extend_from_slice(b"next");
        // Feed one byte at a time: the state machine must not care how bytes arrive.
        let mut outcome = Outcome::Continue;
        let mut consumed = 0;
        for i in 0..input.len() {
            let (n, o) = h.feed(&input[i..i + 1], &Dir);
            consumed += n;
            if o != Outcome::Continue {
                outcome = o;
                break;
            }
        }
        assert_eq!(consumed, input.len() - 4, "request bytes after GO are not consumed");
        let Outcome::Transmission(n) = outcome else { panic!("no transmission: {outcome:?}") };
        assert!(n.structured && n.base_allocation);
        let r = replies(h.output());
        let kinds: Vec<u32> = r.iter().map(|x| x.1).collect();
        assert_eq!(kinds, vec![rep::ACK, rep::META_CONTEXT, rep::ACK, rep::INFO, rep::INFO, rep::INFO, rep::ACK]);
    }

    #[test]
    fn go_without_block_size_is_refused_and_unknown_export_errors() {
        let mut h = Handshake::new();
        h.output().clear();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(opt::GO, &go_data("disk0", &[])));
        input.extend(option(opt::GO, &go_data("nope", &[info::BLOCK_SIZE])));
        input.extend(option(opt::LIST, &[]));
        input.extend(option(99, &[1, 2, 3]));
        input.extend(option(opt::ABORT, &[]));
        let (_, o) = h.feed(&input, &Dir);
        assert_eq!(o, Outcome::Close);
        let kinds: Vec<u32> = replies(h.output()).iter().map(|x| x.1).collect();
        assert_eq!(
            kinds,
            vec![rep::ERR_BLOCK_SIZE_REQD, rep::ERR_UNKNOWN, rep::SERVER, rep::ACK, rep::ERR_UNSUP, rep::ACK]
        );
    }

    #[test]
    fn bad_client_flags_and_huge_options_close() {
        let mut h = Handshake::new();
        assert_eq!(h.feed(&0x8000_0000u32.to_be_bytes(), &Dir).1, Outcome::Close);
        let mut h = Handshake::new();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
        input.extend_from_slice(&opt::GO.to_be_bytes());
        input.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(h.feed(&input, &Dir).1, Outcome::Close);
    }

    #[test]
    fn tls_required_refuses_options_until_starttls_then_forgets_plaintext_state() {
        let mut h = Handshake::with_tls(TlsPolicy::Required);
        h.output().clear();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(opt::LIST, &[]));
        input.extend(option(opt::STRUCTURED_REPLY, &[]));
        input.extend(option(opt::GO, &go_data("disk0", &[info::BLOCK_SIZE])));
        input.extend(option(opt::STARTTLS, &[1]));
        input.extend(option(opt::STARTTLS, &[]));
        input.extend_from_slice(b"\x16\x03\x01"); // The start of a ClientHello: not for the handshake.
        let (used, o) = h.feed(&input, &Dir);
        assert_eq!(o, Outcome::StartTls);
        assert_eq!(used, input.len() - 3, "bytes after STARTTLS belong to TLS");
        let kinds: Vec<u32> = replies(h.output()).iter().map(|x| x.1).collect();
        assert_eq!(kinds, vec![rep::ERR_TLS_REQD, rep::ERR_TLS_REQD, rep::ERR_TLS_REQD, rep::ERR_INVALID, rep::ACK]);
        // Inside TLS: options work, a second STARTTLS is invalid, structured replies must be asked again.
        h.output().clear();
        let mut input = option(opt::STARTTLS, &[]);
        input.extend(option(opt::GO, &go_data("disk0", &[info::BLOCK_SIZE])));
        let (_, o) = h.feed(&input, &Dir);
        let Outcome::Transmission(n) = o else { panic!("no transmission: {o:?}") };
        assert!(!n.structured, "structured replies negotiated before TLS must not survive it");
        let kinds: Vec<u32> = replies(h.output()).iter().map(|x| x.1).collect();
        assert_eq!(kinds, vec![rep::ERR_INVALID, rep::INFO, rep::INFO, rep::ACK]);
    }

    #[test]
    fn tls_required_closes_on_export_name_and_acks_abort() {
        let mut h = Handshake::with_tls(TlsPolicy::Required);
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(opt::EXPORT_NAME, b"disk0"));
        assert_eq!(h.feed(&input, &Dir).1, Outcome::Close);
        let mut h = Handshake::with_tls(TlsPolicy::Required);
        h.output().clear();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(opt::ABORT, &[]));
        assert_eq!(h.feed(&input, &Dir).1, Outcome::Close);
        assert_eq!(replies(h.output())[0].1, rep::ACK);
    }

    #[test]
    fn tls_optional_serves_plaintext_and_off_refuses_starttls() {
        let mut h = Handshake::with_tls(TlsPolicy::Optional);
        h.output().clear();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(opt::GO, &go_data("disk0", &[info::BLOCK_SIZE])));
        assert!(matches!(h.feed(&input, &Dir).1, Outcome::Transmission(_)));
        let mut h = Handshake::new();
        h.output().clear();
        let mut input = 1u32.to_be_bytes().to_vec();
        input.extend(option(opt::STARTTLS, &[]));
        assert_eq!(h.feed(&input, &Dir).1, Outcome::Continue);
        assert_eq!(replies(h.output())[0].1, rep::ERR_UNSUP);
    }

    proptest::proptest! {
        #[test]
        fn random_bytes_never_panic(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..512)) {
            let mut h = Handshake::new();
            let _ = h.feed(&data, &Dir);
            let mut h = Handshake::with_tls(TlsPolicy::Required);
            let _ = h.feed(&data, &Dir);
        }
    }
}
