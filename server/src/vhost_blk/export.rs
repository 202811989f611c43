//! An export: one block device served as vhost-user-blk on one unix socket.
//!
//! A listener thread accepts one front end at a time and runs the vhost-user message
//! loop for it; when the front end goes away (or udm's previous process died and QEMU
//! reconnects), the next connection starts from scratch, except for what the front end
//! brings back itself: the inflight region that says which requests to redo.

use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use udm_drivers::{BlockDevice, DeviceInfo};
use vhost::vhost_user::BackendReqHandler;
use vmm_sys_util::eventfd::EventFd;

use crate::control::socket_file::{accept_until_stopped, OwnedSocket, SocketAccess, SocketMode};

use super::backend_channel::{peek_backend_channel, send_config_change};
use super::config_space::Limits;
use super::handler::BlkHandler;
use super::inflight::MAX_QUEUE_SIZE;
use super::request::ID_BYTES;
use super::stats::{QueueSnapshot, QueueStats};
use super::worker::{PollMode, Shared};

/// How to export a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportConfig {
    /// Name of the export (unique in the daemon).
    pub name: String,
    /// Path of the vhost-user socket.
    pub socket: PathBuf,
    /// Name of the device in the registry.
    pub device: String,
    /// Request virtqueues (1..=64).
    #[serde(default = "default_queues")]
    pub num_queues: u16,
    /// Largest ring size the front end may choose: a power of two up to 32768 (the
    /// virtio limit); default 1024, the most QEMU's `queue-size` takes. Each queue's
    /// request table is sized by the ring the front end actually sets up.
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    /// Refuse writes even if the device takes them.
    #[serde(default)]
    pub read_only: bool,
    /// Idle strategy of the queue workers.
    #[serde(default)]
    pub poll: PollMode,
    /// In event mode, the longest a worker keeps polling an empty queue before it sleeps,
    /// in microseconds (adapted between 0 and this, like QEMU's `poll-max-ns`; 0 turns
    /// polling off).
    #[serde(default = "default_idle_poll_us")]
    pub idle_poll_us: u32,
    /// CPUs the queue workers are pinned to, queue i on cpus[i % len] (empty: unpinned).
    #[serde(default)]
    pub cpus: Vec<usize>,
    /// Serial number (GET_ID), at most 20 bytes; defaults to the export name.
    #[serde(default)]
    pub serial: Option<String>,
    /// Permissions of the socket file (default 0600: udm's user only); e.g. `"0660"`
    /// with `socket_group` for a QEMU running as another user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_mode: Option<SocketMode>,
    /// Group of the socket file (name or number; default: udm's group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket_group: Option<String>,
}

impl ExportConfig {
    /// What is wrong with `queue_size`, if anything.
    pub fn queue_size_problem(&self) -> Option<String> {
        let ok = self.queue_size.is_power_of_two() && (2..=MAX_QUEUE_SIZE).contains(&usize::from(self.queue_size));
        (!ok).then(|| {
            format!(
                "queue_size {} must be a power of two from 2 to {MAX_QUEUE_SIZE} (the virtio limit)",
                self.queue_size
            )
        })
    }

    /// Who may connect to the socket.
    pub fn socket_access(&self) -> SocketAccess {
        SocketAccess { mode: self.socket_mode.unwrap_or_default(), group: self.socket_group.clone() }
    }
}

fn default_queues() -> u16 {
    1
}

/// Longest polling window by default: four times QEMU's `poll-max-ns` (32 us). A sleep on
/// the kick costs both sides a cross-CPU wake-up, which under nested virtualisation costs
/// tens of microseconds of CPU on each side; polling through gaps up to 128 us is cheaper
/// there, and keeps the guest from kicking at all while it is busy (libblkio, QD32:
/// 2.4x qemu-storage-daemon's IOPS per server CPU-s against 1.5x with 32 us,
/// BENCHMARKS.md). The window still adapts down for guests that stay away longer.
pub fn default_idle_poll_us() -> u32 {
    128
}

/// Default largest ring size (QEMU's `queue-size` goes up to 1024).
pub fn default_queue_size() -> u16 {
    1024
}

/// Why an export could not be created.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A configuration value is out of range.
    #[error("export `{name}`: {reason}")]
    Config {
        /// Export name.
        name: String,
        /// What is wrong and what is allowed.
        reason: String,
    },
    /// The socket could not be created.
    #[error("export `{name}`: cannot listen on {path}: {source}")]
    Listen {
        /// Export name.
        name: String,
        /// Socket path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// A host resource failed.
    #[error("export `{name}`: {what}: {source}")]
    Host {
        /// Export name.
        name: String,
        /// What udm was doing.
        what: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What the connection handlers and workers of one export share.
pub struct ExportCore {
    /// Export name.
    pub name: String,
    /// The device served.
    pub device: Arc<dyn BlockDevice>,
    /// Limits, serial, idle mode and statistics shared with the workers.
    pub shared: Arc<Shared>,
    /// Virtqueues offered.
    pub num_queues: u16,
    /// Largest ring size.
    pub queue_size: u16,
    /// CPUs for queue workers.
    pub cpus: Vec<usize>,
    read_only: bool,
    backend_channel: Mutex<Option<UnixStream>>,
    connected: AtomicBool,
    connections: AtomicU64,
}

impl ExportCore {
    /// Validates `config` and builds the state its connections share.
    pub(crate) fn new(config: &ExportConfig, device: Arc<dyn BlockDevice>) -> Result<Arc<ExportCore>, ExportError> {
        let bad = |reason: String| ExportError::Config { name: config.name.clone(), reason };
        if config.num_queues == 0 || config.num_queues > 64 {
            return Err(bad(format!("num_queues {} is out of range: use 1 to 64", config.num_queues)));
        }
        if let Some(problem) = config.queue_size_problem() {
            return Err(bad(problem));
        }
        let serial_text = config.serial.clone().unwrap_or_else(|| config.name.clone());
        if serial_text.len() > ID_BYTES {
            return Err(bad(format!("serial `{serial_text}` is longer than {ID_BYTES} bytes")));
        }
        let mut serial = [0u8; ID_BYTES];
        serial[..serial_text.len()].copy_from_slice(serial_text.as_bytes());
        let info = device.info();
        let shared = Arc::new(Shared {
            limits: ArcSwap::from_pointee(Limits::new(&info, config.read_only)),
            serial,
            mode: config.poll,
            idle_poll_max: std::time::Duration::from_micros(config.idle_poll_us.into()),
            stats: (0..config.num_queues).map(|_| Arc::new(QueueStats::new())).collect(),
        });
        Ok(Arc::new(ExportCore {
            name: config.name.clone(),
            device,
            shared,
            num_queues: config.num_queues,
            queue_size: config.queue_size,
            cpus: config.cpus.clone(),
            read_only: config.read_only,
            backend_channel: Mutex::new(None),
            connected: AtomicBool::new(false),
            connections: AtomicU64::new(0),
        }))
    }

    /// The device's info as the export presents it (read-only if the export is).
    pub fn current_info(&self) -> DeviceInfo {
        let mut info = self.device.info();
        info.read_only |= self.read_only;
        info
    }
}

/// A running export.
pub struct Export {
    config: ExportConfig,
    core: Arc<ExportCore>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    current: Arc<Mutex<Option<UnixStream>>>,
    thread: Option<JoinHandle<()>>,
    /// Unlinked (if still udm's) once the listener has stopped.
    socket_file: Option<OwnedSocket>,
}

/// A summary for `udm export ls`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportInfo {
    /// The configuration.
    pub config: ExportConfig,
    /// Size in sectors.
    pub sectors: u64,
    /// Whether a front end is connected.
    pub connected: bool,
    /// Front ends accepted so far.
    pub connections: u64,
    /// Being removed (`export remove` has not returned yet).
    #[serde(default)]
    pub removing: bool,
    /// Why an export from the state file is not running (it stays recorded until it is
    /// added again or removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

impl Export {
    /// Validates `config`, binds the socket and starts accepting front ends.
    pub fn start(config: ExportConfig, device: Arc<dyn BlockDevice>) -> Result<Export, ExportError> {
        let core = ExportCore::new(&config, device)?;
        let listen_error =
            |source| ExportError::Listen { name: config.name.clone(), path: config.socket.clone(), source };
        let (listener, socket_file) =
            OwnedSocket::bind(&config.socket, &config.socket_access(), &format!("export `{}`", config.name))
                .map_err(listen_error)?;
        listener.set_nonblocking(true).map_err(listen_error)?;
        let host = |what, source| ExportError::Host { name: config.name.clone(), what, source };
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| host("eventfd", e))?);
        let stop = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(None));
        let thread = {
            let (core, stop, wake, current) =
                (Arc::clone(&core), Arc::clone(&stop), Arc::clone(&wake), Arc::clone(&current));
            std::thread::Builder::new()
                .name(format!("udm-{}-listen", config.name))
                .spawn(move || accept_loop(listener, core, stop, wake, current))
                .map_err(|e| host("spawning the listener thread", e))?
        };
        tracing::info!(export = %config.name, socket = %config.socket.display(), "vhost-user-blk export listening");
        Ok(Export { config, core, stop, wake, current, thread: Some(thread), socket_file: Some(socket_file) })
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &ExportConfig {
        &self.config
    }

    /// The device it serves.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.core.device
    }

    /// A summary.
    pub fn info(&self) -> ExportInfo {
        ExportInfo {
            config: self.config.clone(),
            sectors: self.core.shared.limits.load().capacity,
            connected: self.core.connected.load(Ordering::Relaxed),
            connections: self.core.connections.load(Ordering::Relaxed),
            removing: false,
            problem: None,
        }
    }

    /// Per-queue statistics.
    pub fn stats(&self) -> Vec<QueueSnapshot> {
        self.core.shared.stats.iter().map(|s| s.snapshot()).collect()
    }

    /// Re-reads the device's size; if it changed, updates the config space and tells
    /// the front end (CONFIG_CHANGE_MSG). Returns whether the size changed.
    pub fn refresh_size(&self) -> bool {
        let info = self.core.device.info();
        let old = self.core.shared.limits.load().capacity;
        if info.sectors == old {
            return false;
        }
        self.core.shared.limits.store(Arc::new(Limits::new(&info, self.config.read_only)));
        tracing::info!(export = %self.config.name, old, new = info.sectors, "device resized");
        let mut chan = self.core.backend_channel.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = chan.as_mut() {
            if let Err(e) = send_config_change(c) {
                tracing::warn!(export = %self.config.name, "cannot send the config-change notice: {e}");
                *chan = None;
            }
        }
        true
    }

    /// Stops accepting, disconnects the front end after draining every request in
    /// flight, and removes the socket if it is still the one this export created.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(s) = self.current.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.socket_file.take();
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.shutdown();
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    core: Arc<ExportCore>,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    current: Arc<Mutex<Option<UnixStream>>>,
) {
    let what = format!("export `{}`", core.name);
    accept_until_stopped(&listener, &stop, &wake, &what, |stream| {
        if stream.set_nonblocking(false).is_err() {
            return;
        }
        if let Ok(clone) = stream.try_clone() {
            *current.lock().unwrap_or_else(|e| e.into_inner()) = Some(clone);
        }
        if stop.load(Ordering::Acquire) {
            return;
        }
        // Last line of defence: a fault in one connection ends that connection, never
        // the listener (reconnects must keep working).
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve_connection(stream, &core)));
        if let Err(panic) = served {
            let reason = super::worker::panic_message(&*panic);
            tracing::error!(export = %core.name, "front-end connection faulted: {reason}; connection closed");
        }
        core.connected.store(false, Ordering::Relaxed);
        *core.backend_channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
        *current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    });
}

/// Runs the vhost-user message loop of one front end until it disconnects.
fn serve_connection(stream: UnixStream, core: &Arc<ExportCore>) {
    let n = core.connections.fetch_add(1, Ordering::Relaxed) + 1;
    tracing::info!(export = %core.name, connection = n, "front end connected");
    core.connected.store(true, Ordering::Relaxed);
    let peek = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(export = %core.name, "cannot clone the connection: {e}");
            return;
        }
    };
    let on_fault: super::worker::FaultHook = match stream.try_clone() {
        Ok(conn) => Arc::new(move |_: &str| {
            // Ends the message loop below, which stops every ring and drops the memory.
            let _ = conn.shutdown(std::net::Shutdown::Both);
        }),
        Err(e) => {
            tracing::warn!(export = %core.name, "cannot clone the connection: {e}");
            return;
        }
    };
    let handler = Arc::new(Mutex::new(BlkHandler::with_fault_hook(Arc::clone(core), on_fault)));
    let mut req = BackendReqHandler::from_stream(stream, Arc::clone(&handler));
    let reason = loop {
        match peek_backend_channel(&peek) {
            Ok(Some(chan)) => *core.backend_channel.lock().unwrap_or_else(|e| e.into_inner()) = Some(chan),
            Ok(None) => {}
            Err(e) => break format!("{e}"),
        }
        if let Err(e) = req.handle_request() {
            break format!("{e}");
        }
    };
    handler.lock().unwrap_or_else(|e| e.into_inner()).disconnect();
    *core.backend_channel.lock().unwrap_or_else(|e| e.into_inner()) = None;
    core.connected.store(false, Ordering::Relaxed);
    tracing::info!(export = %core.name, connection = n, "front end disconnected: {reason}");
}
