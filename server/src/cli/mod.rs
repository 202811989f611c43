//! Subcommands of the `udm` CLI, one module each.

pub mod nvme;
pub mod setup;
