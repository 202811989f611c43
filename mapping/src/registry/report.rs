//! What the registry reports: `info`, `table`, `status`, `ls` (flat and as a tree),
//! `deps`.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::error::MappingError;
use crate::registry::{Registry, State, TableSlot};
use crate::table::Table;
use crate::target::DeviceId;

/// What kind of device a name is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    /// A backend registered with `register_backend`.
    Backend,
    /// A mapped device made with `create`.
    Mapped,
}

/// Whether a device admits I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceState {
    /// Serving I/O (or failing it, without a live table).
    Active,
    /// Holding new I/O until resume.
    Suspended,
}

/// `dmsetup info` for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceReport {
    /// Its name.
    pub name: String,
    /// Its UUID, if given at create.
    pub uuid: Option<String>,
    /// Backend or mapped.
    pub kind: DeviceKind,
    /// Active or suspended (backends are always active).
    pub state: DeviceState,
    /// A live table is present.
    pub live_table: bool,
    /// An inactive table is staged.
    pub inactive_table: bool,
    /// Open handles (exports, benchmarks).
    pub open_count: usize,
    /// Devices whose tables use this one.
    pub holders: Vec<String>,
    /// Targets in the live table.
    pub target_count: usize,
    /// Size in sectors.
    pub sectors: u64,
    /// Table events raised by its targets.
    pub event_nr: u64,
    /// Times the live table was replaced.
    pub generation: u64,
}

impl DeviceReport {
    /// dmsetup's `Tables present:` line: `LIVE`, `INACTIVE`, `LIVE & INACTIVE` or `None`.
    pub fn tables_present(&self) -> &'static str {
        match (self.live_table, self.inactive_table) {
            (true, true) => "LIVE & INACTIVE",
            (true, false) => "LIVE",
            (false, true) => "INACTIVE",
            (false, false) => "None",
        }
    }
}

impl Registry {
    /// `dmsetup info`.
    pub fn info(&self, name: &str) -> Result<DeviceReport, MappingError> {
        let st = self.lock();
        let e = st.get(name)?;
        let holders = st.holders_of(e.id);
        let open_count = e.opens.load(Ordering::Acquire);
        Ok(match &e.mapped {
            None => DeviceReport {
                name: name.to_string(),
                uuid: e.uuid.clone(),
                kind: DeviceKind::Backend,
                state: DeviceState::Active,
                live_table: false,
                inactive_table: false,
                open_count,
                holders,
                target_count: 0,
                sectors: e.block.info().sectors,
                event_nr: 0,
                generation: 0,
            },
            Some(m) => {
                let live = m.dev.live_table();
                DeviceReport {
                    name: name.to_string(),
                    uuid: e.uuid.clone(),
                    kind: DeviceKind::Mapped,
                    state: if m.dev.is_suspended() { DeviceState::Suspended } else { DeviceState::Active },
                    live_table: live.is_some(),
                    inactive_table: m.inactive.is_some(),
                    open_count,
                    holders,
                    target_count: live.as_ref().map_or(0, |t| t.len()),
                    sectors: live.as_ref().map_or(0, |t| t.sectors()),
                    event_nr: m.events.get(),
                    generation: m.dev.generation(),
                }
            }
        })
    }

    fn slot_table(st: &State, name: &str, slot: TableSlot) -> Result<Option<Arc<Table>>, MappingError> {
        let m = st.get_mapped(name)?;
        Ok(match slot {
            TableSlot::Live => m.dev.live_table(),
            TableSlot::Inactive => m.inactive.clone(),
        })
    }

    /// `dmsetup table` (or `--inactive`): one line per target, devices by udm name.
    /// Empty when that slot holds no table.
    pub fn table(&self, name: &str, slot: TableSlot) -> Result<String, MappingError> {
        let st = self.lock();
        Ok(Self::slot_table(&st, name, slot)?.map(|t| t.table_text()).unwrap_or_default())
    }

    /// `dmsetup status` (or `--inactive`).
    pub fn status(&self, name: &str, slot: TableSlot) -> Result<String, MappingError> {
        let st = self.lock();
        Ok(Self::slot_table(&st, name, slot)?.map(|t| t.status_text()).unwrap_or_default())
    }

    /// `dmsetup deps`: the devices the table in `slot` uses, in first-use order.
    pub fn deps(&self, name: &str, slot: TableSlot) -> Result<Vec<String>, MappingError> {
        let st = self.lock();
        Ok(Self::slot_table(&st, name, slot)?.map(|t| t.dependency_names()).unwrap_or_default())
    }

    /// `dmsetup ls`: every device, sorted by name.
    pub fn ls(&self) -> Vec<(String, DeviceKind)> {
        let st = self.lock();
        st.entries
            .iter()
            .map(|(n, e)| (n.clone(), if e.mapped.is_some() { DeviceKind::Mapped } else { DeviceKind::Backend }))
            .collect()
    }

    /// `dmsetup ls --tree`: each device nobody uses, with what it uses below it
    /// (live tables, or the inactive one of a device without a live table).
    ///
    /// ```text
    /// vg-base
    /// `-vg-base-real
    ///   `-disk0
    /// ```
    pub fn ls_tree(&self) -> String {
        let st = self.lock();
        let mut out = String::new();
        for e in st.entries.values() {
            if st.holders_of(e.id).is_empty() {
                out.push_str(&e.name.get());
                out.push('\n');
                tree_children(&st, e.id, "", &mut out, &mut vec![e.id]);
            }
        }
        out
    }
}

/// The devices a tree node shows below it.
fn tree_deps(st: &State, id: DeviceId) -> Vec<DeviceId> {
    let Some(e) = st.by_id(id) else { return Vec::new() };
    let Some(m) = &e.mapped else { return Vec::new() };
    match m.dev.live_table().or_else(|| m.inactive.clone()) {
        Some(t) => t.dependency_ids().collect(),
        None => Vec::new(),
    }
}

fn tree_children(st: &State, id: DeviceId, indent: &str, out: &mut String, path: &mut Vec<DeviceId>) {
    let deps = tree_deps(st, id);
    for (i, d) in deps.iter().enumerate() {
        let last = i + 1 == deps.len();
        let name = st.by_id(*d).map_or_else(|| "(removed)".to_string(), |e| e.name.get());
        out.push_str(indent);
        out.push_str(if last { "`-" } else { "|-" });
        out.push_str(&name);
        out.push('\n');
        if !path.contains(d) {
            path.push(*d);
            let child_indent = format!("{indent}{}", if last { "  " } else { "| " });
            tree_children(st, *d, &child_indent, out, path);
            path.pop();
        }
    }
}
