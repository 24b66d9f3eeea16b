//! `nvstack`: the storage appliance and its tools, one binary with clap subcommands.
//!
//! Only this crate prints; libraries log through `tracing` and return errors.

mod bdev_spec;
mod cli;
mod error;
mod identify;
mod logging;
mod perf;
mod poison;
mod rpc_client;
mod serve;
mod setup;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // clap uses 0 for --help/--version and 2 for usage errors, as we want.
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    if let Err(e) = logging::init(&cli.global) {
        eprintln!("nvstack: {e}");
        return ExitCode::from(2);
    }
    let result = match cli.command {
        cli::Command::Perf(args) => perf::run(args, &cli.global),
        cli::Command::Identify(args) => identify::run(args, &cli.global),
        cli::Command::Setup(args) => setup::run(args, &cli.global),
        cli::Command::Serve(args) => serve::run(args, &cli.global),
        cli::Command::Rpc(args) => rpc_client::run(args, &cli.global),
        cli::Command::Poison(args) => poison::run(args, &cli.global),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nvstack: {e}");
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                eprintln!("  caused by: {s}");
                src = s.source();
            }
            ExitCode::from(e.exit_code())
        }
    }
}
