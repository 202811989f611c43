//! `udm export ...`: vhost-user-blk exports of registry devices.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use udm_server::control::socket_file::SocketMode;
use udm_server::cpu::parse_cpu_list;

use super::common::{field, quiet, run, table, usage_error, ControlOpts};

/// Arguments of `udm export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    #[command(subcommand)]
    command: ExportCommand,
    #[command(flatten)]
    ctl: ControlOpts,
}

#[derive(Debug, Subcommand)]
enum ExportCommand {
    /// Export a device on a vhost-user-blk socket.
    Add {
        /// Export name.
        name: String,
        /// Device to export (default: the export name).
        #[arg(long)]
        device: Option<String>,
        /// Socket path (default: ./<name>.sock).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Request virtqueues.
        #[arg(long, default_value_t = 1)]
        queues: u16,
        /// Largest ring size the front end may set up (a power of two up to 32768).
        #[arg(long, default_value_t = udm_server::vhost_blk::export::default_queue_size())]
        queue_size: u16,
        /// Refuse writes.
        #[arg(long)]
        read_only: bool,
        /// Busy-poll the queues instead of sleeping on kicks.
        #[arg(long)]
        busy_poll: bool,
        /// In event mode, the longest a queue worker polls an empty queue before sleeping
        /// (microseconds, adapted from 0 up to this; 0: sleep at once).
        #[arg(long, default_value_t = udm_server::vhost_blk::export::default_idle_poll_us())]
        idle_poll_us: u32,
        /// CPUs for the queue workers (e.g. `2-3`).
        #[arg(long)]
        cpus: Option<String>,
        /// Serial number (GET_ID), up to 20 bytes.
        #[arg(long)]
        serial: Option<String>,
        /// Socket permissions, octal (default 0600: only udm's user may connect), e.g.
        /// 0660 with --socket-group for a QEMU running as another user.
        #[arg(long, value_parser = SocketMode::parse)]
        socket_mode: Option<SocketMode>,
        /// Socket group, name or number (default: udm's group).
        #[arg(long)]
        socket_group: Option<String>,
    },
    /// Stop an export (drains its requests) and remove its socket.
    Remove {
        /// Export name.
        name: String,
    },
    /// List exports.
    Ls,
}

/// Runs `udm export`.
pub fn main(args: ExportArgs) -> ExitCode {
    let ctl = &args.ctl;
    match args.command {
        ExportCommand::Add {
            name,
            device,
            socket,
            queues,
            queue_size,
            read_only,
            busy_poll,
            idle_poll_us,
            cpus,
            serial,
            socket_mode,
            socket_group,
        } => {
            let cpus = match cpus.as_deref().map(parse_cpu_list).transpose() {
                Ok(c) => c.unwrap_or_default(),
                Err(e) => return usage_error(e),
            };
            let socket = socket.unwrap_or_else(|| PathBuf::from(format!("{name}.sock")));
            let socket = std::path::absolute(&socket).unwrap_or(socket);
            let params = json!({
                "device": device.unwrap_or_else(|| name.clone()),
                "name": name,
                "socket": socket,
                "num_queues": queues,
                "queue_size": queue_size,
                "read_only": read_only,
                "poll": if busy_poll { "busy" } else { "event" },
                "idle_poll_us": idle_poll_us,
                "cpus": cpus,
                "serial": serial,
                "socket_mode": socket_mode.map(|m| m.to_string()),
                "socket_group": socket_group,
            });
            run(ctl, "export.add", params, |v| format!("exported at {}\n", field(&v["config"], "socket")))
        }
        ExportCommand::Remove { name } => run(ctl, "export.remove", json!({"name": name}), quiet),
        ExportCommand::Ls => run(ctl, "export.ls", json!({}), render_ls),
    }
}

fn render_ls(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let c = &e["config"];
            let mib = (e["sectors"].as_u64().unwrap_or(0) * 512) >> 20;
            vec![
                field(c, "name"),
                field(c, "device"),
                format!("{mib}M"),
                field(c, "num_queues"),
                if c["read_only"].as_bool() == Some(true) { "ro" } else { "rw" }.into(),
                field(c, "poll"),
                if e["problem"].is_string() {
                    "NOT RUNNING"
                } else if e["removing"].as_bool() == Some(true) {
                    "removing"
                } else if e["connected"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "no"
                }
                .into(),
                field(c, "socket"),
            ]
        })
        .collect();
    let mut out = table(&["NAME", "DEVICE", "SIZE", "QUEUES", "MODE", "POLL", "CONNECTED", "SOCKET"], &rows);
    // Exports from the state file that could not start again, and why.
    for e in v.as_array().into_iter().flatten() {
        if let Some(p) = e["problem"].as_str() {
            out.push_str(&format!("{}: not running: {p}\n", field(&e["config"], "name")));
        }
    }
    out
}
