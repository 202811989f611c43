//! One submission/completion queue pair in DMA memory: entries in, phase-tagged
//! completions out, and doorbells rung once per batch, through shadow doorbells when
//! the controller offers them (NVMe Base Specification 2.0, 3.3.1 and 5.8).

use std::ptr::NonNull;
use std::sync::atomic::{fence, Ordering};

use crate::nvme::cmd::{Command, CompletionEntry};

/// Shadow doorbell and event index slots of one queue pair (Doorbell Buffer Config).
#[derive(Debug, Clone, Copy)]
pub struct ShadowDoorbells {
    /// Shadow submission queue tail.
    pub sq_tail: NonNull<u32>,
    /// Shadow completion queue head.
    pub cq_head: NonNull<u32>,
    /// Event index: ring the SQ's MMIO doorbell when the tail passes it.
    pub sq_event: NonNull<u32>,
    /// Event index for the CQ head.
    pub cq_event: NonNull<u32>,
}

/// Where a queue pair lives.
#[derive(Debug, Clone, Copy)]
pub struct RingLayout {
    /// Queue identifier (0 = admin).
    pub qid: u16,
    /// Entries in each of the two queues.
    pub entries: u16,
    /// The submission queue (entries x 64 bytes, page aligned).
    pub sq: NonNull<Command>,
    /// The completion queue (entries x 16 bytes, page aligned, zeroed).
    pub cq: NonNull<CompletionEntry>,
    /// The SQ tail doorbell register.
    pub sq_doorbell: NonNull<u32>,
    /// The CQ head doorbell register.
    pub cq_doorbell: NonNull<u32>,
    /// Shadow doorbells, if configured.
    pub shadow: Option<ShadowDoorbells>,
}

/// The driver's side of a queue pair.
#[derive(Debug)]
pub struct QueueRing {
    layout: RingLayout,
    sq_tail: u16,
    /// The tail the device was last told about.
    sq_tail_rung: u16,
    cq_head: u16,
    cq_head_rung: u16,
    phase: bool,
}

// SAFETY: the ring's memory and doorbells are owned by this value (one owner thread
// at a time); moving it to another thread moves that ownership.
unsafe impl Send for QueueRing {}

/// Whether moving an index from `old` to `new` passed the device's event index (the
/// virtio/NVMe shadow-doorbell rule): if so, the MMIO doorbell must be written.
#[inline]
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl QueueRing {
    /// A ring over `layout`; its completion queue memory must be zeroed.
    ///
    /// # Safety
    /// The layout's memory and registers must be valid for the ring's life and used by
    /// nothing else on the host side.
    pub unsafe fn new(layout: RingLayout) -> Self {
        QueueRing { layout, sq_tail: 0, sq_tail_rung: 0, cq_head: 0, cq_head_rung: 0, phase: true }
    }

    /// The queue identifier.
    pub fn qid(&self) -> u16 {
        self.layout.qid
    }

    /// Entries per queue.
    pub fn entries(&self) -> u16 {
        self.layout.entries
    }

    /// Starts over after the controller forgot the queue (a reset): indexes at zero,
    /// phase 1, completion queue zeroed.
    pub fn restart(&mut self) {
        self.sq_tail = 0;
        self.sq_tail_rung = 0;
        self.cq_head = 0;
        self.cq_head_rung = 0;
        self.phase = true;
        // SAFETY: the CQ is `entries` entries long (layout contract); the device does not
        // use it while the queue does not exist on the controller.
        unsafe { std::ptr::write_bytes(self.layout.cq.as_ptr(), 0, self.layout.entries as usize) };
        if let Some(s) = self.layout.shadow {
            for p in [s.sq_tail, s.cq_head, s.sq_event, s.cq_event] {
                // SAFETY: the shadow slots are valid u32s (layout contract).
                unsafe { std::ptr::write_volatile(p.as_ptr(), 0) };
            }
        }
    }

    /// Copies `cmd` into the next submission slot (the caller keeps fewer than
    /// `entries - 1` commands outstanding, so the slot is free).
    #[inline]
    pub fn push(&mut self, cmd: &Command) {
        // SAFETY: sq_tail < entries, inside the SQ; the slot is free (caller contract).
        unsafe { std::ptr::write_volatile(self.layout.sq.as_ptr().add(self.sq_tail as usize), *cmd) };
        self.sq_tail += 1;
        if self.sq_tail == self.layout.entries {
            self.sq_tail = 0;
        }
    }

    /// Commands pushed since the last doorbell.
    #[inline]
    pub fn unrung(&self) -> bool {
        self.sq_tail != self.sq_tail_rung
    }

    /// Tells the controller about every pushed command: one doorbell write (or none,
    /// when shadow doorbells say the controller is still looking).
    #[inline]
    pub fn ring_sq(&mut self) {
        if !self.unrung() {
            return;
        }
        let old = self.sq_tail_rung;
        let new = self.sq_tail;
        self.sq_tail_rung = new;
        // The entries must be in memory before the device can learn the new tail.
        fence(Ordering::SeqCst);
        match self.layout.shadow {
            Some(s) => {
                // SAFETY: valid shadow slots (layout contract).
                unsafe { std::ptr::write_volatile(s.sq_tail.as_ptr(), u32::from(new)) };
                // The shadow write must be visible before the event index is read.
                fence(Ordering::SeqCst);
                // SAFETY: as above.
                let event = unsafe { std::ptr::read_volatile(s.sq_event.as_ptr()) } as u16;
                if need_event(event, new, old) {
                    // SAFETY: the doorbell register (layout contract).
                    unsafe { std::ptr::write_volatile(self.layout.sq_doorbell.as_ptr(), u32::from(new)) };
                }
            }
            // SAFETY: the doorbell register (layout contract).
            None => unsafe { std::ptr::write_volatile(self.layout.sq_doorbell.as_ptr(), u32::from(new)) },
        }
    }

    /// The next completion, if the controller has posted one.
    #[inline]
    pub fn pop(&mut self) -> Option<CompletionEntry> {
        // SAFETY: cq_head < entries, inside the CQ.
        let slot = unsafe { self.layout.cq.as_ptr().add(self.cq_head as usize) };
        // The phase tag lives in the entry's last 16 bits: read it alone first.
        // SAFETY: inside the CQ entry; u16-aligned.
        let status = unsafe { std::ptr::read_volatile(std::ptr::addr_of!((*slot).status)) };
        if (status & 1 != 0) != self.phase {
            return None;
        }
        // The rest of the entry was written before the phase tag.
        fence(Ordering::Acquire);
        // SAFETY: as above; the device finished writing this entry (phase matched).
        let entry = unsafe { std::ptr::read_volatile(slot) };
        self.cq_head += 1;
        if self.cq_head == self.layout.entries {
            self.cq_head = 0;
            self.phase = !self.phase;
        }
        Some(entry)
    }

    /// Whether the controller has posted a completion that `pop` would return: one read
    /// of the head entry's phase tag, no MMIO.
    #[inline]
    pub fn has_completion(&self) -> bool {
        // SAFETY: cq_head < entries, inside the CQ; u16-aligned.
        let status = unsafe {
            std::ptr::read_volatile(std::ptr::addr_of!((*self.layout.cq.as_ptr().add(self.cq_head as usize)).status))
        };
        (status & 1 != 0) == self.phase
    }

    /// Tells the controller which completions were consumed.
    #[inline]
    pub fn ring_cq(&mut self) {
        if self.cq_head == self.cq_head_rung {
            return;
        }
        let old = self.cq_head_rung;
        let new = self.cq_head;
        self.cq_head_rung = new;
        fence(Ordering::SeqCst);
        match self.layout.shadow {
            Some(s) => {
                // SAFETY: valid shadow slots (layout contract).
                unsafe { std::ptr::write_volatile(s.cq_head.as_ptr(), u32::from(new)) };
                fence(Ordering::SeqCst);
                // SAFETY: as above.
                let event = unsafe { std::ptr::read_volatile(s.cq_event.as_ptr()) } as u16;
                if need_event(event, new, old) {
                    // SAFETY: the doorbell register (layout contract).
                    unsafe { std::ptr::write_volatile(self.layout.cq_doorbell.as_ptr(), u32::from(new)) };
                }
            }
            // SAFETY: the doorbell register (layout contract).
            None => unsafe { std::ptr::write_volatile(self.layout.cq_doorbell.as_ptr(), u32::from(new)) },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_only_when_the_event_index_is_passed() {
        // Device asked to be told once the tail passes 5.
        assert!(need_event(5, 6, 5));
        assert!(need_event(5, 8, 3));
        assert!(!need_event(5, 5, 3));
        assert!(!need_event(9, 8, 3));
        // Across the wrap of 16-bit indexes.
        assert!(need_event(0xffff, 2, 0xfffe));
    }

    #[test]
    fn pops_completions_by_phase_and_wraps() {
        let mut sq = vec![Command::default(); 4];
        let mut cq = vec![CompletionEntry::default(); 4];
        let cqp = cq.as_mut_ptr();
        let mut sqdb = 0u32;
        let mut cqdb = 0u32;
        let layout = RingLayout {
            qid: 1,
            entries: 4,
            sq: NonNull::new(sq.as_mut_ptr()).unwrap(),
            cq: NonNull::new(cqp).unwrap(),
            sq_doorbell: NonNull::from(&mut sqdb),
            cq_doorbell: NonNull::from(&mut cqdb),
            shadow: None,
        };
        // SAFETY: the vectors and doorbell words outlive the ring, and only it uses them.
        let mut ring = unsafe { QueueRing::new(layout) };
        let mut expect_phase = 1u16;
        for round in 0..3u16 {
            for i in 0..3u16 {
                let mut c = Command::new(2);
                c.set_cid(i);
                ring.push(&c);
            }
            ring.ring_sq();
            assert_eq!(ring.pop(), None);
            // The "device" completes the three commands in order.
            let start = (round * 3) % 4;
            for i in 0..3u16 {
                let slot = ((start + i) % 4) as usize;
                if slot == 0 && (round > 0 || i > 0) {
                    expect_phase ^= 1;
                }
                let entry = CompletionEntry { cid: i, status: expect_phase, ..Default::default() };
                // SAFETY: slot < 4, inside `cq`; plain memory standing in for the device.
                unsafe { std::ptr::write_volatile(cqp.add(slot), entry) };
            }
            for i in 0..3u16 {
                assert_eq!(ring.pop().map(|e| e.cid), Some(i));
            }
            assert_eq!(ring.pop(), None);
            ring.ring_cq();
        }
        assert_eq!(sqdb, 1); // 9 pushes mod 4
        assert_eq!(cqdb, 1);
    }
}
