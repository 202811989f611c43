//! # udm-tests: end-to-end tests across udm's crates and the QEMU VM harness
//!
//! * [`vm`]: boots QEMU guests (TCG) with a Debian kernel, a busybox initramfs, chosen
//!   kernel modules, host binaries and emulated devices (NVMe behind a virtual IOMMU,
//!   virtio and vhost-user-blk disks), runs a script and returns its output and status.
//! * [`udm_process`]: `udm serve` as a child process with its log, and the CLI as its
//!   client.
//! * [`verified_client`]: a libblkio client with random verified writes that survives
//!   its connection going away (lost, torn and misdirected writes are told apart).

pub mod udm_process;
pub mod verified_client;
pub mod vm;
