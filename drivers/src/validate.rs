//! The checks every backend applies to a request before touching its device.

use crate::device::DeviceInfo;
use crate::error::IoError;
use crate::request::{IoOp, IoRequest, SECTOR_SIZE};

/// Checks `req` against `info`: range, alignment to the logical block size, data length,
/// read-only, and whether the operation is supported. Cheap: a few compares.
#[inline]
pub fn validate_request(info: &DeviceInfo, req: &IoRequest) -> Result<(), IoError> {
    let op = req.op;
    if op == IoOp::Flush {
        return Ok(());
    }
    if op.is_write() && info.read_only {
        return Err(IoError::ReadOnly { op });
    }
    match op {
        IoOp::Discard if !info.supports_discard => return Err(IoError::Unsupported { op }),
        IoOp::WriteZeroes if !info.supports_write_zeroes => return Err(IoError::Unsupported { op }),
        _ => {}
    }
    let end = req.sector.checked_add(req.sectors);
    if end.is_none_or(|end| end > info.sectors) {
        return Err(IoError::OutOfRange { op, sector: req.sector, sectors: req.sectors, capacity: info.sectors });
    }
    let block_sectors = u64::from(info.logical_block_size) / SECTOR_SIZE;
    if block_sectors > 1 && (!req.sector.is_multiple_of(block_sectors) || !req.sectors.is_multiple_of(block_sectors)) {
        return Err(IoError::Misaligned {
            op,
            sector: req.sector,
            sectors: req.sectors,
            block_size: info.logical_block_size,
        });
    }
    if op.has_data() {
        if req.sg.len() as u64 != req.sectors * SECTOR_SIZE {
            return Err(IoError::BadBuffer { reason: "scatter-gather length differs from the sector count" });
        }
        if req.sectors == 0 {
            return Err(IoError::BadBuffer { reason: "zero-length read or write" });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sg::{IoSegment, SgList};

    fn info() -> DeviceInfo {
        DeviceInfo::new(1024, 4096)
    }

    #[test]
    fn rejects_each_bad_request_with_its_reason() {
        let mut buf = vec![0u8; 8192];
        // SAFETY: `buf` outlives the requests, which are only validated.
        let seg = unsafe { IoSegment::new(buf.as_mut_ptr(), 4096) };
        // SAFETY: as above.
        let sg = unsafe { SgList::from_segment(&seg) };
        let i = info();
        assert_eq!(validate_request(&i, &IoRequest::read(0, sg, 1)), Ok(()));
        assert!(matches!(validate_request(&i, &IoRequest::read(1020, sg, 1)), Err(IoError::OutOfRange { .. })));
        assert!(matches!(validate_request(&i, &IoRequest::read(u64::MAX - 2, sg, 1)), Err(IoError::OutOfRange { .. })));
        assert!(matches!(validate_request(&i, &IoRequest::read(3, sg, 1)), Err(IoError::Misaligned { .. })));
        let mut bad = IoRequest::read(0, sg, 1);
        bad.sectors = 16;
        assert!(matches!(validate_request(&i, &bad), Err(IoError::BadBuffer { .. })));
        let mut ro = i.clone();
        ro.read_only = true;
        assert_eq!(validate_request(&ro, &IoRequest::write(0, sg, 1)), Err(IoError::ReadOnly { op: IoOp::Write }));
        assert_eq!(validate_request(&ro, &IoRequest::read(0, sg, 1)), Ok(()));
        let mut nodisc = i.clone();
        nodisc.supports_discard = false;
        assert_eq!(
            validate_request(&nodisc, &IoRequest::discard(0, 8, 1)),
            Err(IoError::Unsupported { op: IoOp::Discard })
        );
        assert_eq!(validate_request(&i, &IoRequest::flush(1)), Ok(()));
    }
}
