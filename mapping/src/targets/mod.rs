//! The built-in target types, one per file, and the set a registry knows.

pub mod error;
pub mod linear;
pub mod snapshot;
pub mod snapshot_merge;
pub mod snapshot_origin;
pub mod striped;
pub mod zero;

use std::sync::Arc;

use crate::error::TargetError;
use crate::table_text::parse_strict_u64;
use crate::target::TargetType;

/// The target types a registry accepts in tables, by name.
#[derive(Clone)]
pub struct TargetTypes {
    types: Vec<Arc<dyn TargetType>>,
}

impl Default for TargetTypes {
    fn default() -> Self {
        Self::builtin()
    }
}

impl TargetTypes {
    /// `linear`, `striped`, `zero`, `error` and the snapshot targets.
    pub fn builtin() -> Self {
        TargetTypes {
            types: vec![
                Arc::new(linear::LinearType),
                Arc::new(striped::StripedType),
                Arc::new(zero::ZeroType),
                Arc::new(error::ErrorType),
                Arc::new(snapshot_origin::SnapshotOriginType),
                Arc::new(snapshot::SnapshotType),
                Arc::new(snapshot_merge::SnapshotMergeType),
            ],
        }
    }

    /// Adds (or replaces) a target type.
    pub fn register(&mut self, t: Arc<dyn TargetType>) {
        self.types.retain(|x| x.name() != t.name());
        self.types.push(t);
    }

    /// The type called `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<dyn TargetType>> {
        self.types.iter().find(|t| t.name() == name)
    }

    /// Every name, comma separated (for error messages).
    pub fn names(&self) -> String {
        self.types.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
    }
}

/// Reads argument `index` (0-based) as a strict unsigned decimal number.
pub(crate) fn number_arg(args: &[String], index: usize, name: &'static str) -> Result<u64, TargetError> {
    let value = &args[index];
    parse_strict_u64(value).ok_or_else(|| TargetError::BadArg {
        position: index + 1,
        name,
        value: value.clone(),
        expected: "an unsigned decimal integer below 2^64".into(),
    })
}
