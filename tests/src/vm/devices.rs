//! Devices a guest can have, turned into QEMU command-line arguments.

use std::path::{Path, PathBuf};

/// The storage behind an emulated disk (a QEMU block driver node).
#[derive(Debug, Clone)]
pub enum Backing {
    /// A raw image file on the host.
    Raw(PathBuf),
    /// A raw image file, read-only for the guest.
    RawReadOnly(PathBuf),
    /// QEMU's `null-co` driver: reads return zeroes (with `read-zeroes=on`), writes are
    /// dropped; `latency_ns` delays every request, which makes a slow device for
    /// timeout tests.
    Null {
        /// Size in bytes.
        size: u64,
        /// Delay per request.
        latency_ns: u64,
    },
    /// A raw image under a `blkdebug` layer driven by `rules` (a blkdebug config file,
    /// e.g. `[inject-error]\nevent = "read_aio"\nerrno = "5"\n`) for error injection.
    Blkdebug {
        /// The blkdebug rules file.
        rules: PathBuf,
        /// The raw image.
        image: PathBuf,
    },
    /// Any `-drive` options (without `id=` and `if=`), for what the others do not cover.
    Custom(String),
}

impl Backing {
    /// A raw image file.
    pub fn raw(path: impl AsRef<Path>) -> Self {
        Backing::Raw(path.as_ref().to_path_buf())
    }

    fn drive_arg(&self, id: &str) -> String {
        let opts = match self {
            Backing::Raw(p) => format!("file={},format=raw,cache=unsafe", escape(p)),
            Backing::RawReadOnly(p) => format!("file={},format=raw,readonly=on", escape(p)),
            Backing::Null { size, latency_ns } => {
                format!("driver=null-co,size={size},latency-ns={latency_ns},read-zeroes=on")
            }
            Backing::Blkdebug { rules, image } => {
                // raw on top: its reads and writes raise the read_aio/write_aio events
                // that blkdebug rules react to.
                format!(
                    "driver=raw,file.driver=blkdebug,file.config={},file.image.filename={}",
                    escape(rules),
                    escape(image)
                )
            }
            Backing::Custom(s) => s.clone(),
        };
        format!("{opts},if=none,id={id}")
    }
}

/// QEMU splits option values at commas; a comma in a path is written twice.
fn escape(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
}

/// One NVMe namespace (`-device nvme-ns`).
#[derive(Debug, Clone)]
pub struct NvmeNamespace {
    /// Its storage.
    pub backing: Backing,
    /// Logical block size in bytes (512 or 4096).
    pub logical_block_size: u32,
}

impl NvmeNamespace {
    /// A namespace over `backing` with `logical_block_size`-byte blocks.
    pub fn new(backing: Backing, logical_block_size: u32) -> Self {
        NvmeNamespace { backing, logical_block_size }
    }
}

/// An emulated NVMe controller (QEMU's `nvme` device, PCI 1b36:0010) with its
/// namespaces, numbered 1, 2, … in order.
#[derive(Debug, Clone)]
pub struct NvmeController {
    /// Serial number reported by Identify Controller.
    pub serial: String,
    /// PCI slot on bus 0: the function appears as `0000:00:<slot>.0`.
    pub slot: u8,
    /// Maximum Data Transfer Size as a power of two of 4 KiB pages (`None`: QEMU's
    /// default 7 = 512 KiB; 0 = unlimited).
    pub mdts: Option<u8>,
    /// I/O queue pairs the controller offers (`None`: QEMU's default 64).
    pub max_ioqpairs: Option<u32>,
    /// The namespaces.
    pub namespaces: Vec<NvmeNamespace>,
}

impl NvmeController {
    /// A controller in PCI `slot` with serial `serial` and no namespaces yet.
    pub fn new(serial: &str, slot: u8) -> Self {
        NvmeController { serial: serial.into(), slot, mdts: None, max_ioqpairs: None, namespaces: Vec::new() }
    }

    /// Adds a namespace.
    pub fn namespace(mut self, ns: NvmeNamespace) -> Self {
        self.namespaces.push(ns);
        self
    }

    /// Sets the MDTS.
    pub fn mdts(mut self, mdts: u8) -> Self {
        self.mdts = Some(mdts);
        self
    }

    /// Sets the number of I/O queue pairs.
    pub fn max_ioqpairs(mut self, n: u32) -> Self {
        self.max_ioqpairs = Some(n);
        self
    }

    /// The PCI address the guest sees, e.g. `0000:00:04.0`.
    pub fn bdf(&self) -> String {
        format!("0000:00:{:02x}.0", self.slot)
    }

    pub(crate) fn args(&self, index: usize) -> Vec<String> {
        let id = format!("nvme{index}");
        let mut dev = format!("nvme,id={id},serial={},addr={:#x}", self.serial, self.slot);
        if let Some(m) = self.mdts {
            dev.push_str(&format!(",mdts={m}"));
        }
        if let Some(q) = self.max_ioqpairs {
            dev.push_str(&format!(",max_ioqpairs={q}"));
        }
        let mut args = vec!["-device".to_string(), dev];
        for (i, ns) in self.namespaces.iter().enumerate() {
            let drive = format!("{id}n{}", i + 1);
            args.push("-drive".into());
            args.push(ns.backing.drive_arg(&drive));
            args.push("-device".into());
            args.push(format!(
                "nvme-ns,drive={drive},bus={id},nsid={},logical_block_size={bs},physical_block_size={bs}",
                i + 1,
                bs = ns.logical_block_size
            ));
        }
        args
    }
}

/// A virtio-blk disk in the guest (`/dev/vda`, `/dev/vdb`, … in the order added);
/// needs the modules in [`super::modules::VIRTIO_BLK`].
#[derive(Debug, Clone)]
pub struct VirtioDisk {
    /// Its storage.
    pub backing: Backing,
    /// Serial number (`/sys/block/vdX/serial` in the guest).
    pub serial: Option<String>,
}

impl VirtioDisk {
    pub(crate) fn args(&self, index: usize) -> Vec<String> {
        let id = format!("vd{index}");
        let serial = self.serial.as_ref().map(|s| format!(",serial={s}")).unwrap_or_default();
        vec![
            "-drive".into(),
            self.backing.drive_arg(&id),
            "-device".into(),
            format!("virtio-blk-pci,drive={id}{serial}"),
        ]
    }
}

/// A vhost-user-blk disk served by a process on the host listening on `socket`; the
/// guest's RAM is then a shared memfd so the server can map it.
#[derive(Debug, Clone)]
pub struct VhostUserBlk {
    /// The server's unix socket.
    pub socket: PathBuf,
    /// Virtqueues.
    pub num_queues: u16,
}

impl VhostUserBlk {
    pub(crate) fn args(&self, index: usize) -> Vec<String> {
        let id = format!("vu{index}");
        vec![
            "-chardev".into(),
            format!("socket,id={id},path={}", escape(&self.socket)),
            "-device".into(),
            format!("vhost-user-blk-pci,chardev={id},num-queues={}", self.num_queues),
        ]
    }
}
