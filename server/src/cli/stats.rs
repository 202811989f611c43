//! `udm stats`: I/O counters and latency percentiles per export and queue.

use std::process::ExitCode;

use clap::Args;
use serde_json::{json, Value};

use super::common::{field, run, table, ControlOpts};

/// Arguments of `udm stats`.
#[derive(Debug, Args)]
pub struct StatsArgs {
    /// Export name (all if omitted).
    name: Option<String>,
    #[command(flatten)]
    ctl: ControlOpts,
}

/// Runs `udm stats`.
pub fn main(args: StatsArgs) -> ExitCode {
    run(&args.ctl, "stats", json!({"name": args.name}), render)
}

fn row(export: &str, device: &str, queue: &str, s: &Value) -> Vec<String> {
    let n = |k: &str| s[k].as_u64().unwrap_or(0);
    let lat = |i: usize| s["latency_us"][i].as_f64().map_or("-".into(), |v| format!("{v:.1}"));
    vec![
        export.into(),
        device.into(),
        queue.into(),
        n("reads").to_string(),
        n("writes").to_string(),
        format!("{:.1}", n("bytes_read") as f64 / 1048576.0),
        format!("{:.1}", n("bytes_written") as f64 / 1048576.0),
        (n("flushes") + n("discards") + n("write_zeroes")).to_string(),
        n("errors").to_string(),
        n("rejected").to_string(),
        lat(0),
        lat(1),
        lat(2),
        lat(3),
    ]
}

fn render(v: &Value) -> String {
    let mut rows = Vec::new();
    for e in v.as_array().into_iter().flatten() {
        let (name, dev) = (field(e, "export"), field(e, "device"));
        rows.push(row(&name, &dev, "all", &e["total"]));
        for (i, q) in e["queues"].as_array().into_iter().flatten().enumerate() {
            rows.push(row(&name, &dev, &i.to_string(), q));
        }
    }
    table(
        &[
            "EXPORT", "DEVICE", "QUEUE", "READS", "WRITES", "MiB_RD", "MiB_WR", "OTHER", "ERRORS", "REFUSED", "P50us",
            "P99us", "P99.9us", "MAXus",
        ],
        &rows,
    )
}
