//! A `udm serve` child process for tests that drive the real binary, with deadlines on
//! everything that could hang on a regression (so a test fails instead of hanging CI).
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

pub const UDM: &str = env!("CARGO_BIN_EXE_udm");

/// How long anything that should answer at once may take before the test calls it hung.
pub const HUNG: Duration = Duration::from_secs(20);

/// A running `udm serve`, killed (SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
}

/// How to start it.
#[derive(Default)]
pub struct Start<'a> {
    pub args: &'a [&'a str],
    /// Run under this umask instead of the test's.
    pub umask: Option<libc::mode_t>,
}

impl Daemon {
    /// Starts `udm serve` in `dir` and waits for its banner.
    pub fn start(dir: &Path, how: Start<'_>) -> Daemon {
        let args = how.args;
        Self::try_start(dir, how).unwrap_or_else(|e| panic!("udm serve {args:?} did not start: {e}"))
    }

    /// As [`Daemon::start`]; `Err(stderr)` when it exits during start-up.
    pub fn try_start(dir: &Path, how: Start<'_>) -> Result<Daemon, String> {
        let mut cmd = serve_command(dir, how);
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("udm runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            match lines.next() {
                Some(Ok(line)) if line.starts_with("stop with") => break,
                Some(_) => {}
                None => {
                    let out = child.wait_with_output().unwrap();
                    assert!(!out.status.success(), "a failed start exits non-zero");
                    return Err(String::from_utf8_lossy(&out.stderr).into());
                }
            }
        }
        // Keep reading so the daemon's later output never hits a closed pipe; its log
        // goes on to the test's stderr.
        std::thread::spawn(move || lines.for_each(drop));
        let mut log = child.stderr.take().unwrap();
        std::thread::spawn(move || std::io::copy(&mut log, &mut std::io::stderr()));
        Ok(Daemon { child, dir: dir.to_path_buf() })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `udm ARGS` against this daemon; fails the test if it does not return.
    pub fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let child = Command::new(UDM)
            .args(args)
            .current_dir(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = output_within(child, HUNG).unwrap_or_else(|| panic!("udm {args:?} hung"));
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    /// `cli`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "udm {args:?} failed: {err}");
        out
    }

    /// `cli`, which must fail; its stderr.
    pub fn refused(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(!ok, "udm {args:?} should have been refused: {out}");
        err
    }

    /// Sends `sig` and waits for the exit; fails the test if the daemon does not exit.
    pub fn signal(&mut self, sig: i32) -> ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        wait_within(&mut self.child, HUNG).unwrap_or_else(|| panic!("udm serve did not exit on signal {sig}"))
    }

    /// Threads the daemon runs now.
    pub fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid())).unwrap().count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `udm serve` in `dir`, output inherited.
pub fn serve_command(dir: &Path, how: Start<'_>) -> Command {
    let mut cmd = Command::new(UDM);
    cmd.arg("serve").args(how.args).current_dir(dir).stderr(Stdio::inherit());
    if let Some(mask) = how.umask {
        // SAFETY: umask is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(mask);
                Ok(())
            });
        }
    }
    cmd
}

/// Waits for `child` to exit, at most `limit`.
pub fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// The output of `child` once it exits, or `None` (and the child killed) past `limit`.
pub fn output_within(mut child: Child, limit: Duration) -> Option<Output> {
    fn drain(p: Option<impl std::io::Read + Send + 'static>) -> Option<std::thread::JoinHandle<Vec<u8>>> {
        p.map(|mut p| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = p.read_to_end(&mut buf);
                buf
            })
        })
    }
    let mut pipes = [drain(child.stdout.take()), drain(child.stderr.take())];
    let Some(status) = wait_within(&mut child, limit) else {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    };
    let mut take = |i: usize| pipes[i].take().map(|t| t.join().unwrap()).unwrap_or_default();
    Some(Output { status, stdout: take(0), stderr: take(1) })
}

/// Polls `cond` until it holds; fails the test after [`HUNG`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let until = Instant::now() + HUNG;
    while !cond() {
        assert!(Instant::now() < until, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Permission bits of a file.
pub fn mode_of(p: &Path) -> u32 {
    std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).unwrap().permissions()) & 0o777
}
