//! The kernel's lifecycle of a mapped device (spec §1.2): create, load, suspend, resume,
//! clear, remove, rename.
//!
//! Waiting for a device's I/O to drain (suspend, remove, a resume that swaps tables)
//! happens without the registry lock, like the kernel's per-device `suspend_lock`: one
//! device whose I/O does not complete must not stop `ls` or the lifecycle of any other
//! device. While a device drains, other suspend and remove calls on it are refused
//! ([`MappingError::InTransition`]); a resume cancels the suspend (as a signal
//! interrupts the kernel's: the suspend is undone); load, clear, rename and the reports
//! go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use udm_drivers::BlockDevice;

use crate::error::MappingError;
use crate::mapped::{DrainStopped, MappedDevice};
use crate::registry::load::build_table;
use crate::registry::names::{validate_name, validate_uuid};
use crate::registry::{Entry, MappedEntry, Registry, SuspendFlags};
use crate::table::Table;
use crate::target::{EventCounter, SharedName};

/// The transition a suspend that is draining shows (see [`MappingError::InTransition`]).
const SUSPENDING: &str = "suspended";

impl Registry {
    /// Creates the mapped device `name`. With a table, loads it and resumes (dmsetup's
    /// three steps); if the table is refused the device is not created. Without one,
    /// the device exists with no table and I/O to it fails until load + resume.
    pub fn create(&self, name: &str, uuid: Option<&str>, table: Option<&str>) -> Result<(), MappingError> {
        validate_name(name)?;
        if let Some(u) = uuid {
            validate_uuid(u)?;
        }
        {
            let mut st = self.lock();
            if st.entries.contains_key(name) {
                return Err(MappingError::AlreadyExists(name.to_string()));
            }
            if let Some(u) = uuid {
                if st.entries.values().any(|e| e.uuid.as_deref() == Some(u)) {
                    return Err(MappingError::InvalidUuid { uuid: u.to_string(), reason: "another device has it" });
                }
            }
            let dev = MappedDevice::new();
            let block: Arc<dyn BlockDevice> = Arc::new(dev.clone());
            let id = st.new_id();
            st.entries.insert(
                name.to_string(),
                Entry {
                    id,
                    name: SharedName::new(name),
                    uuid: uuid.map(str::to_string),
                    opens: Arc::new(AtomicUsize::new(0)),
                    block,
                    mapped: Some(MappedEntry { dev, inactive: None, events: EventCounter::default() }),
                },
            );
        }
        let Some(text) = table else { return Ok(()) };
        let result = self.load(name, text).and_then(|()| self.resume(name));
        if result.is_err() {
            let mut st = self.lock();
            if let Some(e) = st.entries.remove(name) {
                if let Some(m) = e.mapped {
                    destroy_all(&m);
                    m.dev.mark_removed();
                }
            }
        }
        result
    }

    /// Builds `text` into the inactive slot of `name` (replacing a staged table). Live
    /// I/O is unaffected; `resume` makes it live. A refused table changes nothing.
    pub fn load(&self, name: &str, text: &str) -> Result<(), MappingError> {
        let types = self.types.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut st = self.lock();
        let entry = st.get(name)?;
        let Some(m) = &entry.mapped else { return Err(MappingError::NotMapped(name.to_string())) };
        let table = build_table(&st, &types, &self.extensions, name, entry.id, &m.events, text)
            .map_err(|source| MappingError::Table { name: name.to_string(), source: Box::new(source) })?;
        for region in m.dev.regions() {
            if let Err(source) = table.register_memory(region) {
                table.for_each_target(|t| t.destroy());
                return Err(MappingError::Device { name: name.to_string(), source });
            }
        }
        let m = st.get_mapped_mut(name)?;
        if let Some(old) = m.inactive.replace(Arc::new(table)) {
            old.for_each_target(|t| t.destroy());
        }
        Ok(())
    }

    /// Discards the inactive table.
    pub fn clear(&self, name: &str) -> Result<(), MappingError> {
        let mut st = self.lock();
        let m = st.get_mapped_mut(name)?;
        match m.inactive.take() {
            Some(t) => {
                t.for_each_target(|t| t.destroy());
                Ok(())
            }
            None => Err(MappingError::NoInactiveTable(name.to_string())),
        }
    }

    /// Suspends `name`: pre-suspend hooks, stop admitting (new I/O is held, in order),
    /// wait for all I/O in flight, flush the devices below (unless `noflush`),
    /// post-suspend hooks. Suspending a suspended device does nothing. The threads that
    /// own queues on the device must keep polling for the drain to finish. Waits as
    /// long as the drain takes (dmsetup's default); see [`Registry::suspend_within`].
    pub fn suspend(&self, name: &str, flags: SuspendFlags) -> Result<(), MappingError> {
        self.suspend_within(name, flags, None)
    }

    /// [`Registry::suspend`], giving up after `timeout` if I/O is still in flight: then
    /// the device is resumed as it was (held I/O released, the live table's resume
    /// hooks run) and the error says what was still in flight, per queue.
    pub fn suspend_within(
        &self,
        name: &str,
        flags: SuspendFlags,
        timeout: Option<Duration>,
    ) -> Result<(), MappingError> {
        let (dev, _transition) = {
            let st = self.lock();
            let m = st.get_mapped(name)?;
            if m.dev.is_suspended() && m.dev.transition().is_none() {
                return Ok(());
            }
            let t = m
                .dev
                .begin_transition(SUSPENDING)
                .map_err(|op| MappingError::InTransition { name: name.to_string(), op })?;
            (m.dev.clone(), t)
        };
        let deadline = timeout.map(|t| Instant::now() + t);
        suspend_device(&dev, flags, deadline).map_err(|stopped| {
            let name = name.to_string();
            match stopped {
                DrainStopped::TimedOut(in_flight) => {
                    tracing::warn!(device = %name, %in_flight, "suspend timed out; device left active");
                    MappingError::SuspendTimedOut { name, timeout: timeout.unwrap_or_default(), in_flight }
                }
                DrainStopped::Cancelled(in_flight) => {
                    tracing::info!(device = %name, %in_flight, "suspend cancelled by a resume");
                    MappingError::SuspendCancelled { name, in_flight }
                }
            }
        })
    }

    /// Resumes `name`. With an inactive table: suspends first if needed, runs the new
    /// table's pre-resume hooks (a refusal leaves the device suspended and the inactive
    /// table staged), swaps it live, destroys the old one. Then resume hooks, and the
    /// held I/O is released, mapped by the live table. Without one: a plain resume.
    pub fn resume(&self, name: &str) -> Result<(), MappingError> {
        self.cancel_suspend(name)?;
        let must_drain = {
            let st = self.lock();
            let m = st.get_mapped(name)?;
            m.inactive.is_some() && !m.dev.is_suspended()
        };
        if must_drain {
            // A table swaps only on a drained device; drain without the registry lock.
            self.suspend(name, SuspendFlags::default())?;
        }
        let mut st = self.lock();
        let m = st.get_mapped_mut(name)?;
        if let Some(op) = m.dev.transition() {
            return Err(MappingError::InTransition { name: name.to_string(), op });
        }
        let veto = |source| MappingError::Target { name: name.to_string(), source: Box::new(source) };
        match m.inactive.clone() {
            Some(new) => {
                if !m.dev.is_suspended() {
                    // Resumed by another command between the drain and here: drain again.
                    drop(st);
                    return self.resume(name);
                }
                preresume(&new).map_err(veto)?;
                m.inactive = None;
                let old = m.dev.live_table();
                m.dev.publish(Some(Arc::clone(&new)));
                if let Some(old) = old {
                    old.for_each_target(|t| t.destroy());
                }
                finish_resume(&m.dev, &new);
            }
            None => {
                if !m.dev.is_suspended() {
                    return Ok(());
                }
                if let Some(live) = m.dev.live_table() {
                    preresume(&live).map_err(veto)?;
                    finish_resume(&m.dev, &live);
                } else {
                    m.dev.start_admission();
                }
            }
        }
        Ok(())
    }

    /// If a suspend of `name` is still draining, makes it give up and waits (briefly:
    /// the drain checks every few microseconds) until it has undone itself.
    fn cancel_suspend(&self, name: &str) -> Result<(), MappingError> {
        let dev = {
            let st = self.lock();
            let m = st.get_mapped(name)?;
            if m.dev.transition() != Some(SUSPENDING) {
                return Ok(());
            }
            m.dev.clone()
        };
        dev.cancel_drain();
        // Past the drain, a suspend may be flushing the devices below; a resume then
        // waits for it a while, and is refused if it takes longer.
        let until = Instant::now() + Duration::from_secs(5);
        while let Some(op) = dev.transition() {
            if Instant::now() >= until {
                return Err(MappingError::InTransition { name: name.to_string(), op });
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        Ok(())
    }

    /// Removes `name`. Refused while another device's table uses it or an
    /// [`crate::registry::OpenDevice`] is open, unless `force`: then the device
    /// disappears from the namespace, its held and future I/O fail (`DeviceGone`), and
    /// tables still referring to it keep a handle that fails I/O.
    pub fn remove(&self, name: &str, force: bool) -> Result<(), MappingError> {
        let mut st = self.lock();
        let e = st.get(name)?;
        if let Some(op) = e.mapped.as_ref().and_then(|m| m.dev.transition()) {
            return Err(MappingError::InTransition { name: name.to_string(), op });
        }
        if !force {
            let holders = st.holders_of(e.id);
            let opens = e.opens.load(Ordering::Acquire);
            if !holders.is_empty() {
                return Err(MappingError::Busy {
                    name: name.to_string(),
                    reason: format!("used by the table of {}", holders.join(", ")),
                });
            }
            if opens > 0 {
                return Err(MappingError::Busy { name: name.to_string(), reason: format!("open {opens} time(s)") });
            }
        }
        let Some(e) = st.entries.remove(name) else { return Err(MappingError::NoSuchDevice(name.to_string())) };
        let Some(m) = e.mapped else { return Ok(()) };
        m.dev.mark_removed();
        if !m.dev.is_suspended() {
            m.dev.stop_admission();
            // Out of the namespace already: drain without the registry lock, then
            // destroy the tables under it, as every table change is.
            drop(st);
            let _ = m.dev.wait_drained(None);
            st = self.lock();
        }
        destroy_all(&m);
        m.dev.publish(None);
        drop(st);
        Ok(())
    }

    /// Renames `old` to `new`; tables referring to it print the new name from now on.
    pub fn rename(&self, old: &str, new: &str) -> Result<(), MappingError> {
        validate_name(new)?;
        let mut st = self.lock();
        st.get(old)?;
        if old == new {
            return Ok(());
        }
        if st.entries.contains_key(new) {
            return Err(MappingError::AlreadyExists(new.to_string()));
        }
        let e = st.entries.remove(old).expect("looked up above");
        e.name.set(new);
        st.entries.insert(new.to_string(), e);
        Ok(())
    }
}

/// Suspends one mapped device (see [`Registry::suspend`]); past `deadline` (or when
/// cancelled), resumes it and returns what was still in flight.
fn suspend_device(dev: &MappedDevice, flags: SuspendFlags, deadline: Option<Instant>) -> Result<(), DrainStopped> {
    if dev.is_suspended() {
        return Ok(());
    }
    let live = dev.live_table();
    if let Some(t) = &live {
        t.for_each_target(|t| t.presuspend());
    }
    dev.stop_admission();
    if let Err(stopped) = dev.wait_drained(deadline) {
        // Undo, as the kernel does when a suspend is interrupted: the live table's
        // resume hooks undo the pre-suspend ones (a merge restarts), then held I/O goes.
        match &live {
            Some(t) => finish_resume(dev, t),
            None => dev.start_admission(),
        }
        return Err(stopped);
    }
    if let Some(t) = &live {
        if !flags.noflush {
            for d in t.devices.iter() {
                if d.device.info().volatile_cache {
                    if let Err(e) = crate::sync_io::flush(d.device.as_ref()) {
                        tracing::warn!(device = %d.name.get(), error = %e, "flush during suspend failed");
                    }
                }
            }
        }
        t.for_each_target(|t| t.postsuspend());
    }
    Ok(())
}

fn preresume(table: &Table) -> Result<(), crate::error::TargetError> {
    let mut result = Ok(());
    table.for_each_target(|t| {
        if result.is_ok() {
            result = t.preresume();
        }
    });
    result
}

/// Resume hooks, fresh split boundaries, then admission (which releases held I/O).
fn finish_resume(dev: &MappedDevice, live: &Table) {
    live.for_each_target(|t| t.resume());
    live.refresh_boundaries();
    dev.start_admission();
}

/// Destroys both tables of a mapped entry being removed.
fn destroy_all(m: &MappedEntry) {
    if let Some(t) = m.dev.live_table() {
        t.for_each_target(|t| t.destroy());
    }
    if let Some(t) = &m.inactive {
        t.for_each_target(|t| t.destroy());
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use udm_drivers::backends::fault::FaultDevice;
    use udm_drivers::{Completion, IoRequest};

    use super::*;
    use crate::io_buf::IoBuf;
    use crate::registry::DeviceState;
    use crate::test_fixtures::mem_device;

    fn state(reg: &Registry, name: &str) -> DeviceState {
        reg.info(name).unwrap().state
    }

    /// One stalled device: a suspend with a timeout gives up, reports the request in
    /// flight and leaves the device active; a suspend that waits holds no registry-wide
    /// lock (other devices' lifecycle and the reports go on) and refuses conflicting
    /// operations on its own device until it ends.
    #[test]
    fn a_stalled_device_times_out_its_suspend_and_freezes_nothing_else() {
        let reg = Registry::new();
        let fault = Arc::new(FaultDevice::new(mem_device(&[0u8; 1 << 16])));
        let stall = fault.control();
        reg.register_backend("disk", fault).unwrap();
        reg.create("slow", None, Some("0 64 linear disk 0")).unwrap();
        let dev = reg.device("slow").unwrap();
        let mut q = dev.open_queue(4).unwrap();
        stall.stall_after_writes(0);
        let buf = IoBuf::new(512).unwrap();
        q.submit(IoRequest::write(0, buf.sg(0, 512), 7)).unwrap();
        q.kick();

        let e = reg.suspend_within("slow", SuspendFlags::default(), Some(Duration::from_millis(20))).unwrap_err();
        match &e {
            MappingError::SuspendTimedOut { in_flight, .. } => assert_eq!(in_flight.per_queue, vec![1]),
            other => panic!("expected a timeout, got {other}"),
        }
        assert!(e.to_string().contains("1 request(s) in flight (queue 0: 1)"), "{e}");
        assert_eq!(state(&reg, "slow"), DeviceState::Active);

        std::thread::scope(|s| {
            let waiting = s.spawn(|| reg.suspend("slow", SuspendFlags::default()));
            while state(&reg, "slow") != DeviceState::Suspended {
                std::thread::yield_now();
            }
            assert!(reg.ls().iter().any(|(n, _)| n == "slow"));
            reg.create("fast", None, Some("0 8 zero")).unwrap();
            reg.suspend("fast", SuspendFlags::default()).unwrap();
            reg.resume("fast").unwrap();
            reg.remove("fast", false).unwrap();
            let refused = reg.remove("slow", true);
            assert!(matches!(refused, Err(MappingError::InTransition { op: "suspended", .. })), "{refused:?}");
            // A resume is the way out of a suspend that waits for a stalled device.
            reg.resume("slow").unwrap();
            assert_eq!(state(&reg, "slow"), DeviceState::Active);
            let cancelled = waiting.join().unwrap();
            assert!(matches!(cancelled, Err(MappingError::SuspendCancelled { .. })), "{cancelled:?}");
        });
        let waiting_again = std::thread::scope(|s| {
            let waiting = s.spawn(|| reg.suspend("slow", SuspendFlags::default()));
            stall.disarm();
            let mut out = [Completion::EMPTY; 1];
            while q.poll(&mut out) == 0 {}
            assert_eq!((out[0].tag, out[0].result), (7, Ok(())));
            waiting.join().unwrap()
        });
        waiting_again.unwrap();
        assert_eq!(state(&reg, "slow"), DeviceState::Suspended);
        reg.resume("slow").unwrap();
        assert_eq!(state(&reg, "slow"), DeviceState::Active);
    }
}
