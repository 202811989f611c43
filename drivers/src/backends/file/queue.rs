//! One io_uring per queue. Slot `i` of the queue owns user_data `i` and `SLOT_IOVECS`
//! iovecs of a preallocated array, so nothing is allocated per request.
//!
//! Where the kernel allows (6.1+), the ring is single-issuer with deferred task work:
//! completions are posted only when the owning thread polls, so a polling thread is
//! never interrupted to post them. The ring is created disabled and bound to the first
//! thread that kicks or polls the queue; a queue may move to its thread after
//! `open_queue` but must stay there afterwards, as the I/O contract asks.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

use super::buffers::{BufferRegistry, FixedBuffers};
use super::FileKind;
use crate::completion_ring::{completion_ring, CompletionRing};
use crate::device::{DeviceInfo, IoQueue};
use crate::error::{DeviceError, IoError};
use crate::request::{Completion, IoOp, IoRequest, QueueFull, SECTOR_SIZE};
use crate::sg::SgList;
use crate::validate::validate_request;

/// iovecs each slot has room for; requests with more segments must arrive as a whole
/// segment array (passed to the kernel as it is) or are refused.
pub(super) const SLOT_IOVECS: usize = 128;

/// Most requests one queue holds (io_uring rings are sized to a power of two above).
const MAX_DEPTH: usize = 4096;

/// `BLOCK_URING_CMD_DISCARD` from <linux/fs.h> (`_IO(0x12, 0)`, Linux 6.12; absent from
/// the libc crate): the asynchronous BLKDISCARD of a block device, as an io_uring
/// command with the byte offset in `addr` and the length in `addr3`.
const BLOCK_URING_CMD_DISCARD: u32 = 0x12 << 8;

/// The registered-file index of the backing file in every ring.
const FILE: types::Fixed = types::Fixed(0);

/// Per-request state while it is in the ring.
#[derive(Clone, Copy)]
struct Slot {
    req: IoRequest,
    /// Bytes already transferred (a short read or write continues from here).
    done: u64,
    /// The first way of doing a Discard or WriteZeroes was refused; use the second
    /// (see `prepare`).
    fallback: bool,
}

/// A queue over one io_uring.
pub(super) struct FileQueue {
    ring: IoUring,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    /// `SLOT_IOVECS` iovecs per slot, for lists that are not a whole segment array.
    iovecs: Box<[libc::iovec]>,
    /// Requests that failed validation: they complete from `poll` like the others.
    rejected: CompletionRing,
    /// Entries pushed to the submission ring that the kernel has not taken yet.
    unsubmitted: usize,
    /// The ring waits to be enabled by the thread that uses it.
    disabled: bool,
    depth: usize,
    info: DeviceInfo,
    kind: FileKind,
    direct: bool,
    /// Memory registered with the device, and this ring's registration of it.
    registry: Arc<BufferRegistry>,
    fixed: FixedBuffers,
    /// Keeps the registered descriptor open while the ring may use it.
    _file: Arc<File>,
}

// SAFETY: the queue owns its ring, slots and iovec array. The raw pointers inside (the
// iovecs and in-flight IoRequests) describe memory the submitter promised to keep valid
// until completion on whatever thread polls; moving the queue to another thread before
// use is what `open_queue` callers do. The ring is not shared.
unsafe impl Send for FileQueue {}

/// Fails with a clear error when the host cannot run io_uring at all.
pub(super) fn check_io_uring() -> Result<(), DeviceError> {
    IoUring::new(2).map(drop).map_err(ring_error)
}

fn ring_error(e: io::Error) -> DeviceError {
    match e.raw_os_error() {
        Some(libc::ENOSYS) => DeviceError::Unavailable {
            what: "io_uring",
            hint: "this kernel has no io_uring (Linux 5.6 or newer with CONFIG_IO_URING is needed); \
                   use the mem or null backend, or another kernel"
                .into(),
        },
        Some(libc::EPERM) | Some(libc::EACCES) => DeviceError::Unavailable {
            what: "io_uring",
            hint: "the kernel refuses io_uring to this process: set `sysctl kernel.io_uring_disabled=0`, \
                   and if udm runs in a container allow the io_uring_setup/io_uring_enter system calls \
                   (Docker's default seccomp profile blocks them)"
                .into(),
        },
        _ => DeviceError::io("cannot create an io_uring (for an old kernel, raise `ulimit -l`)", e),
    }
}

impl FileQueue {
    pub(super) fn new(
        file: Arc<File>,
        info: DeviceInfo,
        kind: FileKind,
        direct: bool,
        registry: Arc<BufferRegistry>,
        depth: usize,
    ) -> Result<Self, DeviceError> {
        let depth = depth.clamp(1, MAX_DEPTH);
        let entries = depth.next_power_of_two() as u32;
        // Completion work is deferred to our own `poll` (no interrupts of the polling
        // thread) and flagged in the shared ring; that needs a single submitting thread,
        // fixed when the ring is enabled on first use (queues move to their thread
        // after opening). Older kernels get cooperative task work, or plain rings.
        let (ring, disabled) = match IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_taskrun_flag()
            .setup_r_disabled()
            .setup_cqsize(entries * 2)
            .build(entries)
        {
            Ok(r) => (r, true),
            Err(_) => (
                IoUring::builder()
                    .setup_coop_taskrun()
                    .setup_taskrun_flag()
                    .setup_cqsize(entries * 2)
                    .build(entries)
                    .or_else(|_| IoUring::builder().setup_cqsize(entries * 2).build(entries))
                    .map_err(ring_error)?,
                false,
            ),
        };
        ring.submitter()
            .register_files(&[file.as_raw_fd()])
            .map_err(|e| DeviceError::io("cannot register the file with io_uring", e))?;
        let empty = Slot { req: IoRequest::flush(0), done: 0, fallback: false };
        let mut queue = FileQueue {
            ring,
            slots: vec![empty; depth].into_boxed_slice(),
            free: (0..depth as u32).rev().collect(),
            iovecs: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; depth * SLOT_IOVECS]
                .into_boxed_slice(),
            rejected: completion_ring(depth),
            unsubmitted: 0,
            disabled,
            depth,
            info,
            kind,
            direct,
            registry,
            fixed: FixedBuffers::default(),
            _file: file,
        };
        queue.refresh_buffers();
        Ok(queue)
    }

    /// Follows changes to the device's registered memory. Cheap when nothing changed
    /// (one atomic load). A stale table is dropped at once, so no request can use a
    /// region after it was unregistered; the ring is re-registered when no submission
    /// entry (which may name an old index) waits in the ring.
    #[inline]
    fn follow_buffers(&mut self) {
        if self.registry.generation() != self.fixed.seen {
            self.fixed.table.clear();
            if self.unsubmitted == 0 {
                self.refresh_buffers();
            }
        }
    }

    #[cold]
    fn refresh_buffers(&mut self) {
        let (generation, pieces) = self.registry.pieces();
        let submitter = self.ring.submitter();
        if self.fixed.in_kernel {
            // Requests already issued keep their buffers: the kernel counts references.
            let _ = submitter.unregister_buffers();
            self.fixed.in_kernel = false;
        }
        self.fixed.seen = generation;
        self.fixed.table.clear();
        if pieces.is_empty() {
            return;
        }
        // SAFETY: the pieces describe memory the owner registered with the device and
        // promised to keep mapped until it unregisters it; before that happens this
        // queue drops its table (`follow_buffers`) and the registration is replaced.
        match unsafe { submitter.register_buffers(&pieces) } {
            Ok(()) => {
                self.fixed.in_kernel = true;
                self.fixed.table =
                    pieces.iter().map(|p| (p.iov_base as usize, p.iov_base as usize + p.iov_len)).collect();
                self.fixed.warned = false;
            }
            Err(e) => {
                if !self.fixed.warned {
                    tracing::warn!(
                        "cannot register I/O memory with io_uring ({e}); continuing without fixed buffers                          (raise `ulimit -l` if this is a memory-lock limit)"
                    );
                    self.fixed.warned = true;
                }
            }
        }
    }

    /// The submission entry for what remains of slot `idx`'s request.
    fn prepare(&mut self, idx: usize) -> Result<squeue::Entry, IoError> {
        let slot = self.slots[idx];
        let req = slot.req;
        let offset = req.sector * SECTOR_SIZE + slot.done;
        let entry = match req.op {
            IoOp::Read | IoOp::Write => {
                let total = req.sg.len() as u64;
                let sg = if slot.done == 0 {
                    req.sg
                } else {
                    req.sg.slice(slot.done as usize, (total - slot.done) as usize)
                };
                let flags = if req.op == IoOp::Write && req.fua { libc::RWF_DSYNC } else { 0 };
                self.rw_entry(idx, req.op, sg, offset, flags)?
            }
            IoOp::Flush => opcode::Fsync::new(FILE).flags(types::FsyncFlags::DATASYNC).build(),
            // A block device discards through its io_uring command where the kernel has
            // it; otherwise (and on files) punching a hole is the discard: on a block
            // device the kernel turns it into a write-zeroes that unmaps.
            IoOp::Discard if self.kind == FileKind::BlockDevice && !slot.fallback => {
                let mut cmd = [0u8; 16];
                cmd[..8].copy_from_slice(&req.bytes().to_le_bytes());
                opcode::UringCmd16::new(FILE, BLOCK_URING_CMD_DISCARD).addr(Some(offset)).cmd(cmd).build()
            }
            IoOp::Discard => {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                opcode::Fallocate::new(FILE, req.bytes()).offset(offset).mode(mode).build()
            }
            IoOp::WriteZeroes => {
                let mode = if slot.fallback {
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
                } else {
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
                };
                opcode::Fallocate::new(FILE, req.bytes()).offset(offset).mode(mode).build()
            }
        };
        Ok(entry.user_data(idx as u64))
    }

    /// A read or write of `sg` at byte `offset`: one buffer, the caller's own segment
    /// array, or a copy of the window's pieces into the slot's iovecs.
    #[inline]
    fn rw_entry(
        &mut self,
        idx: usize,
        op: IoOp,
        sg: SgList,
        offset: u64,
        flags: i32,
    ) -> Result<squeue::Entry, IoError> {
        let mut chunks = sg.chunks();
        let (first, first_len) = chunks.next().ok_or(IoError::BadBuffer { reason: "empty scatter-gather list" })?;
        if first_len == sg.len() {
            self.check_direct_alignment(first, first_len)?;
            if let Some(index) = self.fixed.lookup(first, first_len) {
                return Ok(if op == IoOp::Read {
                    opcode::ReadFixed::new(FILE, first, first_len as u32, index).offset(offset).rw_flags(flags).build()
                } else {
                    opcode::WriteFixed::new(FILE, first, first_len as u32, index).offset(offset).rw_flags(flags).build()
                });
            }
            return Ok(if op == IoOp::Read {
                opcode::Read::new(FILE, first, first_len as u32).offset(offset).rw_flags(flags).build()
            } else {
                opcode::Write::new(FILE, first, first_len as u32).offset(offset).rw_flags(flags).build()
            });
        }
        let (iov, count) = if sg.is_whole_array() {
            let (ptr, count) = sg.raw_segments();
            for (p, l) in sg.chunks() {
                self.check_direct_alignment(p, l)?;
            }
            // IoSegment has the layout of struct iovec (see sg.rs).
            (ptr.cast::<libc::iovec>(), count)
        } else {
            let window = &mut self.iovecs[idx * SLOT_IOVECS..(idx + 1) * SLOT_IOVECS];
            let mut count = 0;
            for (p, l) in std::iter::once((first, first_len)).chain(chunks) {
                if count == SLOT_IOVECS {
                    return Err(IoError::BadBuffer { reason: "more scatter-gather segments than max_segments" });
                }
                window[count] = libc::iovec { iov_base: p.cast(), iov_len: l };
                count += 1;
            }
            for iov in &window[..count] {
                check_alignment(self.direct, iov.iov_base.cast(), iov.iov_len)?;
            }
            (window.as_ptr(), count)
        };
        if count > libc::UIO_MAXIOV as usize {
            return Err(IoError::BadBuffer { reason: "more scatter-gather segments than the kernel's IOV_MAX" });
        }
        Ok(if op == IoOp::Read {
            opcode::Readv::new(FILE, iov, count as u32).offset(offset).rw_flags(flags).build()
        } else {
            opcode::Writev::new(FILE, iov, count as u32).offset(offset).rw_flags(flags).build()
        })
    }

    /// O_DIRECT moves data by DMA straight from the buffers: the kernel wants their
    /// addresses and lengths aligned to 512 bytes and answers EINVAL otherwise.
    #[inline]
    fn check_direct_alignment(&self, ptr: *mut u8, len: usize) -> Result<(), IoError> {
        check_alignment(self.direct, ptr, len)
    }

    /// Pushes one entry; the ring holds at least `depth` entries and every entry belongs
    /// to one of `depth` slots, so there is always room.
    fn push(&mut self, entry: &squeue::Entry) {
        // SAFETY: the entry points at the slot's iovecs (owned by self, freed only after
        // Drop drained the ring) or at the submitter's buffers and segment array, which
        // the SgList contract keeps valid until this request completes.
        let pushed = unsafe { self.ring.submission().push(entry) };
        debug_assert!(pushed.is_ok(), "submission ring sized to the queue depth");
        self.unsubmitted += 1;
    }

    /// One `io_uring_enter` for everything pushed (and for pending task work).
    fn enter(&mut self) {
        if !self.enable() {
            return;
        }
        match self.ring.submit() {
            Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
            // Out of kernel resources for now: the entries stay in the ring and the next
            // kick or poll tries again.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EBUSY | libc::EINTR)) => {}
            Err(e) => tracing::error!("io_uring_enter failed: {e}; retrying on the next poll"),
        }
    }

    /// Binds a ring created disabled to the calling thread; false if that failed.
    fn enable(&mut self) -> bool {
        if self.disabled {
            if let Err(e) = self.ring.submitter().register_enable_rings() {
                tracing::error!("cannot enable the io_uring: {e}");
                return false;
            }
            self.disabled = false;
        }
        true
    }

    /// Releases slot `idx` and reports its outcome.
    #[inline]
    fn finish(&mut self, idx: usize, result: Result<(), IoError>) -> Completion {
        self.free.push(idx as u32);
        Completion { tag: self.slots[idx].req.tag, result }
    }

    /// Turns one kernel completion into a request completion, or continues the request
    /// (short transfer, write-zeroes fallback) and returns `None`.
    fn complete(&mut self, idx: usize, res: i32) -> Option<Completion> {
        let op = self.slots[idx].req.op;
        if res < 0 {
            let errno = -res;
            return match op {
                IoOp::WriteZeroes | IoOp::Discard
                    if !self.slots[idx].fallback && matches!(errno, libc::EOPNOTSUPP | libc::EINVAL) =>
                {
                    self.slots[idx].fallback = true;
                    self.resubmit(idx)
                }
                IoOp::Discard | IoOp::WriteZeroes if errno == libc::EOPNOTSUPP => {
                    Some(self.finish(idx, Err(IoError::Unsupported { op })))
                }
                _ => Some(self.finish(idx, Err(IoError::Host { errno }))),
            };
        }
        if op.has_data() {
            let slot = &mut self.slots[idx];
            slot.done += res as u64;
            if slot.done < slot.req.sg.len() as u64 {
                if res == 0 {
                    // End of file inside the device: the file shrank under us.
                    return Some(self.finish(idx, Err(IoError::Host { errno: libc::EIO })));
                }
                return self.resubmit(idx);
            }
        }
        Some(self.finish(idx, Ok(())))
    }

    fn resubmit(&mut self, idx: usize) -> Option<Completion> {
        match self.prepare(idx) {
            Ok(entry) => {
                self.push(&entry);
                None
            }
            Err(e) => Some(self.finish(idx, Err(e))),
        }
    }

    fn busy_slots(&self) -> usize {
        self.depth - self.free.len()
    }
}

/// See [`FileQueue::check_direct_alignment`].
#[inline]
fn check_alignment(direct: bool, ptr: *mut u8, len: usize) -> Result<(), IoError> {
    if direct && !((ptr as usize) | len).is_multiple_of(SECTOR_SIZE as usize) {
        return Err(IoError::BadBuffer { reason: "O_DIRECT needs buffers aligned to 512 bytes" });
    }
    Ok(())
}

impl IoQueue for FileQueue {
    #[inline]
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        if self.in_flight() >= self.depth {
            return Err(QueueFull(req));
        }
        if let Err(e) = validate_request(&self.info, &req) {
            self.rejected.push(Completion { tag: req.tag, result: Err(e) });
            return Ok(());
        }
        self.follow_buffers();
        let idx = self.free.pop().expect("a free slot: in_flight < depth") as usize;
        self.slots[idx] = Slot { req, done: 0, fallback: false };
        match self.prepare(idx) {
            Ok(entry) => self.push(&entry),
            Err(e) => {
                self.free.push(idx as u32);
                self.rejected.push(Completion { tag: req.tag, result: Err(e) });
            }
        }
        Ok(())
    }

    #[inline]
    fn kick(&mut self) {
        if self.unsubmitted > 0 {
            self.enter();
        }
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut n = self.rejected.drain_into(out);
        if n == out.len() || self.busy_slots() == 0 {
            return n;
        }
        if self.unsubmitted > 0 || (self.ring.completion().is_empty() && self.ring.submission().taskrun()) {
            self.enter();
        }
        let mut resubmitted = false;
        while n < out.len() {
            let Some(cqe) = self.ring.completion().next() else { break };
            let before = self.unsubmitted;
            if let Some(c) = self.complete(cqe.user_data() as usize, cqe.result()) {
                out[n] = c;
                n += 1;
            }
            resubmitted |= self.unsubmitted != before;
        }
        if resubmitted {
            self.enter();
        }
        n
    }

    /// One `io_uring_enter` that submits what is pending and sleeps for a completion.
    fn wait(&mut self, timeout: Duration) {
        if !self.rejected.is_empty() || self.busy_slots() == 0 || !self.ring.completion().is_empty() {
            self.kick();
            return;
        }
        if !self.enable() {
            return;
        }
        let ts = types::Timespec::from(timeout);
        let args = types::SubmitArgs::new().timespec(&ts);
        match self.ring.submitter().submit_with_args(1, &args) {
            Ok(n) => self.unsubmitted = self.unsubmitted.saturating_sub(n),
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY)) => {}
            Err(e) => tracing::error!("io_uring wait failed: {e}"),
        }
    }

    #[inline]
    fn in_flight(&self) -> usize {
        self.busy_slots() + self.rejected.len()
    }

    fn depth(&self) -> usize {
        self.depth
    }
}

impl Drop for FileQueue {
    /// The kernel may still be reading or writing the slots' iovecs and the submitters'
    /// buffers: wait for every request before the memory goes away.
    fn drop(&mut self) {
        if self.disabled {
            return; // never entered: nothing reached the kernel
        }
        while self.busy_slots() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.raw_os_error() != Some(libc::EINTR) {
                    tracing::error!("io_uring wait failed while closing a queue: {e}");
                    return;
                }
            }
            loop {
                let Some(cqe) = self.ring.completion().next() else { break };
                let _ = self.complete(cqe.user_data() as usize, cqe.result());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_io_uring_gets_an_unavailable_error_that_says_why() {
        for (errno, needle) in [(libc::ENOSYS, "Linux 5.6"), (libc::EPERM, "io_uring_disabled")] {
            let e = ring_error(io::Error::from_raw_os_error(errno));
            assert!(matches!(e, DeviceError::Unavailable { what: "io_uring", .. }), "{e:?}");
            assert!(e.to_string().contains(needle), "{e}");
        }
        assert!(matches!(ring_error(io::Error::from_raw_os_error(libc::ENOMEM)), DeviceError::Io { .. }));
    }
}
