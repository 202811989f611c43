//! The `udm` binary: parses the command line and hands each subcommand to its module.

mod bench;
mod cli;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// udm: a userspace block-storage stack (device-mapper tables, snapshots, NVMe over
/// VFIO, vhost-user-blk exports). Logs go to stderr; set RUST_LOG=debug for more.
#[derive(Debug, Parser)]
#[command(name = "udm", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure a block device with a closed-loop load generator (like fio or SPDK perf).
    Bench(bench::BenchArgs),
    /// Prepare the machine for the NVMe driver: bind controllers to vfio-pci, reserve
    /// hugepages, report; `--undo` restores.
    Setup(cli::setup::SetupArgs),
    /// NVMe controllers: list them, identify one through udm's driver.
    Nvme(cli::nvme::NvmeArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Bench(args) => bench::main(args),
        Command::Setup(args) => cli::setup::main(args),
        Command::Nvme(args) => cli::nvme::main(args),
    }
}
