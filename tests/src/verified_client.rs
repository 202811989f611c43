//! A libblkio (`virtio-blk-vhost-user`) client that keeps random, verified writes and
//! reads in flight on one export and survives its connection going away: the soak
//! test's workload.
//!
//! Every block written carries who wrote it (export id), where (block number) and
//! when (a generation unique to that export), repeated over the whole block, so a read
//! tells a lost write (an older generation), a torn one (the block disagrees with
//! itself) and a misdirected one (another export's or another block's stamp) apart.
//!
//! The model is what a disk promises: a write the client saw acknowledged is durable;
//! a write whose connection died before its completion arrived may or may not have
//! happened ("uncertain"), but once a later write to that block is acknowledged, or a
//! read has seen which way it went, the old one must never reappear. A daemon that let
//! an abandoned request land after the next connection started would break that.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// Bytes per block the client writes and reads.
pub const BLOCK: usize = 4096;
/// Requests kept in flight.
pub const QUEUE_DEPTH: usize = 8;
const STAMP_MAGIC: u64 = 0x7564_6d53_6f61_6b21; // "udmSoak!"

/// What one block of the device may read back as.
#[derive(Debug, Clone, Default)]
struct BlockState {
    /// The last generation known to be on the device (0: never written, reads zeroes).
    durable: u64,
    /// Generations written on a connection that died before they completed.
    uncertain: Vec<u64>,
}

/// A request in flight.
#[derive(Debug, Clone, Copy)]
enum Pending {
    Write { block: u64, generation: u64 },
    Read { block: u64 },
}

/// Counters shared with the test while the client runs.
#[derive(Debug, Default)]
pub struct Progress {
    /// Writes acknowledged.
    pub writes: AtomicU64,
    /// Reads that came back and were verified.
    pub reads: AtomicU64,
    /// Requests that completed with an error status while the connection was up.
    pub errors: AtomicU64,
    /// Connections made (the first included).
    pub connections: AtomicU64,
    /// Set by the test to make the client drop its connection with requests in flight,
    /// as a crashing front end would; the client clears it when it has.
    pub disconnect: AtomicBool,
}

impl Progress {
    /// Writes plus reads completed so far.
    pub fn completed(&self) -> u64 {
        self.writes.load(Ordering::Relaxed) + self.reads.load(Ordering::Relaxed)
    }
}

/// A wrong block found by a read: the test's failure report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    pub export: u32,
    pub block: u64,
    pub what: String,
}

/// One open connection: queue first so it drops before the instance.
struct Connection {
    queue: Blkioq,
    _region: MemoryRegion,
    _blkio: Blkio,
    base: usize,
}

/// The client of one export.
pub struct VerifiedClient {
    socket: PathBuf,
    export: u32,
    blocks: u64,
    model: Vec<BlockState>,
    next_generation: u64,
    slots: [Option<Pending>; QUEUE_DEPTH],
    rng: u64,
    connection: Option<Connection>,
    pub progress: Arc<Progress>,
}

impl VerifiedClient {
    /// A client for `socket` that writes `blocks` blocks of [`BLOCK`] bytes, stamped
    /// with `export`; not yet connected.
    pub fn new(socket: &Path, export: u32, blocks: u64, seed: u64) -> VerifiedClient {
        VerifiedClient {
            socket: socket.to_path_buf(),
            export,
            blocks,
            model: vec![BlockState::default(); blocks as usize],
            next_generation: 1,
            slots: [None; QUEUE_DEPTH],
            rng: seed | 1,
            connection: None,
            progress: Arc::new(Progress::default()),
        }
    }

    fn connect(&mut self) -> Result<(), blkio::Error> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", self.socket.to_str().expect("a UTF-8 socket path"))?;
        blkio.connect()?;
        blkio.set_i32("num-queues", 1)?;
        let mut started = blkio.start()?;
        let region = blkio.alloc_mem_region(BLOCK * QUEUE_DEPTH)?;
        blkio.map_mem_region(&region)?;
        let queue = started.queues.pop().expect("one queue was asked for");
        let base = region.addr;
        self.connection = Some(Connection { queue, _region: region, _blkio: blkio, base });
        self.progress.connections.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Drops the connection as a crashing front end would, requests in flight and all:
    /// their writes become uncertain.
    pub fn abandon_connection(&mut self) {
        self.connection = None;
        for slot in self.slots.iter_mut() {
            if let Some(Pending::Write { block, generation }) = slot.take() {
                self.model[block as usize].uncertain.push(generation);
            }
        }
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: deterministic per seed, good enough to pick blocks.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn buffer(&mut self, slot: usize) -> &mut [u8] {
        let connection = self.connection.as_ref().expect("connected");
        // SAFETY: the region is BLOCK * QUEUE_DEPTH bytes, mapped for the connection's
        // life; slot `slot` is used by at most one request at a time, and the device
        // writes into it only while that request is in flight, when no slice exists.
        unsafe { std::slice::from_raw_parts_mut((connection.base + slot * BLOCK) as *mut u8, BLOCK) }
    }

    fn block_busy(&self, block: u64) -> bool {
        self.slots.iter().flatten().any(|p| match *p {
            Pending::Write { block: b, .. } | Pending::Read { block: b } => b == block,
        })
    }

    fn submit(&mut self, slot: usize) {
        let block = loop {
            let b = self.random() % self.blocks;
            if !self.block_busy(b) {
                break b;
            }
        };
        let write = self.random().is_multiple_of(2);
        let pending = if write {
            let generation = self.next_generation;
            self.next_generation += 1;
            let export = self.export;
            stamp(self.buffer(slot), export, block, generation);
            Pending::Write { block, generation }
        } else {
            Pending::Read { block }
        };
        let connection = self.connection.as_mut().expect("connected");
        let addr = connection.base + slot * BLOCK;
        let offset = block * BLOCK as u64;
        match pending {
            Pending::Write { .. } => connection.queue.write(offset, addr as *const u8, BLOCK, slot, ReqFlags::empty()),
            Pending::Read { .. } => connection.queue.read(offset, addr as *mut u8, BLOCK, slot, ReqFlags::empty()),
        }
        self.slots[slot] = Some(pending);
    }

    fn complete(&mut self, slot: usize, ret: i32) -> Result<(), Corruption> {
        let pending = self.slots[slot].take().expect("a completion for a request in flight");
        if ret != 0 {
            // The request failed while the connection was up: its write may or may not
            // have reached the device; a neighbour's fault must never cause this.
            self.progress.errors.fetch_add(1, Ordering::Relaxed);
            if let Pending::Write { block, generation } = pending {
                self.model[block as usize].uncertain.push(generation);
            }
            return Ok(());
        }
        match pending {
            Pending::Write { block, generation } => {
                self.model[block as usize] = BlockState { durable: generation, uncertain: Vec::new() };
                self.progress.writes.fetch_add(1, Ordering::Relaxed);
            }
            Pending::Read { block } => {
                let seen = self.check(slot, block)?;
                self.model[block as usize] = BlockState { durable: seen, uncertain: Vec::new() };
                self.progress.reads.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    /// Verifies what slot `slot` read from `block`; returns the generation it holds.
    fn check(&mut self, slot: usize, block: u64) -> Result<u64, Corruption> {
        let export = self.export;
        let state = self.model[block as usize].clone();
        let data = self.buffer(slot).to_vec();
        let fail = |what: String| Corruption { export, block, what };
        let seen = read_stamp(&data).map_err(fail)?;
        if seen.generation != 0 && (seen.export != export || seen.block != block) {
            return Err(fail(format!("misdirected: holds export {} block {}", seen.export, seen.block)));
        }
        if seen.generation != state.durable && !state.uncertain.contains(&seen.generation) {
            return Err(fail(format!(
                "holds generation {}, expected {} (acknowledged){}",
                seen.generation,
                state.durable,
                if state.uncertain.is_empty() { String::new() } else { format!(" or one of {:?}", state.uncertain) }
            )));
        }
        Ok(seen.generation)
    }

    /// Keeps [`QUEUE_DEPTH`] requests in flight until `stop`, reconnecting whenever
    /// the connection goes away: a failed call, no completion within `stall`, or
    /// `daemon_epoch` moving on (the test restarted the daemon; a front end notices a
    /// dead daemon by its socket closing, which libblkio does not report).
    /// Returns the first corruption found.
    pub fn run(&mut self, stop: &AtomicBool, daemon_epoch: &AtomicU64, stall: Duration) -> Result<(), Corruption> {
        let mut completions: Vec<MaybeUninit<Completion>> = (0..QUEUE_DEPTH).map(|_| MaybeUninit::uninit()).collect();
        let mut last_progress = Instant::now();
        let mut connected_epoch = 0;
        while !stop.load(Ordering::Relaxed) {
            if self.connection.is_none() {
                connected_epoch = daemon_epoch.load(Ordering::Acquire);
                if self.connect().is_err() {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                last_progress = Instant::now();
                for slot in 0..QUEUE_DEPTH {
                    self.submit(slot);
                }
            }
            let connection = self.connection.as_mut().expect("connected");
            let mut timeout = Duration::from_millis(100);
            let reaped = connection.queue.do_io(&mut completions, 1, Some(&mut timeout), None);
            let n = match reaped {
                Ok(n) => n,
                Err(_) => {
                    self.abandon_connection();
                    continue;
                }
            };
            for c in &completions[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                self.complete(c.user_data, c.ret)?;
                last_progress = Instant::now();
                self.submit(c.user_data);
            }
            if self.progress.disconnect.swap(false, Ordering::Relaxed)
                || daemon_epoch.load(Ordering::Acquire) != connected_epoch
                || (n == 0 && last_progress.elapsed() > stall)
            {
                self.abandon_connection();
            }
        }
        self.abandon_connection();
        Ok(())
    }

    /// Reads every block once more on a fresh connection and checks it: the final
    /// word on what survived.
    pub fn verify_all(&mut self) -> Result<u64, Corruption> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.connect().is_err() {
            assert!(Instant::now() < deadline, "{}: no connection for the final check", self.socket.display());
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut completions: Vec<MaybeUninit<Completion>> = (0..1).map(|_| MaybeUninit::uninit()).collect();
        for block in 0..self.blocks {
            let connection = self.connection.as_mut().expect("connected");
            connection.queue.read(block * BLOCK as u64, connection.base as *mut u8, BLOCK, 0, ReqFlags::empty());
            let mut timeout = Duration::from_secs(10);
            let n = connection.queue.do_io(&mut completions, 1, Some(&mut timeout), None).expect("final read");
            assert_eq!(n, 1, "{}: final read of block {block} did not complete", self.socket.display());
            // SAFETY: do_io initialised the first entry.
            let ret = unsafe { completions[0].assume_init_ref() }.ret;
            assert_eq!(ret, 0, "{}: final read of block {block} failed", self.socket.display());
            self.slots[0] = Some(Pending::Read { block });
            self.complete(0, 0)?;
        }
        self.connection = None;
        Ok(self.blocks)
    }
}

/// Who wrote a block, as read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    export: u32,
    block: u64,
    generation: u64,
}

/// Fills `buf` with (magic, export, block, generation) records, each 32 bytes.
fn stamp(buf: &mut [u8], export: u32, block: u64, generation: u64) {
    for record in buf.chunks_exact_mut(32) {
        record[0..8].copy_from_slice(&STAMP_MAGIC.to_le_bytes());
        record[8..12].copy_from_slice(&export.to_le_bytes());
        record[12..16].copy_from_slice(&(!export).to_le_bytes());
        record[16..24].copy_from_slice(&block.to_le_bytes());
        record[24..32].copy_from_slice(&generation.to_le_bytes());
    }
}

/// The stamp a block holds: generation 0 for a block never written (all zeroes); an
/// error naming the offset where a block disagrees with its first record (torn).
fn read_stamp(buf: &[u8]) -> Result<Stamp, String> {
    if buf.iter().all(|&b| b == 0) {
        return Ok(Stamp { export: 0, block: 0, generation: 0 });
    }
    let first = &buf[0..32];
    let magic = u64::from_le_bytes(first[0..8].try_into().expect("8 bytes"));
    if magic != STAMP_MAGIC {
        return Err(format!("no stamp: starts with {:02x?}", &first[..16]));
    }
    if let Some(at) = buf.chunks_exact(32).position(|r| r != first) {
        return Err(format!("torn: record at byte {} differs from the first", at * 32));
    }
    let u32_at = |o: usize| u32::from_le_bytes(first[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(first[o..o + 8].try_into().expect("8 bytes"));
    Ok(Stamp { export: u32_at(8), block: u64_at(16), generation: u64_at(24) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_reads_back_and_a_torn_block_is_named() {
        let mut buf = vec![0u8; BLOCK];
        stamp(&mut buf, 3, 77, 9);
        assert_eq!(read_stamp(&buf), Ok(Stamp { export: 3, block: 77, generation: 9 }));
        buf[2048..2048 + 32].fill(0);
        assert_eq!(read_stamp(&buf), Err("torn: record at byte 2048 differs from the first".into()));
        assert_eq!(read_stamp(&[0u8; BLOCK]), Ok(Stamp { export: 0, block: 0, generation: 0 }));
        assert!(read_stamp(&[0xffu8; BLOCK]).unwrap_err().starts_with("no stamp"));
    }
}
