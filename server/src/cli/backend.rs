//! `udm backend ...`: the backends tables and exports are built on (RAM disks, files,
//! NVMe namespaces, fault injectors), added and removed while the daemon runs.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::common::{field, quiet, run, table, ControlOpts};

/// Arguments of `udm backend`.
#[derive(Debug, Args)]
pub struct BackendArgs {
    #[command(subcommand)]
    command: BackendCommand,
    #[command(flatten)]
    ctl: ControlOpts,
}

#[derive(Debug, Subcommand)]
enum BackendCommand {
    /// Open a backend and register it under a name tables can use.
    Add {
        /// Backend name.
        name: String,
        /// What to open: `mem:64M[,bs=4096]`, `null:1G`, `file:/path[,ro][,direct=off]`,
        /// `nvme:0000:00:04.0/1`, `fault:<faults>@<spec>`.
        spec: String,
    },
    /// Remove a backend; refused while a table or an export uses it (naming it).
    Remove {
        /// Backend name.
        name: String,
        /// Remove even if used: exports serving it are stopped; tables using it keep
        /// their handle until they are reloaded or removed.
        #[arg(long, short = 'f')]
        force: bool,
    },
    /// List backends with their size and users.
    Ls {
        /// Backend name (all if omitted).
        name: Option<String>,
    },
}

/// Runs `udm backend`.
pub fn main(args: BackendArgs) -> ExitCode {
    let ctl = &args.ctl;
    match args.command {
        BackendCommand::Add { name, spec } => run(ctl, "backend.add", json!({"name": name, "spec": spec}), quiet),
        BackendCommand::Remove { name, force } => {
            run(ctl, "backend.remove", json!({"name": name, "force": force}), quiet)
        }
        BackendCommand::Ls { name } => run(ctl, "backend.ls", json!({"name": name}), render_ls),
    }
}

/// A size in sectors as `1.5G`, `64M`, `512K` (binary units, like lsblk).
fn human_size(sectors: u64) -> String {
    let bytes = sectors * 512;
    let units = [("T", 40), ("G", 30), ("M", 20), ("K", 10)];
    for (unit, shift) in units {
        if bytes >= 1 << shift {
            let v = bytes as f64 / (1u64 << shift) as f64;
            return if v.fract() == 0.0 { format!("{v:.0}{unit}") } else { format!("{v:.1}{unit}") };
        }
    }
    format!("{bytes}B")
}

fn names(v: &Value, key: &str) -> Vec<String> {
    v[key].as_array().into_iter().flatten().filter_map(|n| n.as_str().map(String::from)).collect()
}

fn render_ls(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|b| {
            let mut users: Vec<String> = names(b, "used_by");
            users.extend(names(b, "exported_by").into_iter().map(|e| format!("export:{e}")));
            vec![
                field(b, "name"),
                human_size(b["sectors"].as_u64().unwrap_or(0)),
                field(b, "block_size"),
                if b["read_only"].as_bool() == Some(true) { "ro" } else { "rw" }.into(),
                if users.is_empty() { "-".into() } else { users.join(",") },
                field(b, "spec"),
            ]
        })
        .collect();
    if rows.is_empty() {
        return "No backends\n".into();
    }
    table(&["NAME", "SIZE", "BS", "MODE", "USED BY", "SPEC"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_sizes_users_and_specs() {
        let v = json!([
            {"name": "ram0", "spec": "mem:256M", "sectors": 524288, "block_size": 512, "max_transfer": 4194304,
             "read_only": false, "used_by": ["vol0"], "exported_by": ["raw"], "open_count": 1},
            {"name": "snap0-cowdev", "spec": null, "sectors": 3072, "block_size": 4096, "max_transfer": 1048576,
             "read_only": true, "used_by": [], "exported_by": [], "open_count": 0},
        ]);
        assert_eq!(
            render_ls(&v),
            "NAME          SIZE  BS    MODE  USED BY          SPEC\n\
             ram0          256M  512   rw    vol0,export:raw  mem:256M\n\
             snap0-cowdev  1.5M  4096  ro    -                -\n"
        );
        assert_eq!(render_ls(&json!([])), "No backends\n");
    }
}
