//! Per-target behaviour: mapping arithmetic, table round trips, status, and the
//! `Accepted` path of the target API (a copy-before-write test target that issues
//! internal I/O and completes pieces later, the shape snapshot copy-out uses).

mod common;

use std::collections::VecDeque;
use std::num::NonZeroU64;
use std::sync::Arc;

use common::{mem, pattern, run, Buf};
use udm_drivers::dma::PagePolicy;
use udm_drivers::{BlockDevice, IoError, IoOp, IoRequest, QueueFull, SgList};
use udm_mapping::bounce::BouncePool;
use udm_mapping::sync_io;
use udm_mapping::target::{
    ConstructCtx, DevIndex, MapOutcome, PartId, QueueSetup, Target, TargetCaps, TargetContext, TargetDevice, TargetIo,
    TargetQueue, TargetType,
};
use udm_mapping::{Registry, SuspendFlags, TableSlot, TargetError};

fn disks(reg: &Registry, n: usize, sectors: u64) -> Vec<Arc<dyn BlockDevice>> {
    (0..n)
        .map(|i| {
            let d = mem(sectors);
            reg.register_backend(&format!("d{i}"), Arc::clone(&d)).unwrap();
            d
        })
        .collect()
}

#[test]
fn every_target_round_trips_through_its_table_output() {
    let reg = Registry::new();
    disks(&reg, 3, 8192);
    let tables = [
        "0 100 linear d0 7",
        "0 96 striped 3 16 d0 0 d1 100 d2 8",
        "0 192 striped 2 48 d0 0 d1 0",
        "0 5 striped 1 1 d2 3",
        "0 8 zero",
        "0 8 error with ignored args",
        "0 10 linear d0 0\n10 6 zero\n16 4 error\n20 8 striped 2 2 d1 0 d2 0",
    ];
    for text in tables {
        reg.create("t", None, Some(text)).unwrap();
        let printed = reg.table("t", TableSlot::Live).unwrap();
        reg.load("t", &printed).unwrap();
        assert_eq!(reg.table("t", TableSlot::Inactive).unwrap(), printed, "{text}");
        reg.remove("t", false).unwrap();
    }
    reg.create("e", None, Some("0 8 error a b c")).unwrap();
    assert_eq!(reg.table("e", TableSlot::Live).unwrap(), "0 8 error \n", "error does not echo its arguments");
}

#[test]
fn striped_places_chunks_round_robin_with_any_chunk_size() {
    let reg = Registry::new();
    let d = disks(&reg, 3, 8192);
    // chunk 48 (not a power of two), 3 stripes: length 3 * 48 * 2.
    reg.create("s", None, Some("0 288 striped 3 48 d0 10 d1 20 d2 30")).unwrap();
    let s = reg.device("s").unwrap();
    let data = pattern(0, 1, 288);
    sync_io::write(s.as_ref(), 0, &data, false).unwrap();
    for sector in 0..288u64 {
        let c = sector / 48;
        let (stripe, row, r) = ((c % 3) as usize, c / 3, sector % 48);
        let dev_sector = [10, 20, 30][stripe] + row * 48 + r;
        let mut got = vec![0u8; 512];
        sync_io::read(d[stripe].as_ref(), dev_sector, &mut got).unwrap();
        assert_eq!(got[..], data[(sector * 512) as usize..][..512], "sector {sector}");
    }
    let mut back = vec![0u8; 288 * 512];
    sync_io::read(s.as_ref(), 0, &mut back).unwrap();
    assert_eq!(back, data);
}

#[test]
fn striped_argument_rules() {
    let reg = Registry::new();
    disks(&reg, 2, 8192);
    for bad in [
        "0 16 striped 0 8",
        "0 16 striped 2 0 d0 0 d1 0",
        "0 16 striped 2 8 d0 0",
        "0 15 striped 2 8 d0 0 d1 0",
        "0 24 striped 2 8 d0 0 d1 0",
        "0 16 striped 2 8 d0 0 d1 x",
        "0 16 striped 2",
    ] {
        let e = reg.create("s", None, Some(bad)).unwrap_err();
        assert!(e.to_string().contains("striped"), "{bad}: {e}");
    }
}

#[test]
fn striped_status_marks_a_failing_stripe_dead() {
    let reg = Registry::new();
    disks(&reg, 1, 8192);
    reg.create("bad", None, Some("0 64 error")).unwrap();
    reg.create("s", None, Some("0 32 striped 2 8 d0 0 bad 0")).unwrap();
    let s = reg.device("s").unwrap();
    let mut b = vec![0u8; 4096];
    assert!(sync_io::read(s.as_ref(), 0, &mut b).is_ok(), "chunk 0 is on d0");
    assert_eq!(reg.status("s", TableSlot::Live).unwrap(), "0 32 striped 2 d0 bad 1 AA\n");
    assert!(matches!(sync_io::read(s.as_ref(), 8, &mut b), Err(IoError::Rejected { .. })));
    assert_eq!(reg.status("s", TableSlot::Live).unwrap(), "0 32 striped 2 d0 bad 1 AD\n");
}

#[test]
fn zero_and_error_targets() {
    let reg = Registry::new();
    reg.create("z", None, Some("0 16 zero\n16 16 error")).unwrap();
    let z = reg.device("z").unwrap();
    let mut q = z.open_queue(4).unwrap();
    let buf = Buf::new(vec![0x5a; 8192]);
    assert_eq!(run(q.as_mut(), IoRequest::read(0, buf.sg(), 1)), Ok(()));
    assert!(buf.data.iter().all(|&b| b == 0));
    assert_eq!(run(q.as_mut(), IoRequest::write(0, buf.sg(), 2)), Ok(()));
    assert!(matches!(run(q.as_mut(), IoRequest::read(8, buf.sg(), 3)), Err(IoError::Rejected { .. })));
    assert_eq!(run(q.as_mut(), IoRequest::flush(4)), Ok(()));
    assert!(!z.info().supports_discard, "zero does not take discards");
    assert!(matches!(run(q.as_mut(), IoRequest::discard(0, 8, 5)), Err(IoError::Unsupported { .. })));
}

#[test]
fn linear_passes_discard_and_write_zeroes_and_flush() {
    let reg = Registry::new();
    let d = disks(&reg, 1, 8192);
    sync_io::write(d[0].as_ref(), 100, &pattern(100, 1, 16), false).unwrap();
    reg.create("l", None, Some("0 64 linear d0 100")).unwrap();
    let l = reg.device("l").unwrap();
    let mut q = l.open_queue(4).unwrap();
    assert_eq!(run(q.as_mut(), IoRequest::write_zeroes(0, 8, 1)), Ok(()));
    assert_eq!(run(q.as_mut(), IoRequest::discard(8, 8, 2)), Ok(()));
    assert_eq!(run(q.as_mut(), IoRequest::flush(3)), Ok(()));
    let mut got = vec![1u8; 16 * 512];
    sync_io::read(d[0].as_ref(), 100, &mut got).unwrap();
    assert!(got.iter().all(|&b| b == 0));
    assert!(matches!(run(q.as_mut(), IoRequest::discard(60, 8, 4)), Err(IoError::OutOfRange { .. })));
}

// ---------------------------------------------------------------------------------
// A copy-before-write test target: `cbw <origin> <backup>`. A write first copies the
// old origin data of its range to the same place on `backup`, then writes the origin,
// then completes: three internal I/Os per piece, chained through `child_done`, with
// bounce buffers preallocated per queue and retries from `poll` when a device queue
// is full. Pieces are cut at 8-sector chunks by the split boundary.
// ---------------------------------------------------------------------------------

const CHUNK: u64 = 8;

struct CbwType;

impl TargetType for CbwType {
    fn name(&self) -> &'static str {
        "cbw"
    }

    fn construct(&self, ctx: &mut ConstructCtx<'_>, args: &[String]) -> Result<Arc<dyn Target>, TargetError> {
        if args.len() != 2 {
            return Err(TargetError::ArgCount { expected: "<origin> <backup>".into(), found: args.len() });
        }
        let origin = ctx.open_device(&args[0], 0, ctx.length())?;
        let backup = ctx.open_device(&args[1], 0, ctx.length())?;
        // Load-time synchronous I/O, as a snapshot reading its COW header does.
        let mut header = vec![0u8; 512];
        ctx.read_sync(&backup, 0, &mut header)?;
        Ok(Arc::new(Cbw { origin, backup }))
    }
}

struct Cbw {
    origin: TargetDevice,
    backup: TargetDevice,
}

impl Target for Cbw {
    fn type_name(&self) -> &'static str {
        "cbw"
    }
    fn table_args(&self) -> String {
        format!("{} {}", self.origin.table_name(), self.backup.table_name())
    }
    fn split_boundary(&self) -> Option<NonZeroU64> {
        NonZeroU64::new(CHUNK)
    }
    fn caps(&self) -> TargetCaps {
        TargetCaps { discard: false, write_zeroes: false }
    }
    fn open_queue(&self, setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
        let slots = 2usize;
        let pool = BouncePool::with_policy(slots, (CHUNK * 512) as usize, PagePolicy::Normal)
            .map_err(|e| TargetError::Invalid(e.to_string()))?;
        Ok(Box::new(CbwQueue {
            ops: vec![None; slots],
            free: (0..slots as u32).collect(),
            waiting: VecDeque::with_capacity(setup.depth * 4),
            retry: VecDeque::new(),
            pool,
        }))
    }
}

#[derive(Clone, Copy)]
enum Stage {
    ReadOld,
    WriteBackup,
    WriteNew,
}

#[derive(Clone, Copy)]
struct Op {
    io: TargetIo,
    stage: Stage,
}

struct CbwQueue {
    ops: Vec<Option<Op>>,
    free: Vec<u32>,
    waiting: VecDeque<TargetIo>,
    retry: VecDeque<(DevIndex, IoRequest, u32)>,
    pool: BouncePool,
}

impl CbwQueue {
    fn bounce(&self, slot: u32, sectors: u64) -> SgList {
        self.pool.sg(slot as usize, (sectors * 512) as usize)
    }

    fn send(&mut self, dev: DevIndex, req: IoRequest, token: u32, ctx: &mut TargetContext<'_>) {
        if !self.retry.is_empty() {
            self.retry.push_back((dev, req, token));
            return;
        }
        if let Err(QueueFull(r)) = ctx.submit(dev, req, token) {
            self.retry.push_back((dev, r, token));
        }
    }

    fn pump(&mut self, ctx: &mut TargetContext<'_>) {
        while let Some((dev, req, token)) = self.retry.pop_front() {
            if let Err(QueueFull(r)) = ctx.submit(dev, req, token) {
                self.retry.push_front((dev, r, token));
                return;
            }
        }
        while !self.waiting.is_empty() && !self.free.is_empty() {
            let io = self.waiting.pop_front().unwrap();
            let slot = self.free.pop().unwrap();
            self.ops[slot as usize] = Some(Op { io, stage: Stage::ReadOld });
            let req = IoRequest::read(io.offset, self.bounce(slot, io.sectors), 0);
            self.send(DevIndex(0), req, slot, ctx);
        }
    }

    fn finish(&mut self, slot: u32, part: PartId, result: Result<(), IoError>, ctx: &mut TargetContext<'_>) {
        self.ops[slot as usize] = None;
        self.free.push(slot);
        ctx.complete(part, result);
    }
}

impl TargetQueue for CbwQueue {
    fn map(&mut self, io: &TargetIo, ctx: &mut TargetContext<'_>) -> MapOutcome {
        match io.op {
            IoOp::Write => {
                self.waiting.push_back(*io);
                self.pump(ctx);
                MapOutcome::Accepted
            }
            IoOp::Flush => MapOutcome::Remap { dev: DevIndex(0), sector: 0 },
            _ => MapOutcome::Remap { dev: DevIndex(0), sector: io.offset },
        }
    }

    fn child_done(&mut self, token: u32, result: Result<(), IoError>, ctx: &mut TargetContext<'_>) {
        let mut op = self.ops[token as usize].expect("a live op");
        if let Err(e) = result {
            self.finish(token, op.io.part, Err(e), ctx);
            self.pump(ctx);
            return;
        }
        match op.stage {
            Stage::ReadOld => {
                op.stage = Stage::WriteBackup;
                let req = IoRequest::write(op.io.offset, self.bounce(token, op.io.sectors), 0);
                self.ops[token as usize] = Some(op);
                self.send(DevIndex(1), req, token, ctx);
            }
            Stage::WriteBackup => {
                op.stage = Stage::WriteNew;
                let req = IoRequest::write(op.io.offset, op.io.sg, 0);
                self.ops[token as usize] = Some(op);
                self.send(DevIndex(0), req, token, ctx);
            }
            Stage::WriteNew => {
                self.finish(token, op.io.part, Ok(()), ctx);
                self.pump(ctx);
            }
        }
    }

    fn needs_poll(&self) -> bool {
        true
    }

    fn poll(&mut self, ctx: &mut TargetContext<'_>) {
        self.pump(ctx);
    }

    fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.retry.is_empty() && self.free.len() == self.ops.len()
    }
}

#[test]
fn accepted_pieces_run_multi_step_internal_io_and_complete_as_one() {
    let reg = Registry::new();
    reg.register_target_type(Arc::new(CbwType));
    let d = disks(&reg, 2, 1024);
    let old = pattern(0, 1, 256);
    sync_io::write(d[0].as_ref(), 0, &old, false).unwrap();
    reg.create("c", None, Some("0 256 cbw d0 d1")).unwrap();
    assert_eq!(reg.table("c", TableSlot::Live).unwrap(), "0 256 cbw d0 d1\n");
    let c = reg.device("c").unwrap();
    // Depth 1 below: every internal I/O after the first finds the device queue full.
    let mut q = c.open_queue(1).unwrap();
    // 13 sectors from 3: pieces 3..8, 8..16 — crossing the chunk boundary; then a big one.
    for (sector, len, round) in [(3u64, 13u64, 2u64), (40, 100, 3), (0, 256, 4)] {
        let before = {
            let mut b = vec![0u8; (len * 512) as usize];
            sync_io::read(d[0].as_ref(), sector, &mut b).unwrap();
            b
        };
        let data = Buf::new(pattern(sector, round, len));
        assert_eq!(run(q.as_mut(), IoRequest::write(sector, data.sg(), round)), Ok(()));
        let mut now = vec![0u8; (len * 512) as usize];
        sync_io::read(d[0].as_ref(), sector, &mut now).unwrap();
        assert_eq!(now, data.data, "the origin holds the new data");
        sync_io::read(d[1].as_ref(), sector, &mut now).unwrap();
        assert_eq!(now, before, "the backup holds what the origin held before");
        assert_eq!(q.in_flight(), 0);
    }
    // Suspend drains accepted work: start a write, suspend from another thread while
    // this one keeps polling.
    let data = Buf::new(pattern(0, 9, 64));
    q.submit(IoRequest::write(0, data.sg(), 77)).unwrap();
    q.kick();
    std::thread::scope(|s| {
        let reg = &reg;
        let h = s.spawn(move || reg.suspend("c", SuspendFlags::default()).unwrap());
        assert_eq!(common::wait_for(q.as_mut(), 77), Ok(()));
        h.join().unwrap();
    });
    assert!(reg.info("c").unwrap().state == udm_mapping::DeviceState::Suspended);
    reg.resume("c").unwrap();
}
