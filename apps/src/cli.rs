//! The command line: global options and one subcommand per tool.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// nvstack: a userspace NVMe and persistent-memory storage stack.
#[derive(Debug, Parser)]
#[command(name = "nvstack", version, about, propagate_version = true)]
pub struct Cli {
    /// Options every subcommand takes.
    #[command(flatten)]
    pub global: GlobalOpts,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Options every subcommand takes.
#[derive(Debug, Args)]
pub struct GlobalOpts {
    /// More log output (-v info, -vv debug, -vvv trace). RUST_LOG overrides.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Log line format.
    #[arg(long = "log-format", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Measure a block device: the equivalent of spdk_nvme_perf and bdevperf.
    Perf(crate::perf::PerfArgs),
    /// Show an NVMe controller and its namespaces (as spdk_nvme_identify / nvme id-ctrl).
    Identify(crate::identify::IdentifyArgs),
    /// Reserve hugepages and bind NVMe functions to vfio-pci (as SPDK's setup.sh).
    Setup(crate::setup::SetupArgs),
    /// Run the appliance: NBD exports, JSON-RPC control, SPDK JSON config.
    Serve(crate::serve::ServeArgs),
    /// Send one JSON-RPC request to a running `nvstack serve` (as SPDK's rpc.py).
    Rpc(crate::rpc_client::RpcArgs),
    /// Poison events: list the journal, explain a device offset or physical address, inject (test aid).
    Poison(crate::poison::PoisonArgs),
}
