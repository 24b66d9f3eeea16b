//! Cross-core round trip: two threads pinned to CPUs 0 and 1 bounce one cache line 200 000 times; prints the
//! nanoseconds per round trip. The striped cache's cost per remote piece is a few such transfers, so the scaling
//! benchmark prints this beside its figures: on a shared VM the two vCPUs may sit on one L3 (tens of ns) or not
//! (hundreds), and the figures move with it.
//!
//! Run with `cargo bench -q -p nvstack-cache --bench core_pingpong` (used by `bench/cache-scaling.sh`).
//! `PINGPONG_CPUS=a,b` picks another pair (default `0,1`), to map a larger machine's cores.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

const TRIPS: u64 = 200_000;

fn pin(cpu: usize) -> bool {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it; sched_setaffinity reads it and
    // applies it to the calling thread (pid 0).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    }
}

/// The CPU pair from `PINGPONG_CPUS` ("a,b"), or (0, 1).
fn cpus() -> (usize, usize) {
    let Ok(v) = std::env::var("PINGPONG_CPUS") else { return (0, 1) };
    let mut it = v.split(',').map(|x| x.trim().parse::<usize>());
    match (it.next(), it.next(), it.next()) {
        (Some(Ok(a)), Some(Ok(b)), None) if a < 1024 && b < 1024 => (a, b),
        _ => {
            eprintln!("PINGPONG_CPUS={v:?}: expected two CPU numbers such as 0,1");
            std::process::exit(2);
        }
    }
}

fn main() {
    let (cpu_a, cpu_b) = cpus();
    let line = Arc::new(AtomicU64::new(0));
    let other = Arc::clone(&line);
    let echo = std::thread::spawn(move || {
        let pinned = pin(cpu_b);
        // Answer each odd value with the next even one.
        let mut want = 1;
        while want < 2 * TRIPS {
            if other.load(Ordering::Acquire) == want {
                other.store(want + 1, Ordering::Release);
                want += 2;
            } else {
                std::hint::spin_loop();
            }
        }
        pinned
    });
    let pinned = pin(cpu_a);
    let t0 = Instant::now();
    for i in 0..TRIPS {
        line.store(2 * i + 1, Ordering::Release);
        while line.load(Ordering::Acquire) != 2 * i + 2 {
            std::hint::spin_loop();
        }
    }
    let ns = t0.elapsed().as_nanos() as f64 / TRIPS as f64;
    let pinned = echo.join().unwrap_or(false) && pinned;
    println!("cross-core round trip cpu{cpu_a}<->cpu{cpu_b}: {ns:.0} ns{}", if pinned { "" } else { " (threads not pinned)" });
}
