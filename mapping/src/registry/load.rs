//! Building a table from text for one mapped device: parse, construct every target
//! (resolving device names, refusing cycles), check alignment. On any error every
//! target already constructed is destroyed and nothing else changes.

use std::sync::Arc;

use crate::error::TableError;
use crate::registry::State;
use crate::table::{BuiltSegment, Table};
use crate::table_text::parse_table_text;
use crate::target::{ConstructCtx, DeviceId, DeviceResolver, EventCounter, Extensions, ResolvedDevice};
use crate::targets::TargetTypes;

/// Resolves names against the registry for a table being loaded into `loading`.
struct Resolver<'a> {
    state: &'a State,
    loading: DeviceId,
}

impl DeviceResolver for Resolver<'_> {
    fn resolve(&self, name: &str) -> Option<ResolvedDevice> {
        let e = self.state.entries.get(name)?;
        let (size, info) = match &e.mapped {
            None => {
                let info = e.block.info();
                (Some(info.sectors), info)
            }
            Some(m) => match m.dev.live_table().or_else(|| m.inactive.clone()) {
                Some(t) => (Some(t.sectors()), t.info().clone()),
                None => (None, e.block.info()),
            },
        };
        Some(ResolvedDevice { id: e.id, name: e.name.clone(), device: Arc::clone(&e.block), size, info })
    }

    fn cycle_path(&self, id: DeviceId) -> Option<String> {
        let mut path = Vec::new();
        if self.reaches(id, &mut path) {
            let mut names: Vec<String> = vec![self.name_of(self.loading)];
            names.extend(path.iter().map(|&d| self.name_of(d)));
            return Some(names.join(" -> "));
        }
        None
    }
}

impl Resolver<'_> {
    fn name_of(&self, id: DeviceId) -> String {
        self.state.by_id(id).map_or_else(|| "?".into(), |e| e.name.get())
    }

    /// Whether `id` is the loading device or depends on it; fills `path` with the chain.
    fn reaches(&self, id: DeviceId, path: &mut Vec<DeviceId>) -> bool {
        if path.contains(&id) {
            return false;
        }
        path.push(id);
        if id == self.loading {
            return true;
        }
        for dep in self.state.dependencies_of(id) {
            if self.reaches(dep, path) {
                return true;
            }
        }
        path.pop();
        false
    }
}

/// Builds the table `text` for the mapped device `name` (id `id`).
pub(crate) fn build_table(
    state: &State,
    types: &TargetTypes,
    extensions: &Extensions,
    name: &str,
    id: DeviceId,
    events: &EventCounter,
    text: &str,
) -> Result<Table, TableError> {
    let lines = parse_table_text(text)?;
    let resolver = Resolver { state, loading: id };
    let mut built: Vec<(usize, BuiltSegment)> = Vec::with_capacity(lines.len());
    let fail = |built: Vec<(usize, BuiltSegment)>, e: TableError| {
        for (_, b) in &built {
            b.target.destroy();
        }
        Err(e)
    };
    for line in &lines {
        let Some(tt) = types.get(&line.target) else {
            let e = TableError::UnknownTarget { line: line.line, name: line.target.clone(), known: types.names() };
            return fail(built, e);
        };
        let mut ctx = ConstructCtx::new(name, line.start, line.length, &resolver, extensions, events.clone());
        match tt.construct(&mut ctx, &line.args) {
            Ok(target) => built.push((
                line.line,
                BuiltSegment { start: line.start, length: line.length, target, devices: ctx.devices },
            )),
            Err(error) => {
                let e = TableError::Target { line: line.line, target: line.target.clone(), error: Box::new(error) };
                return fail(built, e);
            }
        }
    }
    let block = built
        .iter()
        .flat_map(|(_, b)| b.devices.iter().map(|d| d.info().logical_block_size))
        .max()
        .unwrap_or(512)
        .max(512);
    let block_sectors = u64::from(block / 512);
    for (line, b) in &built {
        if !b.start.is_multiple_of(block_sectors) || !b.length.is_multiple_of(block_sectors) {
            let e = TableError::Unaligned { line: *line, start: b.start, length: b.length, block_size: block };
            return fail(built, e);
        }
    }
    Ok(Table::new(built.into_iter().map(|(_, b)| b).collect()))
}
