//! The volatile write cache of a [`super::FaultDevice`] (`fault:volatile-cache`): writes
//! are acknowledged from RAM, as a disk with its write cache on acknowledges them, and
//! reach the media only at a flush (or at once with FUA). A power cut keeps a seeded
//! subset of the cached writes, tears some at block granularity and applies the
//! survivors in a seeded order; the rest never happened.
//!
//! The media (the wrapped device) always holds exactly what would survive a power cut
//! with an empty cache: the durable image. The cache sits in front of it:
//!
//! * a write without FUA is copied into the cache and completes at once;
//! * a FUA write goes through to the media (with FUA) before it completes, and replaces
//!   the cached versions of its blocks (a disk never writes stale cached data over it);
//! * a flush writes the newest cached version of every block to the media, flushes the
//!   media, and empties the cache;
//! * a read reads the media and overlays the newest cached version of each block;
//! * a power cut: see [`VolatileCache::cut`].
//!
//! Every request runs synchronously under the cache's lock (and the lock of the power
//! rail it shares with other devices), on a private queue of the media, so concurrent
//! queues see one order of events. The cache keeps every cached write's data and an
//! entry per cached block until the next flush: slow, and only meant for tests.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::device::{BlockDevice, IoQueue};
use crate::dma::{DmaMemory, PagePolicy};
use crate::error::IoError;
use crate::request::{Completion, IoOp, IoRequest, QueueFull, SECTOR_SIZE};
use crate::sg::{IoSegment, SgList};

use super::mix;

/// Bytes staged per media write while writing cached blocks out.
const STAGING_BYTES: usize = 1 << 20;

/// Loss rates a seed picks from, in eighths of the unflushed writes: some seeds lose
/// almost nothing (reordering shows), some almost everything.
const LOSS_EIGHTHS: [u64; 5] = [1, 2, 4, 6, 7];

/// What a power cut did to the writes in the cache.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PowerCut {
    /// The write that was arriving when the power went (its ordinal since the cache was
    /// armed), for a cut armed with `power-loss=N`; `None` for [`super::FaultControl::power_cut`].
    pub at_write: Option<u64>,
    /// Writes in the cache at the cut: acknowledged, neither flushed nor FUA, and not
    /// wholly overwritten by a later FUA write.
    pub unflushed: u64,
    /// Of those, writes of which nothing reached the media.
    pub lost: u64,
    /// Writes torn: a seeded subset of their blocks reached the media.
    pub torn: u64,
    /// Writes that reached the media whole.
    pub whole: u64,
    /// Whether a write reached the media (whole or torn) while an earlier one was lost.
    pub reordered: bool,
    /// Blocks left holding an older write than a later surviving one: the survivors
    /// were applied out of order.
    pub stale_blocks: u64,
}

/// One acknowledged write in the cache.
#[derive(Debug)]
struct CachedWrite {
    /// Counted from 1 when the cache was armed, as `power-loss=N` counts.
    ordinal: u64,
    first_block: u64,
    /// Its data, whole blocks; `None` for discard and write-zeroes (zeroes).
    data: Option<Vec<u8>>,
}

/// The cache and the media behind it. See the module documentation.
pub(super) struct VolatileCache {
    media: Arc<dyn BlockDevice>,
    queue: Option<Box<dyn IoQueue>>,
    staging: Option<DmaMemory>,
    /// Bytes per block: the media's logical block, the unit of caching and tearing.
    block_bytes: usize,
    /// One block of zeroes, the data of discarded blocks.
    zero_block: Vec<u8>,
    /// Whether writes are cached (the plan is `volatile-cache`).
    pub(super) armed: bool,
    /// After a cut: writes vanish, flushes do nothing, reads see the media.
    pub(super) powered_off: bool,
    /// The write ordinal that cuts the power, if any.
    pub(super) cut_at: Option<u64>,
    pub(super) seed: u64,
    writes: Vec<CachedWrite>,
    /// Per block, the cached writes holding a version of it, oldest first (indices into
    /// `writes`).
    blocks: BTreeMap<u64, Vec<usize>>,
    pub(super) report: Option<PowerCut>,
}

impl std::fmt::Debug for VolatileCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolatileCache")
            .field("armed", &self.armed)
            .field("powered_off", &self.powered_off)
            .field("cut_at", &self.cut_at)
            .field("seed", &self.seed)
            .field("cached_writes", &self.writes.len())
            .field("cached_blocks", &self.blocks.len())
            .field("report", &self.report)
            .finish()
    }
}

impl VolatileCache {
    pub(super) fn new(media: Arc<dyn BlockDevice>) -> Self {
        let block_bytes = (media.info().logical_block_size as usize).max(SECTOR_SIZE as usize);
        VolatileCache {
            media,
            queue: None,
            staging: None,
            block_bytes,
            zero_block: vec![0; block_bytes],
            armed: false,
            powered_off: false,
            cut_at: None,
            seed: 0,
            writes: Vec::new(),
            blocks: BTreeMap::new(),
            report: None,
        }
    }

    /// Acknowledged writes still only in the cache.
    pub(super) fn cached_writes(&self) -> u64 {
        let mut live: Vec<usize> = self.blocks.values().flatten().copied().collect();
        live.sort_unstable();
        live.dedup();
        live.len() as u64
    }

    /// Runs `req` against the cache and the media; `ordinal` is the write's number
    /// (writes only). Returns the result and whether this write cut the power.
    pub(super) fn handle(&mut self, req: &IoRequest, ordinal: u64) -> (Result<(), IoError>, bool) {
        match req.op {
            IoOp::Read => {
                let r = self.media_io(*req);
                if r.is_ok() && !self.powered_off {
                    self.overlay(req);
                }
                (r, false)
            }
            IoOp::Flush if self.powered_off => (Ok(()), false),
            IoOp::Flush => (self.write_back().and_then(|()| self.media_io(IoRequest::flush(0))), false),
            IoOp::Write | IoOp::Discard | IoOp::WriteZeroes => {
                if self.powered_off {
                    return (Ok(()), false);
                }
                let cuts = self.cut_at == Some(ordinal);
                // The write arriving as the power goes was never acknowledged: it may
                // land or not like any cached one, FUA or not.
                if req.fua && !cuts {
                    let r = self.media_io(*req);
                    if r.is_ok() {
                        for b in self.block_range(req) {
                            self.blocks.remove(&b);
                        }
                    }
                    return (r, false);
                }
                self.insert(req, ordinal);
                if cuts {
                    let report = self.cut(Some(ordinal));
                    return (report.map(|_| ()), true);
                }
                (Ok(()), false)
            }
        }
    }

    fn block_range(&self, req: &IoRequest) -> std::ops::Range<u64> {
        let bb = self.block_bytes as u64;
        let first = req.sector * SECTOR_SIZE / bb;
        first..first + req.sectors * SECTOR_SIZE / bb
    }

    fn insert(&mut self, req: &IoRequest, ordinal: u64) {
        let data = (req.op == IoOp::Write).then(|| {
            let mut data = vec![0u8; (req.sectors * SECTOR_SIZE) as usize];
            req.sg.copy_to_slice(&mut data);
            data
        });
        let range = self.block_range(req);
        let index = self.writes.len();
        self.writes.push(CachedWrite { ordinal, first_block: range.start, data });
        for b in range {
            self.blocks.entry(b).or_default().push(index);
        }
    }

    /// Copies the newest cached version of each block `req` read over the media's data.
    fn overlay(&self, req: &IoRequest) {
        let range = self.block_range(req);
        for (&b, versions) in self.blocks.range(range.clone()) {
            if let Some(&newest) = versions.last() {
                let at = (b - range.start) as usize * self.block_bytes;
                req.sg.slice(at, self.block_bytes).copy_from_slice(self.block_data(newest, b));
            }
        }
    }

    fn block_data(&self, index: usize, block: u64) -> &[u8] {
        let w = &self.writes[index];
        match &w.data {
            Some(data) => {
                let at = (block - w.first_block) as usize * self.block_bytes;
                &data[at..at + self.block_bytes]
            }
            None => &self.zero_block,
        }
    }

    /// Writes the newest version of every cached block to the media and empties the
    /// cache (a flush, or a clean shutdown when the cache is disarmed).
    pub(super) fn write_back(&mut self) -> Result<(), IoError> {
        let image: Vec<(u64, usize)> =
            self.blocks.iter().filter_map(|(&b, v)| v.last().map(|&newest| (b, newest))).collect();
        self.write_blocks(&image)?;
        self.clear();
        Ok(())
    }

    fn clear(&mut self) {
        self.writes.clear();
        self.blocks.clear();
    }

    /// The power cut: each cached write is lost, torn (a seeded subset of its blocks
    /// lands) or kept whole, as the seed decides (the seed also picks the loss rate);
    /// the surviving pieces reach the media in a seeded order, so where survivors
    /// overlap an older one may end on top. The cache is then empty and the device
    /// powered off.
    pub(super) fn cut(&mut self, at_write: Option<u64>) -> Result<PowerCut, IoError> {
        let seed = self.seed;
        let mut live: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
        for (&b, versions) in &self.blocks {
            for &i in versions {
                live.entry(i).or_default().push(b);
            }
        }
        let loss = LOSS_EIGHTHS[(mix(seed) % LOSS_EIGHTHS.len() as u64) as usize];
        let mut report = PowerCut { at_write, unflushed: live.len() as u64, ..PowerCut::default() };
        let mut survivors: Vec<(u64, usize, Vec<u64>)> = Vec::new();
        let mut oldest_lost = u64::MAX;
        let mut newest_kept = 0;
        for (&i, blocks) in &live {
            let ordinal = self.writes[i].ordinal;
            let h = mix(seed ^ mix(ordinal));
            let landed: Vec<u64> = if h % 8 < loss {
                report.lost += 1;
                Vec::new()
            } else if blocks.len() > 1 && (h >> 8).is_multiple_of(3) {
                report.torn += 1;
                blocks.iter().copied().filter(|&b| mix(h ^ mix(b)) & 1 == 1).collect()
            } else {
                report.whole += 1;
                blocks.clone()
            };
            if landed.is_empty() {
                oldest_lost = oldest_lost.min(ordinal);
            } else {
                newest_kept = newest_kept.max(ordinal);
                survivors.push((mix(seed.rotate_left(17) ^ ordinal), i, landed));
            }
        }
        report.reordered = newest_kept > oldest_lost;
        survivors.sort_unstable();
        let mut image: BTreeMap<u64, usize> = BTreeMap::new();
        let mut newest: BTreeMap<u64, usize> = BTreeMap::new();
        for (_, i, landed) in &survivors {
            for &b in landed {
                image.insert(b, *i);
                let n = newest.entry(b).or_insert(*i);
                *n = (*n).max(*i);
            }
        }
        report.stale_blocks = image.iter().filter(|(b, i)| newest[b] != **i).count() as u64;
        let image: Vec<(u64, usize)> = image.into_iter().collect();
        let written = self.write_blocks(&image);
        self.clear();
        self.powered_off = true;
        tracing::info!(?report, seed, "fault: power cut with a volatile write cache");
        self.report = Some(report.clone());
        written.map(|()| report)
    }

    /// Writes `(block, cached write)` pairs (sorted by block) to the media, coalescing
    /// neighbouring blocks.
    fn write_blocks(&mut self, image: &[(u64, usize)]) -> Result<(), IoError> {
        if image.is_empty() {
            return Ok(());
        }
        if self.staging.is_none() {
            let mem = DmaMemory::allocate(STAGING_BYTES.max(self.block_bytes), PagePolicy::Normal)
                .map_err(|_| IoError::Host { errno: libc::ENOMEM })?;
            self.media.register_memory(mem.region()).map_err(|_| IoError::Host { errno: libc::ENOMEM })?;
            self.staging = Some(mem);
        }
        let per_run = STAGING_BYTES.max(self.block_bytes) / self.block_bytes;
        let mut at = 0;
        while at < image.len() {
            let mut end = at + 1;
            while end < image.len() && end - at < per_run && image[end].0 == image[end - 1].0 + 1 {
                end += 1;
            }
            let staging = self.staging.as_ref().expect("allocated above");
            // SAFETY: the staging memory is used by no request outside this function,
            // which runs under the cache's lock and waits for each write it submits.
            let bytes = unsafe { staging.as_mut_slice() };
            for (k, &(b, i)) in image[at..end].iter().enumerate() {
                bytes[k * self.block_bytes..(k + 1) * self.block_bytes].copy_from_slice(self.block_data(i, b));
            }
            let len = (end - at) * self.block_bytes;
            // SAFETY: `staging` outlives the request, which `media_io` runs to completion
            // while `segment` is alive on this stack frame.
            let segment = unsafe { IoSegment::new(staging.as_ptr(), len) };
            // SAFETY: as above: the segment array (one element) outlives the request.
            let sg = unsafe { SgList::from_segment(&segment) };
            let sector = image[at].0 * self.block_bytes as u64 / SECTOR_SIZE;
            self.media_io(IoRequest::write(sector, sg, 0))?;
            at = end;
        }
        Ok(())
    }

    /// Runs one request on the media's private queue to completion.
    fn media_io(&mut self, mut req: IoRequest) -> Result<(), IoError> {
        if self.queue.is_none() {
            let q = self.media.open_queue(4).map_err(|_| IoError::DeviceGone {
                reason: "the fault device's volatile cache could not open a queue on the media",
            })?;
            self.queue = Some(q);
        }
        let q = self.queue.as_mut().expect("opened above");
        req.tag = 0;
        let mut pending = Some(req);
        let mut out = [Completion::EMPTY; 1];
        loop {
            if let Some(r) = pending.take() {
                if let Err(QueueFull(r)) = q.submit(r) {
                    pending = Some(r);
                }
            }
            q.kick();
            if q.poll(&mut out) == 1 && pending.is_none() {
                return out[0].result;
            }
            if pending.is_none() {
                q.wait(std::time::Duration::from_millis(1));
            }
        }
    }
}

impl Drop for VolatileCache {
    fn drop(&mut self) {
        if let Some(mem) = self.staging.take() {
            let _ = self.media.unregister_memory(mem.region());
        }
    }
}
