//! Unix socket files udm listens on (the control socket, every export's vhost-user
//! socket), created and removed so that udm can never be turned against itself or
//! against another process:
//!
//! * A path something is listening on is refused, naming who listens (an export or the
//!   control socket of this daemon, or another process by pid); only a stale socket
//!   (nobody listening: `ECONNREFUSED`) is replaced, and a file that is not a socket
//!   never is.
//! * The socket is born with its final permissions: it is bound under umask 0177 (so
//!   it is 0600 whatever the process umask), then given its group and widened to the
//!   configured mode before anyone else could connect.
//! * At removal only the inode udm created is unlinked (device and inode compared with
//!   the ones recorded at bind time): a socket that replaced it, e.g. a re-added export
//!   of the same name, stays.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Permission bits of a socket file (`0o600` by default; `0o660` with a group lets a
/// QEMU running as another user in that group connect).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SocketMode(u32);

impl SocketMode {
    /// Owner read/write only.
    pub const OWNER_ONLY: SocketMode = SocketMode(0o600);

    /// Checks a mode: permission bits only, and the owner (udm's user) keeps read/write.
    pub fn new(bits: u32) -> Result<SocketMode, String> {
        if bits & !0o777 != 0 {
            return Err(format!("socket mode {bits:#o} has bits beyond 0777: give permission bits only, e.g. 0660"));
        }
        if bits & 0o600 != 0o600 {
            return Err(format!(
                "socket mode {bits:04o} takes read/write away from udm's own user: use e.g. 0600 or 0660"
            ));
        }
        Ok(SocketMode(bits))
    }

    /// Parses octal text such as `0660` or `0o660`.
    pub fn parse(text: &str) -> Result<SocketMode, String> {
        let digits = text.trim().trim_start_matches("0o");
        let bits = u32::from_str_radix(digits, 8)
            .map_err(|_| format!("socket mode `{text}` is not an octal number: write it like 0600 or 0660"))?;
        SocketMode::new(bits)
    }

    /// The permission bits.
    pub fn bits(self) -> u32 {
        self.0
    }
}

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode::OWNER_ONLY
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    /// Octal text (`"0660"`) or a number (TOML's `0o660`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text {
            Number(u32),
            Octal(String),
        }
        match Text::deserialize(d)? {
            Text::Number(n) => SocketMode::new(n),
            Text::Octal(s) => SocketMode::parse(&s),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// Who may connect to a socket file: its mode and, optionally, its group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Permission bits.
    pub mode: SocketMode,
    /// Group (name or number); `None` keeps udm's group.
    pub group: Option<String>,
}

/// Sockets this process bound and still owns, by (device, inode), with a description
/// of their owner: how a refusal names "export `vol0`" rather than "this process".
static OWNERS: Mutex<Vec<(u64, u64, String)>> = Mutex::new(Vec::new());

/// The umask is process-wide: binds that set it are serialised.
static UMASK: Mutex<()> = Mutex::new(());

/// A socket file udm created; dropping it unlinks the file if it is still that file.
#[derive(Debug)]
pub struct OwnedSocket {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl OwnedSocket {
    /// Binds a listening socket at `path` for `owner` (e.g. "export `vol0`"), with
    /// `access`. Refuses a path in use or that is not a socket; replaces a stale socket.
    pub fn bind(path: &Path, access: &SocketAccess, owner: &str) -> io::Result<(UnixListener, OwnedSocket)> {
        let gid = access.group.as_deref().map(resolve_group).transpose()?;
        clear_stale(path)?;
        let listener = {
            let _umask = UMASK.lock().unwrap_or_else(|e| e.into_inner());
            // SAFETY: umask only swaps the process's file-creation mask; it has no memory
            // effects. Other threads creating files meanwhile get fewer permissions, never
            // more.
            let old = unsafe { libc::umask(0o177) };
            let bound = UnixListener::bind(path);
            // SAFETY: as above, restoring the previous mask.
            unsafe { libc::umask(old) };
            bound.map_err(|e| in_context(e, format!("cannot bind {}", path.display())))?
        };
        let meta = std::fs::symlink_metadata(path)?;
        let socket = OwnedSocket { path: path.to_path_buf(), dev: meta.dev(), ino: meta.ino() };
        // Group before mode: until both are set the socket stays 0600.
        if let Some(gid) = gid {
            std::os::unix::fs::lchown(path, None, Some(gid)).map_err(|e| {
                in_context(
                    e,
                    format!("cannot give {} to group {}", path.display(), access.group.as_deref().unwrap_or("")),
                )
            })?;
        }
        if access.mode != SocketMode::OWNER_ONLY {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(access.mode.bits()))
                .map_err(|e| in_context(e, format!("cannot set mode {} on {}", access.mode, path.display())))?;
        }
        if access.mode.bits() & 0o006 != 0 {
            tracing::warn!(
                path = %path.display(),
                mode = %access.mode,
                "every local user may connect to {owner}: prefer a group (e.g. 0660 with a group)"
            );
        }
        owners().push((socket.dev, socket.ino, owner.to_string()));
        Ok((listener, socket))
    }

    /// The path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the file at the path is still the socket udm created.
    pub fn is_still_ours(&self) -> bool {
        std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.dev() == self.dev && m.ino() == self.ino)
    }
}

impl Drop for OwnedSocket {
    fn drop(&mut self) {
        owners().retain(|(dev, ino, _)| (*dev, *ino) != (self.dev, self.ino));
        if self.is_still_ours() {
            if let Err(e) = std::fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), "cannot remove the socket: {e}");
            }
        } else {
            tracing::info!(path = %self.path.display(), "socket replaced by someone else's: left in place");
        }
    }
}

fn owners() -> std::sync::MutexGuard<'static, Vec<(u64, u64, String)>> {
    OWNERS.lock().unwrap_or_else(|e| e.into_inner())
}

fn in_context(e: io::Error, what: String) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

/// Makes `path` free for a bind: nothing there, or a stale socket removed. A socket
/// something listens on, or any other file, is refused.
fn clear_stale(path: &Path) -> io::Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(in_context(e, format!("cannot inspect {}", path.display()))),
    };
    if !meta.file_type().is_socket() {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket: remove it or choose another path", path.display()),
        ));
    }
    match probe(path) {
        Probe::Stale => {
            // Unlink only the stale file probed, not one that replaced it since.
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.dev() == meta.dev() && m.ino() == meta.ino()) {
                tracing::info!(path = %path.display(), "replacing a stale socket nobody listens on");
                std::fs::remove_file(path)
                    .map_err(|e| in_context(e, format!("cannot remove the stale socket {}", path.display())))?;
            }
            Ok(())
        }
        Probe::Listening(pid) => {
            let user = describe_user(meta.dev(), meta.ino(), pid);
            Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "{} is in use by {user}: choose another path, or stop it first \
                     (udm never replaces a socket something listens on)",
                    path.display()
                ),
            ))
        }
        Probe::Unknown(e) => Err(io::Error::new(
            e.kind(),
            format!(
                "{} exists and udm cannot tell whether it is in use ({e}): remove it if it is stale, \
                 or choose another path",
                path.display()
            ),
        )),
    }
}

enum Probe {
    /// Nobody listens (connect: ECONNREFUSED).
    Stale,
    /// Something listens; the pid that created the listener, if the kernel says.
    Listening(Option<i32>),
    /// Neither could be established.
    Unknown(io::Error),
}

/// Connects to `path` without blocking (a listener with a full backlog answers EAGAIN
/// instead of making udm wait) and asks the kernel who listens.
fn probe(path: &Path) -> Probe {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return Probe::Unknown(io::Error::new(io::ErrorKind::InvalidInput, "the path contains a NUL byte"));
    };
    // SAFETY: sockaddr_un is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = c_path.as_bytes_with_nul();
    if bytes.len() > addr.sun_path.len() {
        return Probe::Unknown(io::Error::new(io::ErrorKind::InvalidInput, "the path is too long for a unix socket"));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; a non-negative result is a new fd we own.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Probe::Unknown(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: addr is a valid sockaddr_un and the length passed is its size.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&raw const addr).cast::<libc::sockaddr>(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        return Probe::Listening(peer_pid(&fd));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ECONNREFUSED) => Probe::Stale,
        // Backlog full: a listener is there, busy.
        Some(libc::EAGAIN) => Probe::Listening(None),
        _ => Probe::Unknown(err),
    }
}

/// The pid that created the listening socket `fd` is connected to (SO_PEERCRED).
fn peer_pid(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: ucred is plain old data.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: cred and len are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<libc::c_void>(),
            &mut len,
        )
    };
    (rc == 0 && cred.pid > 0).then_some(cred.pid)
}

/// "export `vol0` of this daemon", "process 4242 (udm)", ...
fn describe_user(dev: u64, ino: u64, pid: Option<i32>) -> String {
    if let Some((_, _, owner)) = owners().iter().find(|(d, i, _)| (*d, *i) == (dev, ino)) {
        return format!("{owner} of this daemon");
    }
    match pid {
        Some(p) if p == std::process::id() as i32 => "this daemon".into(),
        Some(p) => match std::fs::read_to_string(format!("/proc/{p}/comm")) {
            Ok(comm) => format!("process {p} ({})", comm.trim()),
            Err(_) => format!("process {p}"),
        },
        None => "another process (busy: its backlog is full)".into(),
    }
}

/// A group name or number -> gid.
fn resolve_group(group: &str) -> io::Result<libc::gid_t> {
    if let Ok(n) = group.parse::<libc::gid_t>() {
        return Ok(n);
    }
    let name = CString::new(group)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a group name cannot contain a NUL byte"))?;
    let mut buf = vec![0 as libc::c_char; 16384];
    // SAFETY: group is plain old data.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the length given; the strings getgrnam_r writes
    // live in `buf`, which outlives their only use (none: only gr_gid is read).
    let rc = unsafe { libc::getgrnam_r(name.as_ptr(), &mut grp, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    if found.is_null() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no group named `{group}` (see /etc/group): give an existing group name or a number"),
        ));
    }
    Ok(grp.gr_gid)
}

/// Accepts connections on a non-blocking `listener`, handing each to `on_connection`,
/// until `stop` is set; whoever sets it signals `wake`, so stopping never depends on
/// connecting to the socket's path (which may by then belong to someone else).
/// `what` names the socket in logs.
pub fn accept_until_stopped(
    listener: &UnixListener,
    stop: &AtomicBool,
    wake: &EventFd,
    what: &str,
    mut on_connection: impl FnMut(UnixStream),
) {
    let epoll = match Epoll::new().and_then(|ep| {
        ep.ctl(ControlOperation::Add, listener.as_raw_fd(), EpollEvent::new(EventSet::IN, 0))?;
        ep.ctl(ControlOperation::Add, wake.as_raw_fd(), EpollEvent::new(EventSet::IN, 1))?;
        Ok(ep)
    }) {
        Ok(ep) => ep,
        Err(e) => {
            tracing::error!("{what}: cannot wait for connections: {e}");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 2];
    while !stop.load(Ordering::Acquire) {
        match listener.accept() {
            Ok((stream, _)) => on_connection(stream),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let _ = epoll.wait(-1, &mut events);
            }
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!("{what}: accept failed: {e}");
                let _ = epoll.wait(100, &mut events);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn mode_of(p: &Path) -> u32 {
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn a_listening_socket_is_refused_naming_its_owner_and_survives() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.sock");
        let (first, owned) = OwnedSocket::bind(&p, &SocketAccess::default(), "export `a`").unwrap();
        let e = OwnedSocket::bind(&p, &SocketAccess::default(), "export `b`").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
        assert!(e.to_string().contains("export `a` of this daemon"), "{e}");
        let _probe_conn = first.accept().unwrap();
        assert!(owned.is_still_ours());
        UnixStream::connect(&p).unwrap();
    }

    #[test]
    fn a_stale_socket_is_replaced_and_other_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.sock");
        drop(UnixListener::bind(&p).unwrap()); // leaves a socket file nobody listens on
        let (_l, _owned) = OwnedSocket::bind(&p, &SocketAccess::default(), "x").unwrap();
        let f = dir.path().join("file");
        std::fs::write(&f, b"data").unwrap();
        let e = OwnedSocket::bind(&f, &SocketAccess::default(), "x").unwrap_err();
        assert!(e.to_string().contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&f).unwrap(), b"data");
    }

    #[test]
    fn only_the_inode_udm_created_is_unlinked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.sock");
        let (old_listener, old) = OwnedSocket::bind(&p, &SocketAccess::default(), "old").unwrap();
        std::fs::remove_file(&p).unwrap();
        let (_new_listener, new) = OwnedSocket::bind(&p, &SocketAccess::default(), "new").unwrap();
        drop(old_listener);
        drop(old);
        assert!(new.is_still_ours(), "the old owner's drop left the new socket alone");
        UnixStream::connect(&p).unwrap();
        drop(new);
        assert!(!p.exists());
    }

    #[test]
    fn modes_are_exact_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.sock");
        let _umask = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: swaps the process's file-creation mask, restored below.
        let old = unsafe { libc::umask(0) };
        drop(_umask);
        let r = OwnedSocket::bind(&p, &SocketAccess::default(), "m");
        let q = dir.path().join("g.sock");
        let access = SocketAccess { mode: SocketMode::parse("0660").unwrap(), group: Some("0".into()) };
        let r2 = OwnedSocket::bind(&q, &access, "g");
        let _umask = UMASK.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        drop(_umask);
        let (_l, _o) = r.unwrap();
        assert_eq!(mode_of(&p), 0o600);
        match r2 {
            Ok(_) => assert_eq!(mode_of(&q), 0o660),
            // Not root and not in group 0: chown is refused, and says so.
            Err(e) => assert!(e.to_string().contains("group 0"), "{e}"),
        }
    }

    #[test]
    fn modes_parse_and_check() {
        assert_eq!(SocketMode::parse("0660").unwrap().bits(), 0o660);
        assert_eq!(SocketMode::parse("0o600").unwrap().bits(), 0o600);
        assert!(SocketMode::parse("0066").is_err());
        assert!(SocketMode::parse("7777").is_err());
        assert!(SocketMode::parse("rw").is_err());
        let m: SocketMode = serde_json::from_value(serde_json::json!(0o640)).unwrap();
        assert_eq!(m.to_string(), "0640");
        assert!(resolve_group("no-such-group-udm").is_err());
    }
}
