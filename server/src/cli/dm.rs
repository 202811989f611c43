//! `udm dm ...`: mapped devices, shaped like dmsetup.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::common::{field, quiet, run, table_text, usage_error, ControlOpts};

/// Arguments of `udm dm`.
#[derive(Debug, Args)]
pub struct DmArgs {
    #[command(subcommand)]
    command: DmCommand,
    #[command(flatten)]
    ctl: ControlOpts,
}

#[derive(Debug, Subcommand)]
enum DmCommand {
    /// Create a device, optionally with a table (made live at once).
    Create {
        /// Device name.
        name: String,
        /// Table text (`start length target args...` lines).
        #[arg(long)]
        table: Option<String>,
        /// Read the table from a file (default: standard input if it is not a terminal).
        #[arg(long)]
        file: Option<PathBuf>,
        /// UUID.
        #[arg(long, short = 'u')]
        uuid: Option<String>,
    },
    /// Stage a table in the inactive slot; `resume` makes it live.
    Load {
        /// Device name.
        name: String,
        /// Table text.
        #[arg(long)]
        table: Option<String>,
        /// Read the table from a file (default: standard input).
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Stop admitting I/O and drain what is in flight (`udm dm resume` from another
    /// shell cancels a suspend still waiting).
    Suspend {
        /// Device name.
        name: String,
        /// Do not flush the devices below after draining.
        #[arg(long)]
        noflush: bool,
        /// Give up after SECS seconds if I/O is still in flight (default: wait as long
        /// as it takes, like dmsetup); the device is then left active and the error
        /// says how many requests were in flight on which queue.
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Make the inactive table live (if any) and admit I/O again.
    Resume {
        /// Device name.
        name: String,
    },
    /// Drop the inactive table.
    Clear {
        /// Device name.
        name: String,
    },
    /// Remove a device.
    Remove {
        /// Device name.
        name: String,
        /// Remove even if open.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// Rename a device.
    Rename {
        /// Current name.
        name: String,
        /// New name.
        new_name: String,
    },
    /// Show a device's (or every device's) state.
    Info {
        /// Device name (all if omitted).
        name: Option<String>,
    },
    /// Print tables.
    Table {
        /// Device name (all mapped devices if omitted).
        name: Option<String>,
        /// The inactive table instead of the live one.
        #[arg(long)]
        inactive: bool,
    },
    /// Print target status lines.
    Status {
        /// Device name (all mapped devices if omitted).
        name: Option<String>,
        /// The inactive table instead of the live one.
        #[arg(long)]
        inactive: bool,
    },
    /// List devices.
    Ls {
        /// Show what each device stacks on.
        #[arg(long)]
        tree: bool,
    },
    /// List the devices a table uses.
    Deps {
        /// Device name.
        name: String,
        /// The inactive table instead of the live one.
        #[arg(long)]
        inactive: bool,
    },
}

/// Runs `udm dm`.
pub fn main(args: DmArgs) -> ExitCode {
    let ctl = &args.ctl;
    match args.command {
        DmCommand::Create { name, table, file, uuid } => match table_text(table, file) {
            Ok(t) => run(ctl, "dm.create", json!({"name": name, "uuid": uuid, "table": t}), quiet),
            Err(e) => usage_error(e),
        },
        DmCommand::Load { name, table, file } => match table_text(table, file) {
            Ok(Some(t)) => run(ctl, "dm.load", json!({"name": name, "table": t}), quiet),
            Ok(None) => usage_error("load needs a table: --table TEXT, --file PATH or standard input".into()),
            Err(e) => usage_error(e),
        },
        DmCommand::Suspend { name, noflush, timeout } => {
            run(ctl, "dm.suspend", json!({"name": name, "noflush": noflush, "timeout": timeout}), quiet)
        }
        DmCommand::Resume { name } => run(ctl, "dm.resume", json!({"name": name}), quiet),
        DmCommand::Clear { name } => run(ctl, "dm.clear", json!({"name": name}), quiet),
        DmCommand::Remove { name, force } => run(ctl, "dm.remove", json!({"name": name, "force": force}), quiet),
        DmCommand::Rename { name, new_name } => {
            run(ctl, "dm.rename", json!({"name": name, "new_name": new_name}), quiet)
        }
        DmCommand::Info { name } => run(ctl, "dm.info", json!({"name": name}), render_info),
        DmCommand::Table { name, inactive } => {
            let one = name.is_some();
            run(ctl, "dm.table", json!({"name": name, "inactive": inactive}), move |v| render_tables(v, one))
        }
        DmCommand::Status { name, inactive } => {
            let one = name.is_some();
            run(ctl, "dm.status", json!({"name": name, "inactive": inactive}), move |v| render_tables(v, one))
        }
        DmCommand::Ls { tree } => run(ctl, "dm.ls", json!({"tree": tree}), render_ls),
        DmCommand::Deps { name, inactive } => {
            run(ctl, "dm.deps", json!({"name": name, "inactive": inactive}), render_deps)
        }
    }
}

fn render_info(v: &Value) -> String {
    let mut out = String::new();
    for (i, d) in v.as_array().into_iter().flatten().enumerate() {
        if i > 0 {
            out.push('\n');
        }
        let holders: Vec<String> =
            d["holders"].as_array().into_iter().flatten().filter_map(|h| h.as_str().map(String::from)).collect();
        out.push_str(&format!(
            "Name:              {}\nKind:              {}\nState:             {}\nTables present:    {}\n\
             Open count:        {}\nEvent number:      {}\nNumber of targets: {}\nSectors:           {}\n",
            field(d, "name"),
            field(d, "kind"),
            field(d, "state"),
            field(d, "tables"),
            field(d, "open_count"),
            field(d, "event_nr"),
            field(d, "targets"),
            field(d, "sectors"),
        ));
        if !holders.is_empty() {
            out.push_str(&format!("Holders:           {}\n", holders.join(" ")));
        }
        if let Some(u) = d["uuid"].as_str() {
            out.push_str(&format!("UUID: {u}\n"));
        }
        if let Some(p) = d["problem"].as_str() {
            out.push_str(&format!("Problem:           {p}\n"));
        }
    }
    out
}

fn render_tables(v: &Value, one: bool) -> String {
    let mut out = String::new();
    for row in v.as_array().into_iter().flatten() {
        let text = row["text"].as_str().unwrap_or("");
        let name = field(row, "name");
        let lines: Vec<&str> = text.lines().collect();
        if lines.is_empty() && !one {
            out.push_str(&format!("{name}: \n"));
        }
        for l in lines {
            if one {
                out.push_str(&format!("{l}\n"));
            } else {
                out.push_str(&format!("{name}: {l}\n"));
            }
        }
    }
    out
}

fn render_ls(v: &Value) -> String {
    if let Some(tree) = v.as_str() {
        return tree.to_string();
    }
    let rows = v.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        return "No devices found\n".into();
    }
    rows.iter()
        .map(|r| match r["problem"].as_str() {
            // A device that came back from the state file as an `error` device.
            Some(p) => format!("{}\t({})\tERROR: {p}\n", field(r, "name"), field(r, "kind")),
            None => format!("{}\t({})\n", field(r, "name"), field(r, "kind")),
        })
        .collect()
}

fn render_deps(v: &Value) -> String {
    let deps: Vec<String> =
        v.as_array().into_iter().flatten().filter_map(|d| d.as_str().map(|s| format!("({s})"))).collect();
    format!(" {} dependencies\t: {}\n", deps.len(), deps.join(" "))
}
