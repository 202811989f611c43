//! `udm serve` as a child process of a test, with its log collected as it arrives, and
//! the `udm` CLI as that daemon's client. The binary is the one of the same build
//! (cargo puts the workspace's binaries beside the test executables' `deps/` folder).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The `udm` binary built with this test (same profile directory).
pub fn udm_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's own path");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let udm = profile_dir.join("udm");
    assert!(
        udm.is_file(),
        "{} is missing: build it first with `cargo build -p udm-server` (same profile)",
        udm.display()
    );
    udm
}

/// A running `udm serve`; killed (SIGKILL) when dropped.
pub struct UdmProcess {
    child: Child,
    dir: PathBuf,
    log: Arc<Mutex<String>>,
}

/// `RUST_LOG` for the daemon: `$UDM_TEST_LOG`, else warnings plus the export's info
/// lines (connections, requests redone after a restart).
fn log_filter() -> String {
    std::env::var("UDM_TEST_LOG").unwrap_or_else(|_| "warn,udm_server::vhost_blk=info".into())
}

impl UdmProcess {
    /// Starts `udm serve <args>` in `dir` and waits until it serves (its banner's last
    /// line); the control socket is `dir/udm.ctl` unless the config says otherwise.
    pub fn start(dir: &Path, args: &[&str]) -> UdmProcess {
        let mut child = Command::new(udm_binary())
            .arg("serve")
            .args(args)
            .env("RUST_LOG", log_filter())
            .env("NO_COLOR", "1")
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("udm serve starts");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = BufReader::new(child.stderr.take().expect("stderr is piped"));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&strip_ansi(&line));
                l.push('\n');
            }
        });
        let mut lines = BufReader::new(child.stdout.take().expect("stdout is piped")).lines();
        let mut banner = String::new();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("stop with") => break,
                Some(Ok(line)) => banner.push_str(&line),
                _ => {
                    let _ = child.wait();
                    panic!(
                        "udm serve exited before serving: {banner}\n{}",
                        log.lock().unwrap_or_else(|e| e.into_inner())
                    )
                }
            }
        }
        // Keep reading so the daemon's later output never hits a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        UdmProcess { child, dir: dir.to_path_buf(), log }
    }

    /// SIGKILL: no drain, no flush, nothing completed on the way out.
    pub fn kill(mut self) {
        self.kill_now();
    }

    fn kill_now(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Everything the daemon logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The first log line containing `needle`, waiting up to `timeout` for it (panics
    /// with the whole log if it never comes).
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            assert!(Instant::now() < deadline, "udm never logged `{needle}`; its log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `udm <args>` (a CLI client) in the daemon's directory.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(udm_binary()).args(args).current_dir(&self.dir).output().expect("udm runs")
    }

    /// Runs `udm <args>`, panics unless it succeeds, returns its standard output.
    #[track_caller]
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(out.status.success(), "udm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `udm <args> --json` and parses what it printed.
    #[track_caller]
    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.push("--json");
        let text = self.cli_ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("udm {all:?} printed no JSON ({e}): {text}"))
    }
}

impl Drop for UdmProcess {
    fn drop(&mut self) {
        self.kill_now();
    }
}

/// `line` without terminal colour sequences (`ESC [ ... letter`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_sequences_are_removed() {
        assert_eq!(strip_ansi("\x1b[2m2026\x1b[0m \x1b[32m INFO\x1b[0m count\x1b[2m=\x1b[0m3"), "2026  INFO count=3");
    }
}
