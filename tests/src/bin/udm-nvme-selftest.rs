//! `udm-nvme-selftest`: udm's NVMe driver checked against a real (or QEMU-emulated)
//! controller. The VM tests carry it into a guest whose NVMe functions are bound to
//! vfio-pci and run one subcommand per check; it prints what it found and exits non-zero
//! on the first wrong result.
//!
//! * `identify BDF`: controller and namespace facts as `key=value` lines.
//! * `integrity SPEC --threads N [--wait]`: the whole namespace written and read back
//!   with mixed request sizes and scatter-gather layouts, one queue per thread; with
//!   `--wait` the threads sleep in `IoQueue::wait` (hybrid polling) instead of spinning.
//! * `out-of-range SPEC`: a read past the end fails with the controller's status.
//! * `reset SPEC`: a controller reset with writes outstanding; every write completes
//!   and the data reads back.
//! * `timeout SPEC`: a command on a device slower than the timeout fails with TimedOut.
//! * `queues BDF`: opening more queues than the controller granted fails clearly.
//! * `media-error SPEC`: a read the storage fails comes back as Unrecovered Read Error.
//! * `shared SPEC...`: several controllers in one VFIO container, I/O on each.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use udm_drivers::backend_spec::BackendSpec;
use udm_drivers::dma::{DmaMemory, PagePolicy};
use udm_drivers::nvme::cmd::{feature, Command};
use udm_drivers::nvme::{self, ControllerOptions, NvmeNamespace};
use udm_drivers::{BlockDevice, Completion, IoError, IoOp, IoQueue, IoRequest, IoSegment, SgList, SECTOR_SIZE};

#[derive(Debug, Parser)]
#[command(name = "udm-nvme-selftest")]
struct Cli {
    #[command(subcommand)]
    check: Check,
}

#[derive(Debug, Subcommand)]
enum Check {
    /// Prints what the controller and its namespaces report.
    Identify { bdf: String },
    /// Writes and verifies the whole namespace.
    Integrity {
        spec: String,
        #[arg(long, default_value_t = 2)]
        threads: usize,
        #[arg(long, default_value_t = 16)]
        qd: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Leave the data in place (no final discard), for a check from outside.
        #[arg(long)]
        keep: bool,
        /// Sleep in `IoQueue::wait` whenever every slot is busy, instead of spinning.
        #[arg(long)]
        wait: bool,
    },
    /// A read past the end of the namespace.
    OutOfRange { spec: String },
    /// A controller reset with I/O outstanding.
    Reset { spec: String },
    /// A command that outlives the timeout.
    Timeout { spec: String },
    /// Opens queues until the controller has none left.
    Queues { bdf: String },
    /// Reads from a namespace whose storage fails them (QEMU blkdebug).
    MediaError { spec: String },
    /// Two controllers in one process share one VFIO container; I/O on both.
    Shared { specs: Vec<String> },
}

type Failure = String;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let result = match Cli::parse().check {
        Check::Identify { bdf } => identify(&bdf),
        Check::Integrity { spec, threads, qd, seed, keep, wait } => integrity(&spec, threads, qd, seed, keep, wait),
        Check::OutOfRange { spec } => out_of_range(&spec),
        Check::Reset { spec } => reset(&spec),
        Check::Timeout { spec } => timeout(&spec),
        Check::Queues { bdf } => queues(&bdf),
        Check::Shared { specs } => shared(&specs),
        Check::MediaError { spec } => media_error(&spec),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("FAILED: {e}");
            ExitCode::FAILURE
        }
    }
}

fn open(spec: &str) -> Result<Arc<NvmeNamespace>, Failure> {
    match BackendSpec::parse(spec).map_err(|e| e.to_string())? {
        BackendSpec::Nvme { bdf, nsid, timeout_ms, shadow_doorbells } => {
            let mut o = ControllerOptions::default();
            if let Some(ms) = timeout_ms {
                o.io_timeout = Duration::from_millis(ms);
            }
            o.shadow_doorbells = shadow_doorbells;
            nvme::open_namespace(&bdf, nsid, o).map(Arc::new).map_err(|e| e.to_string())
        }
        _ => Err(format!("{spec} is not an nvme: spec")),
    }
}

fn identify(bdf: &str) -> Result<(), Failure> {
    let ctrl = nvme::open_controller(bdf, ControllerOptions::default()).map_err(|e| e.to_string())?;
    let id = ctrl.identity();
    let caps = ctrl.capabilities();
    println!("bdf={}", ctrl.bdf());
    println!("vendor={:#06x}", id.vendor_id);
    println!("serial={}", id.serial);
    println!("model={}", id.model);
    println!("version={}", ctrl.version());
    println!("mdts={}", id.mdts);
    println!("max_transfer={}", ctrl.max_transfer());
    println!("mqes={}", caps.max_queue_entries);
    println!("io_queue_pairs={}", ctrl.io_queue_pairs());
    println!("shadow_doorbells={}", ctrl.uses_shadow_doorbells());
    println!("namespaces={}", ctrl.namespaces().len());
    for (nsid, ns) in ctrl.namespaces() {
        println!("ns{nsid}.blocks={}", ns.size_blocks);
        println!("ns{nsid}.block_size={}", ns.block_size);
        let dev = NvmeNamespace::new(&ctrl, *nsid).map_err(|e| e.to_string())?;
        let info = dev.info();
        println!("ns{nsid}.sectors={}", info.sectors);
        println!("ns{nsid}.discard={}", info.supports_discard);
        println!("ns{nsid}.write_zeroes={}", info.supports_write_zeroes);
        println!("ns{nsid}.volatile_cache={}", info.volatile_cache);
    }
    Ok(())
}

/// The 16-byte stamp at the start of every sector: its number and the seed; the rest of
/// the sector repeats a byte derived from both.
fn fill_sector(buf: &mut [u8], sector: u64, seed: u64) {
    buf[..8].copy_from_slice(&sector.to_le_bytes());
    buf[8..16].copy_from_slice(&seed.to_le_bytes());
    let b = (sector.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed) as u8;
    buf[16..].fill(b);
}

fn check_sector(buf: &[u8], sector: u64, seed: u64) -> Result<(), Failure> {
    let mut want = [0u8; 512];
    fill_sector(&mut want, sector, seed);
    if buf != want {
        let got_sector = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
        let got_seed = u64::from_le_bytes(buf[8..16].try_into().expect("8 bytes"));
        return Err(format!(
            "sector {sector}: wrong data (stamp says sector {got_sector}, seed {got_seed}; want seed {seed})"
        ));
    }
    Ok(())
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Scatter-gather layouts the checks cycle through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// One page-aligned buffer.
    Contiguous,
    /// Page-sized pieces at scattered page-aligned addresses.
    ScatteredPages,
    /// A first piece starting mid-page, then whole pages elsewhere.
    MidPageStart,
    /// Block-sized pieces at addresses that are not page aligned (PRPs need a command
    /// per piece).
    UnalignedBlocks,
    /// Pieces of odd sizes (not whole blocks): only bounce buffers can carry them.
    OddPieces,
    /// Memory never registered with the device (bounce buffers).
    Unregistered,
}

const LAYOUTS: [Layout; 6] = [
    Layout::Contiguous,
    Layout::ScatteredPages,
    Layout::MidPageStart,
    Layout::UnalignedBlocks,
    Layout::OddPieces,
    Layout::Unregistered,
];

/// Bytes of buffer space per in-flight slot (room for the gaps the layouts leave).
const SLOT_BYTES: usize = 1 << 20;
/// Largest request the checks make.
const MAX_REQUEST: usize = 256 << 10;
const PAGE: usize = 4096;

/// One in-flight request's buffers: the segment array must stay put until it completes.
struct Slot {
    segs: Vec<IoSegment>,
    base: *mut u8,
    unregistered: *mut u8,
    sector: u64,
    bytes: usize,
    op: IoOp,
    busy: bool,
}

/// Places `bytes` in the slot's memory following `layout`; returns the list.
fn build_sg(slot: &mut Slot, bytes: usize, block: usize, layout: Layout, rng: &mut Rng) -> SgList {
    slot.segs.clear();
    let push = |segs: &mut Vec<IoSegment>, base: *mut u8, off: usize, len: usize| {
        assert!(off + len <= SLOT_BYTES);
        // SAFETY: inside the slot's SLOT_BYTES of memory, which outlives the request.
        segs.push(unsafe { IoSegment::new(base.add(off), len) });
    };
    match layout {
        Layout::Contiguous => push(&mut slot.segs, slot.base, 0, bytes),
        Layout::Unregistered => push(&mut slot.segs, slot.unregistered, 0, bytes),
        Layout::ScatteredPages => {
            let mut left = bytes;
            let mut off = 0;
            while left > 0 {
                let n = left.min(PAGE);
                push(&mut slot.segs, slot.base, off, n);
                off += 2 * PAGE;
                left -= n;
            }
        }
        Layout::MidPageStart => {
            let first = block.max(PAGE - block).min(bytes);
            push(&mut slot.segs, slot.base, PAGE - first, first);
            let mut left = bytes - first;
            let mut off = 3 * PAGE;
            while left > 0 {
                let n = left.min(2 * PAGE);
                push(&mut slot.segs, slot.base, off, n);
                off += 3 * PAGE;
                left -= n;
            }
        }
        Layout::UnalignedBlocks => {
            let mut left = bytes;
            let mut off = 512;
            while left > 0 {
                push(&mut slot.segs, slot.base, off, block);
                off += block + 1024;
                left -= block;
            }
        }
        Layout::OddPieces => {
            let mut left = bytes;
            let mut off = 4;
            while left > 0 {
                let n = (1 + rng.below(3000) as usize).next_multiple_of(4).min(left);
                push(&mut slot.segs, slot.base, off, n);
                off += n + 64;
                left -= n;
            }
        }
    }
    // SAFETY: the array and the memory stay untouched until the request completes.
    unsafe { SgList::from_raw(slot.segs.as_ptr(), slot.segs.len()) }
}

/// Memory for `qd` slots: registered DMA memory plus ordinary heap memory.
struct Buffers {
    dma: DmaMemory,
    heap: Vec<u8>,
}

fn make_slots(dev: &NvmeNamespace, qd: usize) -> Result<(Buffers, Vec<Slot>), Failure> {
    let dma = DmaMemory::allocate(qd * SLOT_BYTES, PagePolicy::PreferHuge).map_err(|e| e.to_string())?;
    dev.register_memory(dma.region()).map_err(|e| e.to_string())?;
    let mut heap = vec![0u8; qd * SLOT_BYTES + PAGE];
    let heap_base = heap.as_mut_ptr().wrapping_add(heap.as_ptr().align_offset(PAGE));
    let slots = (0..qd)
        .map(|i| Slot {
            segs: Vec::with_capacity(SLOT_BYTES / 512),
            base: dma.as_ptr().wrapping_add(i * SLOT_BYTES),
            unregistered: heap_base.wrapping_add(i * SLOT_BYTES),
            sector: 0,
            bytes: 0,
            op: IoOp::Read,
            busy: false,
        })
        .collect();
    Ok((Buffers { dma, heap }, slots))
}

/// What one integrity thread did.
struct WorkerReport {
    /// Bytes read back and checked.
    checked: u64,
    /// Times its queue slept in `wait`.
    naps: u64,
}

/// Writes (pass 0) then reads and checks (pass 1) sectors `start..end` with mixed sizes
/// and layouts, `qd` requests in flight on its own queue; with `wait`, sleeps in
/// `IoQueue::wait` whenever it has nothing to submit.
fn integrity_worker(
    dev: &NvmeNamespace,
    start: u64,
    end: u64,
    qd: usize,
    seed: u64,
    wait: bool,
) -> Result<WorkerReport, Failure> {
    let info = dev.info();
    let block = info.logical_block_size as usize;
    let bsec = block as u64 / SECTOR_SIZE;
    let mut q = dev.open_nvme_queue(qd).map_err(|e| e.to_string())?;
    let (bufs, mut slots) = make_slots(dev, qd)?;
    let mut rng = Rng(seed | 1);
    let mut done = [Completion::EMPTY; 64];
    let mut checked = 0u64;
    for pass in 0..2 {
        let op = if pass == 0 { IoOp::Write } else { IoOp::Read };
        let mut next = start;
        let mut layout_i = (seed as usize) % LAYOUTS.len();
        // A request the queue handed back (no command identifiers or bounce buffers
        // free): resubmitted after the next poll.
        let mut held: Option<IoRequest> = None;
        loop {
            if let Some(req) = held.take() {
                if let Err(full) = q.submit(req) {
                    held = Some(full.0);
                }
            }
            // Fill free slots.
            while next < end && held.is_none() {
                let Some(i) = slots.iter().position(|s| !s.busy) else { break };
                let max_blocks = (MAX_REQUEST / block) as u64;
                let blocks = 1 + rng.below(max_blocks.min((end - next) / bsec));
                let bytes = (blocks * bsec * SECTOR_SIZE) as usize;
                let layout = LAYOUTS[layout_i % LAYOUTS.len()];
                layout_i += 1;
                let slot = &mut slots[i];
                let sg = build_sg(slot, bytes, block, layout, &mut rng);
                if op == IoOp::Write {
                    let mut data = vec![0u8; bytes];
                    for (k, sector) in data.chunks_mut(512).enumerate() {
                        fill_sector(sector, next + k as u64, seed);
                    }
                    sg.copy_from_slice(&data);
                } else {
                    sg.fill_zero();
                }
                slot.sector = next;
                slot.bytes = bytes;
                slot.op = op;
                slot.busy = true;
                let req = if op == IoOp::Write {
                    IoRequest::write(next, sg, i as u64)
                } else {
                    IoRequest::read(next, sg, i as u64)
                };
                if let Err(full) = q.submit(req) {
                    held = Some(full.0);
                }
                next += blocks * bsec;
            }
            if q.in_flight() == 0 && next >= end && held.is_none() {
                break;
            }
            let starved = held.is_some() || next >= end || slots.iter().all(|s| s.busy);
            if wait && starved {
                q.wait(Duration::from_millis(10));
            } else {
                q.kick();
            }
            let n = q.poll(&mut done);
            for c in &done[..n] {
                let slot = &mut slots[c.tag as usize];
                slot.busy = false;
                if let Err(e) = c.result {
                    return Err(format!("{:?} of {} bytes at sector {} failed: {e}", slot.op, slot.bytes, slot.sector));
                }
                if slot.op == IoOp::Read {
                    // SAFETY: the request completed: its segments are ours again.
                    let sg = unsafe { SgList::from_raw(slot.segs.as_ptr(), slot.segs.len()) };
                    let mut data = vec![0u8; slot.bytes];
                    sg.copy_to_slice(&mut data);
                    for (k, sector) in data.chunks(512).enumerate() {
                        check_sector(sector, slot.sector + k as u64, seed)?;
                    }
                    checked += slot.bytes as u64;
                }
            }
        }
    }
    dev.unregister_memory(bufs.dma.region()).map_err(|e| e.to_string())?;
    drop(bufs.heap);
    Ok(WorkerReport { checked, naps: q.naps() })
}

/// Runs one request to completion on `q`.
fn run_one(q: &mut dyn IoQueue, req: IoRequest) -> Result<(), IoError> {
    q.submit(req).map_err(|_| IoError::BadBuffer { reason: "queue full" })?;
    q.kick();
    let mut done = [Completion::EMPTY; 4];
    loop {
        let n = q.poll(&mut done);
        if n > 0 {
            return done[0].result;
        }
    }
}

fn integrity(spec: &str, threads: usize, qd: usize, seed: u64, keep: bool, wait: bool) -> Result<(), Failure> {
    let dev = open(spec)?;
    let info = dev.info();
    let bsec = u64::from(info.logical_block_size) / SECTOR_SIZE;
    let per = (info.sectors / threads as u64) / bsec * bsec;
    let t0 = Instant::now();
    let results: Vec<Result<WorkerReport, Failure>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let dev = Arc::clone(&dev);
                let start = t as u64 * per;
                let end = if t + 1 == threads { info.sectors } else { start + per };
                s.spawn(move || integrity_worker(&dev, start, end, qd, seed + t as u64 * 7919, wait))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or_else(|_| Err("worker panicked".into()))).collect()
    });
    let mut total = 0;
    let mut naps = 0;
    for r in results {
        let r = r?;
        total += r.checked;
        naps += r.naps;
    }
    if total != info.sectors * SECTOR_SIZE {
        return Err(format!("checked {total} bytes of {}", info.sectors * SECTOR_SIZE));
    }
    // Write Zeroes, Discard and Flush on one queue, then the zeroes read back.
    let mut q = dev.open_queue(4).map_err(|e| e.to_string())?;
    let zero_at = info.sectors / 3 / bsec * bsec;
    let zero_len = (info.sectors / 4).min(300_000) / bsec * bsec;
    if info.supports_write_zeroes {
        run_one(q.as_mut(), IoRequest::write_zeroes(zero_at, zero_len, 1)).map_err(|e| format!("write zeroes: {e}"))?;
        let mut buf = vec![0xffu8; 64 << 10];
        let mut sector = zero_at;
        while sector < zero_at + zero_len {
            let n = ((zero_at + zero_len - sector) * SECTOR_SIZE).min(buf.len() as u64) as usize;
            buf[..n].fill(0xff);
            // SAFETY: `buf` outlives the request, which completes inside run_one.
            let seg = unsafe { IoSegment::new(buf.as_mut_ptr(), n) };
            // SAFETY: as above.
            let sg = unsafe { SgList::from_segment(&seg) };
            run_one(q.as_mut(), IoRequest::read(sector, sg, 2)).map_err(|e| format!("read after write zeroes: {e}"))?;
            if let Some(p) = buf[..n].iter().position(|&b| b != 0) {
                return Err(format!("byte {} after write zeroes at sector {sector} is not zero", p));
            }
            sector += n as u64 / SECTOR_SIZE;
        }
        println!("write_zeroes ok sectors={zero_len}");
    }
    if info.supports_discard && !keep {
        run_one(q.as_mut(), IoRequest::discard(0, info.sectors, 3)).map_err(|e| format!("discard: {e}"))?;
        println!("discard ok");
    }
    run_one(q.as_mut(), IoRequest::flush(4)).map_err(|e| format!("flush: {e}"))?;
    println!(
        "integrity ok bytes={total} threads={threads} block_size={} naps={naps} seconds={:.1}",
        info.logical_block_size,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn out_of_range(spec: &str) -> Result<(), Failure> {
    let dev = open(spec)?;
    let info = dev.info();
    let bsec = u64::from(info.logical_block_size) / SECTOR_SIZE;
    let mut q = dev.open_queue(4).map_err(|e| e.to_string())?;
    let (bufs, mut slots) = make_slots(&dev, 1)?;
    let mut rng = Rng(5);
    // The last block reads fine; the one after it is the controller's to refuse.
    let sg = build_sg(
        &mut slots[0],
        info.logical_block_size as usize,
        info.logical_block_size as usize,
        Layout::Contiguous,
        &mut rng,
    );
    run_one(q.as_mut(), IoRequest::read(info.sectors - bsec, sg, 1)).map_err(|e| format!("last block: {e}"))?;
    match run_one(q.as_mut(), IoRequest::read(info.sectors, sg, 2)) {
        Err(e @ IoError::Nvme { sct: 0, sc: 0x80 }) => println!("past the end: {e}"),
        other => return Err(format!("a read past the end gave {other:?}, not LBA Out of Range")),
    }
    match run_one(q.as_mut(), IoRequest::write(info.sectors + 8 * bsec, sg, 3)) {
        Err(e @ IoError::Nvme { sct: 0, sc: 0x80 }) => println!("write past the end: {e}"),
        other => return Err(format!("a write past the end gave {other:?}, not LBA Out of Range")),
    }
    // The queue still works.
    run_one(q.as_mut(), IoRequest::read(0, sg, 4)).map_err(|e| format!("read after the errors: {e}"))?;
    dev.unregister_memory(bufs.dma.region()).map_err(|e| e.to_string())?;
    println!("out-of-range ok");
    Ok(())
}

fn reset(spec: &str) -> Result<(), Failure> {
    let dev = open(spec)?;
    let info = dev.info();
    let ctrl = Arc::clone(dev.controller());
    let qd = 32;
    let mut q = dev.open_queue(qd).map_err(|e| e.to_string())?;
    let (bufs, mut slots) = make_slots(&dev, qd)?;
    let mut rng = Rng(9);
    let bytes = 16 << 10;
    let sectors = (bytes / 512) as u64;
    let seed = 77;
    let count = (info.sectors / sectors).min(512);
    let mut next = 0u64;
    let mut done = [Completion::EMPTY; 64];
    let mut resets = 0;
    let mut outstanding_at_reset = 0;
    let gen0 = ctrl.generation();
    let mut completed = 0;
    let mut held: Option<IoRequest> = None;
    while completed < count {
        if let Some(req) = held.take() {
            if let Err(full) = q.submit(req) {
                held = Some(full.0);
            }
        }
        while next < count && held.is_none() {
            let Some(i) = slots.iter().position(|s| !s.busy) else { break };
            let slot = &mut slots[i];
            let sg = build_sg(slot, bytes, info.logical_block_size as usize, LAYOUTS[next as usize % 4], &mut rng);
            let mut data = vec![0u8; bytes];
            for (k, s) in data.chunks_mut(512).enumerate() {
                fill_sector(s, next * sectors + k as u64, seed);
            }
            sg.copy_from_slice(&data);
            slot.busy = true;
            slot.sector = next * sectors;
            if let Err(full) = q.submit(IoRequest::write(next * sectors, sg, i as u64)) {
                held = Some(full.0);
            }
            next += 1;
        }
        q.kick();
        // Reset twice, each time with the queue full of writes.
        if resets < 2 && next >= (resets + 1) * count / 3 && q.in_flight() > 0 {
            outstanding_at_reset = outstanding_at_reset.max(q.in_flight());
            ctrl.reset_now().map_err(|e| e.to_string())?;
            resets += 1;
        }
        let n = q.poll(&mut done);
        for c in &done[..n] {
            let slot = &mut slots[c.tag as usize];
            slot.busy = false;
            c.result.map_err(|e| format!("write at sector {} failed across the reset: {e}", slot.sector))?;
            completed += 1;
        }
    }
    if ctrl.generation() != gen0 + 2 {
        return Err(format!("expected two resets, the generation went from {gen0} to {}", ctrl.generation()));
    }
    // Everything reads back.
    let mut buf = vec![0u8; bytes];
    for k in 0..count {
        let slot = &mut slots[0];
        let sg = build_sg(slot, bytes, info.logical_block_size as usize, Layout::Contiguous, &mut rng);
        run_one(q.as_mut(), IoRequest::read(k * sectors, sg, 0)).map_err(|e| format!("read back: {e}"))?;
        sg.copy_to_slice(&mut buf);
        for (j, s) in buf.chunks(512).enumerate() {
            check_sector(s, k * sectors + j as u64, seed)?;
        }
    }
    dev.unregister_memory(bufs.dma.region()).map_err(|e| e.to_string())?;
    println!("reset ok resets={resets} outstanding_at_reset={outstanding_at_reset} writes={count}");
    Ok(())
}

fn timeout(spec: &str) -> Result<(), Failure> {
    let dev = open(spec)?;
    let mut q = dev.open_queue(4).map_err(|e| e.to_string())?;
    let (bufs, mut slots) = make_slots(&dev, 1)?;
    let mut rng = Rng(3);
    let bs = dev.info().logical_block_size as usize;
    let sg = build_sg(&mut slots[0], bs, bs, Layout::Contiguous, &mut rng);
    let t0 = Instant::now();
    match run_one(q.as_mut(), IoRequest::read(0, sg, 1)) {
        Err(IoError::TimedOut) => println!("timed out after {:.1}s", t0.elapsed().as_secs_f64()),
        other => return Err(format!("a read slower than the timeout gave {other:?}, not TimedOut")),
    }
    if dev.controller().is_dead() {
        return Err("the controller did not come back from the reset".into());
    }
    dev.unregister_memory(bufs.dma.region()).map_err(|e| e.to_string())?;
    println!("timeout ok");
    Ok(())
}

fn queues(bdf: &str) -> Result<(), Failure> {
    let ctrl = nvme::open_controller(bdf, ControllerOptions::default()).map_err(|e| e.to_string())?;
    let nsid = ctrl.namespaces().first().map(|n| n.0).ok_or("no namespace")?;
    let dev = NvmeNamespace::new(&ctrl, nsid).map_err(|e| e.to_string())?;
    let granted = ctrl.io_queue_pairs() as usize;
    let mut open = Vec::new();
    for _ in 0..granted {
        open.push(dev.open_queue(8).map_err(|e| e.to_string())?);
    }
    match dev.open_queue(8) {
        Ok(_) => return Err(format!("a queue beyond the {granted} granted opened")),
        Err(e) => println!("queue {} refused: {e}", granted + 1),
    }
    // Every queue works at once, and a freed identifier is reused.
    let (bufs, mut slots) = make_slots(&dev, 1)?;
    let mut rng = Rng(11);
    let bs = dev.info().logical_block_size as usize;
    for q in open.iter_mut() {
        let sg = build_sg(&mut slots[0], bs, bs, Layout::Contiguous, &mut rng);
        run_one(q.as_mut(), IoRequest::read(0, sg, 1)).map_err(|e| e.to_string())?;
    }
    open.pop();
    open.push(dev.open_queue(8).map_err(|e| format!("reopening a freed queue: {e}"))?);
    dev.unregister_memory(bufs.dma.region()).map_err(|e| e.to_string())?;
    println!("queues ok granted={granted}");
    Ok(())
}

fn shared(specs: &[String]) -> Result<(), Failure> {
    let devs: Vec<Arc<NvmeNamespace>> = specs.iter().map(|s| open(s)).collect::<Result<_, _>>()?;
    let space = Arc::clone(devs[0].controller().dma_space());
    for d in &devs {
        if !Arc::ptr_eq(d.controller().dma_space(), &space) {
            return Err(format!("{} has a container of its own", d.controller().bdf()));
        }
    }
    // One buffer registered once serves every controller in the container.
    let (bufs, mut slots) = make_slots(&devs[0], 1)?;
    let mut rng = Rng(21);
    for (i, d) in devs.iter().enumerate() {
        let bs = d.info().logical_block_size as usize;
        let mut q = d.open_queue(4).map_err(|e| e.to_string())?;
        let sg = build_sg(&mut slots[0], bs, bs, Layout::Contiguous, &mut rng);
        let mut data = vec![0u8; bs];
        for (k, sector) in data.chunks_mut(512).enumerate() {
            fill_sector(sector, k as u64, 1000 + i as u64);
        }
        sg.copy_from_slice(&data);
        run_one(q.as_mut(), IoRequest::write(0, sg, 1)).map_err(|e| format!("write on {}: {e}", specs[i]))?;
        sg.fill_zero();
        run_one(q.as_mut(), IoRequest::read(0, sg, 2)).map_err(|e| format!("read on {}: {e}", specs[i]))?;
        sg.copy_to_slice(&mut data);
        for (k, sector) in data.chunks(512).enumerate() {
            check_sector(sector, k as u64, 1000 + i as u64)?;
        }
    }
    devs[0].unregister_memory(bufs.dma.region()).map_err(|e| e.to_string())?;
    let info = space.iommu_info().map_err(|e| e.to_string())?;
    let ranges: Vec<String> = info.iova_ranges.iter().map(|(s, e)| format!("{s:#x}-{e:#x}")).collect();
    println!("iova_ranges={}", ranges.join(","));
    println!("shared ok controllers={}", devs.len());
    Ok(())
}

fn media_error(spec: &str) -> Result<(), Failure> {
    let dev = open(spec)?;
    let mut q = dev.open_queue(4).map_err(|e| e.to_string())?;
    let (bufs, mut slots) = make_slots(&dev, 1)?;
    let mut rng = Rng(31);
    let bs = dev.info().logical_block_size as usize;
    let sg = build_sg(&mut slots[0], 4 * bs, bs, Layout::Contiguous, &mut rng);
    match run_one(q.as_mut(), IoRequest::read(0, sg, 1)) {
        Err(e @ IoError::Nvme { sct: 2, sc: 0x81 }) => println!("read: {e}"),
        other => return Err(format!("a failing read gave {other:?}, not Unrecovered Read Error")),
    }
    // Once the rule has fired, blkdebug fails writes too: Write Fault.
    match run_one(q.as_mut(), IoRequest::write(0, sg, 2)) {
        Err(e @ IoError::Nvme { sct: 2, sc: 0x80 }) => println!("write: {e}"),
        other => return Err(format!("a failing write gave {other:?}, not Write Fault")),
    }
    // The controller carries on: admin commands still succeed.
    let admin = dev.controller().admin_command(Command::get_features(feature::NUMBER_OF_QUEUES));
    if !matches!(admin, Ok(Ok(_))) {
        return Err(format!("Get Features after the media errors: {admin:?}"));
    }
    dev.unregister_memory(bufs.dma.region()).map_err(|e| e.to_string())?;
    println!("media-error ok");
    Ok(())
}
