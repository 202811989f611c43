//! A built table: immutable segments, each one constructed target, and what the data
//! path needs precomputed (the distinct devices below, flush fan-out, geometry).

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use udm_drivers::{BlockDevice, DeviceInfo, MemoryRegion};

use crate::segment_index::SegmentIndex;
use crate::table_text::format_line;
use crate::target::{DeviceId, FlushPolicy, SharedName, Target, TargetDevice};

/// One segment: a target over `[start, start + length)`.
pub(crate) struct Segment {
    pub start: u64,
    pub length: u64,
    pub target: Arc<dyn Target>,
    /// The devices the target opened, by [`crate::target::DevIndex`].
    pub devices: Vec<TargetDevice>,
    /// `DevIndex` -> index into [`Table::devices`] (= the mapped queue's child index).
    pub dev_map: Box<[u32]>,
    /// The target's split boundary in sectors (0: none); refreshed after each resume.
    pub boundary: AtomicU64,
    /// Longest read or write piece the segment's devices take, in sectors: their
    /// smallest max transfer in whole logical blocks (`u64::MAX` without devices).
    /// Pieces are split to it, so a table reloaded over a device with a smaller max
    /// transfer than its clients were told (an export's config space cannot shrink
    /// under a running guest) still hands that device only what it takes.
    pub max_sectors: u64,
}

/// What the data path reads of a segment for every request, packed so that finding the
/// segment and remapping a pass-through read or write touches one cache line and calls
/// nothing through a vtable.
#[derive(Debug, Clone, Copy)]
#[repr(align(32))]
pub(crate) struct HotSegment {
    pub start: u64,
    /// One past the last sector.
    pub end: u64,
    /// Device sector minus mapped sector (wrapping) of direct reads and writes.
    pub shift: u64,
    /// Child queue (index into [`Table::devices`]) of direct reads and writes, or
    /// [`NOT_DIRECT`] when the target maps them itself.
    pub child: u32,
    /// [`Segment::max_sectors`], saturated: longer direct requests take the general
    /// path, which splits them.
    pub max_sectors: u32,
}

/// [`HotSegment::child`] of a segment without [`crate::target::Target::direct_remap`].
pub(crate) const NOT_DIRECT: u32 = u32::MAX;

/// A device below the table, once however many segments use it.
pub(crate) struct TableDevice {
    pub id: DeviceId,
    pub name: SharedName,
    pub device: Arc<dyn BlockDevice>,
}

/// An immutable table. Shared by the registry and every queue that uses it.
pub struct Table {
    index: SegmentIndex,
    pub(crate) hot: Box<[HotSegment]>,
    /// Logical block size in sectors, minus one: direct requests must be aligned to it.
    pub(crate) block_mask: u64,
    pub(crate) segments: Box<[Segment]>,
    pub(crate) devices: Box<[TableDevice]>,
    /// Children to flush once each on a flush of the mapped device.
    pub(crate) flush_children: Box<[u32]>,
    /// (segment, flush index) pairs for targets with [`FlushPolicy::Map`].
    pub(crate) flush_maps: Box<[(u32, u32)]>,
    pub(crate) info: DeviceInfo,
}

/// One target line before it becomes part of a table.
pub(crate) struct BuiltSegment {
    pub start: u64,
    pub length: u64,
    pub target: Arc<dyn Target>,
    pub devices: Vec<TargetDevice>,
}

/// A device's max transfer in sectors, rounded down to whole logical blocks (at least one).
fn max_piece_sectors(info: &DeviceInfo) -> u64 {
    let block = u64::from(info.logical_block_size.max(512));
    (u64::from(info.max_transfer) / block).max(1) * block / udm_drivers::SECTOR_SIZE
}

impl Table {
    /// Assembles constructed segments (already checked contiguous from 0).
    pub(crate) fn new(built: Vec<BuiltSegment>) -> Table {
        let mut devices: Vec<TableDevice> = Vec::new();
        let mut segments = Vec::with_capacity(built.len());
        let mut hot = Vec::with_capacity(built.len());
        let mut flush_children: Vec<u32> = Vec::new();
        let mut flush_maps = Vec::new();
        let mut info = DeviceInfo::new(0, 512);
        info.supports_discard = true;
        info.supports_write_zeroes = true;
        info.max_discard_sectors = u64::MAX;
        info.max_transfer = u32::MAX;
        info.max_segments = u32::MAX;
        let mut any_device = false;
        for (seg_idx, b) in built.into_iter().enumerate() {
            let mut dev_map = Vec::with_capacity(b.devices.len());
            for d in &b.devices {
                let idx = match devices.iter().position(|x| x.id == d.id()) {
                    Some(i) => i,
                    None => {
                        devices.push(TableDevice { id: d.id(), name: name_of(d), device: Arc::clone(d.device()) });
                        let di = d.info();
                        any_device = true;
                        info.logical_block_size = info.logical_block_size.max(di.logical_block_size);
                        info.physical_block_size = info.physical_block_size.max(di.physical_block_size);
                        info.max_transfer = info.max_transfer.min(di.max_transfer);
                        info.max_segments = info.max_segments.min(di.max_segments);
                        info.volatile_cache |= di.volatile_cache;
                        info.max_discard_sectors = info.max_discard_sectors.min(di.max_discard_sectors);
                        devices.len() - 1
                    }
                };
                dev_map.push(idx as u32);
            }
            match b.target.flush_policy() {
                FlushPolicy::None => {}
                FlushPolicy::AllDevices => {
                    for &c in &dev_map {
                        if !flush_children.contains(&c) {
                            flush_children.push(c);
                        }
                    }
                }
                FlushPolicy::Map(n) => flush_maps.extend((0..n).map(|i| (seg_idx as u32, i))),
            }
            let caps = b.target.caps();
            info.supports_discard &= caps.discard;
            info.supports_write_zeroes &= caps.write_zeroes;
            info.sectors = b.start + b.length;
            let boundary = b.target.split_boundary().map_or(0, NonZeroU64::get);
            let max_sectors = b.devices.iter().map(|d| max_piece_sectors(d.info())).min().unwrap_or(u64::MAX);
            let direct = b.target.direct_remap().filter(|d| boundary == 0 && (d.dev.0 as usize) < dev_map.len());
            hot.push(HotSegment {
                start: b.start,
                end: b.start + b.length,
                shift: direct.map_or(0, |d| d.start.wrapping_sub(b.start)),
                child: direct.map_or(NOT_DIRECT, |d| dev_map[d.dev.0 as usize]),
                max_sectors: u32::try_from(max_sectors).unwrap_or(u32::MAX),
            });
            segments.push(Segment {
                start: b.start,
                length: b.length,
                target: b.target,
                devices: b.devices,
                dev_map: dev_map.into_boxed_slice(),
                boundary: AtomicU64::new(boundary),
                max_sectors,
            });
        }
        if !any_device {
            info.max_transfer = 4 << 20;
            info.max_segments = 256;
        }
        if !info.supports_discard && !info.supports_write_zeroes {
            info.max_discard_sectors = 0;
        } else if info.max_discard_sectors == u64::MAX {
            info.max_discard_sectors = u32::MAX as u64;
        }
        let index = SegmentIndex::new(segments.iter().map(|s| s.start).collect());
        Table {
            index,
            hot: hot.into_boxed_slice(),
            block_mask: block_mask(info.logical_block_size),
            segments: segments.into_boxed_slice(),
            devices: devices.into_boxed_slice(),
            flush_children: flush_children.into_boxed_slice(),
            flush_maps: flush_maps.into_boxed_slice(),
            info,
        }
    }

    /// The segment holding `sector` (which must be below [`Table::sectors`]): a
    /// two-level binary search over the segment starts (see `segment_index`).
    #[inline]
    pub fn lookup(&self, sector: u64) -> usize {
        self.index.find(sector)
    }

    /// Size in sectors: the sum of the segment lengths.
    pub fn sectors(&self) -> u64 {
        self.info.sectors
    }

    /// Number of segments (table lines).
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    /// Whether the table has no segments (never true for a loaded table).
    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    /// Geometry and capabilities of a device with this table live.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The table as `dmsetup table` prints it: one `<start> <length> <type> <args>` line
    /// per segment, each ending in `\n`. Devices print by udm name.
    pub fn table_text(&self) -> String {
        let mut out = String::new();
        for s in self.segments.iter() {
            out.push_str(&format_line(s.start, s.length, s.target.type_name(), &s.target.table_args()));
            out.push('\n');
        }
        out
    }

    /// The table's status as `dmsetup status` prints it.
    pub fn status_text(&self) -> String {
        let mut out = String::new();
        for s in self.segments.iter() {
            out.push_str(&format_line(s.start, s.length, s.target.type_name(), &s.target.status_args()));
            out.push('\n');
        }
        out
    }

    /// The names of the devices below, in first-use order (`dmsetup deps`).
    pub fn dependency_names(&self) -> Vec<String> {
        self.devices.iter().map(|d| d.name.get()).collect()
    }

    pub(crate) fn dependency_ids(&self) -> impl Iterator<Item = DeviceId> + '_ {
        self.devices.iter().map(|d| d.id)
    }

    /// Re-reads every target's split boundary (after a resume).
    pub(crate) fn refresh_boundaries(&self) {
        for s in self.segments.iter() {
            s.boundary.store(s.target.split_boundary().map_or(0, NonZeroU64::get), Ordering::Relaxed);
        }
    }

    pub(crate) fn for_each_target(&self, mut f: impl FnMut(&dyn Target)) {
        for s in self.segments.iter() {
            f(s.target.as_ref());
        }
    }

    /// Registers `region` with every device below.
    pub(crate) fn register_memory(&self, region: MemoryRegion) -> Result<(), udm_drivers::DeviceError> {
        for d in self.devices.iter() {
            d.device.register_memory(region)?;
        }
        Ok(())
    }

    /// Unregisters `region` from every device below.
    pub(crate) fn unregister_memory(&self, region: MemoryRegion) -> Result<(), udm_drivers::DeviceError> {
        for d in self.devices.iter() {
            d.device.unregister_memory(region)?;
        }
        Ok(())
    }
}

/// `block sectors - 1` for a power-of-two block size; otherwise all ones, which sends
/// every request down the general path (it validates with a division).
fn block_mask(logical_block_size: u32) -> u64 {
    let sectors = u64::from(logical_block_size / 512).max(1);
    if sectors.is_power_of_two() {
        sectors - 1
    } else {
        u64::MAX
    }
}

fn name_of(d: &TargetDevice) -> SharedName {
    d.shared_name()
}

impl std::fmt::Debug for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").field("segments", &self.segments.len()).field("sectors", &self.info.sectors).finish()
    }
}
