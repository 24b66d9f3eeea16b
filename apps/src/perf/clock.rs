//! The I/O path's clock: the CPU's time-stamp counter, calibrated once against [`Instant`].
//!
//! One `rdtsc` costs a handful of cycles and no system call; `clock_gettime` per I/O would cost more than the rest of
//! the null-device path. On x86-64 with an invariant TSC (every x86-64 server of the last decade) the counter runs at
//! a constant rate on every core, so ticks taken on one reactor compare with ticks taken on another. Elsewhere the
//! clock falls back to nanoseconds since a process-wide origin.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Read the tick counter.
#[inline(always)]
pub fn ticks() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: rdtsc has no memory effects and is available on every x86-64 CPU.
        unsafe { core::arch::x86_64::_rdtsc() }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        static ORIGIN: OnceLock<Instant> = OnceLock::new();
        let origin = *ORIGIN.get_or_init(Instant::now);
        u64::try_from(origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// CPU time this thread has run, in nanoseconds (0 if the clock cannot be read). Two calls per run, never per I/O:
/// it tells how much of the wall-clock run a reactor actually had its core (the rest went to other processes).
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into the one we own; CLOCK_THREAD_CPUTIME_ID needs nothing else.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000_000).saturating_add(nanos)
}

/// Ticks per second, measured once (about 50 ms the first time it is called).
pub fn ticks_per_sec() -> u64 {
    static HZ: OnceLock<u64> = OnceLock::new();
    *HZ.get_or_init(calibrate)
}

fn calibrate() -> u64 {
    if !cfg!(target_arch = "x86_64") {
        return 1_000_000_000;
    }
    // Two measurements, keep the longer-window one's rate; a sleep that overshoots only lengthens the window.
    let t0 = Instant::now();
    let c0 = ticks();
    std::thread::sleep(Duration::from_millis(50));
    let c1 = ticks();
    let t1 = Instant::now();
    let ns = t1.duration_since(t0).as_nanos().max(1);
    let hz = u128::from(c1.wrapping_sub(c0)) * 1_000_000_000 / ns;
    let hz = u64::try_from(hz).unwrap_or(u64::MAX).max(1);
    tracing::debug!(hz, "TSC calibrated");
    hz
}

/// Converts ticks to time units.
#[derive(Debug, Clone, Copy)]
pub struct TickScale {
    hz: u64,
}

impl TickScale {
    /// The process's calibrated scale.
    pub fn calibrated() -> TickScale {
        TickScale { hz: ticks_per_sec() }
    }
    /// A fixed scale (tests).
    #[cfg(test)]
    pub fn fixed(hz: u64) -> TickScale {
        TickScale { hz: hz.max(1) }
    }
    /// Ticks per second.
    pub fn hz(self) -> u64 {
        self.hz
    }
    /// Ticks to microseconds.
    pub fn us(self, ticks: f64) -> f64 {
        ticks * 1e6 / self.hz as f64
    }
    /// Ticks to seconds.
    pub fn secs(self, ticks: u64) -> f64 {
        ticks as f64 / self.hz as f64
    }
    /// Seconds to ticks (saturating).
    pub fn ticks_for(self, d: Duration) -> u64 {
        u64::try_from(d.as_nanos().saturating_mul(u128::from(self.hz)) / 1_000_000_000).unwrap_or(u64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_advance_and_scale_is_sane() {
        let a = ticks();
        std::thread::sleep(Duration::from_millis(2));
        let b = ticks();
        assert!(b > a);
        let hz = ticks_per_sec();
        // Between 100 MHz and 10 GHz.
        assert!((100_000_000..10_000_000_000).contains(&hz), "hz = {hz}");
        let s = TickScale::fixed(2_000_000_000);
        assert_eq!(s.ticks_for(Duration::from_millis(1)), 2_000_000);
        assert!((s.us(2000.0) - 1.0).abs() < 1e-9);
        let c0 = thread_cpu_ns();
        let mut x = 0u64;
        for i in 0..2_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(thread_cpu_ns() > c0, "{x}");
    }
}
