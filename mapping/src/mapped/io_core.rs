//! The per-queue bookkeeping of requests and their pieces: a preallocated slot per
//! request in flight, the child queues (one per distinct device below the table), the
//! completion ring. Nothing here allocates or locks after the queue is opened.
//!
//! Child request tags say who the child I/O belongs to:
//! ```text
//!  bits 63..62 = 00: a piece of request slot `tag as u32`, remapped by segment
//!                    `(tag >> 32) & 0x3fff_ffff`
//!  bits 63..62 = 01: a whole request sent straight through (the pass-through path);
//!                    its caller's tag is in `links[tag as u32]`
//!  bit  63     = 1:  internal I/O of segment `(tag >> 32) & 0x7fff_ffff`, target token
//!                    `tag as u32`
//! ```
//! except that a child with none of those outstanding takes pass-through requests with
//! their caller's tag unchanged ([`Child::raw`]): its completions then go back to the
//! caller as they are, counted but not inspected.
//!
//! # The published in-flight count
//! `active` counts admitted requests not finished plus internal I/O in flight. The
//! control plane only asks whether it is zero, so it is published only when it leaves
//! or reaches zero: a busy queue pays no shared-memory store per request.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use udm_drivers::completion_ring::{completion_ring, CompletionRing};
use udm_drivers::{BlockDevice, Completion, IoError, IoQueue, IoRequest, QueueFull};

use crate::mapped::QueueShared;
use crate::target::DeviceId;
use udm_drivers::fixed_ring::FixedRing;

/// Tag bit marking a target's internal I/O.
pub(crate) const INTERNAL: u64 = 1 << 63;
/// Tag bit marking a request sent straight through to one child.
pub(crate) const DIRECT: u64 = 1 << 62;
/// Mask of a piece's segment number in its tag (after `>> 32`).
pub(crate) const PIECE_SEGMENT: u64 = 0x3fff_ffff;
/// Segment number used for pieces that belong to no segment (table-wide flushes).
pub(crate) const NO_SEGMENT: u32 = 0x3fff_ffff;

/// No free index.
const NO_INDEX: u32 = u32::MAX;

/// One device below, with this thread's queue to it (one cache line: the pass-through
/// path touches nothing else of it).
#[repr(align(64))]
pub(crate) struct Child {
    pub id: DeviceId,
    pub device: Arc<dyn BlockDevice>,
    pub queue: Box<dyn IoQueue>,
    /// Requests submitted to `queue` and not yet reaped.
    pub outstanding: usize,
    /// How many of them carry their caller's own tag (pass-through requests sent while
    /// nothing with a core tag was outstanding). Never both kinds at once: while any
    /// are, every completion of this child is one of them, and none needs looking at.
    pub raw: usize,
    /// A request with a core tag found raw ones outstanding: send no more raw ones
    /// until a core-tagged request gets through (so that it cannot starve).
    pub want_tagged: bool,
    /// Submitted to since the last kick.
    pub dirty: bool,
}

/// One request in flight through the mapped queue.
#[derive(Clone, Copy)]
pub(crate) struct Slot {
    /// The request as submitted (its tag is the caller's).
    pub req: IoRequest,
    /// Progress of issuing: sectors issued (data ops) or flush steps issued.
    pub cursor: u64,
    /// Segment of the last piece, to skip the binary search for the next one.
    pub seg_hint: u32,
    /// Pieces issued and not finished.
    pub outstanding: u32,
    /// Every piece has been issued.
    pub issued: bool,
    /// First error of any piece.
    pub error: Option<IoError>,
    /// A remapped piece that found its child queue full: (child, request).
    pub pending: Option<(u32, IoRequest)>,
}

impl Slot {
    const EMPTY: Slot = Slot {
        req: IoRequest {
            op: udm_drivers::IoOp::Flush,
            sector: 0,
            sectors: 0,
            sg: udm_drivers::SgList::empty(),
            fua: false,
            tag: 0,
        },
        cursor: 0,
        seg_hint: 0,
        outstanding: 0,
        issued: false,
        error: None,
        pending: None,
    };
}

/// Slots, children, completions and the published in-flight count of one queue.
/// `repr(C)`: what the pass-through path reads fills the first cache line.
#[repr(C)]
pub(crate) struct IoCore {
    /// Per index (shared by `slots` and the pass-through path): the caller's tag of a
    /// pass-through request in flight — all the core keeps of one — or, while the index
    /// is free, the next free index. Taking and freeing an index touches one entry.
    links: Box<[u64]>,
    /// First free index, or `NO_INDEX`.
    free_head: u32,
    free_count: usize,
    /// Pass-through requests in flight with their caller's tag (no index).
    raw_in_flight: usize,
    /// Admitted requests not finished plus internal I/O in flight (published).
    active: usize,
    pub children: Vec<Child>,
    pub done: CompletionRing,
    pub slots: Box<[Slot]>,
    /// Slots whose next piece waits for room in a child queue.
    pub blocked: FixedRing<u32>,
    shared: Arc<QueueShared>,
}

impl IoCore {
    pub fn new(depth: usize, shared: Arc<QueueShared>) -> Self {
        IoCore {
            children: Vec::new(),
            slots: vec![Slot::EMPTY; depth].into_boxed_slice(),
            links: (1..=depth as u64)
                .map(|next| if next == depth as u64 { u64::from(NO_INDEX) } else { next })
                .collect(),
            free_head: 0,
            free_count: depth,
            raw_in_flight: 0,
            done: completion_ring(depth),
            blocked: FixedRing::new(depth, 0),
            active: 0,
            shared,
        }
    }

    /// Requests holding a slot or an index, or in flight with their caller's tag.
    #[inline]
    pub fn requests_in_use(&self) -> usize {
        self.slots.len() - self.free_count + self.raw_in_flight
    }

    /// Whether one more request fits beside `waiting` completions not yet delivered.
    #[inline]
    pub fn has_room(&self, waiting: usize) -> bool {
        self.free_count > waiting + self.raw_in_flight
    }

    #[inline]
    pub fn active(&self) -> usize {
        self.active
    }

    /// Counts one more unit of work and publishes the count (a store to this queue's
    /// own cache line; a suspend that times out reports it); when it left zero, the
    /// caller fences and checks the device state afterwards (see `mapped` module docs).
    #[inline]
    pub fn enter(&mut self) {
        self.active += 1;
        self.shared.active.store(self.active, Ordering::Relaxed);
    }

    /// Undoes [`IoCore::enter`] (admission refused, or a request finished) and
    /// publishes the count.
    #[inline]
    pub fn leave(&mut self) {
        self.active -= 1;
        self.shared.active.store(self.active, Ordering::Release);
    }

    /// Takes a free slot index (the caller checked there is room).
    #[inline(always)]
    pub fn take_index(&mut self) -> u32 {
        let idx = self.free_head;
        assert!(idx != NO_INDEX, "a free slot: in-flight requests are bounded by the depth");
        self.free_head = self.links[idx as usize] as u32;
        self.free_count -= 1;
        idx
    }

    /// Takes a free index for a pass-through request with the caller's tag `tag`.
    #[inline(always)]
    pub fn take_direct(&mut self, tag: u64) -> u32 {
        let idx = self.take_index();
        self.links[idx as usize] = tag;
        idx
    }

    /// Returns an index from [`IoCore::take_index`] unused.
    #[inline]
    pub fn put_index(&mut self, idx: u32) {
        self.links[idx as usize] = u64::from(self.free_head);
        self.free_head = idx;
        self.free_count += 1;
    }

    /// A request on the pass-through path finished: frees its index and gives back the
    /// caller's tag.
    #[inline]
    pub fn direct_done(&mut self, idx: u32) -> u64 {
        let entry = self.links[idx as usize];
        self.put_index(idx);
        self.leave();
        entry
    }

    /// Takes a slot for an admitted request (the caller checked there is room).
    #[inline]
    pub fn alloc(&mut self, req: IoRequest) -> u32 {
        let idx = self.take_index();
        // Only the fields a new request needs: `pending` is always None in a free slot,
        // and `seg_hint` is only a hint (checked before use).
        let s = &mut self.slots[idx as usize];
        s.req = req;
        s.cursor = 0;
        s.outstanding = 0;
        s.issued = false;
        s.error = None;
        debug_assert!(s.pending.is_none());
        idx
    }

    /// Completes a request that never got a slot (already counted by `enter`).
    #[inline]
    pub fn fail_unslotted(&mut self, tag: u64, error: IoError) {
        self.done.push(Completion { tag, result: Err(error) });
        self.leave();
    }

    /// One piece of `slot` finished.
    #[inline]
    pub fn part_done(&mut self, slot: u32, result: Result<(), IoError>) {
        let s = &mut self.slots[slot as usize];
        if s.outstanding == 0 {
            tracing::error!(slot, "a piece completed twice (target bug); ignored");
            return;
        }
        s.outstanding -= 1;
        if let Err(e) = result {
            s.error.get_or_insert(e);
        }
        if s.issued && s.outstanding == 0 {
            self.finish(slot);
        }
    }

    /// Delivers the request's completion and frees its slot.
    #[inline]
    pub fn finish(&mut self, slot: u32) {
        let s = &self.slots[slot as usize];
        let result = match s.error {
            Some(e) => Err(e),
            None => Ok(()),
        };
        self.done.push(Completion { tag: s.req.tag, result });
        self.put_index(slot);
        self.leave();
    }

    /// Submits to child `child` a request with a core tag; counts it for reaping and
    /// kicking. Refused as full while the child has requests with caller's tags out.
    #[inline(always)]
    pub fn submit_child(&mut self, child: u32, req: IoRequest) -> Result<(), QueueFull> {
        let c = &mut self.children[child as usize];
        if c.raw != 0 {
            c.want_tagged = true;
            return Err(QueueFull(req));
        }
        c.queue.submit(req)?;
        c.want_tagged = false;
        c.outstanding += 1;
        c.dirty = true;
        Ok(())
    }

    /// Submits an admitted pass-through request with its caller's tag when child
    /// `child` takes one (see [`Child::raw`]); hands it back otherwise.
    #[inline(always)]
    pub fn submit_raw(&mut self, child: u32, req: IoRequest) -> Result<(), IoRequest> {
        let c = &mut self.children[child as usize];
        if c.outstanding != c.raw || c.want_tagged {
            return Err(req);
        }
        c.queue.submit(req).map_err(|QueueFull(r)| r)?;
        c.raw += 1;
        c.outstanding += 1;
        c.dirty = true;
        self.raw_in_flight += 1;
        Ok(())
    }

    /// `n` requests with caller's tags came back from child `child`.
    #[inline]
    pub fn raw_done(&mut self, child: usize, n: usize) {
        let c = &mut self.children[child];
        c.raw -= n;
        c.outstanding -= n;
        self.raw_in_flight -= n;
        self.active -= n;
        if self.active == 0 {
            self.shared.active.store(0, Ordering::Release);
        }
    }

    /// Submits a target's internal I/O; it counts as work in flight for suspend.
    #[inline]
    pub fn submit_internal(&mut self, child: u32, req: IoRequest) -> Result<(), QueueFull> {
        self.submit_child(child, req)?;
        self.active += 1;
        if self.active == 1 {
            self.shared.active.store(1, Ordering::Release);
        }
        Ok(())
    }

    /// Kicks every child submitted to since the last kick.
    #[inline]
    pub fn kick_dirty(&mut self) {
        for c in self.children.iter_mut() {
            if c.dirty {
                c.dirty = false;
                c.queue.kick();
            }
        }
    }
}
