//! `udm snapshot create <origin> <name> --cow <device|spec|size> --chunk <size>`, in the
//! order `lvcreate -s` uses (spec/device-mapper.md §3.6, §6):
//!
//! 1. first snapshot only: `<origin>-real` gets the origin's table; `<origin>` gets a
//!    staged `snapshot-origin <origin>-real`;
//! 2. `<name>-cow` is created over the COW space and what it holds is inspected (see
//!    below);
//! 3. `<name>` is created with its `snapshot` table loaded (this initialises a blank COW,
//!    or re-attaches the store on it);
//! 4. `<origin>` is suspended (in-flight writes drain), then `<name>` and `<origin>` are
//!    resumed: from here on every origin write copies out.
//!
//! What a COW already holds is never lost by accident ([`ExistingCow`]): like the
//! kernel, only a COW whose header is zero is initialised; a valid store is re-attached
//! when the caller declares that snapshot (`udm serve` rebuilding a `[[snapshot]]`), and
//! anything else is refused unless the caller asks to re-initialise it.

use udm_drivers::backend_spec::BackendSpec;
use udm_drivers::units::parse_size;
use udm_drivers::SECTOR_SIZE;

use crate::exception_store::format::check_chunk_for_devices;
use crate::exception_store::probe::{self, CowContents};
use crate::io_buf::IoBuf;

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

/// What `create` does with a COW that is not blank (its header magic is not zero).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExistingCow {
    /// A new snapshot (`udm snapshot create`): anything on the COW is refused, naming
    /// what it holds.
    #[default]
    Refuse,
    /// A new snapshot over whatever the COW holds (`udm snapshot create --reinit`): its
    /// first chunk is zeroed and the store initialised afresh.
    Reinit,
    /// A declared snapshot coming back (`udm serve` with a `[[snapshot]]`): a valid
    /// store of the declared chunk size is re-attached with its exceptions; anything
    /// else (another chunk size, an invalidated store, other data) is refused.
    Attach,
    /// As `Attach`, but what cannot be re-attached is re-initialised instead of refused
    /// (`reinit = true` on the `[[snapshot]]`). A valid store is still re-attached, so
    /// leaving the flag set never discards a healthy snapshot.
    AttachOrReinit,
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
    /// What to do with a COW that already holds something.
    pub existing: ExistingCow,
}

/// What `create` made of the COW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// A new store (the COW was blank, re-initialised on request, or transient).
    New,
    /// The store on the COW was re-attached.
    Attached {
        /// Its exceptions.
        exceptions: usize,
        /// A merge of it into the origin began and did not finish: the caller should
        /// merge it again ([`crate::snapshot_ops::merge`]) once its other snapshots of
        /// the origin exist.
        merging: bool,
    },
}

/// Undo steps, run in reverse if a later step fails.
enum Undo {
    Remove(String),
    ClearInactive(String),
}

/// Creates snapshot `name` of the mapped device `origin`. See the module documentation.
pub fn create(reg: &Registry, origin: &str, name: &str, opts: &CreateOptions) -> Result<Created, SnapshotOpError> {
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
) -> Result<Created, SnapshotOpError> {
    let lines = live_lines(reg, origin)?;
    let size: u64 = lines.iter().map(|l| l.length).sum();
    let real = real_name(origin);
    let first = single_target(reg, origin, "snapshot-origin").is_none();
    if first {
        if let Some(merge) = lines.iter().find(|l| l.target == "snapshot-merge") {
            let cow = merge.args.get(1).map_or("", String::as_str);
            return Err(SnapshotOpError::NotApplicable {
                name: origin.into(),
                problem: format!(
                    "is merging the snapshot on `{cow}`: take a new snapshot once the merge completes (its progress \
                     is in `udm snapshot list`)"
                ),
            });
        }
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
    let devices = [
        (real.as_str(), reg.device(&real)?.info().logical_block_size),
        (cow.as_str(), reg.device(&cow)?.info().logical_block_size),
    ];
    check_chunk_for_devices(opts.chunk_sectors, &devices)
        .map_err(|problem| SnapshotOpError::NotApplicable { name: name.into(), problem })?;
    let created = if opts.persistent { prepare_cow(reg, name, &cow, size, opts)? } else { Created::New };

    let mode = if opts.persistent { "P" } else { "N" };
    reg.create(name, None, None)?;
    undo.push(Undo::Remove(name.to_string()));
    reg.load(name, &format!("0 {size} snapshot {real} {cow} {mode} {}", opts.chunk_sectors))?;

    reg.suspend(origin, SuspendFlags::default())?;
    reg.resume(name)?;
    reg.resume(origin)?;
    match created {
        Created::New => tracing::info!("snapshot {name} of {origin} created ({sectors} sectors of COW on {cow_dev})"),
        Created::Attached { exceptions, .. } => {
            tracing::info!("snapshot {name} of {origin} re-attached with {exceptions} exceptions from {cow_dev}")
        }
    }
    Ok(created)
}

/// Looks at what the COW `cow` holds and decides, by `opts.existing`, whether to use it
/// as it is (a blank COW, or a store to re-attach), zero its header so the snapshot
/// table initialises it afresh, or refuse. `origin_sectors` bounds the store's entries.
fn prepare_cow(
    reg: &Registry,
    name: &str,
    cow: &str,
    origin_sectors: u64,
    opts: &CreateOptions,
) -> Result<Created, SnapshotOpError> {
    let bad = |problem: String| SnapshotOpError::BadCow { name: name.into(), problem };
    let device = reg.device(cow)?;
    let info = device.info();
    let contents = {
        let mut queue = device.open_queue(4).map_err(|e| bad(format!("cannot open a queue on it: {e}")))?;
        probe::inspect(queue.as_mut(), &info, origin_sectors).map_err(|e| bad(e.to_string()))?
    };
    let declared = matches!(opts.existing, ExistingCow::Attach | ExistingCow::AttachOrReinit);
    let where_ = describe(&opts.cow);
    // How to ask for a re-initialisation, in the words of whoever asked for the snapshot.
    let reinit = if declared { "`reinit = true` on its [[snapshot]] (--reinit with --attach)" } else { "--reinit" };
    let refusal = match contents {
        CowContents::Blank => return Ok(Created::New),
        CowContents::Store(s) if declared && s.valid && s.chunk_sectors == opts.chunk_sectors => {
            return Ok(Created::Attached { exceptions: s.exceptions, merging: s.merging });
        }
        CowContents::Store(s) if declared && !s.valid => format!(
            "{where_} holds an invalidated snapshot store ({}): that snapshot is lost. Remove the snapshot, or set \
             {reinit} to start it afresh",
            s.describe()
        ),
        CowContents::Store(s) if declared => format!(
            "{where_} holds a snapshot store with chunk {} KiB, but chunk {} KiB was asked for: ask for chunk \
             \"{}k\" to re-attach it, or set {reinit} to discard its {} exceptions",
            s.chunk_sectors / 2,
            opts.chunk_sectors / 2,
            s.chunk_sectors / 2,
            s.exceptions
        ),
        CowContents::Store(s) => format!(
            "{where_} already holds a snapshot store ({}): a new snapshot on it would discard them. Use another COW, \
             pass --attach to re-attach that snapshot as it is, or --reinit to re-initialise it",
            s.describe()
        ),
        CowContents::Unusable(why) => format!(
            "{where_} is neither blank nor a usable snapshot store ({why}); it may hold other data. Check the COW, or \
             set {reinit} to overwrite its first chunk with a new store"
        ),
    };
    if !matches!(opts.existing, ExistingCow::Reinit | ExistingCow::AttachOrReinit) {
        return Err(bad(refusal));
    }
    tracing::warn!("re-initialising the COW of snapshot {name} as asked; it was refused as it was: {refusal}");
    // The snapshot table initialises a COW whose header is zero (as the kernel does).
    let zero = IoBuf::new((opts.chunk_sectors * SECTOR_SIZE) as usize)
        .map_err(|e| bad(format!("allocating a buffer to zero its header: {e}")))?;
    crate::sync_io::write(device.as_ref(), 0, zero.as_slice(), true)
        .map_err(|e| bad(format!("zeroing its header: {e}")))?;
    Ok(Created::New)
}

/// The COW as the user named it, for messages.
fn describe(cow: &CowSource) -> String {
    match cow {
        CowSource::Backend(spec) => format!("`{spec}`"),
        CowSource::Device { name, offset: 0, .. } => format!("device `{name}`"),
        CowSource::Device { name, offset, .. } => format!("device `{name}` from sector {offset}"),
    }
}
