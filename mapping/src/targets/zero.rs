//! `zero`: reads return zeroes, writes succeed and are dropped (Linux 6.1: discards and
//! write-zeroes fail; flushes do not reach it). No arguments; table and status empty.

use std::sync::Arc;

use udm_drivers::{IoError, IoOp};

use crate::error::TargetError;
use crate::target::{
    ConstructCtx, FlushPolicy, MapOutcome, QueueSetup, Target, TargetCaps, TargetContext, TargetIo, TargetQueue,
    TargetType,
};

/// The `zero` target type.
pub struct ZeroType;

impl TargetType for ZeroType {
    fn name(&self) -> &'static str {
        "zero"
    }

    fn construct(&self, _ctx: &mut ConstructCtx<'_>, args: &[String]) -> Result<Arc<dyn Target>, TargetError> {
        if !args.is_empty() {
            return Err(TargetError::ArgCount { expected: "no arguments".into(), found: args.len() });
        }
        Ok(Arc::new(Zero))
    }
}

/// A zero segment.
pub struct Zero;

impl Target for Zero {
    fn type_name(&self) -> &'static str {
        "zero"
    }

    fn table_args(&self) -> String {
        String::new()
    }

    fn flush_policy(&self) -> FlushPolicy {
        FlushPolicy::None
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps { discard: false, write_zeroes: false }
    }

    fn open_queue(&self, _setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
        Ok(Box::new(ZeroQueue))
    }
}

struct ZeroQueue;

impl TargetQueue for ZeroQueue {
    #[inline]
    fn map(&mut self, io: &TargetIo, _ctx: &mut TargetContext<'_>) -> MapOutcome {
        MapOutcome::Done(match io.op {
            IoOp::Read => {
                io.sg.fill_zero();
                Ok(())
            }
            IoOp::Write | IoOp::Flush => Ok(()),
            op @ (IoOp::Discard | IoOp::WriteZeroes) => Err(IoError::Unsupported { op }),
        })
    }
}
