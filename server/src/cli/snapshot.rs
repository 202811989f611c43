//! `udm snapshot ...`: LVM-style snapshots (lvcreate -s, lvremove, lvconvert --merge, lvs).

use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use super::common::{field, quiet, run, table, ControlOpts};

/// Arguments of `udm snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    command: SnapshotCommand,
    #[command(flatten)]
    ctl: ControlOpts,
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Snapshot a mapped device (creates <origin>-real, <name>-cow and <name>).
    Create {
        /// The origin device.
        origin: String,
        /// The snapshot's name.
        name: String,
        /// Where the COW lives: a size (RAM), a backend spec (`file:/path`), or a device.
        #[arg(long)]
        cow: String,
        /// Chunk size, 4k to 512k (a multiple of the origin's and the COW's block size).
        #[arg(long, default_value = "4k")]
        chunk: String,
        /// Re-attach the snapshot store the COW already holds (as `udm serve` does for
        /// a declared snapshot; a merge that was cut short resumes).
        #[arg(long)]
        attach: bool,
        /// Re-initialise a COW that already holds something (a snapshot store, other
        /// data): what it held is lost. Without it (or --attach) such a COW is refused.
        #[arg(long)]
        reinit: bool,
    },
    /// Remove a snapshot (the last one takes the origin back to its plain table).
    Remove {
        /// The snapshot.
        name: String,
    },
    /// Roll the origin back to the snapshot, online.
    Merge {
        /// The snapshot.
        name: String,
    },
    /// List snapshots with their COW usage.
    List,
}

/// Runs `udm snapshot`.
pub fn main(args: SnapshotArgs) -> ExitCode {
    let ctl = &args.ctl;
    match args.command {
        SnapshotCommand::Create { origin, name, cow, chunk, attach, reinit } => run(
            ctl,
            "snapshot.create",
            json!({"origin": origin, "name": name, "cow": cow, "chunk": chunk, "attach": attach, "reinit": reinit}),
            quiet,
        ),
        SnapshotCommand::Remove { name } => run(ctl, "snapshot.remove", json!({"name": name}), quiet),
        SnapshotCommand::Merge { name } => run(ctl, "snapshot.merge", json!({"name": name}), quiet),
        SnapshotCommand::List => run(ctl, "snapshot.list", json!({}), render_list),
    }
}

fn render_list(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let chunk = s["chunk_sectors"].as_u64().map_or("-".into(), |c| format!("{}k", c / 2));
            let attr = if s["merging"].as_bool() == Some(true) { "merging" } else { "snapshot" };
            vec![
                field(s, "name"),
                field(s, "origin"),
                field(s, "data_percent"),
                chunk,
                attr.into(),
                field(s, "cow"),
                field(s, "status"),
            ]
        })
        .collect();
    table(&["LV", "Origin", "Data%", "Chunk", "Type", "COW", "Status"], &rows)
}
