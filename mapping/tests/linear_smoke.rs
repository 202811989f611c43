//! A linear device maps its sectors onto the backend at the offset, for every operation,
//! in pieces no larger than the backend takes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use udm_drivers::backends::mem::MemDevice;
use udm_drivers::dma::PagePolicy;
use udm_drivers::{
    BlockDevice, Completion, DeviceError, DeviceInfo, IoError, IoQueue, IoRequest, MemoryRegion, QueueFull, SECTOR_SIZE,
};
use udm_mapping::sync_io;
use udm_mapping::{Registry, TableSlot};

fn mem(bytes: u64) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::with_policy(bytes, 512, PagePolicy::Normal).unwrap())
}

#[test]
fn linear_maps_onto_backend_at_offset() {
    let reg = Registry::new();
    let disk = mem(1 << 20);
    reg.register_backend("disk0", Arc::clone(&disk)).unwrap();
    reg.create("vol", None, Some("0 100 linear disk0 200\n100 28 zero")).unwrap();
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), "0 100 linear disk0 200\n100 28 zero \n");
    let vol = reg.device("vol").unwrap();
    assert_eq!(vol.info().sectors, 128);

    let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
    sync_io::write(vol.as_ref(), 96, &data, false).unwrap();
    let mut back = vec![0u8; 2048];
    sync_io::read(disk.as_ref(), 296, &mut back).unwrap();
    assert_eq!(&back[..], &data[..2048], "the part inside the linear segment lands at offset 200");
    let mut through = vec![0xffu8; 4096];
    sync_io::read(vol.as_ref(), 96, &mut through).unwrap();
    assert_eq!(&through[..2048], &data[..2048]);
    assert!(through[2048..].iter().all(|&b| b == 0), "the zero segment reads zeroes");
    assert!(sync_io::flush(vol.as_ref()).is_ok());
}

/// A device that takes at most `max` bytes per request and fails larger ones, recording
/// the largest it was sent.
struct SmallTransfers {
    inner: Arc<dyn BlockDevice>,
    max: u32,
    largest: Arc<AtomicU64>,
}

struct SmallQueue {
    inner: Box<dyn IoQueue>,
    max: u64,
    largest: Arc<AtomicU64>,
    refused: Vec<Completion>,
}

impl BlockDevice for SmallTransfers {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { max_transfer: self.max, ..self.inner.info() }
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        Ok(Box::new(SmallQueue {
            inner: self.inner.open_queue(depth)?,
            max: u64::from(self.max),
            largest: Arc::clone(&self.largest),
            refused: Vec::new(),
        }))
    }

    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.inner.register_memory(region)
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.inner.unregister_memory(region)
    }
}

impl IoQueue for SmallQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        let bytes = req.sectors * SECTOR_SIZE;
        self.largest.fetch_max(bytes, Ordering::Relaxed);
        if req.op.has_data() && bytes > self.max {
            self.refused.push(Completion { tag: req.tag, result: Err(IoError::BadBuffer { reason: "too large" }) });
            return Ok(());
        }
        self.inner.submit(req)
    }

    fn kick(&mut self) {
        self.inner.kick();
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        let mut n = 0;
        while n < out.len() {
            let Some(c) = self.refused.pop() else { break };
            out[n] = c;
            n += 1;
        }
        n + self.inner.poll(&mut out[n..])
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.refused.len()
    }

    fn depth(&self) -> usize {
        self.inner.depth()
    }
}

/// A client told 4 MiB per request (the first table) keeps sending that after a reload
/// onto a device taking 64 KiB: the mapped device splits its pieces to 64 KiB, and the
/// data lands whole.
#[test]
fn pieces_are_split_to_the_max_transfer_of_the_device_below() {
    let reg = Registry::new();
    let big = mem(8 << 20);
    let largest = Arc::new(AtomicU64::new(0));
    let small: Arc<dyn BlockDevice> =
        Arc::new(SmallTransfers { inner: mem(8 << 20), max: 64 << 10, largest: Arc::clone(&largest) });
    reg.register_backend("big", big).unwrap();
    reg.register_backend("small", Arc::clone(&small)).unwrap();
    reg.create("vol", None, Some("0 16384 linear big 0")).unwrap();
    let vol = reg.device("vol").unwrap();
    assert_eq!(vol.info().max_transfer, 4 << 20);
    reg.load("vol", "0 8192 linear small 0\n8192 8192 linear big 0").unwrap();
    reg.suspend("vol", Default::default()).unwrap();
    reg.resume("vol").unwrap();
    assert_eq!(vol.info().max_transfer, 64 << 10);

    let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
    sync_io::write(vol.as_ref(), 4096 - 64, &data, false).expect("a 1 MiB write across both segments");
    assert!(
        largest.load(Ordering::Relaxed) <= 64 << 10,
        "the small device got {} bytes",
        largest.load(Ordering::Relaxed)
    );
    let mut back = vec![0u8; 1 << 20];
    sync_io::read(vol.as_ref(), 4096 - 64, &mut back).unwrap();
    assert!(back == data);
    let mut direct = vec![0u8; 64 << 10];
    sync_io::read(small.as_ref(), 4096 - 64, &mut direct).unwrap();
    assert!(direct[..] == data[..64 << 10], "the first piece reached the small device at its offset");
}
