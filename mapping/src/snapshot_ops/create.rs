//! `udm snapshot create <origin> <name> --cow <device|spec|size> --chunk <size>`, in the
//! order `lvcreate -s` uses (spec/device-mapper.md §3.6, §6):
//!
//! 1. first snapshot only: `<origin>-real` gets the origin's table; `<origin>` gets a
//!    staged `snapshot-origin <origin>-real`;
//! 2. `<name>-cow` is created over the COW space and its first chunk zeroed (so an old
//!    header is never mistaken for this snapshot's);
//! 3. `<name>` is created with its `snapshot` table loaded (this initialises the COW);
//! 4. `<origin>` is suspended (in-flight writes drain), then `<name>` and `<origin>` are
//!    resumed: from here on every origin write copies out.

use udm_drivers::backend_spec::BackendSpec;
use udm_drivers::units::parse_size;

use crate::registry::{Registry, SuspendFlags, TableSlot};
use crate::snapshot_ops::{cow_name, live_lines, real_name, single_target, SnapshotOpError};

/// Where a new snapshot's COW store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CowSource {
    /// Sectors of a device the registry knows (a backend or a mapped device).
    Device {
        /// Its name.
        name: String,
        /// First sector used.
        offset: u64,
        /// Sectors used (`None`: to the end of the device).
        sectors: Option<u64>,
    },
    /// A new backend from a specification (`mem:64M`, `file:/var/lib/udm/snap.cow`),
    /// registered as `<snapshot>-cowdev`.
    Backend(String),
}

impl CowSource {
    /// Reads `--cow`: a backend spec (`kind:...`), a bare size (a RAM COW of that size),
    /// or the name of a device the registry knows.
    pub fn parse(text: &str) -> Self {
        if BackendSpec::parse(text).is_ok() {
            return CowSource::Backend(text.to_string());
        }
        if parse_size(text).is_ok() {
            return CowSource::Backend(format!("mem:{text}"));
        }
        CowSource::Device { name: text.to_string(), offset: 0, sectors: None }
    }
}

/// What `create` needs besides the names.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// The COW space.
    pub cow: CowSource,
    /// Chunk size in sectors (LVM: 8..=1024, a power of two; default 8).
    pub chunk_sectors: u64,
    /// `P` (LVM always uses it) or `N`.
    pub persistent: bool,
}

/// Undo steps, run in reverse if a later step fails.
enum Undo {
    Remove(String),
    ClearInactive(String),
}

/// Creates snapshot `name` of the mapped device `origin`. See the module documentation.
pub fn create(reg: &Registry, origin: &str, name: &str, opts: &CreateOptions) -> Result<(), SnapshotOpError> {
    let chunk = opts.chunk_sectors;
    if !chunk.is_power_of_two() || !(8..=1024).contains(&chunk) {
        return Err(SnapshotOpError::NotApplicable {
            name: name.into(),
            problem: format!("chunk size {chunk} sectors: use a power of two from 8 (4 KiB) to 1024 (512 KiB)"),
        });
    }
    let mut undo = Vec::new();
    let result = build(reg, origin, name, opts, &mut undo);
    if result.is_err() {
        for step in undo.into_iter().rev() {
            let _ = match step {
                Undo::Remove(dev) => reg.remove(&dev, false),
                Undo::ClearInactive(dev) => reg.clear(&dev),
            };
        }
        if reg.mapped_device(origin).is_ok_and(|d| d.is_suspended()) {
            let _ = reg.resume(origin);
        }
    }
    result
}

fn build(
    reg: &Registry,
    origin: &str,
    name: &str,
    opts: &CreateOptions,
    undo: &mut Vec<Undo>,
) -> Result<(), SnapshotOpError> {
    let lines = live_lines(reg, origin)?;
    let size: u64 = lines.iter().map(|l| l.length).sum();
    let real = real_name(origin);
    let first = single_target(reg, origin, "snapshot-origin").is_none();
    if first {
        if lines.iter().any(|l| l.target.starts_with("snapshot")) {
            return Err(SnapshotOpError::NotApplicable {
                name: origin.into(),
                problem: "is a snapshot or is merging: snapshots of snapshots are not supported".into(),
            });
        }
        reg.create(&real, None, Some(&reg.table(origin, TableSlot::Live)?))?;
        undo.push(Undo::Remove(real.clone()));
        reg.load(origin, &format!("0 {size} snapshot-origin {real}"))?;
        undo.push(Undo::ClearInactive(origin.to_string()));
    }

    let (cow_dev, offset, sectors) = match &opts.cow {
        CowSource::Device { name: dev, offset, sectors } => {
            let total = reg.device(dev)?.info().sectors;
            let sectors = sectors.unwrap_or(total.saturating_sub(*offset));
            (dev.clone(), *offset, sectors)
        }
        CowSource::Backend(spec) => {
            let device = BackendSpec::parse(spec)
                .and_then(|s| s.open())
                .map_err(|e| SnapshotOpError::BadCow { name: name.into(), problem: e.to_string() })?;
            let dev = format!("{name}-cowdev");
            let sectors = device.info().sectors;
            reg.register_backend(&dev, device)?;
            undo.push(Undo::Remove(dev.clone()));
            (dev, 0, sectors)
        }
    };
    let needed = 2 * opts.chunk_sectors + opts.chunk_sectors;
    if sectors < needed {
        return Err(SnapshotOpError::BadCow {
            name: name.into(),
            problem: format!("{sectors} sectors is too small: a COW needs at least {needed} at this chunk size"),
        });
    }
    let cow = cow_name(name);
    reg.create(&cow, None, Some(&format!("0 {sectors} linear {cow_dev} {offset}")))?;
    undo.push(Undo::Remove(cow.clone()));
    // LVM zeroes the start of a fresh COW so that no stale header is read as this
    // snapshot's store.
    let zero = vec![0u8; (opts.chunk_sectors * 512) as usize];
    crate::sync_io::write(reg.device(&cow)?.as_ref(), 0, &zero, true)
        .map_err(|e| SnapshotOpError::BadCow { name: name.into(), problem: format!("zeroing its header: {e}") })?;

    let mode = if opts.persistent { "P" } else { "N" };
    reg.create(name, None, None)?;
    undo.push(Undo::Remove(name.to_string()));
    reg.load(name, &format!("0 {size} snapshot {real} {cow} {mode} {}", opts.chunk_sectors))?;

    reg.suspend(origin, SuspendFlags::default())?;
    reg.resume(name)?;
    reg.resume(origin)?;
    tracing::info!("snapshot {name} of {origin} created ({sectors} sectors of COW on {cow_dev})");
    Ok(())
}
