//! Synchronous I/O for the control plane: constructors reading a header at load time,
//! suspend flushing the devices below, tests. Opens a private queue, submits one request
//! and polls it to completion. Never used on the data path.

use udm_drivers::{BlockDevice, Completion, IoError, IoRequest, IoSegment, SgList};

/// Reads `buf.len()` bytes at `sector`.
pub fn read(dev: &dyn BlockDevice, sector: u64, buf: &mut [u8]) -> Result<(), IoError> {
    // SAFETY: `buf` is borrowed mutably for the whole call, and `run` returns only after
    // the request completed, so the segment and its memory outlive the request.
    let seg = unsafe { IoSegment::new(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: as above; `seg` lives on this frame until `run` returns.
    let sg = unsafe { SgList::from_segment(&seg) };
    run(dev, IoRequest::read(sector, sg, 0))
}

/// Writes `buf` at `sector`, with forced unit access when `fua`.
pub fn write(dev: &dyn BlockDevice, sector: u64, buf: &[u8], fua: bool) -> Result<(), IoError> {
    // SAFETY: a write only reads the buffer; `buf` is borrowed for the whole call and
    // `run` returns only after the request completed.
    let seg = unsafe { IoSegment::new(buf.as_ptr().cast_mut(), buf.len()) };
    // SAFETY: as above.
    let sg = unsafe { SgList::from_segment(&seg) };
    let req = IoRequest::write(sector, sg, 0);
    run(dev, if fua { req.with_fua() } else { req })
}

/// Flushes the device's cache.
pub fn flush(dev: &dyn BlockDevice) -> Result<(), IoError> {
    run(dev, IoRequest::flush(0))
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
