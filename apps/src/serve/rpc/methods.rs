//! The RPC methods. The same table serves live requests and the SPDK JSON config loaded at start.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use nvstack_blockdev::pmem::PmemBdev;
use nvstack_blockdev::reactor::Reactors;
use nvstack_blockdev::BlockDev;
use nvstack_driver::dma::Arena;
use serde_json::{json, Map, Value};

use super::{code, RpcError};
use super::nvme;
use crate::serve::registry::{BdevEntry, BdevExtra, Registry, RegistryError};

/// What the methods act on.
pub struct Appliance {
    /// Bdevs and exports.
    pub registry: Arc<Registry>,
    /// The arena bdevs take buffers from.
    pub arena: Arc<Arena>,
    /// The reactors (for `framework_get_reactors`).
    pub reactors: Arc<Reactors>,
    /// NBD listen addresses, for `nvstack_get_stats`.
    pub listen: Vec<String>,
    /// The poison listener (None: `serve --no-poison`, or while the config loads at start).
    pub poison: Option<Arc<crate::serve::poison::ServePoison>>,
}

impl std::fmt::Debug for Appliance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Appliance").field("listen", &self.listen).finish()
    }
}

/// Every method, for `rpc_get_methods` and error messages.
pub const METHODS: &[&str] = &[
    "bdev_get_bdevs",
    "bdev_get_iostat",
    "bdev_malloc_create",
    "bdev_malloc_delete",
    "bdev_null_create",
    "bdev_null_delete",
    "bdev_aio_create",
    "bdev_aio_delete",
    "bdev_uring_create",
    "bdev_uring_delete",
    "nvstack_bdev_create",
    "nvstack_bdev_delete",
    "nvstack_cache_create",
    "nvstack_cache_delete",
    "framework_get_reactors",
    "save_config",
    "spdk_get_version",
    "rpc_get_methods",
    "nvstack_export_create",
    "nvstack_export_delete",
    "nvstack_export_list",
    "nvstack_get_stats",
    "bdev_nvme_attach_controller",
    "bdev_nvme_detach_controller",
    "bdev_nvme_get_controllers",
    "nvstack_nvme_sim_inject_error",
    "nvstack_get_poison_events",
    "nvstack_poison_explain",
    "nvstack_poison_inject",
];

/// Methods that change the set of bdevs or exports: the poison path's reverse maps are brought up to date after
/// each one succeeds.
const MUTATING: &[&str] = &[
    "bdev_malloc_create",
    "bdev_malloc_delete",
    "bdev_null_create",
    "bdev_null_delete",
    "bdev_aio_create",
    "bdev_aio_delete",
    "bdev_uring_create",
    "bdev_uring_delete",
    "nvstack_bdev_create",
    "nvstack_bdev_delete",
    "nvstack_cache_create",
    "nvstack_cache_delete",
    "nvstack_export_create",
    "nvstack_export_delete",
    "bdev_nvme_attach_controller",
    "bdev_nvme_detach_controller",
];

/// Methods allowed in a config file (those that build state).
pub const CONFIG_METHODS: &[&str] =
    &[
    "bdev_malloc_create",
    "bdev_null_create",
    "bdev_aio_create",
    "bdev_uring_create",
    "nvstack_bdev_create",
    "nvstack_cache_create",
    "nvstack_export_create",
    "bdev_nvme_attach_controller",
];

pub(crate) fn obj(params: Option<Value>, method: &str) -> Result<Map<String, Value>, RpcError> {
    match params {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(RpcError::params(format!("{method}: params must be a JSON object"))),
    }
}

pub(crate) fn check_keys(m: &Map<String, Value>, method: &str, known: &[&str]) -> Result<(), RpcError> {
    for k in m.keys() {
        if !known.contains(&k.as_str()) {
            return Err(RpcError::params(format!("{method}: unknown parameter {k:?} (known: {})", known.join(", "))));
        }
    }
    Ok(())
}

pub(crate) fn get_str<'a>(m: &'a Map<String, Value>, key: &str, method: &str) -> Result<Option<&'a str>, RpcError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(RpcError::params(format!("{method}: {key} must be a string"))),
    }
}

pub(crate) fn need_str<'a>(m: &'a Map<String, Value>, key: &str, method: &str) -> Result<&'a str, RpcError> {
    get_str(m, key, method)?.ok_or_else(|| RpcError::params(format!("{method}: missing required parameter {key:?}")))
}

pub(crate) fn get_u64(m: &Map<String, Value>, key: &str, method: &str) -> Result<Option<u64>, RpcError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| RpcError::params(format!("{method}: {key} must be a non-negative integer"))),
    }
}

pub(crate) fn need_u64(m: &Map<String, Value>, key: &str, method: &str) -> Result<u64, RpcError> {
    get_u64(m, key, method)?.ok_or_else(|| RpcError::params(format!("{method}: missing required parameter {key:?}")))
}

pub(crate) fn get_bool(m: &Map<String, Value>, key: &str, method: &str) -> Result<bool, RpcError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(RpcError::params(format!("{method}: {key} must be true or false"))),
    }
}

pub(crate) fn reg_err(e: RegistryError) -> RpcError {
    match e {
        RegistryError::Exists(m) => RpcError::new(code::EXISTS, m),
        RegistryError::NotFound(m) => RpcError::new(code::NO_DEVICE, m),
        RegistryError::InUse(m) => RpcError::new(code::BUSY, m),
        RegistryError::Invalid(m) => RpcError::params(m),
    }
}

pub(crate) fn valid_name(name: &str, method: &str) -> Result<(), RpcError> {
    if name.is_empty() || name.len() > 128 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)) {
        return Err(RpcError::params(format!("{method}: name {name:?} must be 1-128 characters of A-Z a-z 0-9 _ - .")));
    }
    Ok(())
}

fn open(app: &Appliance, spec: &str, method: &str, params: Value) -> Result<Value, RpcError> {
    let fail = |e: nvstack_blockdev::BdevError| {
        let mut msg = format!("{method}: {e}");
        let mut src = std::error::Error::source(&e);
        while let Some(s) = src {
            msg.push_str(&format!(": {s}"));
            src = s.source();
        }
        RpcError::params(msg)
    };
    let mut extra = BdevExtra::default();
    let bdev: Arc<dyn BlockDev> = match open_pmem(spec).map_err(fail)? {
        Some(p) => {
            extra.pmem = Some(Arc::clone(p.device()));
            p
        }
        None => nvstack_blockdev::spec::open_bdev(spec, &app.arena).map_err(fail)?,
    };
    let name = bdev.name().to_string();
    app.registry.add_bdev_with(bdev, method, params, extra).map_err(reg_err)?;
    Ok(Value::String(name))
}

/// A `pmem:` spec opened as the concrete [`PmemBdev`], so the poison path learns where it is mapped (the
/// [`BlockDev`] trait does not say). Same syntax as `spec::open_bdev`'s pmem kind: `pmem:PATH[:SIZE][,bs=N][,name=X]`.
fn open_pmem(spec: &str) -> Result<Option<Arc<PmemBdev>>, nvstack_blockdev::BdevError> {
    let s = nvstack_blockdev::spec::parse_spec(spec)?;
    if s.kind != "pmem" {
        return Ok(None);
    }
    let (path, size_bytes) = match s.args.rsplit_once(':') {
        Some((path, tail)) if !path.is_empty() => match nvstack_blockdev::spec::parse_size(tail) {
            Ok(size) => (path, Some(size)),
            Err(_) => (s.args.as_str(), None),
        },
        _ => (s.args.as_str(), None),
    };
    if path.is_empty() {
        // Let open_bdev word the error.
        return Ok(None);
    }
    let p = std::path::Path::new(path);
    let name = s.name.clone().unwrap_or_else(|| {
        p.file_name().and_then(|n| n.to_str()).map(str::to_owned).unwrap_or_else(|| "pmem0".to_owned())
    });
    let bs = s.block_size.unwrap_or(nvstack_blockdev::spec::DEFAULT_BLOCK_SIZE);
    Ok(Some(PmemBdev::open(&name, p, size_bytes, bs)?))
}

fn bdev_size_create(app: &Appliance, method: &str, kind: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    check_keys(&m, method, &["name", "num_blocks", "block_size", "uuid"])?;
    let block_size = get_u64(&m, "block_size", method)?.unwrap_or(512);
    let num_blocks = need_u64(&m, "num_blocks", method)?;
    let size = num_blocks
        .checked_mul(block_size)
        .filter(|&s| s > 0)
        .ok_or_else(|| RpcError::params(format!("{method}: num_blocks × block_size must be non-zero and fit 64 bits")))?;
    let name = match get_str(&m, "name", method)? {
        Some(n) => n.to_string(),
        None => {
            let prefix = if kind == "malloc" { "Malloc" } else { "Null" };
            (0..).map(|i| format!("{prefix}{i}")).find(|n| app.registry.bdev(n).is_none()).unwrap_or_default()
        }
    };
    valid_name(&name, method)?;
    if app.registry.bdev(&name).is_some() {
        return Err(RpcError::new(code::EXISTS, format!("{method}: a bdev named {name:?} already exists")));
    }
    let spec = format!("{kind}:{size},bs={block_size},name={name}");
    let params = json!({"name": name, "num_blocks": num_blocks, "block_size": block_size});
    open(app, &spec, method, params)
}

fn file_create(app: &Appliance, method: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    check_keys(&m, method, &["name", "filename", "block_size", "readonly", "fallocate", "size_bytes"])?;
    let name = need_str(&m, "name", method)?.to_string();
    valid_name(&name, method)?;
    let filename = need_str(&m, "filename", method)?.to_string();
    if filename.contains(',') {
        return Err(RpcError::params(format!("{method}: filename must not contain ','")));
    }
    let mut spec = format!("file:{filename}");
    if let Some(sz) = get_u64(&m, "size_bytes", method)? {
        spec.push_str(&format!(":{sz}"));
    }
    let mut params = json!({"name": name, "filename": filename});
    if let Some(bs) = get_u64(&m, "block_size", method)? {
        spec.push_str(&format!(",bs={bs}"));
        params["block_size"] = json!(bs);
    }
    if let Some(sz) = get_u64(&m, "size_bytes", method)? {
        params["size_bytes"] = json!(sz);
    }
    spec.push_str(&format!(",name={name}"));
    open(app, &spec, method, params)
}

/// Longest periodic writeback interval `nvstack_cache_create` takes (one hour).
const MAX_WRITEBACK_INTERVAL_MS: u64 = 3_600_000;

fn cache_create(app: &Appliance, method: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    check_keys(&m, method, &["base_bdev_name", "cache_mb", "write_through", "writeback_interval_ms"])?;
    let base_name = need_str(&m, "base_bdev_name", method)?;
    let base = app.registry.bdev(base_name).ok_or_else(|| RpcError::new(code::NO_DEVICE, format!("{method}: no bdev named {base_name:?}")))?;
    if let Some(by) = base.claimed_by.read().map(|c| c.clone()).unwrap_or(None) {
        return Err(RpcError::new(code::BUSY, format!("{method}: bdev {base_name:?} is already claimed by {by:?}")));
    }
    if app.registry.exports().iter().any(|x| x.bdev.bdev.name() == base_name) {
        return Err(RpcError::new(code::BUSY, format!("{method}: bdev {base_name:?} is exported: delete the export first")));
    }
    let cache_mb = get_u64(&m, "cache_mb", method)?.unwrap_or(64);
    let write_through = get_bool(&m, "write_through", method)?;
    let defaults = nvstack_cache::CacheConfig::default();
    let interval_ms = match get_u64(&m, "writeback_interval_ms", method)? {
        None => u64::try_from(defaults.writeback_interval.as_millis()).unwrap_or(u64::MAX),
        Some(ms @ 1..=MAX_WRITEBACK_INTERVAL_MS) => ms,
        Some(ms) => {
            return Err(RpcError::params(format!(
                "{method}: writeback_interval_ms {ms} is out of range: give 1..={MAX_WRITEBACK_INTERVAL_MS} (dirty data is also written back on flush and under pressure)"
            )))
        }
    };
    let cfg = nvstack_cache::CacheConfig {
        cache_bytes: cache_mb.checked_mul(1 << 20).ok_or_else(|| RpcError::params(format!("{method}: cache_mb too large")))?,
        write_back: !write_through,
        writeback_interval: std::time::Duration::from_millis(interval_ms),
        ..defaults
    };
    let cache = nvstack_cache::CacheBdev::new_striped(Arc::clone(&base.bdev), Arc::clone(&app.arena), cfg, &app.reactors)
        .map_err(|e| RpcError::params(format!("{method}: {e}")))?;
    let name = cache.name().to_string();
    let params = json!({"base_bdev_name": base_name, "cache_mb": cache_mb, "write_through": write_through, "writeback_interval_ms": interval_ms});
    let extra = BdevExtra { cache: Some(Arc::clone(&cache)), ..BdevExtra::default() };
    app.registry.add_bdev_with(cache, method, params, extra).map_err(reg_err)?;
    if let Ok(mut c) = base.claimed_by.write() {
        *c = Some(name.clone());
    }
    Ok(Value::String(name))
}

/// The method that deletes what `create` made.
fn delete_method(create: &str) -> &'static str {
    match create {
        "bdev_malloc_create" => "bdev_malloc_delete",
        "bdev_null_create" => "bdev_null_delete",
        "bdev_aio_create" => "bdev_aio_delete",
        "bdev_uring_create" => "bdev_uring_delete",
        "nvstack_cache_create" => "nvstack_cache_delete",
        "bdev_nvme_attach_controller" => "bdev_nvme_detach_controller (for its controller)",
        _ => "nvstack_bdev_delete",
    }
}

fn bdev_delete(app: &Appliance, method: &str, m: Map<String, Value>, want: &[&str]) -> Result<Value, RpcError> {
    check_keys(&m, method, &["name"])?;
    let name = need_str(&m, "name", method)?;
    match app.registry.bdev(name) {
        Some(b) if !want.contains(&b.method.as_str()) => {
            return Err(RpcError::params(format!(
                "{method}: bdev {name:?} was made by {}, not by this kind: delete it with {}",
                b.method,
                delete_method(&b.method)
            )))
        }
        None => return Err(RpcError::new(code::NO_DEVICE, format!("{method}: no bdev named {name:?}"))),
        _ => {}
    }
    app.registry.remove_bdev(name).map_err(reg_err)?;
    Ok(Value::Bool(true))
}

/// How long `nvstack_cache_delete`'s write-back (a FLUSH through the cache) may take.
const CACHE_DELETE_FLUSH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
/// How long `nvstack_cache_delete` waits for the cache's shards to leave their reactors.
const CACHE_DELETE_CLOSE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// `nvstack_cache_delete {name}`: write the cache back, stop it and free its base bdev. Refused, with nothing
/// changed, while the cache is exported or still serves connections, or when the write-back fails.
fn cache_delete(app: &Appliance, method: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    check_keys(&m, method, &["name"])?;
    let name = need_str(&m, "name", method)?;
    let entry = app.registry.bdev(name).ok_or_else(|| RpcError::new(code::NO_DEVICE, format!("{method}: no bdev named {name:?}")))?;
    let Some(cache) = entry.extra.cache.clone() else {
        return Err(RpcError::params(format!(
            "{method}: bdev {name:?} is not a cache (made by {}): delete it with {}",
            entry.method,
            delete_method(&entry.method)
        )));
    };
    let base_name = entry.params.get("base_bdev_name").and_then(Value::as_str).unwrap_or_default().to_string();
    app.registry.check_removable(name).map_err(reg_err)?;
    let conns = entry.connections.load(Ordering::Acquire);
    if conns > 0 {
        return Err(RpcError::new(
            code::BUSY,
            format!("{method}: cache {name:?} still serves {conns} NBD connection(s) (their export is deleted, they are not): disconnect those clients first"),
        ));
    }
    // 1. Write everything back while the cache still runs: on failure it stays as it was, data and all.
    crate::serve::flush_bdev(entry.bdev.as_ref(), CACHE_DELETE_FLUSH_TIMEOUT).map_err(|why| {
        RpcError::new(
            code::IO_ERROR,
            format!("{method}: writing cache {name:?} back to {base_name:?} failed ({why}): nothing was deleted; check the base device, then retry"),
        )
    })?;
    // 2. Out of the registry (no export or connection can reach it any more: the reactors close their idle channels
    // to it), then stop its shards.
    let entry = app.registry.remove_bdev(name).map_err(reg_err)?;
    cache.close(CACHE_DELETE_CLOSE_TIMEOUT).map_err(|e| {
        tracing::error!(cache = name, error = %e, "cache delete: the cache did not stop cleanly");
        RpcError::new(
            code::IO_ERROR,
            format!("{method}: cache {name:?} is deleted from the registry but did not stop cleanly: {e}; its base {base_name:?} stays claimed (restart the appliance to release it)"),
        )
    })?;
    drop(entry);
    // 3. The base bdev is free again: it can be exported, deleted or cached anew.
    if let Some(base) = app.registry.bdev(&base_name) {
        if let Ok(mut c) = base.claimed_by.write() {
            *c = None;
        }
    }
    tracing::info!(cache = name, base = base_name, "cache deleted");
    Ok(Value::Bool(true))
}

fn bdev_json(app: &Appliance, b: &BdevEntry) -> Value {
    let g = b.bdev.geometry();
    let f = b.bdev.features();
    let claimed = b.claimed_by.read().map(|c| c.is_some()).unwrap_or(false);
    let mut v = json!({
        "name": b.bdev.name(),
        "aliases": [],
        "product_name": b.bdev.product_name(),
        "block_size": g.block_size,
        "num_blocks": g.block_count,
        "claimed": claimed,
        "zoned": false,
        "supported_io_types": {
            "read": true, "write": true, "unmap": f.deallocate, "write_zeroes": f.write_zeroes, "flush": f.flush,
            "reset": false, "nvme_admin": false, "nvme_io": false,
        },
        "driver_specific": { "nvstack": { "max_transfer_bytes": g.max_transfer_bytes, "created_by": b.method } },
    });
    if let Some((ctrlr, nsid)) = &b.extra.nvme {
        if let Some(n) = nvme::bdev_driver_specific(app, ctrlr, *nsid) {
            v["driver_specific"]["nvme"] = n;
        }
    }
    v
}

fn select_bdevs(app: &Appliance, m: &Map<String, Value>, method: &str) -> Result<Vec<Arc<BdevEntry>>, RpcError> {
    match get_str(m, "name", method)? {
        Some(n) => app
            .registry
            .bdev(n)
            .map(|b| vec![b])
            .ok_or_else(|| RpcError::new(code::NO_DEVICE, format!("{method}: no bdev named {n:?}"))),
        None => Ok(app.registry.bdevs()),
    }
}

fn save_config(app: &Appliance) -> Value {
    // An NVMe controller's entry goes where its first bdev was made (a cache over Nvme0n1 comes after it).
    let mut saved_ctrlrs: Vec<String> = Vec::new();
    let mut bdevs: Vec<Value> = Vec::new();
    for b in app.registry.bdevs() {
        match &b.extra.nvme {
            Some((c, _)) => {
                if saved_ctrlrs.contains(c) {
                    continue;
                }
                if let Some(e) = app.registry.controller(c) {
                    bdevs.push(json!({"method": nvme::ATTACH, "params": e.params}));
                }
                saved_ctrlrs.push(c.clone());
            }
            None => bdevs.push(json!({"method": b.method, "params": b.params})),
        }
    }
    let exports: Vec<Value> = app
        .registry
        .exports()
        .iter()
        .map(|x| {
            json!({"method": "nvstack_export_create", "params": {
                "name": x.info.name, "bdev_name": x.bdev.bdev.name(), "description": x.info.description,
                "read_only": x.read_only,
            }})
        })
        .collect();
    json!({"subsystems": [
        {"subsystem": "bdev", "config": bdevs},
        {"subsystem": "nvstack_nbd", "config": exports},
    ]})
}

/// Run one method.
///
/// # Errors
/// A JSON-RPC error object: -32601 for an unknown method, -32602 for bad params, SPDK's negative errno codes for
/// missing (-19), existing (-17) or busy (-16) objects.
pub fn call(app: &Appliance, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let res = dispatch(app, method, params);
    if res.is_ok() && MUTATING.contains(&method) {
        if let Some(p) = &app.poison {
            p.sync(&app.registry);
        }
    }
    res
}

fn dispatch(app: &Appliance, method: &str, params: Option<Value>) -> Result<Value, RpcError> {
    let m = obj(params, method)?;
    match method {
        "spdk_get_version" => {
            check_keys(&m, method, &[])?;
            let v = env!("CARGO_PKG_VERSION");
            let mut it = v.split('.').map(|x| x.parse::<u64>().unwrap_or(0));
            Ok(json!({
                "version": format!("nvstack v{v}"),
                "fields": {"major": it.next(), "minor": it.next(), "patch": it.next(), "suffix": ""},
            }))
        }
        "rpc_get_methods" => Ok(json!(METHODS)),
        "bdev_malloc_create" => bdev_size_create(app, method, "malloc", m),
        "bdev_null_create" => bdev_size_create(app, method, "null", m),
        "bdev_aio_create" | "bdev_uring_create" => file_create(app, method, m),
        "bdev_malloc_delete" => bdev_delete(app, method, m, &["bdev_malloc_create"]),
        "bdev_null_delete" => bdev_delete(app, method, m, &["bdev_null_create"]),
        "bdev_aio_delete" | "bdev_uring_delete" => bdev_delete(app, method, m, &["bdev_aio_create", "bdev_uring_create"]),
        "nvstack_bdev_create" => {
            check_keys(&m, method, &["spec"])?;
            let spec = need_str(&m, "spec", method)?.to_string();
            open(app, &spec, method, json!({"spec": spec}))
        }
        "nvstack_bdev_delete" => bdev_delete(app, method, m, &["nvstack_bdev_create"]),
        "nvstack_cache_create" => cache_create(app, method, m),
        "nvstack_cache_delete" => cache_delete(app, method, m),
        "bdev_nvme_attach_controller" => nvme::attach(app, method, m),
        "bdev_nvme_detach_controller" => nvme::detach(app, method, m),
        "bdev_nvme_get_controllers" => nvme::get_controllers(app, method, m),
        "nvstack_nvme_sim_inject_error" => nvme::sim_inject_error(app, method, m),
        "nvstack_get_poison_events" | "nvstack_poison_explain" | "nvstack_poison_inject" => {
            crate::serve::poison::rpc(app.poison.as_deref(), &app.registry, method, m)
        }
        "bdev_get_bdevs" => {
            check_keys(&m, method, &["name", "timeout"])?;
            Ok(Value::Array(select_bdevs(app, &m, method)?.iter().map(|b| bdev_json(app, b)).collect()))
        }
        "bdev_get_iostat" => {
            check_keys(&m, method, &["name", "per_channel"])?;
            let bdevs = select_bdevs(app, &m, method)?;
            let list: Vec<Value> = bdevs
                .iter()
                .map(|b| {
                    let mut v = b.stats.to_json();
                    v["name"] = json!(b.bdev.name());
                    v
                })
                .collect();
            Ok(json!({"tick_rate": 1_000_000_000u64, "ticks": 0, "bdevs": list}))
        }
        "framework_get_reactors" => {
            check_keys(&m, method, &[])?;
            let r = &app.reactors;
            let list: Vec<Value> = (0..r.count())
                .map(|i| {
                    let s = r.stats(i);
                    let g = |f: fn(&nvstack_blockdev::reactor::ReactorStats) -> u64| s.map(f).unwrap_or(0);
                    json!({
                        "lcore": r.cores()[i],
                        "busy": g(|s| s.busy_rounds.load(Ordering::Relaxed)),
                        "idle": g(|s| s.idle_rounds.load(Ordering::Relaxed)),
                        "in_interrupt": false,
                        "lw_threads": [{"name": format!("reactor_{i}"), "id": i,
                            "pollers": s.map(|s| s.pollers.load(Ordering::Relaxed)).unwrap_or(0)}],
                    })
                })
                .collect();
            Ok(json!({"tick_rate": 1u64, "reactors": list}))
        }
        "save_config" => {
            check_keys(&m, method, &[])?;
            Ok(save_config(app))
        }
        "nvstack_export_create" => {
            check_keys(&m, method, &["name", "bdev_name", "description", "read_only"])?;
            let name = need_str(&m, "name", method)?;
            let bdev = need_str(&m, "bdev_name", method)?;
            let desc = get_str(&m, "description", method)?.unwrap_or("");
            let ro = get_bool(&m, "read_only", method)?;
            app.registry.add_export(name, bdev, desc, ro).map_err(reg_err)?;
            Ok(Value::Bool(true))
        }
        "nvstack_export_delete" => {
            check_keys(&m, method, &["name"])?;
            app.registry.remove_export(need_str(&m, "name", method)?).map_err(reg_err)?;
            Ok(Value::Bool(true))
        }
        "nvstack_export_list" | "nvstack_get_stats" => {
            check_keys(&m, method, &[])?;
            let list: Vec<Value> = app
                .registry
                .exports()
                .iter()
                .map(|x| {
                    let l = x.info.limits;
                    let mut v = json!({
                        "name": x.info.name, "bdev_name": x.bdev.bdev.name(), "description": x.info.description,
                        "read_only": x.read_only, "size_bytes": l.size_bytes,
                        "block_size": {"minimum": l.block.min, "preferred": l.block.preferred, "maximum": l.block.max},
                    });
                    if method == "nvstack_get_stats" {
                        v["iostat"] = x.stats.to_json();
                    }
                    v
                })
                .collect();
            if method == "nvstack_get_stats" {
                Ok(json!({"listen": app.listen, "exports": list}))
            } else {
                Ok(Value::Array(list))
            }
        }
        _ => Err(RpcError::new(
            code::METHOD_NOT_FOUND,
            format!("method {method:?} not found (nvstack rpc rpc_get_methods lists them)"),
        )),
    }
}
