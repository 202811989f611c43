//! The control socket listener: one thread accepts, one thread per client connection
//! reads a JSON object per line and writes one response per line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde_json::Value;

use super::methods::call;
use super::protocol::{Request, Response, RpcError, INVALID_REQUEST, PARSE_ERROR};
use crate::daemon::Daemon;

/// Longest request line accepted (tables of thousands of lines fit).
const MAX_LINE: u64 = 16 << 20;

/// A running control socket.
pub struct ControlServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ControlServer {
    /// Listens on `path` (mode 0600; a stale socket there is replaced).
    pub fn start(path: &Path, daemon: Arc<Daemon>) -> std::io::Result<ControlServer> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if !meta.file_type().is_socket() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "{} exists and is not a socket: remove it or choose another --control path",
                        path.display()
                    ),
                ));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::AddrInUse,
                    format!("another udm already serves {}", path.display()),
                ));
            }
            std::fs::remove_file(path)?;
        }
        let listener = UnixListener::bind(path)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new().name("udm-control".into()).spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    match conn {
                        Ok(s) => {
                            let d = Arc::clone(&daemon);
                            let _ = std::thread::Builder::new()
                                .name("udm-control-conn".into())
                                .spawn(move || serve_client(s, &d));
                        }
                        Err(e) => tracing::warn!("control socket accept failed: {e}"),
                    }
                }
            })?
        };
        Ok(ControlServer { path: path.to_path_buf(), stop, thread: Some(thread) })
    }

    /// Stops accepting and removes the socket.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Wake the blocking accept.
        let _ = UnixStream::connect(&self.path);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn serve_client(stream: UnixStream, daemon: &Daemon) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        line.clear();
        match (&mut reader).take(MAX_LINE).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let Some(resp) = handle_line(daemon, &line) else { continue };
        let mut text = serde_json::to_string(&resp).unwrap_or_else(|_| {
            r#"{"jsonrpc":"2.0","error":{"code":-32603,"message":"internal error encoding the response"},"id":null}"#
                .into()
        });
        text.push('\n');
        if out.write_all(text.as_bytes()).is_err() {
            return;
        }
    }
}

/// Handles one line; `None` for a notification (no id), which gets no response.
pub fn handle_line(daemon: &Daemon, line: &str) -> Option<Response> {
    let value: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return Some(Response::err(Value::Null, RpcError::new(PARSE_ERROR, format!("invalid JSON: {e}")))),
    };
    let id = value.get("id").cloned().unwrap_or(Value::Null);
    let req: Request = match serde_json::from_value(value) {
        Ok(r) => r,
        Err(e) => {
            return Some(Response::err(id, RpcError::new(INVALID_REQUEST, format!("not a JSON-RPC request: {e}"))))
        }
    };
    if req.jsonrpc != "2.0" {
        return Some(Response::err(id, RpcError::new(INVALID_REQUEST, "jsonrpc must be \"2.0\"")));
    }
    let span = tracing::info_span!("control", method = %req.method);
    let _enter = span.enter();
    let result = call(daemon, &req.method, req.params);
    if let Err(e) = &result {
        tracing::info!("refused: {}", e.message);
    }
    let id = req.id?;
    Some(match result {
        Ok(v) => Response::ok(id, v),
        Err(e) => Response::err(id, e),
    })
}
