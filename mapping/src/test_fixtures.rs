//! Test helpers: the kernel-made fixtures (fixtures/dm-snapshot, see its README) and RAM
//! devices loaded with their images.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;

use udm_drivers::backends::mem::MemDevice;
use udm_drivers::dma::PagePolicy;
use udm_drivers::{BlockDevice, IoQueue, IoRequest};

use crate::exception_store::{sync_io, ExceptionStore};
use crate::io_buf::IoBuf;

/// `fixtures/dm-snapshot/<rel>` in the repository.
pub fn fixture_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/dm-snapshot").join(rel)
}

/// The text of a fixture file.
pub fn fixture_text(rel: &str) -> String {
    std::fs::read_to_string(fixture_path(rel)).unwrap_or_else(|e| panic!("reading fixture {rel}: {e}"))
}

/// A fixture's `.xz` file, decompressed with xz-utils.
pub fn unxz(rel: &str) -> Vec<u8> {
    let path = fixture_path(rel);
    let out = Command::new("xz").arg("-dc").arg(&path).output().expect("xz-utils is installed (setup-host.sh)");
    assert!(out.status.success(), "xz -dc {} failed: {}", path.display(), String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// A RAM disk holding `image`.
pub fn mem_device(image: &[u8]) -> Arc<MemDevice> {
    let dev = Arc::new(MemDevice::with_policy(image.len() as u64, 512, PagePolicy::Normal).unwrap());
    let mut q = dev.open_queue(4).unwrap();
    write_bytes(q.as_mut(), 0, image);
    dev
}

/// Writes `data` at sector `sector` synchronously.
pub fn write_bytes(q: &mut dyn IoQueue, sector: u64, data: &[u8]) {
    let step = 1 << 20;
    for (i, piece) in data.chunks(step).enumerate() {
        let mut buf = IoBuf::new(piece.len()).unwrap();
        buf.as_mut_slice().copy_from_slice(piece);
        let s = sector + (i * step / 512) as u64;
        sync_io::run(q, IoRequest::write(s, buf.sg(0, piece.len()), 1)).unwrap();
    }
}

/// Reads `len` bytes at sector `sector` synchronously.
pub fn read_bytes(q: &mut dyn IoQueue, sector: u64, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let step = 1 << 20;
    let mut done = 0;
    while done < len {
        let n = step.min(len - done);
        let buf = IoBuf::new(n).unwrap();
        sync_io::run(q, IoRequest::read(sector + (done / 512) as u64, buf.sg(0, n), 1)).unwrap();
        out.extend_from_slice(buf.as_slice());
        done += n;
    }
    out
}

/// The whole contents of `dev`.
pub fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut q = dev.open_queue(4).unwrap();
    read_bytes(q.as_mut(), 0, dev.info().size_bytes() as usize)
}

/// Runs every metadata request the store has due, synchronously.
pub fn pump(store: &mut dyn ExceptionStore, q: &mut dyn IoQueue) {
    while let Some(req) = store.next_io() {
        let r = sync_io::run(q, req);
        store.io_done(r);
    }
}
