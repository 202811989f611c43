//! A mailbox between a running guest and the test on the host: a small raw disk whose
//! 512-byte sectors are slots holding one short text each. The guest posts and waits
//! with direct I/O (`dd oflag=direct` / `iflag=direct`, see [`Mailbox::guest_post`]);
//! the host reads and writes the image file, which QEMU opens without O_DIRECT
//! (`cache=unsafe`), so both sides see the same page cache at once.
//!
//! This is how a test acts while the guest keeps running: the guest says "frozen", the
//! host takes a snapshot and answers "snapped", the guest goes on.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::devices::Backing;
use super::error::VmError;

/// Slots in a mailbox.
pub const SLOTS: u32 = 64;
const SLOT_BYTES: u64 = 512;

/// The serial number the mailbox disk carries, so the guest finds it by name.
pub const MAILBOX_SERIAL: &str = "udm-mailbox";

/// The host's side of a mailbox disk.
#[derive(Debug, Clone)]
pub struct Mailbox {
    path: PathBuf,
}

impl Mailbox {
    /// Creates an empty mailbox image at `path`.
    pub fn create(path: impl AsRef<Path>) -> Result<Mailbox, VmError> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::create(&path).map_err(|e| VmError::io(format!("creating {}", path.display()), e))?;
        file.set_len(u64::from(SLOTS) * SLOT_BYTES)
            .map_err(|e| VmError::io(format!("sizing {}", path.display()), e))?;
        Ok(Mailbox { path })
    }

    /// The image, for [`super::Guest::mailbox`].
    pub fn backing(&self) -> Backing {
        Backing::raw(&self.path)
    }

    /// Writes `text` (at most 511 bytes, no newline needed) into `slot`.
    pub fn post(&self, slot: u32, text: &str) -> Result<(), VmError> {
        let mut sector = vec![0u8; SLOT_BYTES as usize];
        let bytes = text.as_bytes();
        let n = bytes.len().min(sector.len() - 1);
        sector[..n].copy_from_slice(&bytes[..n]);
        sector[n] = b'\n';
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| VmError::io(format!("opening {}", self.path.display()), e))?;
        file.write_all_at(&sector, Self::offset(slot))
            .map_err(|e| VmError::io(format!("writing {}", self.path.display()), e))
    }

    /// The text in `slot` (empty when nothing was posted).
    pub fn read(&self, slot: u32) -> Result<String, VmError> {
        let file =
            std::fs::File::open(&self.path).map_err(|e| VmError::io(format!("opening {}", self.path.display()), e))?;
        let mut sector = vec![0u8; SLOT_BYTES as usize];
        file.read_exact_at(&mut sector, Self::offset(slot))
            .map_err(|e| VmError::io(format!("reading {}", self.path.display()), e))?;
        let end = sector.iter().position(|&b| b == 0 || b == b'\n').unwrap_or(sector.len());
        Ok(String::from_utf8_lossy(&sector[..end]).into_owned())
    }

    /// Waits until `slot` holds `text`; `false` if `timeout` passed first.
    pub fn wait_for(&self, slot: u32, text: &str, timeout: Duration) -> Result<bool, VmError> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.read(slot)? == text {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn offset(slot: u32) -> u64 {
        assert!(slot < SLOTS, "mailbox slot {slot} out of 0..{SLOTS}");
        u64::from(slot) * SLOT_BYTES
    }

    /// Guest shell that sets `$MAILBOX` to the mailbox disk's device node.
    pub fn guest_find() -> String {
        format!(
            "MAILBOX=\nfor d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = {MAILBOX_SERIAL} ] && MAILBOX=/dev/$(basename $d); done\n\
             [ -n \"$MAILBOX\" ] || {{ echo 'no mailbox disk'; exit 1; }}\n"
        )
    }

    /// Guest shell that writes `text` into `slot` (after [`Mailbox::guest_find`]).
    pub fn guest_post(slot: u32, text: &str) -> String {
        Self::offset(slot);
        format!("echo {text} | dd of=$MAILBOX bs=512 seek={slot} count=1 conv=sync oflag=direct 2>/dev/null\n")
    }

    /// Guest shell that waits up to `secs` for `text` in `slot`, failing the script if
    /// it never comes.
    pub fn guest_wait(slot: u32, text: &str, secs: u32) -> String {
        Self::offset(slot);
        format!(
            "i=0; until dd if=$MAILBOX bs=512 skip={slot} count=1 iflag=direct 2>/dev/null | grep -qx '{text}'; do\n\
             \x20 i=$((i+1)); [ $i -le {tenths} ] || {{ echo 'mailbox: no {text} in slot {slot}'; exit 1; }}; sleep 0.1\n\
             done\n",
            tenths = secs * 10
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn posts_read_back_per_slot() {
        let dir = tempfile::tempdir().unwrap();
        let m = Mailbox::create(dir.path().join("mb.img")).unwrap();
        assert_eq!(m.read(3).unwrap(), "");
        m.post(3, "FROZEN").unwrap();
        m.post(4, "x").unwrap();
        assert_eq!(m.read(3).unwrap(), "FROZEN");
        assert!(m.wait_for(4, "x", Duration::ZERO).unwrap());
        assert!(!m.wait_for(5, "x", Duration::ZERO).unwrap());
        assert!(Mailbox::guest_post(2, "A").contains("seek=2"));
        assert!(Mailbox::guest_wait(2, "A", 3).contains("-le 30"));
    }
}
