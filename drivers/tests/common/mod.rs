//! Helpers shared by the backend tests: run requests to completion, fill and check
//! patterns, and the whole-device integrity workout every backend must pass.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::{Arc, Barrier};

use udm_drivers::dma::{DmaMemory, PagePolicy};
use udm_drivers::{BlockDevice, Completion, IoError, IoQueue, IoRequest, IoSegment, SgList, SECTOR_SIZE};

/// Submits every request (polling whenever the queue is full), kicks, and polls until
/// all have completed. Returns the results indexed like `reqs` (tags are overwritten).
pub fn run(queue: &mut dyn IoQueue, reqs: &[IoRequest]) -> Vec<Result<(), IoError>> {
    let mut results: Vec<Option<Result<(), IoError>>> = vec![None; reqs.len()];
    let mut out = vec![Completion::EMPTY; 64];
    let mut reap = |queue: &mut dyn IoQueue, results: &mut Vec<Option<Result<(), IoError>>>| {
        let n = queue.poll(&mut out);
        for c in &out[..n] {
            assert!(results[c.tag as usize].replace(c.result).is_none(), "tag {} completed twice", c.tag);
        }
    };
    for (i, r) in reqs.iter().enumerate() {
        let mut req = *r;
        req.tag = i as u64;
        loop {
            match queue.submit(req) {
                Ok(()) => break,
                Err(full) => {
                    assert_eq!(full.0.tag, i as u64, "QueueFull hands back the same request");
                    req = full.0;
                    queue.kick();
                    reap(queue, &mut results);
                }
            }
        }
    }
    queue.kick();
    while queue.in_flight() > 0 {
        reap(queue, &mut results);
    }
    results.into_iter().map(|r| r.expect("every request completes")).collect()
}

/// Runs one request.
pub fn run_one(queue: &mut dyn IoQueue, req: IoRequest) -> Result<(), IoError> {
    run(queue, &[req])[0]
}

/// The byte at offset `i` of sector `sector` written with `salt`.
pub fn pattern_byte(sector: u64, i: usize, salt: u64) -> u8 {
    let x = sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ salt.wrapping_mul(0xff51_afd7_ed55_8ccd) ^ (i as u64 >> 3);
    (x >> ((i & 7) * 8)) as u8
}

/// Fills `buf` with the pattern of the sectors starting at `sector`.
pub fn fill(buf: &mut [u8], sector: u64, salt: u64) {
    for (s, chunk) in buf.chunks_mut(SECTOR_SIZE as usize).enumerate() {
        for (i, b) in chunk.iter_mut().enumerate() {
            *b = pattern_byte(sector + s as u64, i, salt);
        }
    }
}

/// The first sector of `buf` (which starts at `sector`) that differs from the pattern.
pub fn first_mismatch(buf: &[u8], sector: u64, salt: u64) -> Option<u64> {
    buf.chunks(SECTOR_SIZE as usize).enumerate().find_map(|(s, chunk)| {
        let sec = sector + s as u64;
        chunk.iter().enumerate().any(|(i, &b)| b != pattern_byte(sec, i, salt)).then_some(sec)
    })
}

/// A DMA buffer cut into segments of uneven sizes (multiples of 512), so requests go
/// through real scatter-gather.
pub struct Buffer {
    pub mem: DmaMemory,
    pub segments: Vec<IoSegment>,
    pub len: usize,
}

impl Buffer {
    pub fn new(len: usize) -> Self {
        let mem = DmaMemory::allocate(len, PagePolicy::PreferHuge).unwrap();
        let cuts = [512usize, 3584, 1024, 7168];
        let mut segments = Vec::new();
        let mut off = 0;
        let mut k = 0;
        while off < len {
            let l = cuts[k % cuts.len()].min(len - off);
            // SAFETY: inside `mem`, which the Buffer owns and outlives every request.
            segments.push(unsafe { IoSegment::new(mem.as_ptr().add(off), l) });
            off += l;
            k += 1;
        }
        Buffer { mem, segments, len }
    }

    /// The whole buffer as a list.
    pub fn sg(&self) -> SgList {
        // SAFETY: the segments and memory live as long as self; tests keep self alive
        // until their requests complete.
        unsafe { SgList::from_raw(self.segments.as_ptr(), self.segments.len()) }
    }

    #[allow(clippy::mut_from_ref)]
    pub fn bytes(&self) -> &mut [u8] {
        // SAFETY: tests touch the bytes only while no request uses the buffer.
        unsafe { &mut self.mem.as_mut_slice()[..self.len] }
    }
}

/// Writes a pattern over the whole device from `threads` threads at once (each its
/// own queue and slice of the device), then each thread reads back a slice written by
/// another thread and checks it. Requests are `chunk` bytes and go through uneven
/// scatter-gather lists, whole and windowed.
pub fn whole_device_integrity(dev: Arc<dyn BlockDevice>, threads: usize, chunk: usize, salt: u64) {
    let info = dev.info();
    let sectors = info.sectors;
    let per_thread = sectors / threads as u64 / (chunk as u64 / SECTOR_SIZE) * (chunk as u64 / SECTOR_SIZE);
    assert!(per_thread > 0, "device too small for the test");
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let dev = Arc::clone(&dev);
            let barrier = Arc::clone(&barrier);
            std::thread::spawn(move || {
                let depth = 8;
                let mut q = dev.open_queue(depth).unwrap();
                let bufs: Vec<Buffer> = (0..depth).map(|_| Buffer::new(chunk)).collect();
                let chunk_sectors = chunk as u64 / SECTOR_SIZE;
                // The last thread also covers the tail the division left over.
                let region = |t: usize| {
                    let start = t as u64 * per_thread;
                    let end =
                        if t == threads - 1 { sectors / chunk_sectors * chunk_sectors } else { start + per_thread };
                    start..end
                };
                let mine = region(t);
                let mut at = mine.start;
                while at < mine.end {
                    let n = (((mine.end - at) / chunk_sectors) as usize).min(depth);
                    let reqs: Vec<IoRequest> = (0..n)
                        .map(|i| {
                            let s = at + i as u64 * chunk_sectors;
                            fill(bufs[i].bytes(), s, salt);
                            // Alternate whole lists and windows of a list (not whole arrays).
                            let sg = if i % 2 == 0 { bufs[i].sg() } else { bufs[i].sg().slice(0, chunk) };
                            IoRequest::write(s, sg, 0)
                        })
                        .collect();
                    assert!(run(&mut *q, &reqs).iter().all(|r| r.is_ok()), "writes at sector {at} failed");
                    at += n as u64 * chunk_sectors;
                }
                assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
                barrier.wait();
                let theirs = region((t + 1) % threads);
                let mut at = theirs.start;
                while at < theirs.end {
                    let n = (((theirs.end - at) / chunk_sectors) as usize).min(depth);
                    let reqs: Vec<IoRequest> = (0..n)
                        .map(|i| {
                            bufs[i].bytes().fill(0xee);
                            IoRequest::read(at + i as u64 * chunk_sectors, bufs[i].sg(), 0)
                        })
                        .collect();
                    assert!(run(&mut *q, &reqs).iter().all(|r| r.is_ok()), "reads at sector {at} failed");
                    for (i, b) in bufs.iter().enumerate().take(n) {
                        let s = at + i as u64 * chunk_sectors;
                        assert_eq!(first_mismatch(b.bytes(), s, salt), None, "bad data read at sector {s}");
                    }
                    at += n as u64 * chunk_sectors;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Reads `sectors` at `sector` into a fresh buffer and returns the bytes.
pub fn read_back(q: &mut dyn IoQueue, sector: u64, sectors: u64) -> Vec<u8> {
    let b = Buffer::new((sectors * SECTOR_SIZE) as usize);
    assert_eq!(run_one(q, IoRequest::read(sector, b.sg(), 0)), Ok(()));
    b.bytes().to_vec()
}

/// Writes the pattern to `sectors` at `sector`.
pub fn write_pattern(q: &mut dyn IoQueue, sector: u64, sectors: u64, salt: u64) -> Result<(), IoError> {
    let b = Buffer::new((sectors * SECTOR_SIZE) as usize);
    fill(b.bytes(), sector, salt);
    run_one(q, IoRequest::write(sector, b.sg(), 0))
}
