//! Turning `--device` arguments into the device to measure.
//!
//! Every `--device` is a backend spec (`null:1G`, `mem:1G`, `file:/path`,
//! `fault:...@...`, see `udm_drivers::backend_spec`), or a device-mapper stack:
//!
//! ```text
//! --device dm:vol.table --device disk0=mem:1G --device disk1=mem:1G [--device low=dm:low.table]
//! ```
//!
//! `dm:<table-file>` is the device measured: a mapped device whose table (dmsetup
//! format) names the other devices. `<name>=<spec>` registers a backend under that
//! name; `<name>=dm:<table-file>` creates an intermediate mapped device, so stacks of
//! any depth can be built. Named devices are created in the order given, so a table
//! may only name devices given before it (the measured one is created last).

use std::sync::Arc;

use udm_drivers::backend_spec::open_backend;
use udm_drivers::BlockDevice;
use udm_mapping::Registry;

use super::BenchError;

/// Name of the measured mapped device inside the bench's private registry.
const MEASURED: &str = "bench";

/// Opens the device that `specs` (the `--device` arguments, in order) describe.
pub fn open_bench_device(specs: &[String]) -> Result<Arc<dyn BlockDevice>, BenchError> {
    let measured: Vec<&String> = specs.iter().filter(|s| s.starts_with("dm:")).collect();
    match (specs, measured.as_slice()) {
        ([], _) => Err(BenchError::Usage("name a device with --device, e.g. --device mem:1G".into())),
        ([spec], []) => open_backend(spec).map_err(|source| BenchError::Device { spec: spec.clone(), source }),
        (_, [stack]) => open_stack(stack, specs),
        (many, []) => Err(BenchError::Usage(format!(
            "{} devices given ({}): udm bench measures one device; give several only with a \
             dm:<table-file> whose table names the others (given as name=spec)",
            many.len(),
            many.join(", ")
        ))),
        (_, several) => Err(BenchError::Usage(format!(
            "{} unnamed dm: devices given: name all but the measured one (name=dm:<table-file>)",
            several.len()
        ))),
    }
}

/// Builds the stack: named devices in order, then the measured `dm:` device.
fn open_stack(stack: &str, specs: &[String]) -> Result<Arc<dyn BlockDevice>, BenchError> {
    let reg = Registry::new();
    for spec in specs.iter().filter(|s| !s.starts_with("dm:")) {
        let (name, what) = spec.split_once('=').filter(|(n, _)| !n.is_empty()).ok_or_else(|| {
            BenchError::Usage(format!(
                "--device {spec}: with a dm: stack, give each device the table names as name=spec, \
                 e.g. --device disk0=mem:1G"
            ))
        })?;
        match what.strip_prefix("dm:") {
            Some(file) => create_mapped(&reg, name, file, spec)?,
            None => {
                let dev = open_backend(what).map_err(|source| BenchError::Device { spec: spec.clone(), source })?;
                reg.register_backend(name, dev).map_err(|e| stack_error(spec, e))?;
            }
        }
    }
    let file = &stack["dm:".len()..];
    create_mapped(&reg, MEASURED, file, stack)?;
    // The device keeps its table, and the table the devices below, alive; the registry
    // (names only) is not needed for I/O.
    reg.device(MEASURED).map_err(|e| stack_error(stack, e))
}

fn create_mapped(reg: &Registry, name: &str, file: &str, spec: &str) -> Result<(), BenchError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| BenchError::Usage(format!("--device {spec}: cannot read table file `{file}`: {e}")))?;
    reg.create(name, None, Some(&text)).map_err(|e| stack_error(spec, e))
}

fn stack_error(spec: &str, e: udm_mapping::MappingError) -> BenchError {
    BenchError::Usage(format!("--device {spec}: {e}"))
}
