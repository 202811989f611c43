//! Helpers shared by the snapshot integration tests: the kernel-made fixtures
//! (fixtures/dm-snapshot), RAM backends, synchronous I/O through a held queue.
#![allow(dead_code)]

pub mod crash;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use udm_drivers::backends::mem::MemDevice;
use udm_drivers::dma::PagePolicy;
use udm_drivers::{BlockDevice, IoError, IoQueue, IoRequest};
use udm_mapping::exception_store::sync_io;
use udm_mapping::io_buf::IoBuf;
use udm_mapping::Registry;

pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/dm-snapshot").join(rel)
}

pub fn fixture_text(rel: &str) -> String {
    std::fs::read_to_string(fixture_path(rel)).unwrap_or_else(|e| panic!("reading fixture {rel}: {e}"))
}

pub fn unxz(rel: &str) -> Vec<u8> {
    let path = fixture_path(rel);
    let out = Command::new("xz").arg("-dc").arg(&path).output().expect("xz-utils is installed (setup-host.sh)");
    assert!(out.status.success(), "xz -dc {} failed", path.display());
    out.stdout
}

/// A RAM backend holding `image`.
pub fn mem_with(image: &[u8]) -> Arc<dyn BlockDevice> {
    let dev: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::with_policy(image.len() as u64, 512, PagePolicy::Normal).unwrap());
    let mut io = SyncIo::new(dev.as_ref());
    io.write(0, image).unwrap();
    dev
}

/// Synchronous I/O through one queue kept open (so mapped devices keep their
/// per-thread state between calls).
pub struct SyncIo {
    q: Box<dyn IoQueue>,
}

impl SyncIo {
    pub fn new(dev: &dyn BlockDevice) -> Self {
        SyncIo { q: dev.open_queue(32).unwrap() }
    }

    pub fn on(reg: &Registry, name: &str) -> Self {
        Self::new(reg.device(name).unwrap().as_ref())
    }

    /// Writes `data` at `sector` in requests of at most 64 KiB (as `dd bs=64k`).
    pub fn write(&mut self, sector: u64, data: &[u8]) -> Result<(), IoError> {
        for (i, piece) in data.chunks(64 << 10).enumerate() {
            let mut buf = IoBuf::new(piece.len()).unwrap();
            buf.as_mut_slice().copy_from_slice(piece);
            let s = sector + (i * (64 << 10) / 512) as u64;
            sync_io::run(self.q.as_mut(), IoRequest::write(s, buf.sg(0, piece.len()), 7))?;
        }
        Ok(())
    }

    pub fn read(&mut self, sector: u64, len: usize) -> Result<Vec<u8>, IoError> {
        let mut out = Vec::with_capacity(len);
        let step = 1 << 20;
        let mut done = 0;
        while done < len {
            let n = step.min(len - done);
            let buf = IoBuf::new(n).unwrap();
            sync_io::run(self.q.as_mut(), IoRequest::read(sector + (done / 512) as u64, buf.sg(0, n), 7))?;
            out.extend_from_slice(buf.as_slice());
            done += n;
        }
        Ok(out)
    }

    pub fn read_all(&mut self, sectors: u64) -> Result<Vec<u8>, IoError> {
        self.read(0, sectors as usize * 512)
    }
}

/// `BLOCK HASH` lines of every 4 KiB block, as the fixtures' expected-*.sha256.
pub fn block_hashes(image: &[u8]) -> String {
    let mut s = String::new();
    for (i, block) in image.chunks(4096).enumerate() {
        let h = Sha256::digest(block);
        s.push_str(&format!("{i} "));
        for b in h {
            s.push_str(&format!("{b:02x}"));
        }
        s.push('\n');
    }
    s
}

/// The `dmsetup status` arguments of `name`'s single target.
pub fn status(reg: &Registry, name: &str) -> String {
    let line = reg.status(name, udm_mapping::TableSlot::Live).unwrap();
    let line = line.trim_end_matches('\n');
    line.splitn(4, ' ').nth(3).unwrap_or("").to_string()
}

/// Writes every `(sector, data)` through `q` with up to `depth` in flight at once, in
/// order of submission; returns each write's result. Writes may overlap: with several
/// in flight the device sees them in any order.
pub fn write_batch(q: &mut dyn IoQueue, writes: &[(u64, Vec<u8>)], depth: usize) -> Vec<Result<(), IoError>> {
    submit_writes(q, writes.len(), |i| (writes[i].0, &writes[i].1, false), depth)
}

/// Writes `count` writes, write `i` being `write(i) = (sector, data, fua)`, through `q`
/// with up to `depth` in flight at once; returns each write's result.
pub fn submit_writes<'a>(
    q: &mut dyn IoQueue,
    count: usize,
    write: impl Fn(usize) -> (u64, &'a [u8], bool),
    depth: usize,
) -> Vec<Result<(), IoError>> {
    let bufs: Vec<IoBuf> = (0..count)
        .map(|i| {
            let data = write(i).1;
            let mut b = IoBuf::new(data.len()).unwrap();
            b.as_mut_slice().copy_from_slice(data);
            b
        })
        .collect();
    let mut results = vec![Ok(()); count];
    let mut next = 0;
    let mut in_flight = 0;
    let mut done = 0;
    let mut out = [udm_drivers::Completion::EMPTY; 16];
    while done < count {
        while next < count && in_flight < depth {
            let (sector, _, fua) = write(next);
            let mut req = IoRequest::write(sector, bufs[next].sg(0, bufs[next].len()), next as u64);
            req.fua = fua;
            match q.submit(req) {
                Ok(()) => {
                    next += 1;
                    in_flight += 1;
                }
                Err(_) => break,
            }
        }
        q.kick();
        let n = q.poll(&mut out);
        for c in &out[..n] {
            results[c.tag as usize] = c.result;
            in_flight -= 1;
            done += 1;
        }
        if n == 0 {
            std::thread::yield_now();
        }
    }
    results
}

/// A small deterministic generator (xorshift), so failures reproduce from a seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let tag = self.next();
        (0..len).map(|i| (tag.wrapping_add(i as u64 * 0x9E37) >> 8) as u8).collect()
    }
}
