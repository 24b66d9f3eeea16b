//! Device specifications: the text a user gives (`--bdev null:1G`) turned into an open [`BlockDev`].
//!
//! # Syntax
//! ```text
//! KIND:ARGS[,KEY=VALUE]...
//!
//! null:SIZE                 a device that completes at once and moves no data    ("Null disk", Null0, Null1...)
//! malloc:SIZE               a RAM disk                                           ("Malloc disk", Malloc0...)
//! file:PATH[:SIZE]          a file or block device through io_uring              ("URING bdev", named by the file)
//! pmem:PATH[:SIZE]          persistent memory: /dev/daxX.Y, an fsdax file, a file ("pmem disk", named by the file)
//!
//! options (any order, each at most once):
//!   bs=N      logical block size: a power of two in 512..=65536 (sizes such as 4K are taken).
//!             Default 512; for an O_DIRECT file, the file system's direct-I/O block size when that is larger.
//!   name=X    the device's name instead of the default one
//! ```
//! SIZE is parsed by [`parse_size`]: `4096`, `512K`, `64M`, `1G`, `1GiB`, `1T` (binary units, case-insensitive).
//!
//! For `file:`, the last `:`-separated part is taken as SIZE when it parses as a size; otherwise the whole text
//! is the path (so `file:/data/a:b` is the path `/data/a:b`). A missing file is created sparse with SIZE; an
//! existing one smaller than SIZE is extended, one larger is refused. A `,` followed by `KEY=VALUE` at the end of
//! the text is an option, so a path cannot end in such a part.
//!
//! Examples: `null:1G`, `null:1G,bs=4096`, `malloc:64M,name=Ram7`, `file:/dev/shm/disk.img:1G,bs=4096`,
//! `file:/dev/nvme0n1`.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use nvstack_driver::dma::Arena;

use crate::{BdevError, BlockDev};

/// Kinds this build knows, for error messages.
pub const KNOWN_KINDS: &[&str] = &["null", "malloc", "file", "pmem", "nvme"];
/// Options this build knows, for error messages.
pub const KNOWN_OPTIONS: &[&str] = &["bs", "name"];
/// Default logical block size.
pub const DEFAULT_BLOCK_SIZE: u32 = 512;

static NULL_COUNT: AtomicU32 = AtomicU32::new(0);
static MALLOC_COUNT: AtomicU32 = AtomicU32::new(0);

/// Parse a byte size: digits with an optional binary unit `K`, `M`, `G`, `T`, `P` (each also as `KB`/`KiB`...),
/// case-insensitive. `1G` = `1GiB` = `1gb` = 2^30.
///
/// # Errors
/// A message naming the text and what is accepted, for an empty text, a bad number, an unknown unit or an overflow.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    if num.is_empty() {
        return Err(format!("size {text:?}: expected digits with an optional unit (4096, 512K, 64M, 1G, 1GiB, 1T)"));
    }
    let value: u64 = num.parse().map_err(|_| format!("size {text:?}: number too large"))?;
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        "p" | "pb" | "pib" => 50,
        _ => return Err(format!("size {text:?}: unknown unit {unit:?} (use K, M, G, T or P, optionally with B or iB)")),
    };
    value.checked_mul(1u64 << shift).ok_or_else(|| format!("size {text:?}: overflows 64 bits"))
}

/// Check a block size and a device size, and return the number of blocks.
///
/// # Errors
/// [`BdevError::BlockSize`] unless `block_size` is a power of two in 512..=65536; [`BdevError::Size`] unless
/// `size_bytes` is a non-zero multiple of it.
pub fn block_count(name: &str, size_bytes: u64, block_size: u32) -> Result<u64, BdevError> {
    check_block_size(name, block_size)?;
    if size_bytes == 0 || !size_bytes.is_multiple_of(u64::from(block_size)) {
        return Err(BdevError::Size { name: name.to_owned(), size_bytes, block_size });
    }
    Ok(size_bytes / u64::from(block_size))
}

/// Check that a block size is a power of two in 512..=65536.
///
/// # Errors
/// [`BdevError::BlockSize`] otherwise.
pub fn check_block_size(name: &str, block_size: u32) -> Result<(), BdevError> {
    if !block_size.is_power_of_two() || !(512..=65536).contains(&block_size) {
        return Err(BdevError::BlockSize {
            name: name.to_owned(),
            block_size,
            reason: "must be a power of two from 512 to 65536".into(),
        });
    }
    Ok(())
}

/// A parsed specification (before anything is opened).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    /// The kind (`null`, `malloc`, `file`...).
    pub kind: String,
    /// What follows `KIND:`, options removed.
    pub args: String,
    /// `bs=`, if given.
    pub block_size: Option<u32>,
    /// `name=`, if given.
    pub name: Option<String>,
}

fn spec_err(spec: &str, reason: impl Into<String>) -> BdevError {
    BdevError::Spec { spec: spec.to_owned(), reason: reason.into() }
}

/// Split a specification into kind, arguments and options.
///
/// # Errors
/// [`BdevError::Spec`] for a missing `KIND:`, an unknown or repeated option, or a bad option value.
pub fn parse_spec(spec: &str) -> Result<Spec, BdevError> {
    let Some((kind, rest)) = spec.trim().split_once(':') else {
        return Err(spec_err(spec, format!("expected KIND:ARGS, with KIND one of {}", KNOWN_KINDS.join(", "))));
    };
    let kind = kind.trim().to_ascii_lowercase();
    let mut args = rest;
    let mut block_size = None;
    let mut name = None;
    while let Some((head, opt)) = args.rsplit_once(',') {
        let Some((key, value)) = opt.split_once('=') else { break };
        match key.trim() {
            "bs" => {
                if block_size.is_some() {
                    return Err(spec_err(spec, "bs= given twice"));
                }
                let bytes = parse_size(value).map_err(|e| spec_err(spec, format!("bs=: {e}")))?;
                let bs = u32::try_from(bytes).map_err(|_| spec_err(spec, format!("bs={value} is too large")))?;
                block_size = Some(bs);
            }
            "name" => {
                if name.is_some() {
                    return Err(spec_err(spec, "name= given twice"));
                }
                if value.is_empty() {
                    return Err(spec_err(spec, "name= is empty"));
                }
                name = Some(value.to_owned());
            }
            other => {
                return Err(spec_err(spec, format!("unknown option {other:?} (known: {})", KNOWN_OPTIONS.join(", "))));
            }
        }
        args = head;
    }
    Ok(Spec { kind, args: args.to_owned(), block_size, name })
}

/// Open the device a specification names. See the module doc for the syntax.
///
/// The arena is the one every I/O buffer will come from: the file backend registers it with io_uring (fixed
/// buffers), the nvme backend will map it for DMA.
///
/// # Errors
/// [`BdevError::Spec`] for bad syntax or an unknown kind (listing the known ones); otherwise the backend's own
/// error ([`BdevError::Size`], [`BdevError::BlockSize`], [`BdevError::FileOpen`]...).
pub fn open_bdev(spec: &str, arena: &Arc<Arena>) -> Result<Arc<dyn BlockDev>, BdevError> {
    let s = parse_spec(spec)?;
    let size = |what: &str| -> Result<u64, BdevError> {
        if s.args.is_empty() {
            return Err(spec_err(spec, format!("{}: missing {what}", s.kind)));
        }
        parse_size(&s.args).map_err(|e| spec_err(spec, e))
    };
    let block_size = s.block_size.unwrap_or(DEFAULT_BLOCK_SIZE);
    match s.kind.as_str() {
        "null" => {
            let size_bytes = size("SIZE (null:1G)")?;
            let name = s.name.clone().unwrap_or_else(|| format!("Null{}", NULL_COUNT.fetch_add(1, Ordering::Relaxed)));
            Ok(crate::null::NullBdev::new(&name, size_bytes, block_size)?)
        }
        "malloc" => {
            let size_bytes = size("SIZE (malloc:64M)")?;
            let name =
                s.name.clone().unwrap_or_else(|| format!("Malloc{}", MALLOC_COUNT.fetch_add(1, Ordering::Relaxed)));
            Ok(crate::malloc::MallocBdev::new(&name, size_bytes, block_size)?)
        }
        "file" => open_file(spec, &s, arena),
        // ---- Later kinds are dispatched here: ----
        "nvme" => {
            if s.block_size.is_some() {
                return Err(spec_err(spec, "nvme: bs= is not taken (the namespace's LBA format sets the block size)"));
            }
            crate::nvme::open(spec, &s.args, s.name.as_deref(), arena)
        }
        "pmem" => open_pmem(spec, &s),
        // Add the kind to KNOWN_KINDS as well.
        other => Err(spec_err(spec, format!("unknown kind {other:?} (known: {})", KNOWN_KINDS.join(", ")))),
    }
}

fn open_pmem(spec: &str, s: &Spec) -> Result<Arc<dyn BlockDev>, BdevError> {
    let (path, size_bytes) = match s.args.rsplit_once(':') {
        Some((path, tail)) if !path.is_empty() => match parse_size(tail) {
            Ok(size) => (path, Some(size)),
            Err(_) => (s.args.as_str(), None),
        },
        _ => (s.args.as_str(), None),
    };
    if path.is_empty() {
        return Err(spec_err(spec, "pmem: missing PATH (pmem:/dev/dax0.0, pmem:/mnt/pmem/file[:SIZE])"));
    }
    let p = std::path::Path::new(path);
    let name = s.name.clone().unwrap_or_else(|| {
        p.file_name().and_then(|n| n.to_str()).map(str::to_owned).unwrap_or_else(|| "pmem0".to_owned())
    });
    Ok(crate::pmem::PmemBdev::open(&name, p, size_bytes, s.block_size.unwrap_or(DEFAULT_BLOCK_SIZE))?)
}

fn open_file(spec: &str, s: &Spec, arena: &Arc<Arena>) -> Result<Arc<dyn BlockDev>, BdevError> {
    let (path, size_bytes) = match s.args.rsplit_once(':') {
        Some((path, tail)) if !path.is_empty() => match parse_size(tail) {
            Ok(size) => (path, Some(size)),
            Err(_) => (s.args.as_str(), None),
        },
        _ => (s.args.as_str(), None),
    };
    if path.is_empty() {
        return Err(spec_err(spec, "file: missing PATH (file:PATH[:SIZE])"));
    }
    let name = s.name.clone().unwrap_or_else(|| {
        std::path::Path::new(path).file_name().map_or_else(|| path.to_owned(), |n| n.to_string_lossy().into_owned())
    });
    let cfg = crate::file::FileConfig { path: path.into(), size_bytes, block_size: s.block_size };
    Ok(crate::file::FileBdev::open(&name, &cfg, arena)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvstack_driver::dma::ArenaConfig;

    fn arena() -> Arc<Arena> {
        Arena::new(ArenaConfig { size_bytes: 4 << 20, ..Default::default() }).unwrap()
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("1gib"), Ok(1 << 30));
        assert_eq!(parse_size("2gb"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size(" 8M "), Ok(8 << 20));
        assert_eq!(parse_size("0"), Ok(0));
        for bad in ["", "G", "1X", "1.5G", "-1", "1 G", "99999999999999999999", "16384P", "1Gx"] {
            assert!(parse_size(bad).is_err(), "{bad:?} must be refused");
        }
        assert!(parse_size("16384P").unwrap_err().contains("overflows"));
    }

    #[test]
    fn spec_syntax() {
        let s = parse_spec("null:1G,bs=4096").unwrap();
        assert_eq!((s.kind.as_str(), s.args.as_str(), s.block_size, s.name), ("null", "1G", Some(4096), None));
        let s = parse_spec("file:/a,b/c:2G,name=X,bs=4K").unwrap();
        assert_eq!((s.args.as_str(), s.block_size, s.name.as_deref()), ("/a,b/c:2G", Some(4096), Some("X")));
        assert!(matches!(parse_spec("null1G"), Err(BdevError::Spec { .. })));
        let e = parse_spec("null:1G,color=red").unwrap_err().to_string();
        assert!(e.contains("unknown option") && e.contains("bs"), "{e}");
        assert!(parse_spec("null:1G,bs=1,bs=2").is_err());
        assert!(parse_spec("null:1G,bs=huge").is_err());
    }

    #[test]
    fn open_errors_are_clear() {
        let a = arena();
        let e = open_bdev("floppy:1M", &a).err().unwrap().to_string();
        assert!(e.contains("unknown kind") && e.contains("null") && e.contains("malloc") && e.contains("file"), "{e}");
        assert!(matches!(open_bdev("null:", &a), Err(BdevError::Spec { .. })));
        assert!(matches!(open_bdev("null:1Q", &a), Err(BdevError::Spec { .. })));
        assert!(matches!(open_bdev("null:0", &a), Err(BdevError::Size { .. })));
        assert!(matches!(open_bdev("null:1000", &a), Err(BdevError::Size { .. })));
        assert!(matches!(open_bdev("null:1M,bs=1000", &a), Err(BdevError::BlockSize { .. })));
        assert!(matches!(open_bdev("null:1M,bs=256", &a), Err(BdevError::BlockSize { .. })));
        assert!(matches!(open_bdev("null:1M,bs=128K", &a), Err(BdevError::BlockSize { .. })));
        assert!(matches!(open_bdev("malloc:6000", &a), Err(BdevError::Size { .. })));
        assert!(matches!(open_bdev("file:", &a), Err(BdevError::Spec { .. })));
        let missing = format!("file:/var/tmp/nvstack-spec-missing-{}.img", std::process::id());
        let e = open_bdev(&missing, &a).err().unwrap();
        assert!(matches!(e, BdevError::FileSize { .. }) && e.to_string().contains("give a size"), "{e}");
    }

    #[test]
    fn open_file_kind() {
        let a = arena();
        let dir = std::env::temp_dir().join(format!("nvstack-spec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // A ':' inside the path is kept when the last part is not a size.
        let path = dir.join("a:b.img");
        std::fs::write(&path, vec![0u8; 8192]).unwrap();
        let d = open_bdev(&format!("file:{}", path.display()), &a).unwrap();
        assert_eq!((d.name(), d.product_name(), d.geometry().size_bytes()), ("a:b.img", "URING bdev", 8192));
        drop(d);
        let d = open_bdev(&format!("file:{}:64K,bs=4K,name=F0", path.display()), &a).unwrap();
        assert_eq!((d.name(), d.geometry().block_size, d.geometry().block_count), ("F0", 4096, 16));
        drop(d);
        let e = open_bdev(&format!("file:{}:8K", path.display()), &a).err().unwrap();
        assert!(matches!(e, BdevError::FileSize { .. }), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn open_names_and_geometry() {
        let a = arena();
        let d = open_bdev("null:1G,bs=4096", &a).unwrap();
        assert!(d.name().starts_with("Null"), "{}", d.name());
        assert_eq!(d.product_name(), "Null disk");
        assert_eq!(d.geometry().block_size, 4096);
        assert_eq!(d.geometry().block_count, 1 << 18);
        let d = open_bdev("malloc:1M,name=Ram7", &a).unwrap();
        assert_eq!(d.name(), "Ram7");
        assert_eq!(d.product_name(), "Malloc disk");
        assert_eq!(d.geometry().block_size, 512);
        assert_eq!(d.geometry().size_bytes(), 1 << 20);
        let d = open_bdev("MALLOC:64K", &a).unwrap();
        assert!(d.name().starts_with("Malloc"), "{}", d.name());
    }
}
