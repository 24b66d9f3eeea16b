//! The NBD wire format: pure parsing and encoding, no I/O (fuzzable).
//!
//! Follows the NBD protocol document (`doc/proto.md` of the reference implementation): fixed newstyle handshake,
//! option haggling (`NBD_OPT_*`), the 28-byte compact request, simple replies and structured reply chunks.
//! Every length that comes from the wire is checked before use; every parser returns an error instead of panicking.
//! All numbers on the wire are big-endian.

/// `NBDMAGIC`: first 8 bytes the server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic (server greeting and every client option header).
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: fixed newstyle.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the client may ask to skip the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zeroes.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags (16 bits, sent with the export).
pub mod tflag {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// `NBD_CMD_FLUSH` is accepted.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// `NBD_CMD_FLAG_FUA` is accepted.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// `NBD_CMD_TRIM` is accepted.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// `NBD_CMD_WRITE_ZEROES` is accepted.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// `NBD_CMD_FLAG_DF` is accepted on reads (structured replies only).
    pub const SEND_DF: u16 = 1 << 7;
    /// Flush and FUA are visible across all connections to the export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// `NBD_CMD_CACHE` is accepted.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// `NBD_CMD_FLAG_FAST_ZERO` is accepted on write zeroes.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option numbers (`NBD_OPT_*`).
pub mod opt {
    /// Choose an export and enter transmission (no error possible).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Start TLS.
    pub const STARTTLS: u32 = 5;
    /// Describe an export.
    pub const INFO: u32 = 6;
    /// Describe an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Extended (64-bit) headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Done / accepted.
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// One piece of export information.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Syntactically invalid.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// The server does not support this option on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// The server requires TLS before this option.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// Export unknown.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// Option payload too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
}

/// `NBD_INFO_*` types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical name.
    pub const NAME: u16 = 1;
    /// Description.
    pub const DESCRIPTION: u16 = 2;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim.
    pub const TRIM: u16 = 4;
    /// Cache (prefetch).
    pub const CACHE: u16 = 5;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cflag {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// Write zeroes: do not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Read: don't fragment the structured reply.
    pub const DF: u16 = 1 << 2;
    /// Block status: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Write zeroes: fail fast with ENOTSUP unless zeroing is fast.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Structured reply chunk types and flags.
pub mod reply {
    /// This chunk is the last one.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload: end of the reply.
    pub const TYPE_NONE: u16 = 0;
    /// Data at an offset.
    pub const TYPE_OFFSET_DATA: u16 = 1;
    /// A hole (zeroes) at an offset.
    pub const TYPE_OFFSET_HOLE: u16 = 2;
    /// Block status extents.
    pub const TYPE_BLOCK_STATUS: u16 = 5;
    /// An error.
    pub const TYPE_ERROR: u16 = (1 << 15) | 1;
    /// An error at an offset.
    pub const TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// `base:allocation` state bits.
pub mod state {
    /// Unallocated.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// NBD error values (the protocol's restricted errno set).
pub mod errno {
    /// Not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument.
    pub const EINVAL: u32 = 22;
    /// No space (write beyond the end).
    pub const ENOSPC: u32 = 28;
    /// Value too large (DF read too large).
    pub const EOVERFLOW: u32 = 75;
    /// Not supported (FAST_ZERO that would be slow).
    pub const ENOTSUP: u32 = 95;
    /// Server shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// The one metadata context nvstack serves.
pub const BASE_ALLOCATION: &str = "base:allocation";
/// Longest string (export name, description, query) the protocol allows.
pub const MAX_STRING_BYTES: usize = 4096;

/// Size of the server's greeting.
pub const GREETING_BYTES: usize = 18;
/// Size of a client option header.
pub const OPTION_HEADER_BYTES: usize = 16;
/// Size of an option reply header.
pub const OPTION_REPLY_HEADER_BYTES: usize = 20;
/// Size of a compact request header.
pub const REQUEST_BYTES: usize = 28;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_BYTES: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_BYTES: usize = 20;

/// Why bytes could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtoError {
    /// Fewer bytes than the structure needs.
    Short {
        /// Bytes needed.
        need: usize,
        /// Bytes there.
        have: usize,
    },
    /// A magic number did not match.
    BadMagic {
        /// What came.
        got: u64,
    },
    /// A length field disagrees with the data around it.
    BadLength(&'static str),
    /// A string is not UTF-8, contains NUL, or is too long.
    BadString(&'static str),
}

impl std::fmt::Display for ProtoError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProtoError::Short { need, have } => write!(f, "need {need} bytes, have {have}"),
            ProtoError::BadMagic { got } => write!(f, "bad magic {got:#x}"),
            ProtoError::BadLength(what) => write!(f, "bad length: {what}"),
            ProtoError::BadString(what) => write!(f, "bad string: {what}"),
        }
    }
}

impl std::error::Error for ProtoError {}

/// A cursor over untrusted bytes: every read is bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    /// Start reading `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Reader { data, pos: 0 }
    }
    /// Bytes not yet read.
    pub fn remaining(&self) -> usize {
        self.data.len() - self.pos
    }
    /// Take `n` bytes.
    ///
    /// # Errors
    /// [`ProtoError::Short`] when fewer remain.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], ProtoError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len()).ok_or(ProtoError::Short {
            need: n,
            have: self.remaining(),
        })?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], ProtoError> {
        let s = self.bytes(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    /// Big-endian u16.
    ///
    /// # Errors
    /// [`ProtoError::Short`].
    pub fn u16(&mut self) -> Result<u16, ProtoError> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    /// Big-endian u32.
    ///
    /// # Errors
    /// [`ProtoError::Short`].
    pub fn u32(&mut self) -> Result<u32, ProtoError> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    /// Big-endian u64.
    ///
    /// # Errors
    /// [`ProtoError::Short`].
    pub fn u64(&mut self) -> Result<u64, ProtoError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    /// A string of `len` bytes: UTF-8, no NUL, at most [`MAX_STRING_BYTES`].
    ///
    /// # Errors
    /// [`ProtoError::Short`] or [`ProtoError::BadString`].
    pub fn string(&mut self, len: usize) -> Result<&'a str, ProtoError> {
        if len > MAX_STRING_BYTES {
            return Err(ProtoError::BadString("longer than 4096 bytes"));
        }
        let b = self.bytes(len)?;
        let s = std::str::from_utf8(b).map_err(|_| ProtoError::BadString("not UTF-8"))?;
        if s.contains('\0') {
            return Err(ProtoError::BadString("contains NUL"));
        }
        Ok(s)
    }
}

/// The server's first 18 bytes: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_BYTES] {
    let mut b = [0u8; GREETING_BYTES];
    b[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&flags.to_be_bytes());
    b
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option number.
    pub option: u32,
    /// Bytes of option data that follow.
    pub data_len: u32,
}

/// Parse a 16-byte option header.
///
/// # Errors
/// [`ProtoError::Short`] or [`ProtoError::BadMagic`].
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ProtoError> {
    let mut r = Reader::new(b);
    let magic = r.u64()?;
    if magic != IHAVEOPT {
        return Err(ProtoError::BadMagic { got: magic });
    }
    Ok(OptionHeader { option: r.u32()?, data_len: r.u32()? })
}

/// Data of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    /// Export name ("" = default export).
    pub name: &'a str,
    /// The `NBD_INFO_*` items asked for.
    pub requests: Vec<u16>,
}

/// Parse `NBD_OPT_INFO`/`NBD_OPT_GO` data: u32 name length, name, u16 count, count × u16.
///
/// # Errors
/// A [`ProtoError`] when lengths disagree with the data (the option must then be answered `NBD_REP_ERR_INVALID`).
pub fn parse_info_request(data: &[u8]) -> Result<InfoRequest<'_>, ProtoError> {
    let mut r = Reader::new(data);
    let name_len = usize::try_from(r.u32()?).map_err(|_| ProtoError::BadLength("name length"))?;
    let name = r.string(name_len)?;
    let count = usize::from(r.u16()?);
    if r.remaining() != count * 2 {
        return Err(ProtoError::BadLength("info request count disagrees with the option length"));
    }
    let mut requests = Vec::with_capacity(count.min(16));
    for _ in 0..count {
        requests.push(r.u16()?);
    }
    Ok(InfoRequest { name, requests })
}

/// Data of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaQuery<'a> {
    /// Export name.
    pub export: &'a str,
    /// Queries (empty: all contexts, for LIST).
    pub queries: Vec<&'a str>,
}

/// Most queries accepted in one meta-context option.
pub const MAX_META_QUERIES: usize = 128;

/// Parse meta-context option data: u32 export name length, name, u32 query count, count × (u32 length, string).
///
/// # Errors
/// A [`ProtoError`] when lengths disagree with the data.
pub fn parse_meta_query(data: &[u8]) -> Result<MetaQuery<'_>, ProtoError> {
    let mut r = Reader::new(data);
    let name_len = usize::try_from(r.u32()?).map_err(|_| ProtoError::BadLength("name length"))?;
    let export = r.string(name_len)?;
    let count = usize::try_from(r.u32()?).map_err(|_| ProtoError::BadLength("query count"))?;
    if count > MAX_META_QUERIES {
        return Err(ProtoError::BadLength("too many queries"));
    }
    let mut queries = Vec::with_capacity(count);
    for _ in 0..count {
        let qlen = usize::try_from(r.u32()?).map_err(|_| ProtoError::BadLength("query length"))?;
        queries.push(r.string(qlen)?);
    }
    if r.remaining() != 0 {
        return Err(ProtoError::BadLength("bytes after the last query"));
    }
    Ok(MetaQuery { export, queries })
}

/// Append an option reply (header + data) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, data: &[u8]) {
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    // Data we send is always small (strings ≤ 4096 plus a few fields), so the length fits u32.
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(data);
}

/// `NBD_REP_SERVER` data: u32 name length, name, description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len() + description.len());
    d.extend_from_slice(&u32::try_from(name.len()).unwrap_or(0).to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(description.as_bytes());
    d
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT` data: u16 type, u64 size, u16 transmission flags.
pub fn encode_info_export(size_bytes: u64, tflags: u16) -> Vec<u8> {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&info::EXPORT.to_be_bytes());
    d.extend_from_slice(&size_bytes.to_be_bytes());
    d.extend_from_slice(&tflags.to_be_bytes());
    d
}

/// `NBD_REP_INFO` with a string (`NBD_INFO_NAME` / `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(kind: u16, s: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(2 + s.len());
    d.extend_from_slice(&kind.to_be_bytes());
    d.extend_from_slice(s.as_bytes());
    d
}

/// Block size constraints of an export (`NBD_INFO_BLOCK_SIZE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    /// Minimum: a power of two, 1..=65536; requests must be aligned to it.
    pub min: u32,
    /// Preferred: a power of two, at least `min`.
    pub preferred: u32,
    /// Maximum request payload: a multiple of `min`.
    pub max: u32,
}

impl BlockSizes {
    /// Whether the triple obeys the protocol's rules.
    pub fn is_valid(&self) -> bool {
        self.min.is_power_of_two()
            && self.min <= 65536
            && self.preferred.is_power_of_two()
            && self.preferred >= self.min
            && self.max >= self.min
            && self.max.is_multiple_of(self.min)
    }
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE` data.
pub fn encode_info_block_size(bs: BlockSizes) -> Vec<u8> {
    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&bs.min.to_be_bytes());
    d.extend_from_slice(&bs.preferred.to_be_bytes());
    d.extend_from_slice(&bs.max.to_be_bytes());
    d
}

/// `NBD_REP_META_CONTEXT` data: u32 id, name.
pub fn encode_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut d = Vec::with_capacity(4 + name.len());
    d.extend_from_slice(&id.to_be_bytes());
    d.extend_from_slice(name.as_bytes());
    d
}

/// The reply to `NBD_OPT_EXPORT_NAME`: u64 size, u16 flags, and 124 zeroes unless no-zeroes was negotiated.
pub fn encode_export_name_reply(out: &mut Vec<u8>, size_bytes: u64, tflags: u16, no_zeroes: bool) {
    out.extend_from_slice(&size_bytes.to_be_bytes());
    out.extend_from_slice(&tflags.to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

/// A transmission request (compact header).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub kind: u16,
    /// Client's handle (cookie), echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for a write).
    pub length: u32,
}

/// Parse a 28-byte request header.
///
/// # Errors
/// [`ProtoError::Short`] or [`ProtoError::BadMagic`] (the connection must then be dropped: it is out of sync).
pub fn parse_request(b: &[u8]) -> Result<Request, ProtoError> {
    let mut r = Reader::new(b);
    let magic = r.u32()?;
    if magic != REQUEST_MAGIC {
        return Err(ProtoError::BadMagic { got: u64::from(magic) });
    }
    Ok(Request { flags: r.u16()?, kind: r.u16()?, handle: r.u64()?, offset: r.u64()?, length: r.u32()? })
}

/// Encode a request header (used by tests and the fuzz target's round trip).
pub fn encode_request(req: &Request) -> [u8; REQUEST_BYTES] {
    let mut b = [0u8; REQUEST_BYTES];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&req.flags.to_be_bytes());
    b[6..8].copy_from_slice(&req.kind.to_be_bytes());
    b[8..16].copy_from_slice(&req.handle.to_be_bytes());
    b[16..24].copy_from_slice(&req.offset.to_be_bytes());
    b[24..28].copy_from_slice(&req.length.to_be_bytes());
    b
}

/// A simple reply header: magic, error, handle.
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_BYTES];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// A structured reply chunk header: magic, flags, type, handle, payload length.
pub fn encode_structured_header(flags: u16, kind: u16, handle: u64, payload_len: u32) -> [u8; STRUCTURED_REPLY_BYTES] {
    let mut b = [0u8; STRUCTURED_REPLY_BYTES];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&kind.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..20].copy_from_slice(&payload_len.to_be_bytes());
    b
}

/// The header and offset of a `NBD_REPLY_TYPE_OFFSET_DATA` chunk carrying `data_len` bytes (the data follows):
/// 28 bytes. Returns `None` when `data_len + 8` does not fit the 32-bit length.
pub fn encode_offset_data_header(flags: u16, handle: u64, offset: u64, data_len: u32) -> Option<[u8; 28]> {
    let payload = data_len.checked_add(8)?;
    let mut b = [0u8; 28];
    b[..20].copy_from_slice(&encode_structured_header(flags, reply::TYPE_OFFSET_DATA, handle, payload));
    b[20..28].copy_from_slice(&offset.to_be_bytes());
    Some(b)
}

/// A complete `NBD_REPLY_TYPE_ERROR` chunk (always the final chunk) with a message, appended to `out`.
pub fn encode_structured_error(out: &mut Vec<u8>, handle: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(1024)];
    // 6 + at most 1024: fits u32 and u16.
    let payload = 6 + msg.len() as u32;
    out.extend_from_slice(&encode_structured_header(reply::FLAG_DONE, reply::TYPE_ERROR, handle, payload));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    out.extend_from_slice(msg);
}

/// A complete `NBD_REPLY_TYPE_BLOCK_STATUS` chunk (final) for `context_id` with `extents` (length, flags).
pub fn encode_block_status(out: &mut Vec<u8>, handle: u64, context_id: u32, extents: &[(u32, u32)]) {
    let n = extents.len().min(1 << 20);
    let payload = 4 + 8 * n as u32;
    out.extend_from_slice(&encode_structured_header(reply::FLAG_DONE, reply::TYPE_BLOCK_STATUS, handle, payload));
    out.extend_from_slice(&context_id.to_be_bytes());
    for &(len, flags) in &extents[..n] {
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
    }
}

/// What an export offers a connection (after negotiation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportLimits {
    /// Size in bytes.
    pub size_bytes: u64,
    /// Block size constraints.
    pub block: BlockSizes,
    /// Transmission flags advertised.
    pub tflags: u16,
}

/// What the server must do with a request that passed [`check_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checked {
    /// Carry it out.
    Go,
    /// Answer with this error without touching the device (a write's payload must still be consumed).
    Error(u32),
    /// Drop the connection (the stream can no longer be trusted).
    Disconnect,
}

/// Largest write payload that is read and discarded (to answer an error) rather than dropping the connection.
pub const MAX_DISCARD_BYTES: u32 = 64 << 20;

/// Check a request against the export and the negotiated options. Pure: the policy of which error answers which
/// malformed request, in one place.
///
/// - unknown command or a flag not valid for the command: `EINVAL`;
/// - misaligned offset or length (to the minimum block size): `EINVAL`;
/// - a write or trim/write-zeroes on a read-only export: `EPERM`;
/// - beyond the end: `ENOSPC` for writes (and write zeroes, trim), `EINVAL` for everything else;
/// - a read or write longer than the maximum block size: `EINVAL`, or `EOVERFLOW` for a read with DF;
/// - a write whose payload is too large to skip: disconnect.
pub fn check_request(req: &Request, lim: &ExportLimits, structured: bool, meta_selected: bool) -> Checked {
    let tf = lim.tflags;
    let allowed_flags = match req.kind {
        cmd::READ => cflag::FUA | if structured && tf & tflag::SEND_DF != 0 { cflag::DF } else { 0 },
        cmd::WRITE | cmd::TRIM | cmd::FLUSH | cmd::CACHE | cmd::DISC => cflag::FUA,
        cmd::WRITE_ZEROES => {
            cflag::FUA | cflag::NO_HOLE | if tf & tflag::SEND_FAST_ZERO != 0 { cflag::FAST_ZERO } else { 0 }
        }
        cmd::BLOCK_STATUS => cflag::FUA | cflag::REQ_ONE,
        _ => return Checked::Error(errno::EINVAL),
    };
    // FUA is only valid when advertised.
    let allowed_flags = if tf & tflag::SEND_FUA == 0 { allowed_flags & !cflag::FUA } else { allowed_flags };
    if req.kind == cmd::WRITE && req.length > MAX_DISCARD_BYTES {
        return Checked::Disconnect;
    }
    if req.flags & !allowed_flags != 0 {
        return Checked::Error(errno::EINVAL);
    }
    let ro = tf & tflag::READ_ONLY != 0;
    let end = req.offset.checked_add(u64::from(req.length));
    let min = u64::from(lim.block.min.max(1));
    let aligned = req.offset.is_multiple_of(min) && u64::from(req.length).is_multiple_of(min);
    match req.kind {
        cmd::DISC => Checked::Go,
        cmd::FLUSH => {
            if tf & tflag::SEND_FLUSH == 0 || req.offset != 0 || req.length != 0 {
                Checked::Error(errno::EINVAL)
            } else {
                Checked::Go
            }
        }
        cmd::READ | cmd::WRITE => {
            if req.kind == cmd::WRITE && ro {
                return Checked::Error(errno::EPERM);
            }
            if req.length > lim.block.max {
                return if req.kind == cmd::READ && req.flags & cflag::DF != 0 {
                    Checked::Error(errno::EOVERFLOW)
                } else {
                    Checked::Error(errno::EINVAL)
                };
            }
            if req.length == 0 || !aligned {
                return Checked::Error(errno::EINVAL);
            }
            match end {
                Some(e) if e <= lim.size_bytes => Checked::Go,
                _ if req.kind == cmd::WRITE => Checked::Error(errno::ENOSPC),
                _ => Checked::Error(errno::EINVAL),
            }
        }
        cmd::TRIM | cmd::WRITE_ZEROES => {
            let advertised = if req.kind == cmd::TRIM { tflag::SEND_TRIM } else { tflag::SEND_WRITE_ZEROES };
            if tf & advertised == 0 || req.length == 0 || !aligned {
                return Checked::Error(errno::EINVAL);
            }
            if ro {
                return Checked::Error(errno::EPERM);
            }
            match end {
                Some(e) if e <= lim.size_bytes => Checked::Go,
                _ => Checked::Error(errno::ENOSPC),
            }
        }
        cmd::CACHE => {
            if tf & tflag::SEND_CACHE == 0 || req.length == 0 || !aligned {
                return Checked::Error(errno::EINVAL);
            }
            match end {
                Some(e) if e <= lim.size_bytes => Checked::Go,
                _ => Checked::Error(errno::EINVAL),
            }
        }
        cmd::BLOCK_STATUS => {
            if !structured || !meta_selected || req.length == 0 {
                return Checked::Error(errno::EINVAL);
            }
            match end {
                Some(e) if e <= lim.size_bytes => Checked::Go,
                _ => Checked::Error(errno::EINVAL),
            }
        }
        _ => Checked::Error(errno::EINVAL),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lim() -> ExportLimits {
        ExportLimits {
            size_bytes: 1 << 20,
            block: BlockSizes { min: 512, preferred: 4096, max: 1 << 16 },
            tflags: tflag::HAS_FLAGS
                | tflag::SEND_FLUSH
                | tflag::SEND_FUA
                | tflag::SEND_TRIM
                | tflag::SEND_WRITE_ZEROES
                | tflag::SEND_DF
                | tflag::SEND_CACHE
                | tflag::SEND_FAST_ZERO,
        }
    }

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> Request {
        Request { flags, kind, handle: 7, offset, length }
    }

    #[test]
    fn request_round_trip_and_bad_magic() {
        let r = req(cmd::WRITE, cflag::FUA, 4096, 512);
        let b = encode_request(&r);
        assert_eq!(parse_request(&b).unwrap(), r);
        let mut bad = b;
        bad[0] ^= 1;
        assert!(matches!(parse_request(&bad), Err(ProtoError::BadMagic { .. })));
        assert!(matches!(parse_request(&b[..27]), Err(ProtoError::Short { .. })));
    }

    #[test]
    fn errors_follow_the_protocol() {
        let l = lim();
        assert_eq!(check_request(&req(cmd::READ, 0, 0, 4096), &l, true, false), Checked::Go);
        // Beyond the end: ENOSPC for writes, EINVAL for reads.
        assert_eq!(check_request(&req(cmd::WRITE, 0, (1 << 20) - 512, 1024), &l, true, false), Checked::Error(errno::ENOSPC));
        assert_eq!(check_request(&req(cmd::READ, 0, (1 << 20) - 512, 1024), &l, true, false), Checked::Error(errno::EINVAL));
        // Offset overflow.
        assert_eq!(check_request(&req(cmd::READ, 0, u64::MAX - 511, 1024), &l, true, false), Checked::Error(errno::EINVAL));
        // Misaligned.
        assert_eq!(check_request(&req(cmd::READ, 0, 1, 512), &l, true, false), Checked::Error(errno::EINVAL));
        // Too large: DF read gets EOVERFLOW.
        assert_eq!(check_request(&req(cmd::READ, cflag::DF, 0, 1 << 17), &l, true, false), Checked::Error(errno::EOVERFLOW));
        assert_eq!(check_request(&req(cmd::READ, 0, 0, 1 << 17), &l, true, false), Checked::Error(errno::EINVAL));
        // DF without structured replies is an unknown flag.
        assert_eq!(check_request(&req(cmd::READ, cflag::DF, 0, 512), &l, false, false), Checked::Error(errno::EINVAL));
        // Unknown command and flag.
        assert_eq!(check_request(&req(99, 0, 0, 512), &l, true, false), Checked::Error(errno::EINVAL));
        assert_eq!(check_request(&req(cmd::WRITE, 1 << 9, 0, 512), &l, true, false), Checked::Error(errno::EINVAL));
        // Flush with a range.
        assert_eq!(check_request(&req(cmd::FLUSH, 0, 0, 512), &l, true, false), Checked::Error(errno::EINVAL));
        // Block status needs a context.
        assert_eq!(check_request(&req(cmd::BLOCK_STATUS, 0, 0, 512), &l, true, false), Checked::Error(errno::EINVAL));
        assert_eq!(check_request(&req(cmd::BLOCK_STATUS, 0, 0, 512), &l, true, true), Checked::Go);
        // Huge write payload: disconnect.
        assert_eq!(check_request(&req(cmd::WRITE, 0, 0, u32::MAX), &l, true, false), Checked::Disconnect);
        // Read-only.
        let mut ro = l;
        ro.tflags |= tflag::READ_ONLY;
        assert_eq!(check_request(&req(cmd::WRITE, 0, 0, 512), &ro, true, false), Checked::Error(errno::EPERM));
        assert_eq!(check_request(&req(cmd::TRIM, 0, 0, 512), &ro, true, false), Checked::Error(errno::EPERM));
    }

    #[test]
    fn info_and_meta_parsers() {
        let mut d = Vec::new();
        d.extend_from_slice(&5u32.to_be_bytes());
        d.extend_from_slice(b"disk0");
        d.extend_from_slice(&2u16.to_be_bytes());
        d.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        d.extend_from_slice(&info::NAME.to_be_bytes());
        let r = parse_info_request(&d).unwrap();
        assert_eq!(r.name, "disk0");
        assert_eq!(r.requests, vec![info::BLOCK_SIZE, info::NAME]);
        assert!(parse_info_request(&d[..d.len() - 1]).is_err());
        let mut m = Vec::new();
        m.extend_from_slice(&5u32.to_be_bytes());
        m.extend_from_slice(b"disk0");
        m.extend_from_slice(&1u32.to_be_bytes());
        m.extend_from_slice(&15u32.to_be_bytes());
        m.extend_from_slice(b"base:allocation");
        let q = parse_meta_query(&m).unwrap();
        assert_eq!(q.queries, vec!["base:allocation"]);
        m.push(0);
        assert!(parse_meta_query(&m).is_err());
    }

    proptest! {
        #[test]
        fn parsers_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_request(&data);
            let _ = parse_option_header(&data);
            let _ = parse_info_request(&data);
            let _ = parse_meta_query(&data);
        }

        #[test]
        fn check_request_is_total(flags in any::<u16>(), kind in 0u16..12, offset in any::<u64>(), length in any::<u32>(), s in any::<bool>(), m in any::<bool>()) {
            let r = req(kind, flags, offset, length);
            let l = lim();
            if check_request(&r, &l, s, m) == Checked::Go && kind != cmd::DISC && kind != cmd::FLUSH {
                // Anything accepted lies inside the export and is aligned.
                prop_assert!(offset.checked_add(u64::from(length)).is_some_and(|e| e <= l.size_bytes));
                prop_assert!(length > 0);
            }
        }
    }
}
