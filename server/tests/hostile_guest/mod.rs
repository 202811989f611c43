//! A hostile vhost-user front end for tests: it speaks vhost-user itself (the `vhost`
//! crate's `Frontend`) and plays the guest by writing descriptor rings into a memfd it
//! shares, so it can send what QEMU or libblkio never would. Shared by the in-process
//! containment tests (`server/tests/vhost_hostile_frontend.rs`) and the soak test
//! against the real daemon (`tests/tests/soak.rs`).
#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use vhost::vhost_user::message::{VhostUserHeaderFlag, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vmm_sys_util::eventfd::EventFd;

pub const QUEUE: u16 = 8;
/// Guest layout: descriptor table, available ring, used ring, request headers, statuses,
/// data.
pub const DESC: u64 = 0x0;
pub const AVAIL: u64 = 0x1000;
pub const USED: u64 = 0x2000;
pub const HEADERS: u64 = 0x3000;
pub const STATUSES: u64 = 0x4000;
pub const DATA: u64 = 0x10000;
/// Where the front end pretends to have guest memory mapped (vring addresses use it).
pub const USER_BASE: u64 = 0x7000_0000_0000;
pub const MIB: u64 = 1 << 20;

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const T_IN: u32 = 0;
pub const T_GET_ID: u32 = 8;
pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;

/// A memfd of `len` bytes (sparse): guest memory.
pub fn memfd(len: u64) -> File {
    // SAFETY: plain memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"guest".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just created, owned by the File alone.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).unwrap();
    f
}

/// Polls `cond` until it holds; panics naming `what` after 20 s.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    // A guard against hanging forever, not a speed requirement.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A guest of one virtqueue: its memory, rings and the vhost-user connection.
pub struct Guest {
    pub fe: Frontend,
    pub mem: File,
    pub mem_len: u64,
    pub kick: EventFd,
    pub call: EventFd,
    pub avail_idx: u16,
    pub next_desc: u16,
}

impl Guest {
    /// Connects and negotiates; memory and ring come with [`Guest::start_ring`].
    pub fn connect(socket: &Path, mem_len: u64) -> Guest {
        let mut fe = Frontend::connect(socket, 1).expect("connect");
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        let version_1 = 1u64 << 32;
        fe.set_features(version_1 | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() | (features & version_1))
            .unwrap();
        let proto = fe.get_protocol_features().unwrap();
        let want = VhostUserProtocolFeatures::REPLY_ACK
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
            | VhostUserProtocolFeatures::INFLIGHT_SHMFD;
        fe.set_protocol_features(proto & want).unwrap();
        // Every request waits for the back end's verdict.
        fe.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
        Guest {
            fe,
            mem: memfd(mem_len),
            mem_len,
            kick: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            call: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            next_desc: 0,
        }
    }

    pub fn region(&self, file: &File, len: u64) -> VhostUserMemoryRegionInfo {
        VhostUserMemoryRegionInfo {
            guest_phys_addr: 0,
            memory_size: len,
            userspace_addr: USER_BASE,
            mmap_offset: 0,
            mmap_handle: file.as_raw_fd(),
        }
    }

    pub fn set_memory(&mut self) -> vhost::Result<()> {
        let region = self.region(&self.mem, self.mem_len);
        self.fe.set_mem_table(&[region]).map(|_| ())
    }

    /// Shares memory and starts virtqueue 0 at `base`.
    pub fn start_ring(&mut self, base: u16) {
        self.set_memory().expect("SET_MEM_TABLE");
        self.fe.set_vring_num(0, QUEUE).unwrap();
        let cfg = VringConfigData {
            queue_max_size: QUEUE,
            queue_size: QUEUE,
            flags: 0,
            desc_table_addr: USER_BASE + DESC,
            used_ring_addr: USER_BASE + USED,
            avail_ring_addr: USER_BASE + AVAIL,
            log_addr: None,
        };
        self.fe.set_vring_addr(0, &cfg).unwrap();
        self.fe.set_vring_base(0, base).unwrap();
        self.avail_idx = base;
        self.fe.set_vring_call(0, &self.call).unwrap();
        self.fe.set_vring_kick(0, &self.kick).unwrap();
        self.fe.set_vring_enable(0, true).unwrap();
    }

    pub fn put_desc(&mut self, addr: u64, len: u32, flags: u16) -> u16 {
        let i = self.next_desc % QUEUE;
        self.next_desc += 1;
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        let next = (i + 1) % QUEUE;
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_at(&d, DESC + u64::from(i) * 16).unwrap();
        i
    }

    /// Queues a request: header (type, sector), then `data` as (address, length,
    /// writable) and a status byte; returns the head and where its status goes.
    pub fn submit(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u16, u64) {
        let slot = u64::from(self.avail_idx % QUEUE);
        let (hdr_at, status_at) = (HEADERS + slot * 16, STATUSES + slot);
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&kind.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_at(&hdr, hdr_at).unwrap();
        self.mem.write_at(&[0xff], status_at).unwrap();
        // One request in flight at a time: every chain starts at descriptor 0.
        self.next_desc = 0;
        let head = self.put_desc(hdr_at, 16, F_NEXT);
        for &(addr, len, writable) in data {
            self.put_desc(addr, len, F_NEXT | if writable { F_WRITE } else { 0 });
        }
        self.put_desc(status_at, 1, F_WRITE);
        self.mem.write_at(&head.to_le_bytes(), AVAIL + 4 + slot * 2).unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem.write_at(&self.avail_idx.to_le_bytes(), AVAIL + 2).unwrap();
        self.kick.write(1).unwrap();
        (head, status_at)
    }

    pub fn used_idx(&self) -> u16 {
        let mut b = [0u8; 2];
        self.mem.read_at(&mut b, USED + 2).unwrap();
        u16::from_le_bytes(b)
    }

    /// The used entry `n` (id, len).
    pub fn used_entry(&self, n: u16) -> (u32, u32) {
        let mut e = [0u8; 8];
        self.mem.read_at(&mut e, USED + 4 + u64::from(n % QUEUE) * 8).unwrap();
        (u32::from_le_bytes(e[0..4].try_into().unwrap()), u32::from_le_bytes(e[4..8].try_into().unwrap()))
    }

    pub fn byte(&self, at: u64) -> u8 {
        let mut b = [0u8];
        self.mem.read_at(&mut b, at).unwrap();
        b[0]
    }

    /// Submits one request and waits for its completion; returns (status, used len).
    pub fn request(&mut self, kind: u32, sector: u64, data: &[(u64, u32, bool)]) -> (u8, u32) {
        let done = self.used_idx().wrapping_add(1);
        let (head, status_at) = self.submit(kind, sector, data);
        wait_until("the request to complete", || self.used_idx() == done);
        let (id, len) = self.used_entry(done.wrapping_sub(1));
        assert_eq!(id, u32::from(head));
        (self.byte(status_at), len)
    }
}
