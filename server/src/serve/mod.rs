//! `udm serve`: runs the daemon until SIGINT or SIGTERM.
//!
//! Start-up: the config file (or the embedded default: a 1 GiB RAM volume `vol0`
//! exported at `./vol0.sock`) and the state file (a corrupt one, or one from a newer
//! udm, is refused before anything is touched), the control socket (a second daemon in
//! the same place is refused there, naming the first one's pid, and touches nothing),
//! then the state is rebuilt (see `udm_server::daemon::persist`) and the config's
//! declarations for objects the state does not hold are applied (without a state file:
//! all of them), then the state is written (never before the start has succeeded, so a
//! failed start leaves the old file as it was), then how to attach each export.
//! Shutdown: stop accepting control clients, stop each export after draining its queues,
//! flush every device, exit 0.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use udm_server::control::socket_file::SocketMode;
use udm_server::control::ControlServer;
use udm_server::cpu::parse_cpu_list;
use udm_server::daemon::config::Config;
use udm_server::daemon::persist::Recording;
use udm_server::daemon::state::StateFile;
use udm_server::daemon::Daemon;
use udm_server::vhost_blk::{ExportInfo, PollMode};

/// Arguments of `udm serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Configuration file (TOML: backends, devices, snapshots, exports). Without it, a
    /// 1 GiB RAM volume `vol0` is exported at ./vol0.sock.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// CPUs for queue workers (e.g. `2-3`); queues are spread over them.
    #[arg(long)]
    pub cpus: Option<String>,
    /// Control socket path (overrides the config's `control`).
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Control socket permissions, octal (default 0600: only udm's user may control
    /// it; overrides the config's `control_mode`).
    #[arg(long, value_parser = SocketMode::parse)]
    pub control_mode: Option<SocketMode>,
    /// Control socket group, name or number (overrides the config's `control_group`).
    #[arg(long)]
    pub control_group: Option<String>,
    /// State file, where every change is recorded and from which a restart rebuilds
    /// everything (default: udm-state.json beside the control socket; overrides the
    /// config's `state`).
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Busy-poll every export's queues (lowest latency, one core per queue) instead of
    /// sleeping on guest kicks; applies to exports of the embedded default and config.
    #[arg(long)]
    pub busy_poll: bool,
    /// Queues of the embedded default export.
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// At SIGTERM, how long draining the exports and flushing the devices may take
    /// before udm exits anyway (exit status 1, naming what did not finish).
    #[arg(long, value_name = "SECS", default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

/// Runs `udm serve`.
pub fn main(args: ServeArgs) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(msg) => {
            eprintln!("udm serve: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: ServeArgs) -> Result<(), String> {
    let grace = Duration::try_from_secs_f64(args.shutdown_timeout)
        .map_err(|_| format!("--shutdown-timeout {} is not a number of seconds >= 0", args.shutdown_timeout))?;
    let cpus = match &args.cpus {
        Some(text) => parse_cpu_list(text)?,
        None => Vec::new(),
    };
    let mut config = match &args.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => {
            let mut c = Config::embedded_default();
            c.exports[0].num_queues = args.queues;
            c
        }
    };
    if let Some(c) = &args.control {
        config.control = c.clone();
    }
    if args.control_mode.is_some() {
        config.control_mode = args.control_mode;
    }
    if args.control_group.is_some() {
        config.control_group.clone_from(&args.control_group);
    }
    if args.state.is_some() {
        config.state.clone_from(&args.state);
    }
    let state_path = config.state_path();
    let saved = StateFile::load(&state_path).map_err(|e| e.to_string())?;
    if let Some(state) = &saved {
        // The state is the truth; only declarations it does not hold are applied, and
        // the embedded default volume is not (it would come back after removal).
        config = match &args.config {
            Some(_) => config.missing_from(state),
            None => Config { backends: vec![], devices: vec![], snapshots: vec![], exports: vec![], ..config },
        };
    }
    let setting_up = match (&args.config, &saved) {
        (Some(p), _) => p.display().to_string(),
        (None, Some(_)) => format!("the state in {}", state_path.display()),
        (None, None) => "the default volume".into(),
    };
    if args.busy_poll {
        for e in &mut config.exports {
            e.poll = PollMode::Busy;
        }
    }
    // Register the handlers before any thread starts, so every thread inherits them.
    let mut signals = Signals::new([SIGINT, SIGTERM]).map_err(|e| format!("cannot handle signals: {e}"))?;
    let daemon = Arc::new(Daemon::new(cpus));
    daemon.set_recording(Recording::Starting);
    let control = ControlServer::start(&config.control, &config.control_access(), Arc::clone(&daemon))
        .map_err(|e| format!("control socket: {e}"))?;
    if let Some(state) = &saved {
        let report = daemon.restore(state);
        println!(
            "state {}: {} object(s) restored, {} with problems",
            absolute(&state_path).display(),
            report.restored,
            report.problems.len()
        );
        for p in &report.problems {
            println!("  problem: {p}");
        }
    }
    let applied = daemon.apply(&config).map_err(|e| e.to_string()).and_then(|()| {
        daemon
            .record_to(state_path.clone())
            .map_err(|e| format!("{e} (the state file is needed to bring everything back after a restart)"))
    });
    if let Err(e) = applied {
        control.stop();
        daemon.shutdown();
        return Err(format!("setting up {setting_up}: {e}; the state file {} is left as it was", state_path.display()));
    }
    println!("udm serving; control socket {}", absolute(&config.control).display());
    for e in daemon.export_ls() {
        print_attach(&e);
    }
    println!("stop with Ctrl-C or SIGTERM");
    let signal = signals.forever().next().unwrap_or(SIGTERM);
    tracing::info!(signal, "shutting down");
    control.stop();
    daemon.shutdown_within(grace)?;
    say(format_args!("udm stopped"));
    Ok(())
}

/// Prints a line; a closed stdout (the caller went away) must not stop the shutdown.
fn say(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{args}");
}

fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// How to attach an export: QEMU (guest RAM must be shared) and a libblkio client.
fn print_attach(e: &ExportInfo) {
    let c = &e.config;
    let sock = absolute(&c.socket);
    let mib = (e.sectors * 512) >> 20;
    println!("export {} (device {}, {} MiB, {} queue(s)) at {}", c.name, c.device, mib, c.num_queues, sock.display());
    println!(
        "  qemu-system-x86_64 -m 1G -object memory-backend-memfd,id=mem,size=1G,share=on -numa node,memdev=mem \\\n    \
         -chardev socket,id={n},path={p},reconnect=1 -device vhost-user-blk-pci,chardev={n},num-queues={q}",
        n = c.name,
        p = sock.display(),
        q = c.num_queues
    );
    println!("  libblkio: driver virtio-blk-vhost-user, path={}", sock.display());
}
