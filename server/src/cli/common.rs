//! What every control-socket subcommand shares: where the daemon is, `--json`, calling
//! a method and printing human tables.

use std::io::{IsTerminal, Read};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use serde_json::Value;
use udm_server::control::Client;

/// Options of every control-socket subcommand.
#[derive(Debug, Args)]
pub struct ControlOpts {
    /// The daemon's control socket.
    #[arg(long, global = true, env = "UDM_CONTROL", default_value = "udm.ctl")]
    pub control: PathBuf,
    /// Print the daemon's JSON result instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// Calls `method` and renders the result with `human` (or as JSON with --json).
pub fn run(opts: &ControlOpts, method: &str, params: Value, human: impl FnOnce(&Value) -> String) -> ExitCode {
    let result = Client::connect(&opts.control).and_then(|mut c| c.call(method, params));
    match result {
        Ok(v) => {
            if opts.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else {
                let text = human(&v);
                if !text.is_empty() {
                    print!("{text}");
                    if !text.ends_with('\n') {
                        println!();
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("udm: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Nothing to print on success (dmsetup prints nothing either).
pub fn quiet(_: &Value) -> String {
    String::new()
}

/// A table text from `--table`, `--file` or standard input (when it is not a terminal).
pub fn table_text(table: Option<String>, file: Option<PathBuf>) -> Result<Option<String>, String> {
    if let Some(t) = table {
        return Ok(Some(t));
    }
    if let Some(f) = file {
        return std::fs::read_to_string(&f).map(Some).map_err(|e| format!("cannot read {}: {e}", f.display()));
    }
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Ok(None);
    }
    let mut s = String::new();
    stdin.lock().read_to_string(&mut s).map_err(|e| format!("cannot read the table from stdin: {e}"))?;
    Ok((!s.trim().is_empty()).then_some(s))
}

/// Left-aligned columns, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect::<Vec<_>>().join("  ");
        s.truncate(s.trim_end().len());
        s.push('\n');
        s
    };
    let mut out = line(headers.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// A JSON field as text.
pub fn field(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// Reports a usage error the way the daemon's refusals are reported.
pub fn usage_error(msg: String) -> ExitCode {
    eprintln!("udm: {msg}");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_line_up() {
        let t = table(&["A", "LONG"], &[vec!["xyz".into(), "1".into()]]);
        assert_eq!(t, "A    LONG\nxyz  1\n");
    }
}
