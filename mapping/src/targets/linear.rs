//! `linear <dev> <offset>`: sector `s` of the target is sector `offset + s` of `dev`.
//! Flush, discard and write-zeroes pass through. Table: `<dev> <offset>`; status: empty.

use std::sync::Arc;

use crate::error::TargetError;
use crate::target::{
    ConstructCtx, DevIndex, DirectRemap, MapOutcome, QueueSetup, Target, TargetCaps, TargetContext, TargetDevice,
    TargetIo, TargetQueue, TargetType,
};
use crate::targets::number_arg;

/// The `linear` target type.
pub struct LinearType;

impl TargetType for LinearType {
    fn name(&self) -> &'static str {
        "linear"
    }

    fn construct(&self, ctx: &mut ConstructCtx<'_>, args: &[String]) -> Result<Arc<dyn Target>, TargetError> {
        if args.len() != 2 {
            return Err(TargetError::ArgCount {
                expected: "exactly 2 arguments: <dev> <offset>".into(),
                found: args.len(),
            });
        }
        let offset = number_arg(args, 1, "offset")?;
        let dev = ctx.open_device(&args[0], offset, ctx.length())?;
        let caps = TargetCaps { discard: dev.info().supports_discard, write_zeroes: dev.info().supports_write_zeroes };
        Ok(Arc::new(Linear { dev, offset, caps }))
    }
}

/// One linear segment.
pub struct Linear {
    dev: TargetDevice,
    offset: u64,
    caps: TargetCaps,
}

impl Target for Linear {
    fn type_name(&self) -> &'static str {
        "linear"
    }

    fn table_args(&self) -> String {
        format!("{} {}", self.dev.table_name(), self.offset)
    }

    fn caps(&self) -> TargetCaps {
        self.caps
    }

    fn direct_remap(&self) -> Option<DirectRemap> {
        Some(DirectRemap { dev: DevIndex(0), start: self.offset })
    }

    fn open_queue(&self, _setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
        Ok(Box::new(LinearQueue { offset: self.offset }))
    }
}

struct LinearQueue {
    offset: u64,
}

impl TargetQueue for LinearQueue {
    #[inline]
    fn map(&mut self, io: &TargetIo, _ctx: &mut TargetContext<'_>) -> MapOutcome {
        MapOutcome::Remap { dev: DevIndex(0), sector: self.offset + io.offset }
    }
}
