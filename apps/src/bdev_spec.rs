//! Device specs for the apps: everything [`nvstack_blockdev::spec::open_bdev`] takes, plus the cache stacked on top.
//!
//! # Syntax
//! ```text
//! cache:<backing spec>[,size=N][,mode=wb|wt]
//! ```
//! The backing spec is any spec `open_bdev` takes (`malloc:1G`, `file:/dev/shm/d.img:1G,bs=4096`, `nvme:...`). The
//! cache's own options are peeled off the end of the text: trailing `,size=N` (cache pages, default 64M, parsed by
//! [`parse_size`]) and `,mode=wb` (write-back, the default) or `,mode=wt` (write-through), each at most once, in any
//! order. Everything before them is the backing spec, options included: `cache:malloc:1G,bs=4096,size=256M,mode=wt`
//! is a 256 MiB write-through cache over `malloc:1G,bs=4096`.
//!
//! The cache's pages come from the arena passed in, which must hold [`extra_arena_bytes`] beyond its other uses.
//! Given reactors, the cache is striped over them (one shard per reactor); without, it is the single-reactor cache.

use std::sync::Arc;

use nvstack_blockdev::spec::{open_bdev, parse_size};
use nvstack_blockdev::BlockDev;
use nvstack_blockdev::reactor::Reactors;
use nvstack_cache::{CacheBdev, CacheConfig, CacheCounters};
use nvstack_driver::dma::Arena;

use crate::error::AppError;

/// The prefix that stacks a cache.
const CACHE_PREFIX: &str = "cache:";

/// A parsed `cache:` spec.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CacheSpec {
    backing: String,
    cache_bytes: u64,
    write_back: bool,
}

/// Split `cache:<backing>[,size=N][,mode=wb|wt]`; `None` when the spec is not a cache.
fn parse_cache(spec: &str) -> Result<Option<CacheSpec>, AppError> {
    let Some(mut rest) = spec.strip_prefix(CACHE_PREFIX) else {
        return Ok(None);
    };
    let usage = |why: String| AppError::Usage(format!("bdev spec {spec:?}: {why} (cache:<backing>[,size=N][,mode=wb|wt])"));
    let (mut size, mut mode): (Option<u64>, Option<bool>) = (None, None);
    while let Some(comma) = rest.rfind(',') {
        let tail = &rest[comma + 1..];
        if let Some(v) = tail.strip_prefix("size=") {
            if size.is_some() {
                return Err(usage("size= given twice".into()));
            }
            size = Some(parse_size(v).map_err(usage)?);
        } else if let Some(v) = tail.strip_prefix("mode=") {
            if mode.is_some() {
                return Err(usage("mode= given twice".into()));
            }
            mode = Some(match v {
                "wb" => true,
                "wt" => false,
                other => return Err(usage(format!("mode={other}: expected wb or wt"))),
            });
        } else {
            break;
        }
        rest = &rest[..comma];
    }
    if rest.is_empty() {
        return Err(usage("missing the backing spec".into()));
    }
    let d = CacheConfig::default();
    Ok(Some(CacheSpec {
        backing: rest.to_owned(),
        cache_bytes: size.unwrap_or(d.cache_bytes),
        write_back: mode.unwrap_or(d.write_back),
    }))
}

/// Arena bytes a spec needs beyond I/O buffers: the cache's pages for `cache:`, 0 otherwise.
///
/// # Errors
/// [`AppError::Usage`] for a malformed `cache:` spec.
pub fn extra_arena_bytes(spec: &str) -> Result<u64, AppError> {
    Ok(parse_cache(spec)?.map_or(0, |c| c.cache_bytes))
}

/// Open any spec: the kinds of `open_bdev`, or a cache stacked over one.
///
/// # Errors
/// [`AppError::Usage`] for a malformed `cache:` spec, [`AppError::Bdev`] when the backing does not open,
/// [`AppError::Cache`] when the cache cannot be built over it.
#[allow(dead_code, reason = "the entry point for serve's specs; perf uses open_with_stats for the counters")]
pub fn open_any(spec: &str, arena: &Arc<Arena>) -> Result<Arc<dyn BlockDev>, AppError> {
    Ok(open_with_stats(spec, arena, None)?.0)
}

/// An open device and, when it is a cache, its counters.
pub type OpenedBdev = (Arc<dyn BlockDev>, Option<CacheCounters>);

/// [`open_any`], also giving the cache's counters when the spec is a cache. With `reactors` of more than one
/// reactor the cache is striped over all of them (one shard per reactor, built on it); otherwise it is the
/// single-reactor cache, whose one channel owns everything.
///
/// # Errors
/// As [`open_any`].
pub fn open_with_stats(spec: &str, arena: &Arc<Arena>, reactors: Option<&Reactors>) -> Result<OpenedBdev, AppError> {
    let Some(c) = parse_cache(spec)? else {
        return Ok((open_bdev(spec, arena)?, None));
    };
    let backing = open_bdev(&c.backing, arena)?;
    let cfg = CacheConfig { cache_bytes: c.cache_bytes, write_back: c.write_back, ..CacheConfig::default() };
    let cache = match reactors {
        Some(r) if r.count() > 1 => CacheBdev::new_striped(backing, Arc::clone(arena), cfg, r)?,
        _ => CacheBdev::new(backing, Arc::clone(arena), cfg)?,
    };
    let stats = cache.counters();
    Ok((cache, Some(stats)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_specs_nest_the_backing() {
        assert_eq!(parse_cache("malloc:1G").unwrap(), None);
        let c = parse_cache("cache:malloc:1G,bs=4096,size=256M,mode=wt").unwrap().unwrap();
        assert_eq!(c, CacheSpec { backing: "malloc:1G,bs=4096".into(), cache_bytes: 256 << 20, write_back: false });
        let c = parse_cache("cache:file:/tmp/a:1G,mode=wb").unwrap().unwrap();
        assert_eq!(c, CacheSpec { backing: "file:/tmp/a:1G".into(), cache_bytes: 64 << 20, write_back: true });
        assert!(parse_cache("cache:").is_err());
        assert!(parse_cache("cache:malloc:1G,mode=xx").is_err());
        assert!(parse_cache("cache:malloc:1G,size=1M,size=2M").is_err());
        assert!(parse_cache("cache:malloc:1G,size=zz").is_err());
        assert_eq!(extra_arena_bytes("cache:malloc:1G,size=8M").unwrap(), 8 << 20);
        assert_eq!(extra_arena_bytes("null:1G").unwrap(), 0);
    }
}
