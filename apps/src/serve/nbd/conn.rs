//! One NBD connection on a reactor: a non-blocking socket, a handshake, then the transmission phase.
//!
//! # The I/O path
//! - Requests are read into a per-connection receive buffer (allocated at accept) and parsed in place. Each takes
//!   one of [`SLOTS`] preallocated slots; a slot takes the arena buffers ([`CHUNK_BYTES`] each, from the
//!   connection's pool carved at start) that its data needs. Write payloads are copied out of the receive buffer
//!   and then read from the socket straight into the arena buffers.
//! - A request becomes one or more parts, each a boxed [`IoDesc`] from the connection's pool (allocated at accept),
//!   submitted to the reactor's channel for the export's bdev. Descriptors carry (connection index, slot) in
//!   `ctx`/`ctx2` so the reactor routes completions back.
//! - Replies go out with `writev`: header bytes from the slot, data straight from the arena buffers.
//! - TLS (after `NBD_OPT_STARTTLS`, see [`super::tls`]): the socket's bytes go through the connection's rustls
//!   session instead: requests and write payloads are decrypted into the receive buffer (then copied to the
//!   arena buffers), replies are copied from the same iovecs into the session. Without TLS none of this runs.
//! - Back-pressure: no free slot, too few buffers or descriptors, or a full channel (`Busy`) stop parsing; the
//!   socket is not read and TCP flow control pushes back on the client. Nothing allocates per request.
//!
//! # Flush across connections
//! A write is answered only after the bdev completed it, and a bdev `Flush` makes every completed write durable,
//! whatever channel it came through (the BlockDev contract). So a FLUSH on one connection covers every write that
//! any connection was answered for: `NBD_FLAG_CAN_MULTI_CONN` is advertised.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use nvstack_blockdev::{IoChannel, IoDesc, IoError, IoFlags, IoOp, IoStatus, SubmitError};
use nvstack_driver::dma::{BufPool, DmaBuf, DmaRegion};

use super::handshake::{Handshake, Negotiated, Outcome, TlsPolicy};
use super::proto::{self, cflag, cmd, errno, Checked, Request};
use super::tls::{TlsConn, TlsIo, TlsMode, TlsSetup};
use crate::serve::registry::{ExportEntry, Registry};

/// Bytes per arena buffer of a connection.
pub const CHUNK_BYTES: u32 = 64 << 10;
/// Arena buffers per connection (carved at start).
pub const BUFS_PER_CONN: u32 = 64;
/// Largest request payload a connection takes (advertised as the maximum block size).
pub const MAX_REQUEST_BYTES: u32 = 2 << 20;
/// Requests in flight per connection.
pub const SLOTS: usize = 64;
/// I/O descriptors per connection.
pub const DESCS_PER_CONN: usize = SLOTS + 32;
/// Receive buffer per connection.
const RBUF_BYTES: usize = 256 << 10;
/// Most iovecs in one writev.
const MAX_IOV: usize = 64;
/// Most extents in one `BLOCK_STATUS` reply (each may cost the bdev a system call or two).
const MAX_EXTENTS: usize = 256;
/// A handshake must finish within this.
const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(30);
/// On shutdown, replies still unsent after this are dropped with the connection.
pub const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

const _: () = assert!(MAX_REQUEST_BYTES.is_multiple_of(CHUNK_BYTES));
const _: () = assert!(MAX_REQUEST_BYTES / CHUNK_BYTES <= BUFS_PER_CONN / 2);

/// A client socket.
#[derive(Debug)]
pub enum Stream {
    /// TCP.
    Tcp(std::net::TcpStream),
    /// Unix domain.
    Unix(std::os::unix::net::UnixStream),
}

impl Stream {
    fn fd(&self) -> i32 {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

/// What a connection needs from the arena, carved once at start and reused by successive connections.
#[derive(Debug)]
pub struct ConnRes {
    /// The data buffers.
    pub pool: BufPool,
    /// A read-only region of zeroes ([`CHUNK_BYTES`]) used to emulate write zeroes.
    pub zero: Arc<DmaRegion>,
    /// The connection's number (1..=32767, then again from 1: `nvstack_blockdev::client`), given at accept and logged there with the peer's
    /// address: every request carries it (`IoDesc::client`), so the cache records it as the first dirtier.
    pub client: u16,
}

enum Io {
    Again,
    Eof,
    Err,
    Done(usize),
}

fn sys_read(fd: i32, ptr: *mut u8, len: usize) -> Io {
    // SAFETY: ptr..ptr+len is writable memory owned by the caller (receive buffer or a DmaBuf the slot owns).
    let n = unsafe { libc::read(fd, ptr.cast(), len) };
    if n > 0 {
        Io::Done(n as usize)
    } else if n == 0 {
        Io::Eof
    } else {
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Io::Again,
            _ => Io::Err,
        }
    }
}

/// Read into `buf`: straight from the socket, or decrypted through the TLS session when there is one.
fn read_into(tls: Option<&mut TlsConn>, fd: i32, buf: &mut [u8]) -> Io {
    match tls {
        None => sys_read(fd, buf.as_mut_ptr(), buf.len()),
        Some(t) => match t.read(fd, buf) {
            TlsIo::Done(n) => Io::Done(n),
            TlsIo::Again => Io::Again,
            TlsIo::Eof => Io::Eof,
            TlsIo::Err => Io::Err,
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotOp {
    Read,
    Write,
    Flush,
    Trim,
    ZeroNative,
    ZeroEmulated,
    Cache,
    BlockStatus,
    /// Answer `error` without device I/O.
    Reply,
}

struct Slot {
    req: Request,
    op: SlotOp,
    bufs: Vec<DmaBuf>,
    next: u64,
    end: u64,
    inflight: u32,
    error: u32,
    fua_flush: bool,
    flush_issued: bool,
    hdr: [u8; 32],
    hdr_len: usize,
    extra: Vec<u8>,
    data_len: usize,
    started: Instant,
}

impl Slot {
    fn new() -> Slot {
        Slot {
            req: Request { flags: 0, kind: 0, handle: 0, offset: 0, length: 0 },
            op: SlotOp::Reply,
            bufs: Vec::with_capacity((MAX_REQUEST_BYTES / CHUNK_BYTES) as usize),
            next: 0,
            end: 0,
            inflight: 0,
            error: 0,
            fua_flush: false,
            flush_issued: false,
            hdr: [0; 32],
            hdr_len: 0,
            extra: Vec::with_capacity(128),
            data_len: 0,
            started: Instant::now(),
        }
    }
    fn reply_len(&self) -> usize {
        self.hdr_len + self.data_len + self.extra.len()
    }
}

enum RecvState {
    Header,
    Payload { slot: usize, got: usize },
    Discard { slot: usize, left: usize },
}

enum Phase {
    Handshake(Box<Handshake>, Instant),
    Transmission,
    Closed,
}

/// The part of a connection the reactor sees: what to poll and when it is finished.
pub struct Conn {
    stream: Stream,
    res: Option<ConnRes>,
    /// The connection's number ([`ConnRes::client`]), put on every request.
    client: u16,
    phase: Phase,
    rbuf: Vec<u8>,
    rstart: usize,
    rend: usize,
    out: Vec<u8>,
    out_pos: usize,
    /// The export, once negotiated.
    pub export: Option<Arc<ExportEntry>>,
    /// Index of the reactor's channel for the export's bdev.
    pub chan: usize,
    structured: bool,
    base_allocation: bool,
    limits: proto::ExportLimits,
    block_bytes: u64,
    part_bytes: u64,
    native_fua: bool,
    native_zero: bool,
    native_trim: bool,
    slots: Vec<Slot>,
    free_slots: Vec<usize>,
    #[allow(clippy::vec_box)] // Descriptors travel as Box<IoDesc> (the IoChannel contract).
    descs: Vec<Box<IoDesc>>,
    retry: VecDeque<Box<IoDesc>>,
    /// Descriptors in the channel's hands.
    pub outstanding: usize,
    running: Vec<usize>,
    replies: VecDeque<usize>,
    reply_skip: usize,
    recv: RecvState,
    disc: bool,
    dead: bool,
    drain_deadline: Option<Instant>,
    iov: Vec<libc::iovec>,
    index: usize,
    /// The server's TLS setup (None: plaintext only).
    tls_setup: Option<Arc<TlsSetup>>,
    /// The TLS session, once `STARTTLS` was acknowledged and the ACK sent.
    tls: Option<Box<TlsConn>>,
    /// `STARTTLS` was acknowledged; the session starts once the ACK is on the wire.
    starttls_pending: bool,
    /// `BLOCK_STATUS` extents (length, `NBD_STATE_*` flags) of the request being answered.
    extents: Vec<(u32, u32)>,
}

// SAFETY: iovecs hold raw pointers into this connection's own receive buffers and arena buffers; they are only
// built and used inside one poll call on the owning reactor. Everything else in Conn is Send.
unsafe impl Send for Conn {}

/// What a handshake step asks of the reactor.
pub enum HandshakeStep {
    /// Nothing new.
    Pending,
    /// Negotiated: attach the connection to the export's bdev channel.
    Attach(Negotiated),
}

impl Conn {
    /// A freshly accepted connection (greeting queued). With `tls`, `NBD_OPT_STARTTLS` is offered (and required
    /// in [`TlsMode::Required`]).
    pub fn new(stream: Stream, res: ConnRes, index: usize, tls: Option<Arc<TlsSetup>>) -> Conn {
        let client = res.client;
        let policy = match tls.as_ref().map(|t| t.mode) {
            None => TlsPolicy::Off,
            Some(TlsMode::Required) => TlsPolicy::Required,
            Some(TlsMode::Optional) => TlsPolicy::Optional,
        };
        let mut hs = Box::new(Handshake::with_tls(policy));
        let out = std::mem::take(hs.output());
        Conn {
            stream,
            res: Some(res),
            client,
            phase: Phase::Handshake(hs, Instant::now()),
            rbuf: vec![0u8; RBUF_BYTES],
            rstart: 0,
            rend: 0,
            out,
            out_pos: 0,
            export: None,
            chan: usize::MAX,
            structured: false,
            base_allocation: false,
            limits: proto::ExportLimits {
                size_bytes: 0,
                block: proto::BlockSizes { min: 1, preferred: 4096, max: MAX_REQUEST_BYTES },
                tflags: 0,
            },
            block_bytes: 512,
            part_bytes: u64::from(CHUNK_BYTES),
            native_fua: false,
            native_zero: false,
            native_trim: false,
            slots: (0..SLOTS).map(|_| Slot::new()).collect(),
            free_slots: (0..SLOTS).rev().collect(),
            descs: (0..DESCS_PER_CONN).map(|_| IoDesc::new(64)).collect(),
            retry: VecDeque::with_capacity(DESCS_PER_CONN),
            outstanding: 0,
            running: Vec::with_capacity(SLOTS),
            replies: VecDeque::with_capacity(SLOTS),
            reply_skip: 0,
            recv: RecvState::Header,
            disc: false,
            dead: false,
            drain_deadline: None,
            iov: Vec::with_capacity(MAX_IOV),
            index,
            tls_setup: tls,
            tls: None,
            starttls_pending: false,
            extents: Vec::with_capacity(MAX_EXTENTS),
        }
    }

    /// Whether the connection is finished and holds nothing in the channel: it can be dropped.
    pub fn finished(&self) -> bool {
        matches!(self.phase, Phase::Closed) && self.outstanding == 0 && self.retry.is_empty()
    }

    /// Take the arena resources back (after [`Conn::finished`]).
    pub fn take_res(&mut self) -> Option<ConnRes> {
        let mut res = self.res.take()?;
        for s in &mut self.slots {
            for b in s.bufs.drain(..) {
                let _ = res.pool.put(b);
            }
        }
        Some(res)
    }

    fn close(&mut self, why: &str) {
        if !matches!(self.phase, Phase::Closed) {
            tracing::debug!(conn = self.index, client = self.client, why, "nbd: closing connection");
            if let Some(t) = self.tls.as_mut() {
                t.close_notify(self.stream.fd());
            }
            // SAFETY: shutting down our own socket fd; it stays open (and owned) until the Stream is dropped.
            unsafe { libc::shutdown(self.stream.fd(), libc::SHUT_RDWR) };
            self.phase = Phase::Closed;
            self.dead = true;
        }
    }

    /// Drive the handshake: read, feed, write. Returns whether the connection negotiated an export.
    pub fn poll_handshake(&mut self, registry: &Registry) -> (bool, HandshakeStep) {
        let Phase::Handshake(hs, started) = &mut self.phase else { return (false, HandshakeStep::Pending) };
        if started.elapsed() > HANDSHAKE_DEADLINE {
            self.close("handshake deadline passed");
            return (true, HandshakeStep::Pending);
        }
        let mut busy = false;
        let mut step = HandshakeStep::Pending;
        let mut close = false;
        if self.out_pos == self.out.len() && !self.starttls_pending {
            self.out.clear();
            self.out_pos = 0;
            match read_into(self.tls.as_deref_mut(), self.stream.fd(), &mut self.rbuf[self.rend..]) {
                Io::Done(n) => {
                    self.rend += n;
                    busy = true;
                }
                Io::Again => {}
                Io::Eof | Io::Err => close = true,
            }
            if self.rend > self.rstart {
                let (used, outcome) = hs.feed(&self.rbuf[self.rstart..self.rend], registry);
                self.rstart += used;
                self.out.append(hs.output());
                match outcome {
                    Outcome::Continue => {}
                    Outcome::Close => close = true,
                    Outcome::Transmission(n) => step = HandshakeStep::Attach(n),
                    Outcome::StartTls => self.starttls_pending = true,
                }
                if self.rstart == self.rend {
                    self.rstart = 0;
                    self.rend = 0;
                }
            }
        }
        busy |= self.flush_out();
        if self.starttls_pending && self.out_pos == self.out.len() && !close {
            // The ACK is on the wire: whatever follows is TLS.
            self.starttls_pending = false;
            busy = true;
            let started = match self.tls_setup.as_ref() {
                Some(setup) => TlsConn::new(setup, self.index, &self.rbuf[self.rstart..self.rend]).ok(),
                None => None,
            };
            self.rstart = 0;
            self.rend = 0;
            match started {
                Some(t) => self.tls = Some(Box::new(t)),
                None => close = true,
            }
        }
        if close {
            // Send what we have (an ABORT's ACK), then close.
            self.close("handshake ended");
        }
        (busy, step)
    }

    /// Read from the socket (through TLS when it is on) into the receive buffer's free tail.
    fn read_rbuf(&mut self) -> Io {
        read_into(self.tls.as_deref_mut(), self.stream.fd(), &mut self.rbuf[self.rend..])
    }

    fn flush_out(&mut self) -> bool {
        let mut busy = false;
        if let Some(t) = self.tls.as_mut() {
            let fd = self.stream.fd();
            let mut failed = t.flush(fd).map(|b| busy |= b).is_err();
            if !failed && self.out_pos < self.out.len() {
                match t.write(fd, &self.out[self.out_pos..]) {
                    TlsIo::Done(n) => {
                        self.out_pos += n;
                        busy = true;
                    }
                    TlsIo::Again => {}
                    TlsIo::Eof | TlsIo::Err => failed = true,
                }
            }
            if failed {
                self.close("TLS write failed during the handshake");
                return true;
            }
            return busy;
        }
        while self.out_pos < self.out.len() {
            let rest = &self.out[self.out_pos..];
            // SAFETY: writing from a valid slice to our own socket.
            let n = unsafe { libc::send(self.stream.fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
            if n > 0 {
                self.out_pos += n as usize;
                busy = true;
            } else {
                break;
            }
        }
        busy
    }

    /// Enter transmission on `export`, with `chan` the reactor's channel index for its bdev.
    pub fn attach(&mut self, n: Negotiated, export: Arc<ExportEntry>, chan: usize) {
        let geo = export.bdev.bdev.geometry();
        let feat = export.bdev.bdev.features();
        self.limits = n.export.limits;
        self.structured = n.structured;
        self.base_allocation = n.base_allocation;
        self.block_bytes = u64::from(geo.block_size);
        let max_t = u64::from(geo.max_transfer_bytes).max(self.block_bytes);
        let by_segs = u64::from(geo.max_segments.max(1)) * u64::from(CHUNK_BYTES);
        let p = max_t.min(by_segs).min(1 << 20);
        self.part_bytes = (p / self.block_bytes).max(1) * self.block_bytes;
        self.native_fua = feat.fua;
        self.native_zero = feat.write_zeroes;
        self.native_trim = feat.deallocate;
        self.export = Some(export);
        self.chan = chan;
        self.phase = Phase::Transmission;
    }

    /// Whether the connection is in transmission.
    pub fn transmitting(&self) -> bool {
        matches!(self.phase, Phase::Transmission)
    }

    /// Close now (server stopping during the handshake).
    pub fn abort(&mut self, why: &str) {
        self.close(why);
    }

    /// The socket's file descriptor (for the reactor's epoll set).
    pub fn fd(&self) -> i32 {
        self.stream.fd()
    }

    /// Whether the connection has work that needs polling rather than waiting for socket readiness.
    pub fn needs_polling(&self) -> bool {
        self.outstanding > 0
            || !self.retry.is_empty()
            || !self.running.is_empty()
            || !self.replies.is_empty()
            || self.out_pos < self.out.len()
            || self.dead
            || self.starttls_pending
            || self.tls.as_ref().is_some_and(|t| t.needs_polling())
    }

    /// Whether the connection is still in the handshake.
    pub fn in_handshake(&self) -> bool {
        matches!(self.phase, Phase::Handshake(..))
    }

    /// A completion from the channel for one of this connection's parts.
    pub fn complete(&mut self, mut io: Box<IoDesc>, ch: &mut dyn IoChannel) {
        self.outstanding -= 1;
        let s = io.ctx2 as usize;
        let st = io.status;
        io.clear_raw_segs();
        self.descs.push(io);
        let Some(slot) = self.slots.get_mut(s) else { return };
        slot.inflight -= 1;
        if let IoStatus::Failed(e) = st {
            if let Some(x) = &self.export {
                // Media errors go to the poison listener (a lock-free queue; other errors are ignored there).
                x.bdev.report_io_error(&e);
            }
            if slot.error == 0 {
                slot.error = map_io_error(e);
                tracing::debug!(error = %e, handle = slot.req.handle, "nbd: request failed");
            }
        }
        self.advance(s, ch);
    }

    fn free_slot(&mut self, s: usize) {
        if let Some(res) = self.res.as_mut() {
            for b in self.slots[s].bufs.drain(..) {
                let _ = res.pool.put(b);
            }
        }
        self.free_slots.push(s);
    }

    /// Issue what parts can be issued for slot `s`; finish it when all are done.
    fn advance(&mut self, s: usize, ch: &mut dyn IoChannel) {
        loop {
            let slot = &self.slots[s];
            if slot.error != 0 || slot.next >= slot.end {
                if slot.inflight > 0 {
                    return;
                }
                if slot.error == 0 && slot.fua_flush && !slot.flush_issued {
                    self.slots[s].flush_issued = true;
                    if !self.issue(s, IoOp::Flush, 0, 0, ch) {
                        // No descriptor: retry on the next round through the running list.
                        self.slots[s].flush_issued = false;
                        self.mark_running(s);
                    }
                    return;
                }
                self.finish(s);
                return;
            }
            if slot.op == SlotOp::Cache && slot.inflight > 0 {
                return; // Cache reuses its buffers: one part at a time.
            }
            let rel = slot.next;
            let len = (slot.end - rel).min(self.part_bytes);
            let op = match slot.op {
                SlotOp::Read | SlotOp::Cache => IoOp::Read,
                SlotOp::Write | SlotOp::ZeroEmulated => IoOp::Write,
                SlotOp::Flush => IoOp::Flush,
                SlotOp::Trim => IoOp::Deallocate,
                SlotOp::ZeroNative => IoOp::WriteZeroes,
                SlotOp::BlockStatus | SlotOp::Reply => {
                    self.slots[s].next = self.slots[s].end;
                    continue;
                }
            };
            let len = if matches!(op, IoOp::Flush | IoOp::Deallocate | IoOp::WriteZeroes) { slot.end - rel } else { len };
            if !self.issue(s, op, rel, len, ch) {
                self.mark_running(s);
                return;
            }
            self.slots[s].next = rel + len;
        }
    }

    fn mark_running(&mut self, s: usize) {
        if !self.running.contains(&s) {
            self.running.push(s);
        }
    }

    /// Build and submit one part. Returns false when no descriptor is free (try later).
    fn issue(&mut self, s: usize, op: IoOp, rel: u64, len: u64, ch: &mut dyn IoChannel) -> bool {
        let Some(mut io) = self.descs.pop() else { return false };
        let slot = &mut self.slots[s];
        let bs = self.block_bytes;
        let abs = slot.req.offset + rel;
        if op == IoOp::Flush {
            io.prepare(IoOp::Flush, 0, 0);
        } else {
            io.prepare(op, abs / bs, len / bs);
        }
        if slot.op == SlotOp::Write && self.native_fua && slot.req.flags & cflag::FUA != 0 {
            io.flags = IoFlags::FUA;
        }
        io.ctx = self.index as u64;
        io.ctx2 = s as u64;
        io.client = self.client;
        if op.has_data() {
            let chunk = u64::from(CHUNK_BYTES);
            let mut at = rel;
            let stop = rel + len;
            // Cache reads reuse the slot's buffers from the start.
            let base = if slot.op == SlotOp::Cache { rel } else { 0 };
            while at < stop {
                let in_buf = (at - base) % chunk;
                let n = (chunk - in_buf).min(stop - at);
                let (ptr, iova) = if slot.op == SlotOp::ZeroEmulated {
                    let Some(res) = self.res.as_ref() else { break };
                    match res.zero.slice(0, n) {
                        Some(p) => p,
                        None => break,
                    }
                } else {
                    let Some(b) = slot.bufs.get(((at - base) / chunk) as usize) else { break };
                    // SAFETY: in_buf + n <= CHUNK_BYTES = the buffer's length.
                    let p = unsafe { b.as_ptr().add(in_buf as usize) };
                    let Some(p) = NonNull::new(p) else { break };
                    (p, b.iova() + in_buf)
                };
                // SAFETY: the memory is a DmaBuf owned by this slot (kept until the part completes: slots free
                // their buffers only when inflight is 0) or the shared zero region, which nothing writes and
                // which lives as long as the connection's resources. n <= CHUNK_BYTES fits u32.
                if unsafe { io.push_seg_raw(ptr, iova, n as u32) }.is_err() {
                    break;
                }
                at += n;
            }
        }
        slot.inflight += 1;
        self.outstanding += 1;
        match ch.submit(io) {
            Ok(()) => {}
            Err(r) => match r.why {
                SubmitError::Busy => self.retry.push_back(r.io),
                SubmitError::Invalid(e) => {
                    let mut io = r.io;
                    io.status = IoStatus::Failed(e);
                    self.complete_later(io);
                }
            },
        }
        true
    }

    fn complete_later(&mut self, io: Box<IoDesc>) {
        // Treat like a completion from the channel, handled on the next retry pass.
        self.retry.push_front(io);
    }

    /// Ask the bdev which parts of `length` bytes at `offset` are holes, into `self.extents`: whole blocks per
    /// extent (but the request's own tail), neighbours with the same flags merged, at most [`MAX_EXTENTS`]
    /// (fewer bytes than asked is allowed), exactly one with `NBD_CMD_FLAG_REQ_ONE`. What the bdev cannot tell is
    /// reported allocated.
    fn fill_extents(&mut self, offset: u64, length: u32, one: bool) {
        self.extents.clear();
        let Some(x) = self.export.as_ref() else { return };
        let bdev = &x.bdev.bdev;
        let bs = self.block_bytes.max(1);
        let Some(end) = offset.checked_add(u64::from(length)) else { return };
        let mut at = offset;
        while at < end && self.extents.len() < MAX_EXTENTS {
            let left = end - at;
            let (mut run, mut allocated) = bdev.block_status(at, left).unwrap_or((left, true));
            run = run.min(left);
            if run < left {
                run -= run % bs;
            }
            if run == 0 {
                // Less than a block of one kind: call the block allocated.
                run = bs.min(left);
                allocated = true;
            }
            let flags = if allocated { 0 } else { proto::state::HOLE | proto::state::ZERO };
            // run <= left <= length: fits u32, and so does a merged sum (at most length).
            let run32 = run as u32;
            match self.extents.last_mut() {
                Some(last) if last.1 == flags => last.0 += run32,
                _ => self.extents.push((run32, flags)),
            }
            at += run;
            if one {
                break;
            }
        }
    }

    fn finish(&mut self, s: usize) {
        if self.slots[s].op == SlotOp::BlockStatus && self.slots[s].error == 0 {
            let r = self.slots[s].req;
            self.fill_extents(r.offset, r.length, r.flags & cflag::REQ_ONE != 0);
        }
        let structured = self.structured;
        let slot = &mut self.slots[s];
        let h = slot.req.handle;
        slot.extra.clear();
        slot.data_len = 0;
        slot.hdr_len = 0;
        if let Some(e) = self.export.as_ref() {
            e.record(slot.req.kind, u64::from(slot.req.length), slot.error != 0, slot.started);
        }
        match slot.op {
            SlotOp::Read if slot.error == 0 => {
                if structured {
                    if let Some(hdr) =
                        proto::encode_offset_data_header(proto::reply::FLAG_DONE, h, slot.req.offset, slot.req.length)
                    {
                        slot.hdr[..28].copy_from_slice(&hdr);
                        slot.hdr_len = 28;
                    }
                } else {
                    slot.hdr[..16].copy_from_slice(&proto::encode_simple_reply(0, h));
                    slot.hdr_len = 16;
                }
                slot.data_len = slot.req.length as usize;
            }
            SlotOp::BlockStatus if slot.error == 0 => {
                // Holes as the bdev reports them (BlockDev::block_status); without an answer, allocated data
                // (status 0), which the protocol allows for any block.
                let all = [(slot.req.length, 0)];
                let ext: &[(u32, u32)] = if self.extents.is_empty() { &all } else { &self.extents };
                proto::encode_block_status(&mut slot.extra, h, super::handshake::BASE_ALLOCATION_ID, ext);
            }
            _ => {
                if structured && slot.error != 0 {
                    proto::encode_structured_error(&mut slot.extra, h, slot.error, error_text(slot.error));
                } else if slot.req.kind == cmd::READ {
                    // Simple reply to a failed read: error, no payload.
                    slot.hdr[..16].copy_from_slice(&proto::encode_simple_reply(slot.error, h));
                    slot.hdr_len = 16;
                } else {
                    slot.hdr[..16].copy_from_slice(&proto::encode_simple_reply(slot.error, h));
                    slot.hdr_len = 16;
                }
            }
        }
        self.running.retain(|&x| x != s);
        self.replies.push_back(s);
    }

    /// One round of transmission work: retry submissions, run stalled slots, parse requests, send replies.
    pub fn poll_io(&mut self, ch: &mut dyn IoChannel, stopping: bool) -> bool {
        let mut busy = false;
        // Resubmit what the channel refused as busy (and complete what it refused as invalid).
        let n = self.retry.len();
        for _ in 0..n {
            let Some(io) = self.retry.pop_front() else { break };
            if let IoStatus::Failed(_) = io.status {
                self.complete(io, ch);
                busy = true;
                continue;
            }
            match ch.submit(io) {
                Ok(()) => busy = true,
                Err(r) => {
                    if let SubmitError::Invalid(e) = r.why {
                        let mut io = r.io;
                        io.status = IoStatus::Failed(e);
                        self.complete(io, ch);
                    } else {
                        self.retry.push_back(r.io);
                        break;
                    }
                }
            }
        }
        if !self.running.is_empty() && !self.descs.is_empty() {
            let run: Vec<usize> = std::mem::take(&mut self.running);
            for s in run {
                self.advance(s, ch);
            }
            busy = true;
        }
        if !self.dead {
            if stopping && self.drain_deadline.is_none() {
                self.drain_deadline = Some(Instant::now() + DRAIN_DEADLINE);
            }
            if !stopping && !self.disc {
                busy |= self.receive(ch);
            }
            busy |= self.send();
        }
        let idle = self.outstanding == 0 && self.retry.is_empty() && self.running.is_empty();
        let nothing_to_send = self.replies.is_empty() && !self.tls.as_ref().is_some_and(|t| t.pending_output());
        let receiving = matches!(self.recv, RecvState::Payload { .. } | RecvState::Discard { .. });
        if !self.dead && idle && nothing_to_send && (self.disc || (stopping && !receiving)) {
            self.close(if self.disc { "client disconnected" } else { "server stopping" });
        }
        if let Some(d) = self.drain_deadline {
            if !self.dead && Instant::now() > d {
                self.close("drain deadline passed");
            }
        }
        if self.dead && !matches!(self.phase, Phase::Closed) {
            self.phase = Phase::Closed;
        }
        busy
    }

    fn compact(&mut self) {
        if self.rstart == self.rend {
            self.rstart = 0;
            self.rend = 0;
        } else if self.rstart > RBUF_BYTES / 2 {
            self.rbuf.copy_within(self.rstart..self.rend, 0);
            self.rend -= self.rstart;
            self.rstart = 0;
        }
    }

    fn fill(&mut self) -> Option<bool> {
        self.compact();
        if self.rend == RBUF_BYTES {
            return Some(false);
        }
        match self.read_rbuf() {
            Io::Done(n) => {
                self.rend += n;
                Some(true)
            }
            Io::Again => Some(false),
            Io::Eof | Io::Err => None,
        }
    }

    /// Read and parse requests while there is room for them.
    fn receive(&mut self, ch: &mut dyn IoChannel) -> bool {
        let mut busy = false;
        let mut read_once = false;
        loop {
            match self.recv {
                RecvState::Payload { slot, got } => {
                    let need = self.slots[slot].req.length as usize - got;
                    let chunk = CHUNK_BYTES as usize;
                    let bi = got / chunk;
                    let off = got % chunk;
                    let room = (chunk - off).min(need);
                    let Some(buf) = self.slots[slot].bufs.get_mut(bi) else {
                        self.close("internal: write payload without buffer");
                        return true;
                    };
                    let avail = self.rend - self.rstart;
                    let n = if avail > 0 {
                        let n = avail.min(room);
                        let _ = buf.write_at(off, &self.rbuf[self.rstart..self.rstart + n]);
                        self.rstart += n;
                        n
                    } else if self.tls.is_some() {
                        // TLS decrypts into the receive buffer; the next round copies from there.
                        match self.fill() {
                            Some(true) => continue,
                            Some(false) => return busy,
                            None => {
                                self.close("socket closed during a write payload");
                                return true;
                            }
                        }
                    } else {
                        // SAFETY: off + room <= CHUNK_BYTES, inside the buffer this slot owns.
                        let p = unsafe { buf.as_ptr().add(off) };
                        match sys_read(self.stream.fd(), p, room) {
                            Io::Done(n) => n,
                            Io::Again => return busy,
                            Io::Eof | Io::Err => {
                                self.close("socket closed during a write payload");
                                return true;
                            }
                        }
                    };
                    busy = true;
                    let got = got + n;
                    if got == self.slots[slot].req.length as usize {
                        self.recv = RecvState::Header;
                        self.advance(slot, ch);
                    } else {
                        self.recv = RecvState::Payload { slot, got };
                    }
                }
                RecvState::Discard { slot, left } => {
                    let avail = self.rend - self.rstart;
                    if avail == 0 {
                        match self.fill() {
                            Some(true) => continue,
                            Some(false) => return busy,
                            None => {
                                self.close("socket closed");
                                return true;
                            }
                        }
                    }
                    let n = avail.min(left);
                    self.rstart += n;
                    busy = true;
                    if n == left {
                        self.recv = RecvState::Header;
                        self.finish(slot);
                    } else {
                        self.recv = RecvState::Discard { slot, left: left - n };
                    }
                }
                RecvState::Header => {
                    if self.rend - self.rstart < proto::REQUEST_BYTES {
                        if read_once && self.rend > self.rstart {
                            // Partial header: wait for more.
                        }
                        match self.fill() {
                            Some(true) => {
                                read_once = true;
                                busy = true;
                                continue;
                            }
                            Some(false) => return busy,
                            None => {
                                self.close("client closed the connection");
                                return true;
                            }
                        }
                    }
                    match self.parse_one(ch) {
                        Parse::Stall => return busy,
                        Parse::Progress => busy = true,
                        Parse::Closed => return true,
                    }
                }
            }
        }
    }

    fn parse_one(&mut self, ch: &mut dyn IoChannel) -> Parse {
        let req = match proto::parse_request(&self.rbuf[self.rstart..self.rstart + proto::REQUEST_BYTES]) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(conn = self.index, error = %e, "nbd: bad request header; disconnecting");
                self.close("bad request magic");
                return Parse::Closed;
            }
        };
        let checked = proto::check_request(&req, &self.limits, self.structured, self.base_allocation);
        if req.kind == cmd::DISC && checked == Checked::Go {
            self.rstart += proto::REQUEST_BYTES;
            self.disc = true;
            return Parse::Stall;
        }
        if checked == Checked::Disconnect {
            self.close("request cannot be answered (payload too large to skip)");
            return Parse::Closed;
        }
        let Some(&s) = self.free_slots.last() else { return Parse::Stall };
        let chunks = |len: u64| len.div_ceil(u64::from(CHUNK_BYTES)) as usize;
        let (op, nbufs) = match checked {
            Checked::Error(_) => (SlotOp::Reply, 0),
            _ => match req.kind {
                cmd::READ => (SlotOp::Read, chunks(u64::from(req.length))),
                cmd::WRITE => (SlotOp::Write, chunks(u64::from(req.length))),
                cmd::FLUSH => (SlotOp::Flush, 0),
                cmd::TRIM => (if self.native_trim { SlotOp::Trim } else { SlotOp::Reply }, 0),
                cmd::WRITE_ZEROES => {
                    if self.native_zero {
                        (SlotOp::ZeroNative, 0)
                    } else {
                        (SlotOp::ZeroEmulated, 0)
                    }
                }
                cmd::CACHE => (SlotOp::Cache, chunks(u64::from(req.length).min(self.part_bytes))),
                cmd::BLOCK_STATUS => (SlotOp::BlockStatus, 0),
                _ => (SlotOp::Reply, 0),
            },
        };
        let Some(res) = self.res.as_mut() else {
            self.close("internal: no resources");
            return Parse::Closed;
        };
        if res.pool.available() < nbufs {
            return Parse::Stall;
        }
        self.free_slots.pop();
        self.rstart += proto::REQUEST_BYTES;
        let fua = req.flags & cflag::FUA != 0;
        let slot = &mut self.slots[s];
        slot.req = req;
        slot.op = op;
        slot.error = if let Checked::Error(e) = checked { e } else { 0 };
        slot.next = 0;
        slot.end = match op {
            SlotOp::Flush => 1,
            SlotOp::Reply | SlotOp::BlockStatus => 0,
            _ => u64::from(req.length),
        };
        slot.inflight = 0;
        slot.flush_issued = false;
        slot.started = Instant::now();
        slot.fua_flush = fua
            && !matches!(op, SlotOp::Reply | SlotOp::Flush | SlotOp::Read | SlotOp::Cache | SlotOp::BlockStatus)
            && !(op == SlotOp::Write && self.native_fua);
        for _ in 0..nbufs {
            match res.pool.get() {
                Some(b) => slot.bufs.push(b),
                None => break,
            }
        }
        if op == SlotOp::ZeroEmulated && req.flags & cflag::FAST_ZERO != 0 {
            // Zeroing would be a stream of writes: not fast. The protocol wants ENOTSUP at once.
            slot.op = SlotOp::Reply;
            slot.error = errno::ENOTSUP;
            slot.end = 0;
            slot.fua_flush = false;
        }
        if req.kind == cmd::WRITE {
            if slot.error != 0 {
                self.recv = RecvState::Discard { slot: s, left: req.length as usize };
                if req.length == 0 {
                    self.recv = RecvState::Header;
                    self.finish(s);
                }
            } else {
                self.recv = RecvState::Payload { slot: s, got: 0 };
            }
            return Parse::Progress;
        }
        self.advance(s, ch);
        Parse::Progress
    }

    /// Send queued replies with writev.
    fn send(&mut self) -> bool {
        let mut busy = false;
        if let Some(t) = self.tls.as_mut() {
            match t.flush(self.stream.fd()) {
                Ok(b) => busy |= b,
                Err(()) => {
                    self.close("socket write failed");
                    return true;
                }
            }
        }
        loop {
            if self.replies.is_empty() {
                return busy;
            }
            self.iov.clear();
            let mut skip = self.reply_skip;
            for &s in self.replies.iter() {
                if self.iov.len() + 4 + (MAX_REQUEST_BYTES / CHUNK_BYTES) as usize > MAX_IOV {
                    break;
                }
                let slot = &self.slots[s];
                let mut push = |ptr: *const u8, len: usize, iov: &mut Vec<libc::iovec>| {
                    if skip >= len {
                        skip -= len;
                        return;
                    }
                    // SAFETY: skip < len, so the pointer stays inside the piece.
                    let p = unsafe { ptr.add(skip) };
                    iov.push(libc::iovec { iov_base: p as *mut libc::c_void, iov_len: len - skip });
                    skip = 0;
                };
                push(slot.hdr.as_ptr(), slot.hdr_len, &mut self.iov);
                let mut left = slot.data_len;
                for b in &slot.bufs {
                    if left == 0 {
                        break;
                    }
                    let n = left.min(b.len() as usize);
                    push(b.as_ptr(), n, &mut self.iov);
                    left -= n;
                }
                push(slot.extra.as_ptr(), slot.extra.len(), &mut self.iov);
            }
            if self.iov.is_empty() {
                // Every queued reply was already sent (zero-length cannot happen, but be safe).
                while let Some(s) = self.replies.pop_front() {
                    self.free_slot(s);
                }
                self.reply_skip = 0;
                return busy;
            }
            let n = if let Some(t) = self.tls.as_mut() {
                // SAFETY: as for writev below: the iovecs point into live slot headers, extra Vecs or arena
                // buffers of this connection, none modified (nor under device I/O) until the reply is sent.
                match unsafe { t.write_iov(self.stream.fd(), &self.iov) } {
                    TlsIo::Done(n) => n as isize,
                    TlsIo::Again => return busy,
                    TlsIo::Eof | TlsIo::Err => {
                        self.close("TLS write failed");
                        return true;
                    }
                }
            } else {
                // SAFETY: each iovec points into a live slot header, extra Vec or arena buffer owned by this
                // connection; none is modified until the reply is fully sent. The iovec count is at most MAX_IOV.
                unsafe { libc::writev(self.stream.fd(), self.iov.as_ptr(), self.iov.len() as i32) }
            };
            if n < 0 {
                match std::io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) | Some(libc::EINTR) => return busy,
                    _ => {
                        self.close("socket write failed");
                        return true;
                    }
                }
            }
            busy = true;
            let mut sent = n as usize + self.reply_skip;
            self.reply_skip = 0;
            while let Some(&s) = self.replies.front() {
                let len = self.slots[s].reply_len();
                if sent >= len {
                    sent -= len;
                    self.replies.pop_front();
                    self.free_slot(s);
                } else {
                    self.reply_skip = sent;
                    break;
                }
            }
            if self.reply_skip > 0 {
                // Partial write: the socket is full.
                return busy;
            }
        }
    }
}

enum Parse {
    Stall,
    Progress,
    Closed,
}

fn map_io_error(e: IoError) -> u32 {
    match e {
        IoError::OutOfRange { .. } => errno::ENOSPC,
        IoError::Misaligned { .. } | IoError::BadLength { .. } | IoError::Unsupported { .. } => errno::EINVAL,
        IoError::Os { errno: e } if e == libc::ENOSPC || e == libc::EDQUOT || e == libc::EFBIG => errno::ENOSPC,
        IoError::Aborted => errno::ESHUTDOWN,
        _ => errno::EIO,
    }
}

fn error_text(e: u32) -> &'static str {
    match e {
        errno::EPERM => "export is read-only",
        errno::EINVAL => "invalid request (range, alignment, flags or command)",
        errno::ENOSPC => "request beyond the end of the export",
        errno::EOVERFLOW => "request too large for an unfragmented reply",
        errno::ENOTSUP => "fast zeroing is not supported by this export",
        errno::ESHUTDOWN => "server is shutting down",
        _ => "I/O error",
    }
}
