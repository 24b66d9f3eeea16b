//! `nvstack serve`: the appliance. Starts the arena and the reactors, builds bdevs from an SPDK JSON config (or
//! the embedded default: one sparse file-backed volume), exports them over NBD (TCP and a Unix socket) and serves
//! JSON-RPC on a Unix socket. SIGINT/SIGTERM: stop accepting, drain, flush, exit 0.

pub mod config;
pub mod nbd;
pub mod poison;
pub mod registry;
pub mod rpc;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nvstack_blockdev::bdev::{run_sync, ChannelOpts};
use nvstack_blockdev::reactor::{ReactorConfig, Reactors};
use nvstack_blockdev::{IoDesc, IoOp, IoStatus};
use nvstack_driver::dma::{Arena, ArenaConfig};
use serde_json::json;

use crate::cli::GlobalOpts;
use crate::error::AppError;
use registry::Registry;
use rpc::{Appliance, RpcServer};

/// Arguments of `nvstack serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Data directory: the default volume, the NBD Unix socket and the RPC socket live here.
    #[arg(long = "data-dir", default_value = "./nvstack-data")]
    pub data_dir: PathBuf,
    /// SPDK JSON config to load at start (subsystems -> bdev -> [{method, params}]). Without it, the embedded
    /// default: a sparse file-backed volume exported as `disk0`.
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Core mask or list for the reactors (0x3, 0-1, 0,1). Default: the first core this process may use.
    #[arg(short = 'm', long = "cpumask")]
    pub cpumask: Option<String>,
    /// TCP address to listen on for NBD.
    #[arg(long = "listen", default_value = "127.0.0.1")]
    pub listen: String,
    /// TCP port for NBD (0 picks a free one and prints it).
    #[arg(short = 'p', long = "port", default_value_t = 10809)]
    pub port: u16,
    /// Do not listen on TCP.
    #[arg(long = "no-tcp")]
    pub no_tcp: bool,
    /// NBD Unix socket path (default: DATA_DIR/nbd.sock).
    #[arg(long = "nbd-socket")]
    pub nbd_socket: Option<PathBuf>,
    /// JSON-RPC Unix socket path (default: DATA_DIR/nvstack.sock).
    #[arg(short = 'r', long = "rpc-socket")]
    pub rpc_socket: Option<PathBuf>,
    /// The default volume's backing, as a bdev spec (file:PATH:SIZE, malloc:SIZE...). Default:
    /// file:DATA_DIR/disk0.img:SIZE.
    #[arg(long = "volume")]
    pub volume: Option<String>,
    /// Size of the default volume.
    #[arg(long = "volume-size", default_value = "1G")]
    pub volume_size: String,
    /// Serve the default volume without the cache bdev in front of it (the cache is on by default).
    #[arg(long = "no-cache")]
    pub no_cache: bool,
    /// Accepted for compatibility: the cache is on by default.
    #[arg(long = "cache", hide = true)]
    pub cache: bool,
    /// Cache size in MiB for the default volume's cache bdev.
    #[arg(long = "cache-mb", default_value_t = 64)]
    pub cache_mb: u64,
    /// Most NBD connections at once (each takes 4 MiB of the arena).
    #[arg(long = "max-connections", default_value_t = 16)]
    pub max_connections: usize,
    /// Extra arena MiB beyond what the NBD connections need (for bdevs that take buffers).
    #[arg(long = "arena-mb", default_value_t = 64)]
    pub arena_mb: u64,
    /// Do not run the poison listener (SIGBUS, NVMe media errors; journal in DATA_DIR/poison.log).
    #[arg(long = "no-poison")]
    pub no_poison: bool,
    /// Also read machine-check and memory-failure events from this tracefs mount (root; enables the events).
    #[arg(long = "poison-tracefs", value_name = "DIR")]
    pub poison_tracefs: Option<PathBuf>,
    /// Accept the test-aid RPC nvstack_poison_inject (a synthetic poison report on a bdev range, acted on).
    #[arg(long = "poison-test-rpc")]
    pub poison_test_rpc: bool,
    /// Poll without ever sleeping (SPDK style). Default: when nothing is in flight, a reactor waits in epoll for
    /// its sockets (up to 2 ms), so an idle appliance uses no CPU.
    #[arg(long = "busy-poll")]
    pub busy_poll: bool,
    /// Do not pin reactor threads to their cores.
    #[arg(long = "no-pin")]
    pub no_pin: bool,
    /// Serve NBD over TLS (STARTTLS) with the x509 credentials in DIR, laid out as for qemu-nbd --tls-creds
    /// (QEMU's tls-creds-x509, endpoint=server): ca-cert.pem, server-cert.pem, server-key.pem.
    #[arg(long = "tls-creds", value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// With --tls-creds: `required` (as qemu-nbd: plaintext clients are refused with NBD_REP_ERR_TLS_REQD) or
    /// `optional` (TLS offered, plaintext still served).
    #[arg(long = "tls-mode", value_enum, default_value_t = nbd::tls::TlsMode::Required, requires = "tls_creds")]
    pub tls_mode: nbd::tls::TlsMode,
    /// With --tls-creds: require client certificates signed by DIR/ca-cert.pem (QEMU's verify-peer=on).
    #[arg(long = "tls-verify-peer", requires = "tls_creds")]
    pub tls_verify_peer: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_sig: libc::c_int) {
    // Async-signal-safe: one atomic store.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signals() -> Result<(), AppError> {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: a zeroed sigaction is a valid starting value; the handler only stores to an atomic, which is
        // async-signal-safe; sigaction is given valid pointers.
        let r = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return Err(AppError::Failed(format!("installing the handler for signal {sig} failed")));
        }
    }
    // SAFETY: ignoring SIGPIPE (a client closing its socket) is always valid.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    Ok(())
}

/// FLUSH `bdev` through a channel of this thread's own, waiting up to `timeout`; the failure in words.
pub(crate) fn flush_bdev(bdev: &dyn nvstack_blockdev::BlockDev, timeout: Duration) -> Result<(), String> {
    let mut ch = bdev.open_channel(ChannelOpts { reactor_index: 0, queue_depth: 4 }).map_err(|e| e.to_string())?;
    let mut io = IoDesc::new(1);
    io.prepare(IoOp::Flush, 0, 0);
    match run_sync(ch.as_mut(), io, timeout) {
        Ok(io) if io.status == IoStatus::Success => Ok(()),
        Ok(io) => Err(format!("{:?}", io.status)),
        Err(e) => Err(e.to_string()),
    }
}

fn flush_all(registry: &Registry) -> Result<(), AppError> {
    let mut failed = Vec::new();
    for b in registry.bdevs().iter().rev() {
        if b.reactor_flushed.load(Ordering::Acquire) {
            continue; // Flushed through its reactor channel.
        }
        if let Err(e) = flush_bdev(b.bdev.as_ref(), Duration::from_secs(60)) {
            failed.push(format!("{}: {e}", b.bdev.name()));
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(AppError::Failed(format!("final flush failed: {}", failed.join("; "))))
    }
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MiB", bytes as f64 / f64::from(1u32 << 20))
    }
}

fn default_volume(args: &ServeArgs, app: &Appliance) -> Result<(), AppError> {
    let spec = match &args.volume {
        Some(s) => s.clone(),
        None => {
            let size = nvstack_blockdev::spec::parse_size(&args.volume_size).map_err(AppError::Usage)?;
            format!("file:{}:{size},name=file0", args.data_dir.join("disk0.img").display())
        }
    };
    let r = rpc::call(app, "nvstack_bdev_create", Some(json!({"spec": spec})))
        .map_err(|e| AppError::Usage(format!("default volume {spec:?}: {}", e.message)))?;
    let mut bdev = r.as_str().unwrap_or("file0").to_string();
    if !args.no_cache {
        let r = rpc::call(app, "nvstack_cache_create", Some(json!({"base_bdev_name": bdev, "cache_mb": args.cache_mb})))
            .map_err(|e| AppError::Usage(format!("cache over the default volume: {}", e.message)))?;
        bdev = r.as_str().unwrap_or_default().to_string();
    }
    rpc::call(
        app,
        "nvstack_export_create",
        Some(json!({"name": "disk0", "bdev_name": bdev, "description": "nvstack default volume"})),
    )
    .map_err(|e| AppError::Usage(format!("exporting the default volume: {}", e.message)))?;
    Ok(())
}

/// Run `nvstack serve` until SIGINT/SIGTERM.
///
/// # Errors
/// Bad flags or config ([`AppError::Usage`], [`AppError::Config`]), sockets that cannot be bound, bdev failures.
pub fn run(args: ServeArgs, _g: &GlobalOpts) -> Result<ExitCode, AppError> {
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| AppError::Usage(format!("data dir {}: {e}", args.data_dir.display())))?;
    let cores = match &args.cpumask {
        Some(m) => nvstack_blockdev::coremask::parse(m)?,
        None => nvstack_blockdev::coremask::allowed_cores().into_iter().take(1).collect(),
    };
    let nbd_cfg = nbd::server::NbdConfig {
        tcp: if args.no_tcp {
            None
        } else {
            let ip: std::net::IpAddr = args
                .listen
                .parse()
                .map_err(|_| AppError::Usage(format!("--listen {:?} is not an IP address", args.listen)))?;
            Some(std::net::SocketAddr::new(ip, args.port))
        },
        unix: Some(args.nbd_socket.clone().unwrap_or_else(|| args.data_dir.join("nbd.sock"))),
        max_connections: args.max_connections.clamp(1, 4096),
        idle_wait_ms: if args.busy_poll { 0 } else { 2 },
        tls: match &args.tls_creds {
            Some(dir) => Some(Arc::new(nbd::tls::load_creds(dir, args.tls_mode, args.tls_verify_peer)?)),
            None => None,
        },
    };
    let rpc_path = args.rpc_socket.clone().unwrap_or_else(|| args.data_dir.join("nvstack.sock"));
    install_signals()?;
    let cache_bytes = if args.config.is_none() && !args.no_cache { args.cache_mb.saturating_mul(1 << 20) } else { 0 };
    let arena_bytes = nbd_cfg.arena_bytes() + args.arena_mb.saturating_mul(1 << 20) + cache_bytes + cache_bytes / 8;
    let arena = Arena::new(ArenaConfig { size_bytes: arena_bytes, require_hugepages: false, try_1g: false })?;
    let mut rcfg = ReactorConfig::new(cores);
    rcfg.pin = !args.no_pin;
    // The NBD pollers wait in epoll when idle; the reactor's own backoff only matters for reactors with no NBD
    // work at all.
    rcfg.idle_backoff_rounds = if args.busy_poll { None } else { Some(100_000) };
    let reactors = Arc::new(Reactors::start(rcfg)?);
    let registry = Registry::new();
    let mut listen = Vec::new();
    let app = Arc::new(Appliance {
        registry: Arc::clone(&registry),
        arena: Arc::clone(&arena),
        reactors: Arc::clone(&reactors),
        listen: Vec::new(),
        poison: None,
    });
    match &args.config {
        Some(p) => {
            let n = config::load(&p.display().to_string(), &app)?;
            tracing::info!(entries = n, path = %p.display(), "config loaded");
        }
        None => default_volume(&args, &app)?,
    }
    let mut server = nbd::server::start(&nbd_cfg, &arena, &reactors, Arc::clone(&registry))?;
    if let Some(a) = server.tcp_addr {
        listen.push(format!("nbd://{a}"));
    }
    if let Some(p) = &server.unix_path {
        listen.push(format!("nbd+unix:///?socket={}", p.display()));
    }
    drop(app);
    let poison = if args.no_poison {
        None
    } else {
        let opts = poison::PoisonOptions {
            log: nvstack_rmap::listener::default_journal_path(&args.data_dir),
            tracefs: args.poison_tracefs.clone(),
            allow_inject: args.poison_test_rpc,
        };
        Some(poison::ServePoison::start(&opts, &registry, &arena)?)
    };
    let app = Arc::new(Appliance {
        registry: Arc::clone(&registry),
        arena,
        reactors: Arc::clone(&reactors),
        listen,
        poison: poison.clone(),
    });
    let mut rpc_server = RpcServer::start(&rpc_path, Arc::clone(&app))?;
    print_banner(&registry, &server, &rpc_path);
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("nvstack serve: stopping: draining connections, flushing");
    registry.set_stopping();
    server.stop_accepting();
    rpc_server.stop();
    if let Some(p) = poison {
        p.stop(poison::STOP_TIMEOUT);
    }
    drop(app);
    let reactors = Arc::try_unwrap(reactors).map_err(|_| AppError::Failed("reactors still shared at shutdown".into()))?;
    reactors.stop()?;
    flush_all(&registry)?;
    eprintln!("nvstack serve: stopped cleanly");
    Ok(ExitCode::SUCCESS)
}

fn print_banner(registry: &Registry, server: &nbd::server::NbdServer, rpc_path: &Path) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    for x in registry.exports() {
        let _ = writeln!(out, "nvstack serve: export {} ({}, bdev {})", x.info.name, human(x.info.limits.size_bytes), x.bdev.bdev.name());
        if let Some(a) = server.tcp_addr {
            let host = if a.port() == 10809 { a.ip().to_string() } else { a.to_string() };
            let _ = writeln!(out, "  connect:  nbdinfo nbd://{host}/{}", x.info.name);
        }
        if let Some(p) = &server.unix_path {
            let _ = writeln!(out, "  unix:     nbdinfo 'nbd+unix:///{}?socket={}'", x.info.name, p.display());
        }
        if let (Some(d), Some(a)) = (&server.tls_dir, server.tcp_addr) {
            let _ = writeln!(out, "  tls:      nbdinfo 'nbds://{a}/{}?tls-certificates={}'", x.info.name, d.display());
        }
    }
    let _ = writeln!(out, "  control:  nvstack rpc -s {} bdev_get_bdevs", rpc_path.display());
    let _ = writeln!(out, "nvstack serve: ready");
    let _ = out.flush();
}
