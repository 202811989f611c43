//! Power cuts for the snapshot crash tests: RAM disks behind fault devices with a
//! volatile write cache, all on one power rail (the disks of one machine), and a model
//! of what a client may find on a device after the cut: for every sector, the data it
//! had when the client last made it durable (a flush that completed, or a FUA write),
//! or data written after that; nothing else.

use std::sync::Arc;

use udm_drivers::backends::fault::{FaultControl, FaultDevice};
use udm_drivers::{BlockDevice, IoError, IoQueue, IoRequest};
use udm_mapping::exception_store::sync_io;

use super::{mem_with, submit_writes, Rng};

/// Disks of one machine: the media (what survives a power cut) and the fault devices
/// in front of them, which share one power rail.
pub struct Machine {
    pub media: Vec<Arc<dyn BlockDevice>>,
    pub faulty: Vec<Arc<FaultDevice>>,
}

impl Machine {
    /// One RAM disk per image, behind fault devices sharing one power rail. Nothing is
    /// armed: arm with [`Machine::arm`].
    pub fn new(images: &[&[u8]]) -> Self {
        let media: Vec<Arc<dyn BlockDevice>> = images.iter().map(|image| mem_with(image)).collect();
        let faulty: Vec<Arc<FaultDevice>> = media.iter().map(|m| Arc::new(FaultDevice::new(Arc::clone(m)))).collect();
        for a in &faulty {
            for b in &faulty {
                a.control().share_power_with(&b.control());
            }
        }
        Machine { media, faulty }
    }

    /// Turns on every disk's volatile write cache; disk `trigger` cuts the power at its
    /// `cut`-th write from now. Each disk's cut is seeded from `seed`.
    pub fn arm(&self, trigger: usize, cut: u64, seed: u64) {
        for (i, f) in self.faulty.iter().enumerate() {
            let at = (i == trigger).then_some(cut);
            f.control().volatile_cache(at, seed ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        }
    }

    pub fn control(&self, disk: usize) -> Arc<FaultControl> {
        self.faulty[disk].control()
    }

    /// Whether the power is gone.
    pub fn power_lost(&self) -> bool {
        self.faulty.iter().any(|f| f.control().power_lost())
    }

    /// What the cut did on every disk, for failure messages.
    pub fn cut_summary(&self) -> String {
        let parts: Vec<String> = self
            .faulty
            .iter()
            .enumerate()
            .map(|(i, f)| match f.control().power_cut_report() {
                Some(r) => format!(
                    "disk {i}: {} unflushed, {} lost, {} torn, {} whole{}",
                    r.unflushed,
                    r.lost,
                    r.torn,
                    r.whole,
                    if r.reordered { ", reordered" } else { "" }
                ),
                None => format!("disk {i}: no cut"),
            })
            .collect();
        parts.join("; ")
    }
}

/// One client write.
#[derive(Debug, Clone)]
pub struct ClientWrite {
    pub sector: u64,
    pub data: Vec<u8>,
    pub fua: bool,
}

/// `n` writes of 1..=`max_sectors` sectors inside `0..sectors` that do not overlap one
/// another (so their order on the device does not matter), one in `fua_one_in` with FUA.
pub fn random_writes(rng: &mut Rng, sectors: u64, n: usize, max_sectors: u64, fua_one_in: u64) -> Vec<ClientWrite> {
    let mut writes: Vec<ClientWrite> = Vec::with_capacity(n);
    while writes.len() < n {
        let len = 1 + rng.below(max_sectors);
        let sector = rng.below(sectors - len);
        if writes.iter().any(|w| sector < w.sector + w.data.len() as u64 / 512 && w.sector < sector + len) {
            continue;
        }
        let fua = rng.below(fua_one_in) == 0;
        writes.push(ClientWrite { sector, data: rng.bytes(len as usize * 512), fua });
    }
    writes
}

/// Runs `writes` through `q` with up to 8 in flight; every one must succeed.
pub fn run_writes(q: &mut dyn IoQueue, writes: &[ClientWrite]) -> Result<(), IoError> {
    let results = submit_writes(q, writes.len(), |i| (writes[i].sector, &writes[i].data, writes[i].fua), 8);
    results.into_iter().collect()
}

/// A flush through `q`.
pub fn flush(q: &mut dyn IoQueue) -> Result<(), IoError> {
    sync_io::run(q, IoRequest::flush(0))
}

/// Where a sector's expected data is: the device's data before the workload, or a
/// client write (index into `ViewModel::writes`) at an offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Version {
    Initial,
    Written { write: u32, offset: u32 },
}

/// What a client may find on one device after a power cut. See the module documentation.
pub struct ViewModel {
    writes: Vec<ClientWrite>,
    durable: Vec<Version>,
    since: Vec<Vec<Version>>,
}

impl ViewModel {
    pub fn new(sectors: u64) -> Self {
        ViewModel {
            writes: Vec::new(),
            durable: vec![Version::Initial; sectors as usize],
            since: vec![Vec::new(); sectors as usize],
        }
    }

    /// Records writes the device acknowledged. `before_the_cut`: the power was still on
    /// when they completed, so their FUA counts.
    pub fn acknowledged(&mut self, writes: &[ClientWrite], before_the_cut: bool) {
        for w in writes {
            let index = self.writes.len() as u32;
            for k in 0..w.data.len() / 512 {
                let s = w.sector as usize + k;
                let v = Version::Written { write: index, offset: k as u32 };
                if w.fua && before_the_cut {
                    self.durable[s] = v;
                    self.since[s].clear();
                } else {
                    self.since[s].push(v);
                }
            }
            self.writes.push(w.clone());
        }
    }

    /// A flush completed before the cut: everything acknowledged so far is durable.
    pub fn flushed(&mut self) {
        for (durable, since) in self.durable.iter_mut().zip(&mut self.since) {
            if let Some(&newest) = since.last() {
                *durable = newest;
            }
            since.clear();
        }
    }

    fn bytes<'a>(&'a self, v: Version, sector: usize, initial: &'a [u8]) -> &'a [u8] {
        match v {
            Version::Initial => &initial[sector * 512..(sector + 1) * 512],
            Version::Written { write, offset } => {
                let at = offset as usize * 512;
                &self.writes[write as usize].data[at..at + 512]
            }
        }
    }

    /// Checks the device's contents `view` after the cut against the model, with
    /// `initial` the data before the client's writes (`initial_is` names it in
    /// messages). Describes the first bad sector.
    pub fn check(&self, view: &[u8], initial: &[u8], initial_is: &str) -> Result<(), String> {
        for (s, found) in view.chunks(512).enumerate() {
            let durable = self.durable[s];
            if found == self.bytes(durable, s, initial)
                || self.since[s].iter().any(|&v| found == self.bytes(v, s, initial))
            {
                continue;
            }
            let what = if found == &initial[s * 512..(s + 1) * 512] {
                initial_is.to_string()
            } else if (0..self.writes.len()).any(|w| {
                let w = &self.writes[w];
                (w.sector as usize..w.sector as usize + w.data.len() / 512).contains(&s)
                    && found == &w.data[(s - w.sector as usize) * 512..(s - w.sector as usize + 1) * 512]
            }) {
                "an older write, overwritten before the last flush".to_string()
            } else {
                format!("data that is neither {initial_is} nor a client write there (stale or garbage)")
            };
            return Err(format!(
                "sector {s} holds {what}; expected its durable version ({durable:?}) or one of the {} writes since",
                self.since[s].len()
            ));
        }
        Ok(())
    }
}

/// Disk images for a crash test: an origin of `origin_sectors` and a COW of `cow_sectors`,
/// both of old junk (seeded), the COW's header zeroed (LVM zeroes the start of a new COW).
pub fn junk_disks(seed: u64, origin_sectors: u64, cow_sectors: u64) -> (Vec<u8>, Vec<u8>) {
    let mut rng = Rng(seed);
    let origin = rng.bytes((origin_sectors * 512) as usize);
    let mut cow = rng.bytes((cow_sectors * 512) as usize);
    cow[..4096].fill(0);
    (origin, cow)
}

/// Runs `crash_once(trigger disk, cut, seed)` for each of `disks` trigger disks at cut
/// points 1, then steps of 1..=`max_step` writes (seeded from `seed`), until a cut comes
/// after the workload's end (`crash_once` returns false). Returns how many crashes hit
/// the workload. With `UDM_CRASH_CASE=<disk>,<cut>,<seed>` in the environment (as
/// failure messages print it), runs that one case instead.
pub fn run_crashes(
    disks: usize,
    seed: u64,
    max_step: u64,
    mut crash_once: impl FnMut(usize, u64, u64) -> bool,
) -> usize {
    if let Ok(case) = std::env::var("UDM_CRASH_CASE") {
        let v: Vec<u64> =
            case.split(',').map(|x| x.trim().parse().expect("UDM_CRASH_CASE=<disk>,<cut>,<seed>")).collect();
        assert_eq!(v.len(), 3, "UDM_CRASH_CASE=<disk>,<cut>,<seed>");
        crash_once(v[0] as usize, v[1], v[2]);
        return usize::MAX;
    }
    let mut rng = Rng(seed);
    let mut crashes = 0;
    for trigger in 0..disks {
        let mut cut = 1;
        while crash_once(trigger, cut, rng.next()) {
            crashes += 1;
            cut += 1 + rng.below(max_step);
        }
    }
    crashes
}
