//! Kernel interop, both ways, in one Linux 6.1 guest (QEMU, TCG):
//!
//! * udm writes: an origin with three snapshots (chunk 4 KiB, 64 KiB, 512 KiB), origin
//!   and snapshot writes through udm; the guest's dm-snapshot activates udm's COW stores
//!   and must read exactly what udm's snapshots showed, with the same status lines.
//! * the kernel writes: the guest builds LVM's stack (`-real`, three snapshots,
//!   `snapshot-origin`) on blank disks and writes through it; udm activates the COW stores
//!   the kernel left and must read exactly what the kernel read, with the same status.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use udm_drivers::backends::mem::MemDevice;
use udm_drivers::dma::PagePolicy;
use udm_drivers::BlockDevice;
use udm_mapping::{sync_io, Registry, TableSlot};
use udm_tests::vm::{modules, Backing, Guest};

const ORIGIN: u64 = 32768; // 16 MiB
const CHUNKS: [u64; 3] = [8, 128, 1024];
const COW: [u64; 3] = [16384, 16384, 32768]; // 8, 8 and 16 MiB

fn mem_with(image: &[u8]) -> Arc<dyn BlockDevice> {
    let dev: Arc<dyn BlockDevice> =
        Arc::new(MemDevice::with_policy(image.len() as u64, 512, PagePolicy::Normal).unwrap());
    sync_io::write(dev.as_ref(), 0, image, false).unwrap();
    dev
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut buf = vec![0u8; dev.info().size_bytes() as usize];
    for (i, piece) in buf.chunks_mut(1 << 20).enumerate() {
        sync_io::read(dev, (i as u64) << 11, piece).unwrap();
    }
    buf
}

fn write(dev: &dyn BlockDevice, sector: u64, data: &[u8]) {
    sync_io::write(dev, sector, data, false).unwrap();
}

fn hex_sha256(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn status_args(reg: &Registry, name: &str) -> String {
    let s = reg.status(name, TableSlot::Live).unwrap();
    s.trim_end().splitn(4, ' ').nth(3).unwrap_or("").to_string()
}

/// Deterministic data that differs per call (so every write is recognisable).
fn data(tag: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i as u64).wrapping_mul(2654435761).wrapping_add(tag * 97) >> 7) as u8).collect()
}

/// Builds the origin and three snapshots in udm over `origin` and `cows`.
fn udm_stack(origin: &[u8], cows: &[Vec<u8>]) -> Registry {
    let reg = Registry::new();
    reg.register_backend("odisk", mem_with(origin)).unwrap();
    reg.create("base-real", None, Some(&format!("0 {ORIGIN} linear odisk 0"))).unwrap();
    for (i, cow) in cows.iter().enumerate() {
        reg.register_backend(&format!("cdisk{i}"), mem_with(cow)).unwrap();
        reg.create(&format!("s{i}-cow"), None, Some(&format!("0 {} linear cdisk{i} 0", cow.len() / 512))).unwrap();
        reg.create(&format!("s{i}"), None, Some(&format!("0 {ORIGIN} snapshot base-real s{i}-cow P {}", CHUNKS[i])))
            .unwrap();
    }
    reg
}

fn save(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn kernel_reads_udm_snapshots_and_udm_reads_kernel_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let original = data(1, (ORIGIN * 512) as usize);

    // --- udm writes -------------------------------------------------------------
    let blank: Vec<Vec<u8>> = COW.iter().map(|&s| vec![0u8; s as usize * 512]).collect();
    let reg = udm_stack(&original, &blank);
    reg.create("base", None, Some(&format!("0 {ORIGIN} snapshot-origin base-real"))).unwrap();
    let base = reg.device("base").unwrap();
    for (k, (s, n)) in [(0u64, 32u64), (800, 8), (8000, 512), (16003, 1), (32760, 8), (20480, 2048)].iter().enumerate()
    {
        write(base.as_ref(), *s, &data(100 + k as u64, *n as usize * 512));
    }
    let s0 = reg.device("s0").unwrap();
    write(s0.as_ref(), 16384, &data(200, 64 * 512));
    write(s0.as_ref(), 20000, &data(201, 3 * 512));
    write(s0.as_ref(), 40, &data(202, 8 * 512));
    let s1 = reg.device("s1").unwrap();
    write(s1.as_ref(), 4096, &data(203, 128 * 512));
    write(s1.as_ref(), 9001, &data(204, 5 * 512));
    let mut udm_views = Vec::new();
    for i in 0..3 {
        let name = format!("s{i}");
        let view = read_all(reg.device(&name).unwrap().as_ref());
        udm_views.push((hex_sha256(&view), status_args(&reg, &name)));
    }
    let origin_after = read_all(reg.device("odisk").unwrap().as_ref());
    let cows_after: Vec<Vec<u8>> =
        (0..3).map(|i| read_all(reg.device(&format!("cdisk{i}")).unwrap().as_ref())).collect();
    drop((base, s0, s1));
    for name in ["base", "s0", "s1", "s2", "s0-cow", "s1-cow", "s2-cow", "base-real"] {
        reg.remove(name, false).unwrap();
    }

    // --- disks for the guest ----------------------------------------------------
    let mut guest = Guest::new()
        .expect("guest kernel (run scripts/vm-prepare.sh)")
        .memory_mib(512)
        .timeout(Duration::from_secs(600))
        .modules(modules::VIRTIO_BLK)
        .modules(modules::DM_SNAPSHOT)
        .binary_as("/sbin/dmsetup", "/sbin/dmsetup");
    // vda: udm's origin, vdb-vdd: udm's COWs; vde: blank origin copy, vdf-vdh: blank COWs.
    guest = guest.virtio_disk(Backing::raw(save(dir.path(), "u-origin", &origin_after)));
    for (i, cow) in cows_after.iter().enumerate() {
        guest = guest.virtio_disk(Backing::raw(save(dir.path(), &format!("u-cow{i}"), cow)));
    }
    let k_origin = save(dir.path(), "k-origin", &original);
    guest = guest.virtio_disk(Backing::raw(&k_origin));
    let mut k_cows = Vec::new();
    for (i, &s) in COW.iter().enumerate() {
        let p = save(dir.path(), &format!("k-cow{i}"), &vec![0u8; s as usize * 512]);
        guest = guest.virtio_disk(Backing::raw(&p));
        k_cows.push(p);
    }
    let script = format!(
        r#"
report() {{ dmsetup mknodes; echo "$1 status $(dmsetup status $1 | cut -d' ' -f4-)"; echo "$1 sha $(sha256sum < /dev/mapper/$1 | cut -d' ' -f1)"; }}
# udm's stores, read by the kernel
for i in 0 1 2; do
  set -- vdb {c0} vdc {c1} vdd {c2}
  dev=$(eval echo \${{$((i*2+1))}}); chunk=$(eval echo \${{$((i*2+2))}})
  dmsetup create u$i --readonly --table "0 {origin} snapshot /dev/vda /dev/$dev P $chunk"
  report u$i
  dmsetup table u$i
done
dmsetup remove u0 u1 u2
# the kernel's own stack on blank disks
dmsetup create kb-real --table "0 {origin} linear /dev/vde 0"
dmsetup mknodes
dmsetup create k0 --table "0 {origin} snapshot /dev/mapper/kb-real /dev/vdf P {c0}"
dmsetup create k1 --table "0 {origin} snapshot /dev/mapper/kb-real /dev/vdg P {c1}"
dmsetup create k2 --table "0 {origin} snapshot /dev/mapper/kb-real /dev/vdh P {c2}"
dmsetup create kb --table "0 {origin} snapshot-origin /dev/mapper/kb-real"
dmsetup mknodes
dd if=/dev/urandom of=/dev/mapper/kb bs=4096 seek=100 count=50 conv=fsync 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/kb bs=4096 seek=3000 count=300 conv=fsync 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/kb bs=512 seek=16003 count=1 conv=fsync 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/k0 bs=4096 seek=2000 count=8 conv=fsync 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/k1 bs=512 seek=20000 count=3 conv=fsync 2>/dev/null
dd if=/dev/urandom of=/dev/mapper/k2 bs=4096 seek=10 count=1 conv=fsync 2>/dev/null
for d in k0 k1 k2; do report $d; done
echo "kb sha $(sha256sum < /dev/mapper/kb | cut -d' ' -f1)"
dmsetup remove kb k0 k1 k2 kb-real
sync
"#,
        origin = ORIGIN,
        c0 = CHUNKS[0],
        c1 = CHUNKS[1],
        c2 = CHUNKS[2],
    );
    let out = guest.script(&script).run().unwrap();
    out.assert_success();
    let line = |key: &str| -> String {
        out.output
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .unwrap_or_else(|| panic!("`{key}` missing from the guest output:\n{}", out.output))
            .trim()
            .to_string()
    };

    // The kernel read udm's snapshots exactly as udm showed them.
    for (i, (sha, status)) in udm_views.iter().enumerate() {
        assert_eq!(&line(&format!("u{i} sha ")), sha, "kernel's view of udm snapshot {i} (chunk {})", CHUNKS[i]);
        assert_eq!(&line(&format!("u{i} status ")), status, "kernel's status of udm snapshot {i}");
    }

    // udm reads the kernel's snapshots exactly as the kernel did.
    let k_origin_after = std::fs::read(&k_origin).unwrap();
    let k_cows_after: Vec<Vec<u8>> = k_cows.iter().map(|p| std::fs::read(p).unwrap()).collect();
    assert_eq!(hex_sha256(&k_origin_after), line("kb sha "), "the kernel's origin disk");
    let reg = udm_stack(&k_origin_after, &k_cows_after);
    for (i, chunk) in CHUNKS.iter().enumerate() {
        let name = format!("s{i}");
        let view = read_all(reg.device(&name).unwrap().as_ref());
        assert_eq!(hex_sha256(&view), line(&format!("k{i} sha ")), "udm's view of kernel snapshot {i} (chunk {chunk})");
        assert_eq!(status_args(&reg, &name), line(&format!("k{i} status ")), "udm's status of kernel snapshot {i}");
    }
}
