//! LVM-style snapshot operations over a [`Registry`] (spec/device-mapper.md §3.6, §6),
//! for the `udm snapshot` commands:
//!
//! ```text
//!  before:  vol: linear disk 0
//!  create vol snap --cow ... --chunk 4k
//!  after:   vol-real:  linear disk 0                      (vol's old table)
//!           vol:       snapshot-origin vol-real
//!           snap-cow:  linear <cow device> <offset>
//!           snap:      snapshot vol-real snap-cow P 8
//! ```
//!
//! * [`create`]: builds the four devices in LVM's order, suspending the origin around
//!   the switch so no write slips between.
//! * [`remove`]: drops a snapshot; the last one takes the origin back to its plain table.
//! * [`merge`]: rolls the origin back to a snapshot online (`snapshot-merge`), then
//!   tears the snapshot down.
//! * [`extend`]: grows a COW store online.
//! * [`list`]: every snapshot with its COW usage (lvs' `Data%`).

pub mod create;
pub mod extend;
pub mod list;
pub mod merge;
pub mod remove;

use crate::error::MappingError;
use crate::registry::{DeviceKind, Registry, TableSlot};
use crate::table_text::{parse_table_text, TableLine};

pub use create::{create, CowSource, CreateOptions, Created, ExistingCow};
pub use extend::extend;
pub use list::{list, SnapshotInfo};
pub use merge::{finish_merge, merge, merge_progress, MergeProgress};
pub use remove::remove;

/// Why a snapshot operation failed. Nothing is left half-done: each operation undoes
/// what it changed before reporting the error.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotOpError {
    /// A registry operation failed.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// The named device is not what the operation needs.
    #[error("`{name}` {problem}")]
    NotApplicable {
        /// The device.
        name: String,
        /// What is wrong with it and what to do.
        problem: String,
    },
    /// The COW source could not be opened or is unusable.
    #[error("COW for `{name}`: {problem}")]
    BadCow {
        /// The snapshot.
        name: String,
        /// What is wrong.
        problem: String,
    },
}

/// `<origin>-real`.
pub fn real_name(origin: &str) -> String {
    format!("{origin}-real")
}

/// `<snapshot>-cow`.
pub fn cow_name(snapshot: &str) -> String {
    format!("{snapshot}-cow")
}

/// The live table of `name`, parsed.
pub(crate) fn live_lines(reg: &Registry, name: &str) -> Result<Vec<TableLine>, SnapshotOpError> {
    let text = reg.table(name, TableSlot::Live)?;
    if text.trim().is_empty() {
        return Err(SnapshotOpError::NotApplicable { name: name.into(), problem: "has no live table".into() });
    }
    parse_table_text(&text).map_err(|e| SnapshotOpError::NotApplicable { name: name.into(), problem: e.to_string() })
}

/// The single-line live table of `name` if it is of type `target`.
pub(crate) fn single_target(reg: &Registry, name: &str, target: &str) -> Option<TableLine> {
    let lines = live_lines(reg, name).ok()?;
    match lines.as_slice() {
        [line] if line.target == target => Some(line.clone()),
        _ => None,
    }
}

/// The snapshot devices (`snapshot` tables) whose origin is `real`.
pub(crate) fn snapshots_of(reg: &Registry, real: &str) -> Vec<String> {
    reg.ls()
        .into_iter()
        .filter(|(_, kind)| *kind == DeviceKind::Mapped)
        .filter(|(name, _)| {
            single_target(reg, name, "snapshot").is_some_and(|l| l.args.first().map(String::as_str) == Some(real))
        })
        .map(|(name, _)| name)
        .collect()
}

/// The origin a snapshot device belongs to: its table's `<origin>-real` minus `-real`.
pub(crate) fn origin_of(reg: &Registry, snapshot: &str) -> Result<(String, TableLine), SnapshotOpError> {
    let line = single_target(reg, snapshot, "snapshot").ok_or_else(|| SnapshotOpError::NotApplicable {
        name: snapshot.into(),
        problem: "is not a snapshot (its live table is not a single `snapshot` line)".into(),
    })?;
    let real = line.args[0].clone();
    let origin = real.strip_suffix("-real").map(str::to_string).ok_or_else(|| SnapshotOpError::NotApplicable {
        name: snapshot.into(),
        problem: format!("has origin `{real}`, which is not an LVM-style `<origin>-real` device"),
    })?;
    Ok((origin, line))
}
