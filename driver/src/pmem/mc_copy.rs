//! Machine-check-safe copies and the process's one SIGBUS handler.
//!
//! # The guarded copy
//! [`copy_guarded`] copies with one `rep movsb` instruction written in assembly (`nvstack_copy_mc`). If the source
//! is poisoned (a machine check delivered as `SIGBUS` with `BUS_MCEERR_AR`) or beyond the end of a mapped file
//! (`BUS_ADRERR`), the kernel stops the copy at the faulting byte and delivers SIGBUS with the instruction pointer
//! on that `rep movsb` and RCX holding the bytes left. The handler sees the instruction pointer is exactly our copy
//! instruction and moves it to a fix-up label that returns the bytes left. The copy then *returns* an error instead of
//! killing the process. This is the kernel's exception-table technique (`copy_mc_to_kernel`) done in user space; no
//! Rust code is interrupted or resumed in an unknown state: the fault is always inside the assembly routine.
//!
//! # The event ring
//! Every SIGBUS the handler sees with an address (`BUS_MCEERR_AR`, `BUS_MCEERR_AO`, `BUS_ADRERR` inside a guarded
//! copy) is written into a fixed, preallocated ring of atomics: nothing else happens in the handler (no lock, no
//! allocation, no logging: all async-signal-safe). The poison listener (rmap crate) drains it with
//! [`drain_sigbus_events`].
//!
//! A SIGBUS that is neither a machine-check report nor a fault in a guarded copy is not ours: the handler restores
//! the previous disposition and returns, so the faulting access re-runs and the default action (or the previous
//! handler) applies.

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

use crate::DriverError;

std::arch::global_asm!(
    ".pushsection .text.nvstack_copy_mc,\"ax\",@progbits",
    ".globl nvstack_copy_mc",
    ".type nvstack_copy_mc,@function",
    "nvstack_copy_mc:",
    "    mov rcx, rdx",
    ".globl nvstack_copy_mc_insn",
    "nvstack_copy_mc_insn:",
    "    rep movsb",
    "    xor eax, eax",
    "    ret",
    ".globl nvstack_copy_mc_fixup",
    "nvstack_copy_mc_fixup:",
    "    mov rax, rcx",
    "    ret",
    ".size nvstack_copy_mc, .-nvstack_copy_mc",
    ".popsection",
);

extern "C" {
    /// Copy `len` bytes from `src` to `dst`; returns the bytes *not* copied (0 on success).
    fn nvstack_copy_mc(dst: *mut u8, src: *const u8, len: usize) -> usize;
    static nvstack_copy_mc_insn: u8;
    static nvstack_copy_mc_fixup: u8;
}

/// What a guarded copy hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyFault {
    /// Bytes copied before the fault.
    pub copied: usize,
    /// Address of the first byte not copied (the faulting byte or the start of its poisoned granule).
    pub fault_addr: usize,
}

/// Copy `len` bytes from `src` to `dst`; a poisoned or unmapped source byte ends the copy with [`CopyFault`] instead
/// of killing the process. [`install_sigbus_handler`] must have run (it is idempotent and cheap to call again).
///
/// # Safety
/// `src..src+len` must be a mapping readable by this process except for bytes that fault with SIGBUS (poison, a
/// truncated file); `dst..dst+len` must be valid for writes and not overlap the source.
///
/// # Errors
/// [`CopyFault`] with how far the copy got.
#[inline]
pub unsafe fn copy_guarded(dst: *mut u8, src: *const u8, len: usize) -> Result<(), CopyFault> {
    // SAFETY: the caller guarantees the ranges (see # Safety); a SIGBUS inside the routine is turned into an early
    // return by the handler (install_sigbus_handler), so the routine always returns normally.
    let left = unsafe { nvstack_copy_mc(dst, src, len) };
    if left == 0 {
        Ok(())
    } else {
        let copied = len - left.min(len);
        Err(CopyFault { copied, fault_addr: src as usize + copied })
    }
}

/// How a SIGBUS reported itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigbusKind {
    /// `BUS_MCEERR_AR`: poison consumed; action required.
    McErrActionRequired,
    /// `BUS_MCEERR_AO`: poison found (early kill); action optional.
    McErrActionOptional,
    /// `BUS_ADRERR` inside a guarded copy (a mapped file shorter than the mapping).
    AddressError,
}

/// One SIGBUS, as recorded by the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigbusEvent {
    /// How it was reported.
    pub kind: SigbusKind,
    /// `si_addr`: the virtual address.
    pub addr: usize,
    /// `si_addr_lsb`: log2 of the poisoned granule (12 for a 4 KiB page, 21 for a 2 MiB devdax page; 0 if none).
    pub addr_lsb: u8,
    /// Whether a guarded copy was stopped by it.
    pub in_guarded_copy: bool,
}

/// Slots in the SIGBUS event ring (a limit in DESIGN.md).
pub const SIGBUS_RING_SLOTS: usize = 1024;

struct Ring {
    /// seq[i] == ticket + 1 when slot i holds the event with that ticket.
    seq: [AtomicU64; SIGBUS_RING_SLOTS],
    word0: [AtomicU64; SIGBUS_RING_SLOTS],
    word1: [AtomicU64; SIGBUS_RING_SLOTS],
    head: AtomicU64,
    tail: AtomicU64,
    dropped: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicU64 = AtomicU64::new(0);
static RING: Ring = Ring {
    seq: [ZERO; SIGBUS_RING_SLOTS],
    word0: [ZERO; SIGBUS_RING_SLOTS],
    word1: [ZERO; SIGBUS_RING_SLOTS],
    head: AtomicU64::new(0),
    tail: AtomicU64::new(0),
    dropped: AtomicU64::new(0),
};
static TOTAL_SIGBUS: AtomicUsize = AtomicUsize::new(0);

fn encode(ev: &SigbusEvent) -> (u64, u64) {
    let kind = match ev.kind {
        SigbusKind::McErrActionRequired => 1u64,
        SigbusKind::McErrActionOptional => 2,
        SigbusKind::AddressError => 3,
    };
    (ev.addr as u64, kind | (u64::from(ev.addr_lsb) << 8) | (u64::from(ev.in_guarded_copy) << 16))
}

fn decode(w0: u64, w1: u64) -> SigbusEvent {
    let kind = match w1 & 0xff {
        1 => SigbusKind::McErrActionRequired,
        2 => SigbusKind::McErrActionOptional,
        _ => SigbusKind::AddressError,
    };
    SigbusEvent { kind, addr: w0 as usize, addr_lsb: ((w1 >> 8) & 0xff) as u8, in_guarded_copy: (w1 >> 16) & 1 == 1 }
}

/// Record an event: lock-free, allocation-free, async-signal-safe (atomics only).
fn record(ev: &SigbusEvent) {
    let ticket = loop {
        let head = RING.head.load(Ordering::Acquire);
        let tail = RING.tail.load(Ordering::Acquire);
        if head.wrapping_sub(tail) >= SIGBUS_RING_SLOTS as u64 {
            RING.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if RING.head.compare_exchange_weak(head, head + 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
            break head;
        }
    };
    let slot = (ticket % SIGBUS_RING_SLOTS as u64) as usize;
    let (w0, w1) = encode(ev);
    RING.word0[slot].store(w0, Ordering::Relaxed);
    RING.word1[slot].store(w1, Ordering::Relaxed);
    // Release: the two words above become visible before the slot is marked filled.
    RING.seq[slot].store(ticket + 1, Ordering::Release);
}

/// Take every recorded event, oldest first, into `out`. Returns how many events were dropped because the ring was
/// full since the last call. Single consumer: call from one thread (the poison listener).
pub fn drain_sigbus_events(out: &mut Vec<SigbusEvent>) -> u64 {
    loop {
        let tail = RING.tail.load(Ordering::Acquire);
        let head = RING.head.load(Ordering::Acquire);
        if tail >= head {
            break;
        }
        let slot = (tail % SIGBUS_RING_SLOTS as u64) as usize;
        // Acquire: pairs with the Release in record(), so the words are read after they were written.
        let seq = RING.seq[slot].load(Ordering::Acquire);
        if seq != tail + 1 {
            // A writer took the ticket but has not stored yet (a signal handler on another thread): stop here; the
            // next drain sees it.
            break;
        }
        out.push(decode(RING.word0[slot].load(Ordering::Relaxed), RING.word1[slot].load(Ordering::Relaxed)));
        // Release: the slot's words were read before the slot is given back to writers.
        RING.tail.store(tail + 1, Ordering::Release);
    }
    RING.dropped.swap(0, Ordering::AcqRel)
}

/// SIGBUS signals seen since start (ours or not).
pub fn sigbus_count() -> usize {
    TOTAL_SIGBUS.load(Ordering::Relaxed)
}

struct PrevAction(UnsafeCell<libc::sigaction>);
// SAFETY: written once, under INSTALL (a Once), before the handler is installed; only read afterwards.
unsafe impl Sync for PrevAction {}
// SAFETY: zeroed sigaction is a valid "SIG_DFL, no flags" value.
static PREV: PrevAction = PrevAction(UnsafeCell::new(unsafe { std::mem::zeroed() }));
static INSTALL: Once = Once::new();
static INSTALLED: AtomicBool = AtomicBool::new(false);

// si_code values for SIGBUS (asm-generic/siginfo.h).
const BUS_ADRERR: i32 = 2;
const BUS_MCEERR_AR: i32 = 4;
const BUS_MCEERR_AO: i32 = 5;
// Offset of si_addr_lsb in siginfo_t on x86_64: after si_addr (16 + 8) comes the short addr_lsb.
const SI_ADDR_LSB_OFFSET: usize = 24;
// Index of RIP and RCX in ucontext's gregs on x86_64 (sys/ucontext.h REG_RIP, REG_RCX).
const REG_RIP: usize = 16;
const REG_RCX: usize = 14;

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, uctx: *mut libc::c_void) {
    TOTAL_SIGBUS.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    // SAFETY: as above; si_addr is valid for SIGBUS.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: si_addr_lsb is a short at a fixed offset of the SIGBUS layout on x86_64; reading it is in bounds of
    // siginfo_t (128 bytes).
    let lsb = unsafe { std::ptr::read_unaligned(info.cast::<u8>().add(SI_ADDR_LSB_OFFSET).cast::<i16>()) };
    // SAFETY: SA_SIGINFO handlers get a valid ucontext_t.
    let uc = unsafe { &mut *uctx.cast::<libc::ucontext_t>() };
    let rip = uc.uc_mcontext.gregs[REG_RIP] as usize;
    let insn = std::ptr::addr_of!(nvstack_copy_mc_insn) as usize;
    let in_copy = rip == insn;
    let kind = match code {
        BUS_MCEERR_AR => Some(SigbusKind::McErrActionRequired),
        BUS_MCEERR_AO => Some(SigbusKind::McErrActionOptional),
        BUS_ADRERR if in_copy => Some(SigbusKind::AddressError),
        _ => None,
    };
    if let Some(kind) = kind {
        record(&SigbusEvent { kind, addr, addr_lsb: u8::try_from(lsb.clamp(0, 63)).unwrap_or(0), in_guarded_copy: in_copy });
    }
    if in_copy && kind.is_some() {
        // Resume at our fix-up label; RCX still holds the bytes left, which the fix-up returns.
        let fixup = std::ptr::addr_of!(nvstack_copy_mc_fixup) as usize;
        uc.uc_mcontext.gregs[REG_RIP] = fixup as i64;
        let _ = REG_RCX;
        return;
    }
    if code == BUS_MCEERR_AO {
        // Action optional: the page is poisoned but nobody touched it. Recorded; execution goes on.
        return;
    }
    // Not ours (or poison consumed outside a guarded copy): restore the previous disposition; returning re-runs the
    // faulting access, which then takes the default action (or the previous handler).
    // SAFETY: PREV was written before installation and is only read here; sigaction is async-signal-safe.
    unsafe {
        libc::sigaction(sig, PREV.0.get(), std::ptr::null_mut());
    }
}

/// Install the process's SIGBUS handler (idempotent) and opt into early machine-check kill (`PR_MCE_KILL_EARLY`) so
/// action-optional reports arrive.
///
/// # Errors
/// [`DriverError::Signal`] if `sigaction` fails.
pub fn install_sigbus_handler() -> Result<(), DriverError> {
    let mut err = None;
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; we fill the handler, mask and flags before passing it.
        let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
        act.sa_sigaction = on_sigbus as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) as usize;
        act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        // SAFETY: act.sa_mask is ours to initialise.
        unsafe { libc::sigemptyset(&mut act.sa_mask) };
        // SAFETY: PREV is written only here, inside the Once, before the handler can run.
        let rc = unsafe { libc::sigaction(libc::SIGBUS, &act, PREV.0.get()) };
        if rc != 0 {
            err = Some(std::io::Error::last_os_error());
            return;
        }
        // SAFETY: prctl with integer arguments has no memory effects.
        let rc = unsafe { libc::prctl(libc::PR_MCE_KILL, libc::PR_MCE_KILL_SET, libc::PR_MCE_KILL_EARLY, 0, 0) };
        if rc != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), "PR_MCE_KILL_EARLY refused: action-optional poison reports will not arrive");
        }
        INSTALLED.store(true, Ordering::Release);
        tracing::debug!("SIGBUS handler installed (guarded copies, poison events)");
    });
    match err {
        Some(source) => Err(DriverError::Signal { step: "sigaction(SIGBUS)", source }),
        None => Ok(()),
    }
}

/// Whether the handler is installed.
pub fn sigbus_handler_installed() -> bool {
    INSTALLED.load(Ordering::Acquire)
}

/// Send this process a synthetic SIGBUS with `si_code` = `BUS_MCEERR_AO` (or `_AR`) and the given address, as the
/// kernel would on a machine check (`rt_tgsigqueueinfo` to our own thread). A test aid: the host kernel here has no
/// `MADV_HWPOISON`.
///
/// # Errors
/// [`DriverError::Signal`] if the syscall fails.
pub fn inject_synthetic_sigbus(addr: usize, action_required: bool, addr_lsb: u8) -> Result<(), DriverError> {
    // SAFETY: siginfo_t is plain data; zeroed is valid; we fill the SIGBUS fields at their x86_64 offsets.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    info.si_signo = libc::SIGBUS;
    info.si_code = if action_required { BUS_MCEERR_AR } else { BUS_MCEERR_AO };
    let base = std::ptr::addr_of_mut!(info).cast::<u8>();
    // SAFETY: si_addr lives at offset 16 and si_addr_lsb at 24 inside the 128-byte siginfo_t.
    unsafe {
        std::ptr::write_unaligned(base.add(16).cast::<usize>(), addr);
        std::ptr::write_unaligned(base.add(SI_ADDR_LSB_OFFSET).cast::<i16>(), i16::from(addr_lsb));
    }
    // SAFETY: getpid/gettid have no preconditions.
    let (pid, tid) = unsafe { (libc::getpid(), libc::gettid()) };
    // SAFETY: rt_tgsigqueueinfo to our own thread group with a valid siginfo pointer. The kernel refuses a positive
    // si_code from user space for another process, but allows it for our own thread group.
    let rc = unsafe { libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, libc::SIGBUS, &info) };
    if rc != 0 {
        return Err(DriverError::Signal { step: "rt_tgsigqueueinfo(SIGBUS)", source: std::io::Error::last_os_error() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn guarded_copy_copies() {
        install_sigbus_handler().unwrap();
        let src: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let mut dst = vec![0u8; src.len()];
        // SAFETY: both buffers are valid and distinct.
        unsafe { copy_guarded(dst.as_mut_ptr(), src.as_ptr(), src.len()) }.unwrap();
        assert_eq!(src, dst);
    }

    #[test]
    fn guarded_copy_survives_a_real_sigbus() {
        install_sigbus_handler().unwrap();
        // A file mapped for two pages but only one page long: reading the second page raises a real SIGBUS
        // (BUS_ADRERR), which the guarded copy must turn into an error.
        let dir = std::env::temp_dir().join(format!("nvstack-mc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("short");
        let mut f = std::fs::File::create(&path).unwrap();
        f.write_all(&[0xabu8; 4096]).unwrap();
        drop(f);
        let f = std::fs::File::open(&path).unwrap();
        use std::os::fd::AsRawFd;
        // SAFETY: a fresh shared read-only mapping of our own file.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), 8192, libc::PROT_READ, libc::MAP_SHARED, f.as_raw_fd(), 0) };
        assert_ne!(p, libc::MAP_FAILED);
        let mut dst = vec![0u8; 8192];
        let mut events = Vec::new();
        drain_sigbus_events(&mut events);
        // SAFETY: the mapping is 8192 bytes; the second page faults with SIGBUS, which the guard handles.
        let r = unsafe { copy_guarded(dst.as_mut_ptr(), p.cast::<u8>(), 8192) };
        let fault = r.unwrap_err();
        assert_eq!(fault.copied, 4096);
        assert_eq!(fault.fault_addr, p as usize + 4096);
        assert!(dst[..4096].iter().all(|&b| b == 0xab));
        events.clear();
        drain_sigbus_events(&mut events);
        assert!(events.iter().any(|e| e.kind == SigbusKind::AddressError && e.in_guarded_copy && e.addr == p as usize + 4096));
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p, 8192) };
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn synthetic_machine_check_is_recorded() {
        install_sigbus_handler().unwrap();
        let mut events = Vec::new();
        drain_sigbus_events(&mut events);
        events.clear();
        inject_synthetic_sigbus(0x7f00_dead_b000, false, 12).unwrap();
        drain_sigbus_events(&mut events);
        let ev = events.iter().find(|e| e.addr == 0x7f00_dead_b000).expect("event recorded");
        assert_eq!(ev.kind, SigbusKind::McErrActionOptional);
        assert_eq!(ev.addr_lsb, 12);
        assert!(!ev.in_guarded_copy);
    }
}
