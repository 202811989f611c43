//! What the virtio-blk request fuzz target checks, shared with the bounded proptest run
//! in `server/tests/request_fuzz.rs` (included there by path).
//!
//! The input builds a guest (two memory regions with a hole between, filled from the
//! input so headers and ranges hold arbitrary values), export limits, and a descriptor
//! chain. `parse_chain` must never panic, and:
//! 1. an accepted request only points into guest memory, covers exactly its sectors,
//!    stays inside the capacity, and is not a write on a read-only export;
//! 2. the status byte (accepted or refused) is the last byte of the last writable
//!    descriptor and lies in guest memory;
//! 3. the segment vector never grows past its capacity.

use udm_drivers::{DeviceInfo, SECTOR_SIZE};
use udm_server::vhost_blk::config_space::Limits;
use udm_server::vhost_blk::request::{parse_chain, BlkOp, Desc, GuestMem, MAX_CHAIN};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion};

const REGION: u64 = 64 << 10;
const SECOND: u64 = 192 << 10;

/// Runs every check on `data`.
pub fn check_chain(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let (cfg, rest) = data.split_at(4);
    let mem = GuestMem::from_ranges(&[(GuestAddress(0), REGION as usize), (GuestAddress(SECOND), REGION as usize)])
        .expect("static layout");
    // The oracle: vm-memory's own region collection, not udm's lookup.
    let regions = mem.physical_memory().expect("backed by mmap regions");
    let fill = rest.len().min(REGION as usize);
    mem.write_slice(&rest[..fill], GuestAddress(0)).expect("inside region 0");
    let block = [512u32, 4096][usize::from(cfg[0] & 1)];
    let sectors = u64::from(u16::from_le_bytes([cfg[1], cfg[2]])) * u64::from(block / 512);
    let mut info = DeviceInfo::new(sectors.max(8), block);
    info.max_transfer = 64 << 10;
    let limits = Limits::new(&info, cfg[0] & 2 != 0);
    let descs: Vec<Desc> = rest
        .chunks_exact(9)
        .take(usize::from(cfg[3]) % (MAX_CHAIN + 8))
        .map(|c| {
            // Addresses land in region 0, the hole, region 1 or far away.
            let raw = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            let addr = match c[8] & 0xc0 {
                0x00 => u64::from(raw) % REGION,
                0x40 => SECOND + u64::from(raw) % (REGION + 4096) - 2048,
                0x80 => REGION + u64::from(raw) % (SECOND - REGION),
                _ => u64::from(raw) << 20,
            };
            let len = u32::from_le_bytes([c[4], c[5], c[6], c[7]]) % (REGION as u32 + 1024);
            Desc { addr, len, writable: c[8] & 1 != 0 }
        })
        .collect();
    let mut segs = Vec::with_capacity(MAX_CHAIN);
    let cap = segs.capacity();
    let result = parse_chain(&mem, descs.iter().copied(), &limits, &mut segs, &mut Vec::new());
    assert_eq!(segs.capacity(), cap, "the segment vector was reallocated");
    let last_writable_byte =
        descs.last().filter(|d| d.writable && d.len > 0).map(|d| GuestAddress(d.addr + u64::from(d.len) - 1));
    let in_memory = |addr: u64, len: u64| {
        regions.iter().any(|r| {
            let start = r.start_addr().0;
            addr >= start && addr + len <= start + r.len()
        })
    };
    match result {
        Ok(req) => {
            assert_eq!(Some(req.status), last_writable_byte);
            assert!(in_memory(req.status.0, 1));
            assert!(req.sector + req.sectors <= limits.capacity, "{req:?} past {}", limits.capacity);
            if limits.read_only {
                assert!(matches!(req.op, BlkOp::Read | BlkOp::Flush | BlkOp::GetId), "{req:?} on a read-only export");
            }
            let total: usize = segs.iter().map(|s| s.len()).sum();
            if matches!(req.op, BlkOp::Read | BlkOp::Write) {
                assert_eq!(total as u64, req.sectors * SECTOR_SIZE);
                assert!(req.sectors > 0 && (req.sectors * SECTOR_SIZE).is_multiple_of(u64::from(block)));
            }
            for s in &segs {
                let host = s.base() as u64;
                let inside = regions.iter().any(|r| {
                    let base = r.as_ptr() as u64;
                    host >= base && host + s.len() as u64 <= base + r.len()
                });
                assert!(inside, "segment outside guest memory");
            }
        }
        Err(rej) => {
            if let Some(addr) = rej.status_addr {
                assert_eq!(Some(addr), last_writable_byte);
                assert!(in_memory(addr.0, 1));
            }
        }
    }
}
