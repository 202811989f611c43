//! `udm snapshot extend <name> --cow <more>`: grows a snapshot's COW store online by
//! reloading `<name>-cow` with one more linear segment. The snapshot sees the new size
//! at its next allocation (and in its status), as the kernel reads the COW's size.

use crate::registry::{Registry, SuspendFlags, TableSlot};
use crate::snapshot_ops::create::CowSource;
use crate::snapshot_ops::{cow_name, origin_of, SnapshotOpError};
use udm_drivers::backend_spec::BackendSpec;

/// Adds the space of `more` to snapshot `name`'s COW; returns the new COW size in
/// sectors.
pub fn extend(reg: &Registry, name: &str, more: &CowSource) -> Result<u64, SnapshotOpError> {
    origin_of(reg, name)?;
    let cow = cow_name(name);
    let table = reg.table(&cow, TableSlot::Live)?;
    let size: u64 = reg.device(&cow)?.info().sectors;
    let (dev, offset, sectors) = match more {
        CowSource::Device { name: dev, offset, sectors } => {
            let total = reg.device(dev)?.info().sectors;
            (dev.clone(), *offset, sectors.unwrap_or(total.saturating_sub(*offset)))
        }
        CowSource::Backend(spec) => {
            let device = BackendSpec::parse(spec)
                .and_then(|s| s.open())
                .map_err(|e| SnapshotOpError::BadCow { name: name.into(), problem: e.to_string() })?;
            let mut n = 1;
            let dev = loop {
                let candidate = format!("{name}-cowdev{n}");
                if reg.device(&candidate).is_err() {
                    break candidate;
                }
                n += 1;
            };
            let sectors = device.info().sectors;
            reg.register_backend(&dev, device)?;
            (dev, 0, sectors)
        }
    };
    if sectors == 0 {
        return Err(SnapshotOpError::BadCow { name: name.into(), problem: "the added space is empty".into() });
    }
    let new_table = format!("{}\n{size} {sectors} linear {dev} {offset}", table.trim_end());
    reg.load(&cow, &new_table)?;
    reg.suspend(&cow, SuspendFlags::default())?;
    reg.resume(&cow)?;
    let new_size = size + sectors;
    tracing::info!("COW of snapshot {name} extended to {new_size} sectors");
    Ok(new_size)
}
