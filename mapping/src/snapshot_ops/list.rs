//! `udm snapshot list`: every snapshot (and merging snapshot) with its origin, chunk,
//! status and COW usage, like `lvs`' `Origin`, `Data%` columns.

use crate::registry::{DeviceKind, Registry, TableSlot};
use crate::snapshot_ops::single_target;

/// One snapshot as `list` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The snapshot (for a merge: the COW's name minus `-cow` when LVM-style, else the
    /// device carrying `snapshot-merge`).
    pub name: String,
    /// The origin (`<origin>-real` minus the suffix when LVM-style; for a merge, the
    /// device carrying `snapshot-merge`).
    pub origin: String,
    /// The COW device.
    pub cow: String,
    /// Chunk size in sectors.
    pub chunk_sectors: u64,
    /// Whether this is a merge in progress.
    pub merging: bool,
    /// The status text (`584/16384 16`, `Invalid`, `Overflow`, `Merge failed`).
    pub status: String,
    /// COW use in hundredths of a percent (lvs prints `Data%` with two decimals);
    /// `None` when the status carries no numbers.
    pub data_percent_x100: Option<u64>,
}

impl SnapshotInfo {
    /// `Data%` as lvs prints it, e.g. `3.56`, or `-` when unknown.
    pub fn data_percent(&self) -> String {
        match self.data_percent_x100 {
            Some(v) => format!("{}.{:02}", v / 100, v % 100),
            None => "-".into(),
        }
    }
}

/// Every snapshot in the registry, by name.
pub fn list(reg: &Registry) -> Vec<SnapshotInfo> {
    let mut out = Vec::new();
    for (name, kind) in reg.ls() {
        if kind != DeviceKind::Mapped {
            continue;
        }
        let (line, merging) = match (single_target(reg, &name, "snapshot"), single_target(reg, &name, "snapshot-merge"))
        {
            (Some(l), _) => (l, false),
            (None, Some(l)) => (l, true),
            _ => continue,
        };
        let status = reg
            .status(&name, TableSlot::Live)
            .ok()
            .and_then(|s| s.trim_end().splitn(4, ' ').nth(3).map(str::to_string))
            .unwrap_or_default();
        let data_percent_x100 = status.split_once('/').and_then(|(alloc, rest)| {
            let alloc: u64 = alloc.parse().ok()?;
            let total: u64 = rest.split(' ').next()?.parse().ok()?;
            (alloc * 10000).checked_div(total)
        });
        let real = line.args.first().cloned().unwrap_or_default();
        let cow = line.args.get(1).cloned().unwrap_or_default();
        let (name, origin) = if merging {
            (cow.strip_suffix("-cow").map_or_else(|| name.clone(), str::to_string), name)
        } else {
            (name, real.strip_suffix("-real").map(str::to_string).unwrap_or(real))
        };
        out.push(SnapshotInfo {
            origin,
            cow,
            chunk_sectors: line.args.get(3).and_then(|c| c.parse().ok()).unwrap_or(0),
            merging,
            status,
            data_percent_x100,
            name,
        });
    }
    out
}
