//! # udm-server: the udm daemon and its CLI
//!
//! * [`vhost_blk`]: vhost-user-blk exports of any block device.
//! * [`cpu`]: CPU lists and pinning.
//! * [`daemon`]: registry + exports, what `udm serve` runs.
//! * [`control`]: the JSON-RPC control socket and its client.
pub mod control;
pub mod cpu;
pub mod daemon;
pub mod vhost_blk;
