//! The background merge of a `snapshot-merge` target (spec/device-mapper.md §5.2): walks
//! the store backwards, one run of consecutive exceptions at a time:
//!
//! 1. other snapshots of the origin copy the destination chunks out first (they keep
//!    their view);
//! 2. writes to those chunks (which go to the COW while the exception exists) drain, and
//!    new ones wait;
//! 3. the run is copied COW -> origin, the origin flushed;
//! 4. the entries are zeroed on disk (area write with preflush + FUA), dropped from the
//!    table, and the held writes go on, now to the origin.
//!
//! A crash anywhere is safe: an entry still on disk points at intact COW data, and
//! copying it again is idempotent. It runs on its own thread (the kernel uses a
//! workqueue), started at resume and stopped before suspend.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use udm_drivers::{IoError, IoQueue, IoRequest, SECTOR_SIZE};

use crate::exception_store::MergeBatch;
use crate::exception_store::{probe, sync_io};
use crate::io_buf::IoBuf;
use crate::snapshot::engine::Engine;
use crate::snapshot::origins::OriginEntry;
use crate::snapshot::shared::{Lookup, SnapshotShared, MERGE_FAILED};
use crate::snapshot::waits::{poll_all, Outcome, Wait};

/// Bytes copied COW -> origin per request.
const COPY_BYTES: usize = 1 << 20;

/// A running merge; stopping it waits for the batch in progress.
pub struct MergeWorker {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MergeWorker {
    /// Starts merging `snap` into its origin.
    pub fn start(snap: Arc<SnapshotShared>, entry: Arc<OriginEntry>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name(format!("udm-merge-{}", snap.name))
            .spawn(move || {
                if let Err(e) = run(&snap, &entry, &flag) {
                    tracing::error!("merge of {} failed: {e}", snap.name);
                    snap.set_flags(MERGE_FAILED);
                }
            })
            .ok();
        MergeWorker { stop, thread }
    }

    /// Asks the merge to stop after the current batch and waits for it.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Whether the merge thread has ended (finished, failed or stopped).
    pub fn finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for MergeWorker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Why a merge stopped.
#[derive(Debug, thiserror::Error)]
enum MergeError {
    #[error("{0}")]
    Store(#[from] crate::exception_store::StoreError),
    #[error("I/O error while {during}: {source}")]
    Io { during: &'static str, source: IoError },
    #[error("cannot open a queue: {0}")]
    Open(String),
}

fn io(during: &'static str) -> impl Fn(IoError) -> MergeError {
    move |source| MergeError::Io { during, source }
}

fn run(snap: &Arc<SnapshotShared>, entry: &Arc<OriginEntry>, stop: &AtomicBool) -> Result<(), MergeError> {
    let origin_dev = snap.origin.device();
    let cow_dev = snap.cow.device();
    let mut oq = origin_dev.open_queue(8).map_err(|e| MergeError::Open(e.to_string()))?;
    let mut cq = cow_dev.open_queue(8).map_err(|e| MergeError::Open(e.to_string()))?;
    let chunk_bytes = (snap.chunk_sectors * SECTOR_SIZE) as usize;
    let buf = IoBuf::new(COPY_BYTES.max(chunk_bytes)).map_err(|e| MergeError::Open(e.to_string()))?;
    let _ = origin_dev.register_memory(buf.region());
    let _ = cow_dev.register_memory(buf.region());
    let mut engine = Engine::new(16);
    let result = (|| {
        // After a handover, writes the old snapshot accepted may still be committing.
        while !snap.quiescent() {
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        // Durably marked before the origin is first written, cleared once nothing is
        // left: a crash in between leaves a mark that makes the next start merge again
        // (see `format::MERGE_MARK`).
        probe::write_merge_mark(cq.as_mut(), snap.cow.info(), true)?;
        loop {
            // Checked before the stop flag, so a merge that is complete clears its mark
            // even when its table is being replaced.
            let Some(batch) = snap.prepare_merge()? else {
                probe::write_merge_mark(cq.as_mut(), snap.cow.info(), false)?;
                tracing::info!("merge of {} finished", snap.name);
                return Ok(());
            };
            if stop.load(Ordering::Acquire) {
                return Ok(());
            }
            copy_out_to_others(snap, entry, batch, &mut engine);
            merge_batch(snap, batch, &buf, oq.as_mut(), cq.as_mut())?;
        }
    })();
    let _ = origin_dev.unregister_memory(buf.region());
    let _ = cow_dev.unregister_memory(buf.region());
    result
}

/// Makes every other active snapshot of the origin keep its view of the chunks the
/// batch is about to overwrite.
fn copy_out_to_others(snap: &Arc<SnapshotShared>, entry: &OriginEntry, batch: MergeBatch, engine: &mut Engine) {
    let first = batch.old_chunk << snap.chunk_shift;
    let end = ((batch.old_chunk + batch.count) << snap.chunk_shift).min(snap.origin_sectors);
    let mut waits = Vec::new();
    for other in entry.snapshots().iter() {
        if Arc::ptr_eq(other, snap) || !other.takes_copies() {
            continue;
        }
        let mut chunk = other.chunk_of(first);
        while chunk << other.chunk_shift < end.min(other.length) {
            let mut meta = None;
            match other.lookup_or_prepare(chunk, false, &mut meta) {
                Lookup::Complete(_) => waits.push(Wait::Reads(Arc::clone(other), chunk)),
                Lookup::Invalid | Lookup::Overflow => {}
                Lookup::Pending(p) => waits.push(Wait::Pending(Arc::clone(other), p)),
                Lookup::Prepared(p) => {
                    engine.start_copy(other, Arc::clone(&p));
                    waits.push(Wait::Pending(Arc::clone(other), p));
                }
            }
            if let Some(req) = meta {
                engine.submit_meta(other, req);
            }
            chunk += 1;
        }
    }
    let mut lost = false;
    while poll_all(&mut waits, true, &mut lost) == Outcome::Waiting || !engine.is_idle() {
        engine.poll();
        std::thread::yield_now();
    }
}

/// Steps 2-4 for one batch.
fn merge_batch(
    snap: &SnapshotShared,
    batch: MergeBatch,
    buf: &IoBuf,
    oq: &mut dyn IoQueue,
    cq: &mut dyn IoQueue,
) -> Result<(), MergeError> {
    let (first, end) = (batch.old_chunk, batch.old_chunk + batch.count);
    snap.set_merge_range(first, end);
    for c in first..end {
        while snap.cow_writes.busy(c) {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    let copied = (|| {
        let from = batch.new_chunk << snap.chunk_shift;
        let to = batch.old_chunk << snap.chunk_shift;
        let sectors = (batch.count << snap.chunk_shift).min(snap.origin_sectors.saturating_sub(to));
        let step = buf.len() as u64 / SECTOR_SIZE;
        let mut done = 0;
        while done < sectors {
            let n = step.min(sectors - done);
            let sg = buf.sg(0, (n * SECTOR_SIZE) as usize);
            sync_io::run(cq, IoRequest::read(from + done, sg, 1)).map_err(io("reading the COW"))?;
            sync_io::run(oq, IoRequest::write(to + done, sg, 1)).map_err(io("writing the origin"))?;
            done += n;
        }
        sync_io::run(oq, IoRequest::flush(1)).map_err(io("flushing the origin"))?;
        let mut next = snap.commit_merge(batch)?;
        while let Some(req) = next {
            let r = sync_io::run(cq, req);
            next = snap.meta_done(r);
        }
        match snap.take_merge_result(batch) {
            Some(Ok(())) => Ok(()),
            Some(Err(e)) => Err(MergeError::Io { during: "writing the merged metadata", source: e }),
            None => Err(MergeError::Io {
                during: "committing the merged metadata",
                source: IoError::Rejected { reason: "the store did not finish the merge commit" },
            }),
        }
    })();
    snap.set_merge_range(0, 0);
    copied
}
