//! # udm-server: the udm daemon and its CLI
//!
//! * [`vhost_blk`]: vhost-user-blk exports of any block device.
//! * [`cpu`]: CPU lists and pinning.
pub mod cpu;
pub mod vhost_blk;
