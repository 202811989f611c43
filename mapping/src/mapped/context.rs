//! [`TargetContext`]: what a target queue may do from inside `map`, `child_done` and
//! `poll` — submit internal I/O to its devices and complete accepted pieces.

use udm_drivers::{DeviceInfo, IoError, IoRequest, QueueFull};

use crate::mapped::io_core::{IoCore, INTERNAL};
use crate::target::{DevIndex, PartId};

/// A target queue's access to the mapped queue it runs in, for one call.
pub struct TargetContext<'a> {
    pub(crate) io: &'a mut IoCore,
    pub(crate) dev_map: &'a [u32],
    pub(crate) segment: u32,
}

impl TargetContext<'_> {
    /// Submits an internal I/O to the target's device `dev`. `req.tag` is replaced; the
    /// completion comes back through [`crate::target::TargetQueue::child_done`] with
    /// `token`. The request's memory must stay valid until then. When the device's
    /// queue is full the request is handed back: retry from `poll` (which then must be
    /// enabled with `needs_poll`). Submissions reach the device at the mapped queue's
    /// next `kick` (the caller's) or at the end of its `poll`, whichever comes first.
    ///
    /// Panics if `dev` is not one of the target's devices (a target bug).
    #[inline]
    pub fn submit(&mut self, dev: DevIndex, mut req: IoRequest, token: u32) -> Result<(), QueueFull> {
        let child = self.dev_map[dev.0 as usize];
        let original = req.tag;
        req.tag = INTERNAL | (u64::from(self.segment) << 32) | u64::from(token);
        self.io.submit_internal(child, req).map_err(|QueueFull(mut r)| {
            r.tag = original;
            QueueFull(r)
        })
    }

    /// Finishes an accepted piece. Call exactly once per piece the target accepted.
    #[inline]
    pub fn complete(&mut self, part: PartId, result: Result<(), IoError>) {
        self.io.part_done(part.0, result);
    }

    /// The geometry of the target's device `dev`.
    pub fn device_info(&self, dev: DevIndex) -> DeviceInfo {
        self.io.children[self.dev_map[dev.0 as usize] as usize].device.info()
    }

    /// Requests in flight on this thread's queue to device `dev` (to pace internal I/O).
    pub fn device_in_flight(&self, dev: DevIndex) -> usize {
        self.io.children[self.dev_map[dev.0 as usize] as usize].outstanding
    }
}
