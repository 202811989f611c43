//! The guest kernel prepared by `scripts/vm-prepare.sh`: the kernel image, its modules
//! (resolved in dependency order from each module's `depends=` field, since the Debian
//! package ships no modules.dep) and a static busybox.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::error::VmError;

/// Where `scripts/vm-prepare.sh` caches the guest kernel unless UDM_VM_CACHE says otherwise.
pub const DEFAULT_CACHE: &str = "/var/cache/udm-vm";

/// The guest kernel, its modules and busybox.
#[derive(Debug, Clone)]
pub struct GuestKernel {
    /// The cache directory.
    pub cache: PathBuf,
    /// Kernel image QEMU boots: the uncompressed `vmlinux` (PVH entry, faster) when
    /// present, else `vmlinuz`.
    pub image: PathBuf,
    /// `lib/modules/<version>` of that kernel.
    pub modules_dir: PathBuf,
    /// A static busybox.
    pub busybox: PathBuf,
    /// The kernel release, e.g. `6.1.0-48-amd64`.
    pub version: String,
    /// Module name (with `_` for `-`) to `.ko` path.
    index: HashMap<String, PathBuf>,
}

impl GuestKernel {
    /// The cache in `$UDM_VM_CACHE`, or [`DEFAULT_CACHE`].
    pub fn from_env() -> Result<Self, VmError> {
        let cache = std::env::var_os("UDM_VM_CACHE").map(PathBuf::from).unwrap_or_else(|| DEFAULT_CACHE.into());
        Self::open(&cache)
    }

    /// The cache in `cache`.
    pub fn open(cache: &Path) -> Result<Self, VmError> {
        let missing = |what: &str| VmError::CacheMissing { cache: cache.to_path_buf(), missing: what.to_string() };
        let vmlinux = cache.join("vmlinux");
        let vmlinuz = cache.join("vmlinuz");
        let image = if vmlinux.is_file() {
            vmlinux
        } else if vmlinuz.is_file() {
            vmlinuz
        } else {
            return Err(missing("vmlinuz"));
        };
        let modules_dir = cache.join("modules");
        if !modules_dir.join("kernel").is_dir() {
            return Err(missing("modules/kernel"));
        }
        let busybox = cache.join("busybox");
        if !busybox.is_file() {
            return Err(missing("busybox"));
        }
        let version = std::fs::read_to_string(cache.join("kernel-version")).unwrap_or_default().trim().to_string();
        let mut index = HashMap::new();
        index_modules(&modules_dir.join("kernel"), &mut index)?;
        Ok(GuestKernel { cache: cache.to_path_buf(), image, modules_dir, busybox, version, index })
    }

    /// The `.ko` file of `module` (`vfio-pci` or `vfio_pci`).
    pub fn module_path(&self, module: &str) -> Result<&Path, VmError> {
        self.index.get(&normalize(module)).map(PathBuf::as_path).ok_or_else(|| VmError::NoSuchModule(module.into()))
    }

    /// `modules` and everything they depend on, each once, every module after its
    /// dependencies: the order to `insmod` them in.
    pub fn resolve_modules(&self, modules: &[String]) -> Result<Vec<PathBuf>, VmError> {
        let mut order = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for m in modules {
            self.visit(&normalize(m), &mut seen, &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        seen: &mut std::collections::HashSet<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<(), VmError> {
        if !seen.insert(name.to_string()) {
            return Ok(());
        }
        let path = self.module_path(name)?.to_path_buf();
        for dep in module_depends(&path)? {
            self.visit(&dep, seen, order)?;
        }
        order.push(path);
        Ok(())
    }
}

fn normalize(name: &str) -> String {
    name.trim_end_matches(".ko").replace('-', "_")
}

fn index_modules(dir: &Path, index: &mut HashMap<String, PathBuf>) -> Result<(), VmError> {
    let entries = std::fs::read_dir(dir).map_err(|e| VmError::io(format!("reading {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| VmError::io(format!("reading {}", dir.display()), e))?;
        let path = entry.path();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".ko")) {
            index.insert(normalize(name), path);
        }
    }
    Ok(())
}

/// The modules named in the `depends=` field of a `.ko` file's `.modinfo` section
/// (NUL-separated `key=value` strings).
pub fn module_depends(ko: &Path) -> Result<Vec<String>, VmError> {
    let bytes = std::fs::read(ko).map_err(|e| VmError::io(format!("reading {}", ko.display()), e))?;
    let key = b"\0depends=";
    let Some(at) = bytes.windows(key.len()).position(|w| w == key) else {
        return Ok(Vec::new());
    };
    let value = &bytes[at + key.len()..];
    let end = value.iter().position(|&b| b == 0).unwrap_or(value.len());
    Ok(String::from_utf8_lossy(&value[..end]).split(',').filter(|s| !s.is_empty()).map(normalize).collect())
}
