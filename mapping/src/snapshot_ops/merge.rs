//! `udm snapshot merge <name>`: rolls the origin back to snapshot `name`, online, as
//! `lvconvert --merge` does with the origin active (spec/device-mapper.md §6): the
//! snapshot device gets an `error` table, the origin a `snapshot-merge` table over the
//! same `-real` and COW; other snapshots carry on. When the status shows
//! `allocated == metadata` the merge is complete and [`finish_merge`] gives the origin
//! its plain table back and removes the snapshot's devices.

use crate::registry::{Registry, SuspendFlags, TableSlot};
use crate::snapshot_ops::remove::remove_cow;
use crate::snapshot_ops::{cow_name, origin_of, real_name, single_target, snapshots_of, SnapshotOpError};

/// Where a merge stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeProgress {
    /// Sectors still allocated in the COW (data and metadata).
    pub allocated: u64,
    /// Sectors of metadata.
    pub metadata: u64,
    /// COW size.
    pub total: u64,
    /// The merge is complete (`allocated == metadata`).
    pub done: bool,
}

/// Starts merging snapshot `name` into its origin.
pub fn merge(reg: &Registry, name: &str) -> Result<(), SnapshotOpError> {
    let (origin, line) = origin_of(reg, name)?;
    if !line.args[2].eq_ignore_ascii_case("P") && !line.args[2].eq_ignore_ascii_case("PO") {
        return Err(SnapshotOpError::NotApplicable {
            name: name.into(),
            problem: "is a transient (N) snapshot: only persistent snapshots can be merged".into(),
        });
    }
    if single_target(reg, &origin, "snapshot-merge").is_some() {
        return Err(SnapshotOpError::NotApplicable {
            name: origin,
            problem: "is already merging a snapshot: wait for it to finish".into(),
        });
    }
    let size = reg.device(&origin)?.info().sectors;
    let real = real_name(&origin);
    let snapshot_table = reg.table(name, TableSlot::Live)?;
    let chunk = &line.args[3];
    let cow = cow_name(name);
    reg.suspend(&origin, SuspendFlags::default())?;
    let switched = (|| {
        reg.load(name, &format!("0 {} error", line.length))?;
        reg.resume(name)?;
        reg.load(&origin, &format!("0 {size} snapshot-merge {real} {cow} P {chunk}"))?;
        reg.resume(&origin)
    })();
    if let Err(e) = switched {
        // Put the snapshot back as it was (its store is re-read from the COW).
        let _ = reg.load(name, &snapshot_table);
        let _ = reg.resume(name);
        let _ = reg.clear(&origin);
        let _ = reg.resume(&origin);
        return Err(e.into());
    }
    tracing::info!("merging snapshot {name} into {origin}");
    Ok(())
}

/// The progress of the merge running on `origin`.
pub fn merge_progress(reg: &Registry, origin: &str) -> Result<MergeProgress, SnapshotOpError> {
    if single_target(reg, origin, "snapshot-merge").is_none() {
        return Err(SnapshotOpError::NotApplicable {
            name: origin.into(),
            problem: "is not merging a snapshot".into(),
        });
    }
    let status = reg.status(origin, TableSlot::Live)?;
    let args = status.trim_end().splitn(4, ' ').nth(3).unwrap_or("").to_string();
    let parsed = args.split_once('/').and_then(|(a, rest)| {
        let mut it = rest.split(' ');
        Some((a.parse().ok()?, it.next()?.parse().ok()?, it.next()?.parse().ok()?))
    });
    let Some((allocated, total, metadata)) = parsed else {
        return Err(SnapshotOpError::NotApplicable {
            name: origin.into(),
            problem: format!("merge status is `{args}`"),
        });
    };
    Ok(MergeProgress { allocated, metadata, total, done: allocated == metadata })
}

/// After a completed merge: the origin gets `snapshot-origin` (other snapshots remain)
/// or its plain table back, and the merged snapshot's devices are removed.
pub fn finish_merge(reg: &Registry, origin: &str) -> Result<(), SnapshotOpError> {
    let progress = merge_progress(reg, origin)?;
    if !progress.done {
        return Err(SnapshotOpError::NotApplicable {
            name: origin.into(),
            problem: format!("merge still running ({}/{} {})", progress.allocated, progress.total, progress.metadata),
        });
    }
    let line = single_target(reg, origin, "snapshot-merge").expect("checked by merge_progress");
    let real = line.args[0].clone();
    let snapshot = line.args[1].strip_suffix("-cow").unwrap_or(&line.args[1]).to_string();
    let size = reg.device(origin)?.info().sectors;
    let others = snapshots_of(reg, &real);
    let plain =
        if others.is_empty() { reg.table(&real, TableSlot::Live)? } else { format!("0 {size} snapshot-origin {real}") };
    reg.load(origin, &plain)?;
    reg.suspend(origin, SuspendFlags::default())?;
    reg.resume(origin)?;
    if reg.mapped_device(&snapshot).is_ok() {
        reg.remove(&snapshot, false)?;
    }
    remove_cow(reg, &snapshot)?;
    if others.is_empty() {
        reg.remove(&real, false)?;
    }
    tracing::info!("merge of {snapshot} into {origin} finished");
    Ok(())
}
