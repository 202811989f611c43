//! Survives a front end that shrinks a file udm has mapped.
//!
//! Guest memory and inflight regions are files the front end shares (memfds, hugetlbfs
//! or tmpfs files). udm checks their size before mapping them, but the front end keeps
//! its descriptor and may `ftruncate` the file afterwards; the next access past the new
//! end raises SIGBUS, whose default action would kill the daemon and every other VM's
//! disk with it. QEMU seals its memfds against shrinking by default, but libblkio's
//! memfds and file-backed guest memory cannot be sealed, so sealing alone is not enough.
//!
//! Every such mapping is registered here. A process-wide SIGBUS handler looks the
//! faulting address up (a fixed table of atomics: no locks, no allocation, safe in a
//! signal handler); when it lies in a registered mapping, the handler replaces the
//! faulting page (or huge page) with a private zero page and returns, so the access
//! completes: the guest reads zeroes and its writes go nowhere, which only harms that
//! guest. It also counts the hit, so the worker using the mapping notices (one relaxed
//! load per loop) and ends that connection with the reason. A SIGBUS anywhere else
//! (and hardware memory errors) keeps its default action.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Once;

/// Mappings that can be guarded at once (each connection uses one per guest memory
/// region, at most 256, plus its inflight region).
const SLOTS: usize = 4096;

/// One registered mapping: `start == 0` means free.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    /// Bytes replaced at a time: the mapping's page size (huge pages for hugetlbfs).
    granule: AtomicUsize,
    hits: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)] // only used to initialise the array
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    granule: AtomicUsize::new(0),
    hits: AtomicU64::new(0),
};
static TABLE: [Slot; SLOTS] = [FREE; SLOTS];
/// Faults absorbed so far, all mappings together: workers compare it with what they saw.
static ABSORBED: AtomicU64 = AtomicU64::new(0);
static INSTALL: Once = Once::new();

/// A mapping protected from truncation for as long as this value lives. Drop it before
/// the mapping is unmapped.
#[derive(Debug)]
pub struct TruncationGuard {
    slot: usize,
}

/// The guard table is full.
#[derive(Debug, thiserror::Error)]
#[error("udm guards at most {SLOTS} mappings of front-end files at once; disconnect idle front ends or use fewer memory regions")]
pub struct GuardTableFull;

impl TruncationGuard {
    /// Guards `len` bytes at `start`, a shared mapping of a file whose blocks are
    /// `granule` bytes (its page size).
    pub fn new(start: *const u8, len: usize, granule: usize) -> Result<TruncationGuard, GuardTableFull> {
        INSTALL.call_once(install_handler);
        let granule = granule.max(page_size());
        for (i, slot) in TABLE.iter().enumerate() {
            // Claim with a placeholder start, then publish the real range: the handler
            // never matches a half-written slot (the placeholder, 1, is never a mapping).
            if slot.start.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                slot.len.store(len, Ordering::Relaxed);
                slot.granule.store(granule, Ordering::Relaxed);
                slot.hits.store(0, Ordering::Relaxed);
                slot.start.store(start as usize, Ordering::Release);
                return Ok(TruncationGuard { slot: i });
            }
        }
        Err(GuardTableFull)
    }

    /// Whether an access to the mapping found its file truncated.
    pub fn was_hit(&self) -> bool {
        TABLE[self.slot].hits.load(Ordering::Relaxed) > 0
    }
}

impl Drop for TruncationGuard {
    fn drop(&mut self) {
        TABLE[self.slot].start.store(0, Ordering::Release);
    }
}

/// Faults absorbed so far (all mappings): a cheap "did anything happen" check.
pub fn absorbed() -> u64 {
    ABSORBED.load(Ordering::Relaxed)
}

/// Whether the guarded mapping starting at `start` was hit (the caller knows its
/// mappings by address).
pub fn was_hit_at(start: *const u8) -> bool {
    TABLE.iter().any(|s| s.start.load(Ordering::Acquire) == start as usize && s.hits.load(Ordering::Relaxed) > 0)
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(n).unwrap_or(4096)
}

fn install_handler() {
    // SAFETY: a zeroed sigaction is a valid starting point; the handler is an
    // `extern "C"` function with the SA_SIGINFO signature; sigaction only reads it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) != 0 {
            tracing::warn!(
                "cannot install the SIGBUS handler ({}): a front end that truncates its memory file can kill udm",
                std::io::Error::last_os_error()
            );
        }
    }
}

/// The SIGBUS handler. Only async-signal-safe work: atomic loads and stores, and one
/// `mmap` system call.
extern "C" fn on_sigbus(_signal: libc::c_int, info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; si_addr is
    // valid for SIGBUS.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // BUS_ADRERR: an access past the end of the mapped file. Hardware memory errors
    // (BUS_MCEERR_*) and alignment faults keep their default action.
    const BUS_ADRERR: libc::c_int = 2;
    if code == BUS_ADRERR && absorb(addr) {
        return;
    }
    // SAFETY: resetting to the default action and returning re-executes the faulting
    // access, which then terminates the process as it would have without udm's handler.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
    }
}

/// Replaces the page around `addr` with zeroes when it lies in a guarded mapping.
fn absorb(addr: usize) -> bool {
    for slot in TABLE.iter() {
        let start = slot.start.load(Ordering::Acquire);
        if start <= 1 {
            continue;
        }
        let len = slot.len.load(Ordering::Relaxed);
        if addr < start || addr - start >= len {
            continue;
        }
        let granule = slot.granule.load(Ordering::Relaxed);
        // The replaced range stays inside the mapping: from the granule holding `addr`
        // (but not before the mapping's start) to the granule's end (but not past the
        // mapping's end).
        let page = (addr & !(granule - 1)).max(start);
        let end = ((addr & !(granule - 1)) + granule).min(start + len);
        // SAFETY: `page..end` lies inside a mapping udm made of a front-end file and still
        // owns (the guard is dropped before the mapping is unmapped); replacing it with a
        // private anonymous mapping of the same protection keeps every pointer into it
        // valid (the bytes become zero). mmap is a plain system call on Linux.
        let replaced = unsafe {
            libc::mmap(
                page as *mut libc::c_void,
                end - page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if replaced == libc::MAP_FAILED {
            return false;
        }
        slot.hits.fetch_add(1, Ordering::Relaxed);
        ABSORBED.fetch_add(1, Ordering::Release);
        return true;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsRawFd, FromRawFd};

    #[test]
    fn a_truncated_mapping_reads_zeroes_instead_of_killing_the_process() {
        // SAFETY: plain memfd_create with a static name.
        let fd = unsafe { libc::memfd_create(c"guard-test".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: a descriptor just created, owned by the File alone.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        let len = 4 * page_size();
        file.set_len(len as u64).unwrap();
        // SAFETY: a shared mapping of our own memfd, checked for failure.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(ptr, libc::MAP_FAILED);
        let bytes = ptr.cast::<u8>();
        let guard = TruncationGuard::new(bytes, len, page_size()).unwrap();
        // SAFETY: inside the mapping.
        unsafe { bytes.add(3 * page_size()).write_volatile(7) };
        let before = absorbed();
        file.set_len(page_size() as u64).unwrap();
        // SAFETY: inside the mapping; past the file's new end, which raises SIGBUS that
        // the guard absorbs.
        let read = unsafe { bytes.add(3 * page_size()).read_volatile() };
        assert_eq!(read, 0, "the truncated page reads as zeroes");
        // SAFETY: as above; the page is private now, so the write goes nowhere visible.
        unsafe { bytes.add(3 * page_size() + 1).write_volatile(9) };
        assert!(guard.was_hit());
        assert!(was_hit_at(bytes));
        assert!(absorbed() > before);
        // SAFETY: still within the file: an ordinary access.
        unsafe { bytes.write_volatile(1) };
        drop(guard);
        // SAFETY: unmapping the mapping made above, once.
        unsafe { libc::munmap(ptr, len) };
    }
}
