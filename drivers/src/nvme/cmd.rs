//! Submission and completion queue entries (NVMe Base Specification 2.0, 4.2 and 4.6)
//! and the commands udm sends.

/// A 64-byte submission queue entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Command {
    /// Opcode (bits 7:0), fused operation (9:8), PRP/SGL selector (15:14), command
    /// identifier (31:16).
    pub cdw0: u32,
    /// Namespace identifier.
    pub nsid: u32,
    /// Command dwords 2 and 3 (reserved for the commands udm sends).
    pub cdw2: u32,
    /// See `cdw2`.
    pub cdw3: u32,
    /// Metadata pointer (unused: udm formats namespaces without metadata).
    pub mptr: u64,
    /// PRP entry 1: the first data page (with an offset).
    pub prp1: u64,
    /// PRP entry 2: the second page, or the address of a PRP list.
    pub prp2: u64,
    /// Command-specific dwords 10 to 15.
    pub cdw10: u32,
    /// See `cdw10`.
    pub cdw11: u32,
    /// See `cdw10`.
    pub cdw12: u32,
    /// See `cdw10`.
    pub cdw13: u32,
    /// See `cdw10`.
    pub cdw14: u32,
    /// See `cdw10`.
    pub cdw15: u32,
}

const _: () = assert!(std::mem::size_of::<Command>() == 64);

/// A 16-byte completion queue entry.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompletionEntry {
    /// Command-specific result.
    pub dw0: u32,
    /// Reserved.
    pub dw1: u32,
    /// How far the controller has consumed the submission queue.
    pub sq_head: u16,
    /// Which submission queue the command came from.
    pub sq_id: u16,
    /// The command identifier.
    pub cid: u16,
    /// Phase tag (bit 0) and status (bits 15:1).
    pub status: u16,
}

const _: () = assert!(std::mem::size_of::<CompletionEntry>() == 16);

impl CompletionEntry {
    /// The phase tag.
    #[inline]
    pub fn phase(&self) -> bool {
        self.status & 1 != 0
    }

    /// Status Code Type (3 bits) and Status Code (8 bits); (0, 0) is success.
    #[inline]
    pub fn status_code(&self) -> (u8, u8) {
        (((self.status >> 9) & 0x7) as u8, ((self.status >> 1) & 0xff) as u8)
    }

    /// Do Not Retry: the same command would fail again.
    pub fn do_not_retry(&self) -> bool {
        self.status & (1 << 15) != 0
    }
}

/// Admin command opcodes (5.1).
pub mod admin {
    /// Delete I/O Submission Queue.
    pub const DELETE_SQ: u8 = 0x00;
    /// Create I/O Submission Queue.
    pub const CREATE_SQ: u8 = 0x01;
    /// Delete I/O Completion Queue.
    pub const DELETE_CQ: u8 = 0x04;
    /// Create I/O Completion Queue.
    pub const CREATE_CQ: u8 = 0x05;
    /// Identify.
    pub const IDENTIFY: u8 = 0x06;
    /// Abort.
    pub const ABORT: u8 = 0x08;
    /// Set Features.
    pub const SET_FEATURES: u8 = 0x09;
    /// Get Features.
    pub const GET_FEATURES: u8 = 0x0a;
    /// Doorbell Buffer Config (shadow doorbells, 5.8).
    pub const DOORBELL_BUFFER_CONFIG: u8 = 0x7c;
}

/// NVM command set I/O opcodes (NVM Command Set Specification, 3).
pub mod io {
    /// Flush.
    pub const FLUSH: u8 = 0x00;
    /// Write.
    pub const WRITE: u8 = 0x01;
    /// Read.
    pub const READ: u8 = 0x02;
    /// Write Zeroes.
    pub const WRITE_ZEROES: u8 = 0x08;
    /// Dataset Management.
    pub const DSM: u8 = 0x09;
}

/// Identify CNS values.
pub mod cns {
    /// Identify Namespace.
    pub const NAMESPACE: u32 = 0x00;
    /// Identify Controller.
    pub const CONTROLLER: u32 = 0x01;
    /// Active Namespace ID list.
    pub const ACTIVE_NAMESPACES: u32 = 0x02;
}

/// Feature identifiers.
pub mod feature {
    /// Volatile Write Cache.
    pub const VOLATILE_WRITE_CACHE: u8 = 0x06;
    /// Number of Queues.
    pub const NUMBER_OF_QUEUES: u8 = 0x07;
}

impl Command {
    /// A command with `opcode` and nothing else.
    pub fn new(opcode: u8) -> Self {
        Command { cdw0: u32::from(opcode), ..Default::default() }
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        self.cdw0 as u8
    }

    /// Sets the command identifier.
    #[inline]
    pub fn set_cid(&mut self, cid: u16) {
        self.cdw0 = (self.cdw0 & 0xffff) | (u32::from(cid) << 16);
    }

    /// The command identifier.
    pub fn cid(&self) -> u16 {
        (self.cdw0 >> 16) as u16
    }

    /// Identify with `cns` for `nsid`, into the page at `prp1`.
    pub fn identify(cns: u32, nsid: u32, prp1: u64) -> Self {
        Command { nsid, prp1, cdw10: cns, ..Command::new(admin::IDENTIFY) }
    }

    /// Create I/O Completion Queue `qid` of `entries` entries at `prp1`: physically
    /// contiguous, interrupts disabled (udm polls).
    pub fn create_cq(qid: u16, entries: u16, prp1: u64) -> Self {
        Command {
            prp1,
            cdw10: (u32::from(entries - 1) << 16) | u32::from(qid),
            cdw11: 1, // PC=1, IEN=0
            ..Command::new(admin::CREATE_CQ)
        }
    }

    /// Create I/O Submission Queue `qid` of `entries` entries at `prp1`, completing
    /// into completion queue `cqid`.
    pub fn create_sq(qid: u16, entries: u16, prp1: u64, cqid: u16) -> Self {
        Command {
            prp1,
            cdw10: (u32::from(entries - 1) << 16) | u32::from(qid),
            cdw11: (u32::from(cqid) << 16) | 1, // PC=1, priority ignored (round robin)
            ..Command::new(admin::CREATE_SQ)
        }
    }

    /// Delete I/O Submission Queue `qid`.
    pub fn delete_sq(qid: u16) -> Self {
        Command { cdw10: u32::from(qid), ..Command::new(admin::DELETE_SQ) }
    }

    /// Delete I/O Completion Queue `qid`.
    pub fn delete_cq(qid: u16) -> Self {
        Command { cdw10: u32::from(qid), ..Command::new(admin::DELETE_CQ) }
    }

    /// Set Features `fid` with `value` in CDW11.
    pub fn set_features(fid: u8, value: u32) -> Self {
        Command { cdw10: u32::from(fid), cdw11: value, ..Command::new(admin::SET_FEATURES) }
    }

    /// Get Features `fid` (current value).
    pub fn get_features(fid: u8) -> Self {
        Command { cdw10: u32::from(fid), ..Command::new(admin::GET_FEATURES) }
    }

    /// Abort command `cid` of submission queue `sqid`.
    pub fn abort(sqid: u16, cid: u16) -> Self {
        Command { cdw10: (u32::from(cid) << 16) | u32::from(sqid), ..Command::new(admin::ABORT) }
    }

    /// Doorbell Buffer Config: shadow doorbells at `shadow`, event indexes at `eventidx`.
    pub fn doorbell_buffer_config(shadow: u64, eventidx: u64) -> Self {
        Command { prp1: shadow, prp2: eventidx, ..Command::new(admin::DOORBELL_BUFFER_CONFIG) }
    }

    /// Read or Write of `blocks` logical blocks at `lba`, data at PRP1 and PRP2 (from
    /// `prp::build`).
    #[inline]
    pub fn read_write(opcode: u8, nsid: u32, lba: u64, blocks: u32, fua: bool, (prp1, prp2): (u64, u64)) -> Self {
        Command {
            nsid,
            prp1,
            prp2,
            cdw10: lba as u32,
            cdw11: (lba >> 32) as u32,
            cdw12: (blocks - 1) | (u32::from(fua) << 30),
            ..Command::new(opcode)
        }
    }

    /// Write Zeroes of `blocks` (at most 65536) at `lba`.
    pub fn write_zeroes(nsid: u32, lba: u64, blocks: u32) -> Self {
        Command {
            nsid,
            cdw10: lba as u32,
            cdw11: (lba >> 32) as u32,
            cdw12: blocks - 1,
            ..Command::new(io::WRITE_ZEROES)
        }
    }

    /// Dataset Management, deallocate, with `ranges` 16-byte range entries at `prp1`.
    pub fn deallocate(nsid: u32, ranges: u32, prp1: u64) -> Self {
        Command { nsid, prp1, cdw10: ranges - 1, cdw11: 1 << 2, ..Command::new(io::DSM) }
    }

    /// Flush.
    pub fn flush(nsid: u32) -> Self {
        Command { nsid, ..Command::new(io::FLUSH) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_fields_where_the_specification_puts_them() {
        let mut c = Command::read_write(io::READ, 1, 0x1_0000_0002, 8, true, (0x5000_0200, 0x9000));
        c.set_cid(0xbeef);
        assert_eq!((c.prp1, c.prp2), (0x5000_0200, 0x9000));
        assert_eq!(c.opcode(), io::READ);
        assert_eq!(c.cid(), 0xbeef);
        assert_eq!((c.cdw10, c.cdw11, c.cdw12), (2, 1, 7 | 1 << 30));
        let q = Command::create_sq(3, 1024, 0x1000, 3);
        assert_eq!(q.cdw10, (1023 << 16) | 3);
        assert_eq!(q.cdw11, (3 << 16) | 1);
        let e = CompletionEntry { status: (2 << 9) | (0x81 << 1) | 1 | (1 << 15), ..Default::default() };
        assert!(e.phase());
        assert_eq!(e.status_code(), (2, 0x81));
        assert!(e.do_not_retry());
    }
}
