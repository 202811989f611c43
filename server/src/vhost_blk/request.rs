//! Turning one virtio-blk descriptor chain into a request udm can submit.
//!
//! A chain is a run of device-readable buffers (the 16-byte header, then data for
//! writes, discards and write-zeroes) followed by device-writable buffers (data for reads,
//! then the status byte as the very last byte). Drivers may split or merge these buffers
//! any way they like, so the parser treats each side as one byte stream.
//!
//! Everything here comes from the guest and may be garbage: each way a chain can be wrong
//! is a [`Rejection`] with the virtio status to answer and a reason to log. Data buffers
//! are translated to host addresses and handed down as [`IoSegment`]s: no copies.

use udm_drivers::{IoSegment, SECTOR_SIZE};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::{Bytes, GuestAddress};

use super::config_space::Limits;
pub use super::guest_access::GuestMem;

/// Status byte values (virtio 1.2 section 5.2.6).
pub const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
/// The request failed.
pub const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
/// The request type is not supported.
pub const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// Size of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: usize = 16;
/// Size of one discard / write-zeroes range (`struct virtio_blk_discard_write_zeroes`).
const RANGE_LEN: usize = 16;
/// Bytes of the serial a GET_ID request returns.
pub const ID_BYTES: usize = 20;
/// Most descriptors in one chain: data segments plus header and status.
pub const MAX_CHAIN: usize = super::config_space::SEG_MAX as usize + 2;

/// One descriptor of a chain, as the parser needs it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Desc {
    /// Guest physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (VIRTQ_DESC_F_WRITE).
    pub writable: bool,
}

/// What the guest asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlkOp {
    /// VIRTIO_BLK_T_IN.
    Read,
    /// VIRTIO_BLK_T_OUT.
    Write,
    /// VIRTIO_BLK_T_FLUSH.
    Flush,
    /// VIRTIO_BLK_T_DISCARD.
    Discard,
    /// VIRTIO_BLK_T_WRITE_ZEROES.
    WriteZeroes,
    /// VIRTIO_BLK_T_GET_ID: the serial, answered by the export itself.
    GetId,
}

/// A well-formed request. Its data segments were appended to the caller's vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlkRequest {
    /// The operation.
    pub op: BlkOp,
    /// First 512-byte sector.
    pub sector: u64,
    /// Length in sectors (data length for reads and writes, the range for discard and
    /// write-zeroes, 0 for flush).
    pub sectors: u64,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Bytes of device-writable data before the status byte (what a read fills).
    pub in_data_len: u32,
}

impl BlkRequest {
    /// The `len` to put in the used ring when the request completes: bytes written into
    /// the chain's writable buffers.
    pub fn used_len(&self, status: u8) -> u32 {
        let data = match self.op {
            BlkOp::Read if status == STATUS_OK => self.in_data_len,
            BlkOp::GetId if status == STATUS_OK => self.in_data_len.min(ID_BYTES as u32),
            _ => 0,
        };
        data + 1
    }
}

/// Why a chain was refused; each maps to a status and is logged at debug level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    /// The chain has no descriptor at all.
    #[error("empty descriptor chain")]
    EmptyChain,
    /// More descriptors than the advertised seg_max allows.
    #[error("chain has more than {MAX_CHAIN} descriptors")]
    ChainTooLong,
    /// A device-readable buffer follows a device-writable one.
    #[error("a readable descriptor follows a writable one")]
    ReadableAfterWritable,
    /// The last descriptor is not device-writable (or is empty): no room for the status.
    #[error("no writable status byte at the end of the chain")]
    NoStatusByte,
    /// The readable part is shorter than the 16-byte header.
    #[error("request header is {0} bytes, expected 16")]
    ShortHeader(usize),
    /// A buffer lies (partly) outside the guest's memory.
    #[error("buffer at guest address {addr:#x} (+{len}) is outside guest memory")]
    OutsideMemory {
        /// Guest physical address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// The request type is not one udm implements.
    #[error("unsupported request type {0}")]
    UnknownType(u32),
    /// The request reaches past the end of the device.
    #[error("sectors {sector}..+{sectors} are past the capacity of {capacity} sectors")]
    PastCapacity {
        /// First sector.
        sector: u64,
        /// Length.
        sectors: u64,
        /// Device size.
        capacity: u64,
    },
    /// A write, discard or write-zeroes to a read-only export.
    #[error("write to a read-only export")]
    ReadOnly,
    /// The data length is not a whole number of blocks.
    #[error("data length {len} is not a multiple of the {block} byte block size")]
    BadLength {
        /// Data bytes.
        len: u64,
        /// Block size.
        block: u32,
    },
    /// The start sector is not aligned to the logical block size.
    #[error("sector {0} is not aligned to the logical block size")]
    Misaligned(u64),
    /// More data than the advertised limits.
    #[error("{len} bytes in {segments} segments exceed the export's limits")]
    TooLarge {
        /// Bytes.
        len: u64,
        /// Segments after translation.
        segments: usize,
    },
    /// A discard or write-zeroes request has no range or more than one.
    #[error("discard/write-zeroes carries {0} bytes of ranges, expected one 16-byte range")]
    BadRanges(usize),
    /// Discard with the unmap flag, or unknown flags (the spec requires UNSUPP).
    #[error("unsupported discard/write-zeroes flags {0:#x}")]
    BadFlags(u32),
    /// The descriptor chain itself is malformed (see `chain::ChainWalk::broken`).
    #[error("malformed descriptor chain: {0}")]
    BrokenChain(&'static str),
    /// A data direction that the operation does not use.
    #[error("{0:?} request carries data in the wrong direction")]
    WrongDirection(BlkOp),
}

impl Reason {
    /// The virtio status the driver gets.
    pub fn status(&self) -> u8 {
        match self {
            Reason::UnknownType(_) | Reason::BadFlags(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A refused chain: answer `status` at `status_addr` (when there is a usable status
/// byte), used length 1 (or 0 without a status byte).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Where the status byte goes, if the chain has one in guest memory.
    pub status_addr: Option<GuestAddress>,
    /// Why.
    pub reason: Reason,
}

/// A byte window over part of the collected descriptors.
struct Stream<'a> {
    descs: &'a [Desc],
    skip: u64,
    len: u64,
}

impl Stream<'_> {
    /// Calls `f(addr, len)` for each piece of the window, in order.
    fn pieces(&self, mut f: impl FnMut(u64, u64) -> Result<(), Reason>) -> Result<(), Reason> {
        let mut skip = self.skip;
        let mut left = self.len;
        for d in self.descs {
            if left == 0 {
                break;
            }
            let dlen = u64::from(d.len);
            if skip >= dlen {
                skip -= dlen;
                continue;
            }
            let n = (dlen - skip).min(left);
            let addr = d.addr.checked_add(skip).ok_or(Reason::OutsideMemory { addr: d.addr, len: dlen })?;
            f(addr, n)?;
            left -= n;
            skip = 0;
        }
        Ok(())
    }
}

/// Parses a chain. Data segments are appended to `segs` (cleared first; never grown past
/// its capacity, so the vector's buffer never moves while requests use it). `descs` is the
/// caller's scratch space for the chain's descriptors (reused, so parsing allocates and
/// initialises nothing per request).
pub fn parse_chain(
    mem: &GuestMem,
    chain: impl Iterator<Item = Desc>,
    limits: &Limits,
    segs: &mut Vec<IoSegment>,
    descs: &mut Vec<Desc>,
) -> Result<BlkRequest, Rejection> {
    segs.clear();
    descs.clear();
    let mut n = 0usize;
    let mut total = 0usize;
    let mut readable = 0usize;
    let mut order_ok = true;
    let mut seen_writable = false;
    let mut last = None;
    for d in chain {
        if d.writable {
            seen_writable = true;
        } else if seen_writable {
            order_ok = false;
        } else {
            readable += 1;
        }
        if n < MAX_CHAIN {
            descs.push(d);
            n += 1;
        }
        total += 1;
        last = Some(d);
    }
    let status_addr = match last {
        Some(d) if d.writable && d.len > 0 => {
            let addr = GuestAddress(d.addr.wrapping_add(u64::from(d.len) - 1));
            mem.host_range(addr.0, 1).is_some().then_some(addr)
        }
        _ => None,
    };
    let reject = |reason| Rejection { status_addr, reason };
    if total == 0 {
        return Err(reject(Reason::EmptyChain));
    }
    let Some(status) = status_addr else {
        return Err(reject(match last {
            Some(d) if d.writable && d.len > 0 => {
                Reason::OutsideMemory { addr: d.addr.wrapping_add(u64::from(d.len) - 1), len: 1 }
            }
            _ => Reason::NoStatusByte,
        }));
    };
    if total > MAX_CHAIN {
        return Err(reject(Reason::ChainTooLong));
    }
    if !order_ok {
        return Err(reject(Reason::ReadableAfterWritable));
    }
    let (rd, wr) = descs[..n].split_at(readable);
    let out_len: u64 = rd.iter().map(|d| u64::from(d.len)).sum();
    // The status byte is the last writable byte; everything before it is read data.
    let in_len: u64 = wr.iter().map(|d| u64::from(d.len)).sum::<u64>() - 1;
    if out_len < HEADER_LEN as u64 {
        return Err(reject(Reason::ShortHeader(out_len as usize)));
    }
    // Drivers put the header in a buffer of its own or at the start of the first one.
    let header = match rd.first().filter(|d| d.len as usize >= HEADER_LEN).and_then(|d| mem.read_array(d.addr)) {
        Some(h) => h,
        None => {
            let mut h = [0u8; HEADER_LEN];
            read_stream(mem, &Stream { descs: rd, skip: 0, len: HEADER_LEN as u64 }, &mut h).map_err(reject)?;
            h
        }
    };
    let kind = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let out_data = Stream { descs: rd, skip: HEADER_LEN as u64, len: out_len - HEADER_LEN as u64 };
    let in_data = Stream { descs: wr, skip: 0, len: in_len };
    let block = u64::from(limits.block_size.max(512));
    let block_sectors = block / SECTOR_SIZE;
    let check_range = |sector: u64, sectors: u64| -> Result<(), Reason> {
        let end = sector.checked_add(sectors);
        if end.is_none_or(|e| e > limits.capacity) {
            return Err(Reason::PastCapacity { sector, sectors, capacity: limits.capacity });
        }
        if !sector.is_multiple_of(block_sectors) {
            return Err(Reason::Misaligned(sector));
        }
        Ok(())
    };
    let req = match kind {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
            let (op, data) = if kind == VIRTIO_BLK_T_IN {
                if out_data.len != 0 {
                    return Err(reject(Reason::WrongDirection(BlkOp::Read)));
                }
                (BlkOp::Read, &in_data)
            } else {
                if limits.read_only {
                    return Err(reject(Reason::ReadOnly));
                }
                if in_data.len != 0 {
                    return Err(reject(Reason::WrongDirection(BlkOp::Write)));
                }
                (BlkOp::Write, &out_data)
            };
            if data.len == 0 || !data.len.is_multiple_of(block) {
                return Err(reject(Reason::BadLength { len: data.len, block: limits.block_size }));
            }
            if data.len > u64::from(limits.max_transfer) {
                return Err(reject(Reason::TooLarge { len: data.len, segments: 0 }));
            }
            check_range(sector, data.len / SECTOR_SIZE).map_err(reject)?;
            translate(mem, data, segs, limits.seg_max as usize).map_err(reject)?;
            BlkRequest { op, sector, sectors: data.len / SECTOR_SIZE, status, in_data_len: in_len as u32 }
        }
        VIRTIO_BLK_T_FLUSH => BlkRequest { op: BlkOp::Flush, sector: 0, sectors: 0, status, in_data_len: 0 },
        VIRTIO_BLK_T_GET_ID => {
            if in_data.len == 0 {
                return Err(reject(Reason::WrongDirection(BlkOp::GetId)));
            }
            // The id is 20 bytes: only they are mapped and written, whatever the guest
            // offers (a buffer of gigabytes is legal, and must not become a huge I/O).
            let id_len = in_data.len.min(ID_BYTES as u64);
            translate(mem, &Stream { len: id_len, ..in_data }, segs, limits.seg_max as usize).map_err(reject)?;
            BlkRequest { op: BlkOp::GetId, sector: 0, sectors: 0, status, in_data_len: id_len as u32 }
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let op = if kind == VIRTIO_BLK_T_DISCARD { BlkOp::Discard } else { BlkOp::WriteZeroes };
            if limits.read_only {
                return Err(reject(Reason::ReadOnly));
            }
            if out_data.len != RANGE_LEN as u64 {
                return Err(reject(Reason::BadRanges(out_data.len as usize)));
            }
            let mut range = [0u8; RANGE_LEN];
            read_stream(mem, &out_data, &mut range).map_err(reject)?;
            let sector = u64::from_le_bytes(range[0..8].try_into().expect("8 bytes"));
            let sectors = u64::from(u32::from_le_bytes(range[8..12].try_into().expect("4 bytes")));
            let flags = u32::from_le_bytes(range[12..16].try_into().expect("4 bytes"));
            let allowed = if op == BlkOp::WriteZeroes { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
            if flags & !allowed != 0 {
                return Err(reject(Reason::BadFlags(flags)));
            }
            if sectors > u64::from(limits.max_discard_sectors) {
                return Err(reject(Reason::TooLarge { len: sectors * SECTOR_SIZE, segments: 1 }));
            }
            if !sectors.is_multiple_of(block_sectors) {
                return Err(reject(Reason::BadLength { len: sectors * SECTOR_SIZE, block: limits.block_size }));
            }
            check_range(sector, sectors).map_err(reject)?;
            BlkRequest { op, sector, sectors, status, in_data_len: 0 }
        }
        other => return Err(reject(Reason::UnknownType(other))),
    };
    Ok(req)
}

/// Copies the window into `out` (headers and ranges only: a few bytes).
fn read_stream(mem: &GuestMem, s: &Stream<'_>, out: &mut [u8]) -> Result<(), Reason> {
    let mut done = 0usize;
    s.pieces(|addr, len| {
        let n = len as usize;
        mem.read_slice(&mut out[done..done + n], GuestAddress(addr))
            .map_err(|_| Reason::OutsideMemory { addr, len })?;
        done += n;
        Ok(())
    })
}

/// Translates the window into host segments (zero copy), at most `max` of them and never
/// more than `segs` can hold without reallocating.
fn translate(mem: &GuestMem, s: &Stream<'_>, segs: &mut Vec<IoSegment>, max: usize) -> Result<(), Reason> {
    let cap = segs.capacity().min(max);
    s.pieces(|addr, len| {
        let mut full = false;
        mem.for_each_piece(addr, len, |host, n| {
            if segs.len() == cap {
                full = true;
                return false;
            }
            // SAFETY: the piece lies inside a region of guest memory mapped by the export;
            // the worker keeps that mapping alive (it holds the memory's Arc) until every
            // request using these segments has completed.
            segs.push(unsafe { IoSegment::new(host, n as usize) });
            true
        })
        .ok_or(if full {
            Reason::TooLarge { len: s.len, segments: segs.len() + 1 }
        } else {
            Reason::OutsideMemory { addr, len }
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use udm_drivers::DeviceInfo;
    use vm_memory::GuestAddress as GA;

    fn mem() -> GuestMem {
        GuestMem::from_ranges(&[(GA(0), 1 << 20), (GA(2 << 20), 1 << 20)]).unwrap()
    }

    fn limits(ro: bool) -> Limits {
        Limits::new(&DeviceInfo::new(1 << 12, 512), ro)
    }

    fn header(mem: &GuestMem, at: u64, kind: u32, sector: u64) -> Desc {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GA(at)).unwrap();
        Desc { addr: at, len: 16, writable: false }
    }

    fn parse(mem: &GuestMem, d: &[Desc], ro: bool) -> (Result<BlkRequest, Rejection>, usize) {
        let mut segs = Vec::with_capacity(MAX_CHAIN);
        let r = parse_chain(mem, d.iter().copied(), &limits(ro), &mut segs, &mut Vec::new());
        (r, segs.len())
    }

    const STATUS: Desc = Desc { addr: 0x9000, len: 1, writable: true };

    #[test]
    fn reads_and_writes_point_into_guest_memory() {
        let m = mem();
        let h = header(&m, 0x100, VIRTIO_BLK_T_IN, 8);
        let data = Desc { addr: 0x1000, len: 4096, writable: true };
        let (r, n) = parse(&m, &[h, data, STATUS], false);
        let r = r.unwrap();
        assert_eq!((r.op, r.sector, r.sectors, n), (BlkOp::Read, 8, 8, 1));
        assert_eq!(r.status, GA(0x9000));
        assert_eq!(r.used_len(STATUS_OK), 4097);
        // Header, data and status merged into one writable tail still parses.
        let h = header(&m, 0x100, VIRTIO_BLK_T_OUT, 0);
        let d1 = Desc { addr: 0x2000, len: 512, writable: false };
        let d2 = Desc { addr: 0x3000, len: 512, writable: false };
        let (r, n) = parse(&m, &[h, d1, d2, STATUS], false);
        assert_eq!((r.unwrap().op, n), (BlkOp::Write, 2));
    }

    #[test]
    fn a_buffer_spanning_two_memory_regions_becomes_two_segments_or_fails_cleanly() {
        let m = mem();
        let h = header(&m, 0x100, VIRTIO_BLK_T_IN, 0);
        // 0x100000..0x200000 is a hole between the regions.
        let gap = Desc { addr: (1 << 20) - 512, len: 1024, writable: true };
        let (r, _) = parse(&m, &[h, gap, STATUS], false);
        assert!(matches!(r.unwrap_err().reason, Reason::OutsideMemory { .. }));
    }

    #[test]
    fn every_bad_chain_gets_its_status() {
        let m = mem();
        let data_in = Desc { addr: 0x1000, len: 512, writable: true };
        let data_out = Desc { addr: 0x1000, len: 512, writable: false };
        let cases: Vec<(Vec<Desc>, Reason, Option<u8>)> = vec![
            (vec![], Reason::EmptyChain, None),
            (vec![header(&m, 0x140, VIRTIO_BLK_T_IN, 0)], Reason::NoStatusByte, None),
            (vec![Desc { addr: 0x100, len: 8, writable: false }, STATUS], Reason::ShortHeader(8), Some(STATUS_IOERR)),
            (vec![header(&m, 0x180, 99, 0), STATUS], Reason::UnknownType(99), Some(STATUS_UNSUPP)),
            (
                vec![header(&m, 0x1c0, VIRTIO_BLK_T_IN, 4095), Desc { len: 1024, ..data_in }, STATUS],
                Reason::PastCapacity { sector: 4095, sectors: 2, capacity: 4096 },
                Some(STATUS_IOERR),
            ),
            (
                vec![header(&m, 0x200, VIRTIO_BLK_T_IN, 0), Desc { len: 100, ..data_in }, STATUS],
                Reason::BadLength { len: 100, block: 512 },
                Some(STATUS_IOERR),
            ),
            (
                vec![header(&m, 0x240, VIRTIO_BLK_T_IN, 0), STATUS, data_out, STATUS],
                Reason::ReadableAfterWritable,
                Some(STATUS_IOERR),
            ),
            (
                vec![
                    header(&m, 0x280, VIRTIO_BLK_T_IN, 0),
                    Desc { addr: 0x7000_0000, len: 512, writable: true },
                    STATUS,
                ],
                Reason::OutsideMemory { addr: 0x7000_0000, len: 512 },
                Some(STATUS_IOERR),
            ),
            (
                vec![header(&m, 0x2c0, VIRTIO_BLK_T_IN, 0), Desc { addr: 0x7000_0000, len: 1, writable: true }],
                Reason::OutsideMemory { addr: 0x7000_0000, len: 1 },
                None,
            ),
        ];
        for (chain, reason, status) in cases {
            let (r, _) = parse(&m, &chain, false);
            let e = r.unwrap_err();
            assert_eq!(e.reason, reason, "{chain:?}");
            assert_eq!(e.status_addr.map(|_| e.reason.status()), status, "{chain:?}");
        }
        let (r, _) = parse(&m, &[header(&m, 0x100, VIRTIO_BLK_T_OUT, 0), data_out, STATUS], true);
        assert_eq!(r.unwrap_err().reason, Reason::ReadOnly);
        let (r, _) = parse(&m, &[header(&m, 0x100, VIRTIO_BLK_T_IN, 0), data_in, STATUS], true);
        assert!(r.is_ok());
    }

    #[test]
    fn discard_and_write_zeroes_carry_one_range() {
        let m = mem();
        let mut range = [0u8; 16];
        range[0..8].copy_from_slice(&64u64.to_le_bytes());
        range[8..12].copy_from_slice(&32u32.to_le_bytes());
        m.write_slice(&range, GA(0x400)).unwrap();
        let rd = Desc { addr: 0x400, len: 16, writable: false };
        let (r, _) = parse(&m, &[header(&m, 0x100, VIRTIO_BLK_T_DISCARD, 0), rd, STATUS], false);
        let r = r.unwrap();
        assert_eq!((r.op, r.sector, r.sectors), (BlkOp::Discard, 64, 32));
        range[12..16].copy_from_slice(&1u32.to_le_bytes());
        m.write_slice(&range, GA(0x400)).unwrap();
        let (r, _) = parse(&m, &[header(&m, 0x100, VIRTIO_BLK_T_DISCARD, 0), rd, STATUS], false);
        assert_eq!(r.unwrap_err().reason.status(), STATUS_UNSUPP);
        let (r, _) = parse(&m, &[header(&m, 0x100, VIRTIO_BLK_T_WRITE_ZEROES, 0), rd, STATUS], false);
        assert_eq!(r.unwrap().op, BlkOp::WriteZeroes);
    }

    /// Issue 10, defect 1: a GET_ID whose writable buffers add up to more than 4 GiB
    /// maps only the 20 bytes of the id.
    #[test]
    fn get_id_maps_at_most_the_twenty_bytes_of_the_id() {
        let m = mem();
        let huge = Desc { addr: 0x1000, len: u32::MAX, writable: true };
        let (r, n) = parse(&m, &[header(&m, 0x100, VIRTIO_BLK_T_GET_ID, 0), huge, huge, STATUS], false);
        // The buffers reach past guest memory, but only the id's 20 bytes are looked at.
        let r = r.unwrap();
        assert_eq!((r.op, r.in_data_len, n), (BlkOp::GetId, ID_BYTES as u32, 1));
        assert_eq!(r.used_len(STATUS_OK), ID_BYTES as u32 + 1);
        let short = Desc { addr: 0x1000, len: 8, writable: true };
        let (r, _) = parse(&m, &[header(&m, 0x100, VIRTIO_BLK_T_GET_ID, 0), short, STATUS], false);
        assert_eq!(r.unwrap().in_data_len, 8);
    }

    #[test]
    fn too_many_segments_fail_without_growing_the_vector() {
        let m = mem();
        let mut chain = vec![header(&m, 0x100, VIRTIO_BLK_T_IN, 0)];
        chain.extend((0..MAX_CHAIN as u64).map(|i| Desc { addr: 0x1000 + i * 512, len: 512, writable: true }));
        chain.push(STATUS);
        let (r, _) = parse(&m, &chain, false);
        assert_eq!(r.unwrap_err().reason, Reason::ChainTooLong);
    }
}
