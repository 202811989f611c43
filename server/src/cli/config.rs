//! `udm config save` (the daemon's state as a udm.toml that recreates it) and `udm
//! config check FILE` (a udm.toml validated without applying anything).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use udm_server::control::methods::config_check;
use udm_server::daemon::config::Config;

use super::common::{run, ControlOpts};

/// Arguments of `udm config`.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
    #[command(flatten)]
    ctl: ControlOpts,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Print the running daemon's state as a udm.toml that recreates it.
    Save,
    /// Validate a udm.toml (syntax, names, references, tables, backend specs) without
    /// applying it; needs no daemon. Exit status 1 if it has problems.
    Check {
        /// The file.
        file: PathBuf,
    },
}

/// Runs `udm config`.
pub fn main(args: ConfigArgs) -> ExitCode {
    match args.command {
        ConfigCommand::Save => run(&args.ctl, "config.save", json!({}), render_toml),
        ConfigCommand::Check { file } => check(&file, args.ctl.json),
    }
}

fn render_toml(v: &Value) -> String {
    match serde_json::from_value::<Config>(v.clone()).map_err(|e| e.to_string()).and_then(|c| c.to_toml()) {
        Ok(text) => format!("# udm.toml written by `udm config save`\n{text}"),
        Err(e) => format!("# cannot render the state as TOML ({e}); as JSON:\n{v}\n"),
    }
}

fn check(file: &std::path::Path, as_json: bool) -> ExitCode {
    let result = match std::fs::read_to_string(file) {
        Ok(text) => config_check(&text, &file.display().to_string()),
        Err(e) => json!({"ok": false, "problems": [format!("cannot read {}: {e}", file.display())]}),
    };
    let ok = result["ok"].as_bool().unwrap_or(false);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&result).unwrap_or_default());
    } else if ok {
        println!("{}: ok", file.display());
    } else {
        for p in result["problems"].as_array().into_iter().flatten() {
            eprintln!("{}: {}", file.display(), p.as_str().unwrap_or_default());
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
