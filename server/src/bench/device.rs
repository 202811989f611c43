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
//!
//! The measured `dm:` file may instead be a *stack file*: every line prefixed by a device
//! name, devices created (load + resume) in the order they first appear and the last one
//! measured, which describes an LVM-style snapshot stack in one file:
//!
//! ```text
//! vol-real: 0 2097152 linear disk 0
//! snap-cow: 0 1048576 linear cow 0
//! snap:     0 2097152 snapshot vol-real snap-cow P 8
//! vol:      0 2097152 snapshot-origin vol-real
//! ```

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
    let text = read_table(file, stack)?;
    let measured = match parse_stack_file(&text) {
        Some(devices) => {
            for (name, table) in &devices {
                reg.create(name, None, Some(table)).map_err(|e| stack_error(stack, e))?;
            }
            devices.last().map(|(name, _)| name.clone()).unwrap_or_else(|| MEASURED.to_string())
        }
        None => {
            reg.create(MEASURED, None, Some(&text)).map_err(|e| stack_error(stack, e))?;
            MEASURED.to_string()
        }
    };
    // The device keeps its table, and the table the devices below, alive; the registry
    // (names only) is not needed for I/O.
    reg.device(&measured).map_err(|e| stack_error(stack, e))
}

/// Reads a stack file's `<name>: <table line>` lines, grouped per device in order of
/// first appearance; `None` when the text is a plain table (its lines start with a
/// sector number).
fn parse_stack_file(text: &str) -> Option<Vec<(String, String)>> {
    let mut devices: Vec<(String, String)> = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')) {
        let (name, table) = line.split_once(':')?;
        let name = name.trim();
        if name.is_empty() || name.contains(char::is_whitespace) || name.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        match devices.iter_mut().find(|(d, _)| d == name) {
            Some((_, t)) => {
                t.push('\n');
                t.push_str(table.trim());
            }
            None => devices.push((name.to_string(), table.trim().to_string())),
        }
    }
    (!devices.is_empty()).then_some(devices)
}

fn read_table(file: &str, spec: &str) -> Result<String, BenchError> {
    std::fs::read_to_string(file)
        .map_err(|e| BenchError::Usage(format!("--device {spec}: cannot read table file `{file}`: {e}")))
}

fn create_mapped(reg: &Registry, name: &str, file: &str, spec: &str) -> Result<(), BenchError> {
    let text = read_table(file, spec)?;
    reg.create(name, None, Some(&text)).map_err(|e| stack_error(spec, e))
}

fn stack_error(spec: &str, e: udm_mapping::MappingError) -> BenchError {
    BenchError::Usage(format!("--device {spec}: {e}"))
}
