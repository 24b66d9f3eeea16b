//! SPDK's `bdev_nvme_attach_controller`, `bdev_nvme_detach_controller` and `bdev_nvme_get_controllers`.
//!
//! Attach takes SPDK's parameters (`name`, `trtype`, `traddr`, and the optional keys SPDK's decoder lists), brings
//! the controller up and makes one bdev per usable active namespace, named `<name>n<nsid>` (`Nvme0n1`), and answers
//! with the array of bdev names, as SPDK does.
//!
//! Transports: `PCIe` (case-insensitive; `traddr` a PCI address bound to vfio-pci, see `nvstack setup`), and the
//! nvstack extension `sim`: the in-process simulated controller `nvme:sim` specs open (two namespaces, 16 MiB of
//! 4096-byte and 16 MiB of 512-byte blocks), for tests on hosts without NVMe. For `sim`, `traddr` is a label
//! (default: the controller name); every attach starts a new simulator.
//!
//! SPDK's optional keys are accepted only where ignoring them changes nothing for a PCIe controller: the fabrics
//! keys (`adrfam`, `trsvcid`, `subnqn`, `hostnqn`, `hostaddr`, `hostsvcid`, `priority`, `hdgst`, `ddgst`,
//! `fabrics_connect_timeout_us`, `psk`, `dhchap_key`, `dhchap_ctrlr_key`), `multipath` (one path), `prchk_reftag` /
//! `prchk_guard` (nvstack refuses namespaces with protection information, so there is nothing to check),
//! `allow_unrecognized_csi`, `num_io_queues` (caps the I/O queue pairs asked for) and `max_bdevs` (refuses a
//! controller with more usable namespaces). The reconnect timeouts (`ctrlr_loss_timeout_sec`,
//! `reconnect_delay_sec`, `fast_io_fail_timeout_sec`) are accepted only as 0 (SPDK's default: no reconnect policy;
//! nvstack's driver resets a stuck controller by its own rule). Any other key is refused.
//!
//! Detach refuses while a bdev of the controller is exported or claimed (by a cache); otherwise it removes the bdevs
//! and drops the controller, which sends the shutdown notification (CC.SHN) when the last reference goes. An NBD
//! reactor that once served one of its bdevs keeps its channel until `serve` stops, so then the shutdown happens
//! at exit (logged).
//!
//! `nvstack_nvme_sim_inject_error` (nvstack's test aid, `sim` controllers only) makes reads (or writes) of a block
//! range fail with a media error, so the media-error path (NBD → poison listener) can be tested without hardware.

use std::sync::Arc;

use nvstack_blockdev::nvme::{sim_config, NvmeBdev};
use nvstack_blockdev::BlockDev;
use nvstack_driver::nvme::sim::SimController;
use nvstack_driver::nvme::{Controller, CtrlrOpts, Transport};
use serde_json::{json, Map, Value};

use super::methods::{check_keys, get_bool, get_u64, need_str, reg_err, valid_name, Appliance};
use super::{code, RpcError};
use crate::serve::registry::NvmeCtrlrEntry;

/// Method name of attach (also the `method` of its bdevs' registry entries).
pub const ATTACH: &str = "bdev_nvme_attach_controller";

/// Transports `trtype` may name.
pub const SUPPORTED_TRTYPES: &[&str] = &["PCIe", "sim"];

const ATTACH_KEYS: &[&str] = &[
    "name",
    "trtype",
    "traddr",
    "adrfam",
    "trsvcid",
    "priority",
    "subnqn",
    "hostnqn",
    "hostaddr",
    "hostsvcid",
    "prchk_reftag",
    "prchk_guard",
    "hdgst",
    "ddgst",
    "fabrics_connect_timeout_us",
    "multipath",
    "num_io_queues",
    "ctrlr_loss_timeout_sec",
    "reconnect_delay_sec",
    "fast_io_fail_timeout_sec",
    "psk",
    "max_bdevs",
    "dhchap_key",
    "dhchap_ctrlr_key",
    "allow_unrecognized_csi",
];

/// Keys that only mean something on fabrics: SPDK ignores them for PCIe too.
const FABRICS_KEYS: &[&str] = &[
    "adrfam",
    "trsvcid",
    "priority",
    "subnqn",
    "hostnqn",
    "hostaddr",
    "hostsvcid",
    "hdgst",
    "ddgst",
    "fabrics_connect_timeout_us",
    "psk",
    "dhchap_key",
    "dhchap_ctrlr_key",
];

fn err_chain(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(&format!(": {s}"));
        src = s.source();
    }
    msg
}

/// Check the optional keys; returns the I/O queue pairs to ask for and the most bdevs allowed.
fn check_options(m: &Map<String, Value>, method: &str) -> Result<(Option<u16>, Option<u64>), RpcError> {
    for k in FABRICS_KEYS {
        if m.get(*k).is_some_and(|v| !v.is_null()) {
            tracing::info!(key = k, "{method}: fabrics parameter ignored for a PCIe controller");
        }
    }
    for k in ["prchk_reftag", "prchk_guard", "allow_unrecognized_csi"] {
        get_bool(m, k, method)?;
    }
    if let Some(v) = m.get("multipath").filter(|v| !v.is_null()) {
        match v.as_str() {
            Some("multipath" | "failover" | "disable") => {}
            _ => return Err(RpcError::params(format!("{method}: multipath must be \"multipath\", \"failover\" or \"disable\""))),
        }
    }
    for k in ["ctrlr_loss_timeout_sec", "reconnect_delay_sec", "fast_io_fail_timeout_sec"] {
        match m.get(k) {
            None | Some(Value::Null) => {}
            Some(v) if v.as_i64() == Some(0) => {}
            Some(_) => {
                return Err(RpcError::params(format!(
                    "{method}: {k} is supported only as 0: nvstack has no reconnect policy (its driver resets a stuck controller itself)"
                )))
            }
        }
    }
    let queues = match get_u64(m, "num_io_queues", method)? {
        None => None,
        Some(n) => Some(u16::try_from(n).ok().filter(|&q| q > 0).ok_or_else(|| {
            RpcError::params(format!("{method}: num_io_queues must be 1 to 65535"))
        })?),
    };
    Ok((queues, get_u64(m, "max_bdevs", method)?))
}

/// An opened transport.
struct Opened {
    /// The normalised transport address.
    traddr: String,
    transport: Arc<dyn Transport>,
    /// The simulator, for `sim`.
    sim: Option<Arc<SimController>>,
}

/// Open the transport `trtype` names: a new simulator, or the PCI function over VFIO. Returns the normalised
/// transport address with it.
fn open_transport(
    app: &Appliance,
    method: &str,
    name: &str,
    trtype: &str,
    m: &Map<String, Value>,
) -> Result<Opened, RpcError> {
    let fail = |e: &dyn std::error::Error| RpcError::new(code::NO_DEVICE, format!("{method}: {name}: {}", err_chain(e)));
    if trtype == "sim" {
        let traddr = super::methods::get_str(m, "traddr", method)?.unwrap_or(name).to_string();
        if let Some(c) = app.registry.controllers().iter().find(|c| c.trtype == "sim" && c.traddr == traddr) {
            return Err(RpcError::new(code::EXISTS, format!("{method}: sim {traddr:?} is already attached as {:?}", c.name)));
        }
        let cfg = nvstack_driver::nvme::sim::SimConfig { name: format!("sim:{traddr}"), ..sim_config() };
        let sim = SimController::start(Arc::clone(&app.arena), cfg).map_err(|e| fail(&e))?;
        Ok(Opened { traddr, transport: Arc::clone(&sim) as Arc<dyn Transport>, sim: Some(sim) })
    } else {
        let text = need_str(m, "traddr", method)?;
        let bdf: nvstack_driver::vfio::sysfs::PciAddress = text
            .parse()
            .map_err(|e: nvstack_driver::DriverError| RpcError::params(format!("{method}: traddr {text:?}: {e}")))?;
        let traddr = bdf.to_string();
        if let Some(c) = app.registry.controllers().iter().find(|c| c.trtype == "PCIe" && c.traddr == traddr) {
            return Err(RpcError::new(code::EXISTS, format!("{method}: {traddr} is already attached as {:?}", c.name)));
        }
        let sysfs = nvstack_driver::vfio::sysfs::Sysfs::from_env();
        let t = nvstack_driver::vfio::VfioTransport::open(&sysfs, bdf, &app.arena).map_err(|e| fail(&e))?;
        Ok(Opened { traddr, transport: Arc::new(t), sim: None })
    }
}

/// `bdev_nvme_attach_controller`.
pub fn attach(app: &Appliance, method: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    check_keys(&m, method, ATTACH_KEYS)?;
    let name = need_str(&m, "name", method)?.to_string();
    valid_name(&name, method)?;
    let trtype_in = need_str(&m, "trtype", method)?;
    let Some(trtype) = SUPPORTED_TRTYPES.iter().find(|t| t.eq_ignore_ascii_case(trtype_in)).copied() else {
        return Err(RpcError::params(format!(
            "{method}: trtype {trtype_in:?} is not supported (supported: {}; \"sim\" is nvstack's simulated controller)",
            SUPPORTED_TRTYPES.join(", ")
        )));
    };
    let (queues, max_bdevs) = check_options(&m, method)?;
    if app.registry.controller(&name).is_some() {
        return Err(RpcError::new(code::EXISTS, format!("{method}: a controller named {name:?} is already attached")));
    }
    let mut opts = CtrlrOpts::default();
    if let Some(q) = queues {
        opts.io_queues = q;
    }
    let fail = |e: &dyn std::error::Error| RpcError::new(code::NO_DEVICE, format!("{method}: {name}: {}", err_chain(e)));
    let Opened { traddr, transport, sim } = open_transport(app, method, &name, trtype, &m)?;
    let ctrl = Controller::attach(transport, opts).map_err(|e| fail(&e))?;
    let mut bdevs: Vec<(Arc<dyn BlockDev>, u32)> = Vec::new();
    for ns in ctrl.namespaces() {
        if let Some(why) = &ns.refused {
            tracing::warn!(ctrlr = %name, nsid = ns.nsid, reason = %why, "{method}: namespace skipped");
            continue;
        }
        let b = NvmeBdev::new(Arc::clone(&ctrl), ns.nsid, &format!("{name}n{}", ns.nsid)).map_err(|e| fail(&e))?;
        bdevs.push((b, ns.nsid));
    }
    if let Some(max) = max_bdevs {
        if bdevs.len() as u64 > max {
            return Err(RpcError::params(format!(
                "{method}: the controller has {} usable namespaces, more than max_bdevs {max}",
                bdevs.len()
            )));
        }
    }
    let mut params = json!({
        "name": name, "trtype": trtype, "traddr": traddr,
        "prchk_reftag": false, "prchk_guard": false,
        "ctrlr_loss_timeout_sec": 0, "reconnect_delay_sec": 0, "fast_io_fail_timeout_sec": 0,
    });
    if let Some(q) = queues {
        params["num_io_queues"] = json!(q);
    }
    let entry = NvmeCtrlrEntry { name: name.clone(), trtype: trtype.to_string(), traddr, params, ctrlr: Arc::clone(&ctrl), sim, bdevs: Vec::new() };
    drop(ctrl);
    let entry = app.registry.add_controller(entry, ATTACH, bdevs).map_err(reg_err)?;
    tracing::info!(ctrlr = %name, bdevs = ?entry.bdevs, "NVMe controller attached");
    Ok(json!(entry.bdevs))
}

/// `bdev_nvme_detach_controller`.
pub fn detach(app: &Appliance, method: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    // SPDK's optional path selectors; with one path per controller only values naming that path make sense.
    check_keys(&m, method, &["name", "trtype", "traddr", "adrfam", "trsvcid", "subnqn", "hostaddr", "hostsvcid"])?;
    let name = need_str(&m, "name", method)?;
    let Some(c) = app.registry.controller(name) else {
        return Err(RpcError::new(code::NO_DEVICE, format!("{method}: no NVMe controller named {name:?}")));
    };
    if let Some(t) = super::methods::get_str(&m, "traddr", method)? {
        if t != c.traddr {
            return Err(RpcError::new(code::NO_DEVICE, format!("{method}: controller {name:?} has no path {t:?} (it is at {})", c.traddr)));
        }
    }
    drop(c);
    let entry = app.registry.remove_controller(name).map_err(reg_err)?;
    // The registry's bdev entries are gone; what still holds the controller are channels opened on its bdevs.
    let ctrl = Arc::clone(&entry.ctrlr);
    drop(entry);
    match Arc::try_unwrap(ctrl) {
        Ok(ctrl) => {
            if let Err(e) = ctrl.shutdown() {
                tracing::warn!(ctrlr = %name, error = %e, "shutdown notification failed");
            }
            drop(ctrl);
            tracing::info!(ctrlr = %name, "NVMe controller detached and shut down");
        }
        Err(still) => {
            tracing::warn!(
                ctrlr = %name,
                holders = Arc::strong_count(&still) - 1,
                "NVMe controller detached; an NBD reactor still holds a channel, so the shutdown happens when serve stops"
            );
        }
    }
    Ok(Value::Bool(true))
}

/// `nvstack_nvme_sim_inject_error {name, nsid, slba, nlb, ops, count}`: a test aid for `sim` controllers only.
/// Commands touching blocks `slba..slba+nlb` (default 1) of namespace `nsid` (default 1) complete with Unrecovered
/// Read Error (media errors, SCT 2h SC 81h); `ops` is `read` (default), `write` or `any`; `count` limits how many
/// commands fail (default: until the controller is detached).
pub fn sim_inject_error(app: &Appliance, method: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    use nvstack_driver::nvme::sim::{Fault, SimOpFilter};
    use nvstack_driver::nvme::status::{media, sct};
    check_keys(&m, method, &["name", "nsid", "slba", "nlb", "ops", "count"])?;
    let name = need_str(&m, "name", method)?;
    let Some(c) = app.registry.controller(name) else {
        return Err(RpcError::new(code::NO_DEVICE, format!("{method}: no NVMe controller named {name:?}")));
    };
    let Some(sim) = &c.sim else {
        return Err(RpcError::params(format!("{method}: {name:?} is a {} controller; faults can be injected only into trtype \"sim\"", c.trtype)));
    };
    let nsid = u32::try_from(get_u64(&m, "nsid", method)?.unwrap_or(1)).map_err(|_| RpcError::params(format!("{method}: nsid too large")))?;
    let Some(ns) = c.ctrlr.namespace(nsid) else {
        return Err(RpcError::new(code::NO_DEVICE, format!("{method}: {name:?} has no namespace {nsid}")));
    };
    let slba = super::methods::need_u64(&m, "slba", method)?;
    let nlb = get_u64(&m, "nlb", method)?.unwrap_or(1);
    if nlb == 0 || slba.checked_add(nlb).is_none_or(|e| e > ns.block_count) {
        return Err(RpcError::params(format!("{method}: blocks {slba}+{nlb} are not inside namespace {nsid} ({} blocks)", ns.block_count)));
    }
    let ops = match super::methods::get_str(&m, "ops", method)?.unwrap_or("read") {
        "read" => SimOpFilter::Read,
        "write" => SimOpFilter::Write,
        "any" => SimOpFilter::Any,
        other => return Err(RpcError::params(format!("{method}: ops {other:?} must be \"read\", \"write\" or \"any\""))),
    };
    let count = match get_u64(&m, "count", method)? {
        None => None,
        Some(n) => Some(u32::try_from(n).map_err(|_| RpcError::params(format!("{method}: count too large")))?),
    };
    let status = nvstack_driver::nvme::NvmeStatus::new(sct::MEDIA, media::UNRECOVERED_READ_ERROR);
    if !sim.inject(Fault::LbaError { nsid, slba, nlb, ops, status, count }) {
        return Err(RpcError::new(code::BUSY, format!("{method}: the simulator's fault queue is full")));
    }
    Ok(Value::Bool(true))
}

/// `driver_specific.nvme` of an NVMe bdev (SPDK's shape, the fields nvstack has).
pub fn bdev_driver_specific(app: &Appliance, ctrlr: &str, nsid: u32) -> Option<Value> {
    let c = app.registry.controller(ctrlr)?;
    let i = c.ctrlr.info();
    let mut v = json!({
        "trid": {"trtype": c.trtype, "traddr": c.traddr},
        "ctrlr_data": {
            "cntlid": i.cntlid,
            "vendor_id": format!("{:#06x}", i.vendor_id),
            "model_number": i.model,
            "serial_number": i.serial,
            "firmware_revision": i.firmware,
            "subnqn": i.subnqn,
        },
        "vs": {"nvme_version": i.version},
        "ns_data": {"id": nsid},
    });
    if c.trtype == "PCIe" {
        v["pci_address"] = json!(c.traddr);
    }
    Some(json!([v]))
}

/// `bdev_nvme_get_controllers` (optional `name`).
pub fn get_controllers(app: &Appliance, method: &str, m: Map<String, Value>) -> Result<Value, RpcError> {
    check_keys(&m, method, &["name"])?;
    let list = match super::methods::get_str(&m, "name", method)? {
        Some(n) => vec![app
            .registry
            .controller(n)
            .ok_or_else(|| RpcError::new(code::NO_DEVICE, format!("{method}: no NVMe controller named {n:?}")))?],
        None => app.registry.controllers(),
    };
    Ok(Value::Array(
        list.iter()
            .map(|c| {
                let i = c.ctrlr.info();
                json!({
                    "name": c.name,
                    "ctrlrs": [{
                        "state": if c.ctrlr.is_gone() { "failed" } else { "enabled" },
                        "trid": {"trtype": c.trtype, "traddr": c.traddr},
                        "cntlid": i.cntlid,
                        "host": {},
                    }],
                    "bdevs": c.bdevs,
                })
            })
            .collect(),
    ))
}
