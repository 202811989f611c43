//! The control socket: a unix socket (mode 0600) carrying JSON-RPC 2.0, one object per
//! line. `udm dm|snapshot|export|stats` are thin clients of it.
//!
//! * [`protocol`]: request, response and error objects.
//! * [`methods`]: method names -> [`crate::daemon::Daemon`] calls, with typed params.
//! * [`server`]: the listener and per-connection loop.
//! * [`client`]: what the CLI uses.
//! * [`socket_file`]: socket files created 0600 (or as configured), never taking over
//!   a path in use, removed only if still udm's.

pub mod client;
pub mod methods;
pub mod protocol;
pub mod server;
pub mod socket_file;

pub use client::{Client, ClientError};
pub use server::ControlServer;
