//! Controller registers in BAR0 (NVMe Base Specification 2.0, section 3.1.3) and the
//! doorbells after them. Every access is volatile: the device changes these at will.

use std::ptr::NonNull;

/// Controller Capabilities (CAP, offset 0x00).
pub const CAP: usize = 0x00;
/// Version (VS, offset 0x08).
pub const VS: usize = 0x08;
/// Interrupt Mask Set (INTMS): udm masks everything, it polls.
pub const INTMS: usize = 0x0c;
/// Controller Configuration (CC, offset 0x14).
pub const CC: usize = 0x14;
/// Controller Status (CSTS, offset 0x1c).
pub const CSTS: usize = 0x1c;
/// Admin Queue Attributes (AQA, offset 0x24).
pub const AQA: usize = 0x24;
/// Admin Submission Queue Base Address (ASQ, offset 0x28).
pub const ASQ: usize = 0x28;
/// Admin Completion Queue Base Address (ACQ, offset 0x30).
pub const ACQ: usize = 0x30;
/// First doorbell (SQ 0 tail); the rest follow with a stride of 4 << CAP.DSTRD.
pub const DOORBELLS: usize = 0x1000;

/// CC.EN: the controller processes commands.
pub const CC_EN: u32 = 1;
/// CC.CSS = NVM command set (000b), CC.MPS = 4 KiB (0), CC.AMS = round robin (0),
/// CC.IOSQES = 6 (64-byte entries), CC.IOCQES = 4 (16-byte entries).
pub const CC_IO_ENTRY_SIZES: u32 = (6 << 16) | (4 << 20);
/// CC.SHN = 01b, normal shutdown notification.
pub const CC_SHN_NORMAL: u32 = 1 << 14;
/// CC.SHN mask.
pub const CC_SHN_MASK: u32 = 3 << 14;
/// CSTS.RDY.
pub const CSTS_RDY: u32 = 1;
/// CSTS.CFS: controller fatal status.
pub const CSTS_CFS: u32 = 1 << 1;
/// CSTS.SHST mask; 10b = shutdown processing complete.
pub const CSTS_SHST_MASK: u32 = 3 << 2;
/// CSTS.SHST = shutdown complete.
pub const CSTS_SHST_COMPLETE: u32 = 2 << 2;

/// The fields of CAP udm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Maximum Queue Entries Supported (0-based in the register; here the real count).
    pub max_queue_entries: u32,
    /// Contiguous Queues Required.
    pub contiguous_queues_required: bool,
    /// Worst-case time to become ready or not ready, in milliseconds (CAP.TO x 500 ms).
    pub timeout_ms: u64,
    /// Doorbell stride in bytes (4 << CAP.DSTRD).
    pub doorbell_stride: usize,
    /// Smallest memory page size the controller supports, in bytes.
    pub min_page_size: usize,
    /// Largest memory page size, in bytes.
    pub max_page_size: usize,
    /// The NVM command set is supported (CAP.CSS bit 0).
    pub nvm_command_set: bool,
}

impl Capabilities {
    /// Decodes the CAP register.
    pub fn decode(cap: u64) -> Self {
        Capabilities {
            max_queue_entries: (cap & 0xffff) as u32 + 1,
            contiguous_queues_required: cap & (1 << 16) != 0,
            timeout_ms: ((cap >> 24) & 0xff) * 500,
            doorbell_stride: 4 << ((cap >> 32) & 0xf),
            min_page_size: 1 << (12 + ((cap >> 48) & 0xf)),
            max_page_size: 1 << (12 + ((cap >> 52) & 0xf)),
            nvm_command_set: (cap >> 37) & 1 != 0,
        }
    }
}

/// The mapped BAR0 of one controller.
#[derive(Debug)]
pub struct Registers {
    base: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is device memory shared with the controller; every access is a
// volatile read or write of an aligned register, which the device tolerates from any
// thread (doorbells of one queue are only written by the queue's owner).
unsafe impl Send for Registers {}
// SAFETY: see Send.
unsafe impl Sync for Registers {}

impl Registers {
    /// Wraps a BAR0 mapping.
    ///
    /// # Safety
    /// `base..base+len` must be a mapping of the controller's BAR0 that outlives this value.
    pub unsafe fn new(base: NonNull<u8>, len: usize) -> Self {
        Registers { base, len }
    }

    fn check(&self, offset: usize, size: usize) {
        assert!(offset + size <= self.len && offset.is_multiple_of(size), "register {offset:#x} outside BAR0");
    }

    /// Reads a 32-bit register.
    #[inline]
    pub fn read32(&self, offset: usize) -> u32 {
        self.check(offset, 4);
        // SAFETY: inside the BAR mapping (checked) and 4-byte aligned.
        unsafe { std::ptr::read_volatile(self.base.as_ptr().add(offset).cast::<u32>()) }
    }

    /// Writes a 32-bit register.
    #[inline]
    pub fn write32(&self, offset: usize, value: u32) {
        self.check(offset, 4);
        // SAFETY: inside the BAR mapping (checked) and 4-byte aligned.
        unsafe { std::ptr::write_volatile(self.base.as_ptr().add(offset).cast::<u32>(), value) }
    }

    /// Reads a 64-bit register as two 32-bit halves, low first (the specification
    /// allows controllers that only take 32-bit accesses).
    pub fn read64(&self, offset: usize) -> u64 {
        u64::from(self.read32(offset)) | (u64::from(self.read32(offset + 4)) << 32)
    }

    /// Writes a 64-bit register as two 32-bit halves, low first.
    pub fn write64(&self, offset: usize, value: u64) {
        self.write32(offset, value as u32);
        self.write32(offset + 4, (value >> 32) as u32);
    }

    /// The address of a doorbell register, for the data path (which writes it without
    /// bounds checks).
    pub fn doorbell_ptr(&self, offset: usize) -> NonNull<u32> {
        self.check(offset, 4);
        // SAFETY: inside the BAR mapping (checked).
        unsafe { NonNull::new_unchecked(self.base.as_ptr().add(offset).cast::<u32>()) }
    }
}

/// Offset of the submission queue `qid`'s tail doorbell.
pub fn sq_tail_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELLS + (2 * qid as usize) * stride
}

/// Offset of the completion queue `qid`'s head doorbell.
pub fn cq_head_doorbell(qid: u16, stride: usize) -> usize {
    DOORBELLS + (2 * qid as usize + 1) * stride
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_qemu_capabilities() {
        // QEMU 7.2: MQES 0x7ff, CQR, TO 15 (7.5 s), CSS NVM, MPSMIN 0, MPSMAX 4.
        let cap: u64 = 0x7ff | (1 << 16) | (15 << 24) | (1 << 37) | (4u64 << 52);
        let c = Capabilities::decode(cap);
        assert_eq!(c.max_queue_entries, 2048);
        assert!(c.contiguous_queues_required);
        assert_eq!(c.timeout_ms, 7500);
        assert_eq!(c.doorbell_stride, 4);
        assert_eq!(c.min_page_size, 4096);
        assert_eq!(c.max_page_size, 65536);
        assert!(c.nvm_command_set);
        assert_eq!(sq_tail_doorbell(1, 4), 0x1008);
        assert_eq!(cq_head_doorbell(1, 4), 0x100c);
    }
}
