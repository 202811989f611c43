//! `striped <#stripes> <chunk_sectors> (<dev> <offset>){#stripes}`: chunk `c` of the
//! target lives on stripe `c % n`, at `offset + (c / n) * chunk + r`. Pieces never cross
//! a chunk (the split boundary); a flush reaches every stripe. Linux 6.1 rules: n >= 1,
//! chunk >= 1 (any value, not only powers of two), length divisible by n and length/n by
//! chunk. udm also requires the chunk to be a multiple of each stripe's logical block.
//! Status: `<n> <dev>... 1 <A|D per stripe>` (D: the stripe has failed I/O).

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use udm_drivers::IoError;

use crate::error::TargetError;
use crate::target::{
    ConstructCtx, DevIndex, MapOutcome, QueueSetup, Target, TargetCaps, TargetContext, TargetDevice, TargetIo,
    TargetQueue, TargetType,
};
use crate::targets::number_arg;

/// The `striped` target type.
pub struct StripedType;

impl TargetType for StripedType {
    fn name(&self) -> &'static str {
        "striped"
    }

    fn construct(&self, ctx: &mut ConstructCtx<'_>, args: &[String]) -> Result<Arc<dyn Target>, TargetError> {
        if args.len() < 2 {
            return Err(TargetError::ArgCount {
                expected: "at least 4 arguments: <#stripes> <chunk_sectors> (<dev> <offset>)+".into(),
                found: args.len(),
            });
        }
        let n = number_arg(args, 0, "#stripes")?;
        if n == 0 || n > u64::from(u16::MAX) {
            return Err(TargetError::BadArg {
                position: 1,
                name: "#stripes",
                value: args[0].clone(),
                expected: "a number of stripes from 1 to 65535".into(),
            });
        }
        let chunk = number_arg(args, 1, "chunk_sectors")?;
        if chunk == 0 {
            return Err(TargetError::BadArg {
                position: 2,
                name: "chunk_sectors",
                value: args[1].clone(),
                expected: "a chunk size of at least 1 sector".into(),
            });
        }
        let want = 2 + 2 * n as usize;
        if args.len() != want {
            return Err(TargetError::ArgCount {
                expected: format!("exactly {want} arguments for {n} stripes: <#stripes> <chunk_sectors> then <dev> <offset> per stripe"),
                found: args.len(),
            });
        }
        let length = ctx.length();
        if !length.is_multiple_of(n) {
            return Err(TargetError::Invalid(format!(
                "target length {length} is not divisible by the number of stripes {n}"
            )));
        }
        let per_stripe = length / n;
        if !per_stripe.is_multiple_of(chunk) {
            return Err(TargetError::Invalid(format!(
                "stripe length {per_stripe} (length {length} / {n} stripes) is not divisible by the chunk size {chunk}"
            )));
        }
        let mut stripes = Vec::with_capacity(n as usize);
        for i in 0..n as usize {
            let offset = number_arg(args, 3 + 2 * i, "offset")?;
            let dev = ctx.open_device(&args[2 + 2 * i], offset, per_stripe)?;
            let block = u64::from(dev.info().logical_block_size / 512).max(1);
            if !chunk.is_multiple_of(block) {
                return Err(TargetError::BadArg {
                    position: 2,
                    name: "chunk_sectors",
                    value: args[1].clone(),
                    expected: format!("a multiple of {block} sectors, the logical block size of `{}`", dev.name()),
                });
            }
            stripes.push(Stripe { dev, offset, failed: AtomicBool::new(false) });
        }
        let caps = TargetCaps {
            discard: stripes.iter().all(|s| s.dev.info().supports_discard),
            write_zeroes: stripes.iter().all(|s| s.dev.info().supports_write_zeroes),
        };
        Ok(Arc::new(Striped { chunk, stripes, caps }))
    }
}

struct Stripe {
    dev: TargetDevice,
    offset: u64,
    failed: AtomicBool,
}

/// One striped segment.
pub struct Striped {
    chunk: u64,
    stripes: Vec<Stripe>,
    caps: TargetCaps,
}

impl Target for Striped {
    fn type_name(&self) -> &'static str {
        "striped"
    }

    fn table_args(&self) -> String {
        let mut out = format!("{} {}", self.stripes.len(), self.chunk);
        for s in &self.stripes {
            out.push_str(&format!(" {} {}", s.dev.table_name(), s.offset));
        }
        out
    }

    fn status_args(&self) -> String {
        let mut out = format!("{}", self.stripes.len());
        for s in &self.stripes {
            out.push(' ');
            out.push_str(&s.dev.table_name());
        }
        out.push_str(" 1 ");
        for s in &self.stripes {
            out.push(if s.failed.load(Ordering::Relaxed) { 'D' } else { 'A' });
        }
        out
    }

    fn split_boundary(&self) -> Option<NonZeroU64> {
        NonZeroU64::new(self.chunk)
    }

    fn caps(&self) -> TargetCaps {
        self.caps
    }

    fn open_queue(&self, _setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
        let n = self.stripes.len() as u64;
        Ok(Box::new(StripedQueue {
            chunk: self.chunk,
            chunk_shift: pow2_shift(self.chunk),
            n,
            n_shift: pow2_shift(n),
            offsets: self.stripes.iter().map(|s| s.offset).collect(),
        }))
    }

    fn remap_error(&self, dev: DevIndex, error: IoError) {
        if !matches!(error, IoError::Unsupported { .. }) {
            if let Some(s) = self.stripes.get(dev.0 as usize) {
                s.failed.store(true, Ordering::Relaxed);
            }
        }
    }
}

fn pow2_shift(v: u64) -> Option<u32> {
    v.is_power_of_two().then(|| v.trailing_zeros())
}

struct StripedQueue {
    chunk: u64,
    chunk_shift: Option<u32>,
    n: u64,
    n_shift: Option<u32>,
    offsets: Box<[u64]>,
}

impl TargetQueue for StripedQueue {
    #[inline]
    fn map(&mut self, io: &TargetIo, _ctx: &mut TargetContext<'_>) -> MapOutcome {
        let (c, r) = match self.chunk_shift {
            Some(s) => (io.offset >> s, io.offset & (self.chunk - 1)),
            None => (io.offset / self.chunk, io.offset % self.chunk),
        };
        let (row, stripe) = match self.n_shift {
            Some(s) => (c >> s, c & (self.n - 1)),
            None => (c / self.n, c % self.n),
        };
        MapOutcome::Remap { dev: DevIndex(stripe as u16), sector: self.offsets[stripe as usize] + row * self.chunk + r }
    }
}
