//! A small synchronous wrapper around libblkio's Rust API (`blkio` crate) for tests: a
//! real vhost-user-blk front end that udm did not write.
#![allow(dead_code)]

use std::mem::MaybeUninit;
use std::path::Path;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// A connected, started client with one buffer region.
pub struct Client {
    // Queues must drop before the Blkio instance.
    pub queues: Vec<Blkioq>,
    pub blkio: Blkio,
    pub region: MemoryRegion,
}

/// One operation for [`Client::run`].
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Read { offset: u64, buf: usize, len: usize },
    Write { offset: u64, buf: usize, len: usize },
    Flush,
    Discard { offset: u64, len: u64 },
    WriteZeroes { offset: u64, len: u64 },
}

pub const REGION_LEN: usize = 16 << 20;

impl Client {
    pub fn connect(path: &Path, queues: i32, read_only: bool) -> Result<Client, blkio::Error> {
        Self::connect_with_rings(path, queues, read_only, None)
    }

    /// As [`Client::connect`], asking for rings of `ring_size` entries (libblkio's
    /// `queue-size`; its own default otherwise).
    pub fn connect_with_rings(
        path: &Path,
        queues: i32,
        read_only: bool,
        ring_size: Option<i32>,
    ) -> Result<Client, blkio::Error> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", path.to_str().unwrap())?;
        b.set_bool("read-only", read_only)?;
        b.connect()?;
        b.set_i32("num-queues", queues)?;
        if let Some(size) = ring_size {
            b.set_i32("queue-size", size)?;
        }
        let out = b.start()?;
        let region = b.alloc_mem_region(REGION_LEN)?;
        b.map_mem_region(&region)?;
        Ok(Client { queues: out.queues, blkio: b, region })
    }

    pub fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The buffer region as bytes.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is REGION_LEN bytes mapped by libblkio for the life of the
        // client; no request is in flight while the slice is used (run() waits for all).
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    /// Submits every op on queue `q` at once, waits for all; returns each op's result
    /// (0 or a negative errno) in order.
    pub fn run(&mut self, q: usize, ops: &[Op]) -> Vec<i32> {
        let base = self.region.addr;
        let queue = &mut self.queues[q];
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Read { offset, buf, len } => queue.read(offset, (base + buf) as *mut u8, len, i, ReqFlags::empty()),
                Op::Write { offset, buf, len } => {
                    queue.write(offset, (base + buf) as *const u8, len, i, ReqFlags::empty())
                }
                Op::Flush => queue.flush(i, ReqFlags::empty()),
                Op::Discard { offset, len } => queue.discard(offset, len, i, ReqFlags::empty()),
                Op::WriteZeroes { offset, len } => queue.write_zeroes(offset, len, i, ReqFlags::empty()),
            }
        }
        let mut results = vec![i32::MIN; ops.len()];
        let mut done = 0;
        let mut comps: Vec<MaybeUninit<Completion>> = (0..ops.len().max(1)).map(|_| MaybeUninit::uninit()).collect();
        while done < ops.len() {
            let mut timeout = Duration::from_secs(30);
            let n = queue.do_io(&mut comps, 1, Some(&mut timeout), None).expect("do_io");
            assert!(n > 0, "no completion within 30 s");
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                results[c.user_data] = c.ret;
            }
            done += n;
        }
        results
    }
}
