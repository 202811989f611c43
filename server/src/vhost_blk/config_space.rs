//! The virtio-blk configuration space (virtio 1.2 section 5.2.4) built from a device's
//! [`DeviceInfo`], serialised little-endian at the offsets of `struct virtio_blk_config`.

use std::mem::{offset_of, size_of};

use udm_drivers::{DeviceInfo, SECTOR_SIZE};
use virtio_bindings::virtio_blk::virtio_blk_config as Raw;

/// Limits the export puts in config space and enforces on every request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Most data segments in one request (`seg_max`).
    pub seg_max: u32,
    /// Largest single segment in bytes (`size_max`).
    pub size_max: u32,
    /// Largest read or write in bytes: `seg_max * size_max` never exceeds the device's
    /// max transfer, so a driver that obeys the config never sends more.
    pub max_transfer: u32,
    /// Largest discard or write-zeroes, in sectors.
    pub max_discard_sectors: u32,
    /// The export refuses writes.
    pub read_only: bool,
    /// Logical block size in bytes.
    pub block_size: u32,
}

/// Data segments per request: 128 descriptors minus header and status, like QEMU's
/// default queue layout (a 128-entry indirect table).
pub const SEG_MAX: u32 = 126;

impl Limits {
    /// Limits for a device, optionally forced read-only by the export.
    pub fn new(info: &DeviceInfo, read_only: bool) -> Self {
        let max_transfer = info.max_transfer.max(4096);
        // virtio-blk has no field for the largest request: a driver (Linux) builds
        // requests of up to seg_max segments of size_max bytes each. Segments are at
        // least a page, so a device taking less than SEG_MAX pages per request (an SSD
        // with a 128 KiB MDTS) must get fewer segments.
        let seg_max = SEG_MAX.min(info.max_segments.max(1)).min(max_transfer / 4096);
        // Whole pages per segment, so any page-sized guest buffer fits in one segment.
        let size_max = ((max_transfer / seg_max) / 4096 * 4096).max(4096);
        Limits {
            capacity: info.sectors,
            seg_max,
            size_max,
            max_transfer: (seg_max * size_max).min(max_transfer),
            max_discard_sectors: u32::try_from(info.max_discard_sectors).unwrap_or(u32::MAX).min(u32::MAX >> 1),
            read_only: read_only || info.read_only,
            block_size: info.logical_block_size,
        }
    }
}

/// Bytes of config space udm serves (the whole struct, zoned fields zero).
pub const CONFIG_SPACE_LEN: usize = size_of::<Raw>();

/// The config space for `limits` with `num_queues` request queues.
pub fn config_space(info: &DeviceInfo, limits: &Limits, num_queues: u16) -> [u8; CONFIG_SPACE_LEN] {
    let mut c = [0u8; CONFIG_SPACE_LEN];
    let mut put = |off: usize, bytes: &[u8]| c[off..off + bytes.len()].copy_from_slice(bytes);
    put(offset_of!(Raw, capacity), &limits.capacity.to_le_bytes());
    put(offset_of!(Raw, size_max), &limits.size_max.to_le_bytes());
    put(offset_of!(Raw, seg_max), &limits.seg_max.to_le_bytes());
    put(offset_of!(Raw, blk_size), &limits.block_size.to_le_bytes());
    let exp = (info.physical_block_size / limits.block_size.max(1)).max(1).trailing_zeros() as u8;
    put(offset_of!(Raw, physical_block_exp), &[exp]);
    let min_io = (info.physical_block_size / limits.block_size.max(1)).max(1) as u16;
    put(offset_of!(Raw, min_io_size), &min_io.to_le_bytes());
    let opt_io = limits.max_transfer / limits.block_size.max(1);
    put(offset_of!(Raw, opt_io_size), &opt_io.to_le_bytes());
    put(offset_of!(Raw, num_queues), &num_queues.to_le_bytes());
    put(offset_of!(Raw, max_discard_sectors), &limits.max_discard_sectors.to_le_bytes());
    put(offset_of!(Raw, max_discard_seg), &1u32.to_le_bytes());
    let align = (u64::from(limits.block_size) / SECTOR_SIZE) as u32;
    put(offset_of!(Raw, discard_sector_alignment), &align.to_le_bytes());
    put(offset_of!(Raw, max_write_zeroes_sectors), &limits.max_discard_sectors.to_le_bytes());
    put(offset_of!(Raw, max_write_zeroes_seg), &1u32.to_le_bytes());
    put(offset_of!(Raw, write_zeroes_may_unmap), &[1]);
    c
}

/// The window `[offset, offset + size)` of `space`, zero-padded past its end (front ends
/// ask for the config struct of their own header version, which may be longer).
pub fn read_window(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(space.len());
    let end = (offset as usize).saturating_add(size as usize).min(space.len());
    out[..end - start].copy_from_slice(&space[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_land_at_the_kernel_offsets() {
        let info = DeviceInfo::new(2048, 4096);
        let limits = Limits::new(&info, false);
        let c = config_space(&info, &limits, 4);
        assert_eq!(u64::from_le_bytes(c[0..8].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 4096);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 8);
        assert!(limits.seg_max * limits.size_max <= info.max_transfer);
        assert!(limits.size_max >= 4096);
        assert_eq!(read_window(&c, 0, 8), c[0..8].to_vec());
        assert_eq!(read_window(&c, 90, 10)[6..], [0, 0, 0, 0]);
        assert_eq!(read_window(&c, 1000, 4), vec![0; 4]);
    }

    /// Whatever the device's limits, the largest request a driver may build from the
    /// config space (seg_max segments of size_max) is one the device takes, and the
    /// limits still allow at least one page per request.
    #[test]
    fn a_driver_obeying_the_config_never_exceeds_the_device_max_transfer() {
        for max_transfer in (4096..=8 << 20).step_by(4096 * 7).chain([128 << 10, 256 << 10, 504 << 10, 4096 + 512]) {
            for max_segments in [1, 2, 17, 32, 126, 128, 256, u32::MAX] {
                let mut info = DeviceInfo::new(1 << 20, 512);
                info.max_transfer = max_transfer;
                info.max_segments = max_segments;
                let l = Limits::new(&info, false);
                let largest = u64::from(l.seg_max) * u64::from(l.size_max);
                assert!(largest <= u64::from(max_transfer), "{max_transfer} {max_segments}: {l:?}");
                assert!(largest <= u64::from(l.max_transfer), "{l:?}");
                assert!(l.seg_max >= 1 && l.seg_max <= max_segments && l.size_max >= 4096, "{l:?}");
            }
        }
        // A 128 KiB device: 32 page-sized segments, where 126 were offered before.
        let mut info = DeviceInfo::new(1 << 20, 512);
        info.max_transfer = 128 << 10;
        assert_eq!((Limits::new(&info, false).seg_max, Limits::new(&info, false).size_max), (32, 4096));
    }
}
