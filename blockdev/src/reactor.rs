//! Reactors: one pinned polling thread per core in the core mask.
//!
//! A reactor owns its pollers and runs each to completion, round after round. Nothing on it takes a lock or blocks.
//! Work crosses cores only as [`Msg`]s on bounded lock-free rings (crossbeam `ArrayQueue`, one inbox per reactor);
//! a full ring is back-pressure reported to the sender.
//!
//! Shutdown: [`Reactors::stop`] raises the stop flag. Each reactor then keeps polling its pollers (which see
//! [`ReactorCtx::stopping`] and stop starting new work) until every poller reports [`PollOutcome::Done`] or the
//! drain deadline passes, then exits. The threads are joined.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_queue::ArrayQueue;
use hwlocality::cpu::binding::CpuBindingFlags;
use hwlocality::cpu::cpuset::CpuSet;
use hwlocality::object::types::ObjectType;
use hwlocality::Topology;

use crate::BdevError;

/// Default entries per reactor inbox (a limit in DESIGN.md).
pub const DEFAULT_RING_ENTRIES: usize = 4096;
/// Default time a stopping reactor waits for its pollers to drain.
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What one poll round of a poller did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PollOutcome {
    /// Nothing to do.
    Idle,
    /// Did some work.
    Busy,
    /// Finished: remove me.
    Done,
}

/// Something a reactor polls, to completion, round after round.
pub trait Poller: Send {
    /// One round. Must not block.
    fn poll(&mut self, ctx: &mut ReactorCtx) -> PollOutcome;
}

/// A plain function call carried to another reactor: no allocation.
pub type MsgFn = fn(&mut ReactorCtx, usize, usize);

/// A message to a reactor.
pub enum Msg {
    /// Call `f(ctx, a, b)` on the target reactor (the I/O path's form: no allocation).
    Call {
        /// The function.
        f: MsgFn,
        /// First argument.
        a: usize,
        /// Second argument.
        b: usize,
    },
    /// Start polling this poller (set-up path).
    AddPoller(Box<dyn Poller>),
    /// Run a closure once (control path only: it allocates).
    Run(Box<dyn FnOnce(&mut ReactorCtx) + Send>),
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Call { a, b, .. } => write!(f, "Msg::Call({a}, {b})"),
            Msg::AddPoller(_) => write!(f, "Msg::AddPoller"),
            Msg::Run(_) => write!(f, "Msg::Run"),
        }
    }
}

/// How to start the reactors.
#[derive(Debug, Clone)]
pub struct ReactorConfig {
    /// OS core ids, one reactor each (from [`crate::coremask::parse`]).
    pub cores: Vec<usize>,
    /// Inbox entries per reactor.
    pub ring_entries: usize,
    /// Pin threads to their cores (hwloc). Off only for tests on busy machines.
    pub pin: bool,
    /// After this many idle rounds in a row, sleep briefly between rounds (None: pure busy polling, as SPDK).
    pub idle_backoff_rounds: Option<u32>,
    /// How long a stopping reactor waits for its pollers.
    pub drain_timeout: Duration,
}

impl ReactorConfig {
    /// Defaults for the given cores: pinned, busy polling.
    pub fn new(cores: Vec<usize>) -> Self {
        ReactorConfig {
            cores,
            ring_entries: DEFAULT_RING_ENTRIES,
            pin: true,
            idle_backoff_rounds: None,
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
        }
    }
}

/// Counters per reactor, readable from any thread.
#[derive(Debug, Default)]
pub struct ReactorStats {
    /// Poll rounds in which some poller was busy.
    pub busy_rounds: AtomicU64,
    /// Poll rounds in which all were idle.
    pub idle_rounds: AtomicU64,
    /// Messages handled.
    pub messages: AtomicU64,
    /// Pollers currently registered.
    pub pollers: AtomicUsize,
}

struct Shared {
    inboxes: Box<[ArrayQueue<Msg>]>,
    cores: Vec<usize>,
    numa_nodes: Vec<Option<usize>>,
    stats: Box<[ReactorStats]>,
    stop: AtomicBool,
    topology: Option<Topology>,
}

/// What a poller sees of its reactor.
pub struct ReactorCtx {
    index: usize,
    shared: Arc<Shared>,
    new_pollers: Vec<Box<dyn Poller>>,
    stop_requested_locally: bool,
}

impl ReactorCtx {
    /// This reactor's index (0-based, in core-mask order).
    #[inline]
    pub fn index(&self) -> usize {
        self.index
    }
    /// This reactor's OS core id.
    pub fn core(&self) -> usize {
        self.shared.cores[self.index]
    }
    /// Number of reactors.
    #[inline]
    pub fn reactor_count(&self) -> usize {
        self.shared.cores.len()
    }
    /// Whether shutdown has begun: start no new work.
    #[inline]
    pub fn stopping(&self) -> bool {
        self.stop_requested_locally || self.shared.stop.load(Ordering::Relaxed)
    }
    /// Send a message to reactor `to` (possibly this one).
    ///
    /// # Errors
    /// Gives the message back when the target's ring is full (back-pressure) or the index is out of range.
    #[inline]
    pub fn send(&self, to: usize, msg: Msg) -> Result<(), Msg> {
        match self.shared.inboxes.get(to) {
            Some(q) => q.push(msg),
            None => Err(msg),
        }
    }
    /// Add a poller to this reactor (it starts next round).
    pub fn add_poller(&mut self, p: Box<dyn Poller>) {
        self.new_pollers.push(p);
    }
}

/// The running reactors.
pub struct Reactors {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl std::fmt::Debug for Reactors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactors").field("cores", &self.shared.cores).finish()
    }
}

fn numa_node_of(topology: &Topology, core: usize) -> Option<usize> {
    topology
        .objects_with_type(ObjectType::NUMANode)
        .find(|node| node.cpuset().is_some_and(|set| set.is_set(core)))
        .and_then(|node| node.os_index())
}

impl Reactors {
    /// Start one reactor thread per core, pinned to it.
    ///
    /// # Errors
    /// [`BdevError::CoreMask`] for an empty core list, [`BdevError::ReactorStart`] when a thread cannot start,
    /// [`BdevError::ReactorPin`] when pinning fails.
    pub fn start(cfg: ReactorConfig) -> Result<Reactors, BdevError> {
        if cfg.cores.is_empty() {
            return Err(BdevError::CoreMask { mask: String::new(), reason: "names no core".into() });
        }
        let topology = match Topology::new() {
            Ok(t) => Some(t),
            Err(e) => {
                if cfg.pin {
                    return Err(BdevError::ReactorPin { core: cfg.cores[0], reason: format!("hwloc topology: {e}") });
                }
                None
            }
        };
        let numa_nodes = cfg.cores.iter().map(|&c| topology.as_ref().and_then(|t| numa_node_of(t, c))).collect();
        let ring = cfg.ring_entries.max(2);
        let shared = Arc::new(Shared {
            inboxes: (0..cfg.cores.len()).map(|_| ArrayQueue::new(ring)).collect(),
            cores: cfg.cores.clone(),
            numa_nodes,
            stats: (0..cfg.cores.len()).map(|_| ReactorStats::default()).collect(),
            stop: AtomicBool::new(false),
            topology,
        });
        let mut threads = Vec::with_capacity(cfg.cores.len());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), BdevError>>();
        for (index, &core) in cfg.cores.iter().enumerate() {
            let shared_t = Arc::clone(&shared);
            let cfg_t = cfg.clone();
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("reactor_{index}"))
                .spawn(move || {
                    if cfg_t.pin {
                        if let Err(e) = pin_to(&shared_t, core) {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    }
                    let _ = ready.send(Ok(()));
                    drop(ready);
                    run(index, shared_t, &cfg_t);
                })
                .map_err(|source| BdevError::ReactorStart { index, core, source })?;
            threads.push(handle);
        }
        drop(ready_tx);
        let mut me = Reactors { shared, threads };
        for _ in 0..cfg.cores.len() {
            match ready_rx.recv_timeout(Duration::from_secs(10)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    me.shutdown_now();
                    return Err(e);
                }
                Err(_) => {
                    me.shutdown_now();
                    return Err(BdevError::ReactorPin { core: cfg.cores[0], reason: "reactor did not start in 10 s".into() });
                }
            }
        }
        tracing::info!(cores = ?cfg.cores, "reactors started");
        Ok(me)
    }

    fn shutdown_now(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }

    /// Number of reactors.
    pub fn count(&self) -> usize {
        self.shared.cores.len()
    }
    /// OS core ids, by reactor index.
    pub fn cores(&self) -> &[usize] {
        &self.shared.cores
    }
    /// NUMA node of each reactor's core, where hwloc knows it.
    pub fn numa_nodes(&self) -> &[Option<usize>] {
        &self.shared.numa_nodes
    }
    /// Counters of reactor `index`.
    pub fn stats(&self, index: usize) -> Option<&ReactorStats> {
        self.shared.stats.get(index)
    }

    /// Send a message to reactor `to`.
    ///
    /// # Errors
    /// Gives the message back when the ring is full or the index is out of range.
    pub fn send(&self, to: usize, msg: Msg) -> Result<(), Msg> {
        match self.shared.inboxes.get(to) {
            Some(q) => q.push(msg),
            None => Err(msg),
        }
    }

    /// Add a poller to reactor `to`, waiting up to `timeout` for ring space (set-up path).
    ///
    /// # Errors
    /// [`BdevError::RingFull`] if the ring stays full.
    pub fn add_poller(&self, to: usize, p: Box<dyn Poller>, timeout: Duration) -> Result<(), BdevError> {
        let deadline = Instant::now() + timeout;
        let mut msg = Msg::AddPoller(p);
        loop {
            match self.send(to, msg) {
                Ok(()) => return Ok(()),
                Err(back) => {
                    if Instant::now() > deadline || to >= self.count() {
                        return Err(BdevError::RingFull { index: to });
                    }
                    msg = back;
                    std::thread::sleep(Duration::from_micros(50));
                }
            }
        }
    }

    /// Pollers registered on all reactors (a poller counts once its message was handled).
    pub fn poller_count(&self) -> usize {
        self.shared.stats.iter().map(|s| s.pollers.load(Ordering::Acquire)).sum()
    }

    /// Wait until every reactor has no pollers and an empty inbox, or `timeout` passes. Returns whether they did.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let idle = self.poller_count() == 0 && self.shared.inboxes.iter().all(|q| q.is_empty());
            if idle {
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Stop: pollers drain (up to the drain timeout), then threads exit and are joined.
    ///
    /// # Errors
    /// [`BdevError::ReactorPanicked`] if a reactor thread panicked.
    pub fn stop(mut self) -> Result<(), BdevError> {
        self.shared.stop.store(true, Ordering::Release);
        let mut result = Ok(());
        for (index, t) in self.threads.drain(..).enumerate() {
            if t.join().is_err() {
                result = Err(BdevError::ReactorPanicked { index });
            }
        }
        tracing::info!("reactors stopped");
        result
    }
}

impl Drop for Reactors {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            self.shutdown_now();
        }
    }
}

fn pin_to(shared: &Shared, core: usize) -> Result<(), BdevError> {
    let Some(topology) = shared.topology.as_ref() else {
        return Err(BdevError::ReactorPin { core, reason: "no hwloc topology".into() });
    };
    let mut set = CpuSet::new();
    set.set(core);
    topology
        .bind_cpu(&set, CpuBindingFlags::THREAD)
        .map_err(|e| BdevError::ReactorPin { core, reason: e.to_string() })
}

fn handle(msg: Msg, ctx: &mut ReactorCtx, pollers: &mut Vec<Box<dyn Poller>>) {
    match msg {
        Msg::Call { f, a, b } => f(ctx, a, b),
        Msg::AddPoller(p) => pollers.push(p),
        Msg::Run(f) => f(ctx),
    }
}

/// Most messages handled per round, so pollers are not starved by a flood.
const MSGS_PER_ROUND: usize = 64;

fn run(index: usize, shared: Arc<Shared>, cfg: &ReactorConfig) {
    let mut pollers: Vec<Box<dyn Poller>> = Vec::with_capacity(64);
    let mut ctx = ReactorCtx { index, shared: Arc::clone(&shared), new_pollers: Vec::with_capacity(16), stop_requested_locally: false };
    let stats = &shared.stats[index];
    let inbox = &shared.inboxes[index];
    let mut idle_streak: u32 = 0;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let mut busy = false;
        for _ in 0..MSGS_PER_ROUND {
            let Some(msg) = inbox.pop() else { break };
            handle(msg, &mut ctx, &mut pollers);
            stats.messages.fetch_add(1, Ordering::Relaxed);
            busy = true;
        }
        let mut i = 0;
        while i < pollers.len() {
            match pollers[i].poll(&mut ctx) {
                PollOutcome::Idle => i += 1,
                PollOutcome::Busy => {
                    busy = true;
                    i += 1;
                }
                PollOutcome::Done => {
                    drop(pollers.swap_remove(i));
                    busy = true;
                }
            }
        }
        pollers.append(&mut ctx.new_pollers);
        stats.pollers.store(pollers.len(), Ordering::Release);
        if busy {
            stats.busy_rounds.fetch_add(1, Ordering::Relaxed);
            idle_streak = 0;
        } else {
            stats.idle_rounds.fetch_add(1, Ordering::Relaxed);
            idle_streak = idle_streak.saturating_add(1);
        }
        if shared.stop.load(Ordering::Acquire) {
            let deadline = *drain_deadline.get_or_insert_with(|| Instant::now() + cfg.drain_timeout);
            if (pollers.is_empty() && inbox.is_empty()) || Instant::now() > deadline {
                if !pollers.is_empty() {
                    tracing::warn!(reactor = index, pollers = pollers.len(), "reactor drain deadline passed; dropping pollers");
                }
                break;
            }
        }
        match cfg.idle_backoff_rounds {
            Some(n) if idle_streak > n => std::thread::sleep(Duration::from_micros(100)),
            _ => std::hint::spin_loop(),
        }
    }
    drop(pollers);
    stats.pollers.store(0, Ordering::Release);
    // Drop any late messages (their pollers or closures are released here, on the reactor that owned them).
    while inbox.pop().is_some() {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Counter {
        left: u32,
        hits: Arc<AtomicU64>,
    }
    impl Poller for Counter {
        fn poll(&mut self, _ctx: &mut ReactorCtx) -> PollOutcome {
            if self.left == 0 {
                return PollOutcome::Done;
            }
            self.left -= 1;
            self.hits.fetch_add(1, Ordering::Relaxed);
            PollOutcome::Busy
        }
    }

    fn cfg(n: usize) -> ReactorConfig {
        let cores = crate::coremask::allowed_cores();
        let mut c = ReactorConfig::new((0..n).map(|i| cores[i % cores.len()]).collect());
        c.pin = false;
        c.idle_backoff_rounds = Some(100);
        c
    }

    #[test]
    fn pollers_run_to_completion_and_leave() {
        let r = Reactors::start(cfg(2)).unwrap();
        let hits = Arc::new(AtomicU64::new(0));
        for i in 0..2 {
            r.add_poller(i, Box::new(Counter { left: 1000, hits: Arc::clone(&hits) }), Duration::from_secs(1)).unwrap();
        }
        assert!(r.wait_idle(Duration::from_secs(10)));
        assert_eq!(hits.load(Ordering::Relaxed), 2000);
        r.stop().unwrap();
    }

    static PINGS: AtomicU64 = AtomicU64::new(0);
    fn ping(ctx: &mut ReactorCtx, hops: usize, _b: usize) {
        PINGS.fetch_add(1, Ordering::Relaxed);
        if hops > 0 {
            let next = (ctx.index() + 1) % ctx.reactor_count();
            let mut m = Msg::Call { f: ping, a: hops - 1, b: 0 };
            while let Err(back) = ctx.send(next, m) {
                m = back;
            }
        }
    }

    #[test]
    fn messages_cross_cores() {
        PINGS.store(0, Ordering::Relaxed);
        let r = Reactors::start(cfg(2)).unwrap();
        r.send(0, Msg::Call { f: ping, a: 999, b: 0 }).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while PINGS.load(Ordering::Relaxed) < 1000 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(PINGS.load(Ordering::Relaxed), 1000);
        let total: u64 = (0..2).map(|i| r.stats(i).unwrap().messages.load(Ordering::Relaxed)).sum();
        assert_eq!(total, 1000);
        r.stop().unwrap();
    }

    #[test]
    fn full_ring_is_back_pressure() {
        let mut c = cfg(1);
        c.ring_entries = 4;
        let r = Reactors::start(c).unwrap();
        // Block the reactor with a closure that waits on a flag, so its inbox fills.
        let gate = Arc::new(AtomicBool::new(false));
        let g = Arc::clone(&gate);
        r.send(0, Msg::Run(Box::new(move |_| {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !g.load(Ordering::Acquire) && Instant::now() < deadline {
                std::hint::spin_loop();
            }
        })))
        .unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut refused = 0;
        for _ in 0..10 {
            if r.send(0, Msg::Call { f: |_, _, _| {}, a: 0, b: 0 }).is_err() {
                refused += 1;
            }
        }
        assert!(refused >= 6, "a 4-entry ring must refuse most of 10 messages, refused {refused}");
        gate.store(true, Ordering::Release);
        r.stop().unwrap();
    }

    #[test]
    fn stop_drains_pollers() {
        struct Drainer {
            outstanding: u32,
        }
        impl Poller for Drainer {
            fn poll(&mut self, ctx: &mut ReactorCtx) -> PollOutcome {
                if ctx.stopping() {
                    if self.outstanding == 0 {
                        return PollOutcome::Done;
                    }
                    self.outstanding -= 1;
                    return PollOutcome::Busy;
                }
                PollOutcome::Idle
            }
        }
        let r = Reactors::start(cfg(1)).unwrap();
        r.add_poller(0, Box::new(Drainer { outstanding: 100 }), Duration::from_secs(1)).unwrap();
        std::thread::sleep(Duration::from_millis(10));
        r.stop().unwrap();
    }

    #[test]
    fn pinning_works_on_this_machine() {
        let cores = crate::coremask::allowed_cores();
        let mut c = ReactorConfig::new(vec![cores[0]]);
        c.idle_backoff_rounds = Some(10);
        let r = Reactors::start(c).unwrap();
        assert_eq!(r.count(), 1);
        r.stop().unwrap();
    }
}
