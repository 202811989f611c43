//! A harness that boots QEMU guests (TCG, no KVM) with a Debian kernel and a busybox
//! initramfs, runs a shell script inside and hands back what it printed and its exit
//! status. See README.md in this folder for the whole story.
//!
//! ```no_run
//! use std::time::Duration;
//! use udm_tests::vm::{modules, Backing, Guest, NvmeController, NvmeNamespace};
//!
//! let img = tempfile::NamedTempFile::new().unwrap();
//! img.as_file().set_len(64 << 20).unwrap();
//! let out = Guest::new()
//!     .unwrap()
//!     .intel_iommu()
//!     .hugepages(64)
//!     .modules(modules::VFIO)
//!     .nvme(NvmeController::new("udm0001", 4).namespace(NvmeNamespace::new(Backing::raw(img.path()), 512)))
//!     .binary("/usr/bin/stat")
//!     .script("cat /sys/bus/pci/devices/0000:00:04.0/class")
//!     .timeout(Duration::from_secs(120))
//!     .run()
//!     .unwrap();
//! out.assert_success();
//! assert!(out.output.contains("0x010802"));
//! ```

mod devices;
mod error;
mod initramfs;
mod kernel;
mod mailbox;
mod run;

pub use devices::{Backing, NvmeController, NvmeNamespace, VhostUserBlk, VirtioDisk};
pub use error::VmError;
pub use initramfs::{shared_libraries, Initramfs};
pub use kernel::{module_depends, GuestKernel, DEFAULT_CACHE};
pub use mailbox::{Mailbox, MAILBOX_SERIAL};
pub use run::GuestOutput;

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Module sets for common guest set-ups (dependencies are added automatically).
pub mod modules {
    /// VFIO for PCI devices behind the virtual IOMMU (`vfio_iommu_type1` is loaded on
    /// demand by the kernel, which has no modprobe here, so it is named explicitly).
    pub const VFIO: &[&str] = &["vfio_iommu_type1", "vfio-pci"];
    /// The kernel's NVMe driver (the peer in benchmarks).
    pub const NVME: &[&str] = &["nvme"];
    /// virtio-blk over PCI (virtio disks, vhost-user-blk disks).
    pub const VIRTIO_BLK: &[&str] = &["virtio_pci", "virtio_blk"];
    /// Linux device-mapper snapshots.
    pub const DM_SNAPSHOT: &[&str] = &["dm-snapshot"];
}

/// Shell snippets for guest scripts.
pub mod shell {
    /// Binds PCI function `bdf` (e.g. `0000:00:04.0`) to vfio-pci (taking it from the
    /// driver that has it, if any) and waits for its `/dev/vfio/<group>` node.
    pub fn bind_vfio(bdf: &str) -> String {
        format!(
            "[ -e /sys/bus/pci/devices/{bdf}/driver ] && echo {bdf} > /sys/bus/pci/devices/{bdf}/driver/unbind\n\
             echo vfio-pci > /sys/bus/pci/devices/{bdf}/driver_override\n\
             echo {bdf} > /sys/bus/pci/drivers_probe\n\
             g=$(basename $(readlink /sys/bus/pci/devices/{bdf}/iommu_group))\n\
             i=0; while [ ! -e /dev/vfio/$g ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n\
             [ -e /dev/vfio/$g ] || {{ echo \"vfio group $g of {bdf} did not appear\"; exit 1; }}\n"
        )
    }
}

/// A guest to boot: built with chained calls, started with [`Guest::run`].
#[derive(Debug, Clone)]
pub struct Guest {
    kernel: GuestKernel,
    memory_mib: u32,
    smp: u32,
    timeout: Duration,
    modules: Vec<String>,
    kernel_args: Vec<String>,
    root: Initramfs,
    binaries: Vec<(PathBuf, String)>,
    host_files: Vec<(PathBuf, String)>,
    script: String,
    intel_iommu: bool,
    shared_memory: bool,
    nvme: Vec<NvmeController>,
    virtio_disks: Vec<VirtioDisk>,
    vhost_user: Vec<VhostUserBlk>,
    qemu_args: Vec<String>,
    qemu: PathBuf,
}

/// Printed by the guest's init right before the script starts.
pub const BEGIN_MARKER: &str = "===UDM-GUEST-BEGIN===";
/// Printed after the script, followed by ` status=<exit status>===`.
pub const END_MARKER: &str = "===UDM-GUEST-END";

impl Guest {
    /// A guest with the kernel from `$UDM_VM_CACHE` (default `/var/cache/udm-vm`),
    /// 512 MiB of RAM, one CPU, a 300 s timeout and an empty script.
    pub fn new() -> Result<Self, VmError> {
        Ok(Self::with_kernel(GuestKernel::from_env()?))
    }

    /// A guest with an explicit kernel.
    pub fn with_kernel(kernel: GuestKernel) -> Self {
        Guest {
            kernel,
            memory_mib: 512,
            smp: 1,
            timeout: Duration::from_secs(300),
            modules: Vec::new(),
            kernel_args: Vec::new(),
            root: Initramfs::new(),
            binaries: Vec::new(),
            host_files: Vec::new(),
            script: String::new(),
            intel_iommu: false,
            shared_memory: false,
            nvme: Vec::new(),
            virtio_disks: Vec::new(),
            vhost_user: Vec::new(),
            qemu_args: Vec::new(),
            qemu: PathBuf::from("qemu-system-x86_64"),
        }
    }

    /// Guest RAM in MiB.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Virtual CPUs (TCG runs them on host threads: `-accel tcg,thread=multi`).
    pub fn smp(mut self, cpus: u32) -> Self {
        self.smp = cpus.max(1);
        self
    }

    /// How long the guest may run before QEMU is killed and [`VmError::Timeout`] returned.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Kernel modules to load, in this order, each after the modules it depends on.
    pub fn modules(mut self, names: &[&str]) -> Self {
        self.modules.extend(names.iter().map(|s| s.to_string()));
        self
    }

    /// One more kernel command-line argument.
    pub fn kernel_arg(mut self, arg: &str) -> Self {
        self.kernel_args.push(arg.into());
        self
    }

    /// Reserves `count` 2 MiB hugepages at boot (mounted at /dev/hugepages).
    pub fn hugepages(self, count: u32) -> Self {
        self.kernel_arg(&format!("hugepages={count}"))
    }

    /// Carries a host executable (and the shared libraries `ldd` lists) to
    /// `/bin/<its file name>`. Errors surface from [`Guest::run`].
    pub fn binary(self, host: impl AsRef<Path>) -> Self {
        let host = host.as_ref();
        let name = host.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        self.binary_as(host, &format!("/bin/{name}"))
    }

    /// Carries a host executable (and its libraries) to `guest_path`.
    pub fn binary_as(mut self, host: impl AsRef<Path>, guest_path: &str) -> Self {
        self.binaries.push((host.as_ref().to_path_buf(), guest_path.to_string()));
        self
    }

    /// Puts `data` at `guest_path` (mode 0644).
    pub fn file(mut self, guest_path: &str, data: impl Into<Vec<u8>>) -> Self {
        self.root.file(guest_path, data.into(), 0o644);
        self
    }

    /// Copies a host file to `guest_path`. Errors surface from [`Guest::run`].
    pub fn host_file(mut self, host: impl AsRef<Path>, guest_path: &str) -> Self {
        self.host_files.push((host.as_ref().to_path_buf(), guest_path.to_string()));
        self
    }

    /// The shell script (busybox `sh -e`, PATH set, /proc, /sys, /dev, /tmp and
    /// /dev/hugepages mounted, modules loaded) whose output and exit status
    /// [`Guest::run`] returns. Called again, appends.
    pub fn script(mut self, body: &str) -> Self {
        self.script.push_str(body);
        if !body.ends_with('\n') {
            self.script.push('\n');
        }
        self
    }

    /// Puts a virtual Intel IOMMU in the machine (`intel-iommu,intremap=on,caching-mode=on`,
    /// split irqchip) and turns it on in the kernel, as VFIO needs.
    pub fn intel_iommu(mut self) -> Self {
        self.intel_iommu = true;
        self.kernel_args.push("intel_iommu=on".into());
        self.kernel_args.push("iommu=pt".into());
        self
    }

    /// Adds an emulated NVMe controller.
    pub fn nvme(mut self, controller: NvmeController) -> Self {
        self.nvme.push(controller);
        self
    }

    /// Adds a virtio-blk disk (`/dev/vda`, … in order); load [`modules::VIRTIO_BLK`].
    pub fn virtio_disk(mut self, backing: Backing) -> Self {
        self.virtio_disks.push(VirtioDisk { backing, serial: None });
        self
    }

    /// Adds `mailbox` as a virtio-blk disk with serial [`MAILBOX_SERIAL`]; the script
    /// finds it with [`Mailbox::guest_find`]. Load [`modules::VIRTIO_BLK`].
    pub fn mailbox(mut self, mailbox: &Mailbox) -> Self {
        self.virtio_disks.push(VirtioDisk { backing: mailbox.backing(), serial: Some(MAILBOX_SERIAL.into()) });
        self
    }

    /// Adds a vhost-user-blk disk served on `socket` by a host process, and makes guest
    /// RAM a shared memfd (the server maps it); load [`modules::VIRTIO_BLK`].
    pub fn vhost_user_blk(mut self, socket: impl AsRef<Path>, num_queues: u16) -> Self {
        self.vhost_user.push(VhostUserBlk { socket: socket.as_ref().to_path_buf(), num_queues });
        self.shared_memory = true;
        self
    }

    /// Backs guest RAM with a shared memfd even without vhost-user devices.
    pub fn shared_memory(mut self) -> Self {
        self.shared_memory = true;
        self
    }

    /// Raw QEMU arguments appended to the command line (e.g. `-trace pci_nvme_err_*`).
    pub fn qemu_args(mut self, args: &[&str]) -> Self {
        self.qemu_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Uses another QEMU binary.
    pub fn qemu_binary(mut self, path: impl AsRef<Path>) -> Self {
        self.qemu = path.as_ref().to_path_buf();
        self
    }

    /// The kernel this guest boots.
    pub fn kernel(&self) -> &GuestKernel {
        &self.kernel
    }
}
