//! The NBD server: an acceptor thread hands sockets round-robin to one poller per reactor; each reactor's poller
//! owns its connections and one channel per exported bdev, and routes completions back to connections.
//!
//! Why one poller per reactor rather than one per connection: a bdev gives a reactor one channel (for NVMe, one
//! queue pair), shared by every connection on that reactor; the channel's completions come back mixed, and the
//! reactor's poller routes them by the connection index carried in each descriptor. No lock is taken on the way.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_queue::ArrayQueue;
use nvstack_blockdev::bdev::ChannelOpts;
use nvstack_blockdev::reactor::{PollOutcome, Poller, ReactorCtx, Reactors};
use nvstack_blockdev::{IoChannel, IoDesc};
use nvstack_driver::dma::{Arena, BufPool};

use super::conn::{Conn, ConnRes, HandshakeStep, Stream, BUFS_PER_CONN, CHUNK_BYTES};
use super::tls::TlsSetup;
use crate::error::AppError;
use crate::serve::registry::{BdevEntry, Registry};

/// Where and how to listen.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// TCP address (None: no TCP).
    pub tcp: Option<SocketAddr>,
    /// Unix socket path (None: none).
    pub unix: Option<PathBuf>,
    /// Most connections at once (each holds `BUFS_PER_CONN` × `CHUNK_BYTES` of the arena).
    pub max_connections: usize,
    /// When a reactor's NBD work is idle (no I/O in flight), wait this long in epoll for a socket to become
    /// readable instead of spinning (0: pure busy polling, SPDK style).
    pub idle_wait_ms: i32,
    /// TLS credentials and mode (None: plaintext only, `NBD_OPT_STARTTLS` refused).
    pub tls: Option<Arc<TlsSetup>>,
}

impl NbdConfig {
    /// Arena bytes the server carves at start.
    pub fn arena_bytes(&self) -> u64 {
        (self.max_connections as u64) * u64::from(BUFS_PER_CONN) * u64::from(CHUNK_BYTES) + u64::from(CHUNK_BYTES) + (4 << 20)
    }
}

/// A running NBD server.
#[derive(Debug)]
pub struct NbdServer {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
    /// The TCP address bound (with the real port when 0 was asked).
    pub tcp_addr: Option<SocketAddr>,
    /// The Unix socket path.
    pub unix_path: Option<PathBuf>,
    /// The TLS credentials directory when TLS is on.
    pub tls_dir: Option<PathBuf>,
}

impl NbdServer {
    /// Stop accepting (connections are drained by the reactors' stop).
    pub fn stop_accepting(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.unix_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for NbdServer {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

/// Bind the listeners, carve connection resources, put a poller on every reactor and start accepting.
///
/// # Errors
/// [`AppError::Listen`] when a socket cannot be bound, [`AppError::Driver`] when the arena is too small.
pub fn start(cfg: &NbdConfig, arena: &Arc<Arena>, reactors: &Reactors, registry: Arc<Registry>) -> Result<NbdServer, AppError> {
    let tcp = match cfg.tcp {
        Some(a) => Some(TcpListener::bind(a).map_err(|source| AppError::Listen { what: a.to_string(), source })?),
        None => None,
    };
    let unix = match &cfg.unix {
        Some(p) => {
            if p.exists() {
                // A stale socket from a killed run: only remove a socket, never another file.
                use std::os::unix::fs::FileTypeExt;
                if std::fs::symlink_metadata(p).map(|m| m.file_type().is_socket()).unwrap_or(false) {
                    let _ = std::fs::remove_file(p);
                }
            }
            Some(UnixListener::bind(p).map_err(|source| AppError::Listen { what: p.display().to_string(), source })?)
        }
        None => None,
    };
    if let Some(t) = &cfg.tls {
        tracing::info!(dir = %t.dir.display(), mode = ?t.mode, verify_peer = t.verify_peer, "nbd: TLS on (STARTTLS)");
    }
    let zero = Arc::new(arena.carve(u64::from(CHUNK_BYTES), 4096, "nbd zero chunk")?);
    zero.zero(0, u64::from(CHUNK_BYTES));
    let free = Arc::new(ArrayQueue::new(cfg.max_connections.max(1)));
    for _ in 0..cfg.max_connections.max(1) {
        let pool = BufPool::new(arena, CHUNK_BYTES, BUFS_PER_CONN, 4096, "nbd connection buffers")?;
        let _ = free.push(ConnRes { pool, zero: Arc::clone(&zero), client: 0 });
    }
    let n = reactors.count();
    let mut inboxes = Vec::with_capacity(n);
    for i in 0..n {
        let inbox = Arc::new(ArrayQueue::new(cfg.max_connections.max(1)));
        inboxes.push(Arc::clone(&inbox));
        // SAFETY: epoll_create1 with a valid flag; the fd is owned by the poller and closed in its Drop.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(AppError::Listen { what: "epoll".into(), source: std::io::Error::last_os_error() });
        }
        let p = ReactorPoller {
            epfd,
            idle_rounds: 0,
            wait_ms: cfg.idle_wait_ms,
            inbox,
            free: Arc::clone(&free),
            removals_seen: registry.removals(),
            registry: Arc::clone(&registry),
            tls: cfg.tls.clone(),
            conns: Vec::with_capacity(cfg.max_connections),
            chans: Vec::with_capacity(8),
            done: Vec::with_capacity(256),
        };
        reactors.add_poller(i, Box::new(p), Duration::from_secs(5))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    let acc = Acceptor { tcp, unix, inboxes, free, stop: Arc::clone(&stop), next: 0, accepted: 0 };
    let acceptor = std::thread::Builder::new()
        .name("nbd-accept".into())
        .spawn(move || acc.run())
        .map_err(|source| AppError::Listen { what: "acceptor thread".into(), source })?;
    let tls_dir = cfg.tls.as_ref().map(|t| t.dir.clone());
    Ok(NbdServer { stop, acceptor: Some(acceptor), tcp_addr, unix_path: cfg.unix.clone(), tls_dir })
}

struct Acceptor {
    tcp: Option<TcpListener>,
    unix: Option<UnixListener>,
    inboxes: Vec<Arc<ArrayQueue<(Stream, ConnRes)>>>,
    free: Arc<ArrayQueue<ConnRes>>,
    stop: Arc<AtomicBool>,
    next: usize,
    /// The last connection number given.
    accepted: u16,
}

impl Acceptor {
    fn run(mut self) {
        if let Some(l) = &self.tcp {
            let _ = l.set_nonblocking(true);
        }
        if let Some(l) = &self.unix {
            let _ = l.set_nonblocking(true);
        }
        while !self.stop.load(Ordering::Acquire) {
            let mut fds = Vec::with_capacity(2);
            if let Some(l) = &self.tcp {
                fds.push(libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            if let Some(l) = &self.unix {
                fds.push(libc::pollfd { fd: l.as_raw_fd(), events: libc::POLLIN, revents: 0 });
            }
            // SAFETY: fds is a valid array of pollfd of the given length; 100 ms deadline.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            if r <= 0 {
                continue;
            }
            loop {
                let s = match self.tcp.as_ref().map(|l| l.accept()) {
                    Some(Ok((s, peer))) => {
                        let _ = s.set_nodelay(true);
                        Some((Stream::Tcp(s), peer.to_string()))
                    }
                    _ => None,
                };
                let s = s.or_else(|| match self.unix.as_ref().map(|l| l.accept()) {
                    Some(Ok((s, _))) => Some((Stream::Unix(s), "unix socket".to_owned())),
                    _ => None,
                });
                let Some((s, peer)) = s else { break };
                self.hand_off(s, &peer);
            }
        }
    }

    fn hand_off(&mut self, s: Stream, peer: &str) {
        let ok = match &s {
            Stream::Tcp(t) => t.set_nonblocking(true).is_ok(),
            Stream::Unix(u) => u.set_nonblocking(true).is_ok(),
        };
        if !ok {
            return;
        }
        let Some(mut res) = self.free.pop() else {
            tracing::warn!(peer, "nbd: connection limit reached; refusing a connection (raise --max-connections)");
            return;
        };
        self.accepted = nvstack_blockdev::client::next_external(self.accepted);
        res.client = self.accepted;
        tracing::info!(client = res.client, peer, "nbd: connection accepted (its writes are tagged with this client number)");
        let mut item = (s, res);
        for k in 0..self.inboxes.len() {
            let i = (self.next + k) % self.inboxes.len();
            match self.inboxes[i].push(item) {
                Ok(()) => {
                    self.next = i + 1;
                    return;
                }
                Err(back) => item = back,
            }
        }
        let _ = self.free.push(item.1);
    }
}

struct ChanEntry {
    bdev_id: u64,
    ch: Box<dyn IoChannel>,
    users: usize,
    entry: Arc<BdevEntry>,
    /// Shutdown flush: None (not started), Some(false) in flight, Some(true) done.
    flushed: Option<bool>,
}

struct ReactorPoller {
    epfd: i32,
    idle_rounds: u32,
    wait_ms: i32,
    inbox: Arc<ArrayQueue<(Stream, ConnRes)>>,
    free: Arc<ArrayQueue<ConnRes>>,
    registry: Arc<Registry>,
    /// [`Registry::removals`] when this reactor last closed its channels to removed bdevs.
    removals_seen: u64,
    tls: Option<Arc<TlsSetup>>,
    conns: Vec<Option<Conn>>,
    chans: Vec<Option<ChanEntry>>,
    #[allow(clippy::vec_box)] // Descriptors travel as Box<IoDesc> (the IoChannel contract).
    done: Vec<Box<IoDesc>>,
}

impl Drop for ReactorPoller {
    fn drop(&mut self) {
        // SAFETY: closing the epoll fd this poller created and owns.
        unsafe { libc::close(self.epfd) };
    }
}

/// Idle rounds before a reactor waits in epoll.
const IDLE_ROUNDS_BEFORE_WAIT: u32 = 2;

/// Queue depth of a reactor's channel to one bdev.
const CHANNEL_QUEUE_DEPTH: u32 = 1024;

impl ReactorPoller {
    fn channel_for(&mut self, ctx: &ReactorCtx, bdev_id: u64) -> Option<usize> {
        if let Some(i) = self.chans.iter().position(|c| c.as_ref().is_some_and(|c| c.bdev_id == bdev_id)) {
            if let Some(c) = self.chans[i].as_mut() {
                c.users += 1;
                c.entry.connections.fetch_add(1, Ordering::AcqRel);
            }
            return Some(i);
        }
        let entry = self.registry.bdevs().into_iter().find(|b| b.id == bdev_id)?;
        let ch = match entry.bdev.open_channel(ChannelOpts { reactor_index: ctx.index(), queue_depth: CHANNEL_QUEUE_DEPTH }) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(bdev = entry.bdev.name(), error = %e, "nbd: opening a channel failed");
                return None;
            }
        };
        entry.connections.fetch_add(1, Ordering::AcqRel);
        let e = ChanEntry { bdev_id, ch, users: 1, entry, flushed: None };
        if let Some(i) = self.chans.iter().position(Option::is_none) {
            self.chans[i] = Some(e);
            Some(i)
        } else {
            self.chans.push(Some(e));
            Some(self.chans.len() - 1)
        }
    }
}

impl ReactorPoller {
    /// Close the channels no connection uses to bdevs removed from the registry (a cache being deleted waits for
    /// every channel to it to close). Channels otherwise stay open for the reactor's life.
    fn close_removed_channels(&mut self) -> bool {
        let removals = self.registry.removals();
        if removals == self.removals_seen {
            return false;
        }
        self.removals_seen = removals;
        let live = self.registry.bdevs();
        let mut closed = false;
        for slot in self.chans.iter_mut() {
            let gone = slot.as_ref().is_some_and(|ce| ce.users == 0 && !live.iter().any(|b| b.id == ce.bdev_id));
            if gone {
                if let Some(ce) = slot.take() {
                    tracing::info!(bdev = ce.entry.bdev.name(), "nbd: closing this reactor's channel to a removed bdev");
                }
                closed = true;
            }
        }
        if closed {
            while matches!(self.chans.last(), Some(None)) {
                self.chans.pop();
            }
        }
        closed
    }

    /// Shutdown: write back and flush every channel once, then report whether all flushes finished.
    fn flush_channels(&mut self) -> bool {
        let mut all = true;
        for ce in self.chans.iter_mut().flatten() {
            match ce.flushed {
                Some(true) => {}
                None => {
                    let mut io = IoDesc::new(1);
                    io.prepare(nvstack_blockdev::IoOp::Flush, 0, 0);
                    io.ctx = u64::MAX;
                    match ce.ch.submit(io) {
                        Ok(()) => ce.flushed = Some(false),
                        Err(r) if matches!(r.why, nvstack_blockdev::SubmitError::Busy) => {}
                        Err(r) => {
                            tracing::error!(bdev = ce.entry.bdev.name(), why = ?r.why, "shutdown flush refused");
                            ce.flushed = Some(true);
                        }
                    }
                    all = false;
                }
                Some(false) => {
                    self.done.clear();
                    ce.ch.poll(&mut self.done);
                    for io in self.done.drain(..) {
                        if io.ctx == u64::MAX {
                            if io.status != nvstack_blockdev::IoStatus::Success {
                                tracing::error!(bdev = ce.entry.bdev.name(), status = ?io.status, "shutdown flush failed");
                            } else {
                                ce.entry.reactor_flushed.store(true, Ordering::Release);
                            }
                            ce.flushed = Some(true);
                        }
                    }
                    all &= ce.flushed == Some(true);
                }
            }
        }
        all
    }
}

impl Poller for ReactorPoller {
    fn poll(&mut self, ctx: &mut ReactorCtx) -> PollOutcome {
        let mut busy = false;
        let stopping = ctx.stopping();
        if !stopping {
            busy |= self.close_removed_channels();
        }
        while let Some((s, res)) = self.inbox.pop() {
            let idx = self.conns.iter().position(Option::is_none).unwrap_or(self.conns.len());
            let c = Conn::new(s, res, idx, self.tls.clone());
            let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: idx as u64 };
            // SAFETY: valid epoll fd, the connection's open socket fd, and a valid event struct.
            unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, c.fd(), &mut ev) };
            if idx == self.conns.len() {
                self.conns.push(Some(c));
            } else {
                self.conns[idx] = Some(c);
            }
            busy = true;
        }
        // Completions, routed by connection index.
        for ce in self.chans.iter_mut().flatten() {
            loop {
                let n = ce.ch.poll(&mut self.done);
                for io in self.done.drain(..) {
                    if io.ctx == u64::MAX {
                        // The shutdown flush (see flush_channels).
                        if io.status == nvstack_blockdev::IoStatus::Success {
                            ce.entry.reactor_flushed.store(true, Ordering::Release);
                        } else {
                            tracing::error!(bdev = ce.entry.bdev.name(), status = ?io.status, "shutdown flush failed");
                        }
                        ce.flushed = Some(true);
                        continue;
                    }
                    if let Some(Some(c)) = self.conns.get_mut(io.ctx as usize) {
                        c.complete(io, ce.ch.as_mut());
                    }
                }
                if n == 0 {
                    break;
                }
                busy = true;
            }
        }
        for i in 0..self.conns.len() {
            let Some(c) = self.conns[i].as_mut() else { continue };
            if c.in_handshake() && stopping {
                c.abort("server stopping");
            }
            if c.in_handshake() {
                let (b, step) = c.poll_handshake(&self.registry);
                busy |= b;
                if let HandshakeStep::Attach(n) = step {
                    let export = self.registry.export_by_id(n.export.id);
                    match export {
                        Some(x) => {
                            let bdev_id = x.bdev.id;
                            match self.channel_for(ctx, bdev_id) {
                                Some(ch) => {
                                    if let Some(c) = self.conns[i].as_mut() {
                                        c.attach(n, x, ch);
                                    }
                                }
                                None => {
                                    self.conns[i] = None;
                                    continue;
                                }
                            }
                        }
                        None => {
                            self.conns[i] = None;
                            continue;
                        }
                    }
                }
            }
            let Some(c) = self.conns[i].as_mut() else { continue };
            if c.transmitting() || (!c.in_handshake() && c.chan != usize::MAX) {
                if let Some(Some(ce)) = self.chans.get_mut(c.chan) {
                    busy |= c.poll_io(ce.ch.as_mut(), stopping);
                }
            }
            if c.finished() {
                let chan = c.chan;
                // SAFETY: removing the still-open socket fd from our epoll set.
                unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_DEL, c.fd(), std::ptr::null_mut()) };
                if let Some(res) = c.take_res() {
                    let _ = self.free.push(res);
                }
                self.conns[i] = None;
                // Channels stay open for the reactor's life: a stacked bdev (the cache) keeps its state in its
                // channel, which is flushed and closed only at shutdown.
                if let Some(Some(ce)) = self.chans.get_mut(chan) {
                    ce.users -= 1;
                    ce.entry.connections.fetch_sub(1, Ordering::AcqRel);
                }
                busy = true;
            }
        }
        while matches!(self.conns.last(), Some(None)) {
            self.conns.pop();
        }
        if stopping && self.conns.is_empty() && self.inbox.is_empty() {
            if self.flush_channels() {
                return PollOutcome::Done;
            }
            return PollOutcome::Busy;
        }
        if busy {
            self.idle_rounds = 0;
            return PollOutcome::Busy;
        }
        self.idle_rounds = self.idle_rounds.saturating_add(1);
        if self.wait_ms > 0
            && !stopping
            && self.idle_rounds > IDLE_ROUNDS_BEFORE_WAIT
            && self.chans.iter().flatten().all(|c| c.ch.outstanding() == 0)
            && self.conns.iter().flatten().all(|c| !c.needs_polling())
        {
            // Interrupt mode: nothing is in flight, so sleep until a socket is readable (or a short deadline,
            // for new connections and the stop flag).
            let mut evs = [libc::epoll_event { events: 0, u64: 0 }; 16];
            // SAFETY: valid epoll fd and a valid event array of the given length.
            unsafe { libc::epoll_wait(self.epfd, evs.as_mut_ptr(), 16, self.wait_ms) };
            self.idle_rounds = 0;
        }
        PollOutcome::Idle
    }
}
