//! The device registry: every device udm knows by name — backends registered by the
//! server or bench, and mapped devices with their tables — and device-mapper's
//! lifecycle over them (create, load, suspend, resume, clear, remove, rename) plus the
//! reports (info, table, status, ls, tree, deps).
//!
//! All control operations are serialized by one mutex, except waiting for a device to
//! drain, which happens without it (see `lifecycle`); the data path never takes it
//! (queues talk to their `MappedDevice` through atomics, see [`crate::mapped`]).
//!
//! Tables name devices by udm name, and `table` output prints udm names where the kernel
//! prints `major:minor`: udm has no device numbers, and a name re-parses to the same
//! device, so `parse(print(table)) == table` holds. A rename shows at once in the
//! output of every table that references the device.

mod lifecycle;
mod load;
mod names;
mod report;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use udm_drivers::BlockDevice;

use crate::error::MappingError;
use crate::mapped::MappedDevice;
use crate::table::Table;
pub use crate::target::DeviceId;
use crate::target::{EventCounter, Extensions, SharedName, TargetType};
use crate::targets::TargetTypes;

pub use names::{validate_name, MAX_NAME_LEN, MAX_UUID_LEN};
pub use report::{DeviceKind, DeviceReport, DeviceState};

/// Which of a mapped device's two table slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableSlot {
    /// The table serving I/O.
    Live,
    /// The table staged by `load`, made live by `resume`.
    Inactive,
}

/// Options of `suspend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SuspendFlags {
    /// Skip flushing the devices below after draining.
    pub noflush: bool,
}

/// The registry. Share it as `Arc<Registry>`.
pub struct Registry {
    state: Mutex<State>,
    types: Mutex<TargetTypes>,
    extensions: Extensions,
}

#[derive(Default)]
pub(crate) struct State {
    pub entries: BTreeMap<String, Entry>,
    next_id: u64,
}

pub(crate) struct Entry {
    pub id: DeviceId,
    pub name: SharedName,
    pub uuid: Option<String>,
    pub opens: Arc<AtomicUsize>,
    /// The device as the data path sees it (the same `Arc` for every user).
    pub block: Arc<dyn BlockDevice>,
    pub mapped: Option<MappedEntry>,
}

pub(crate) struct MappedEntry {
    pub dev: MappedDevice,
    pub inactive: Option<Arc<Table>>,
    pub events: EventCounter,
}

/// A device opened through the registry (an export, a benchmark): while any exists,
/// `remove` refuses the device unless forced. Dropping it closes it.
pub struct OpenDevice {
    id: DeviceId,
    name: SharedName,
    device: Arc<dyn BlockDevice>,
    opens: Arc<AtomicUsize>,
}

impl OpenDevice {
    /// The device, for `open_queue` and `info`.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Its name now (a rename shows here).
    pub fn name(&self) -> String {
        self.name.get()
    }

    /// Its identity, which a rename does not change and the registry never reuses.
    pub fn id(&self) -> DeviceId {
        self.id
    }
}

impl Drop for OpenDevice {
    fn drop(&mut self) {
        self.opens.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for OpenDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenDevice").field("id", &self.id).field("name", &self.name.get()).finish()
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry with the built-in target types.
    pub fn new() -> Self {
        Self::with_target_types(TargetTypes::builtin())
    }

    /// An empty registry accepting `types` in tables.
    pub fn with_target_types(types: TargetTypes) -> Self {
        Registry { state: Mutex::new(State::default()), types: Mutex::new(types), extensions: Extensions::default() }
    }

    /// Adds (or replaces) a target type, e.g. the snapshot targets.
    pub fn register_target_type(&self, t: Arc<dyn TargetType>) {
        self.types.lock().unwrap_or_else(|e| e.into_inner()).register(t);
    }

    /// State shared by target types across tables (see [`Extensions`]).
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a backend under `name` so tables can name it.
    pub fn register_backend(&self, name: &str, device: Arc<dyn BlockDevice>) -> Result<(), MappingError> {
        validate_name(name)?;
        let mut st = self.lock();
        if st.entries.contains_key(name) {
            return Err(MappingError::AlreadyExists(name.to_string()));
        }
        let id = st.new_id();
        st.entries.insert(
            name.to_string(),
            Entry {
                id,
                name: SharedName::new(name),
                uuid: None,
                opens: Arc::new(AtomicUsize::new(0)),
                block: device,
                mapped: None,
            },
        );
        Ok(())
    }

    /// The device called `name` (backend or mapped), without opening it.
    pub fn device(&self, name: &str) -> Result<Arc<dyn BlockDevice>, MappingError> {
        let st = self.lock();
        let e = st.get(name)?;
        Ok(Arc::clone(&e.block))
    }

    /// The mapped device called `name`.
    pub fn mapped_device(&self, name: &str) -> Result<MappedDevice, MappingError> {
        let st = self.lock();
        Ok(st.get_mapped(name)?.dev.clone())
    }

    /// Opens `name` for a user outside the registry (an export, a benchmark): counted
    /// in `info` and blocking `remove` until the handle is dropped.
    pub fn open(&self, name: &str) -> Result<OpenDevice, MappingError> {
        let st = self.lock();
        let e = st.get(name)?;
        e.opens.fetch_add(1, Ordering::AcqRel);
        Ok(OpenDevice { id: e.id, name: e.name.clone(), device: Arc::clone(&e.block), opens: Arc::clone(&e.opens) })
    }

    /// The identity of the device called `name` now (see [`OpenDevice::id`]).
    pub fn device_id(&self, name: &str) -> Result<DeviceId, MappingError> {
        Ok(self.lock().get(name)?.id)
    }

    /// How many [`OpenDevice`] handles exist for `name`.
    pub fn open_count(&self, name: &str) -> Result<usize, MappingError> {
        let st = self.lock();
        Ok(st.get(name)?.opens.load(Ordering::Acquire))
    }
}

impl State {
    fn new_id(&mut self) -> DeviceId {
        self.next_id += 1;
        DeviceId(self.next_id)
    }

    pub fn get(&self, name: &str) -> Result<&Entry, MappingError> {
        self.entries.get(name).ok_or_else(|| MappingError::NoSuchDevice(name.to_string()))
    }

    pub fn get_mapped(&self, name: &str) -> Result<&MappedEntry, MappingError> {
        self.get(name)?.mapped.as_ref().ok_or_else(|| MappingError::NotMapped(name.to_string()))
    }

    pub fn get_mapped_mut(&mut self, name: &str) -> Result<&mut MappedEntry, MappingError> {
        let e = self.entries.get_mut(name).ok_or_else(|| MappingError::NoSuchDevice(name.to_string()))?;
        e.mapped.as_mut().ok_or_else(|| MappingError::NotMapped(name.to_string()))
    }

    pub fn by_id(&self, id: DeviceId) -> Option<&Entry> {
        self.entries.values().find(|e| e.id == id)
    }

    /// Devices whose live or inactive table uses device `id`.
    pub fn holders_of(&self, id: DeviceId) -> Vec<String> {
        let mut out = Vec::new();
        for (name, e) in &self.entries {
            let Some(m) = &e.mapped else { continue };
            let live = m.dev.live_table();
            let uses = |t: &Option<Arc<Table>>| t.as_ref().is_some_and(|t| t.dependency_ids().any(|d| d == id));
            if uses(&live) || uses(&m.inactive) {
                out.push(name.clone());
            }
        }
        out
    }

    /// Devices that `id`'s tables (live and inactive) use directly.
    pub fn dependencies_of(&self, id: DeviceId) -> Vec<DeviceId> {
        let Some(e) = self.by_id(id) else { return Vec::new() };
        let Some(m) = &e.mapped else { return Vec::new() };
        let mut out: Vec<DeviceId> = Vec::new();
        for t in [m.dev.live_table(), m.inactive.clone()].into_iter().flatten() {
            for d in t.dependency_ids() {
                if !out.contains(&d) {
                    out.push(d);
                }
            }
        }
        out
    }
}
