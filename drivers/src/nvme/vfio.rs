//! One PCI function opened through VFIO: checks that say what to do when it is not
//! usable, BAR0 mapped, bus mastering on, INTx off and no interrupts anywhere (udm
//! polls), and the IOMMU's geometry (VFIO_IOMMU_GET_INFO).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Arc;

use vfio_bindings::bindings::vfio::{
    vfio_info_cap_header, vfio_iommu_type1_info, VFIO_BASE, VFIO_IOMMU_INFO_CAPS, VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX,
    VFIO_REGION_INFO_FLAG_MMAP, VFIO_TYPE,
};
use vfio_ioctls::{VfioContainer, VfioDevice, VfioOps};

use crate::error::DeviceError;
use crate::nvme::regs::Registers;

vmm_sys_util::ioctl_io_nr!(VFIO_IOMMU_GET_INFO, VFIO_TYPE as u32, VFIO_BASE + 12);

/// PCI configuration space: Command register and its bits (PCI Local Bus 3.0, 6.2.2).
const PCI_COMMAND: u64 = 0x04;
const PCI_COMMAND_MEMORY: u16 = 1 << 1;
const PCI_COMMAND_MASTER: u16 = 1 << 2;
const PCI_COMMAND_INTX_DISABLE: u16 = 1 << 10;

/// Where Linux lists PCI functions.
pub const SYSFS_PCI: &str = "/sys/bus/pci/devices";

/// What the IOMMU lets udm map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IommuInfo {
    /// Usable IOVA ranges `[start, end]` (inclusive).
    pub iova_ranges: Vec<(u64, u64)>,
    /// Page sizes the IOMMU supports (bit n set: 2^n bytes).
    pub page_sizes: u64,
    /// DMA mappings the container may still create, when the kernel says.
    pub dma_mappings_available: Option<u32>,
}

/// Asks the kernel for the container's IOMMU geometry. Valid once a group is attached.
pub fn iommu_info(container: &VfioContainer) -> Result<IommuInfo, DeviceError> {
    let header = std::mem::size_of::<vfio_iommu_type1_info>();
    // The kernel answers with the size it needs (argsz) when capabilities follow.
    let mut buf = vec![0u64; header.div_ceil(8)];
    let mut argsz = header;
    for _ in 0..2 {
        buf = vec![0u64; argsz.div_ceil(8)];
        let info = buf.as_mut_ptr().cast::<vfio_iommu_type1_info>();
        // SAFETY: `buf` is at least `header` bytes, 8-byte aligned, zeroed.
        unsafe { (*info).argsz = argsz as u32 };
        // SAFETY: VFIO_IOMMU_GET_INFO writes at most `argsz` bytes into `buf`, which has
        // that many.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ptr(container, VFIO_IOMMU_GET_INFO(), info) };
        if rc < 0 {
            return Err(DeviceError::io("VFIO_IOMMU_GET_INFO", std::io::Error::last_os_error()));
        }
        // SAFETY: the kernel filled the header.
        let needed = unsafe { (*info).argsz } as usize;
        if needed <= argsz {
            break;
        }
        argsz = needed;
    }
    let bytes: &[u8] =
        // SAFETY: `buf` is a Vec<u64> of at least argsz bytes; viewing it as bytes is sound.
        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), buf.len() * 8) };
    let u32_at = |o: usize| bytes.get(o..o + 4).map(|b| u32::from_ne_bytes(b.try_into().expect("4 bytes")));
    let u64_at = |o: usize| bytes.get(o..o + 8).map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
    let flags = u32_at(4).unwrap_or(0);
    let page_sizes = u64_at(8).unwrap_or(0);
    let mut info = IommuInfo { iova_ranges: Vec::new(), page_sizes, dma_mappings_available: None };
    if flags & VFIO_IOMMU_INFO_CAPS != 0 {
        let mut off = u32_at(16).unwrap_or(0) as usize;
        let hdr = std::mem::size_of::<vfio_info_cap_header>();
        // Each capability: id u16, version u16, next u32 (offset from the start), body.
        while off != 0 && off + hdr <= bytes.len() {
            let id = u32_at(off).unwrap_or(0) & 0xffff;
            let next = u32_at(off + 4).unwrap_or(0) as usize;
            if id == VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE {
                let n = u32_at(off + hdr).unwrap_or(0) as usize;
                for i in 0..n {
                    let at = off + hdr + 8 + i * 16;
                    if let (Some(s), Some(e)) = (u64_at(at), u64_at(at + 8)) {
                        info.iova_ranges.push((s, e));
                    }
                }
            } else if id == VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL {
                info.dma_mappings_available = u32_at(off + hdr);
            }
            if next <= off {
                break;
            }
            off = next;
        }
    }
    if info.iova_ranges.is_empty() {
        // Kernels before 5.4 do not report ranges: the whole 39-bit space below the x86
        // interrupt window is the safest guess that works on every Intel/AMD IOMMU.
        info.iova_ranges = vec![(0, 0xfedf_ffff), (0xfef0_0000, (1 << 39) - 1)];
    }
    Ok(info)
}

/// A PCI function bound to vfio-pci and opened in a container.
pub struct VfioPci {
    bdf: String,
    device: VfioDevice,
    bar0: NonNull<u8>,
    bar0_len: usize,
}

// SAFETY: the BAR0 pointer is a shared device mapping owned by this value; the
// VfioDevice is Send + Sync itself.
unsafe impl Send for VfioPci {}
// SAFETY: see Send; `&VfioPci` hands out only volatile register access.
unsafe impl Sync for VfioPci {}

impl std::fmt::Debug for VfioPci {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VfioPci").field("bdf", &self.bdf).field("bar0_len", &self.bar0_len).finish()
    }
}

/// A PCI address in its full form (`0000:00:04.0`), from that or the short `00:04.0`.
pub fn normalize_bdf(text: &str) -> Result<String, DeviceError> {
    let full = if text.matches(':').count() == 1 { format!("0000:{text}") } else { text.to_string() };
    let ok = full.len() == 12
        && full.char_indices().all(|(i, c)| match i {
            4 | 7 => c == ':',
            10 => c == '.',
            _ => c.is_ascii_hexdigit(),
        });
    if ok {
        Ok(full.to_ascii_lowercase())
    } else {
        Err(DeviceError::Config(format!("`{text}` is not a PCI address: expected e.g. 0000:00:04.0 or 00:04.0")))
    }
}

/// The driver a PCI function is bound to, if any.
pub fn bound_driver(bdf: &str) -> Option<String> {
    std::fs::read_link(Path::new(SYSFS_PCI).join(bdf).join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// The IOMMU group of a PCI function.
pub fn iommu_group(bdf: &str) -> Option<u32> {
    std::fs::read_link(Path::new(SYSFS_PCI).join(bdf).join("iommu_group"))
        .ok()
        .and_then(|p| p.file_name().and_then(|n| n.to_str()).and_then(|n| n.parse().ok()))
}

/// The functions sharing `group` with each other.
pub fn group_members(group: u32) -> Vec<String> {
    let dir = PathBuf::from(format!("/sys/kernel/iommu_groups/{group}/devices"));
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// Says precisely why `bdf` cannot be opened through VFIO, when the reason is visible
/// in sysfs.
fn diagnose(bdf: &str) -> Result<u32, DeviceError> {
    let dev = Path::new(SYSFS_PCI).join(bdf);
    if !dev.exists() {
        return Err(DeviceError::Driver(format!(
            "there is no PCI function {bdf}: `udm nvme list` shows the NVMe controllers this machine has"
        )));
    }
    match bound_driver(bdf).as_deref() {
        Some("vfio-pci") => {}
        Some(other) => {
            return Err(DeviceError::Driver(format!(
                "{bdf} is bound to the `{other}` driver, not vfio-pci: run `udm setup --bind {bdf}` (as root) to hand it to udm"
            )))
        }
        None => {
            return Err(DeviceError::Driver(format!(
                "{bdf} is bound to no driver: run `udm setup --bind {bdf}` (as root) to bind it to vfio-pci"
            )))
        }
    }
    let group = iommu_group(bdf).ok_or_else(|| DeviceError::Unavailable {
        what: "an IOMMU",
        hint: format!(
            "{bdf} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line, VT-d/AMD-Vi in the firmware)"
        ),
    })?;
    let blockers: Vec<String> = group_members(group)
        .into_iter()
        .filter(|m| m != bdf)
        .filter_map(|m| match bound_driver(&m) {
            Some(d) if d == "vfio-pci" || d == "pci-stub" || d == "pcieport" => None,
            None => None,
            Some(d) => Some(format!("{m} (driver {d})")),
        })
        .collect();
    if !blockers.is_empty() {
        return Err(DeviceError::Driver(format!(
            "IOMMU group {group} of {bdf} is not viable: every device in it must be bound to vfio-pci or to no driver; \
             these are not: {}. Run `udm setup --bind` for each, or move {bdf} to another slot",
            blockers.join(", ")
        )));
    }
    let node = format!("/dev/vfio/{group}");
    match std::fs::OpenOptions::new().read(true).write(true).open(&node) {
        Ok(_) => Ok(group),
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => Err(DeviceError::Driver(format!(
            "no permission to open {node} for {bdf}: run udm as root or give your user access (chown/chmod {node}); \
             memory locking also needs `ulimit -l unlimited`"
        ))),
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) => Err(DeviceError::Driver(format!(
            "{node} for {bdf} is already open in another process (a running udm or VM): stop it first"
        ))),
        Err(e) => Err(DeviceError::io(format!("opening {node} for {bdf}"), e)),
    }
}

impl VfioPci {
    /// Opens `bdf` in `container`, maps BAR0, turns bus mastering on and INTx off.
    pub fn open(container: &Arc<VfioContainer>, bdf: &str) -> Result<Self, DeviceError> {
        let bdf = normalize_bdf(bdf)?;
        diagnose(&bdf)?;
        let ops: Arc<dyn VfioOps> = container.clone();
        let device = VfioDevice::new(&Path::new(SYSFS_PCI).join(&bdf), ops, false)
            .map_err(|e| DeviceError::Driver(format!("VFIO refused {bdf}: {e}")))?;
        let index = VFIO_PCI_BAR0_REGION_INDEX;
        let bar0_len = device.get_region_size(index) as usize;
        if bar0_len < 0x2000 {
            return Err(DeviceError::Driver(format!(
                "{bdf}: BAR0 is {bar0_len} bytes, too small for an NVMe controller"
            )));
        }
        if device.get_region_flags(index) & VFIO_REGION_INFO_FLAG_MMAP == 0 {
            return Err(DeviceError::Driver(format!("{bdf}: VFIO does not allow mapping BAR0")));
        }
        // SAFETY: maps the device's BAR0 region (offset and size from VFIO) shared;
        // no address hint, so no existing mapping is replaced.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bar0_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                device.as_raw_fd(),
                device.get_region_offset(index) as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DeviceError::io(format!("mapping BAR0 of {bdf}"), std::io::Error::last_os_error()));
        }
        let pci = VfioPci { bdf, device, bar0: NonNull::new(ptr.cast()).expect("mmap succeeded"), bar0_len };
        let cmd = pci.config_read16(PCI_COMMAND)?;
        pci.config_write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE)?;
        Ok(pci)
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        &self.bdf
    }

    /// The controller's registers.
    pub fn registers(&self) -> Registers {
        // SAFETY: `bar0..bar0+bar0_len` is the BAR0 mapping, which lives as long as
        // self; Registers is only used while the controller (which owns self) lives.
        unsafe { Registers::new(self.bar0, self.bar0_len) }
    }

    fn config_read16(&self, offset: u64) -> Result<u16, DeviceError> {
        let mut b = [0u8; 2];
        let at = self.device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + offset;
        // SAFETY: reads 2 bytes into `b` from the device file descriptor.
        let n = unsafe { libc::pread(self.device.as_raw_fd(), b.as_mut_ptr().cast(), 2, at as libc::off_t) };
        if n != 2 {
            return Err(DeviceError::io(
                format!("reading PCI config space of {}", self.bdf),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(u16::from_le_bytes(b))
    }

    fn config_write16(&self, offset: u64, value: u16) -> Result<(), DeviceError> {
        let b = value.to_le_bytes();
        let at = self.device.get_region_offset(VFIO_PCI_CONFIG_REGION_INDEX) + offset;
        // SAFETY: writes the 2 bytes of `b` to the device file descriptor.
        let n = unsafe { libc::pwrite(self.device.as_raw_fd(), b.as_ptr().cast(), 2, at as libc::off_t) };
        if n != 2 {
            return Err(DeviceError::io(
                format!("writing PCI config space of {}", self.bdf),
                std::io::Error::last_os_error(),
            ));
        }
        Ok(())
    }
}

impl Drop for VfioPci {
    fn drop(&mut self) {
        // Bus mastering off: nothing may DMA into memory udm is about to free.
        if let Ok(cmd) = self.config_read16(PCI_COMMAND) {
            let _ = self.config_write16(PCI_COMMAND, cmd & !PCI_COMMAND_MASTER);
        }
        // SAFETY: unmapping exactly the BAR0 mapping made in `open`; no Registers
        // outlive the controller that owns this value.
        unsafe { libc::munmap(self.bar0.as_ptr().cast(), self.bar0_len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pci_addresses_are_normalised_or_refused() {
        assert_eq!(normalize_bdf("00:04.0").unwrap(), "0000:00:04.0");
        assert_eq!(normalize_bdf("0000:5E:00.1").unwrap(), "0000:5e:00.1");
        for bad in ["", "04.0", "0000:00:04", "0000-00:04.0", "zz:04.0", "0000:00:04.0/1"] {
            assert!(normalize_bdf(bad).is_err(), "{bad}");
        }
    }
}
