//! One NVMe controller: bring-up as the specification orders it (disable, admin queue,
//! enable, identify, number of queues, shadow doorbells), admin commands, I/O queue pair
//! creation, recovery by controller reset, and shutdown on drop.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::dma::{DmaMemory, PagePolicy};
use crate::error::DeviceError;
use crate::nvme::cmd::{cns, feature, Command, CompletionEntry};
use crate::nvme::dma_space::DmaSpace;
use crate::nvme::identify::{parse_namespace_list, ControllerIdentity, NamespaceIdentity, OACS_DOORBELL_BUFFER_CONFIG};
use crate::nvme::regs::{self, Capabilities, Registers};
use crate::nvme::ring::{QueueRing, RingLayout, ShadowDoorbells};
use crate::nvme::status::status_name;
use crate::nvme::vfio::VfioPci;
use crate::MemoryRegion;

/// Entries in the admin queues: admin commands are rare and synchronous.
const ADMIN_ENTRIES: u16 = 32;
/// Page size udm configures (CC.MPS = 0).
const PAGE: usize = 4096;
/// Admin memory pages: submission queue, completion queue, data page, shadow doorbells,
/// event indexes.
const ADMIN_PAGES: usize = 5;

/// Knobs for opening a controller.
#[derive(Debug, Clone)]
pub struct ControllerOptions {
    /// An I/O command not completed within this time is aborted, then the controller is
    /// reset (and the command failed with `TimedOut`).
    pub io_timeout: Duration,
    /// How long an admin command may take.
    pub admin_timeout: Duration,
    /// Use shadow doorbells (Doorbell Buffer Config) when the controller offers them.
    pub shadow_doorbells: bool,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        ControllerOptions {
            io_timeout: Duration::from_secs(30),
            admin_timeout: Duration::from_secs(30),
            shadow_doorbells: true,
        }
    }
}

/// An admin command failed with an NVMe status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminStatus {
    /// Status Code Type.
    pub sct: u8,
    /// Status Code.
    pub sc: u8,
}

struct AdminQueue {
    ring: QueueRing,
    next_cid: u16,
}

/// An NVMe controller opened through VFIO.
pub struct Controller {
    pci: VfioPci,
    regs: Registers,
    space: Arc<DmaSpace>,
    caps: Capabilities,
    identity: ControllerIdentity,
    options: ControllerOptions,
    admin: Mutex<AdminQueue>,
    admin_memory: DmaMemory,
    admin_iova: u64,
    /// Bumped by every controller reset: queues compare it to recreate themselves.
    generation: AtomicU64,
    /// A reset failed: the controller is unusable.
    dead: AtomicBool,
    io_queue_pairs: u16,
    free_qids: Mutex<Vec<u16>>,
    shadow: bool,
    namespaces: Vec<(u32, NamespaceIdentity)>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("bdf", &self.pci.bdf())
            .field("model", &self.identity.model)
            .field("io_queue_pairs", &self.io_queue_pairs)
            .finish()
    }
}

fn driver_err(bdf: &str, what: impl std::fmt::Display) -> DeviceError {
    DeviceError::Driver(format!("NVMe controller {bdf}: {what}"))
}

impl Controller {
    /// Opens and initialises the controller at `bdf` in `space`.
    pub fn open(space: &Arc<DmaSpace>, bdf: &str, options: ControllerOptions) -> Result<Arc<Self>, DeviceError> {
        let pci = VfioPci::open(space.container(), bdf)?;
        let bdf = pci.bdf().to_string();
        let regs = pci.registers();
        let caps = Capabilities::decode(regs.read64(regs::CAP));
        if !caps.nvm_command_set {
            return Err(driver_err(&bdf, "does not support the NVM command set"));
        }
        if caps.min_page_size > PAGE {
            return Err(driver_err(
                &bdf,
                format!("needs pages of at least {} bytes; udm uses 4 KiB", caps.min_page_size),
            ));
        }
        let admin_memory = DmaMemory::allocate(ADMIN_PAGES * PAGE, PagePolicy::PreferHuge)?;
        let admin_iova = space.map(admin_memory.region())?;
        let admin_ring = Self::admin_ring(&regs, &caps, &admin_memory);
        let mut ctrl = Controller {
            pci,
            regs,
            space: Arc::clone(space),
            caps,
            identity: ControllerIdentity::parse(&[0u8; 4096]),
            options,
            admin: Mutex::new(AdminQueue { ring: admin_ring, next_cid: 0 }),
            admin_memory,
            admin_iova,
            generation: AtomicU64::new(0),
            dead: AtomicBool::new(false),
            io_queue_pairs: 0,
            free_qids: Mutex::new(Vec::new()),
            shadow: false,
            namespaces: Vec::new(),
        };
        {
            let mut admin = ctrl.admin.lock().expect("admin lock");
            ctrl.enable(&mut admin)?;
            let data = ctrl.identify(&mut admin, cns::CONTROLLER, 0)?;
            ctrl.identity = ControllerIdentity::parse(&data);
            ctrl.shadow = ctrl.options.shadow_doorbells && ctrl.identity.oacs & OACS_DOORBELL_BUFFER_CONFIG != 0;
            let pairs = ctrl.set_queue_count(&mut admin)?;
            // The shadow doorbell page holds two slots per queue (admin included).
            let fit = (PAGE / (2 * ctrl.caps.doorbell_stride)) as u16 - 1;
            ctrl.io_queue_pairs = pairs.min(fit);
            if ctrl.shadow {
                if let Err(e) = ctrl.configure_shadow(&mut admin) {
                    // Doorbell registers work everywhere; shadow doorbells only save MMIO.
                    tracing::warn!(bdf = %bdf, error = %e, "shadow doorbells refused: using MMIO doorbells");
                    ctrl.shadow = false;
                }
            }
            ctrl.namespaces = ctrl.scan_namespaces(&mut admin)?;
        }
        *ctrl.free_qids.lock().expect("qid lock") = (1..=ctrl.io_queue_pairs).rev().collect();
        tracing::info!(
            bdf = %bdf, model = %ctrl.identity.model, serial = %ctrl.identity.serial,
            queues = ctrl.io_queue_pairs, mqes = ctrl.caps.max_queue_entries, mdts = ctrl.identity.mdts,
            shadow = ctrl.shadow, "NVMe controller ready"
        );
        Ok(Arc::new(ctrl))
    }

    fn admin_page(memory: &DmaMemory, page: usize) -> NonNull<u8> {
        // SAFETY: page < ADMIN_PAGES, inside the allocation.
        NonNull::new(unsafe { memory.as_ptr().add(page * PAGE) }).expect("non-null allocation")
    }

    fn admin_ring(regs: &Registers, caps: &Capabilities, memory: &DmaMemory) -> QueueRing {
        let layout = RingLayout {
            qid: 0,
            entries: ADMIN_ENTRIES,
            sq: Self::admin_page(memory, 0).cast(),
            cq: Self::admin_page(memory, 1).cast(),
            sq_doorbell: regs.doorbell_ptr(regs::sq_tail_doorbell(0, caps.doorbell_stride)),
            cq_doorbell: regs.doorbell_ptr(regs::cq_head_doorbell(0, caps.doorbell_stride)),
            // Admin doorbells always go through MMIO.
            shadow: None,
        };
        // SAFETY: pages 0 and 1 of the admin memory belong to this ring alone; the
        // doorbells are the admin queue's; both outlive the ring (owned by the controller).
        unsafe { QueueRing::new(layout) }
    }

    /// The PCI address.
    pub fn bdf(&self) -> &str {
        self.pci.bdf()
    }

    /// What Identify Controller said.
    pub fn identity(&self) -> &ControllerIdentity {
        &self.identity
    }

    /// The CAP register, decoded.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The NVMe version the controller implements, as `major.minor.tertiary`.
    pub fn version(&self) -> String {
        let vs = self.regs.read32(regs::VS);
        format!("{}.{}.{}", vs >> 16, (vs >> 8) & 0xff, vs & 0xff)
    }

    /// The options it was opened with.
    pub fn options(&self) -> &ControllerOptions {
        &self.options
    }

    /// Active namespaces and what Identify Namespace said about them.
    pub fn namespaces(&self) -> &[(u32, NamespaceIdentity)] {
        &self.namespaces
    }

    /// I/O queue pairs the controller granted.
    pub fn io_queue_pairs(&self) -> u16 {
        self.io_queue_pairs
    }

    /// Whether shadow doorbells are in use.
    pub fn uses_shadow_doorbells(&self) -> bool {
        self.shadow
    }

    /// The DMA space (IOMMU domain) the controller lives in.
    pub fn dma_space(&self) -> &Arc<DmaSpace> {
        &self.space
    }

    /// The largest transfer one command may carry, in bytes (from MDTS).
    pub fn max_transfer(&self) -> usize {
        let limit = crate::nvme::prp::MAX_COMMAND_BYTES;
        match self.identity.mdts {
            0 => limit,
            m if m >= 20 => limit,
            m => (self.caps.min_page_size << m).min(limit),
        }
    }

    /// The reset generation (changes whenever the controller was reset).
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Whether a reset failed and the controller cannot be used.
    #[inline]
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// The controller reports a fatal error (CSTS.CFS), or reads as all ones (gone).
    pub fn is_fatal(&self) -> bool {
        let csts = self.regs.read32(regs::CSTS);
        csts == u32::MAX || csts & regs::CSTS_CFS != 0
    }

    fn wait_ready(&self, ready: bool) -> Result<(), DeviceError> {
        let deadline = Instant::now() + Duration::from_millis(self.caps.timeout_ms.max(500));
        loop {
            let csts = self.regs.read32(regs::CSTS);
            if csts == u32::MAX {
                return Err(driver_err(self.bdf(), "registers read as all ones: the device is gone"));
            }
            if (csts & regs::CSTS_RDY != 0) == ready {
                return Ok(());
            }
            if ready && csts & regs::CSTS_CFS != 0 {
                return Err(driver_err(self.bdf(), "controller fatal status (CSTS.CFS) while enabling"));
            }
            if Instant::now() > deadline {
                return Err(driver_err(
                    self.bdf(),
                    format!("CSTS.RDY did not become {} within CAP.TO ({} ms)", u8::from(ready), self.caps.timeout_ms),
                ));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Disables the controller (firmware or a killed process may have left it enabled),
    /// sets up the admin queue and enables it again.
    fn enable(&self, admin: &mut AdminQueue) -> Result<(), DeviceError> {
        let cc = self.regs.read32(regs::CC);
        if cc & regs::CC_EN != 0 {
            self.regs.write32(regs::CC, cc & !regs::CC_EN);
        }
        self.wait_ready(false)?;
        admin.ring.restart();
        admin.next_cid = 0;
        let entries = u32::from(ADMIN_ENTRIES - 1);
        self.regs.write32(regs::AQA, (entries << 16) | entries);
        self.regs.write64(regs::ASQ, self.admin_iova);
        self.regs.write64(regs::ACQ, self.admin_iova + PAGE as u64);
        self.regs.write32(regs::CC, regs::CC_IO_ENTRY_SIZES | regs::CC_EN);
        self.wait_ready(true)
    }

    /// Runs one admin command to completion (polling), returning its DW0.
    fn run_admin(&self, admin: &mut AdminQueue, mut cmd: Command) -> Result<Result<u32, AdminStatus>, DeviceError> {
        let cid = admin.next_cid;
        // CID FFFFh is reserved (it means "no command" in the error log).
        admin.next_cid = if admin.next_cid >= 0xfffe { 0 } else { admin.next_cid + 1 };
        cmd.set_cid(cid);
        admin.ring.push(&cmd);
        admin.ring.ring_sq();
        let deadline = Instant::now() + self.options.admin_timeout;
        loop {
            while let Some(e) = admin.ring.pop() {
                admin.ring.ring_cq();
                if e.cid == cid {
                    return Ok(decode(&e));
                }
                tracing::debug!(cid = e.cid, "stale admin completion ignored");
            }
            if Instant::now() > deadline {
                return Err(driver_err(
                    self.bdf(),
                    format!(
                        "admin command {:#04x} did not complete within {:?}",
                        cmd.opcode(),
                        self.options.admin_timeout
                    ),
                ));
            }
            std::hint::spin_loop();
        }
    }

    fn admin_ok(&self, admin: &mut AdminQueue, cmd: Command, what: &str) -> Result<u32, DeviceError> {
        self.run_admin(admin, cmd)?.map_err(|s| {
            driver_err(
                self.bdf(),
                format!("{what} failed: {} (SCT {:#x}, SC {:#x})", status_name(s.sct, s.sc), s.sct, s.sc),
            )
        })
    }

    /// Runs an admin command; for tools and tests.
    pub fn admin_command(&self, cmd: Command) -> Result<Result<u32, AdminStatus>, DeviceError> {
        let mut admin = self.admin.lock().expect("admin lock");
        self.run_admin(&mut admin, cmd)
    }

    fn data_page(&self) -> (*mut u8, u64) {
        (Self::admin_page(&self.admin_memory, 2).as_ptr(), self.admin_iova + 2 * PAGE as u64)
    }

    fn identify(&self, admin: &mut AdminQueue, cns: u32, nsid: u32) -> Result<Box<[u8; 4096]>, DeviceError> {
        let (ptr, iova) = self.data_page();
        // SAFETY: the data page is PAGE bytes of admin memory, idle between commands
        // (the admin lock is held).
        unsafe { std::ptr::write_bytes(ptr, 0, PAGE) };
        self.admin_ok(admin, Command::identify(cns, nsid, iova), &format!("Identify (CNS {cns}, NSID {nsid})"))?;
        let mut out = Box::new([0u8; 4096]);
        // SAFETY: the command completed: the device is done writing the page.
        unsafe { std::ptr::copy_nonoverlapping(ptr, out.as_mut_ptr(), PAGE) };
        Ok(out)
    }

    /// Identify Controller, fresh from the device.
    pub fn identify_controller_raw(&self) -> Result<Box<[u8; 4096]>, DeviceError> {
        let mut admin = self.admin.lock().expect("admin lock");
        self.identify(&mut admin, cns::CONTROLLER, 0)
    }

    /// Asks for as many I/O queue pairs as possible; returns how many were granted.
    fn set_queue_count(&self, admin: &mut AdminQueue) -> Result<u16, DeviceError> {
        let want = 0xfffe_u32;
        let dw0 = self.admin_ok(
            admin,
            Command::set_features(feature::NUMBER_OF_QUEUES, (want << 16) | want),
            "Set Features (Number of Queues)",
        )?;
        let sq = (dw0 & 0xffff) as u16;
        let cq = (dw0 >> 16) as u16;
        Ok(sq.min(cq).saturating_add(1))
    }

    fn shadow_pages(&self) -> (*mut u32, *mut u32) {
        (
            Self::admin_page(&self.admin_memory, 3).as_ptr().cast(),
            Self::admin_page(&self.admin_memory, 4).as_ptr().cast(),
        )
    }

    fn configure_shadow(&self, admin: &mut AdminQueue) -> Result<(), DeviceError> {
        let (shadow, event) = self.shadow_pages();
        // SAFETY: pages 3 and 4 of the admin memory; the device does not use them until
        // the command below.
        unsafe {
            std::ptr::write_bytes(shadow.cast::<u8>(), 0, PAGE);
            std::ptr::write_bytes(event.cast::<u8>(), 0, PAGE);
        }
        let base = self.admin_iova;
        self.admin_ok(
            admin,
            Command::doorbell_buffer_config(base + 3 * PAGE as u64, base + 4 * PAGE as u64),
            "Doorbell Buffer Config",
        )?;
        Ok(())
    }

    fn scan_namespaces(&self, admin: &mut AdminQueue) -> Result<Vec<(u32, NamespaceIdentity)>, DeviceError> {
        let ids = match self.identify(admin, cns::ACTIVE_NAMESPACES, 0) {
            Ok(list) => parse_namespace_list(&list),
            // NVMe 1.0 controllers lack the list: every NSID up to NN is a candidate.
            Err(_) => (1..=self.identity.namespaces).collect(),
        };
        let mut out = Vec::new();
        for nsid in ids {
            let ns = NamespaceIdentity::parse(&*self.identify(admin, cns::NAMESPACE, nsid)?);
            if ns.size_blocks == 0 {
                continue;
            }
            out.push((nsid, ns));
        }
        Ok(out)
    }

    /// Takes a free I/O queue identifier.
    pub(crate) fn take_qid(&self) -> Result<u16, DeviceError> {
        self.free_qids.lock().expect("qid lock").pop().ok_or_else(|| {
            driver_err(
                self.bdf(),
                format!("all {} I/O queue pairs are in use: open fewer queues (one per thread)", self.io_queue_pairs),
            )
        })
    }

    /// Gives a queue identifier back.
    pub(crate) fn release_qid(&self, qid: u16) {
        self.free_qids.lock().expect("qid lock").push(qid);
    }

    /// The doorbell registers and (if configured) shadow slots of queue pair `qid`.
    pub(crate) fn doorbells(&self, qid: u16) -> (NonNull<u32>, NonNull<u32>, Option<ShadowDoorbells>) {
        let stride = self.caps.doorbell_stride;
        let sq = self.regs.doorbell_ptr(regs::sq_tail_doorbell(qid, stride));
        let cq = self.regs.doorbell_ptr(regs::cq_head_doorbell(qid, stride));
        let shadow = self.shadow.then(|| {
            let (s, e) = self.shadow_pages();
            let words = stride / 4;
            let sqi = 2 * qid as usize * words;
            let cqi = (2 * qid as usize + 1) * words;
            // SAFETY: qid <= io_queue_pairs, which was limited so that every slot lies in
            // the shadow and event pages.
            unsafe {
                ShadowDoorbells {
                    sq_tail: NonNull::new_unchecked(s.add(sqi)),
                    cq_head: NonNull::new_unchecked(s.add(cqi)),
                    sq_event: NonNull::new_unchecked(e.add(sqi)),
                    cq_event: NonNull::new_unchecked(e.add(cqi)),
                }
            }
        });
        (sq, cq, shadow)
    }

    /// Creates I/O queue pair `qid` on the controller (completion queue first).
    pub(crate) fn create_queue_pair(
        &self,
        qid: u16,
        entries: u16,
        sq_iova: u64,
        cq_iova: u64,
    ) -> Result<(), DeviceError> {
        let mut admin = self.admin.lock().expect("admin lock");
        self.admin_ok(&mut admin, Command::create_cq(qid, entries, cq_iova), &format!("Create I/O CQ {qid}"))?;
        if let Err(e) =
            self.admin_ok(&mut admin, Command::create_sq(qid, entries, sq_iova, qid), &format!("Create I/O SQ {qid}"))
        {
            let _ = self.run_admin(&mut admin, Command::delete_cq(qid));
            return Err(e);
        }
        Ok(())
    }

    /// Deletes I/O queue pair `qid` (submission queue first); the controller completes
    /// or aborts what was in it.
    pub(crate) fn delete_queue_pair(&self, qid: u16) -> Result<(), DeviceError> {
        let mut admin = self.admin.lock().expect("admin lock");
        self.admin_ok(&mut admin, Command::delete_sq(qid), &format!("Delete I/O SQ {qid}"))?;
        self.admin_ok(&mut admin, Command::delete_cq(qid), &format!("Delete I/O CQ {qid}"))?;
        Ok(())
    }

    /// Asks the controller to abort command `cid` of queue `qid`; true if it says it did.
    pub(crate) fn abort(&self, qid: u16, cid: u16) -> bool {
        match self.admin_command(Command::abort(qid, cid)) {
            // DW0 bit 0 clear: the command was aborted.
            Ok(Ok(dw0)) => dw0 & 1 == 0,
            _ => false,
        }
    }

    /// Resets the controller unless someone already did since `seen_generation`: every
    /// I/O queue is forgotten by the device; each queue recreates itself when it next
    /// runs (and retries or fails what it had outstanding).
    pub fn reset(&self, seen_generation: u64) -> Result<(), DeviceError> {
        let mut admin = self.admin.lock().expect("admin lock");
        if self.generation() != seen_generation || self.is_dead() {
            return Ok(());
        }
        tracing::warn!(bdf = %self.bdf(), "resetting NVMe controller");
        let result = (|| {
            self.enable(&mut admin)?;
            let pairs = self.set_queue_count(&mut admin)?;
            if pairs < self.io_queue_pairs {
                return Err(driver_err(self.bdf(), format!("after reset only {pairs} I/O queue pairs are granted")));
            }
            if self.shadow {
                self.configure_shadow(&mut admin)?;
            }
            Ok(())
        })();
        if let Err(e) = &result {
            tracing::error!(bdf = %self.bdf(), error = %e, "NVMe controller reset failed");
            self.dead.store(true, Ordering::Release);
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        result
    }

    /// Resets the controller now (an operator's or a test's request).
    pub fn reset_now(&self) -> Result<(), DeviceError> {
        self.reset(self.generation())
    }

    /// Maps a region for DMA; see [`DmaSpace::map`].
    pub fn map(&self, region: MemoryRegion) -> Result<u64, DeviceError> {
        self.space.map(region)
    }
}

fn decode(e: &CompletionEntry) -> Result<u32, AdminStatus> {
    match e.status_code() {
        (0, 0) => Ok(e.dw0),
        (sct, sc) => Err(AdminStatus { sct, sc }),
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        // Normal shutdown (CC.SHN = 01b), so a real SSD flushes its cache and records a
        // clean shutdown; then wait for CSTS.SHST = complete.
        let cc = self.regs.read32(regs::CC);
        if cc & regs::CC_EN != 0 && !self.is_dead() {
            self.regs.write32(regs::CC, (cc & !regs::CC_SHN_MASK) | regs::CC_SHN_NORMAL);
            let deadline = Instant::now() + Duration::from_millis(self.caps.timeout_ms.max(1000));
            while self.regs.read32(regs::CSTS) & regs::CSTS_SHST_MASK != regs::CSTS_SHST_COMPLETE {
                if Instant::now() > deadline {
                    tracing::warn!(bdf = %self.bdf(), "controller did not finish shutting down in time");
                    break;
                }
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        // Disabled, it stops touching memory before the mappings go away.
        let cc = self.regs.read32(regs::CC);
        self.regs.write32(regs::CC, cc & !regs::CC_EN & !regs::CC_SHN_MASK);
        let _ = self.wait_ready(false);
        if let Err(e) = self.space.unmap(self.admin_memory.region()) {
            tracing::warn!(error = %e, "unmapping admin memory");
        }
    }
}
