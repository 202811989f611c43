//! Snapshots on files of real file systems, kept across a rebuild of the stack (what
//! `udm serve` does at every start):
//!
//! * the README's flow with a `file:` COW on an ext4 and an xfs image, loop-mounted
//!   (their `O_DIRECT` wants aligned buffers, which tmpfs and RAM COWs never ask for);
//! * a COW that holds a store is re-attached when the snapshot is declared, refused when
//!   a new snapshot is asked for over it, and re-initialised only on request;
//! * a chunk smaller than the origin's logical block size is refused;
//! * a merge cut short resumes when the stack is rebuilt.
//!
//! Needs root, `mount` and `mkfs.ext4`/`mkfs.xfs` (e2fsprogs, xfsprogs): CI runs as root.

mod snapshot_common;
use snapshot_common as common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{status, SyncIo};
use udm_drivers::backends::fault::FaultDevice;
use udm_drivers::backends::file::{FileDevice, FileOptions};
use udm_drivers::backends::mem::MemDevice;
use udm_drivers::BlockDevice;
use udm_mapping::snapshot_ops::{self, CowSource, CreateOptions, Created, ExistingCow};
use udm_mapping::{Registry, TableSlot};

/// A file system image, loop-mounted in a temporary directory; unmounted on drop.
struct Mounted {
    _dir: tempfile::TempDir,
    at: PathBuf,
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} cannot run ({e}): install it (e2fsprogs, xfsprogs, mount)"));
    assert!(
        out.status.success(),
        "{program} {args:?} failed (this test needs root): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Mounted {
    /// `fs` is `ext4` or `xfs`.
    fn new(fs: &str) -> Mounted {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join(format!("{fs}.img"));
        // xfs refuses file systems under 300 MiB; the file is sparse either way.
        std::fs::File::create(&image).unwrap().set_len(320 << 20).unwrap();
        let image = image.to_str().unwrap();
        match fs {
            "xfs" => run("mkfs.xfs", &["-q", "-f", image]),
            _ => run("mkfs.ext4", &["-q", "-F", image]),
        }
        let at = dir.path().join("mnt");
        std::fs::create_dir(&at).unwrap();
        run("mount", &["-t", fs, "-o", "loop", image, at.to_str().unwrap()]);
        Mounted { _dir: dir, at }
    }

    fn file(&self, name: &str, len: u64) -> PathBuf {
        let path = self.at.join(name);
        std::fs::File::create(&path).unwrap().set_len(len).unwrap();
        path
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        // io_uring releases its files asynchronously after the rings close, so the
        // mount may stay busy for a moment; detach it lazily rather than leak it.
        let _ = Command::new("umount").arg("--lazy").arg(&self.at).status();
    }
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(29).wrapping_add(tag).rotate_left(3)).collect()
}

fn open_file(path: &Path) -> Arc<FileDevice> {
    let dev = FileDevice::open(path, &FileOptions::default()).unwrap();
    assert!(dev.is_direct(), "{} is not on a file system with O_DIRECT: the test proves nothing", path.display());
    Arc::new(dev)
}

const ORIGIN_SECTORS: u64 = 16384; // 8 MiB

/// An 8 MiB origin file holding `image`, and a 4 MiB blank COW file.
fn files(m: &Mounted, image: &[u8]) -> (PathBuf, PathBuf) {
    let disk = m.file("disk.img", ORIGIN_SECTORS * 512);
    std::fs::write(&disk, image).unwrap();
    (disk, m.file("snap.cow", 4 << 20))
}

/// `vol` over `disk`, the stack `udm serve` rebuilds from udm.toml before its snapshots.
fn registry_with(disk: Arc<dyn BlockDevice>) -> Registry {
    let reg = Registry::new();
    reg.register_backend("disk", disk).unwrap();
    reg.create("vol", None, Some(&format!("0 {ORIGIN_SECTORS} linear disk 0"))).unwrap();
    reg
}

fn opts(cow: &Path, chunk: u64, existing: ExistingCow) -> CreateOptions {
    CreateOptions {
        cow: CowSource::parse(&format!("file:{}", cow.display())),
        chunk_sectors: chunk,
        persistent: true,
        existing,
    }
}

/// Writes `data` to every other 4 KiB chunk of `vol` (so each is its own exception and
/// its own merge batch); returns the origin's expected content.
fn write_every_other_chunk(reg: &Registry, mut image: Vec<u8>, chunks: usize, data: &[u8]) -> Vec<u8> {
    let mut vol = SyncIo::on(reg, "vol");
    for i in 0..chunks {
        let at = i * 2 * 4096;
        vol.write((at / 512) as u64, &data[at..at + 4096]).unwrap();
        image[at..at + 4096].copy_from_slice(&data[at..at + 4096]);
    }
    image
}

/// Polls the merge on `vol` until its status satisfies `until`; returns that status.
fn wait_status(reg: &Registry, until: impl Fn(&str) -> bool) -> String {
    let started = Instant::now();
    loop {
        let s = status(reg, "vol");
        if until(&s) {
            return s;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "merge stuck at `{s}`");
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn merged(s: &str) -> bool {
    s.split_once('/').is_some_and(|(alloc, rest)| rest.split(' ').nth(1) == Some(alloc))
}

/// The README: `truncate` a COW file, `snapshot create --cow file:...`, write the
/// origin, read the snapshot, merge it back.
fn readme_flow_on(fs: &str) {
    let m = Mounted::new(fs);
    let a = pattern(1, (ORIGIN_SECTORS * 512) as usize);
    let (disk, cow) = files(&m, &a);
    let reg = registry_with(open_file(&disk));
    let created = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Refuse))
        .expect("a file COW on this file system works");
    assert_eq!(created, Created::New);
    open_file(&cow); // the COW file is opened with O_DIRECT too
    let b = pattern(2, a.len());
    let mut vol = SyncIo::on(&reg, "vol");
    vol.write(0, &b[..1 << 20]).unwrap();
    vol.write(8192 + 3, &b[..4096 + 512]).unwrap(); // unaligned to the chunk: partial copy-outs
    drop(vol);
    assert!(SyncIo::on(&reg, "snap").read_all(ORIGIN_SECTORS).unwrap() == a, "the snapshot keeps the old data");
    assert!(SyncIo::on(&reg, "vol").read_all(ORIGIN_SECTORS).unwrap() != a);
    snapshot_ops::merge(&reg, "snap").unwrap();
    wait_status(&reg, merged);
    snapshot_ops::finish_merge(&reg, "vol").unwrap();
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), format!("0 {ORIGIN_SECTORS} linear disk 0\n"));
    assert!(SyncIo::on(&reg, "vol").read_all(ORIGIN_SECTORS).unwrap() == a, "merged back");
    drop(reg);
    assert!(std::fs::read(&disk).unwrap() == a, "the origin file holds the snapshot's data");
}

#[test]
fn the_readme_flow_with_a_file_cow_on_ext4() {
    readme_flow_on("ext4");
}

#[test]
fn the_readme_flow_with_a_file_cow_on_xfs() {
    readme_flow_on("xfs");
}

#[test]
fn a_cow_holding_a_store_is_re_attached_refused_or_re_initialised_as_asked() {
    let m = Mounted::new("ext4");
    let a = pattern(1, (ORIGIN_SECTORS * 512) as usize);
    let (disk, cow) = files(&m, &a);

    // First start: a blank COW is initialised; origin writes make 40 exceptions.
    let reg = registry_with(open_file(&disk));
    assert_eq!(snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Attach)).unwrap(), Created::New);
    let now = write_every_other_chunk(&reg, a.clone(), 40, &pattern(2, a.len()));
    let before = status(&reg, "snap");
    drop(reg);

    // Next start, declared: re-attached with its exceptions, same status, old data.
    let reg = registry_with(open_file(&disk));
    let again = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Attach)).unwrap();
    assert_eq!(again, Created::Attached { exceptions: 40, merging: false });
    assert_eq!(status(&reg, "snap"), before, "the same COW usage (Data%) as before the restart");
    assert!(SyncIo::on(&reg, "snap").read_all(ORIGIN_SECTORS).unwrap() == a);
    assert!(SyncIo::on(&reg, "vol").read_all(ORIGIN_SECTORS).unwrap() == now);
    drop(reg);

    // A new snapshot over it is refused, naming what it holds, and changes nothing.
    let reg = registry_with(open_file(&disk));
    let e = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Refuse)).unwrap_err().to_string();
    assert!(e.contains("40 exceptions") && e.contains("--reinit"), "{e}");
    // Declared with another chunk size: refused, saying which.
    let e = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 16, ExistingCow::Attach)).unwrap_err().to_string();
    assert!(e.contains("chunk 4 KiB") && e.contains("chunk \"4k\""), "{e}");
    assert!(reg.device("snap").is_err() && reg.device("vol-real").is_err());
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), format!("0 {ORIGIN_SECTORS} linear disk 0\n"));
    drop(reg);
    let reg = registry_with(open_file(&disk));
    let again = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Attach)).unwrap();
    assert_eq!(again, Created::Attached { exceptions: 40, merging: false }, "the refusals changed nothing");
    drop(reg);

    // An invalidated store (valid = 0, as after an overflow) is refused when declared,
    // and re-initialised with `reinit`: the new snapshot shows the origin as it is now.
    let mut header = std::fs::read(&cow).unwrap();
    header[4..8].fill(0);
    std::fs::write(&cow, &header).unwrap();
    let reg = registry_with(open_file(&disk));
    let e = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Attach)).unwrap_err().to_string();
    assert!(e.contains("invalidated") && e.contains("reinit = true"), "{e}");
    let fresh = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::AttachOrReinit)).unwrap();
    assert_eq!(fresh, Created::New);
    assert_eq!(status(&reg, "snap"), "16/8192 16");
    assert!(SyncIo::on(&reg, "snap").read_all(ORIGIN_SECTORS).unwrap() == now);
    drop(reg);

    // Other data at the start of the COW: refused, overwritten only with --reinit.
    let mut junk = std::fs::read(&cow).unwrap();
    junk[..512].copy_from_slice(&pattern(9, 512));
    std::fs::write(&cow, &junk).unwrap();
    let reg = registry_with(open_file(&disk));
    let e = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Refuse)).unwrap_err().to_string();
    assert!(e.contains("neither blank nor a usable snapshot store") && e.contains("--reinit"), "{e}");
    assert_eq!(std::fs::read(&cow).unwrap()[..512], junk[..512], "a refused COW is left as it was");
    let fresh = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Reinit)).unwrap();
    assert_eq!(fresh, Created::New);
    assert_eq!(status(&reg, "snap"), "16/8192 16");
}

#[test]
fn a_chunk_smaller_than_either_devices_block_is_refused() {
    let reg = Registry::new();
    let big_blocks: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20, 4096).unwrap());
    reg.register_backend("disk4k", big_blocks).unwrap();
    reg.register_backend("cow512", Arc::new(MemDevice::new(8 << 20, 512).unwrap())).unwrap();
    reg.register_backend("disk512", Arc::new(MemDevice::new(64 << 20, 512).unwrap())).unwrap();
    for table in ["0 131072 snapshot disk4k cow512 P 4", "0 131072 snapshot disk4k cow512 N 2"] {
        let e = reg.create("snap", None, Some(table)).unwrap_err().to_string();
        assert!(e.contains("`disk4k`") && e.contains("4096-byte") && e.contains("at least 4 KiB"), "{table}: {e}");
    }
    let e = reg.create("snap", None, Some("0 131072 snapshot disk4k cow512 P 24")).unwrap_err().to_string();
    assert!(e.contains("power of two"), "{e}");
    assert!(reg.device("snap").is_err());

    // A store made at chunk 4 (2 KiB) over a 512-byte origin: its header's chunk wins
    // over the table's, so it must be checked against the 4 KiB origin as well.
    reg.create("old", None, Some("0 131072 snapshot disk512 cow512 P 4")).unwrap();
    reg.remove("old", false).unwrap();
    let e = reg.create("snap", None, Some("0 131072 snapshot disk4k cow512 P 8")).unwrap_err().to_string();
    assert!(e.contains("`disk4k`"), "{e}");

    // LVM's smallest chunk (4 KiB) fits; `snapshot create` checks both devices too.
    reg.register_backend("cow2", Arc::new(MemDevice::new(8 << 20, 512).unwrap())).unwrap();
    reg.create("snap", None, Some("0 131072 snapshot disk4k cow2 P 8")).unwrap();
    reg.remove("snap", false).unwrap();
    reg.create("vol", None, Some("0 131072 linear disk4k 0")).unwrap();
    let o = CreateOptions {
        cow: CowSource::parse("mem:8M,bs=4096"),
        chunk_sectors: 8,
        persistent: true,
        existing: ExistingCow::Refuse,
    };
    snapshot_ops::create(&reg, "vol", "s", &o).unwrap();
    SyncIo::on(&reg, "vol").write(0, &pattern(3, 64 << 10)).unwrap();
    assert_eq!(status(&reg, "s"), "144/16384 16");
}

/// 64 exceptions, none adjacent (64 merge batches), then a merge whose origin fails
/// after 10 writes: it stops there, as if the daemon died. The COW keeps the other
/// exceptions and the mark that a merge is under way. Returns the origin file, the COW
/// file and the snapshot's data.
fn cut_a_merge_short(m: &Mounted) -> (PathBuf, PathBuf, Vec<u8>) {
    let a = pattern(1, (ORIGIN_SECTORS * 512) as usize);
    let (disk, cow) = files(m, &a);
    let faulty = Arc::new(FaultDevice::new(open_file(&disk)));
    let fault = faulty.control();
    let reg = registry_with(faulty);
    snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Attach)).unwrap();
    write_every_other_chunk(&reg, a.clone(), 64, &pattern(2, a.len()));
    fault.fail_after_writes(10);
    snapshot_ops::merge(&reg, "snap").unwrap();
    wait_status(&reg, |s| s == "Merge failed");
    let listed = snapshot_ops::list(&reg);
    assert!(listed.len() == 1 && listed[0].merging && listed[0].name == "snap" && listed[0].origin == "vol");
    (disk, cow, a)
}

#[test]
fn a_merge_cut_short_resumes_when_the_stack_is_rebuilt() {
    let m = Mounted::new("ext4");
    let (disk, cow, a) = cut_a_merge_short(&m);

    // Rebuilt as `udm serve` does for a declared snapshot: the COW says "merging".
    let reg = registry_with(open_file(&disk));
    let back = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Attach)).unwrap();
    let Created::Attached { exceptions: left @ 1..=56, merging: true } = back else {
        panic!("expected about 54 of 64 exceptions left and a merge to resume, found {back:?}");
    };
    assert_eq!(status(&reg, "snap"), format!("{}/8192 16", (2 + left) * 8));
    snapshot_ops::merge(&reg, "snap").unwrap();
    wait_status(&reg, merged);
    snapshot_ops::finish_merge(&reg, "vol").unwrap();
    assert!(SyncIo::on(&reg, "vol").read_all(ORIGIN_SECTORS).unwrap() == a, "the origin has the snapshot's data");
    drop(reg);

    // Finished: the mark is gone, so the COW comes back as an empty, plain snapshot.
    let header = std::fs::read(&cow).unwrap();
    assert!(header[16..512].iter().all(|&b| b == 0), "the merge mark is cleared once the merge is complete");
    let reg = registry_with(open_file(&disk));
    let back = snapshot_ops::create(&reg, "vol", "snap", &opts(&cow, 8, ExistingCow::Attach)).unwrap();
    assert_eq!(back, Created::Attached { exceptions: 0, merging: false });
}

/// The kernel's way (what LVM does at activation): a `snapshot-merge` table loaded over
/// a COW with exceptions left goes on merging from where the COW stands.
#[test]
fn a_snapshot_merge_table_over_a_cut_merge_continues_it() {
    let m = Mounted::new("ext4");
    let (disk, cow, a) = cut_a_merge_short(&m);
    let reg = Registry::new();
    reg.register_backend("disk", open_file(&disk)).unwrap();
    reg.register_backend("cowfile", open_file(&cow)).unwrap();
    reg.create("vol-real", None, Some(&format!("0 {ORIGIN_SECTORS} linear disk 0"))).unwrap();
    reg.create("snap-cow", None, Some("0 8192 linear cowfile 0")).unwrap();
    reg.create("vol", None, Some(&format!("0 {ORIGIN_SECTORS} snapshot-merge vol-real snap-cow P 8"))).unwrap();
    assert_eq!(wait_status(&reg, merged), "16/8192 16");
    assert!(SyncIo::on(&reg, "vol").read_all(ORIGIN_SECTORS).unwrap() == a, "the origin has the snapshot's data");
}
