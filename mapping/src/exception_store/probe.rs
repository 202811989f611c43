//! Looking at a COW before a snapshot is built on it, and udm's merge mark.
//!
//! The kernel's constructor initialises a COW whose header magic is zero and re-attaches
//! one with a valid header; LVM zeroes the start of a COW only when it creates the LV. So
//! a COW that already holds a store must be re-attached (a declared snapshot at the next
//! start) or refused (a new snapshot asked for over it), never silently re-initialised.
//! [`inspect`] says which case a COW is in without writing anything;
//! [`write_merge_mark`] records that a merge is under way (see
//! [`format::MERGE_MARK`]).

use udm_drivers::{DeviceInfo, IoError, IoQueue, IoRequest, SECTOR_SIZE};

use crate::exception_store::error::StoreError;
use crate::exception_store::format::{self, Header, DISK_VERSION, SNAP_MAGIC};
use crate::exception_store::sync_io;
use crate::exception_store::{ExceptionStore, PersistentStore};
use crate::io_buf::IoBuf;

/// What a COW device holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CowContents {
    /// Header magic 0: never initialised (or zeroed on purpose): a new store.
    Blank,
    /// A dm-snapshot persistent store.
    Store(StoreSummary),
    /// Neither: other data, a store of another version or a corrupt one. Says why.
    Unusable(String),
}

/// A persistent store found on a COW.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreSummary {
    /// The header's chunk size in sectors.
    pub chunk_sectors: u64,
    /// The header's valid flag (0 once the snapshot overflowed or failed).
    pub valid: bool,
    /// Exceptions on disk (0 for an invalid store, whose areas are never read).
    pub exceptions: usize,
    /// A merge into the origin began and did not finish.
    pub merging: bool,
}

impl StoreSummary {
    /// `chunk 4 KiB, 12 exceptions, merging`, for messages.
    pub fn describe(&self) -> String {
        let mut text = format!("chunk {} KiB, {} exceptions", self.chunk_sectors / 2, self.exceptions);
        if !self.valid {
            text.push_str(", invalidated (it filled up or an I/O error hit it)");
        }
        if self.merging {
            text.push_str(", being merged into its origin");
        }
        text
    }
}

fn no_memory(during: &'static str) -> StoreError {
    StoreError::Io { during, source: IoError::BadBuffer { reason: "out of memory" } }
}

/// Reads the first logical block of chunk 0 (which holds the header and the merge mark).
fn read_header_block(queue: &mut dyn IoQueue, cow: &DeviceInfo) -> Result<IoBuf, StoreError> {
    let block = (cow.logical_block_size as usize).max(SECTOR_SIZE as usize);
    if cow.sectors * SECTOR_SIZE < block as u64 {
        return Err(StoreError::CowTooSmall { cow_sectors: cow.sectors, chunk_sectors: 0, needed: 2 });
    }
    let buf = IoBuf::new(block).map_err(|_| no_memory("allocating the header buffer"))?;
    sync_io::run(queue, IoRequest::read(0, buf.sg(0, block), 0))
        .map_err(|source| StoreError::Io { during: "reading the header", source })?;
    Ok(buf)
}

/// What `cow` holds. Reads the header and, for a valid store, every metadata area
/// (checking each entry as activation does); writes nothing. `queue` is an idle queue on
/// the COW; `origin_sectors` bounds the origin chunks entries may name.
pub fn inspect(queue: &mut dyn IoQueue, cow: &DeviceInfo, origin_sectors: u64) -> Result<CowContents, StoreError> {
    let block = read_header_block(queue, cow)?;
    let header = Header::decode(block.as_slice());
    if header.magic == 0 {
        return Ok(CowContents::Blank);
    }
    if header.magic != SNAP_MAGIC {
        return Ok(CowContents::Unusable(StoreError::BadMagic { found: header.magic }.to_string()));
    }
    if header.version != DISK_VERSION {
        return Ok(CowContents::Unusable(StoreError::BadVersion { found: header.version }.to_string()));
    }
    let chunk_sectors = u64::from(header.chunk_sectors);
    let block_sectors = u64::from(cow.logical_block_size) / SECTOR_SIZE;
    if let Err(e) = format::check_chunk_sectors(chunk_sectors, block_sectors) {
        return Ok(CowContents::Unusable(format!("its header is corrupt: {e}")));
    }
    let merging = format::merge_marked(block.as_slice());
    if header.valid == 0 {
        return Ok(CowContents::Store(StoreSummary { chunk_sectors, valid: false, exceptions: 0, merging }));
    }
    match PersistentStore::activate(queue, cow, chunk_sectors, origin_sectors) {
        Ok((store, _)) => Ok(CowContents::Store(StoreSummary {
            chunk_sectors,
            valid: true,
            exceptions: store.exceptions().len(),
            merging,
        })),
        Err(e @ StoreError::Io { .. }) => Err(e),
        Err(e) => Ok(CowContents::Unusable(e.to_string())),
    }
}

/// Sets or clears [`format::MERGE_MARK`] on a valid store, durably (FUA). Does nothing
/// when the mark is already as asked. Refuses a COW that holds no valid store.
pub fn write_merge_mark(queue: &mut dyn IoQueue, cow: &DeviceInfo, on: bool) -> Result<(), StoreError> {
    let mut block = read_header_block(queue, cow)?;
    let header = Header::decode(block.as_slice());
    if header.magic != SNAP_MAGIC || header.valid == 0 {
        return Err(StoreError::Unsupported("the COW holds no valid snapshot store to mark as merging"));
    }
    if format::merge_marked(block.as_slice()) == on {
        return Ok(());
    }
    format::set_merge_mark(block.as_mut_slice(), on);
    let len = block.len();
    sync_io::run(queue, IoRequest::write(0, block.sg(0, len), 0).with_fua())
        .map_err(|source| StoreError::Io { during: "writing the merge mark", source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_drivers::backends::mem::MemDevice;
    use udm_drivers::BlockDevice;

    #[test]
    fn inspect_tells_blank_stores_and_other_data_apart_and_the_mark_follows_the_store() {
        let dev = MemDevice::new(1 << 20, 512).unwrap();
        let info = dev.info();
        let mut q = dev.open_queue(4).unwrap();
        assert_eq!(inspect(q.as_mut(), &info, 2048).unwrap(), CowContents::Blank);
        assert!(write_merge_mark(q.as_mut(), &info, true).is_err(), "no store, no mark");

        PersistentStore::activate(q.as_mut(), &info, 8, 2048).unwrap();
        let fresh = StoreSummary { chunk_sectors: 8, valid: true, exceptions: 0, merging: false };
        assert_eq!(inspect(q.as_mut(), &info, 2048).unwrap(), CowContents::Store(fresh));
        write_merge_mark(q.as_mut(), &info, true).unwrap();
        let marked = StoreSummary { merging: true, ..fresh };
        assert_eq!(inspect(q.as_mut(), &info, 2048).unwrap(), CowContents::Store(marked));
        assert!(marked.describe().contains("being merged"));
        write_merge_mark(q.as_mut(), &info, false).unwrap();
        assert_eq!(inspect(q.as_mut(), &info, 2048).unwrap(), CowContents::Store(fresh));

        let mut junk = IoBuf::new(512).unwrap();
        junk.as_mut_slice()[..4].copy_from_slice(b"XFSB");
        sync_io::run(q.as_mut(), IoRequest::write(0, junk.sg(0, 512), 0)).unwrap();
        let CowContents::Unusable(why) = inspect(q.as_mut(), &info, 2048).unwrap() else { panic!("junk accepted") };
        assert!(why.contains("magic"), "{why}");
    }
}
