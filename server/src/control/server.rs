//! The control socket listener: one thread accepts, one thread per client connection
//! reads a JSON object per line and writes one response per line.
//!
//! Bounded against a client that misbehaves (or many): at most [`MAX_CLIENTS`]
//! connections (a newcomer beyond that replaces the longest-idle connection that is not
//! in a call, and is refused with an error reply when every one is in a call); a client
//! idle for [`IDLE_TIMEOUT`] is disconnected; a line longer than [`MAX_LINE`] gets one
//! error reply and the connection is closed once the line ends. Stopping wakes the
//! accept loop through an eventfd and shuts every connection down: it never depends on
//! the socket path or on a client.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmm_sys_util::eventfd::EventFd;

use super::methods::call;
use super::protocol::{Request, Response, RpcError, INVALID_REQUEST, OPERATION_FAILED, PARSE_ERROR};
use super::socket_file::{accept_until_stopped, OwnedSocket, SocketAccess};
use crate::daemon::Daemon;

/// Longest request line accepted (tables of thousands of lines fit).
pub const MAX_LINE: usize = 16 << 20;
/// Most client connections at once.
pub const MAX_CLIENTS: usize = 64;
/// A client that sends nothing for this long is disconnected.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A client that does not read its replies for this long is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// After an over-long line, how much more of it is read (and dropped) to reach its end
/// so the client can read the error reply; a client still sending is then cut off.
const MAX_DISCARD: usize = 4 * MAX_LINE;

/// A running control socket.
pub struct ControlServer {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    clients: Arc<Clients>,
    thread: Option<JoinHandle<()>>,
    socket: Option<OwnedSocket>,
}

impl ControlServer {
    /// Listens on `path` with `access` (0600 unless configured). A path in use (another
    /// daemon's socket, an export's) is refused, naming who uses it; a stale socket is
    /// replaced.
    pub fn start(path: &Path, access: &SocketAccess, daemon: Arc<Daemon>) -> std::io::Result<ControlServer> {
        let (listener, socket) = OwnedSocket::bind(path, access, "the control socket")?;
        listener.set_nonblocking(true)?;
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK)?);
        let stop = Arc::new(AtomicBool::new(false));
        let clients = Arc::new(Clients::default());
        let thread = {
            let (stop, wake, clients) = (Arc::clone(&stop), Arc::clone(&wake), Arc::clone(&clients));
            std::thread::Builder::new()
                .name("udm-control".into())
                .spawn(move || accept_loop(&listener, &stop, &wake, &clients, &daemon))?
        };
        Ok(ControlServer { stop, wake, clients, thread: Some(thread), socket: Some(socket) })
    }

    /// Stops accepting, disconnects every client and removes the socket (if it is still
    /// the one created).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.clients.disconnect_all();
        self.socket.take();
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop(
    listener: &UnixListener,
    stop: &AtomicBool,
    wake: &EventFd,
    clients: &Arc<Clients>,
    daemon: &Arc<Daemon>,
) {
    accept_until_stopped(listener, stop, wake, "control socket", |stream| admit(stream, clients, daemon));
}

/// Registers a new connection and starts its thread, or refuses it with an error reply.
fn admit(stream: UnixStream, clients: &Arc<Clients>, daemon: &Arc<Daemon>) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(IDLE_TIMEOUT)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if let Err(e) = setup {
        tracing::warn!("control connection refused: cannot set it up: {e}");
        return;
    }
    let id = match stream.try_clone().map_err(|e| e.to_string()).and_then(|c| clients.admit(c)) {
        Ok(id) => id,
        Err(reason) => {
            tracing::warn!("control connection refused: {reason}");
            reply_error(&stream, RpcError::new(OPERATION_FAILED, reason));
            return;
        }
    };
    let (clients_for_thread, daemon) = (Arc::clone(clients), Arc::clone(daemon));
    let spawned = std::thread::Builder::new()
        .name("udm-control-conn".into())
        .spawn(move || serve_client(stream, id, &clients_for_thread, &daemon));
    if let Err(e) = spawned {
        tracing::warn!("control connection refused: cannot start its thread: {e}");
        clients.close(id);
    }
}

/// Writes one error reply (id null) to a client being turned away.
fn reply_error(mut stream: &UnixStream, error: RpcError) {
    let _ = stream.write_all(encode(&Response::err(Value::Null, error)).as_bytes());
}

/// One client connection as the table of clients sees it.
struct ClientEntry {
    /// A handle to shut the connection down from outside its thread.
    stream: UnixStream,
    /// Executing a call (never evicted then).
    in_call: bool,
    last_active: Instant,
}

/// The live client connections.
#[derive(Default)]
struct Clients {
    table: Mutex<ClientTable>,
}

#[derive(Default)]
struct ClientTable {
    next_id: u64,
    live: BTreeMap<u64, ClientEntry>,
}

impl Clients {
    fn lock(&self) -> MutexGuard<'_, ClientTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection; at the cap, the longest-idle connection not in a call
    /// makes room (it is shut down). Refused when every connection is in a call.
    fn admit(&self, stream: UnixStream) -> Result<u64, String> {
        let mut t = self.lock();
        if t.live.len() >= MAX_CLIENTS {
            let idle = t.live.iter().filter(|(_, c)| !c.in_call).min_by_key(|(_, c)| c.last_active).map(|(id, _)| *id);
            let Some(victim) = idle else {
                return Err(format!(
                    "too many control connections: all {MAX_CLIENTS} are executing calls; retry when one finishes"
                ));
            };
            if let Some(c) = t.live.remove(&victim) {
                tracing::info!(connection = victim, "control connection limit reached: closing the longest-idle one");
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
            }
        }
        t.next_id += 1;
        let id = t.next_id;
        t.live.insert(id, ClientEntry { stream, in_call: false, last_active: Instant::now() });
        Ok(id)
    }

    /// Marks `id` as executing a call; false if it was closed meanwhile.
    fn begin_call(&self, id: u64) -> bool {
        match self.lock().live.get_mut(&id) {
            Some(c) => {
                c.in_call = true;
                true
            }
            None => false,
        }
    }

    fn end_call(&self, id: u64) {
        if let Some(c) = self.lock().live.get_mut(&id) {
            c.in_call = false;
            c.last_active = Instant::now();
        }
    }

    fn close(&self, id: u64) {
        self.lock().live.remove(&id);
    }

    fn disconnect_all(&self) {
        for (_, c) in std::mem::take(&mut self.lock().live) {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// What reading one request line gave.
enum LineRead {
    /// A line (without its newline, or the last bytes before the client closed).
    Line,
    /// The client closed (or timed out, or was shut down).
    End,
    /// Longer than [`MAX_LINE`]: the rest was not read.
    TooLong,
}

fn read_line(reader: &mut BufReader<UnixStream>, buf: &mut Vec<u8>) -> LineRead {
    buf.clear();
    match reader.by_ref().take(MAX_LINE as u64 + 1).read_until(b'\n', buf) {
        Ok(0) | Err(_) => LineRead::End,
        Ok(_) if buf.last() == Some(&b'\n') => LineRead::Line,
        Ok(n) if n > MAX_LINE => LineRead::TooLong,
        Ok(_) => LineRead::Line,
    }
}

/// Reads and drops the rest of an over-long line, up to [`MAX_DISCARD`] bytes.
fn discard_rest_of_line(reader: &mut BufReader<UnixStream>) {
    let mut left = MAX_DISCARD;
    while left > 0 {
        let Ok(chunk) = reader.fill_buf() else { return };
        if chunk.is_empty() {
            return;
        }
        let n = chunk.len().min(left);
        if let Some(pos) = chunk[..n].iter().position(|&b| b == b'\n') {
            reader.consume(pos + 1);
            return;
        }
        reader.consume(n);
        left -= n;
    }
}

fn serve_client(stream: UnixStream, id: u64, clients: &Clients, daemon: &Daemon) {
    serve_lines(stream, id, clients, daemon);
    clients.close(id);
}

fn serve_lines(stream: UnixStream, id: u64, clients: &Clients, daemon: &Daemon) {
    let Ok(mut out) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &mut line) {
            LineRead::End => return,
            LineRead::TooLong => {
                tracing::warn!(connection = id, "control request longer than {MAX_LINE} bytes: refused, closing");
                let error = RpcError::new(
                    INVALID_REQUEST,
                    format!(
                        "request line longer than {} MiB: refused and the connection closed; \
                         split the request (e.g. load a long table in parts with dm load)",
                        MAX_LINE >> 20
                    ),
                );
                if out.write_all(encode(&Response::err(Value::Null, error)).as_bytes()).is_ok() {
                    discard_rest_of_line(&mut reader);
                }
                return;
            }
            LineRead::Line => {}
        }
        if line.trim_ascii().is_empty() {
            continue;
        }
        if !clients.begin_call(id) {
            return;
        }
        let resp = match std::str::from_utf8(&line) {
            Ok(text) => handle_line(daemon, text),
            Err(e) => Some(Response::err(Value::Null, RpcError::new(PARSE_ERROR, format!("invalid UTF-8: {e}")))),
        };
        clients.end_call(id);
        let Some(resp) = resp else { continue };
        if out.write_all(encode(&resp).as_bytes()).is_err() {
            return;
        }
    }
}

/// A response as one line.
fn encode(resp: &Response) -> String {
    let mut text = serde_json::to_string(resp).unwrap_or_else(|_| {
        r#"{"jsonrpc":"2.0","error":{"code":-32603,"message":"internal error encoding the response"},"id":null}"#.into()
    });
    text.push('\n');
    text
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
