//! Durable state: capturing what the daemon holds as a [`StateFile`], writing it after
//! every change, and rebuilding it at start-up.
//!
//! Rebuilding goes in dependency order, in passes, so that no step waits on another:
//! 1. backends (one that cannot be opened stands in as an `error` device of its recorded
//!    size, so the tables over it still load);
//! 2. mapped devices in the file's order (each after the devices its tables use): live
//!    table loaded and resumed. A table that cannot be loaded (a device below missing,
//!    a snapshot whose COW came back blank) gives an `error` table of the same size;
//! 3. inactive tables, loaded and not resumed;
//! 4. devices left suspended are suspended (last: a suspended device would hold the
//!    reads that loading a snapshot table over it makes);
//! 5. exports, at the sockets they had.
//!
//! A device that came back as an `error` device carries a *problem* (shown by `dm ls`
//! and `dm info`) and its recorded tables: the state file keeps what it was until the
//! operator loads another table or removes it, so a disk that is back at the next start
//! brings the device back too.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use udm_drivers::backend_spec::open_backend;
use udm_mapping::exception_store::probe::{self, CowContents};
use udm_mapping::registry::{DeviceKind, DeviceState as RegistryState, SuspendFlags, TableSlot};
use udm_mapping::table_text::parse_table_text;

use super::state::{BackendState, DeviceState, StateError, StateFile};
use super::Daemon;
use crate::vhost_blk::ExportConfig;

/// Whether changes are written to a state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recording {
    /// No state file (tests, benchmarks).
    Off,
    /// `udm serve` is rebuilding: nothing is written, changes through the control
    /// socket are refused until it is done.
    Starting,
    /// Every change is written to this file.
    On(PathBuf),
}

/// What a device that came back as an `error` device was, and why.
#[derive(Debug, Clone)]
pub(super) struct Problem {
    /// What `dm ls` shows.
    pub reason: String,
    /// What the state file keeps for it.
    pub recorded: Recorded,
    /// Its live and inactive table texts as rebuilt: once the operator changes either,
    /// the device is what they made it and the problem is gone.
    pub live: String,
    pub inactive: String,
}

/// The recorded object a problem device stands for.
#[derive(Debug, Clone)]
pub(super) enum Recorded {
    Backend(BackendState),
    Device(DeviceState),
}

/// A `config check`-style summary of a rebuild.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RestoreReport {
    /// Objects that came back as they were.
    pub restored: usize,
    /// One line per object that came back with a problem (or not at all).
    pub problems: Vec<String>,
}

impl Daemon {
    /// Sets whether and where changes are recorded.
    pub fn set_recording(&self, recording: Recording) {
        *self.recording() = recording;
    }

    /// The file changes are written to, if any.
    pub fn state_path(&self) -> Option<PathBuf> {
        match &*self.recording() {
            Recording::On(p) => Some(p.clone()),
            _ => None,
        }
    }

    /// `udm serve` is still rebuilding its state.
    pub fn is_starting(&self) -> bool {
        *self.recording() == Recording::Starting
    }

    /// Writes the current state to the state file (nothing without one, or while
    /// starting). Waits for composite operations (snapshot create, remove, merge) in
    /// progress so that none is captured half done.
    pub fn save_state(&self) -> Result<(), StateError> {
        let recording = self.recording();
        let Recording::On(path) = &*recording else { return Ok(()) };
        let _whole = self.composite.write().unwrap_or_else(|e| e.into_inner());
        self.capture().write(path)
    }

    /// The current state, as the state file records it.
    pub fn capture(&self) -> StateFile {
        let mut state = StateFile::new();
        let reg = &self.registry;
        let specs = self.backend_specs().clone();
        let mut problems = self.problems();
        let mut devices = Vec::new();
        let mut live_problems = BTreeSet::new();
        for (name, kind) in reg.ls() {
            let Ok(id) = reg.device_id(&name) else { continue };
            if kind == DeviceKind::Backend {
                let sectors = reg.device(&name).map(|d| d.info().sectors).unwrap_or(0);
                state.backends.push(BackendState { name: name.clone(), spec: specs.get(&name).cloned(), sectors });
                continue;
            }
            let Ok(info) = reg.info(&name) else { continue };
            let live = reg.table(&name, TableSlot::Live).unwrap_or_default();
            let inactive = reg.table(&name, TableSlot::Inactive).unwrap_or_default();
            let current = DeviceState {
                name: name.clone(),
                uuid: info.uuid,
                table: (!live.is_empty()).then(|| live.clone()),
                inactive_table: (!inactive.is_empty()).then(|| inactive.clone()),
                suspended: info.state == RegistryState::Suspended,
            };
            match problems.get(&id) {
                Some(p) if p.live == live && p.inactive == inactive => {
                    live_problems.insert(id);
                    match &p.recorded {
                        Recorded::Backend(b) => state.backends.push(BackendState { name: name.clone(), ..b.clone() }),
                        Recorded::Device(d) => devices.push(DeviceState {
                            name: name.clone(),
                            uuid: current.uuid,
                            suspended: current.suspended,
                            ..d.clone()
                        }),
                    }
                }
                _ => devices.push(current),
            }
        }
        // Problems of devices removed or given other tables are over.
        problems.retain(|id, _| live_problems.contains(id));
        drop(problems);
        state.devices = dependency_order(devices);
        let exports = self.exports();
        let mut all: Vec<ExportConfig> =
            exports.running.values().map(|e| ExportConfig { device: e.open.name(), ..e.requested.clone() }).collect();
        drop(exports);
        all.extend(self.failed_exports().values().map(|(c, _)| c.clone()));
        for e in &mut all {
            e.socket = std::path::absolute(&e.socket).unwrap_or_else(|_| e.socket.clone());
        }
        all.sort_by(|a, b| a.name.cmp(&b.name));
        state.exports = all;
        state
    }

    /// The problem `dm ls` shows for `name`: it came back as an `error` device (and is
    /// still as it was rebuilt), or its tables use one, directly or further down.
    pub fn problem(&self, name: &str) -> Option<String> {
        if let Some(own) = self.own_problem(name) {
            return Some(own);
        }
        let mut seen = BTreeSet::new();
        let mut todo: Vec<String> = self.registry.deps(name, TableSlot::Live).unwrap_or_default();
        while let Some(d) = todo.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            if self.own_problem(&d).is_some() {
                return Some(format!("uses `{d}`, which came back as an error device (see its problem)"));
            }
            todo.extend(self.registry.deps(&d, TableSlot::Live).unwrap_or_default());
        }
        None
    }

    fn own_problem(&self, name: &str) -> Option<String> {
        let id = self.registry.device_id(name).ok()?;
        let problems = self.problems();
        let p = problems.get(&id)?;
        let live = self.registry.table(name, TableSlot::Live).unwrap_or_default();
        let inactive = self.registry.table(name, TableSlot::Inactive).unwrap_or_default();
        (p.live == live && p.inactive == inactive).then(|| p.reason.clone())
    }

    /// Rebuilds `state` (see the module documentation). Objects that cannot come back
    /// as they were come back as `error` devices with a problem, or (an export) are
    /// kept in the state with a warning; everything else starts.
    pub fn restore(&self, state: &StateFile) -> RestoreReport {
        let mut report = RestoreReport::default();
        let mut fail = |what: String| {
            tracing::error!("{what}");
            report.problems.push(what);
        };
        for b in &state.backends {
            let opened = match &b.spec {
                Some(spec) => open_backend(spec).map_err(|e| format!("its backend `{spec}` cannot be opened: {e}")),
                None => Err("no backend spec was recorded for it, so it cannot be opened again".to_string()),
            };
            let result: Result<(), String> = match opened {
                Ok(dev) => match self.registry.register_backend(&b.name, dev) {
                    Ok(()) => {
                        if let Some(spec) = &b.spec {
                            self.backend_specs().insert(b.name.clone(), spec.clone());
                        }
                        report.restored += 1;
                        continue;
                    }
                    Err(e) => Err(e.to_string()),
                },
                Err(e) => Err(e),
            };
            if let Err(reason) = result {
                let standin = (b.sectors > 0).then(|| format!("0 {} error", b.sectors));
                match self.stand_in(&b.name, None, standin.as_deref(), &reason, Recorded::Backend(b.clone())) {
                    Ok(()) => {
                        fail(format!("backend {}: {reason}; it is an error device until it can be opened", b.name))
                    }
                    Err(e) => fail(format!("backend {}: {reason}; and no error device could stand in: {e}", b.name)),
                }
            }
        }
        let mut rebuilt = Vec::new();
        let mut merging = Vec::new();
        for d in &state.devices {
            if let Err(e) = self.registry.create(&d.name, d.uuid.as_deref(), None) {
                fail(format!("device {}: cannot be created: {e}", d.name));
                continue;
            }
            rebuilt.push(d);
            let Some(table) = &d.table else { continue };
            let loaded = self.check_restorable(table).and_then(|marked| {
                self.registry
                    .load(&d.name, table)
                    .and_then(|()| self.registry.resume(&d.name))
                    .map(|()| marked)
                    .map_err(|e| e.to_string())
            });
            match loaded {
                Ok(marked) => {
                    report.restored += 1;
                    if marked {
                        merging.push(d.name.as_str());
                    }
                }
                Err(reason) => {
                    let _ = self.registry.clear(&d.name);
                    let standin = error_table(table);
                    let _ = self.stand_in(
                        &d.name,
                        d.uuid.as_deref(),
                        standin.as_deref(),
                        &reason,
                        Recorded::Device(d.clone()),
                    );
                    fail(format!("device {}: its table cannot be loaded: {reason}; it is an error device", d.name));
                }
            }
        }
        for d in &rebuilt {
            if let Some(table) = &d.inactive_table {
                if let Err(reason) = self
                    .check_restorable(table)
                    .and_then(|_| self.registry.load(&d.name, table).map_err(|e| e.to_string()))
                {
                    self.note_problem(
                        &d.name,
                        &format!("its inactive table cannot be loaded: {reason}"),
                        Recorded::Device((*d).clone()),
                    );
                    fail(format!("device {}: its inactive table cannot be loaded: {reason}", d.name));
                }
            }
        }
        // A merge that had begun (its COW is marked) when udm was killed before it could
        // record the merge's tables: the origin is partly merged, so the merge must go
        // on, as a declared snapshot's does.
        for name in merging {
            tracing::warn!("snapshot {name} was being merged when udm stopped: resuming the merge");
            if let Err(e) = self.snapshot_merge(name) {
                fail(format!("snapshot {name}: its merge had begun and cannot be resumed: {e}"));
            }
        }
        for d in rebuilt.iter().filter(|d| d.suspended) {
            if let Err(e) = self.registry.suspend(&d.name, SuspendFlags { noflush: true }) {
                fail(format!("device {}: was suspended and cannot be suspended again: {e}", d.name));
            }
        }
        for e in &state.exports {
            match self.export_add(e.clone()) {
                Ok(_) => report.restored += 1,
                Err(err) => {
                    fail(format!(
                        "export {}: cannot start at {}: {err}; kept in the state",
                        e.name,
                        e.socket.display()
                    ));
                    self.failed_exports().insert(e.name.clone(), (e.clone(), err.to_string()));
                }
            }
        }
        report
    }

    /// Makes `name` an `error` device standing for what was recorded (created when it
    /// does not exist), with `reason` as its problem.
    fn stand_in(
        &self,
        name: &str,
        uuid: Option<&str>,
        table: Option<&str>,
        reason: &str,
        recorded: Recorded,
    ) -> Result<(), String> {
        if self.registry.info(name).is_err() {
            self.registry.create(name, uuid, None).map_err(|e| e.to_string())?;
        }
        if let Some(t) = table {
            self.registry.load(name, t).and_then(|()| self.registry.resume(name)).map_err(|e| e.to_string())?;
        }
        self.note_problem(name, reason, recorded);
        Ok(())
    }

    /// Records `reason` for `name` as it is now.
    fn note_problem(&self, name: &str, reason: &str, recorded: Recorded) {
        let Ok(id) = self.registry.device_id(name) else { return };
        let live = self.registry.table(name, TableSlot::Live).unwrap_or_default();
        let inactive = self.registry.table(name, TableSlot::Inactive).unwrap_or_default();
        let mut problems = self.problems();
        let reason = match problems.get(&id) {
            Some(old) => format!("{}; {reason}", old.reason),
            None => reason.to_string(),
        };
        problems.insert(id, Problem { reason, recorded, live, inactive });
    }

    /// Refuses a table that would load but not as it was: a transient snapshot (its
    /// exceptions were in memory), or a persistent snapshot or merge whose COW came
    /// back blank (it was in RAM, or was wiped): its table would initialise an empty
    /// store and show the origin as it is now. `Ok(true)`: a `snapshot` line's COW
    /// carries the merge mark (a merge began).
    fn check_restorable(&self, table: &str) -> Result<bool, String> {
        let mut marked = false;
        let Ok(lines) = parse_table_text(table) else { return Ok(false) };
        for line in lines {
            if line.target != "snapshot" && line.target != "snapshot-merge" {
                continue;
            }
            let [origin, cow, persistence, ..] = line.args.as_slice() else { continue };
            if persistence.eq_ignore_ascii_case("N") {
                return Err(
                    "a transient (N) snapshot keeps its exceptions in memory: they did not survive the restart \
                     (remove it with `udm dm remove`)"
                        .into(),
                );
            }
            let (Ok(cow_dev), Ok(origin_dev)) = (self.registry.device(cow), self.registry.device(origin)) else {
                continue;
            };
            let info = cow_dev.info();
            let contents = cow_dev
                .open_queue(4)
                .map_err(|e| e.to_string())
                .and_then(|mut q| {
                    probe::inspect(q.as_mut(), &info, origin_dev.info().sectors).map_err(|e| e.to_string())
                })
                .map_err(|e| format!("its COW `{cow}` cannot be read: {e}"))?;
            match contents {
                CowContents::Store(s) => marked |= s.merging && line.target == "snapshot",
                CowContents::Blank => {
                    return Err(format!(
                        "its COW `{cow}` holds no snapshot store{}: the snapshot cannot come back (remove it with \
                         `udm dm remove`, or `udm snapshot remove` once its table is a snapshot's again)",
                        self.ram_hint(cow)
                    ))
                }
                CowContents::Unusable(why) => {
                    return Err(format!("its COW `{cow}` no longer holds a usable snapshot store: {why}"))
                }
            }
        }
        Ok(marked)
    }

    /// ` (it was in RAM: mem:64M)` when `device` lies on a RAM backend.
    fn ram_hint(&self, device: &str) -> String {
        let specs = self.backend_specs();
        let mut seen = BTreeSet::new();
        let mut todo = vec![device.to_string()];
        while let Some(d) = todo.pop() {
            if !seen.insert(d.clone()) {
                continue;
            }
            if let Some(spec) = specs.get(&d).filter(|s| s.starts_with("mem:")) {
                return format!(" (it was in RAM: `{spec}` on backend `{d}`)");
            }
            todo.extend(self.registry.deps(&d, TableSlot::Live).unwrap_or_default());
        }
        String::new()
    }
}

/// `0 <size> error` for a table of `table`'s size (`None` if it does not parse).
fn error_table(table: &str) -> Option<String> {
    let size: u64 = parse_table_text(table).ok()?.iter().map(|l| l.length).sum();
    (size > 0).then(|| format!("0 {size} error"))
}

/// The devices named by a table text (arguments that are device names are not known
/// without constructing the targets, so every argument naming a listed device counts).
fn table_refs<'a>(table: &'a str, names: &'a BTreeSet<String>) -> impl Iterator<Item = String> + 'a {
    parse_table_text(table).ok().into_iter().flatten().flat_map(|l| l.args).filter(move |a| names.contains(a))
}

/// Orders devices so that each comes after the devices its tables use (a cycle, which
/// only inactive tables can make, is broken in name order). Among devices that are
/// ready, snapshots come before `snapshot-origin` and `snapshot-merge` devices, LVM's
/// order.
fn dependency_order(devices: Vec<DeviceState>) -> Vec<DeviceState> {
    let names: BTreeSet<String> = devices.iter().map(|d| d.name.clone()).collect();
    let mut waiting: BTreeMap<String, (DeviceState, BTreeSet<String>)> = devices
        .into_iter()
        .map(|d| {
            let uses: BTreeSet<String> = [&d.table, &d.inactive_table]
                .into_iter()
                .flatten()
                .flat_map(|t| table_refs(t, &names).collect::<Vec<_>>())
                .filter(|n| *n != d.name)
                .collect();
            (d.name.clone(), (d, uses))
        })
        .collect();
    let is_origin = |d: &DeviceState| {
        d.table.as_deref().is_some_and(|t| t.contains(" snapshot-origin ") || t.contains(" snapshot-merge "))
    };
    let mut out = Vec::new();
    while !waiting.is_empty() {
        let ready: Vec<String> =
            waiting.iter().filter(|(_, (_, uses))| uses.is_empty()).map(|(n, _)| n.clone()).collect();
        let pick = ready
            .iter()
            .find(|n| !is_origin(&waiting[*n].0))
            .or(ready.first())
            .cloned()
            .unwrap_or_else(|| waiting.keys().next().cloned().unwrap_or_default());
        let Some((d, _)) = waiting.remove(&pick) else { break };
        for (_, uses) in waiting.values_mut() {
            uses.remove(&pick);
        }
        out.push(d);
    }
    out
}

/// Loads the state at `path` (`None`: no file yet).
pub fn load_state(path: &Path) -> Result<Option<StateFile>, StateError> {
    StateFile::load(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::methods::call;
    use serde_json::json;

    #[test]
    fn a_change_that_cannot_be_saved_is_in_effect_and_the_reply_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let d = Daemon::new(vec![]);
        d.set_recording(Recording::On(dir.path().join("gone").join("udm-state.json")));
        let e = call(&d, "backend.add", Some(json!({"name": "m", "spec": "mem:1M"}))).unwrap_err();
        assert!(e.message.contains("in effect, but it is not saved") && e.message.contains("gone"), "{}", e.message);
        assert!(d.registry().device("m").is_ok(), "the change stays");
        // Reports do not write.
        call(&d, "dm.ls", None).unwrap();
        d.set_recording(Recording::On(dir.path().join("udm-state.json")));
        call(&d, "dm.create", Some(json!({"name": "v", "table": "0 8 linear m 0"}))).unwrap();
        let saved = StateFile::load(&dir.path().join("udm-state.json")).unwrap().unwrap();
        assert_eq!(saved.backends[0].spec.as_deref(), Some("mem:1M"));
        assert_eq!(saved.devices[0].table.as_deref(), Some("0 8 linear m 0\n"));
    }

    #[test]
    fn changes_wait_for_the_start_to_finish() {
        let d = Daemon::new(vec![]);
        d.set_recording(Recording::Starting);
        let e = call(&d, "backend.add", Some(json!({"name": "m", "spec": "mem:1M"}))).unwrap_err();
        assert!(e.message.contains("starting"), "{}", e.message);
        assert!(d.registry().device("m").is_err(), "nothing changed");
        call(&d, "dm.ls", None).unwrap();
    }

    #[test]
    fn devices_come_after_what_they_use_and_snapshots_before_origins() {
        let dev = |name: &str, table: &str| DeviceState {
            name: name.into(),
            uuid: None,
            table: Some(table.into()),
            inactive_table: None,
            suspended: false,
        };
        let order = dependency_order(vec![
            dev("a", "0 8 linear b 0"),
            dev("b", "0 8 striped 2 8 c 0 disk 0"),
            dev("c", "0 8 linear disk 0"),
            dev("origin", "0 8 snapshot-origin c"),
            dev("snap", "0 8 snapshot c c 0 P 8"),
        ]);
        let names: Vec<&str> = order.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, ["c", "b", "a", "snap", "origin"]);
    }
}
