//! Subcommands of the `udm` CLI, one module each.

pub mod backend;
pub mod common;
pub mod config;
pub mod dm;
pub mod export;
pub mod nvme;
pub mod setup;
pub mod snapshot;
pub mod stats;
