//! The block-device contract suite: checks every backend (and every stacked device) must pass.
//!
//! It is ordinary library code, compiled always, so any crate's tests can run it against its own device:
//! ```ignore
//! let arena = Arena::new(ArenaConfig { size_bytes: 64 << 20, ..Default::default() })?;
//! let make = || open_bdev("malloc:8M", &arena).map_err(|e| e.to_string());
//! let report = contract::run_all(&make, &arena, &ContractOpts::default())?;
//! ```
//! `make` is called once per check, so checks start from a fresh device where the factory makes one. Buffers come
//! from `arena` (the one the device was opened with: the file backend registers it with io_uring).
//!
//! What is checked:
//! - geometry is sane (block size a power of two in 512..=65536, non-zero sizes, alignment a power of two);
//! - bounds: beyond the end, `offset + count` overflowing, zero blocks are `Invalid(OutOfRange)`, for every op
//!   that takes a range; the descriptor comes back unchanged and nothing stays outstanding;
//! - alignment: a misaligned segment address or length is `Invalid(Misaligned)` (devices asking for 1-byte
//!   alignment must instead accept odd addresses and lengths, with correct data);
//! - segments: a sum that misses the range, too many segments, a transfer over the maximum are
//!   `Invalid(BadLength)`; a FUA read is `Invalid(Unsupported)`;
//! - data: writes read back (first, last and middle blocks), scatter/gather written through one segmentation and
//!   read back through another, FUA writes;
//! - flush succeeds; write zeroes zeroes exactly its range (including one over 2 MiB); deallocate leaves each
//!   block of its range zero or as it was, and its neighbours untouched;
//! - back-pressure: a channel takes exactly its queue depth, then says `Busy` and hands the descriptor back;
//!   `poll` never pushes beyond the caller's spare capacity; after a poll, submit is accepted again;
//! - several reactors: each of N reactors polls its own channel doing verified writes and reads on its own block
//!   range, with many requests in flight.
//!
//! With `verify_data: false` (the null device) data contents are not compared; statuses still are.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nvstack_driver::dma::{Arena, BufPool, DmaBuf};

use crate::bdev::{run_sync, ChannelOpts, Rejected, SyncError};
use crate::reactor::{PollOutcome, Poller, ReactorConfig, ReactorCtx, Reactors};
use crate::{BlockDev, Geometry, IoChannel, IoDesc, IoError, IoFlags, IoOp, IoStatus, SubmitError};

/// How to run the suite.
#[derive(Debug, Clone)]
pub struct ContractOpts {
    /// Compare data read back (false for a device that moves no data).
    pub verify_data: bool,
    /// Queue depth of the channels used for the many-in-flight checks.
    pub queue_depth: u32,
    /// Reactors in the multi-reactor check.
    pub reactors: usize,
    /// Write+read rounds per in-flight slot in the multi-reactor check.
    pub rounds_per_slot: u32,
    /// Deadline for one request, and (times the rounds) for the multi-reactor check.
    pub timeout: Duration,
}

impl Default for ContractOpts {
    fn default() -> Self {
        ContractOpts { verify_data: true, queue_depth: 16, reactors: 2, rounds_per_slot: 20, timeout: Duration::from_secs(10) }
    }
}

/// What ran.
#[derive(Debug, Default, Clone)]
pub struct ContractReport {
    /// Checks that passed.
    pub passed: Vec<&'static str>,
    /// Parts not run, and why (e.g. "device too small").
    pub skipped: Vec<String>,
}

/// A device factory: called once per check.
pub type MakeBdev<'a> = &'a dyn Fn() -> Result<Arc<dyn BlockDev>, String>;

type Check = fn(&mut Env) -> Result<(), String>;

const CHECKS: &[(&str, Check)] = &[
    ("geometry", check_geometry),
    ("bounds", check_bounds),
    ("alignment", check_alignment),
    ("segments", check_segments),
    ("write_read", check_write_read),
    ("scatter_gather", check_scatter_gather),
    ("fua_write", check_fua_write),
    ("flush", check_flush),
    ("write_zeroes", check_write_zeroes),
    ("deallocate", check_deallocate),
    ("busy_backpressure", check_busy),
    ("many_in_flight", check_many_in_flight),
    ("reactors", check_reactors),
];

/// Run every check. Every check runs even when one fails; the error lists all failures.
///
/// # Errors
/// One line per failed check (`check: what went wrong`), or a set-up failure (pool carving).
pub fn run_all(make: MakeBdev<'_>, arena: &Arc<Arena>, opts: &ContractOpts) -> Result<ContractReport, String> {
    let mut report = ContractReport::default();
    let mut failures = Vec::new();
    for (name, check) in CHECKS {
        match run_one(make, arena, opts, check, &mut report.skipped) {
            Ok(()) => report.passed.push(name),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if failures.is_empty() {
        Ok(report)
    } else {
        Err(failures.join("\n"))
    }
}

/// Run one named check (for focused tests).
///
/// # Errors
/// What went wrong, or an unknown check name.
pub fn run_check(name: &str, make: MakeBdev<'_>, arena: &Arc<Arena>, opts: &ContractOpts) -> Result<ContractReport, String> {
    let (found, check) = CHECKS.iter().find(|(n, _)| *n == name).ok_or_else(|| format!("no check named {name}"))?;
    let mut report = ContractReport::default();
    run_one(make, arena, opts, check, &mut report.skipped)?;
    report.passed.push(found);
    Ok(report)
}

/// Names of the checks, in order.
pub fn check_names() -> Vec<&'static str> {
    CHECKS.iter().map(|(n, _)| *n).collect()
}

fn run_one(make: MakeBdev<'_>, arena: &Arc<Arena>, opts: &ContractOpts, check: &Check, skipped: &mut Vec<String>) -> Result<(), String> {
    let dev = make()?;
    let geo = dev.geometry();
    let mut env = Env::new(dev, arena, opts)?;
    let r = check(&mut env);
    skipped.extend(env.skipped.drain(..).map(|s| format!("{} ({}): {s}", env.dev.name(), geo.block_size)));
    r
}

/// Blocks used by the multi-block checks.
const UNIT_BLOCKS: u64 = 8;

struct Env {
    dev: Arc<dyn BlockDev>,
    geo: Geometry,
    arena: Arc<Arena>,
    opts: ContractOpts,
    pool: BufPool,
    ch: Box<dyn IoChannel>,
    skipped: Vec<String>,
}

impl Env {
    fn new(dev: Arc<dyn BlockDev>, arena: &Arc<Arena>, opts: &ContractOpts) -> Result<Env, String> {
        let geo = dev.geometry();
        let ch = dev
            .open_channel(ChannelOpts { reactor_index: 0, queue_depth: opts.queue_depth.max(4) })
            .map_err(|e| format!("open_channel: {e}"))?;
        let pool = BufPool::new(arena, buf_bytes(&geo)?, 6, buf_align(&geo), "contract suite buffers")
            .map_err(|e| format!("carving test buffers: {e}"))?;
        Ok(Env { dev, geo, arena: Arc::clone(arena), opts: opts.clone(), pool, ch, skipped: Vec::new() })
    }

    fn bs(&self) -> usize {
        self.geo.block_size as usize
    }

    fn buf(&mut self) -> Result<DmaBuf, String> {
        self.pool.get().ok_or_else(|| "test buffer pool exhausted".to_string())
    }

    fn put(&mut self, b: DmaBuf) {
        // A buffer from this pool always goes back; a foreign one cannot occur here.
        let _ = self.pool.put(b);
    }

    /// Build a descriptor whose segments are `(offset in buf, len)` pieces of `buf` (not attached).
    fn desc(&self, op: IoOp, off: u64, n: u64, buf: &DmaBuf, segs: &[(usize, usize)]) -> Result<Box<IoDesc>, String> {
        let mut io = IoDesc::new(segs.len().max(1));
        io.prepare(op, off, n);
        for &(o, l) in segs {
            if o + l > buf.len() as usize {
                return Err(format!("test bug: segment {o}+{l} outside a {}-byte buffer", buf.len()));
            }
            let len = u32::try_from(l).map_err(|_| "segment too long".to_string())?;
            // SAFETY: `o + l` is inside `buf` (checked above), which is arena memory at `iova + o`; the suite touches
            // `buf` only after the request has completed or been rejected (every caller waits with run_sync/poll).
            unsafe {
                let p = std::ptr::NonNull::new_unchecked(buf.as_ptr().add(o));
                io.push_seg_raw(p, buf.iova() + o as u64, len).map_err(|()| "segment capacity".to_string())?;
            }
        }
        Ok(io)
    }

    /// Run one request to completion; return its status.
    fn run(&mut self, io: Box<IoDesc>) -> Result<IoStatus, String> {
        let what = format!("{:?} {}+{}", io.op, io.offset_blocks, io.num_blocks);
        match run_sync(self.ch.as_mut(), io, self.opts.timeout) {
            Ok(io) => Ok(io.status),
            Err(SyncError::Rejected(r)) => Err(format!("{what}: rejected: {:?}", r.why)),
            Err(e) => Err(format!("{what}: {e}")),
        }
    }

    fn run_ok(&mut self, io: Box<IoDesc>) -> Result<(), String> {
        let what = format!("{:?} {}+{}", io.op, io.offset_blocks, io.num_blocks);
        match self.run(io)? {
            IoStatus::Success => Ok(()),
            s => Err(format!("{what}: completed with {s:?}")),
        }
    }

    /// Write `n` blocks at `off` with generation `g` from one segment.
    fn write_pattern(&mut self, off: u64, n: u64, g: u64, flags: IoFlags) -> Result<(), String> {
        let bytes = pattern(off, n, g, self.bs());
        let mut b = self.buf()?;
        b.write_at(0, &bytes).ok_or("pattern larger than buffer")?;
        let mut io = self.desc(IoOp::Write, off, n, &b, &[(0, bytes.len())])?;
        io.flags = flags;
        let r = self.run_ok(io);
        self.put(b);
        r
    }

    /// Read `n` blocks at `off` through one segment (pre-filled with 0xEE so a read that moves nothing shows).
    fn read_blocks(&mut self, off: u64, n: u64) -> Result<Vec<u8>, String> {
        let len = n as usize * self.bs();
        let mut b = self.buf()?;
        b.fill(0xEE);
        let io = self.desc(IoOp::Read, off, n, &b, &[(0, len)])?;
        let r = self.run_ok(io);
        let mut out = vec![0u8; len];
        b.read_at(0, &mut out).ok_or("read larger than buffer")?;
        self.put(b);
        r.map(|()| out)
    }

    fn expect_pattern(&mut self, off: u64, n: u64, g: u64) -> Result<(), String> {
        let got = self.read_blocks(off, n)?;
        if self.opts.verify_data {
            compare(&got, &pattern(off, n, g, self.bs()), off, self.bs())?;
        }
        Ok(())
    }

    /// Submit a request that must be refused as invalid with an error matching `want`; check it comes back intact.
    fn expect_invalid(&mut self, io: Box<IoDesc>, what: &str, want: fn(&IoError) -> bool) -> Result<(), String> {
        let (op, off, n, nsegs) = (io.op, io.offset_blocks, io.num_blocks, io.segs().len());
        let before = self.ch.outstanding();
        match self.ch.submit(io) {
            Ok(()) => {
                // Reap it so the channel is clean for the next check.
                let mut out = Vec::with_capacity(self.ch.queue_depth() as usize);
                let deadline = Instant::now() + self.opts.timeout;
                while self.ch.outstanding() > before && Instant::now() < deadline {
                    self.ch.poll(&mut out);
                }
                Err(format!("{what}: accepted (completed {:?}), must be rejected", out.first().map(|d| d.status)))
            }
            Err(Rejected { io, why: SubmitError::Invalid(e) }) => {
                if !want(&e) {
                    return Err(format!("{what}: rejected with the wrong error {e:?}"));
                }
                if (io.op, io.offset_blocks, io.num_blocks, io.segs().len()) != (op, off, n, nsegs) {
                    return Err(format!("{what}: the descriptor came back changed"));
                }
                if self.ch.outstanding() != before {
                    return Err(format!("{what}: a rejected request counts as outstanding"));
                }
                Ok(())
            }
            Err(Rejected { why, .. }) => Err(format!("{what}: rejected with {why:?}, expected Invalid")),
        }
    }
}

fn buf_align(geo: &Geometry) -> u64 {
    u64::from(geo.buf_align_bytes).max(4096)
}

fn buf_bytes(geo: &Geometry) -> Result<u32, String> {
    // Room for UNIT_BLOCKS blocks twice over (scatter/gather leaves gaps) and at least 2 MiB... capped for
    // 64 KiB blocks.
    let unit = u64::from(geo.block_size) * UNIT_BLOCKS * 2;
    u32::try_from(unit.max(64 << 10)).map_err(|_| "block size too large for the suite".to_string())
}

/// The bytes generation `g` writes to blocks `off..off+n`: every 8-byte word names its block, word and generation.
pub fn pattern(off: u64, n: u64, g: u64, bs: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n as usize * bs);
    for b in off..off + n {
        for w in 0..(bs / 8) as u64 {
            let word = (b << 24) ^ (g << 8).rotate_left(40) ^ w ^ 0xA5A5_0000_0000_0000;
            v.extend_from_slice(&word.to_le_bytes());
        }
    }
    v
}

fn compare(got: &[u8], want: &[u8], off: u64, bs: usize) -> Result<(), String> {
    if got.len() != want.len() {
        return Err(format!("read {} bytes, expected {}", got.len(), want.len()));
    }
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "data mismatch at block {} byte {}: got {:#04x}, expected {:#04x}",
            off + (i / bs) as u64,
            i % bs,
            got[i],
            want[i]
        )),
    }
}

fn is_range(e: &IoError) -> bool {
    matches!(e, IoError::OutOfRange { .. })
}
fn is_misaligned(e: &IoError) -> bool {
    matches!(e, IoError::Misaligned { .. })
}
fn is_bad_length(e: &IoError) -> bool {
    matches!(e, IoError::BadLength { .. })
}
fn is_unsupported(e: &IoError) -> bool {
    matches!(e, IoError::Unsupported { .. })
}

fn check_geometry(env: &mut Env) -> Result<(), String> {
    let g = env.geo;
    if !g.block_size.is_power_of_two() || !(512..=65536).contains(&g.block_size) {
        return Err(format!("block size {} is not a power of two in 512..=65536", g.block_size));
    }
    if g.block_count == 0 || g.max_segments == 0 || g.max_transfer_bytes < g.block_size {
        return Err(format!("degenerate geometry {g:?}"));
    }
    if !g.buf_align_bytes.is_power_of_two() {
        return Err(format!("buffer alignment {} is not a power of two", g.buf_align_bytes));
    }
    if env.dev.name().is_empty() || env.dev.product_name().is_empty() {
        return Err("empty name or product name".into());
    }
    if env.ch.outstanding() != 0 || env.ch.queue_depth() < 4 {
        return Err(format!("fresh channel: outstanding {}, depth {}", env.ch.outstanding(), env.ch.queue_depth()));
    }
    Ok(())
}

fn check_bounds(env: &mut Env) -> Result<(), String> {
    let count = env.geo.block_count;
    let bs = env.bs();
    let b = env.buf()?;
    let feat = env.dev.features();
    let mut cases: Vec<(&str, IoOp, u64, u64)> = vec![
        ("read at the end", IoOp::Read, count, 1),
        ("read across the end", IoOp::Read, count - 1, 2),
        ("write at the end", IoOp::Write, count, 1),
        ("read far beyond", IoOp::Read, u64::MAX / 2, 1),
        ("read with overflowing offset+count", IoOp::Read, u64::MAX, 1),
        ("write with overflowing offset+count", IoOp::Write, u64::MAX - 1, 3),
        ("read of zero blocks", IoOp::Read, 0, 0),
        ("write of zero blocks", IoOp::Write, 0, 0),
    ];
    if feat.write_zeroes {
        cases.push(("write zeroes across the end", IoOp::WriteZeroes, count - 1, 2));
        cases.push(("write zeroes overflowing", IoOp::WriteZeroes, u64::MAX, 1));
        cases.push(("write zeroes of zero blocks", IoOp::WriteZeroes, 0, 0));
    }
    if feat.deallocate {
        cases.push(("deallocate across the end", IoOp::Deallocate, count - 1, 2));
        cases.push(("deallocate overflowing", IoOp::Deallocate, u64::MAX - 1, 3));
        cases.push(("deallocate of zero blocks", IoOp::Deallocate, 0, 0));
    }
    let mut r = Ok(());
    for (what, op, off, n) in cases {
        let segs: &[(usize, usize)] = if op.has_data() { &[(0, bs)] } else { &[] };
        let io = env.desc(op, off, n, &b, segs)?;
        r = env.expect_invalid(io, what, is_range);
        if r.is_err() {
            break;
        }
    }
    env.put(b);
    r
}

fn check_alignment(env: &mut Env) -> Result<(), String> {
    let align = env.geo.buf_align_bytes as usize;
    let bs = env.bs();
    let b = env.buf()?;
    let r = if align > 1 {
        let io = env.desc(IoOp::Read, 0, 1, &b, &[(align / 2, bs)])?;
        env.expect_invalid(io, "segment at a misaligned address", is_misaligned).and_then(|()| {
            let rest = bs.saturating_sub(align / 2).max(1);
        let io = env.desc(IoOp::Write, 0, 1, &b, &[(0, align / 2), (align, rest)])?;
            env.expect_invalid(io, "segment of a misaligned length", is_misaligned)
        })
    } else {
        // A device that asks for no alignment must take odd addresses and lengths, and move the right bytes.
        env.skipped.push("misalignment errors: the device needs no buffer alignment (checked odd segments instead)".into());
        odd_segments(env, &b)
    };
    env.put(b);
    r
}

fn odd_segments(env: &mut Env, b: &DmaBuf) -> Result<(), String> {
    let bs = env.bs();
    let n = 2u64.min(env.geo.block_count);
    let len = n as usize * bs;
    let want = pattern(0, n, 7, bs);
    // Segments [1+0..3), [1+3..3+len-3]: odd address and odd lengths.
    let split = 3usize;
    let mut wb = env.buf()?;
    wb.write_at(1, &want).ok_or("pattern larger than buffer")?;
    let io = env.desc(IoOp::Write, 0, n, &wb, &[(1, split), (1 + split, len - split)])?;
    let r = env.run_ok(io);
    env.put(wb);
    r?;
    let io = env.desc(IoOp::Read, 0, n, b, &[(5, len - 7), (len, 7)])?;
    env.run_ok(io)?;
    if env.opts.verify_data {
        let mut got = vec![0u8; len];
        b.read_at(5, &mut got[..len - 7]).ok_or("read_at")?;
        b.read_at(len, &mut got[len - 7..]).ok_or("read_at")?;
        compare(&got, &want, 0, bs)?;
    }
    Ok(())
}

fn check_segments(env: &mut Env) -> Result<(), String> {
    let bs = env.bs();
    let count = env.geo.block_count;
    let b = env.buf()?;
    let mut run = || -> Result<(), String> {
        if count >= 2 {
            let io = env.desc(IoOp::Read, 0, 2, &b, &[(0, bs)])?;
            env.expect_invalid(io, "segments shorter than the range", is_bad_length)?;
        }
        let io = env.desc(IoOp::Write, 0, 1, &b, &[(0, bs), (bs, bs)])?;
        env.expect_invalid(io, "segments longer than the range", is_bad_length)?;
        let io = env.desc(IoOp::Read, 0, 1, &b, &[])?;
        env.expect_invalid(io, "a read with no segments", is_bad_length)?;
        let max_segs = env.geo.max_segments as usize;
        if max_segs < 4096 {
            let piece = env.geo.buf_align_bytes.max(1) as usize;
            let segs: Vec<(usize, usize)> = (0..=max_segs).map(|_| (0, piece)).collect();
            let io = env.desc(IoOp::Read, 0, 1, &b, &segs)?;
            env.expect_invalid(io, "more segments than max_segments", is_bad_length)?;
        } else {
            env.skipped.push(format!("too-many-segments: max_segments {max_segs} is too large to build"));
        }
        let over = u64::from(env.geo.max_transfer_bytes / env.geo.block_size) + 1;
        if over <= count {
            let io = env.desc(IoOp::Read, 0, over, &b, &[(0, bs)])?;
            env.expect_invalid(io, "a transfer over max_transfer_bytes", is_bad_length)?;
        } else {
            env.skipped.push("over-max-transfer: the device is smaller than its max transfer".into());
        }
        let mut io = env.desc(IoOp::Read, 0, 1, &b, &[(0, bs)])?;
        io.flags = IoFlags::FUA;
        env.expect_invalid(io, "a FUA read", is_unsupported)?;
        Ok(())
    };
    let r = run();
    env.put(b);
    r
}

fn check_write_read(env: &mut Env) -> Result<(), String> {
    let count = env.geo.block_count;
    let n = UNIT_BLOCKS.min(count);
    let mut places = vec![0, count - n, count / 2 - (count / 2).min(n / 2)];
    places.dedup();
    for (g, &off) in places.iter().enumerate() {
        env.write_pattern(off, n, g as u64 + 1, IoFlags::NONE)?;
    }
    for (g, &off) in places.iter().enumerate() {
        env.expect_pattern(off, n, g as u64 + 1)?;
    }
    // Overwrite one block in the middle of the first range and check only it changed.
    if n >= 3 {
        env.write_pattern(1, 1, 99, IoFlags::NONE)?;
        env.expect_pattern(0, 1, 1)?;
        env.expect_pattern(1, 1, 99)?;
        env.expect_pattern(2, n - 2, 1)?;
    }
    Ok(())
}

/// Segment lengths for `total` bytes: a few unequal pieces, each a multiple of `unit`.
fn pieces(total: usize, unit: usize, shape: &[usize]) -> Vec<usize> {
    let mut v = Vec::new();
    let mut left = total;
    for &k in shape {
        let l = k * unit;
        if l == 0 || l >= left {
            break;
        }
        v.push(l);
        left -= l;
    }
    v.push(left);
    v
}

fn check_scatter_gather(env: &mut Env) -> Result<(), String> {
    let bs = env.bs();
    let n = UNIT_BLOCKS.min(env.geo.block_count);
    let total = n as usize * bs;
    let align = env.geo.buf_align_bytes.max(1) as usize;
    let unit = if align <= bs { align.max(bs / 4) } else { align };
    if !total.is_multiple_of(unit) || total / unit < 2 || env.geo.max_segments < 4 {
        env.skipped.push("scatter/gather: alignment or segment limits leave nothing to split".into());
        return Ok(());
    }
    let want = pattern(0, n, 11, bs);
    // Write: pieces laid out in the buffer in reverse order, with a gap after each, so a backend that ignores
    // segment addresses (or treats them as contiguous) writes wrong data.
    let wl = pieces(total, unit, &[1, 3, 2]);
    let gap = align.max(64);
    let mut wb = env.buf()?;
    let mut segs = Vec::new();
    let mut at = wb.len() as usize;
    let mut logical = 0;
    for &l in &wl {
        at -= l + gap;
        at -= at % align;
        wb.write_at(at, &want[logical..logical + l]).ok_or("write_at")?;
        segs.push((at, l));
        logical += l;
    }
    let io = env.desc(IoOp::Write, 0, n, &wb, &segs)?;
    let r = env.run_ok(io);
    env.put(wb);
    r?;
    // Read back through a different segmentation, in forward order with gaps.
    let rl = pieces(total, unit, &[5, 1, 1, 2]);
    let mut rb = env.buf()?;
    rb.fill(0xEE);
    let mut segs = Vec::new();
    let mut at = 0;
    for &l in &rl {
        segs.push((at, l));
        at += l + gap;
        at = at.div_ceil(align) * align;
    }
    let io = env.desc(IoOp::Read, 0, n, &rb, &segs)?;
    let r = env.run_ok(io);
    let mut got = vec![0u8; total];
    let mut logical = 0;
    for &(o, l) in &segs {
        rb.read_at(o, &mut got[logical..logical + l]).ok_or("read_at")?;
        logical += l;
    }
    env.put(rb);
    r?;
    if env.opts.verify_data {
        compare(&got, &want, 0, bs)?;
    }
    // And once more through one segment per block.
    env.expect_pattern(0, n, 11)
}

fn check_fua_write(env: &mut Env) -> Result<(), String> {
    let n = 2.min(env.geo.block_count);
    env.write_pattern(0, n, 21, IoFlags::FUA)?;
    env.expect_pattern(0, n, 21)
}

fn check_flush(env: &mut Env) -> Result<(), String> {
    env.write_pattern(0, 1, 31, IoFlags::NONE)?;
    let mut io = IoDesc::new(1);
    io.prepare(IoOp::Flush, 0, 0);
    env.run_ok(io)?;
    env.expect_pattern(0, 1, 31)
}

fn check_write_zeroes(env: &mut Env) -> Result<(), String> {
    if !env.dev.features().write_zeroes {
        let mut io = IoDesc::new(1);
        io.prepare(IoOp::WriteZeroes, 0, 1);
        return env.expect_invalid(io, "write zeroes on a device without it", is_unsupported);
    }
    let bs = env.bs();
    let count = env.geo.block_count;
    let n = UNIT_BLOCKS.min(count);
    env.write_pattern(0, n, 41, IoFlags::NONE)?;
    let (zo, zn) = if n >= 5 { (2, 3) } else { (0, n) };
    let mut io = IoDesc::new(1);
    io.prepare(IoOp::WriteZeroes, zo, zn);
    env.run_ok(io)?;
    let got = env.read_blocks(0, n)?;
    if env.opts.verify_data {
        let mut want = pattern(0, n, 41, bs);
        want[zo as usize * bs..(zo + zn) as usize * bs].fill(0);
        compare(&got, &want, 0, bs)?;
    }
    // A large range (over 2 MiB where the device has it) exercises backends that zero in pieces.
    let big = ((3u64 << 20) / bs as u64).min(count);
    env.write_pattern(big - 1, 1, 42, IoFlags::NONE)?;
    if big < count {
        env.write_pattern(big, 1, 43, IoFlags::NONE)?;
    }
    let mut io = IoDesc::new(1);
    io.prepare(IoOp::WriteZeroes, 0, big);
    env.run_ok(io)?;
    let last = env.read_blocks(big - 1, 1)?;
    if env.opts.verify_data && last.iter().any(|&x| x != 0) {
        return Err(format!("block {} not zero after zeroing blocks 0+{big}", big - 1));
    }
    if big < count {
        env.expect_pattern(big, 1, 43)?;
    }
    Ok(())
}

fn check_deallocate(env: &mut Env) -> Result<(), String> {
    if !env.dev.features().deallocate {
        let mut io = IoDesc::new(1);
        io.prepare(IoOp::Deallocate, 0, 1);
        return env.expect_invalid(io, "deallocate on a device without it", is_unsupported);
    }
    let bs = env.bs();
    let n = UNIT_BLOCKS.min(env.geo.block_count);
    env.write_pattern(0, n, 51, IoFlags::NONE)?;
    let (dof, dn) = if n >= 5 { (2, 3) } else { (0, n) };
    let mut io = IoDesc::new(1);
    io.prepare(IoOp::Deallocate, dof, dn);
    env.run_ok(io)?;
    let got = env.read_blocks(0, n)?;
    if env.opts.verify_data {
        let old = pattern(0, n, 51, bs);
        for blk in 0..n as usize {
            let (g, w) = (&got[blk * bs..(blk + 1) * bs], &old[blk * bs..(blk + 1) * bs]);
            let inside = (dof as usize..(dof + dn) as usize).contains(&blk);
            let ok = g == w || (inside && g.iter().all(|&x| x == 0));
            if !ok {
                return Err(format!(
                    "block {blk} after deallocating {dof}+{dn}: neither {} nor zeroes",
                    if inside { "its old data" } else { "untouched" }
                ));
            }
        }
    }
    Ok(())
}

fn check_busy(env: &mut Env) -> Result<(), String> {
    const QD: u32 = 4;
    let mut ch = env.dev.open_channel(ChannelOpts { reactor_index: 0, queue_depth: QD }).map_err(|e| e.to_string())?;
    if ch.queue_depth() != QD {
        return Err(format!("asked for depth {QD}, channel says {}", ch.queue_depth()));
    }
    let bs = env.bs();
    let b = env.buf()?;
    let mut accepted = 0u32;
    let mut busy_desc = None;
    for i in 0..=QD {
        let io = env.desc(IoOp::Read, u64::from(i) % env.geo.block_count, 1, &b, &[(i as usize * bs, bs)])?;
        match ch.submit(io) {
            Ok(()) => accepted += 1,
            Err(Rejected { io, why: SubmitError::Busy }) => {
                busy_desc = Some(io);
                break;
            }
            Err(Rejected { why, .. }) => return Err(format!("submit {i}: {why:?}")),
        }
    }
    let result = (|| {
        let Some(io) = busy_desc.take() else {
            return Err(format!("{} submits accepted on a depth-{QD} channel: no Busy", QD + 1));
        };
        if accepted != QD {
            return Err(format!("Busy after {accepted} submits on a depth-{QD} channel"));
        }
        if ch.outstanding() != QD as usize {
            return Err(format!("outstanding {} with {QD} submitted", ch.outstanding()));
        }
        if io.op != IoOp::Read || io.offset_blocks != u64::from(QD) % env.geo.block_count {
            return Err("the Busy descriptor came back changed".into());
        }
        // poll must respect the caller's spare capacity: one slot here.
        let mut out: Vec<Box<IoDesc>> = Vec::with_capacity(1);
        let cap = out.capacity();
        let deadline = Instant::now() + env.opts.timeout;
        while out.is_empty() {
            let got = ch.poll(&mut out);
            if got > 1 || out.len() > 1 || out.capacity() != cap {
                return Err(format!("poll pushed {got} into a vector with room for 1"));
            }
            if Instant::now() > deadline {
                return Err("nothing completed before the deadline".into());
            }
        }
        if out[0].status != IoStatus::Success {
            return Err(format!("completion status {:?}", out[0].status));
        }
        if ch.outstanding() != QD as usize - 1 {
            return Err(format!("outstanding {} after reaping one of {QD}", ch.outstanding()));
        }
        // Room again: the refused descriptor is now accepted.
        ch.submit(io).map_err(|r| format!("submit after a poll freed room: {:?}", r.why))?;
        let mut all: Vec<Box<IoDesc>> = Vec::with_capacity(QD as usize + 1);
        all.append(&mut out);
        while ch.outstanding() > 0 {
            ch.poll(&mut all);
            if Instant::now() > deadline {
                return Err(format!("{} still outstanding at the deadline", ch.outstanding()));
            }
        }
        if all.len() != QD as usize + 1 {
            return Err(format!("reaped {} of {} requests", all.len(), QD + 1));
        }
        if let Some(bad) = all.iter().find(|d| d.status != IoStatus::Success) {
            return Err(format!("a request completed with {:?}", bad.status));
        }
        Ok(())
    })();
    // Drain before the buffer goes back (on error paths too), bounded by the deadline.
    let deadline = Instant::now() + env.opts.timeout;
    let mut sink = Vec::with_capacity(QD as usize + 1);
    while ch.outstanding() > 0 && Instant::now() < deadline {
        sink.clear();
        ch.poll(&mut sink);
    }
    drop(ch);
    env.put(b);
    result
}

/// One in-flight slot of the many-in-flight machinery: a descriptor with its own buffer and block range.
struct Slot {
    io: Option<Box<IoDesc>>,
    base_block: u64,
    generation: u64,
    rounds_left: u32,
}

/// Verified write-then-read traffic on a private block range, driven by `step` from a test loop or a poller.
struct Traffic {
    ch: Box<dyn IoChannel>,
    slots: Vec<Slot>,
    #[allow(clippy::vec_box)] // the channel's poll fills a Vec<Box<IoDesc>>
    done: Vec<Box<IoDesc>>,
    bs: usize,
    blocks_per_slot: u64,
    verify: bool,
    scratch: Vec<u8>,
    pool: BufPool,
    completed: u64,
    error: Option<String>,
}

impl Traffic {
    #[allow(clippy::too_many_arguments)]
    fn new(
        ch: Box<dyn IoChannel>,
        arena: &Arc<Arena>,
        geo: &Geometry,
        first_block: u64,
        slots: u32,
        blocks_per_slot: u64,
        rounds: u32,
        verify: bool,
    ) -> Result<Traffic, String> {
        let bs = geo.block_size as usize;
        let bytes = u32::try_from(blocks_per_slot * bs as u64).map_err(|_| "slot too large")?;
        let mut pool = BufPool::new(arena, bytes, slots, buf_align(geo), "contract traffic buffers").map_err(|e| e.to_string())?;
        let mut v = Vec::with_capacity(slots as usize);
        for i in 0..slots {
            let mut io = IoDesc::new(1);
            let buf = pool.get().ok_or("traffic pool empty")?;
            io.attach_buf(buf).map_err(|_| "attach_buf refused")?;
            io.ctx = u64::from(i);
            v.push(Slot {
                io: Some(io),
                base_block: first_block + u64::from(i) * blocks_per_slot,
                generation: 0,
                rounds_left: rounds,
            });
        }
        let cap = v.len();
        Ok(Traffic {
            ch,
            slots: v,
            done: Vec::with_capacity(cap),
            bs,
            blocks_per_slot,
            verify,
            scratch: vec![0; bytes as usize],
            pool,
            completed: 0,
            error: None,
        })
    }

    /// Start a write for every idle slot with rounds left.
    fn start_idle(&mut self) {
        for i in 0..self.slots.len() {
            let s = &mut self.slots[i];
            if s.rounds_left == 0 {
                continue;
            }
            let Some(mut io) = s.io.take() else { continue };
            s.generation += 1;
            let bytes = pattern(s.base_block, self.blocks_per_slot, s.generation, self.bs);
            if let Some(b) = io.bufs_mut().first_mut() {
                let _ = b.write_at(0, &bytes);
            }
            io.prepare(IoOp::Write, s.base_block, self.blocks_per_slot);
            if let Err(r) = self.ch.submit(io) {
                self.error.get_or_insert(format!("write submit refused: {:?}", r.why));
                self.slots[i].io = Some(r.io);
                self.slots[i].rounds_left = 0;
            }
        }
    }

    /// Reap and advance: a finished write becomes a read of the same range; a finished read is checked.
    /// Returns whether all slots are finished.
    fn step(&mut self) -> bool {
        self.start_idle();
        self.done.clear();
        self.ch.poll(&mut self.done);
        while let Some(mut io) = self.done.pop() {
            self.completed += 1;
            let i = io.ctx as usize;
            if io.status != IoStatus::Success {
                self.error.get_or_insert(format!("{:?} {}+{}: {:?}", io.op, io.offset_blocks, io.num_blocks, io.status));
                self.slots[i].rounds_left = 0;
                self.slots[i].io = Some(io);
                continue;
            }
            match io.op {
                IoOp::Write => {
                    if let Some(b) = io.bufs_mut().first_mut() {
                        b.fill(0xEE);
                    }
                    io.prepare(IoOp::Read, self.slots[i].base_block, self.blocks_per_slot);
                    if let Err(r) = self.ch.submit(io) {
                        self.error.get_or_insert(format!("read submit refused: {:?}", r.why));
                        self.slots[i].rounds_left = 0;
                        self.slots[i].io = Some(r.io);
                    }
                }
                _ => {
                    let s = &mut self.slots[i];
                    if self.verify {
                        if let Some(b) = io.bufs().first() {
                            let _ = b.read_at(0, &mut self.scratch);
                        }
                        let want = pattern(s.base_block, self.blocks_per_slot, s.generation, self.bs);
                        if let Err(e) = compare(&self.scratch, &want, s.base_block, self.bs) {
                            self.error.get_or_insert(e);
                            s.rounds_left = 0;
                        }
                    }
                    s.rounds_left = s.rounds_left.saturating_sub(1);
                    s.io = Some(io);
                }
            }
        }
        self.ch.outstanding() == 0 && self.slots.iter().all(|s| s.rounds_left == 0 && s.io.is_some())
    }

    fn finish(mut self) -> Result<u64, String> {
        let mut bufs = Vec::new();
        for s in &mut self.slots {
            if let Some(io) = s.io.as_mut() {
                io.take_bufs(&mut bufs);
            }
        }
        for b in bufs {
            let _ = self.pool.put(b);
        }
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.completed),
        }
    }
}

fn check_many_in_flight(env: &mut Env) -> Result<(), String> {
    let qd = env.opts.queue_depth.max(4);
    let per_slot = 2u64;
    let slots = u64::from(qd).min(env.geo.block_count / per_slot);
    if slots == 0 {
        env.skipped.push("many in flight: device too small".into());
        return Ok(());
    }
    let ch = env.dev.open_channel(ChannelOpts { reactor_index: 0, queue_depth: qd }).map_err(|e| e.to_string())?;
    let rounds = env.opts.rounds_per_slot.max(1);
    let mut t = Traffic::new(ch, &env.arena, &env.geo, 0, slots as u32, per_slot, rounds, env.opts.verify_data)?;
    let deadline = Instant::now() + env.opts.timeout * 3;
    while !t.step() {
        if Instant::now() > deadline {
            return Err(format!("traffic not finished by the deadline ({} completed)", t.completed));
        }
    }
    let n = t.finish()?;
    let want = slots * u64::from(rounds) * 2;
    if n != want {
        return Err(format!("{n} requests completed, expected {want}"));
    }
    Ok(())
}

/// Each reactor's report: its index and how many requests it completed (or what went wrong).
type Reports = Arc<Mutex<Vec<(usize, Result<u64, String>)>>>;

struct TrafficPoller {
    t: Option<Traffic>,
    deadline: Instant,
    result: Reports,
}

impl Poller for TrafficPoller {
    fn poll(&mut self, ctx: &mut ReactorCtx) -> PollOutcome {
        let Some(t) = self.t.as_mut() else { return PollOutcome::Done };
        let finished = t.step();
        let late = Instant::now() > self.deadline;
        if finished || late || (ctx.stopping() && t.ch.outstanding() == 0) {
            let Some(t) = self.t.take() else { return PollOutcome::Done };
            let r = if finished { t.finish() } else { Err(format!("reactor {}: not finished by the deadline", ctx.index())) };
            if let Ok(mut v) = self.result.lock() {
                v.push((ctx.index(), r));
            }
            return PollOutcome::Done;
        }
        PollOutcome::Busy
    }
}

fn check_reactors(env: &mut Env) -> Result<(), String> {
    let n = env.opts.reactors.max(1);
    let qd = env.opts.queue_depth.max(4);
    let per_slot = 2u64;
    let per_reactor = u64::from(qd) * per_slot;
    if per_reactor * n as u64 > env.geo.block_count {
        env.skipped.push("reactors: device too small for private ranges".into());
        return Ok(());
    }
    let cores = crate::coremask::allowed_cores();
    if cores.is_empty() {
        return Err("no allowed cores".into());
    }
    let mut cfg = ReactorConfig::new((0..n).map(|i| cores[i % cores.len()]).collect());
    cfg.pin = false;
    cfg.idle_backoff_rounds = Some(1000);
    let reactors = Reactors::start(cfg).map_err(|e| format!("starting reactors: {e}"))?;
    let results: Reports = Arc::new(Mutex::new(Vec::new()));
    let rounds = env.opts.rounds_per_slot.max(1);
    let limit = env.opts.timeout * 3;
    for i in 0..n {
        let ch = env.dev.open_channel(ChannelOpts { reactor_index: i, queue_depth: qd }).map_err(|e| e.to_string())?;
        let t = Traffic::new(ch, &env.arena, &env.geo, i as u64 * per_reactor, qd, per_slot, rounds, env.opts.verify_data)?;
        let p = TrafficPoller { t: Some(t), deadline: Instant::now() + limit, result: Arc::clone(&results) };
        reactors.add_poller(i, Box::new(p), Duration::from_secs(1)).map_err(|e| e.to_string())?;
    }
    // Wait for every poller's report (each gives up at its own deadline), then stop the reactors.
    let deadline = Instant::now() + limit + Duration::from_secs(2);
    let reported = |r: &Mutex<Vec<(usize, Result<u64, String>)>>| r.lock().map_or(0, |v| v.len());
    while reported(&results) < n && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    reactors.stop().map_err(|e| e.to_string())?;
    let v = results.lock().map_err(|_| "result lock poisoned")?;
    if v.len() != n {
        return Err(format!("{} of {n} reactors reported", v.len()));
    }
    let want = u64::from(qd) * u64::from(rounds) * 2;
    let mut seen = vec![false; n];
    for (idx, r) in v.iter() {
        let done = r.clone().map_err(|e| format!("reactor {idx}: {e}"))?;
        if done != want {
            return Err(format!("reactor {idx}: {done} requests completed, expected {want}"));
        }
        if let Some(s) = seen.get_mut(*idx) {
            *s = true;
        }
    }
    if seen.iter().any(|s| !s) {
        return Err("a reactor did not report".into());
    }
    Ok(())
}
