//! The control socket: a unix socket (mode 0600) carrying JSON-RPC 2.0, one object per
//! line. `udm dm|snapshot|export|stats` are thin clients of it.
//!
//! * [`protocol`]: request, response and error objects.
//! * [`methods`]: method names -> [`crate::daemon::Daemon`] calls, with typed params.
//! * [`server`]: the listener and per-connection loop.
//! * [`client`]: what the CLI uses.

pub mod client;
pub mod methods;
pub mod protocol;
pub mod server;

pub use client::{Client, ClientError};
pub use server::ControlServer;
