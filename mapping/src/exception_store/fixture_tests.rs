//! The persistent store against COW stores the Linux kernel wrote (fixtures/dm-snapshot):
//! reading them back, writing the same bytes, merging them the same way.

use std::collections::HashMap;

use udm_drivers::{BlockDevice, IoQueue};

use crate::exception_store::dump::dump_image;
use crate::exception_store::{Exception, ExceptionStore, PersistentStore, StoreError, StoreEvent};
use crate::test_fixtures::{fixture_text, mem_device, pump, read_all, read_bytes, unxz, write_bytes};

const ORIGIN_SECTORS: u64 = 32768;

/// The `snap:` status line after re-activation, e.g. `584/16384 16`.
fn kernel_status(fixture: &str) -> String {
    let file = if fixture == "c8-merged" { "status-merge.txt" } else { "status-read.txt" };
    let text = fixture_text(&format!("{fixture}/{file}"));
    let needle = if fixture == "c8-merged" { "base: 0 32768 snapshot-merge " } else { "snap: 0 32768 snapshot " };
    text.lines().filter_map(|l| l.strip_prefix(needle)).next().expect("a status line").trim().to_string()
}

fn activate(image: &[u8], table_chunk: u64) -> Result<PersistentStore, StoreError> {
    let dev = mem_device(image);
    let mut q = dev.open_queue(4).unwrap();
    PersistentStore::activate(q.as_mut(), &dev.info(), table_chunk, ORIGIN_SECTORS).map(|(s, _)| s)
}

#[test]
fn every_fixture_reads_back_with_the_kernels_dump_and_status() {
    for (fixture, chunk) in
        [("c8-basic", 8), ("c128-basic", 128), ("c8-multiarea", 8), ("c8-overflow", 8), ("c8-merged", 8)]
    {
        let image = unxz(&format!("{fixture}/cow.img.xz"));
        assert_eq!(dump_image(&image), fixture_text(&format!("{fixture}/cow-dump.txt")), "{fixture}: cow-dump");

        let dev = mem_device(&image);
        let mut q = dev.open_queue(4).unwrap();
        let (store, act) = PersistentStore::activate(q.as_mut(), &dev.info(), chunk, ORIGIN_SECTORS).unwrap();
        assert!(!act.initialised);
        let status = if store.is_valid() { store.usage().status() } else { "Invalid".to_string() };
        let expected = kernel_status(fixture);
        assert_eq!(status, expected, "{fixture}: status");
        assert_eq!(read_all(dev.as_ref()), image, "{fixture}: activation must not write");

        if store.is_valid() {
            let listed: Vec<String> = store
                .exceptions()
                .iter()
                .map(|e| format!("  old_chunk {} -> new_chunk {}", e.old_chunk, e.new_chunk))
                .collect();
            let dumped: Vec<String> = fixture_text(&format!("{fixture}/cow-dump.txt"))
                .lines()
                .filter(|l| l.starts_with("  old_chunk"))
                .map(str::to_string)
                .collect();
            assert_eq!(listed, dumped, "{fixture}: exceptions");
        }
    }
}

#[test]
fn the_headers_chunk_size_wins_over_the_tables() {
    let image = unxz("c8-basic/cow.img.xz");
    let dev = mem_device(&image);
    let mut q = dev.open_queue(4).unwrap();
    let (store, act) = PersistentStore::activate(q.as_mut(), &dev.info(), 128, ORIGIN_SECTORS).unwrap();
    assert_eq!(act.chunk_overridden, Some((128, 8)));
    assert_eq!(store.chunk_sectors(), 8);
    assert_eq!(store.usage().status(), "584/16384 16");
}

/// Applies `edit` to a copy of c8-basic's COW, checks activation fails with `expect`,
/// and that the image was not touched.
fn refused(edit: impl Fn(&mut Vec<u8>), expect: impl Fn(&StoreError) -> bool) {
    let mut image = unxz("c8-basic/cow.img.xz");
    edit(&mut image);
    let dev = mem_device(&image);
    let mut q = dev.open_queue(4).unwrap();
    let err = PersistentStore::activate(q.as_mut(), &dev.info(), 8, ORIGIN_SECTORS).unwrap_err();
    assert!(expect(&err), "unexpected error: {err}");
    assert!(!err.to_string().is_empty());
    assert_eq!(read_all(dev.as_ref()), image, "a refused store must never be written");
}

fn set_entry(image: &mut [u8], index: usize, old: u64, new: u64) {
    let at = 4096 + index * 16;
    image[at..at + 8].copy_from_slice(&old.to_le_bytes());
    image[at + 8..at + 16].copy_from_slice(&new.to_le_bytes());
}

#[test]
fn corrupt_stores_are_refused_and_left_untouched() {
    refused(|i| i[0] = b'X', |e| matches!(e, StoreError::BadMagic { .. }));
    refused(|i| i[8] = 2, |e| matches!(e, StoreError::BadVersion { found: 2 }));
    refused(|i| i[12] = 12, |e| matches!(e, StoreError::BadChunkSize { chunk_sectors: 12, .. }));
    refused(
        |i| set_entry(i, 1, 0, 3),
        |e| matches!(e, StoreError::BadEntry { reason, .. } if reason.contains("origin chunk")),
    );
    refused(
        |i| set_entry(i, 1, 77, 2),
        |e| matches!(e, StoreError::BadEntry { reason, .. } if reason.contains("shares")),
    );
    refused(
        |i| set_entry(i, 1, 77, 5000),
        |e| matches!(e, StoreError::BadEntry { reason, .. } if reason.contains("beyond the end of the COW")),
    );
    refused(
        |i| set_entry(i, 1, 77, 258),
        |e| matches!(e, StoreError::BadEntry { reason, .. } if reason.contains("metadata")),
    );
    refused(
        |i| set_entry(i, 1, 77, 1),
        |e| matches!(e, StoreError::BadEntry { reason, .. } if reason.contains("metadata")),
    );
    refused(
        |i| set_entry(i, 1, 4096, 3),
        |e| matches!(e, StoreError::BadEntry { reason, .. } if reason.contains("origin")),
    );
    // A full last area whose successor lies past the end of the COW.
    refused(
        |i| {
            i.truncate(258 * 4096);
            for k in 0..256 {
                set_entry(i, k, k as u64, 2 + k as u64);
            }
        },
        |e| matches!(e, StoreError::Truncated { area: 1, .. }),
    );
}

#[test]
fn an_invalidated_store_loads_invalid_without_reading_its_areas() {
    let mut image = unxz("c8-basic/cow.img.xz");
    image[4] = 0;
    set_entry(&mut image, 1, 0, 2); // corrupt, but never read
    let store = activate(&image, 8).unwrap();
    assert!(!store.is_valid());
    assert!(store.exceptions().is_empty());
}

/// A host-side model of the kernel's snapshot over the store, driven one `dd` bio at a
/// time, as the fixtures were made: `origin_writes` take NEW1 data through the origin,
/// `snap_writes` SNP1 data through the snapshot.
struct Replay {
    origin: Vec<u8>,
    cow_q: Box<dyn IoQueue>,
    cow: std::sync::Arc<udm_drivers::backends::mem::MemDevice>,
    store: PersistentStore,
    map: HashMap<u64, u64>,
    chunk: u64,
}

impl Replay {
    fn new(chunk: u64) -> Self {
        let origin = unxz("patterns/orig.img.xz");
        let cow = mem_device(&vec![0u8; 8 << 20]);
        let mut cow_q = cow.open_queue(8).unwrap();
        let (store, act) = PersistentStore::activate(cow_q.as_mut(), &cow.info(), chunk, ORIGIN_SECTORS).unwrap();
        assert!(act.initialised);
        Replay { origin, cow_q, cow, store, map: HashMap::new(), chunk }
    }

    fn cb(&self) -> usize {
        self.chunk as usize * 512
    }

    /// dd with 64 KiB buffers: bios of at most 128 sectors, each split at chunk
    /// boundaries by the target; every piece of a bio prepares its exception, the data
    /// copies finish in reverse order, and the store batches the commits.
    fn bios(start: u64, count: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut s = start;
        while s < start + count {
            let n = 128.min(start + count - s);
            out.push((s, n));
            s += n;
        }
        out
    }

    fn pieces(&self, sector: u64, count: u64) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut s = sector;
        while s < sector + count {
            let end = ((s / self.chunk) + 1) * self.chunk;
            let n = end.min(sector + count) - s;
            out.push((s, n));
            s += n;
        }
        out
    }

    fn settle(&mut self, expect: &[Exception]) {
        pump(&mut self.store, self.cow_q.as_mut());
        let mut events = Vec::new();
        self.store.take_events(&mut events);
        let committed: Vec<Exception> = events
            .iter()
            .map(|ev| match ev {
                StoreEvent::Committed(e, true) => *e,
                other => panic!("unexpected event {other:?}"),
            })
            .collect();
        assert_eq!(committed, expect, "every exception is reported once, in allocation order");
        for e in expect {
            self.map.insert(e.old_chunk, e.new_chunk);
        }
    }

    fn origin_write(&mut self, start: u64, count: u64, data: &[u8]) {
        for (bs, bn) in Self::bios(start, count) {
            let mut fresh = Vec::new();
            for (s, _) in self.pieces(bs, bn) {
                let c = s / self.chunk;
                if !self.map.contains_key(&c) && !fresh.iter().any(|e: &Exception| e.old_chunk == c) {
                    let new_chunk = self.store.prepare(c).unwrap();
                    fresh.push(Exception { old_chunk: c, new_chunk });
                }
            }
            for e in fresh.iter().rev() {
                let cb = self.cb();
                let from = e.old_chunk as usize * cb;
                let piece = self.origin[from..(from + cb).min(self.origin.len())].to_vec();
                write_bytes(self.cow_q.as_mut(), e.new_chunk * self.chunk, &piece);
                self.store.commit(*e, true);
            }
            self.settle(&fresh);
            let (a, b) = (bs as usize * 512, (bs + bn) as usize * 512);
            self.origin[a..b].copy_from_slice(&data[a..b]);
        }
    }

    fn snap_write(&mut self, start: u64, count: u64, data: &[u8]) {
        for (bs, bn) in Self::bios(start, count) {
            for (s, n) in self.pieces(bs, bn) {
                let c = s / self.chunk;
                let cb = self.cb();
                let bytes = &data[s as usize * 512..(s + n) as usize * 512];
                let within = (s % self.chunk) as usize * 512;
                if let Some(&new_chunk) = self.map.get(&c) {
                    write_bytes(self.cow_q.as_mut(), new_chunk * self.chunk + (s % self.chunk), bytes);
                    continue;
                }
                let new_chunk = self.store.prepare(c).unwrap();
                let e = Exception { old_chunk: c, new_chunk };
                let mut chunk_data = if n == self.chunk {
                    Vec::new()
                } else {
                    self.origin[c as usize * cb..(c as usize + 1) * cb].to_vec()
                };
                if n == self.chunk {
                    chunk_data.extend_from_slice(bytes);
                } else {
                    write_bytes(self.cow_q.as_mut(), new_chunk * self.chunk, &chunk_data);
                    chunk_data[within..within + bytes.len()].copy_from_slice(bytes);
                }
                if n == self.chunk {
                    write_bytes(self.cow_q.as_mut(), new_chunk * self.chunk, &chunk_data);
                }
                self.store.commit(e, true);
                self.settle(&[e]);
                if n != self.chunk {
                    write_bytes(self.cow_q.as_mut(), new_chunk * self.chunk + (s % self.chunk), bytes);
                }
            }
        }
    }
}

const W0: [(u64, u64); 5] = [(0, 32), (800, 8), (8000, 512), (16003, 1), (32760, 8)];

#[test]
fn replaying_the_fixture_writes_produces_the_kernels_cow_byte_for_byte() {
    let new1 = unxz("patterns/new1.img.xz");
    let snp1 = unxz("patterns/snp1.img.xz");
    type Case = (&'static str, u64, Vec<(u64, u64)>, Vec<(u64, u64)>);
    let cases: [Case; 3] = [
        ("c8-basic", 8, W0.to_vec(), vec![]),
        ("c128-basic", 128, W0.to_vec(), vec![]),
        ("c8-multiarea", 8, vec![(0, 9600)], vec![(16384, 64), (20000, 3), (40, 8)]),
    ];
    for (fixture, chunk, origin_writes, snap_writes) in cases {
        let mut r = Replay::new(chunk);
        for (s, n) in origin_writes {
            r.origin_write(s, n, &new1);
        }
        for (s, n) in snap_writes {
            r.snap_write(s, n, &snp1);
        }
        assert_eq!(r.store.usage().status(), kernel_status(fixture), "{fixture}: status");
        let cow = read_all(r.cow.as_ref());
        let expected = unxz(&format!("{fixture}/cow.img.xz"));
        assert_eq!(dump_image(&cow), dump_image(&expected), "{fixture}: metadata");
        assert!(cow == expected, "{fixture}: the COW differs from the kernel's");
        assert!(r.origin == unxz(&format!("{fixture}/origin.img.xz")), "{fixture}: origin");
    }
}

#[test]
fn merging_multiarea_leaves_the_kernels_merged_cow_and_origin() {
    let image = unxz("c8-multiarea/cow.img.xz");
    let cow = mem_device(&image);
    let origin = mem_device(&unxz("c8-multiarea/origin.img.xz"));
    let mut cq = cow.open_queue(8).unwrap();
    let mut oq = origin.open_queue(8).unwrap();
    let (mut store, _) = PersistentStore::activate(cq.as_mut(), &cow.info(), 8, ORIGIN_SECTORS).unwrap();
    let mut statuses = vec![store.usage().status()];
    while let Some(batch) = store.prepare_merge().unwrap() {
        statuses.push(store.usage().status());
        let end = ((batch.old_chunk + batch.count) * 8).min(ORIGIN_SECTORS);
        let sectors = end - batch.old_chunk * 8;
        let data = read_bytes(cq.as_mut(), batch.new_chunk * 8, sectors as usize * 512);
        write_bytes(oq.as_mut(), batch.old_chunk * 8, &data);
        store.commit_merge(batch.count).unwrap();
        pump(&mut store, cq.as_mut());
        let mut ev = Vec::new();
        store.take_events(&mut ev);
        assert_eq!(ev, vec![StoreEvent::MergeCommitted(Ok(()))]);
        statuses.push(store.usage().status());
    }
    assert_eq!(statuses.first().unwrap(), "9720/16384 48");
    assert_eq!(statuses.last().unwrap(), "16/16384 16");
    // The throttled kernel run's samples appear in udm's sequence too.
    for sample in ["9648/16384 48", "8240/16384 40", "2072/16384 16"] {
        assert!(statuses.iter().any(|s| s == sample), "{sample} not in {statuses:?}");
    }
    assert!(read_all(cow.as_ref()) == unxz("c8-merged/cow.img.xz"), "merged COW differs from the kernel's");
    assert!(read_all(origin.as_ref()) == unxz("c8-merged/origin.img.xz"), "merged origin differs from the kernel's");
}

mod robustness {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// Corrupt metadata anywhere in the header or the first areas never panics: the
        /// store either loads (and then every entry is in range and unique) or is refused
        /// with an error, and the COW is never written either way.
        #[test]
        fn corrupted_stores_load_cleanly_or_are_refused(
            edits in prop::collection::vec((0usize..3 * 4096, any::<u8>()), 1..24),
            table_chunk in prop::sample::select(vec![0u64, 8, 16, 128]),
        ) {
            static BASE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
            let base = BASE.get_or_init(|| unxz("c8-basic/cow.img.xz"));
            let mut image = base[..1 << 20].to_vec();
            for (at, byte) in edits {
                image[at] = byte;
            }
            let dev = mem_device(&image);
            let mut q = dev.open_queue(4).unwrap();
            let magic_zero = image[..4] == [0, 0, 0, 0];
            match PersistentStore::activate(q.as_mut(), &dev.info(), table_chunk, ORIGIN_SECTORS) {
                Ok((store, act)) => {
                    prop_assert_eq!(act.initialised, magic_zero);
                    let cow_chunks = (1u64 << 20) / 512 / store.chunk_sectors();
                    let mut seen = std::collections::HashSet::new();
                    for e in store.exceptions() {
                        prop_assert!(e.new_chunk >= 2 && e.new_chunk < cow_chunks);
                        prop_assert!(e.old_chunk < ORIGIN_SECTORS.div_ceil(store.chunk_sectors()));
                        prop_assert!(seen.insert(e.old_chunk));
                    }
                    if !magic_zero {
                        prop_assert!(read_all(dev.as_ref()) == image, "loading an existing store wrote to it");
                    }
                }
                Err(e) => {
                    prop_assert!(!e.to_string().is_empty());
                    prop_assert!(read_all(dev.as_ref()) == image, "a refused store was written");
                }
            }
            let _ = dump_image(&image);
        }
    }
}
