//! The whole stack in one guest: an emulated NVMe controller driven by udm's driver,
//! an LVM-style snapshot stack on it (origin and COW on two namespaces), both exported
//! over vhost-user-blk by `udm serve`, and a libblkio client in the same guest writing
//! through the origin and reading both back. Guest memory of the client reaches the
//! NVMe controller through the memory registry (no copy).

use std::path::PathBuf;
use std::time::Duration;

use udm_tests::vm::{modules, shell, Backing, Guest, NvmeController, NvmeNamespace};

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let p = exe.parent().and_then(|d| d.parent()).unwrap().join(name);
    assert!(p.is_file(), "{} is missing: build it first (`cargo build -p udm-server`)", p.display());
    p
}

#[test]
fn nvme_snapshot_export_and_blkio_client_in_one_guest() {
    let origin = tempfile::NamedTempFile::new().unwrap();
    origin.as_file().set_len(32 << 20).unwrap();
    let cow = tempfile::NamedTempFile::new().unwrap();
    cow.as_file().set_len(16 << 20).unwrap();
    let bdf = "0000:00:04.0";
    let config = format!(
        "control = \"/tmp/udm.ctl\"\n\
         [[backend]]\nname = \"disk0\"\nspec = \"nvme:{bdf}/1\"\n\
         [[backend]]\nname = \"cow0\"\nspec = \"nvme:{bdf}/2\"\n\
         [[device]]\nname = \"vol\"\ntable = \"0 65536 linear disk0 0\"\n\
         [[snapshot]]\norigin = \"vol\"\nname = \"snap\"\ncow = \"cow0\"\nchunk = \"4k\"\n\
         [[export]]\nname = \"vol\"\ndevice = \"vol\"\nsocket = \"/tmp/vol.sock\"\n\
         [[export]]\nname = \"snap\"\ndevice = \"snap\"\nsocket = \"/tmp/snap.sock\"\n"
    );
    let script = format!(
        "{bind}
udm serve --config /etc/udm.toml > /tmp/serve.log 2>&1 &
i=0; while {{ [ ! -S /tmp/vol.sock ] || [ ! -S /tmp/snap.sock ]; }} && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ -S /tmp/snap.sock ] || {{ cat /tmp/serve.log; exit 1; }}
echo STEP write; udm-blkio-check write /tmp/vol.sock --bytes 8388608 --seed 7
echo STEP verify; udm-blkio-check verify /tmp/vol.sock --bytes 8388608 --seed 7
echo STEP snapshot; udm-blkio-check zero /tmp/snap.sock --bytes 8388608
kill %1; wait
echo STEP serve-log; cat /tmp/serve.log
",
        bind = shell::bind_vfio(bdf)
    );
    let out = Guest::new()
        .expect("guest kernel (run scripts/vm-prepare.sh)")
        .memory_mib(1024)
        .smp(2)
        .intel_iommu()
        .hugepages(128)
        .modules(modules::VFIO)
        .nvme(
            NvmeController::new("udmstack", 4)
                .namespace(NvmeNamespace::new(Backing::raw(origin.path()), 4096))
                .namespace(NvmeNamespace::new(Backing::raw(cow.path()), 4096)),
        )
        .binary(sibling("udm"))
        .binary(env!("CARGO_BIN_EXE_udm-blkio-check"))
        .file("/etc/udm.toml", config)
        .script(&script)
        .timeout(Duration::from_secs(300))
        .run()
        .expect("the guest ran");
    out.assert_success();
    let steps: Vec<&str> = out.output.split("STEP ").collect();
    for name in ["write", "verify", "snapshot"] {
        let step =
            steps.iter().find(|s| s.starts_with(name)).unwrap_or_else(|| panic!("{name} missing:\n{}", out.output));
        assert!(step.contains("blkio-check ok"), "{name}:\n{}", out.output);
    }
    // From the host: the origin namespace holds what the client wrote, sector by sector.
    let data = std::fs::read(origin.path()).unwrap();
    for s in 0..(8 << 20) / 512usize {
        assert_eq!(u64::from_le_bytes(data[s * 512..s * 512 + 8].try_into().unwrap()), s as u64, "origin sector {s}");
    }
    // The COW namespace got the snapshot's exceptions: it is no longer all zeroes.
    let cow_data = std::fs::read(cow.path()).unwrap();
    assert!(cow_data.iter().any(|&b| b != 0), "the COW store is empty");
}
