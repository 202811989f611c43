//! One I/O request and its completion.

use crate::error::IoError;
use crate::sg::SgList;

/// Bytes in a sector: every address and length in udm's contract is in 512-byte sectors,
/// as in device-mapper, whatever the device's logical block size.
pub const SECTOR_SIZE: u64 = 512;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoOp {
    /// Read `sectors` sectors into the scatter-gather list.
    Read,
    /// Write the scatter-gather list to the device.
    Write,
    /// Make every completed write durable.
    Flush,
    /// The range's contents may be dropped; later reads return zeroes or old data.
    Discard,
    /// The range reads back as zeroes afterwards.
    WriteZeroes,
}

impl IoOp {
    /// Whether the operation changes the device's contents.
    pub fn is_write(self) -> bool {
        matches!(self, IoOp::Write | IoOp::Discard | IoOp::WriteZeroes)
    }

    /// Whether the operation moves data through the scatter-gather list.
    pub fn has_data(self) -> bool {
        matches!(self, IoOp::Read | IoOp::Write)
    }
}

/// A block I/O request. Built by the submitter, owned by the queue while in flight,
/// handed back (as [`QueueFull`]) when the queue has no room.
#[derive(Debug, Clone, Copy)]
pub struct IoRequest {
    /// What to do.
    pub op: IoOp,
    /// First 512-byte sector.
    pub sector: u64,
    /// Length in 512-byte sectors (0 for a flush). For reads and writes it equals the
    /// scatter-gather list's length / 512.
    pub sectors: u64,
    /// The data, for reads and writes; empty otherwise.
    pub sg: SgList,
    /// Forced unit access: the write is durable when it completes.
    pub fua: bool,
    /// Returned unchanged in the request's [`Completion`].
    pub tag: u64,
}

impl IoRequest {
    /// A read of `sg.len()` bytes at `sector`.
    pub fn read(sector: u64, sg: SgList, tag: u64) -> Self {
        IoRequest { op: IoOp::Read, sector, sectors: sg.len() as u64 / SECTOR_SIZE, sg, fua: false, tag }
    }

    /// A write of `sg` at `sector`.
    pub fn write(sector: u64, sg: SgList, tag: u64) -> Self {
        IoRequest { op: IoOp::Write, sector, sectors: sg.len() as u64 / SECTOR_SIZE, sg, fua: false, tag }
    }

    /// A cache flush.
    pub const fn flush(tag: u64) -> Self {
        IoRequest { op: IoOp::Flush, sector: 0, sectors: 0, sg: SgList::empty(), fua: false, tag }
    }

    /// A discard of `sectors` sectors at `sector`.
    pub fn discard(sector: u64, sectors: u64, tag: u64) -> Self {
        IoRequest { op: IoOp::Discard, sector, sectors, sg: SgList::empty(), fua: false, tag }
    }

    /// Zeroes `sectors` sectors at `sector`.
    pub fn write_zeroes(sector: u64, sectors: u64, tag: u64) -> Self {
        IoRequest { op: IoOp::WriteZeroes, sector, sectors, sg: SgList::empty(), fua: false, tag }
    }

    /// The same request, with forced unit access.
    pub fn with_fua(mut self) -> Self {
        self.fua = true;
        self
    }

    /// Bytes the request covers on the device.
    pub fn bytes(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }
}

/// The outcome of one request, delivered by [`crate::IoQueue::poll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// The request's tag.
    pub tag: u64,
    /// Success, or why it failed.
    pub result: Result<(), IoError>,
}

impl Completion {
    /// A placeholder to size completion arrays with.
    pub const EMPTY: Completion = Completion { tag: 0, result: Ok(()) };
}

/// The queue had no room: the request is handed back untouched. Poll, then resubmit.
#[derive(Debug, Clone, Copy)]
pub struct QueueFull(pub IoRequest);

impl std::fmt::Display for QueueFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "queue full (request tag {}): poll for completions and resubmit", self.0.tag)
    }
}

impl std::error::Error for QueueFull {}
