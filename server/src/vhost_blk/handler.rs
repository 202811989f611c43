//! The vhost-user protocol state of one front-end connection.
//!
//! udm implements the `vhost` crate's request-handler trait itself instead of running
//! vhost-user-backend's daemon: that crate's handler type is private and answers
//! GET/SET_INFLIGHT_FD with "not supported", and its epoll worker model cannot give each
//! virtqueue its own polled `IoQueue`. The `vhost` crate still parses and answers every
//! message; this file keeps the per-ring state and starts and stops queue workers.

use std::fs::File;
use std::io;
use std::sync::Arc;

use arc_swap::ArcSwapOption;
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight, VhostUserLog,
    VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig, VhostUserSharedMsg,
    VhostUserSingleMemoryRegion, VhostUserVirtioFeatures, VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult, VhostUserBackendReqHandlerMut};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use super::config_space::{config_space, read_window};
use super::export::{ExportConfig, ExportCore, ExportError};
use super::features::{has, protocol_features, virtio_features};
use super::guest_memory::{MemoryTable, MAX_MEM_SLOTS};
use super::inflight::{InflightQueue, InflightRegion, MAX_QUEUE_SIZE};
use super::worker::{spawn, FaultHook, QueueSetup, WorkerHandle};

/// One virtqueue's configuration as the front end builds it up.
struct Vring {
    size: u16,
    /// Guest physical addresses of descriptor table, available ring, used ring.
    addrs: Option<(u64, u64, u64)>,
    next_avail: u16,
    kick: Option<File>,
    call: Arc<ArcSwapOption<File>>,
    enabled: bool,
    inflight: Option<InflightQueue>,
    worker: Option<WorkerHandle>,
}

impl Vring {
    fn new(size: u16) -> Self {
        Vring {
            size,
            addrs: None,
            next_avail: 0,
            kick: None,
            call: Arc::new(ArcSwapOption::empty()),
            enabled: false,
            inflight: None,
            worker: None,
        }
    }
}

/// The protocol handler of one connection.
pub struct BlkHandler {
    core: Arc<ExportCore>,
    owned: bool,
    acked_features: u64,
    acked_protocol: u64,
    memory: MemoryTable,
    vrings: Vec<Vring>,
    inflight: Option<InflightRegion>,
    on_fault: FaultHook,
}

fn invalid(msg: &'static str) -> VuError {
    VuError::InvalidOperation(msg)
}

fn internal(e: impl std::fmt::Display) -> VuError {
    tracing::warn!("vhost-user request failed: {e}");
    VuError::ReqHandlerError(io::Error::other(e.to_string()))
}

impl BlkHandler {
    /// A fresh handler for a new connection to the export.
    pub fn new(core: Arc<ExportCore>) -> Self {
        Self::with_fault_hook(core, Arc::new(|_: &str| {}))
    }

    /// A handler whose queue workers call `on_fault` when they contain a fault (the
    /// export passes one that ends this connection).
    pub fn with_fault_hook(core: Arc<ExportCore>, on_fault: FaultHook) -> Self {
        let vrings = (0..core.num_queues).map(|_| Vring::new(core.queue_size)).collect();
        BlkHandler {
            memory: MemoryTable::new(Arc::clone(&core.device)),
            core,
            owned: false,
            acked_features: 0,
            acked_protocol: 0,
            vrings,
            inflight: None,
            on_fault,
        }
    }

    /// A handler for an export of `device` as `config` says, with no socket: for driving
    /// the protocol in-process (the vhost-user fuzz target and its proptest).
    pub fn standalone(
        config: &ExportConfig,
        device: Arc<dyn udm_drivers::BlockDevice>,
        on_fault: FaultHook,
    ) -> Result<Self, ExportError> {
        Ok(Self::with_fault_hook(ExportCore::new(config, device)?, on_fault))
    }

    /// Whether ring `index` has a worker running.
    pub fn is_running(&self, index: usize) -> bool {
        self.vrings.get(index).is_some_and(|vr| vr.worker.is_some())
    }

    fn vring(&mut self, index: u32) -> VuResult<&mut Vring> {
        self.vrings.get_mut(index as usize).ok_or(VuError::InvalidParam)
    }

    fn protocol_negotiated(&self) -> bool {
        self.acked_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0
    }

    /// Starts ring `index` if it has everything it needs and is not running.
    fn try_start(&mut self, index: usize) -> VuResult<()> {
        let event_idx = has(self.acked_features, VIRTIO_RING_F_EVENT_IDX);
        let core = Arc::clone(&self.core);
        let memory_empty = self.memory.is_empty();
        let region_queue = match (&self.inflight, self.vrings[index].inflight.is_none()) {
            (Some(region), true) => region.queue(index as u16),
            _ => None,
        };
        let vr = &mut self.vrings[index];
        if region_queue.is_some() {
            vr.inflight = region_queue;
        }
        if vr.worker.is_some() || !vr.enabled || vr.kick.is_none() || memory_empty {
            return Ok(());
        }
        let Some((desc, avail, used)) = vr.addrs else { return Ok(()) };
        let kick = vr.kick.take().expect("checked above");
        let ioq = core.device.open_queue(usize::from(vr.size)).map_err(internal)?;
        let setup = QueueSetup {
            index: index as u16,
            size: vr.size,
            desc,
            avail,
            used,
            next_avail: vr.next_avail,
            event_idx,
            kick,
            call: Arc::clone(&vr.call),
            inflight: vr.inflight.take(),
            on_fault: Arc::clone(&self.on_fault),
        };
        let cpu = (!core.cpus.is_empty()).then(|| core.cpus[index % core.cpus.len()]);
        let name = format!("udm-{}-q{index}", core.name);
        let handle = spawn(setup, self.memory.atomic(), ioq, Arc::clone(&core.shared), cpu, name).map_err(|e| {
            tracing::warn!(export = %core.name, queue = index, "cannot start virtqueue: {e}");
            internal(e)
        })?;
        self.vrings[index].worker = Some(handle);
        tracing::debug!(export = %core.name, queue = index, "virtqueue started");
        Ok(())
    }

    /// Stops ring `index` (draining its requests), keeping its state for a restart.
    fn stop(&mut self, index: usize) {
        let vr = &mut self.vrings[index];
        if let Some(w) = vr.worker.take() {
            match w.stop() {
                Some(end) => {
                    vr.next_avail = end.next_avail;
                    vr.kick = Some(end.kick);
                    vr.inflight = end.inflight;
                }
                None => {
                    // The worker died (logged): the ring needs a new kick before it runs again.
                    vr.kick = None;
                    vr.inflight = None;
                }
            }
        }
    }

    /// Stops every ring and forgets the front end's memory: the connection is gone.
    pub fn disconnect(&mut self) {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
        self.memory.clear();
    }
}

impl Drop for BlkHandler {
    fn drop(&mut self) {
        self.disconnect();
    }
}

impl VhostUserBackendReqHandlerMut for BlkHandler {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(invalid("already claimed"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.reset_device()?;
        self.owned = false;
        self.acked_protocol = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        for i in 0..self.vrings.len() {
            self.stop(i);
        }
        let size = self.core.queue_size;
        for vr in self.vrings.iter_mut() {
            *vr = Vring::new(size);
        }
        self.acked_features = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(virtio_features(&self.core.current_info()))
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !virtio_features(&self.core.current_info()) != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_features = features;
        if !self.protocol_negotiated() {
            // Without protocol features, rings are enabled from the start (vhost-user spec).
            for i in 0..self.vrings.len() {
                self.vrings[i].enabled = true;
                self.try_start(i)?;
            }
        }
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if postcopy_listening.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        self.memory.set(ctx, files).map_err(internal)?;
        for i in 0..self.vrings.len() {
            self.try_start(i)?;
        }
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let max = self.core.queue_size;
        let vr = self.vring(index)?;
        if num == 0 || num > u32::from(max) || !num.is_power_of_two() {
            tracing::warn!(
                export = %self.core.name,
                queue = index,
                "SET_VRING_NUM {num} refused: ring sizes are powers of two up to the export's queue_size {max}"
            );
            return Err(VuError::InvalidParam);
        }
        vr.size = num as u16;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        let tr = |va| self.memory.vmm_to_gpa(va).ok_or(VuError::InvalidParam);
        let addrs = (tr(descriptor)?, tr(available)?, tr(used)?);
        self.vring(index)?.addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.vring(index)?.next_avail = base as u16;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        self.vring(index)?;
        let i = index as usize;
        self.stop(i);
        let vr = &mut self.vrings[i];
        // The ring is stopped: the front end re-sends kick and call before restarting it.
        vr.kick = None;
        vr.call.store(None);
        Ok(VhostUserVringState::new(index, u32::from(vr.next_avail)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let i = usize::from(index);
        self.vring(u32::from(index))?;
        if let Some(f) = &fd {
            // The worker reads it only when epoll says it is readable, but the front end
            // shares it and may read it first: a blocking read would then wait forever.
            set_nonblocking(f).map_err(|e| internal(format!("making the kick eventfd non-blocking: {e}")))?;
        }
        self.stop(i);
        self.vrings[i].kick = fd;
        self.try_start(i)
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let vr = self.vring(u32::from(index))?;
        if let Some(f) = &fd {
            // A blocking eventfd whose counter is saturated would block the worker's
            // write forever (the worker also polls before writing, see signal_eventfd).
            set_nonblocking(f).map_err(|e| internal(format!("making the call eventfd non-blocking: {e}")))?;
        }
        vr.call.store(fd.map(Arc::new));
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.vring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(protocol_features())
    }

    fn set_protocol_features(&mut self, features: u64) -> VuResult<()> {
        if features & !protocol_features().bits() != 0 {
            return Err(VuError::InvalidParam);
        }
        self.acked_protocol = features;
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(u64::from(self.core.num_queues))
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        if !self.protocol_negotiated() {
            return Err(VuError::InactiveFeature(VhostUserVirtioFeatures::PROTOCOL_FEATURES));
        }
        let i = index as usize;
        self.vring(index)?.enabled = enable;
        if enable {
            self.try_start(i)
        } else {
            self.stop(i);
            Ok(())
        }
    }

    fn get_config(&mut self, offset: u32, size: u32, _flags: VhostUserConfigFlags) -> VuResult<Vec<u8>> {
        // The vhost crate bounds it by the message size; the reply is allocated here, so
        // bound it here too.
        if size > vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE {
            return Err(invalid("GET_CONFIG asks for more than the 4 KiB a config space may have"));
        }
        let info = self.core.current_info();
        let limits = **self.core.shared.limits.load();
        Ok(read_window(&config_space(&info, &limits, self.core.num_queues), offset, size))
    }

    fn set_config(&mut self, _offset: u32, _buf: &[u8], _flags: VhostUserConfigFlags) -> VuResult<()> {
        // Every field udm offers is read-only (no CONFIG_WCE): writes are ignored, as the
        // virtio spec asks of devices.
        Ok(())
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(invalid("not a GPU device"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(invalid("shared objects are not supported"))
    }

    fn get_inflight_fd(&mut self, inflight: &VhostUserInflight) -> VuResult<(VhostUserInflight, File)> {
        if inflight.num_queues == 0
            || inflight.num_queues > self.core.num_queues
            || inflight.queue_size == 0
            || usize::from(inflight.queue_size) > MAX_QUEUE_SIZE
        {
            tracing::warn!(
                export = %self.core.name,
                "GET_INFLIGHT_FD for {} queues of {} refused: the export has {} queues, rings hold 1..={MAX_QUEUE_SIZE}",
                inflight.num_queues,
                inflight.queue_size,
                self.core.num_queues
            );
            return Err(VuError::InvalidParam);
        }
        let region = InflightRegion::create(inflight.num_queues, inflight.queue_size).map_err(internal)?;
        let file = region.file().try_clone().map_err(VuError::ReqHandlerError)?;
        let reply = VhostUserInflight {
            mmap_size: region.len() as u64,
            mmap_offset: 0,
            num_queues: inflight.num_queues,
            queue_size: inflight.queue_size,
        };
        self.install_inflight(region);
        Ok((reply, file))
    }

    fn set_inflight_fd(&mut self, inflight: &VhostUserInflight, file: File) -> VuResult<()> {
        if inflight.num_queues > self.core.num_queues {
            return Err(VuError::InvalidParam);
        }
        let region = InflightRegion::map(
            file,
            inflight.mmap_size,
            inflight.mmap_offset,
            inflight.num_queues,
            inflight.queue_size,
        )
        .map_err(internal)?;
        self.install_inflight(region);
        Ok(())
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Ok(MAX_MEM_SLOTS as u64)
    }

    fn add_mem_region(
        &mut self,
        region: &VhostUserSingleMemoryRegion,
        fd: File,
        postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        if postcopy_listening.is_some() {
            return Err(invalid("postcopy is not supported"));
        }
        if self.memory.len() >= MAX_MEM_SLOTS {
            return Err(invalid("no free memory slot"));
        }
        self.memory.add(region, fd).map_err(internal)?;
        for i in 0..self.vrings.len() {
            self.try_start(i)?;
        }
        Ok(None)
    }

    fn remove_mem_region(&mut self, region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        self.memory.remove(region.guest_phys_addr, region.memory_size).map_err(internal)
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(invalid("device state transfer is not supported"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(invalid("device state transfer is not supported"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(invalid("shared memory regions are not supported"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(invalid("dirty logging is not supported"))
    }
}

/// Sets O_NONBLOCK on a file the front end handed over.
fn set_nonblocking(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor the File owns; no pointers involved.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl BlkHandler {
    fn install_inflight(&mut self, region: InflightRegion) {
        // Rings keep the window they already hold; new starts take theirs from the region.
        for vr in self.vrings.iter_mut() {
            if vr.worker.is_none() {
                vr.inflight = None;
            }
        }
        self.inflight = Some(region);
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::FromRawFd;
    use std::os::unix::fs::FileExt;
    use std::time::{Duration, Instant};

    use udm_drivers::backends::mem::MemDevice;
    use udm_drivers::BlockDevice;

    use super::*;
    use crate::vhost_blk::export::{ExportConfig, ExportCore};
    use crate::vhost_blk::PollMode;

    fn fd_file(fd: i32) -> File {
        assert!(fd >= 0);
        // SAFETY: a descriptor this test just created and hands to the File alone.
        unsafe { File::from_raw_fd(fd) }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    }

    /// A request the previous udm popped (marked in the inflight region) but never
    /// completed is redone by the new one, exactly once, and the ring resumes after it.
    #[test]
    fn a_request_left_in_flight_by_a_dead_back_end_is_redone_once() {
        let dev: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(1 << 20, 512).unwrap());
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        udm_mapping::sync_io::write(dev.as_ref(), 8, &data, false).unwrap();
        let cfg = ExportConfig {
            name: "t".into(),
            socket: "/nonexistent".into(),
            device: "t".into(),
            num_queues: 1,
            queue_size: 8,
            read_only: false,
            poll: PollMode::Event,
            idle_poll_us: crate::vhost_blk::export::default_idle_poll_us(),
            cpus: vec![],
            serial: None,
            socket_mode: None,
            socket_group: None,
        };
        let core = ExportCore::new(&cfg, dev).unwrap();
        let mut h = BlkHandler::new(Arc::clone(&core));

        // Guest memory: a 1 MiB memfd. Ring layout: descriptors at 0, avail at 0x1000,
        // used at 0x2000; a READ of sector 8 into 0x10000 with its status at 0x9000.
        // SAFETY: plain memfd_create with a static name.
        let mem = fd_file(unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) });
        mem.set_len(1 << 20).unwrap();
        let (next, write) = (1u16, 2u16);
        mem.write_at(&desc(0x8000, 16, next, 1), 0).unwrap();
        mem.write_at(&desc(0x10000, 4096, next | write, 2), 16).unwrap();
        mem.write_at(&desc(0x9000, 1, write, 0), 32).unwrap();
        let mut hdr = [0u8; 16];
        hdr[8..16].copy_from_slice(&8u64.to_le_bytes());
        mem.write_at(&hdr, 0x8000).unwrap();
        mem.write_at(&[0xff], 0x9000).unwrap();
        mem.write_at(&[0, 0, 1, 0, 0, 0], 0x1000).unwrap(); // flags 0, idx 1, ring[0] = head 0

        // The previous back end took head 0 and died.
        let region = InflightRegion::create(1, 8).unwrap();
        let mut q = region.queue(0).unwrap();
        q.recover(0, 8);
        q.take(0);
        drop(q);

        let va = 0x7000_0000u64;
        h.set_features((1 << 32) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()).unwrap();
        h.set_mem_table(&[VhostUserMemoryRegion::new(0, 1 << 20, va, 0)], vec![mem.try_clone().unwrap()], None)
            .unwrap();
        let inflight =
            VhostUserInflight { mmap_size: region.len() as u64, mmap_offset: 0, num_queues: 1, queue_size: 8 };
        h.set_inflight_fd(&inflight, region.file().try_clone().unwrap()).unwrap();
        h.set_vring_num(0, 8).unwrap();
        h.set_vring_addr(0, VhostUserVringAddrFlags::empty(), va, va + 0x2000, va + 0x1000, 0).unwrap();
        h.set_vring_base(0, 0).unwrap();
        // SAFETY: eventfd with constant flags.
        h.set_vring_call(0, Some(fd_file(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) }))).unwrap();
        // SAFETY: as above.
        h.set_vring_kick(0, Some(fd_file(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK) }))).unwrap();
        h.set_vring_enable(0, true).unwrap();

        let deadline = Instant::now() + Duration::from_secs(10);
        let mut used = [0u8; 12];
        loop {
            mem.read_at(&mut used, 0x2000).unwrap();
            if u16::from_le_bytes([used[2], used[3]]) == 1 {
                break;
            }
            assert!(Instant::now() < deadline, "the in-flight request was not redone");
            std::thread::sleep(Duration::from_millis(10));
        }
        let state = h.get_vring_base(0).unwrap();
        let num = state.num;
        assert_eq!(num, 1, "the ring resumes after the redone request, which is not popped again");
        assert_eq!(u32::from_le_bytes(used[4..8].try_into().unwrap()), 0, "used id");
        assert_eq!(u32::from_le_bytes(used[8..12].try_into().unwrap()), 4097, "used len");
        let mut status = [0xffu8];
        mem.read_at(&mut status, 0x9000).unwrap();
        assert_eq!(status[0], 0);
        let mut got = vec![0u8; 4096];
        mem.read_at(&mut got, 0x10000).unwrap();
        assert_eq!(got, data);
        assert_eq!(core.shared.stats[0].snapshot().reads, 1);
        // The region now says nothing is in flight.
        let mut q = region.queue(0).unwrap();
        assert!(q.recover(1, 8).resubmit.is_empty());
    }
}
