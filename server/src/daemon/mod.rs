//! The daemon's state: the device registry (backends, mapped devices, snapshots) and the
//! exports over it. The control socket and `udm serve`'s start-up both act through
//! these methods; each either succeeds or leaves everything as it was.
//!
//! An export refers to its device by identity (the registry's [`DeviceId`]), not by
//! name: after `dm rename` it still knows which device it serves, and reports the new
//! name. An export's name stays taken until its removal has finished (drained and its
//! socket removed), so a remove followed by an add of the same name cannot race.

pub mod config;
pub mod merges;
pub mod persist;
pub mod reports;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use udm_drivers::backend_spec::open_backend;
use udm_drivers::units::parse_size;
use udm_drivers::SECTOR_SIZE;
use udm_mapping::registry::{DeviceId, OpenDevice, Registry, SuspendFlags, TableSlot};
use udm_mapping::snapshot_ops::{self, CowSource, CreateOptions, Created, ExistingCow, SnapshotOpError};
use udm_mapping::MappingError;

use crate::vhost_blk::{Export, ExportConfig, ExportError, ExportInfo};
use config::Config;
use merges::MergeFinisher;
use persist::{Problem, Recording};
pub use reports::{BackendReport, DeviceInfoReport, ExportStats, SnapshotReport};

/// What `snapshot create` may do with a COW that already holds something.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CowMode {
    /// Re-attach a valid store of the same chunk size.
    pub attach: bool,
    /// Re-initialise what is not re-attached (with `attach`: what cannot be).
    pub reinit: bool,
}

/// Why a daemon operation failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// A registry operation failed.
    #[error(transparent)]
    Mapping(#[from] MappingError),
    /// A snapshot operation failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotOpError),
    /// An export could not be created.
    #[error(transparent)]
    Export(#[from] ExportError),
    /// A backend could not be opened.
    #[error("backend `{name}`: {reason}")]
    Backend {
        /// Its name.
        name: String,
        /// Why.
        reason: String,
    },
    /// No export has that name.
    #[error("no export named `{0}`: see `udm export ls`")]
    NoSuchExport(String),
    /// The export name is taken.
    #[error("an export named `{0}` already exists: remove it first or choose another name")]
    ExportExists(String),
    /// The export name is still held by an export being removed.
    #[error("export `{0}` is still being removed (draining its requests): retry once `udm export remove` returns")]
    ExportBeingRemoved(String),
    /// An argument is invalid.
    #[error("{0}")]
    Invalid(String),
    /// `backend.remove` named a mapped device.
    #[error("`{0}` is a mapped device, not a backend: remove it with `udm dm remove`")]
    NotABackend(String),
    /// `backend.remove` of a backend that exports serve.
    #[error(
        "backend `{name}` is exported by {exports}: remove the export first (`udm export remove`), \
         or pass --force to stop it"
    )]
    BackendExported {
        /// The backend.
        name: String,
        /// The exports serving it, comma-separated.
        exports: String,
    },
}

struct ExportEntry {
    export: Export,
    /// The configuration as asked for (before defaults such as the daemon's CPUs were
    /// filled in), which the state file records.
    requested: ExportConfig,
    /// Keeps the device open (so `dm remove` refuses it) while exported, and says which
    /// device it is whatever its name is now.
    open: OpenDevice,
}

impl ExportEntry {
    /// `export ls`'s line, with the device's name as it is now.
    fn info(&self) -> ExportInfo {
        let mut info = self.export.info();
        info.config.device = self.open.name();
        info
    }

    fn serves(&self, device: DeviceId) -> bool {
        self.open.id() == device
    }

    /// Stops the export, then closes the device.
    fn stop(self) {
        self.export.stop();
        drop(self.open);
    }
}

/// Running exports, and those being removed (whose names stay taken meanwhile).
#[derive(Default)]
struct Exports {
    running: BTreeMap<String, ExportEntry>,
    removing: BTreeMap<String, ExportInfo>,
}

impl Exports {
    /// Takes `name` out of the running exports and holds its name until
    /// [`Daemon::finish_removal`].
    fn begin_removal(&mut self, name: &str) -> Option<ExportEntry> {
        let entry = self.running.remove(name)?;
        let mut info = entry.info();
        info.removing = true;
        self.removing.insert(name.to_string(), info);
        Some(entry)
    }
}

/// The daemon.
pub struct Daemon {
    registry: Arc<Registry>,
    exports: Mutex<Exports>,
    /// The spec each backend added through the daemon was opened from, by name.
    backend_specs: Mutex<BTreeMap<String, String>>,
    cpus: Vec<usize>,
    /// Whether and where changes are written (see [`persist`]).
    recording: Mutex<Recording>,
    /// Held shared by operations made of several registry steps (snapshot create,
    /// remove, merge and a merge's finish) and exclusively while the state is captured,
    /// so the state file never records one half done.
    composite: Arc<RwLock<()>>,
    /// Devices that came back from the state file as `error` devices, and why.
    problems: Mutex<BTreeMap<DeviceId, Problem>>,
    /// Exports from the state file that could not start, with why; kept in the state
    /// until added again or removed.
    failed_exports: Mutex<BTreeMap<String, (ExportConfig, String)>>,
    /// Finishes completed snapshot merges in the background.
    merges: MergeFinisher,
}

impl Daemon {
    /// An empty daemon; exports without their own CPU list spread queues over `cpus`.
    pub fn new(cpus: Vec<usize>) -> Self {
        let registry = Arc::new(Registry::new());
        let composite = Arc::new(RwLock::new(()));
        let merges = MergeFinisher::start(Arc::downgrade(&registry), Arc::clone(&composite));
        Daemon {
            registry,
            exports: Mutex::new(Exports::default()),
            backend_specs: Mutex::new(BTreeMap::new()),
            cpus,
            recording: Mutex::new(Recording::Off),
            composite,
            problems: Mutex::new(BTreeMap::new()),
            failed_exports: Mutex::new(BTreeMap::new()),
            merges,
        }
    }

    /// Records every change in the state file at `path` from now on, merges finished in
    /// the background too; writes the state once now.
    pub fn record_to(self: &Arc<Self>, path: PathBuf) -> Result<(), state::StateError> {
        self.set_recording(Recording::On(path));
        let daemon = Arc::downgrade(self);
        self.merges.on_finished(Box::new(move || {
            if let Some(d) = daemon.upgrade() {
                if let Err(e) = d.save_state() {
                    tracing::error!("a finished merge is in effect but not saved: {e}");
                }
            }
        }));
        self.save_state()
    }

    fn recording(&self) -> MutexGuard<'_, Recording> {
        self.recording.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn problems(&self) -> MutexGuard<'_, BTreeMap<DeviceId, Problem>> {
        self.problems.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn failed_exports(&self) -> MutexGuard<'_, BTreeMap<String, (ExportConfig, String)>> {
        self.failed_exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Shared hold of [`Daemon::composite`] for an operation of several steps.
    fn composite_step(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.composite.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    fn exports(&self) -> MutexGuard<'_, Exports> {
        self.exports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn backend_specs(&self) -> MutexGuard<'_, BTreeMap<String, String>> {
        self.backend_specs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets up everything `config` declares, in order; stops at the first error.
    pub fn apply(&self, config: &Config) -> Result<(), DaemonError> {
        for b in &config.backends {
            self.backend_add(&b.name, &b.spec)?;
        }
        for d in &config.devices {
            let table = Some(d.table.as_str()).filter(|t| !t.trim().is_empty());
            self.registry.create(&d.name, d.uuid.as_deref(), table)?;
        }
        for d in &config.devices {
            if let Some(t) = &d.inactive_table {
                self.registry.load(&d.name, t)?;
            }
        }
        // A declared snapshot is re-attached from its COW when it holds a valid store (a
        // blank one is initialised, anything else refused unless `reinit`). One whose
        // merge was cut short is merged again once every declared snapshot exists, so
        // the others are attached before the origin changes.
        let mut merging = Vec::new();
        for s in &config.snapshots {
            let existing = if s.reinit { ExistingCow::AttachOrReinit } else { ExistingCow::Attach };
            if let Created::Attached { merging: true, exceptions } =
                self.create_snapshot(&s.origin, &s.name, &s.cow, &s.chunk, existing)?
            {
                merging.push((s.name.as_str(), exceptions));
            }
        }
        for (name, exceptions) in merging {
            tracing::warn!(
                "snapshot {name} was being merged when udm stopped: resuming the merge ({exceptions} exceptions left)"
            );
            self.snapshot_merge(name)?;
        }
        for e in &config.exports {
            self.export_add(e.clone())?;
        }
        // Last: a suspended device holds the I/O that setting up what is above it makes.
        for d in config.devices.iter().filter(|d| d.suspended) {
            self.registry.suspend(&d.name, SuspendFlags { noflush: true })?;
        }
        Ok(())
    }

    /// Opens a backend from `spec` and registers it as `name`.
    pub fn backend_add(&self, name: &str, spec: &str) -> Result<(), DaemonError> {
        let dev = open_backend(spec).map_err(|e| DaemonError::Backend { name: name.into(), reason: e.to_string() })?;
        self.registry.register_backend(name, dev)?;
        self.backend_specs().insert(name.into(), spec.into());
        Ok(())
    }

    /// Removes a backend. Refused while an export serves it (naming the export) or a
    /// table uses it (naming the device), unless `force`, which, like `dm remove
    /// --force`, removes it anyway: the exports serving it are stopped (their front ends
    /// are disconnected), and tables still using it keep their handle on the device
    /// (its I/O goes on until they are reloaded or removed; the device is released with
    /// the last handle).
    pub fn backend_remove(&self, name: &str, force: bool) -> Result<(), DaemonError> {
        let stopping = {
            // The exports lock is held until the backend is gone from the registry, so
            // no export can start on it between the check and the removal.
            let mut exports = self.exports();
            if self.registry.info(name)?.kind != udm_mapping::DeviceKind::Backend {
                return Err(DaemonError::NotABackend(name.into()));
            }
            let id = self.registry.device_id(name)?;
            let users: Vec<String> =
                exports.running.iter().filter(|(_, e)| e.serves(id)).map(|(n, _)| n.clone()).collect();
            if !users.is_empty() && !force {
                return Err(DaemonError::BackendExported { name: name.into(), exports: users.join(", ") });
            }
            // Without force, tables and other openers: the registry names them and
            // changes nothing.
            self.registry.remove(name, force)?;
            self.backend_specs().remove(name);
            users.into_iter().filter_map(|u| exports.begin_removal(&u).map(|e| (u, e))).collect::<Vec<_>>()
        };
        for (export, entry) in stopping {
            tracing::warn!(backend = %name, export = %export, "forced backend removal stops its export");
            self.finish_removal(&export, entry);
        }
        Ok(())
    }

    /// Every backend (or the one called `name`) with its size and users.
    pub fn backend_ls(&self, name: Option<&str>) -> Result<Vec<BackendReport>, DaemonError> {
        let exports = self.exports();
        let specs = self.backend_specs();
        let mut out = Vec::new();
        for n in self.names(name)? {
            let report = self.registry.info(&n)?;
            if report.kind != udm_mapping::DeviceKind::Backend {
                if name.is_some() {
                    return Err(DaemonError::NotABackend(n));
                }
                continue;
            }
            let info = self.registry.device(&n)?.info();
            let id = self.registry.device_id(&n)?;
            let exported_by = exports.running.iter().filter(|(_, e)| e.serves(id)).map(|(e, _)| e.clone()).collect();
            out.push(BackendReport {
                spec: specs.get(&n).cloned(),
                sectors: report.sectors,
                block_size: info.logical_block_size,
                max_transfer: info.max_transfer,
                read_only: info.read_only,
                used_by: report.holders,
                exported_by,
                open_count: report.open_count,
                name: n,
            });
        }
        Ok(out)
    }

    /// Exports a registry device over vhost-user-blk.
    pub fn export_add(&self, mut config: ExportConfig) -> Result<ExportInfo, DaemonError> {
        let mut exports = self.exports();
        if exports.running.contains_key(&config.name) {
            return Err(DaemonError::ExportExists(config.name));
        }
        if exports.removing.contains_key(&config.name) {
            return Err(DaemonError::ExportBeingRemoved(config.name));
        }
        let requested = config.clone();
        if config.cpus.is_empty() {
            config.cpus = self.cpus.clone();
        }
        let open = self.registry.open(&config.device)?;
        let export = Export::start(config.clone(), Arc::clone(open.device()))?;
        let info = export.info();
        self.failed_exports().remove(&config.name);
        exports.running.insert(config.name, ExportEntry { export, requested, open });
        Ok(info)
    }

    /// Stops an export (draining its requests) and removes its socket; returns once
    /// all that is done, and only then can the name be used again.
    pub fn export_remove(&self, name: &str) -> Result<(), DaemonError> {
        let entry = {
            let mut exports = self.exports();
            match exports.begin_removal(name) {
                Some(e) => e,
                None if exports.removing.contains_key(name) => {
                    return Err(DaemonError::ExportBeingRemoved(name.into()))
                }
                // One that could not start again after a restart: forgetting it is all.
                None if self.failed_exports().remove(name).is_some() => return Ok(()),
                None => return Err(DaemonError::NoSuchExport(name.into())),
            }
        };
        self.finish_removal(name, entry);
        Ok(())
    }

    /// Stops an export taken out by [`Exports::begin_removal`] (without the exports
    /// lock: draining may take long), then frees its name.
    fn finish_removal(&self, name: &str, entry: ExportEntry) {
        entry.stop();
        self.exports().removing.remove(name);
    }

    /// Every export (those being removed too, marked so).
    pub fn export_ls(&self) -> Vec<ExportInfo> {
        let exports = self.exports();
        let failed: Vec<ExportInfo> = self
            .failed_exports()
            .values()
            .map(|(config, why)| ExportInfo {
                config: config.clone(),
                sectors: 0,
                connected: false,
                connections: 0,
                removing: false,
                problem: Some(why.clone()),
            })
            .collect();
        let mut all: Vec<ExportInfo> = exports
            .running
            .values()
            .map(ExportEntry::info)
            .chain(exports.removing.values().cloned())
            .chain(failed)
            .collect();
        all.sort_by(|a, b| a.config.name.cmp(&b.config.name));
        all
    }

    /// Statistics of one export or all.
    pub fn stats(&self, name: Option<&str>) -> Result<Vec<ExportStats>, DaemonError> {
        let exports = self.exports();
        if let Some(n) = name {
            if !exports.running.contains_key(n) {
                return Err(DaemonError::NoSuchExport(n.into()));
            }
        }
        Ok(exports
            .running
            .values()
            .filter(|e| name.is_none_or(|n| e.export.config().name == n))
            .map(|e| ExportStats::new(&e.info().config, e.export.stats()))
            .collect())
    }

    /// Tells every export whose device changed size (after a resume, a reload, a
    /// snapshot switch); returns the exports that changed.
    pub fn refresh_sizes(&self) -> Vec<String> {
        self.exports()
            .running
            .values()
            .filter(|e| e.export.refresh_size())
            .map(|e| e.export.config().name.clone())
            .collect()
    }

    /// `dmsetup create`.
    pub fn dm_create(&self, name: &str, uuid: Option<&str>, table: Option<&str>) -> Result<(), DaemonError> {
        Ok(self.registry.create(name, uuid, table)?)
    }

    /// `dmsetup load`.
    pub fn dm_load(&self, name: &str, table: &str) -> Result<(), DaemonError> {
        Ok(self.registry.load(name, table)?)
    }

    /// `dmsetup suspend`: waits for the device to drain, or at most `timeout` (then
    /// the device stays active and the error says what is still in flight).
    pub fn dm_suspend(&self, name: &str, noflush: bool, timeout: Option<Duration>) -> Result<(), DaemonError> {
        Ok(self.registry.suspend_within(name, SuspendFlags { noflush }, timeout)?)
    }

    /// `dmsetup resume`; exports of resized devices tell their front ends.
    pub fn dm_resume(&self, name: &str) -> Result<(), DaemonError> {
        self.registry.resume(name)?;
        self.refresh_sizes();
        Ok(())
    }

    /// `dmsetup clear`.
    pub fn dm_clear(&self, name: &str) -> Result<(), DaemonError> {
        Ok(self.registry.clear(name)?)
    }

    /// `dmsetup remove`.
    pub fn dm_remove(&self, name: &str, force: bool) -> Result<(), DaemonError> {
        Ok(self.registry.remove(name, force)?)
    }

    /// `dmsetup rename`.
    pub fn dm_rename(&self, old: &str, new: &str) -> Result<(), DaemonError> {
        self.registry.rename(old, new)?;
        let mut specs = self.backend_specs();
        if let Some(spec) = specs.remove(old) {
            specs.insert(new.into(), spec);
        }
        Ok(())
    }

    /// `dmsetup info` for one device or every one.
    pub fn dm_info(&self, name: Option<&str>) -> Result<Vec<DeviceInfoReport>, DaemonError> {
        let names = self.names(name)?;
        names
            .iter()
            .map(|n| {
                let mut report = DeviceInfoReport::from(self.registry.info(n)?);
                report.problem = self.problem(n);
                Ok(report)
            })
            .collect()
    }

    /// `dmsetup table` / `status` for one device or every mapped one: (name, text).
    pub fn dm_table(
        &self,
        name: Option<&str>,
        status: bool,
        inactive: bool,
    ) -> Result<Vec<(String, String)>, DaemonError> {
        let slot = if inactive { TableSlot::Inactive } else { TableSlot::Live };
        let mut out = Vec::new();
        for n in self.names(name)? {
            if name.is_none() && self.registry.info(&n)?.kind == udm_mapping::DeviceKind::Backend {
                continue;
            }
            let text = if status { self.registry.status(&n, slot)? } else { self.registry.table(&n, slot)? };
            out.push((n, text));
        }
        Ok(out)
    }

    /// `dmsetup deps`.
    pub fn dm_deps(&self, name: &str, inactive: bool) -> Result<Vec<String>, DaemonError> {
        let slot = if inactive { TableSlot::Inactive } else { TableSlot::Live };
        Ok(self.registry.deps(name, slot)?)
    }

    /// `dmsetup ls` (`--tree`).
    pub fn dm_ls(&self, tree: bool) -> Result<serde_json::Value, DaemonError> {
        if tree {
            return Ok(serde_json::Value::String(self.registry.ls_tree()));
        }
        let list: Vec<_> = self
            .registry
            .ls()
            .into_iter()
            .map(|(n, k)| {
                let mut row = serde_json::json!({"name": n, "kind": reports::kind_name(k)});
                if let Some(problem) = self.problem(&n) {
                    row["problem"] = serde_json::Value::String(problem);
                }
                row
            })
            .collect();
        Ok(serde_json::Value::Array(list))
    }

    /// `udm snapshot create`: on a blank COW; with `attach`, also re-attaching the store
    /// a COW holds (and merging it again if its merge was cut short), as a declared
    /// snapshot does at start; with `reinit`, over anything (what it held is lost).
    pub fn snapshot_create(
        &self,
        origin: &str,
        name: &str,
        cow: &str,
        chunk: &str,
        mode: CowMode,
    ) -> Result<(), DaemonError> {
        let existing = match (mode.attach, mode.reinit) {
            (false, false) => ExistingCow::Refuse,
            (false, true) => ExistingCow::Reinit,
            (true, false) => ExistingCow::Attach,
            (true, true) => ExistingCow::AttachOrReinit,
        };
        if let Created::Attached { merging: true, exceptions } =
            self.create_snapshot(origin, name, cow, chunk, existing)?
        {
            tracing::warn!("snapshot {name} was being merged: resuming the merge ({exceptions} exceptions left)");
            self.snapshot_merge(name)?;
        }
        Ok(())
    }

    fn create_snapshot(
        &self,
        origin: &str,
        name: &str,
        cow: &str,
        chunk: &str,
        existing: ExistingCow,
    ) -> Result<Created, DaemonError> {
        let bytes = parse_size(chunk).map_err(|e| DaemonError::Invalid(format!("chunk: {e}")))?;
        if !bytes.is_multiple_of(SECTOR_SIZE) {
            return Err(DaemonError::Invalid(format!("chunk {chunk} is not a whole number of 512-byte sectors")));
        }
        let opts = CreateOptions {
            cow: CowSource::parse(cow),
            chunk_sectors: bytes / SECTOR_SIZE,
            persistent: true,
            existing,
        };
        let created = {
            let _step = self.composite_step();
            snapshot_ops::create(&self.registry, origin, name, &opts)?
        };
        // A COW opened from a spec is a backend too: record where it came from so the
        // state file can open it again.
        if let CowSource::Backend(spec) = &opts.cow {
            self.backend_specs().insert(format!("{name}-cowdev"), spec.clone());
        }
        self.refresh_sizes();
        Ok(created)
    }

    /// `udm snapshot remove`.
    pub fn snapshot_remove(&self, name: &str) -> Result<(), DaemonError> {
        let _step = self.composite_step();
        snapshot_ops::remove(&self.registry, name)?;
        Ok(())
    }

    /// `udm snapshot merge`.
    pub fn snapshot_merge(&self, name: &str) -> Result<(), DaemonError> {
        let _step = self.composite_step();
        snapshot_ops::merge(&self.registry, name)?;
        Ok(())
    }

    /// `udm snapshot list`.
    pub fn snapshot_list(&self) -> Vec<SnapshotReport> {
        snapshot_ops::list(&self.registry).into_iter().map(SnapshotReport::from).collect()
    }

    fn names(&self, name: Option<&str>) -> Result<Vec<String>, DaemonError> {
        Ok(match name {
            Some(n) => {
                self.registry.info(n)?;
                vec![n.to_string()]
            }
            None => self.registry.ls().into_iter().map(|(n, _)| n).collect(),
        })
    }

    /// Stops every export (each drains its queues), then flushes every device.
    pub fn shutdown(&self) {
        self.shutdown_steps(&|_| {});
    }

    /// [`Daemon::shutdown`], giving up after `grace` if a step does not finish (a
    /// device that stopped completing I/O would otherwise hold the daemon forever);
    /// the error names the step that was still running. Front ends replay what was in
    /// flight when they reconnect to the next daemon.
    pub fn shutdown_within(self: &Arc<Self>, grace: Duration) -> Result<(), String> {
        let step = Arc::new(Mutex::new(String::from("starting")));
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let worker = {
            let (daemon, step) = (Arc::clone(self), Arc::clone(&step));
            std::thread::Builder::new().name("udm-shutdown".into()).spawn(move || {
                daemon.shutdown_steps(&|s| *step.lock().unwrap_or_else(|e| e.into_inner()) = s);
                let _ = done_tx.send(());
            })
        };
        if let Err(e) = worker {
            tracing::warn!("cannot start the shutdown thread ({e}): shutting down without a time limit");
            self.shutdown();
            return Ok(());
        }
        match done_rx.recv_timeout(grace) {
            Ok(()) => Ok(()),
            Err(_) => Err(format!(
                "shutdown did not finish within {} s, still {}: exiting without it \
                 (is a device below no longer completing I/O?)",
                grace.as_secs_f64(),
                step.lock().unwrap_or_else(|e| e.into_inner())
            )),
        }
    }

    fn shutdown_steps(&self, step: &dyn Fn(String)) {
        let exports = std::mem::take(&mut self.exports().running);
        for (name, e) in exports {
            tracing::info!(export = %name, "stopping export");
            step(format!("stopping export `{name}` (draining its requests)"));
            e.stop();
        }
        for (name, _) in self.registry.ls() {
            if let Ok(dev) = self.registry.device(&name) {
                step(format!("flushing `{name}`"));
                if let Err(e) = udm_mapping::sync_io::flush(dev.as_ref()) {
                    tracing::warn!(device = %name, "flush at shutdown failed: {e}");
                }
            }
        }
    }
}
