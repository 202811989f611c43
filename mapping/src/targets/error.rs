//! `error`: every I/O fails (EIO). Takes any arguments, ignores them and does not echo
//! them, so it can stand in for any target. Table and status empty.

use std::sync::Arc;

use udm_drivers::IoError;

use crate::error::TargetError;
use crate::target::{
    ConstructCtx, FlushPolicy, MapOutcome, QueueSetup, Target, TargetCaps, TargetContext, TargetIo, TargetQueue,
    TargetType,
};

/// Why the `error` target fails I/O.
pub const ERROR_TARGET: IoError = IoError::Rejected { reason: "the sector is mapped by an `error` target" };

/// The `error` target type.
pub struct ErrorType;

impl TargetType for ErrorType {
    fn name(&self) -> &'static str {
        "error"
    }

    fn construct(&self, _ctx: &mut ConstructCtx<'_>, _args: &[String]) -> Result<Arc<dyn Target>, TargetError> {
        Ok(Arc::new(Error))
    }
}

/// An error segment.
pub struct Error;

impl Target for Error {
    fn type_name(&self) -> &'static str {
        "error"
    }

    fn table_args(&self) -> String {
        String::new()
    }

    fn flush_policy(&self) -> FlushPolicy {
        FlushPolicy::None
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps { discard: true, write_zeroes: true }
    }

    fn open_queue(&self, _setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
        Ok(Box::new(ErrorQueue))
    }
}

struct ErrorQueue;

impl TargetQueue for ErrorQueue {
    #[inline]
    fn map(&mut self, _io: &TargetIo, _ctx: &mut TargetContext<'_>) -> MapOutcome {
        MapOutcome::Done(Err(ERROR_TARGET))
    }
}
