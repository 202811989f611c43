//! In-flight tracking shared with the front end (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD),
//! so a restarted udm finishes exactly the requests the previous one had taken but not
//! completed: none lost, none done twice.
//!
//! The front end asks udm for a shared-memory region (GET_INFLIGHT_FD), keeps the file
//! descriptor while udm runs, and hands it back to the next udm process after a
//! reconnect (SET_INFLIGHT_FD). The layout is libvhost-user's split-ring format, so the
//! region means the same to either back end:
//!
//! ```text
//! per queue, 64-byte aligned:  u64 features | u16 version | u16 desc_num
//!                              | u16 last_batch_head | u16 used_idx
//!                              then desc_num x { u8 inflight, u8 pad[5], u16 next, u64 counter }
//! ```
//!
//! Protocol per request: `take` when popped (inflight=1, counter=N++), `pre_put` just
//! before its used-ring entry is published (last_batch_head=head), `post_put` right after
//! (inflight=0, used_idx=ring's used idx). A crash between the used-ring update and
//! `post_put` shows as `used_idx != ring used idx`, and recovery clears last_batch_head.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use super::truncation_guard::TruncationGuard;

const HEADER_LEN: usize = 16;
const DESC_LEN: usize = 16;
const ALIGN: usize = 64;
/// Largest ring a split virtqueue may have (virtio 1.2, 2.7).
pub const MAX_QUEUE_SIZE: usize = 32768;
/// Version written into an initialised queue region.
const VERSION: u16 = 1;

/// Bytes one queue's region takes.
pub fn queue_region_len(queue_size: u16) -> usize {
    (HEADER_LEN + DESC_LEN * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// A shared mapping of the whole inflight file.
struct Mapping {
    ptr: *mut u8,
    len: usize,
    /// The front end may truncate a file it handed over: accesses past its new end are
    /// absorbed instead of killing the daemon. Dropped before the unmap.
    guard: Option<TruncationGuard>,
}

// SAFETY: the mapping is plain shared memory; every access goes through volatile reads
// and writes by the one worker thread that owns each queue's part.
unsafe impl Send for Mapping {}
// SAFETY: as above; the Mapping itself only hands out disjoint queue windows.
unsafe impl Sync for Mapping {}

impl Drop for Mapping {
    fn drop(&mut self) {
        drop(self.guard.take());
        // SAFETY: `ptr..ptr+len` is the mapping created in `InflightRegion::map`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The inflight file of one connection.
pub struct InflightRegion {
    file: File,
    map: Arc<Mapping>,
    num_queues: u16,
    queue_size: u16,
}

impl InflightRegion {
    /// Creates a zeroed region for `num_queues` queues of `queue_size` (GET_INFLIGHT_FD).
    pub fn create(num_queues: u16, queue_size: u16) -> io::Result<Self> {
        let len = queue_region_len(queue_size) * usize::from(num_queues);
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "inflight region for zero queues"));
        }
        // SAFETY: the name is a valid NUL-terminated string; flags are plain constants.
        let fd = unsafe { libc::memfd_create(c"udm-inflight".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a fresh descriptor that nothing else owns.
        let file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        file.set_len(len as u64)?;
        Self::map(file, len as u64, 0, num_queues, queue_size)
    }

    /// Maps a region handed over by the front end (SET_INFLIGHT_FD).
    pub fn map(file: File, mmap_size: u64, mmap_offset: u64, num_queues: u16, queue_size: u16) -> io::Result<Self> {
        let need = (queue_region_len(queue_size) * usize::from(num_queues)) as u64;
        if num_queues == 0 || queue_size == 0 || mmap_size < need {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight region of {mmap_size} bytes is too small for {num_queues} queues of {queue_size}"),
            ));
        }
        if usize::from(queue_size) > MAX_QUEUE_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("inflight region for queues of {queue_size}: the virtio limit is {MAX_QUEUE_SIZE}"),
            ));
        }
        // The file comes from the front end: mapping past its end would raise SIGBUS at
        // the first access and kill the daemon.
        crate::vhost_blk::guest_memory::check_file_covers(&file, mmap_offset, mmap_size)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("inflight region: {e}")))?;
        let len = usize::try_from(mmap_size).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let offset = libc::off_t::try_from(mmap_offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: a shared mapping of a file we own, no address hint; checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = ptr.cast::<u8>();
        let granule = usize::try_from(file.metadata()?.blksize()).unwrap_or(0);
        let guard = match TruncationGuard::new(ptr, len, granule) {
            Ok(guard) => guard,
            Err(e) => {
                // SAFETY: the mapping made above, not yet shared with anything.
                unsafe { libc::munmap(ptr.cast(), len) };
                return Err(io::Error::other(e));
            }
        };
        Ok(InflightRegion { file, map: Arc::new(Mapping { ptr, len, guard: Some(guard) }), num_queues, queue_size })
    }

    /// The file to send to the front end.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Size of the mapping.
    pub fn len(&self) -> usize {
        self.map.len
    }

    /// Never empty (creation refuses zero queues).
    pub fn is_empty(&self) -> bool {
        self.map.len == 0
    }

    /// Queues covered.
    pub fn num_queues(&self) -> u16 {
        self.num_queues
    }

    /// Queue size the region was made for.
    pub fn queue_size(&self) -> u16 {
        self.queue_size
    }

    /// The window of queue `index`, for its worker.
    pub fn queue(&self, index: u16) -> Option<InflightQueue> {
        if index >= self.num_queues {
            return None;
        }
        let offset = queue_region_len(self.queue_size) * usize::from(index);
        // SAFETY: offset + the queue's region lies inside the mapping (checked in `map`).
        let base = unsafe { self.map.ptr.add(offset) };
        Some(InflightQueue { base, desc_num: self.queue_size, counter: 0, _map: Arc::clone(&self.map) })
    }
}

/// One queue's part of the inflight region, owned by that queue's worker.
pub struct InflightQueue {
    base: *mut u8,
    desc_num: u16,
    counter: u64,
    _map: Arc<Mapping>,
}

// SAFETY: the window is owned by exactly one worker at a time (handed over with the
// queue); the mapping lives as long as the Arc.
unsafe impl Send for InflightQueue {}

/// What recovery found: heads to resubmit, oldest first, and the ring positions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Chains taken by the previous back end and not completed.
    pub resubmit: Vec<u16>,
    /// Where the available ring resumes: used idx + in-flight count.
    pub next_avail: u16,
}

impl InflightQueue {
    /// Whether the front end truncated the inflight file under this mapping.
    pub fn truncated(&self) -> bool {
        self._map.guard.as_ref().is_some_and(TruncationGuard::was_hit)
    }

    fn read_u16(&self, off: usize) -> u16 {
        // SAFETY: `off` is a header or descriptor field inside this queue's window.
        unsafe { std::ptr::read_volatile(self.base.add(off).cast::<u16>()) }
    }

    fn write_u16(&self, off: usize, v: u16) {
        // SAFETY: as read_u16; fields are naturally aligned (window is 64-byte aligned).
        unsafe { std::ptr::write_volatile(self.base.add(off).cast::<u16>(), v) }
    }

    fn desc_off(head: u16) -> usize {
        HEADER_LEN + usize::from(head) * DESC_LEN
    }

    fn set_inflight(&self, head: u16, v: u8) {
        // SAFETY: head < desc_num (callers check), so the byte is inside the window.
        unsafe { std::ptr::write_volatile(self.base.add(Self::desc_off(head)), v) }
    }

    fn inflight(&self, head: u16) -> bool {
        // SAFETY: as set_inflight.
        unsafe { std::ptr::read_volatile(self.base.add(Self::desc_off(head))) == 1 }
    }

    fn counter_of(&self, head: u16) -> u64 {
        // SAFETY: as set_inflight; the counter is 8-byte aligned at +8.
        unsafe { std::ptr::read_volatile(self.base.add(Self::desc_off(head) + 8).cast::<u64>()) }
    }

    /// Reads the state the previous back end left and prepares the queue. `ring_used_idx`
    /// is the used index in the guest's ring now; `queue_size` the ring's size.
    pub fn recover(&mut self, ring_used_idx: u16, queue_size: u16) -> Recovery {
        let n = self.desc_num.min(queue_size);
        if self.read_u16(8) == 0 {
            // A fresh region: initialise it, nothing to resubmit.
            self.write_u16(10, self.desc_num);
            self.write_u16(12, 0);
            self.write_u16(14, ring_used_idx);
            fence(Ordering::SeqCst);
            self.write_u16(8, VERSION);
            self.counter = 0;
            return Recovery { resubmit: Vec::new(), next_avail: ring_used_idx };
        }
        if self.read_u16(14) != ring_used_idx {
            // The last completion reached the used ring but not this region.
            let last = self.read_u16(12);
            if last < self.desc_num {
                self.set_inflight(last, 0);
            }
            fence(Ordering::SeqCst);
            self.write_u16(14, ring_used_idx);
        }
        let mut pending: Vec<(u64, u16)> =
            (0..n).filter(|&h| self.inflight(h)).map(|h| (self.counter_of(h), h)).collect();
        pending.sort_unstable();
        self.counter = pending.last().map_or(0, |&(c, _)| c + 1);
        Recovery {
            next_avail: ring_used_idx.wrapping_add(pending.len() as u16),
            resubmit: pending.into_iter().map(|(_, h)| h).collect(),
        }
    }

    /// Marks `head` taken (popped from the available ring).
    pub fn take(&mut self, head: u16) {
        if head >= self.desc_num {
            return;
        }
        let off = Self::desc_off(head);
        // SAFETY: inside the window; the counter is 8-byte aligned.
        unsafe { std::ptr::write_volatile(self.base.add(off + 8).cast::<u64>(), self.counter) };
        self.counter += 1;
        fence(Ordering::Release);
        self.set_inflight(head, 1);
    }

    /// Just before `head`'s used-ring entry is published.
    pub fn pre_put(&mut self, head: u16) {
        self.write_u16(12, head);
        fence(Ordering::Release);
    }

    /// Right after the used ring's index became `used_idx` with `head` in it.
    pub fn post_put(&mut self, head: u16, used_idx: u16) {
        fence(Ordering::Release);
        if head < self.desc_num {
            self.set_inflight(head, 0);
        }
        fence(Ordering::Release);
        self.write_u16(14, used_idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_owner_finds_exactly_the_unfinished_heads_in_order() {
        let region = InflightRegion::create(2, 8).unwrap();
        assert_eq!(region.len(), 2 * queue_region_len(8));
        let mut q = region.queue(1).unwrap();
        assert_eq!(q.recover(0, 8), Recovery { resubmit: vec![], next_avail: 0 });
        for h in [5, 2, 7] {
            q.take(h);
        }
        // Head 2 completes fully; head 7's used entry lands but the crash comes before
        // post_put.
        q.pre_put(2);
        q.post_put(2, 1);
        q.pre_put(7);
        drop(q);
        let file = region.file().try_clone().unwrap();
        let again = InflightRegion::map(file, region.len() as u64, 0, 2, 8).unwrap();
        let mut q = again.queue(1).unwrap();
        // The ring's used idx is 2: head 7's entry was published.
        assert_eq!(q.recover(2, 8), Recovery { resubmit: vec![5], next_avail: 3 });
        // Queue 0 was never started.
        assert_eq!(again.queue(0).unwrap().recover(0, 8).resubmit, Vec::<u16>::new());
        assert!(again.queue(2).is_none());
        assert!(InflightRegion::map(again.file().try_clone().unwrap(), 64, 0, 2, 8).is_err());
    }

    /// Issue 10, defect 2: a file shorter than the mmap_size the front end declares is
    /// refused before it is mapped (touching the missing part would raise SIGBUS).
    #[test]
    fn a_file_shorter_than_the_declared_size_is_refused() {
        let region = InflightRegion::create(1, 8).unwrap();
        let file = region.file().try_clone().unwrap();
        let len = region.len() as u64;
        let err = InflightRegion::map(file.try_clone().unwrap(), len * 4, 0, 1, 8).err().expect("refused");
        assert!(err.to_string().contains("shorter than"), "{err}");
        assert!(InflightRegion::map(file.try_clone().unwrap(), len, 4096, 1, 8).is_err(), "offset past the end");
        assert!(InflightRegion::map(file, len, 0, 1, 8).is_ok());
    }
}
