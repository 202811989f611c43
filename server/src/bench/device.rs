//! Turning `--device` arguments into the device to measure.
//!
//! Every `--device` is a backend spec (`null:1G`, `mem:1G`, `file:/path`,
//! `fault:...@...`, see `udm_drivers::backend_spec`). A stack built from several of
//! them (a `dm:<table-file>` whose table names the other devices) is opened here too,
//! so this is the one place to extend.

use std::sync::Arc;

use udm_drivers::backend_spec::open_backend;
use udm_drivers::BlockDevice;

use super::BenchError;

/// Opens the device that `specs` (the `--device` arguments, in order) describe.
pub fn open_bench_device(specs: &[String]) -> Result<Arc<dyn BlockDevice>, BenchError> {
    match specs {
        [] => Err(BenchError::Usage("name a device with --device, e.g. --device mem:1G".into())),
        [spec] => open_backend(spec).map_err(|source| BenchError::Device { spec: spec.clone(), source }),
        many => Err(BenchError::Usage(format!(
            "{} devices given ({}): udm bench measures one device; give several only when one of \
             them is a stack whose table names the others",
            many.len(),
            many.join(", ")
        ))),
    }
}
