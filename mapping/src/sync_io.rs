//! Synchronous I/O for the control plane: constructors reading a header at load time,
//! suspend flushing the devices below, tests. Opens a private queue, submits one request
//! and polls it to completion. Never used on the data path.
//!
//! Callers pass ordinary slices (a `Vec`, an array on the stack), which have no
//! alignment guarantee, while an `O_DIRECT` file (the `file:` backend on ext4 or xfs)
//! and NVMe want the memory aligned to the device's logical block size. So a slice that
//! is not aligned goes through an [`IoBuf`] (page aligned, the one aligned-buffer type of
//! this crate) and is copied in or out; an aligned one is used in place.

use udm_drivers::{BlockDevice, Completion, IoError, IoRequest, IoSegment, SgList, SECTOR_SIZE};

use crate::io_buf::IoBuf;

/// Reads `buf.len()` bytes at `sector`.
pub fn read(dev: &dyn BlockDevice, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
    if !is_aligned(dev, buf) {
        let bounce = bounce_buffer(buf.len())?;
        run(dev, IoRequest::read(sector, bounce.sg(0, buf.len()), 0))?;
        buf.copy_from_slice(bounce.as_slice());
        return Ok(());
    }
    // SAFETY: `buf` is borrowed mutably for the whole call, and `run` returns only after
    // the request completed, so the segment and its memory outlive the request.
    let seg = unsafe { IoSegment::new(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: as above; `seg` lives on this frame until `run` returns.
    let sg = unsafe { SgList::from_segment(&seg) };
    run(dev, IoRequest::read(sector, sg, 0))
}

/// Writes `buf` at `sector`, with forced unit access when `fua`.
pub fn write(dev: &dyn BlockDevice, sector: u64, buf: &[u8], fua: bool) -> Result<(), IoError> {
    let with_fua = |req: IoRequest| if fua { req.with_fua() } else { req };
    if !is_aligned(dev, buf) {
        let mut bounce = bounce_buffer(buf.len())?;
        bounce.as_mut_slice().copy_from_slice(buf);
        return run(dev, with_fua(IoRequest::write(sector, bounce.sg(0, buf.len()), 0)));
    }
    // SAFETY: a write only reads the buffer; `buf` is borrowed for the whole call and
    // `run` returns only after the request completed.
    let seg = unsafe { IoSegment::new(buf.as_ptr().cast_mut(), buf.len()) };
    // SAFETY: as above.
    let sg = unsafe { SgList::from_segment(&seg) };
    run(dev, with_fua(IoRequest::write(sector, sg, 0)))
}

/// Flushes the device's cache.
pub fn flush(dev: &dyn BlockDevice) -> Result<(), IoError> {
    run(dev, IoRequest::flush(0))
}

/// Whether `buf` may be handed to `dev` as it is: its address is a multiple of the
/// device's logical block size (at least a sector). Lengths are the caller's business
/// (the device rejects a partial block with a clear error either way).
fn is_aligned(dev: &dyn BlockDevice, buf: &[u8]) -> bool {
    let align = u64::from(dev.info().logical_block_size).max(SECTOR_SIZE);
    (buf.as_ptr() as u64).is_multiple_of(align)
}

fn bounce_buffer(len: usize) -> Result<IoBuf, IoError> {
    IoBuf::new(len).map_err(|_| IoError::BadBuffer { reason: "out of memory for an aligned bounce buffer" })
}

/// Submits `req` on a fresh queue and waits for its completion.
pub fn run(dev: &dyn BlockDevice, req: IoRequest) -> Result<(), IoError> {
    let mut queue = dev.open_queue(1).map_err(|_| IoError::DeviceGone { reason: "cannot open a queue" })?;
    let mut pending = Some(req);
    let mut out = [Completion::EMPTY; 1];
    loop {
        if let Some(r) = pending.take() {
            if let Err(full) = queue.submit(r) {
                pending = Some(full.0);
            }
            queue.kick();
        }
        if queue.poll(&mut out) == 1 {
            return out[0].result;
        }
        std::thread::yield_now();
    }
}
