//! Helpers shared by the mapping integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::sync::Arc;

use udm_drivers::backends::mem::MemDevice;
use udm_drivers::dma::PagePolicy;
use udm_drivers::{BlockDevice, Completion, IoQueue, IoRequest, IoSegment, SgList};

/// A RAM disk of `sectors` 512-byte sectors in ordinary pages.
pub fn mem(sectors: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::with_policy(sectors * 512, 512, PagePolicy::Normal).unwrap())
}

/// A buffer with its segment, kept together so the SgList stays valid while in flight.
pub struct Buf {
    pub data: Vec<u8>,
    seg: Box<IoSegment>,
}

impl Buf {
    pub fn new(data: Vec<u8>) -> Self {
        let mut data = data;
        // SAFETY: `data` is owned by the Buf and never reallocated while the Buf lives.
        let seg = Box::new(unsafe { IoSegment::new(data.as_mut_ptr(), data.len()) });
        Buf { data, seg }
    }

    pub fn zeroed(len: usize) -> Self {
        Self::new(vec![0u8; len])
    }

    pub fn sg(&self) -> SgList {
        // SAFETY: the segment and the memory live as long as the Buf; tests keep the
        // Buf alive until the request's completion is reaped.
        unsafe { SgList::from_segment(&self.seg) }
    }
}

/// Polls `q` until the request tagged `tag` completes; returns its result.
pub fn wait_for(q: &mut dyn IoQueue, tag: u64) -> Result<(), udm_drivers::IoError> {
    let mut out = [Completion::EMPTY; 16];
    let mut seen = None;
    for _ in 0..10_000_000u64 {
        let n = q.poll(&mut out);
        for c in &out[..n] {
            assert!(seen.is_none() || c.tag != tag, "tag {tag} completed twice");
            if c.tag == tag {
                seen = Some(c.result);
            }
        }
        if let Some(r) = seen {
            return r;
        }
        std::thread::yield_now();
    }
    panic!("request {tag} never completed");
}

/// Submits and waits for one request.
pub fn run(q: &mut dyn IoQueue, req: IoRequest) -> Result<(), udm_drivers::IoError> {
    let tag = req.tag;
    q.submit(req).expect("room in the queue");
    q.kick();
    wait_for(q, tag)
}

/// A deterministic byte pattern for sector `sector` written in round `round`.
pub fn pattern(sector: u64, round: u64, len_sectors: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity((len_sectors * 512) as usize);
    for s in 0..len_sectors {
        let seed = (sector + s).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ round.wrapping_mul(0xC2B2_AE3D_27D4_EB4F);
        for i in 0..64u64 {
            v.extend_from_slice(&(seed.wrapping_add(i.wrapping_mul(0x1656_67B1_9E37_79F9))).to_le_bytes());
        }
    }
    v
}
