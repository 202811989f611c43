//! Turning `--device` arguments into the device to measure.
//!
//! Every `--device` is a backend spec (`null:1G`, `mem:1G`, `file:/path`,
//! `fault:...@...`, see `udm_drivers::backend_spec`), optionally named (`disk=mem:1G`;
//! unnamed ones are `dev0`, `dev1`, ... in order). A stack of mapped devices over them
//! is described by `--device dm:<stack-file>`: one table line per line, prefixed by the
//! device's name, devices created (load + resume) in the order they first appear, the
//! last one measured:
//!
//! ```text
//! # origin with one snapshot, in LVM's order
//! vol-real: 0 2097152 linear disk 0
//! snap-cow: 0 1048576 linear cow 0
//! snap:     0 2097152 snapshot vol-real snap-cow P 8
//! vol:      0 2097152 snapshot-origin vol-real
//! ```

use std::sync::Arc;

use udm_drivers::backend_spec::open_backend;
use udm_drivers::{BlockDevice, DeviceError, DeviceInfo, IoQueue, MemoryRegion};
use udm_mapping::Registry;

use super::BenchError;

/// Opens the device that `specs` (the `--device` arguments, in order) describe.
pub fn open_bench_device(specs: &[String]) -> Result<Arc<dyn BlockDevice>, BenchError> {
    let stacks: Vec<&String> = specs.iter().filter(|s| s.starts_with("dm:")).collect();
    match (specs, stacks.as_slice()) {
        ([], _) => Err(BenchError::Usage("name a device with --device, e.g. --device mem:1G".into())),
        ([spec], []) => open_backend(spec).map_err(|source| BenchError::Device { spec: spec.clone(), source }),
        (_, [stack]) => open_stack(specs, stack),
        (many, []) => Err(BenchError::Usage(format!(
            "{} devices given ({}): udm bench measures one device; give several only with a \
             dm:<stack-file> whose tables name the others",
            many.len(),
            many.join(", ")
        ))),
        (_, _) => Err(BenchError::Usage("give at most one dm:<stack-file>".into())),
    }
}

/// Registers the backends, creates the stack's devices in order, returns the last.
fn open_stack(specs: &[String], stack: &str) -> Result<Arc<dyn BlockDevice>, BenchError> {
    let reg = Arc::new(Registry::new());
    let mut unnamed = 0;
    for spec in specs.iter().filter(|s| !s.starts_with("dm:")) {
        let (name, backend) = match spec.split_once('=') {
            Some((n, b)) if !n.contains(':') => (n.to_string(), b),
            _ => {
                unnamed += 1;
                (format!("dev{}", unnamed - 1), spec.as_str())
            }
        };
        let dev = open_backend(backend).map_err(|source| BenchError::Device { spec: spec.clone(), source })?;
        reg.register_backend(&name, dev).map_err(|e| BenchError::Setup(e.to_string()))?;
    }
    let path = &stack["dm:".len()..];
    let text = std::fs::read_to_string(path)
        .map_err(|e| BenchError::Usage(format!("cannot read the stack file {path}: {e}")))?;
    let mut order: Vec<(String, String)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, table) = line
            .split_once(':')
            .ok_or_else(|| BenchError::Usage(format!("{path}:{}: expected `<name>: <table line>`", n + 1)))?;
        let name = name.trim().to_string();
        match order.iter_mut().find(|(d, _)| *d == name) {
            Some((_, t)) => {
                t.push('\n');
                t.push_str(table.trim());
            }
            None => order.push((name, table.trim().to_string())),
        }
    }
    let Some((last, _)) = order.last().cloned() else {
        return Err(BenchError::Usage(format!("the stack file {path} names no device")));
    };
    for (name, table) in &order {
        reg.create(name, None, Some(table)).map_err(|e| BenchError::Setup(format!("creating `{name}`: {e}")))?;
    }
    let device = reg.device(&last).map_err(|e| BenchError::Setup(e.to_string()))?;
    Ok(Arc::new(StackDevice { _registry: reg, device }))
}

/// The measured device of a stack, keeping the registry (and so every device below)
/// alive as long as the benchmark uses it.
struct StackDevice {
    _registry: Arc<Registry>,
    device: Arc<dyn BlockDevice>,
}

impl BlockDevice for StackDevice {
    fn info(&self) -> DeviceInfo {
        self.device.info()
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        self.device.open_queue(depth)
    }

    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.device.register_memory(region)
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.device.unregister_memory(region)
    }
}
