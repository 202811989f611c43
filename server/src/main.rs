//! The `udm` binary: parses the command line and hands each subcommand to its module.

mod bench;
mod cli;
mod serve;

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
    /// Run the daemon: devices, vhost-user-blk exports and the control socket.
    Serve(serve::ServeArgs),
    /// Backends (RAM, files, NVMe, fault injectors): add, remove, list (through the
    /// control socket).
    Backend(cli::backend::BackendArgs),
    /// Mapped devices, shaped like dmsetup (through the control socket).
    Dm(cli::dm::DmArgs),
    /// LVM-style snapshots (through the control socket).
    Snapshot(cli::snapshot::SnapshotArgs),
    /// vhost-user-blk exports (through the control socket).
    Export(cli::export::ExportArgs),
    /// I/O statistics per export and queue (through the control socket).
    Stats(cli::stats::StatsArgs),
    /// The running state as a udm.toml (`save`), or a udm.toml validated (`check`).
    Config(cli::config::ConfigArgs),
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
        Command::Serve(args) => serve::main(args),
        Command::Backend(args) => cli::backend::main(args),
        Command::Dm(args) => cli::dm::main(args),
        Command::Snapshot(args) => cli::snapshot::main(args),
        Command::Export(args) => cli::export::main(args),
        Command::Stats(args) => cli::stats::main(args),
        Command::Config(args) => cli::config::main(args),
        Command::Bench(args) => bench::main(args),
        Command::Setup(args) => cli::setup::main(args),
        Command::Nvme(args) => cli::nvme::main(args),
    }
}
