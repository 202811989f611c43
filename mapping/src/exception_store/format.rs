//! The Linux dm-snapshot persistent COW layout (spec/device-mapper.md §4), as pure
//! arithmetic and byte codecs: no I/O here.
//!
//! ```text
//!  chunk 0      1          2 ..= E+1     E+2        E+3 ..= 2E+2   ...
//!  [header] [area 0] [E data chunks] [area 1] [E data chunks] ...
//! ```
//! `E = chunk_bytes / 16` entries per area; area `i` sits at chunk `1 + i*(E+1)`.

use crate::exception_store::error::StoreError;
use crate::exception_store::Exception;

/// `SnAp` read as a little-endian u32.
pub const SNAP_MAGIC: u32 = 0x7041_6E53;
/// The only on-disk version Linux (and udm) writes or reads.
pub const DISK_VERSION: u32 = 1;
/// Bytes per on-disk exception: `old_chunk` and `new_chunk`, both LE u64.
pub const ENTRY_BYTES: u64 = 16;
/// Largest chunk the kernel accepts: 2^21 sectors (1 GiB).
pub const MAX_CHUNK_SECTORS: u64 = 1 << 21;
/// The kernel's default chunk (16 KiB) when a table says `0`.
pub const DEFAULT_CHUNK_SECTORS: u64 = 32;

/// Checks a chunk size (in sectors) the way `dm_exception_store_set_chunk_size` does:
/// a power of two, a multiple of both devices' logical block sizes, at most 2^21.
pub fn check_chunk_sectors(chunk: u64, block_sectors: u64) -> Result<(), StoreError> {
    let reason = if chunk == 0 || !chunk.is_power_of_two() {
        "it is not a power of two"
    } else if chunk > MAX_CHUNK_SECTORS {
        "it is larger than 2^21 sectors (1 GiB)"
    } else if !chunk.is_multiple_of(block_sectors.max(1)) {
        "it is not a multiple of the devices' logical block size"
    } else {
        return Ok(());
    };
    Err(StoreError::BadChunkSize { chunk_sectors: chunk, reason })
}

/// Checks a snapshot's chunk size (in sectors) against the kernel's rules and against
/// the logical block size of each device it is used on (`(name, bytes)`): the origin and
/// the COW. The kernel refuses the same ("Chunk size is not a multiple of device
/// blocksize"): a smaller chunk makes every copy-out a partial block, which such a
/// device cannot write. The error says what to use instead.
pub fn check_chunk_for_devices(chunk: u64, devices: &[(&str, u32)]) -> Result<(), String> {
    check_chunk_sectors(chunk, 1).map_err(|e| format!("{e}: use a power of two such as 8 sectors (4 KiB)"))?;
    for (name, block_bytes) in devices {
        let block_sectors = u64::from(*block_bytes) / 512;
        if !chunk.is_multiple_of(block_sectors.max(1)) {
            return Err(format!(
                "chunk size {chunk} sectors ({} bytes) is not a multiple of the {block_bytes}-byte logical block                  size of `{name}` (the kernel refuses it too): use a chunk of at least {} KiB",
                chunk * 512,
                block_bytes / 1024
            ));
        }
    }
    Ok(())
}

/// Geometry of one persistent COW store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Chunk size in 512-byte sectors (a power of two).
    pub chunk_sectors: u64,
    /// COW device size in sectors.
    pub cow_sectors: u64,
}

impl Layout {
    /// Bytes per chunk.
    pub fn chunk_bytes(&self) -> usize {
        (self.chunk_sectors * 512) as usize
    }

    /// Exceptions per metadata area (E).
    pub fn exceptions_per_area(&self) -> u64 {
        self.chunk_sectors * 512 / ENTRY_BYTES
    }

    /// Chunk number of metadata area `area`.
    pub fn area_location(&self, area: u64) -> u64 {
        1 + area * (self.exceptions_per_area() + 1)
    }

    /// Whether COW chunk `chunk` is a metadata area.
    pub fn is_area_chunk(&self, chunk: u64) -> bool {
        chunk % (self.exceptions_per_area() + 1) == 1
    }

    /// Whole chunks on the COW device (a partial last chunk is never used).
    pub fn cow_chunks(&self) -> u64 {
        self.cow_sectors / self.chunk_sectors
    }

    /// Whether the whole of chunk `chunk` lies on the COW device.
    pub fn chunk_fits(&self, chunk: u64) -> bool {
        chunk < self.cow_chunks()
    }

    /// First sector of COW chunk `chunk`.
    pub fn chunk_to_sector(&self, chunk: u64) -> u64 {
        chunk * self.chunk_sectors
    }

    /// `next_free` moved past an area position, as the kernel's `skip_metadata`.
    pub fn skip_metadata(&self, next_free: u64) -> u64 {
        if self.is_area_chunk(next_free) {
            next_free + 1
        } else {
            next_free
        }
    }
}

/// Chunk 0 of a persistent COW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes 0..4: [`SNAP_MAGIC`], or 0 for a COW that was never initialised.
    pub magic: u32,
    /// Bytes 4..8: 1 = usable, 0 = invalidated for good.
    pub valid: u32,
    /// Bytes 8..12: [`DISK_VERSION`].
    pub version: u32,
    /// Bytes 12..16: chunk size in sectors.
    pub chunk_sectors: u32,
}

impl Header {
    /// The header the kernel writes for a new store.
    pub fn new(chunk_sectors: u64, valid: bool) -> Self {
        Header {
            magic: SNAP_MAGIC,
            valid: u32::from(valid),
            version: DISK_VERSION,
            chunk_sectors: chunk_sectors as u32,
        }
    }

    /// Decodes the first 16 bytes of chunk 0.
    pub fn decode(bytes: &[u8]) -> Self {
        Header {
            magic: le_u32(&bytes[0..4]),
            valid: le_u32(&bytes[4..8]),
            version: le_u32(&bytes[8..12]),
            chunk_sectors: le_u32(&bytes[12..16]),
        }
    }

    /// Writes the header into a whole zeroed chunk buffer, as the kernel does (the rest of
    /// chunk 0 stays zero).
    pub fn encode_chunk(&self, chunk: &mut [u8]) {
        chunk.fill(0);
        chunk[0..4].copy_from_slice(&self.magic.to_le_bytes());
        chunk[4..8].copy_from_slice(&self.valid.to_le_bytes());
        chunk[8..12].copy_from_slice(&self.version.to_le_bytes());
        chunk[12..16].copy_from_slice(&self.chunk_sectors.to_le_bytes());
    }
}

/// udm's mark, in chunk 0 right after the kernel's 16-byte header, that a merge of this
/// store into its origin has begun and not finished. The kernel never reads these bytes
/// (it keeps no merge state on disk: LVM remembers a merge in its own metadata and loads
/// `snapshot-merge` again at activation) and zeroes them whenever it writes the header,
/// so a store the kernel initialised or invalidated carries no mark. udm sets the mark
/// before a merge first writes the origin and clears it when nothing is left to merge,
/// so whoever builds the stack at the next start knows to merge again
/// (`snapshot_ops::create`).
pub const MERGE_MARK: [u8; 8] = *b"udmMERGE";
/// Where [`MERGE_MARK`] sits in chunk 0.
pub const MERGE_MARK_OFFSET: usize = 16;

/// Whether the first block of chunk 0 carries [`MERGE_MARK`].
pub fn merge_marked(header_block: &[u8]) -> bool {
    header_block.get(MERGE_MARK_OFFSET..MERGE_MARK_OFFSET + MERGE_MARK.len()) == Some(&MERGE_MARK[..])
}

/// Sets (or clears, to zeroes as the kernel leaves them) [`MERGE_MARK`] in the first
/// block of chunk 0.
pub fn set_merge_mark(header_block: &mut [u8], on: bool) {
    let mark = if on { MERGE_MARK } else { [0; 8] };
    header_block[MERGE_MARK_OFFSET..MERGE_MARK_OFFSET + MERGE_MARK.len()].copy_from_slice(&mark);
}

fn le_u32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn le_u64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b.try_into().expect("8 bytes"))
}

/// Entry `index` of an area image.
pub fn read_entry(area: &[u8], index: usize) -> Exception {
    let at = index * ENTRY_BYTES as usize;
    Exception { old_chunk: le_u64(&area[at..at + 8]), new_chunk: le_u64(&area[at + 8..at + 16]) }
}

/// Stores `e` as entry `index` of an area image.
pub fn write_entry(area: &mut [u8], index: usize, e: Exception) {
    let at = index * ENTRY_BYTES as usize;
    area[at..at + 8].copy_from_slice(&e.old_chunk.to_le_bytes());
    area[at + 8..at + 16].copy_from_slice(&e.new_chunk.to_le_bytes());
}

/// Builds an area image from its entries (in commit order); the rest is zero, so the
/// first unused slot terminates the list.
pub fn encode_area(entries: &[Exception], area: &mut [u8]) {
    area.fill(0);
    for (i, e) in entries.iter().enumerate() {
        write_entry(area, i, *e);
    }
}

/// The entries of one area image up to the terminator; `true` when all E are used.
pub fn decode_area(area: &[u8], out: &mut Vec<Exception>) -> bool {
    let per_area = area.len() / ENTRY_BYTES as usize;
    for i in 0..per_area {
        let e = read_entry(area, i);
        if e.new_chunk == 0 {
            return false;
        }
        out.push(e);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_positions_match_the_kernel_table() {
        for (cs, e) in [(8u64, 256u64), (16, 512), (32, 1024), (128, 4096), (1024, 32768)] {
            let l = Layout { chunk_sectors: cs, cow_sectors: 1 << 30 };
            assert_eq!(l.exceptions_per_area(), e);
            assert_eq!(l.area_location(0), 1);
            assert_eq!(l.area_location(3), 1 + 3 * (e + 1));
            assert!(l.is_area_chunk(1 + 2 * (e + 1)));
            assert!(!l.is_area_chunk(2));
            assert_eq!(l.skip_metadata(e + 2), e + 3);
        }
    }

    #[test]
    fn header_bytes_match_the_kernel_example() {
        let mut chunk = vec![0xAAu8; 4096];
        Header::new(8, true).encode_chunk(&mut chunk);
        assert_eq!(&chunk[..16], &[0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]);
        assert!(chunk[16..].iter().all(|&b| b == 0));
        assert_eq!(Header::decode(&chunk), Header::new(8, true));
    }

    #[test]
    fn entries_round_trip_and_the_first_zero_new_chunk_ends_an_area() {
        let mut area = vec![0u8; 4096];
        let entries = [Exception { old_chunk: 0, new_chunk: 2 }, Exception { old_chunk: 1, new_chunk: 3 }];
        encode_area(&entries, &mut area);
        assert_eq!(&area[..16], &[0, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]);
        let mut out = Vec::new();
        assert!(!decode_area(&area, &mut out));
        assert_eq!(out, entries);
    }

    #[test]
    fn the_merge_mark_leaves_the_kernel_header_alone() {
        let mut block = vec![0u8; 512];
        Header::new(8, true).encode_chunk(&mut block);
        let header = block[..16].to_vec();
        assert!(!merge_marked(&block));
        set_merge_mark(&mut block, true);
        assert!(merge_marked(&block));
        assert_eq!(block[..16], header[..]);
        assert_eq!(Header::decode(&block), Header::new(8, true));
        set_merge_mark(&mut block, false);
        assert!(!merge_marked(&block) && block[16..].iter().all(|&b| b == 0));
    }

    #[test]
    fn chunk_sizes_follow_the_kernel_rules() {
        assert!(check_chunk_sectors(8, 1).is_ok());
        assert!(check_chunk_sectors(1, 1).is_ok());
        assert!(check_chunk_sectors(12, 1).is_err());
        assert!(check_chunk_sectors(0, 1).is_err());
        assert!(check_chunk_sectors(4, 8).is_err());
        assert!(check_chunk_sectors(1 << 22, 1).is_err());
        assert!(check_chunk_for_devices(8, &[("origin", 4096), ("cow", 512)]).is_ok());
        let e = check_chunk_for_devices(4, &[("cow", 512), ("disk", 4096)]).unwrap_err();
        assert!(e.contains("`disk`") && e.contains("at least 4 KiB"), "{e}");
        assert!(check_chunk_for_devices(24, &[("disk", 512)]).unwrap_err().contains("power of two"));
    }
}
