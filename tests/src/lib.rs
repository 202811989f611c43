//! # udm-tests: end-to-end tests across udm's crates and the QEMU VM harness
//!
//! * [`vm`]: boots QEMU guests (TCG) with a Debian kernel, a busybox initramfs, chosen
//!   kernel modules, host binaries and emulated devices (NVMe behind a virtual IOMMU,
//!   virtio and vhost-user-blk disks), runs a script and returns its output and status.

pub mod vm;
