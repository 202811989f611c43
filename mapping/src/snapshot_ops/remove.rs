//! `udm snapshot remove <name>`: drops a snapshot and its COW device. Removing the last
//! snapshot of an origin gives the origin its plain table back and removes
//! `<origin>-real` (as `lvremove`).

use crate::registry::{Registry, SuspendFlags, TableSlot};
use crate::snapshot_ops::{cow_name, origin_of, real_name, snapshots_of, SnapshotOpError};

/// Removes snapshot `name` (a `snapshot` device made by [`crate::snapshot_ops::create`]).
pub fn remove(reg: &Registry, name: &str) -> Result<(), SnapshotOpError> {
    if let Some(merge) = crate::snapshot_ops::list(reg).into_iter().find(|s| s.merging && s.name == name) {
        return Err(SnapshotOpError::NotApplicable {
            name: name.into(),
            problem: format!(
                "is being merged into `{}` ({} of its COW left, see `udm snapshot list`): it is removed when the \
                 merge completes; removing it now would leave the origin half rolled back",
                merge.origin,
                merge.data_percent() + "%"
            ),
        });
    }
    let (origin, _) = origin_of(reg, name)?;
    let real = real_name(&origin);
    let last = snapshots_of(reg, &real).len() == 1;
    let origin_exists = reg.mapped_device(&origin).is_ok();
    if origin_exists && last {
        // Stage the plain table first, so a refusal changes nothing.
        reg.load(&origin, &reg.table(&real, TableSlot::Live)?)?;
    }
    if origin_exists {
        reg.suspend(&origin, SuspendFlags::default())?;
    }
    let removed = reg.remove(name, false);
    if let Err(e) = removed {
        if origin_exists {
            if last {
                let _ = reg.clear(&origin);
            }
            let _ = reg.resume(&origin);
        }
        return Err(e.into());
    }
    if origin_exists {
        reg.resume(&origin)?;
    }
    remove_cow(reg, name)?;
    if last && (!origin_exists || reg.remove(&real, false).is_ok()) {
        tracing::info!("snapshot {name} removed; {origin} has no snapshots left");
    } else {
        tracing::info!("snapshot {name} removed");
    }
    Ok(())
}

/// Removes `<name>-cow` and the backends `create`/`extend` registered for it.
pub(crate) fn remove_cow(reg: &Registry, name: &str) -> Result<(), SnapshotOpError> {
    let cow = cow_name(name);
    let table = reg.table(&cow, TableSlot::Live).unwrap_or_default();
    reg.remove(&cow, false)?;
    let own = format!("{name}-cowdev");
    for dev in table.lines().filter_map(|l| l.split_whitespace().nth(3)) {
        if dev.strip_prefix(&own).is_some_and(|n| n.chars().all(|c| c.is_ascii_digit())) {
            reg.remove(dev, false)?;
        }
    }
    Ok(())
}
