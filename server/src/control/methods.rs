//! Method dispatch: each method has a params struct (unknown fields refused), so a
//! malformed call is an INVALID_PARAMS error before anything is touched.
//!
//! Every method that changes something ([`CHANGES`]) writes the state file once it has
//! succeeded and before the reply says ok. If that write fails, the change is not
//! rolled back (undoing an export removal or a merge is not simple and could fail in
//! turn): the reply is an error saying the change is in effect but not saved, and why;
//! the next change that is saved records it too.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::protocol::{RpcError, INVALID_PARAMS, METHOD_NOT_FOUND, OPERATION_FAILED};
use crate::daemon::config::Config;
use crate::daemon::{CowMode, Daemon, DaemonError};
use crate::vhost_blk::ExportConfig;

/// Every method, for `help`-style listings and tests.
pub const METHODS: &[&str] = &[
    "backend.add",
    "backend.remove",
    "backend.ls",
    "dm.create",
    "dm.load",
    "dm.suspend",
    "dm.resume",
    "dm.clear",
    "dm.remove",
    "dm.rename",
    "dm.info",
    "dm.table",
    "dm.status",
    "dm.ls",
    "dm.deps",
    "snapshot.create",
    "snapshot.remove",
    "snapshot.merge",
    "snapshot.list",
    "export.add",
    "export.remove",
    "export.ls",
    "stats",
    "config.save",
    "config.check",
];

/// The methods that change the daemon's state (and so write the state file).
pub const CHANGES: &[&str] = &[
    "backend.add",
    "backend.remove",
    "dm.create",
    "dm.load",
    "dm.suspend",
    "dm.resume",
    "dm.clear",
    "dm.remove",
    "dm.rename",
    "snapshot.create",
    "snapshot.remove",
    "snapshot.merge",
    "export.add",
    "export.remove",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Name {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptName {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendAdd {
    name: String,
    spec: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendRemove {
    name: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmCreate {
    name: String,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    table: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmLoad {
    name: String,
    table: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmSuspend {
    name: String,
    #[serde(default)]
    noflush: bool,
    /// Seconds to wait for the device to drain (default: as long as it takes).
    #[serde(default)]
    timeout: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmRemove {
    name: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmRename {
    name: String,
    new_name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmTable {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    inactive: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmDeps {
    name: String,
    #[serde(default)]
    inactive: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DmLs {
    #[serde(default)]
    tree: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SnapCreate {
    origin: String,
    name: String,
    cow: String,
    #[serde(default = "default_chunk")]
    chunk: String,
    /// Re-attach the store a COW holds.
    #[serde(default)]
    attach: bool,
    /// Re-initialise a COW that already holds something.
    #[serde(default)]
    reinit: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigCheck {
    /// The udm.toml text.
    text: String,
    /// Where it came from, for messages.
    #[serde(default)]
    path: Option<String>,
}

fn default_chunk() -> String {
    "4k".into()
}

fn params<T: DeserializeOwned>(p: Option<Value>) -> Result<T, RpcError> {
    let v = match p {
        None | Some(Value::Null) => json!({}),
        Some(v @ Value::Object(_)) => v,
        Some(_) => return Err(RpcError::new(INVALID_PARAMS, "params must be an object of named parameters")),
    };
    serde_json::from_value(v).map_err(|e| RpcError::new(INVALID_PARAMS, format!("invalid params: {e}")))
}

fn failed(e: DaemonError) -> RpcError {
    RpcError::new(OPERATION_FAILED, e.to_string())
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| RpcError::new(OPERATION_FAILED, format!("cannot encode the result: {e}")))
}

/// Runs one method; a change is saved to the state file before this returns ok.
pub fn call(d: &Daemon, method: &str, p: Option<Value>) -> Result<Value, RpcError> {
    let changes = CHANGES.contains(&method);
    if changes && d.is_starting() {
        return Err(RpcError::new(
            OPERATION_FAILED,
            "udm is starting (rebuilding its state): nothing was changed; retry once `udm serve` says it is serving",
        ));
    }
    let result = dispatch(d, method, p)?;
    if changes {
        d.save_state().map_err(|e| {
            RpcError::new(
                OPERATION_FAILED,
                format!(
                    "{method} is done and in effect, but it is not saved: {e}. A restart now would not bring it \
                     back; fix the cause (space, permissions on the state file's directory), then any change that \
                     succeeds saves the whole state again"
                ),
            )
        })?;
    }
    Ok(result)
}

/// The result of `config.check`: the problems found (none: the file is good).
pub fn config_check(text: &str, origin: &str) -> Value {
    let problems = match Config::parse(text, std::path::Path::new(origin)) {
        Ok(c) => c.check(),
        Err(e) => vec![e.to_string()],
    };
    json!({"ok": problems.is_empty(), "problems": problems})
}

fn dispatch(d: &Daemon, method: &str, p: Option<Value>) -> Result<Value, RpcError> {
    let done = |r: Result<(), DaemonError>| r.map(|()| Value::Null).map_err(failed);
    match method {
        "backend.add" => {
            let a: BackendAdd = params(p)?;
            done(d.backend_add(&a.name, &a.spec))
        }
        "backend.remove" => {
            let a: BackendRemove = params(p)?;
            done(d.backend_remove(&a.name, a.force))
        }
        "backend.ls" => to_value(d.backend_ls(params::<OptName>(p)?.name.as_deref()).map_err(failed)?),
        "dm.create" => {
            let a: DmCreate = params(p)?;
            done(d.dm_create(&a.name, a.uuid.as_deref(), a.table.as_deref()))
        }
        "dm.load" => {
            let a: DmLoad = params(p)?;
            done(d.dm_load(&a.name, &a.table))
        }
        "dm.suspend" => {
            let a: DmSuspend = params(p)?;
            let timeout = a
                .timeout
                .map(|secs| {
                    Duration::try_from_secs_f64(secs).map_err(|_| {
                        RpcError::new(INVALID_PARAMS, format!("timeout {secs} is not a number of seconds >= 0"))
                    })
                })
                .transpose()?;
            done(d.dm_suspend(&a.name, a.noflush, timeout))
        }
        "dm.resume" => done(d.dm_resume(&params::<Name>(p)?.name)),
        "dm.clear" => done(d.dm_clear(&params::<Name>(p)?.name)),
        "dm.remove" => {
            let a: DmRemove = params(p)?;
            done(d.dm_remove(&a.name, a.force))
        }
        "dm.rename" => {
            let a: DmRename = params(p)?;
            done(d.dm_rename(&a.name, &a.new_name))
        }
        "dm.info" => to_value(d.dm_info(params::<OptName>(p)?.name.as_deref()).map_err(failed)?),
        "dm.table" | "dm.status" => {
            let a: DmTable = params(p)?;
            let rows = d.dm_table(a.name.as_deref(), method == "dm.status", a.inactive).map_err(failed)?;
            to_value(rows.into_iter().map(|(name, text)| json!({"name": name, "text": text})).collect::<Vec<_>>())
        }
        "dm.ls" => d.dm_ls(params::<DmLs>(p)?.tree).map_err(failed),
        "dm.deps" => {
            let a: DmDeps = params(p)?;
            to_value(d.dm_deps(&a.name, a.inactive).map_err(failed)?)
        }
        "snapshot.create" => {
            let a: SnapCreate = params(p)?;
            done(d.snapshot_create(
                &a.origin,
                &a.name,
                &a.cow,
                &a.chunk,
                CowMode { attach: a.attach, reinit: a.reinit },
            ))
        }
        "snapshot.remove" => done(d.snapshot_remove(&params::<Name>(p)?.name)),
        "snapshot.merge" => done(d.snapshot_merge(&params::<Name>(p)?.name)),
        "snapshot.list" => {
            params::<OptName>(p)?;
            to_value(d.snapshot_list())
        }
        "export.add" => {
            let cfg: ExportConfig = params(p)?;
            to_value(d.export_add(cfg).map_err(failed)?)
        }
        "export.remove" => done(d.export_remove(&params::<Name>(p)?.name)),
        "export.ls" => {
            params::<OptName>(p)?;
            to_value(d.export_ls())
        }
        "stats" => to_value(d.stats(params::<OptName>(p)?.name.as_deref()).map_err(failed)?),
        "config.save" => {
            params::<OptName>(p)?;
            to_value(Config::embedded_default().from_state(&d.capture()))
        }
        "config.check" => {
            let a: ConfigCheck = params(p)?;
            Ok(config_check(&a.text, a.path.as_deref().unwrap_or("(config text)")))
        }
        other => Err(RpcError::new(
            METHOD_NOT_FOUND,
            format!("unknown method `{other}`: known methods are {}", METHODS.join(", ")),
        )),
    }
}
