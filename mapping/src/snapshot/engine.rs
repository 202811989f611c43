//! The per-thread copy engine of a snapshot-origin, snapshot or snapshot-merge queue:
//! copies origin chunks to COW stores through bounce buffers, writes full-chunk snapshot
//! writes straight to the COW, and carries the stores' metadata requests, all on queues
//! it owns, polled from the target queue's `poll`.
//!
//! ```text
//!  start_copy ─► read origin chunk ─► write COW chunk ─► SnapshotShared::copy_done
//!  start_direct ──────────────────► write COW chunk ─┘        │ (metadata due?)
//!                                                             ▼
//!                              submit metadata request ◄─ meta_done ◄─ completion
//! ```

use std::collections::VecDeque;
use std::sync::Arc;

use udm_drivers::{Completion, IoError, IoQueue, IoRequest, SgList, SECTOR_SIZE};

use crate::io_buf::IoBuf;
use crate::snapshot::shared::{Pending, SnapshotShared};

/// Tag of a metadata request on a COW queue (job tags are slab indices).
const META: u64 = u64::MAX;
/// Completions reaped per queue per poll.
const REAP: usize = 32;
/// Bounce memory per port and thread, within [MIN_BUFS, MAX_BUFS] buffers.
const BOUNCE_BYTES: usize = 4 << 20;
const MIN_BUFS: usize = 4;
const MAX_BUFS: usize = 64;

/// One snapshot as this thread sees it: its queues and bounce buffers.
struct Port {
    snap: Arc<SnapshotShared>,
    origin_q: Box<dyn IoQueue>,
    cow_q: Box<dyn IoQueue>,
    bufs: Vec<IoBuf>,
    free_bufs: Vec<usize>,
    meta_in_flight: bool,
    meta_retry: Option<IoRequest>,
    /// Set when this port could not open its queues: every copy fails.
    broken: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    NeedBuffer,
    Reading,
    Writing,
}

struct Job {
    port: usize,
    pending: Arc<Pending>,
    /// The caller's full-chunk data, for a snapshot write that needs no copy.
    direct: Option<SgList>,
    buf: Option<usize>,
    stage: Stage,
}

/// Which of a port's queues a retried request goes to.
#[derive(Debug, Clone, Copy)]
enum Which {
    Origin,
    Cow,
}

/// A thread's copy engine. See the module documentation.
pub struct Engine {
    ports: Vec<Port>,
    jobs: Vec<Option<Job>>,
    free_jobs: Vec<usize>,
    need_buffer: VecDeque<usize>,
    retry: VecDeque<(usize, Which, IoRequest)>,
    depth: usize,
    reaped: Vec<Completion>,
}

impl Engine {
    /// An engine whose queues hold `depth` requests each.
    pub fn new(depth: usize) -> Self {
        Engine {
            ports: Vec::new(),
            jobs: Vec::new(),
            free_jobs: Vec::new(),
            need_buffer: VecDeque::new(),
            retry: VecDeque::new(),
            depth: depth.max(4),
            reaped: vec![Completion::EMPTY; REAP],
        }
    }

    /// The port serving `snap`, opened on first use.
    fn port(&mut self, snap: &Arc<SnapshotShared>) -> usize {
        if let Some(i) = self.ports.iter().position(|p| Arc::ptr_eq(&p.snap, snap)) {
            return i;
        }
        let port = open_port(snap, self.depth);
        self.ports.push(port);
        self.ports.len() - 1
    }

    /// Forgets the ports of snapshots not in `keep` (after the origin's snapshot set
    /// changed), once nothing is in flight.
    pub fn retain_ports(&mut self, keep: &[Arc<SnapshotShared>]) {
        if self.is_idle() {
            self.ports.retain(|p| keep.iter().any(|s| Arc::ptr_eq(s, &p.snap)));
        }
    }

    /// Whether nothing is in flight or waiting.
    pub fn is_idle(&self) -> bool {
        self.free_jobs.len() == self.jobs.len()
            && self.retry.is_empty()
            && self.ports.iter().all(|p| !p.meta_in_flight && p.meta_retry.is_none())
    }

    fn new_job(&mut self, job: Job) -> usize {
        match self.free_jobs.pop() {
            Some(i) => {
                self.jobs[i] = Some(job);
                i
            }
            None => {
                self.jobs.push(Some(job));
                self.jobs.len() - 1
            }
        }
    }

    /// Copies the origin chunk of `pending` to its COW chunk, then commits it.
    pub fn start_copy(&mut self, snap: &Arc<SnapshotShared>, pending: Arc<Pending>) {
        let port = self.port(snap);
        let j = self.new_job(Job { port, pending, direct: None, buf: None, stage: Stage::NeedBuffer });
        self.advance(j, Ok(()));
    }

    /// Writes `data` (a whole chunk from a snapshot write) to the COW chunk of
    /// `pending`, then commits it. `data` must stay valid until `pending` finishes.
    pub fn start_direct(&mut self, snap: &Arc<SnapshotShared>, pending: Arc<Pending>, data: SgList) {
        let port = self.port(snap);
        let j = self.new_job(Job { port, pending, direct: Some(data), buf: None, stage: Stage::Reading });
        self.advance(j, Ok(()));
    }

    /// Submits a metadata request a store handed this thread.
    pub fn submit_meta(&mut self, snap: &Arc<SnapshotShared>, req: IoRequest) {
        let port = self.port(snap);
        self.send_meta(port, req);
    }

    fn send_meta(&mut self, port: usize, mut req: IoRequest) {
        let p = &mut self.ports[port];
        req.tag = META;
        p.meta_in_flight = true;
        if p.broken {
            p.meta_in_flight = false;
            let next = p.snap.meta_done(Err(BROKEN));
            if let Some(n) = next {
                self.send_meta(port, n);
            }
            return;
        }
        match p.cow_q.submit(req) {
            Ok(()) => p.cow_q.kick(),
            Err(full) => {
                p.meta_in_flight = false;
                p.meta_retry = Some(full.0);
            }
        }
    }

    /// Moves job `j` to its next stage after its last I/O finished with `result`.
    fn advance(&mut self, j: usize, result: Result<(), IoError>) {
        let job = self.jobs[j].as_ref().expect("live job");
        let (pi, stage, direct, e) = (job.port, job.stage, job.direct, job.pending.exception);
        if result.is_err() || self.ports[pi].broken {
            self.finish(j, false);
            return;
        }
        let port = &mut self.ports[pi];
        let shift = port.snap.chunk_shift;
        let bytes = (port.snap.copy_sectors(e.old_chunk) * SECTOR_SIZE) as usize;
        match stage {
            Stage::NeedBuffer => {
                let Some(b) = port.free_bufs.pop() else {
                    self.need_buffer.push_back(j);
                    return;
                };
                let req = IoRequest::read(e.old_chunk << shift, port.bufs[b].sg(0, bytes), j as u64);
                let job = self.jobs[j].as_mut().expect("live job");
                job.buf = Some(b);
                job.stage = Stage::Reading;
                self.send(pi, Which::Origin, req);
            }
            Stage::Reading => {
                let job = self.jobs[j].as_mut().expect("live job");
                let sg = match (direct, job.buf) {
                    (Some(sg), _) => sg,
                    (None, Some(b)) => port.bufs[b].sg(0, bytes),
                    (None, None) => unreachable!("a copy reads into a buffer first"),
                };
                job.stage = Stage::Writing;
                let req = IoRequest::write(e.new_chunk << shift, sg, j as u64);
                self.send(pi, Which::Cow, req);
            }
            Stage::Writing => self.finish(j, true),
        }
    }

    fn send(&mut self, port: usize, which: Which, req: IoRequest) {
        let p = &mut self.ports[port];
        let q = match which {
            Which::Origin => &mut p.origin_q,
            Which::Cow => &mut p.cow_q,
        };
        match q.submit(req) {
            Ok(()) => q.kick(),
            Err(full) => self.retry.push_back((port, which, full.0)),
        }
    }

    fn finish(&mut self, j: usize, ok: bool) {
        let job = self.jobs[j].take().expect("live job");
        self.free_jobs.push(j);
        let port = &mut self.ports[job.port];
        if let Some(b) = job.buf {
            port.free_bufs.push(b);
        }
        let next = port.snap.copy_done(job.pending.exception, ok);
        if let Some(req) = next {
            self.send_meta(job.port, req);
        }
        if let Some(waiting) = self.need_buffer.pop_front() {
            self.advance(waiting, Ok(()));
        }
    }

    /// Reaps completions and moves every job along. Never blocks.
    pub fn poll(&mut self) {
        let mut out = std::mem::take(&mut self.reaped);
        for port in 0..self.ports.len() {
            loop {
                let n = self.ports[port].origin_q.poll(&mut out);
                for c in &out[..n] {
                    self.advance(c.tag as usize, c.result);
                }
                if n < out.len() {
                    break;
                }
            }
            loop {
                let n = self.ports[port].cow_q.poll(&mut out);
                for c in &out[..n] {
                    if c.tag == META {
                        self.ports[port].meta_in_flight = false;
                        let next = self.ports[port].snap.meta_done(c.result);
                        if let Some(req) = next {
                            self.send_meta(port, req);
                        }
                    } else {
                        self.advance(c.tag as usize, c.result);
                    }
                }
                if n < out.len() {
                    break;
                }
            }
            if let Some(req) = self.ports[port].meta_retry.take() {
                self.send_meta(port, req);
            }
        }
        self.reaped = out;
        for _ in 0..self.retry.len() {
            let Some((port, which, req)) = self.retry.pop_front() else { break };
            self.send(port, which, req);
        }
    }
}

impl Drop for Engine {
    /// An engine may carry work other threads wait for: the next metadata commit of a
    /// store is handed to whichever thread finished the previous one, and it covers
    /// exceptions of other writers. So a queue going away (its thread done with the
    /// device) first drives its copies and metadata requests to completion.
    fn drop(&mut self) {
        while !self.is_idle() {
            self.poll();
            std::thread::yield_now();
        }
    }
}

const BROKEN: IoError = IoError::DeviceGone { reason: "a snapshot's device could not open a queue for this thread" };

/// Opens a port's queues and bounce buffers. A failure leaves the port broken: its
/// copies fail, which invalidates the snapshot (as the kernel does when it cannot copy).
fn open_port(snap: &Arc<SnapshotShared>, depth: usize) -> Port {
    let chunk_bytes = (snap.chunk_sectors * SECTOR_SIZE) as usize;
    let nbufs = (BOUNCE_BYTES / chunk_bytes).clamp(MIN_BUFS, MAX_BUFS).min(depth.max(MIN_BUFS));
    let opened = (|| -> Result<Port, String> {
        let origin_q = snap.origin.device().open_queue(depth).map_err(|e| e.to_string())?;
        let cow_q = snap.cow.device().open_queue(depth).map_err(|e| e.to_string())?;
        let mut bufs = Vec::with_capacity(nbufs);
        for _ in 0..nbufs {
            let b = IoBuf::new(chunk_bytes).map_err(|e| e.to_string())?;
            snap.origin.device().register_memory(b.region()).map_err(|e| e.to_string())?;
            snap.cow.device().register_memory(b.region()).map_err(|e| e.to_string())?;
            bufs.push(b);
        }
        Ok(Port {
            snap: Arc::clone(snap),
            origin_q,
            cow_q,
            bufs,
            free_bufs: (0..nbufs).collect(),
            meta_in_flight: false,
            meta_retry: None,
            broken: false,
        })
    })();
    opened.unwrap_or_else(|reason| {
        tracing::error!("snapshot {}: cannot open its copy queues on this thread: {reason}", snap.name);
        Port {
            snap: Arc::clone(snap),
            origin_q: Box::new(DeadQueue),
            cow_q: Box::new(DeadQueue),
            bufs: Vec::new(),
            free_bufs: Vec::new(),
            meta_in_flight: false,
            meta_retry: None,
            broken: true,
        }
    })
}

impl Drop for Port {
    fn drop(&mut self) {
        for b in &self.bufs {
            let _ = self.snap.origin.device().unregister_memory(b.region());
            let _ = self.snap.cow.device().unregister_memory(b.region());
        }
    }
}

/// Stands in for a queue that could not be opened; never used because the port is
/// marked broken.
struct DeadQueue;

impl IoQueue for DeadQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), udm_drivers::QueueFull> {
        Err(udm_drivers::QueueFull(req))
    }
    fn kick(&mut self) {}
    fn poll(&mut self, _out: &mut [Completion]) -> usize {
        0
    }
    fn in_flight(&self) -> usize {
        0
    }
    fn depth(&self) -> usize {
        0
    }
}
