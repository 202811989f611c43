//! The transient exception store (`N`): exceptions live in memory only and are lost
//! with the table. Data chunks are handed out from COW chunk 0 upward; there is no
//! header and no metadata (spec/device-mapper.md §4.8).

use udm_drivers::{IoError, IoRequest};

use crate::exception_store::error::StoreError;
use crate::exception_store::{Exception, ExceptionStore, MergeBatch, PrepareError, StoreEvent, Usage};

/// A transient store.
#[derive(Debug)]
pub struct TransientStore {
    chunk_sectors: u64,
    cow_sectors: u64,
    next_free_sector: u64,
    valid: bool,
    log: Vec<Exception>,
    events: Vec<StoreEvent>,
}

impl TransientStore {
    /// An empty store over a COW of `cow_sectors` sectors.
    pub fn new(chunk_sectors: u64, cow_sectors: u64) -> Self {
        TransientStore {
            chunk_sectors,
            cow_sectors,
            next_free_sector: 0,
            valid: true,
            log: Vec::new(),
            events: Vec::new(),
        }
    }
}

impl ExceptionStore for TransientStore {
    fn chunk_sectors(&self) -> u64 {
        self.chunk_sectors
    }

    fn is_valid(&self) -> bool {
        self.valid
    }

    fn exceptions(&self) -> &[Exception] {
        &self.log
    }

    fn prepare(&mut self, _old_chunk: u64) -> Result<u64, PrepareError> {
        if !self.valid {
            return Err(PrepareError::Invalid);
        }
        if self.next_free_sector + self.chunk_sectors > self.cow_sectors {
            return Err(PrepareError::Full);
        }
        let chunk = self.next_free_sector / self.chunk_sectors;
        self.next_free_sector += self.chunk_sectors;
        Ok(chunk)
    }

    fn commit(&mut self, exception: Exception, data_ok: bool) {
        if !data_ok && self.valid {
            self.invalidate();
        }
        if self.valid {
            self.log.push(exception);
        }
        self.events.push(StoreEvent::Committed(exception, self.valid));
    }

    fn invalidate(&mut self) {
        if self.valid {
            self.valid = false;
            self.events.push(StoreEvent::Invalidated);
        }
    }

    fn next_io(&mut self) -> Option<IoRequest> {
        None
    }

    fn io_done(&mut self, _result: Result<(), IoError>) {}

    fn io_pending(&self) -> bool {
        false
    }

    fn take_events(&mut self, out: &mut Vec<StoreEvent>) {
        out.append(&mut self.events);
    }

    fn usage(&self) -> Usage {
        Usage { sectors_allocated: self.next_free_sector, total_sectors: self.cow_sectors, metadata_sectors: 0 }
    }

    fn set_cow_sectors(&mut self, sectors: u64) {
        self.cow_sectors = sectors;
    }

    fn prepare_merge(&mut self) -> Result<Option<MergeBatch>, StoreError> {
        Err(StoreError::Unsupported("a transient (N) snapshot cannot be merged: merging needs a persistent (P) store"))
    }

    fn commit_merge(&mut self, _count: u64) -> Result<(), StoreError> {
        Err(StoreError::Unsupported("a transient (N) snapshot cannot be merged: merging needs a persistent (P) store"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocates_from_chunk_zero_and_reports_the_kernel_status() {
        let mut s = TransientStore::new(8, 16384);
        assert_eq!(s.usage().status(), "0/16384 0");
        let c = s.prepare(5).unwrap();
        assert_eq!(c, 0);
        s.commit(Exception { old_chunk: 5, new_chunk: c }, true);
        let mut ev = Vec::new();
        s.take_events(&mut ev);
        assert_eq!(ev, vec![StoreEvent::Committed(Exception { old_chunk: 5, new_chunk: 0 }, true)]);
        assert_eq!(s.usage().status(), "8/16384 0");
        assert!(s.prepare_merge().is_err());
    }

    #[test]
    fn fills_up_at_the_last_whole_chunk() {
        let mut s = TransientStore::new(8, 20);
        assert_eq!(s.prepare(0), Ok(0));
        assert_eq!(s.prepare(1), Ok(1));
        assert_eq!(s.prepare(2), Err(PrepareError::Full));
    }
}
