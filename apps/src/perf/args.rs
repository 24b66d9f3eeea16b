//! `nvstack perf` command-line arguments, and their checked form ([`PerfConfig`]).
//!
//! Flags follow spdk_nvme_perf and bdevperf: `-q` queue depth, `-o` I/O size, `-w` workload, `-M` read percent,
//! `-t` seconds, `-m` core mask. Checks that need the device (block size, size) are in [`PerfConfig::check_device`].

use nvstack_blockdev::{coremask, Geometry};

use crate::error::AppError;

/// Largest queue depth per core (a limit in DESIGN.md: descriptors and buffers are allocated up front).
pub const MAX_QUEUE_DEPTH: u32 = 4096;
/// Largest I/O size (a limit in DESIGN.md).
pub const MAX_IO_BYTES: u64 = 128 << 20;
/// Longest run (-t), one day.
pub const MAX_TIME_S: u64 = 86_400;
/// Largest verify generation table per core, in bytes (4 bytes per I/O-size slot of the core's slice).
pub const MAX_VERIFY_TABLE_BYTES: u64 = 1 << 30;

/// The access pattern (`-w`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential mixed reads and writes (`-M` read percent).
    Rw,
    /// Random mixed reads and writes (`-M` read percent).
    Randrw,
}

impl Workload {
    /// Whether offsets are random (else sequential).
    pub fn is_random(self) -> bool {
        matches!(self, Workload::Randread | Workload::Randwrite | Workload::Randrw)
    }
    /// Whether the workload only reads.
    pub fn is_read_only(self) -> bool {
        matches!(self, Workload::Read | Workload::Randread)
    }
    /// The name as given to `-w`.
    pub fn name(self) -> &'static str {
        match self {
            Workload::Read => "read",
            Workload::Write => "write",
            Workload::Randread => "randread",
            Workload::Randwrite => "randwrite",
            Workload::Rw => "rw",
            Workload::Randrw => "randrw",
        }
    }
}

/// Arguments of `nvstack perf`.
#[derive(Debug, clap::Args)]
pub struct PerfArgs {
    /// The device: `null:SIZE`, `malloc:SIZE`, `file:PATH[:SIZE]`, `nvme:BDF[/NSID]`, `pmem:PATH`, `cache:<any of these>`.
    #[arg(long = "bdev", value_name = "SPEC")]
    pub bdev: String,
    /// Queue depth per core: I/Os kept in flight.
    #[arg(short = 'q', long = "queue-depth", value_name = "N", default_value_t = 32)]
    pub queue_depth: u32,
    /// I/O size in bytes (4096, 4k, 128K, 1M); a multiple of the device's block size.
    #[arg(short = 'o', long = "io-size", value_name = "SIZE", default_value = "4096")]
    pub io_size: String,
    /// Workload.
    #[arg(short = 'w', long = "workload", value_enum, default_value_t = Workload::Randread)]
    pub workload: Workload,
    /// Read percentage of the rw and randrw workloads (0..=100).
    #[arg(short = 'M', long = "rwmixread", value_name = "PCT", default_value_t = 50)]
    pub rwmixread: u32,
    /// Run time in seconds.
    #[arg(short = 't', long = "time", value_name = "SECONDS", default_value_t = 10)]
    pub time_s: u64,
    /// Cores, one reactor each: a hex mask (0x3) or a list (0,1 or 0-3). Default: the first core this process may
    /// use.
    #[arg(short = 'm', long = "core-mask", value_name = "MASK")]
    pub core_mask: Option<String>,
    /// Print one JSON document instead of tables.
    #[arg(long = "json")]
    pub json: bool,
    /// Write a pattern (LBA, generation, core) into every block written, and check every block read against it.
    #[arg(long = "verify")]
    pub verify: bool,
    /// DMA arena size in MiB (default: what the I/O buffers and the device need, plus a margin).
    #[arg(long = "arena-mb", value_name = "MIB")]
    pub arena_mb: Option<u64>,
    /// Seed of the offset generator (each core derives its own stream from it).
    #[arg(long = "seed", value_name = "N", default_value_t = 0x6e76_7374_6163)]
    pub seed: u64,
    /// Stop each core after it has submitted N I/Os (or at -t seconds, whichever comes first).
    #[arg(long = "io-count", value_name = "N")]
    pub io_count: Option<u64>,
    /// Do not print the one-second progress lines (on stderr).
    #[arg(long = "no-progress")]
    pub no_progress: bool,
}

/// Checked perf parameters.
#[derive(Debug, Clone)]
pub struct PerfConfig {
    /// Device spec.
    pub bdev: String,
    /// Queue depth per core.
    pub queue_depth: u32,
    /// I/O size in bytes.
    pub io_bytes: u32,
    /// Workload.
    pub workload: Workload,
    /// Read percentage (100 for read-only, 0 for write-only workloads).
    pub read_pct: u32,
    /// Run time in seconds.
    pub time_s: u64,
    /// OS core ids, one reactor each.
    pub cores: Vec<usize>,
    /// JSON output.
    pub json: bool,
    /// Verify data.
    pub verify: bool,
    /// Arena size asked for, in MiB.
    pub arena_mb: Option<u64>,
    /// PRNG seed.
    pub seed: u64,
    /// I/Os per core before stopping (`u64::MAX`: no limit).
    pub io_count: u64,
    /// Print progress lines.
    pub progress: bool,
}

/// Parse a size: plain bytes (`4096`) or with a binary suffix (`4k`, `128K`, `1M`, `2G`, `1T`, optionally followed by
/// `B` or `iB`).
///
/// # Errors
/// [`AppError::Usage`] naming the text and the accepted forms.
pub fn parse_size(text: &str) -> Result<u64, AppError> {
    let bad = || AppError::Usage(format!("size {text:?} is not a byte count such as 4096, 4k, 128K or 1M"));
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, suffix) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(bad());
    }
    let n: u64 = num.parse().map_err(|_| bad())?;
    let lower = suffix.to_ascii_lowercase();
    let unit = lower.strip_suffix("ib").or_else(|| lower.strip_suffix('b')).unwrap_or(&lower);
    let shift = match unit {
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(bad()),
    };
    n.checked_mul(1u64 << shift).ok_or_else(|| AppError::Usage(format!("size {text:?} is too large")))
}

impl PerfConfig {
    /// Check the arguments that do not need the device.
    ///
    /// # Errors
    /// [`AppError::Usage`] for a bad value; [`AppError::Bdev`] (`CoreMask`, exit status 2) for a bad core mask.
    pub fn from_args(a: &PerfArgs) -> Result<PerfConfig, AppError> {
        if a.queue_depth == 0 || a.queue_depth > MAX_QUEUE_DEPTH {
            return Err(AppError::Usage(format!(
                "queue depth -q {} is out of range: give 1..={MAX_QUEUE_DEPTH}",
                a.queue_depth
            )));
        }
        let io_bytes = parse_size(&a.io_size)?;
        if io_bytes == 0 || io_bytes > MAX_IO_BYTES {
            return Err(AppError::Usage(format!(
                "I/O size -o {} is out of range: give 1 block up to {} MiB",
                a.io_size,
                MAX_IO_BYTES >> 20
            )));
        }
        let io_bytes = u32::try_from(io_bytes).map_err(|_| AppError::Usage(format!("I/O size -o {} is too large", a.io_size)))?;
        if a.rwmixread > 100 {
            return Err(AppError::Usage(format!("read percentage -M {} is over 100", a.rwmixread)));
        }
        let read_pct = match a.workload {
            Workload::Read | Workload::Randread => 100,
            Workload::Write | Workload::Randwrite => 0,
            Workload::Rw | Workload::Randrw => a.rwmixread,
        };
        if a.time_s == 0 || a.time_s > MAX_TIME_S {
            return Err(AppError::Usage(format!("run time -t {} is out of range: give 1..={MAX_TIME_S} seconds", a.time_s)));
        }
        if a.io_count == Some(0) {
            return Err(AppError::Usage("--io-count 0 would do nothing: give at least 1".into()));
        }
        if a.arena_mb == Some(0) {
            return Err(AppError::Usage("--arena-mb 0: the arena needs at least 1 MiB".into()));
        }
        let cores = match &a.core_mask {
            Some(m) => coremask::parse(m)?,
            None => {
                let allowed = coremask::allowed_cores();
                vec![allowed.first().copied().unwrap_or(0)]
            }
        };
        Ok(PerfConfig {
            bdev: a.bdev.clone(),
            queue_depth: a.queue_depth,
            io_bytes,
            workload: a.workload,
            read_pct,
            time_s: a.time_s,
            cores,
            json: a.json,
            verify: a.verify,
            arena_mb: a.arena_mb,
            seed: a.seed,
            io_count: a.io_count.unwrap_or(u64::MAX),
            progress: !a.no_progress,
        })
    }

    /// Whether each core works on its own slice of the device: always when anything writes (so that `--verify` is
    /// well defined), and for read-only workloads with `--verify` (each core pre-fills and checks its own slice).
    pub fn sliced(&self) -> bool {
        !self.workload.is_read_only() || self.verify
    }

    /// Check the I/O size and the device size against the device's geometry.
    ///
    /// # Errors
    /// [`AppError::Usage`] naming the mismatch.
    pub fn check_device(&self, name: &str, geo: &Geometry) -> Result<(), AppError> {
        let bs = geo.block_size;
        if bs == 0 || !self.io_bytes.is_multiple_of(bs) {
            return Err(AppError::Usage(format!(
                "I/O size -o {} is not a multiple of {name}'s block size {bs}",
                self.io_bytes
            )));
        }
        if self.io_bytes > geo.max_transfer_bytes {
            return Err(AppError::Usage(format!(
                "I/O size -o {} is larger than {name}'s largest transfer, {} bytes",
                self.io_bytes, geo.max_transfer_bytes
            )));
        }
        let slots = geo.size_bytes() / u64::from(self.io_bytes);
        let parts = if self.sliced() { self.cores.len() as u64 } else { 1 };
        if slots < parts {
            return Err(AppError::Usage(format!(
                "{name} ({} bytes) is too small for {parts} core(s) doing {}-byte I/Os",
                geo.size_bytes(),
                self.io_bytes
            )));
        }
        if self.verify {
            let per_core = slots / parts;
            if per_core < u64::from(self.queue_depth) {
                return Err(AppError::Usage(format!(
                    "--verify needs at least as many {}-byte slots per core as the queue depth ({}); {name} has {per_core} \
                     per core: lower -q or use a larger device",
                    self.io_bytes, self.queue_depth
                )));
            }
            if per_core.saturating_mul(4) > MAX_VERIFY_TABLE_BYTES {
                return Err(AppError::Usage(format!(
                    "--verify would need a {} MiB generation table per core (4 bytes per {}-byte slot, limit {} MiB): \
                     use a larger -o",
                    per_core.saturating_mul(4) >> 20,
                    self.io_bytes,
                    MAX_VERIFY_TABLE_BYTES >> 20
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("4k").unwrap(), 4096);
        assert_eq!(parse_size("128K").unwrap(), 128 << 10);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("1MiB").unwrap(), 1 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("4KB").unwrap(), 4096);
        for bad in ["", "k", "4x", "-1", "4 k", "1.5M", "99999999999999999999"] {
            assert!(parse_size(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn workloads() {
        assert!(Workload::Randread.is_random() && Workload::Randread.is_read_only());
        assert!(!Workload::Rw.is_random() && !Workload::Rw.is_read_only());
        assert!(!Workload::Write.is_read_only());
    }
}
