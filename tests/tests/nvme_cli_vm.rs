//! `udm setup`, `udm nvme list|identify` and `udm bench` on an NVMe namespace, in a
//! guest whose controller starts out owned by the kernel's nvme driver.

use std::path::PathBuf;
use std::time::Duration;

use udm_tests::vm::{modules, Backing, Guest, NvmeController, NvmeNamespace};

/// The `udm` binary built beside this test (cargo builds the workspace's binaries into
/// the same profile directory).
fn udm_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(|d| d.parent()).unwrap();
    let udm = dir.join("udm");
    assert!(udm.is_file(), "{} is missing: build it first (`cargo build -p udm-server`)", udm.display());
    udm
}

#[test]
fn udm_setup_binds_identifies_benches_and_undoes() {
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(64 << 20).unwrap();
    let bdf = "0000:00:04.0";
    let script = format!(
        "set +e
echo STEP report; udm setup; echo status=$?
echo STEP bind; udm setup --bind {bdf} --hugepages 48; echo status=$?
echo STEP driver; basename $(readlink /sys/bus/pci/devices/{bdf}/driver)
echo STEP list; udm nvme list; echo status=$?
echo STEP identify; udm nvme identify {bdf}; echo status=$?
echo STEP bench; udm bench --device nvme:{bdf}/1 --rw randrw --qd 8 --time 1s --verify; echo status=$?
echo STEP bench-wait; udm bench --device nvme:{bdf}/1 --rw randrw --qd 8 --time 1s --verify --wait; echo status=$?
echo STEP undo; udm setup --undo; echo status=$?
echo STEP driver-after; basename $(readlink /sys/bus/pci/devices/{bdf}/driver)
echo STEP hugepages-after; cat /proc/sys/vm/nr_hugepages
echo STEP unbound-open; udm nvme identify {bdf}; echo status=$?
"
    );
    let out = Guest::new()
        .expect("guest kernel (run scripts/vm-prepare.sh)")
        .memory_mib(768)
        .intel_iommu()
        .modules(modules::VFIO)
        .modules(modules::NVME)
        .nvme(NvmeController::new("udmcli", 4).namespace(NvmeNamespace::new(Backing::raw(img.path()), 4096)))
        .binary(udm_binary())
        .script(&script)
        .timeout(Duration::from_secs(300))
        .run()
        .expect("the guest ran");
    out.assert_success();
    let text = out.output.replace('\r', "");
    let step = |name: &str| -> String {
        let start = text.find(&format!("STEP {name}\n")).unwrap_or_else(|| panic!("step {name} missing:\n{text}"));
        let rest = &text[start + name.len() + 6..];
        rest[..rest.find("STEP ").unwrap_or(rest.len())].to_string()
    };
    let report = step("report");
    assert!(report.contains(&format!("{bdf}  driver=nvme")), "{report}");
    assert!(report.contains("status=0"), "{report}");
    let bind = step("bind");
    assert!(bind.contains(&format!("{bdf}: bound to vfio-pci (was nvme)")), "{bind}");
    assert!(bind.contains("hugepages: 48 x 2 MiB reserved"), "{bind}");
    assert_eq!(step("driver").trim(), "vfio-pci");
    let list = step("list");
    assert!(
        list.contains(bdf) && list.contains("vfio-pci") && list.contains("1b36:0010") && list.contains("udmcli"),
        "{list}"
    );
    let identify = step("identify");
    assert!(identify.contains("serial udmcli"), "{identify}");
    assert!(identify.contains("namespace 1: 16384 blocks x 4096 B = 64 MiB"), "{identify}");
    let bench = step("bench");
    assert!(bench.contains("status=0"), "{bench}");
    // The same with hybrid polling (the driver naps in IoQueue::wait): data verified.
    let bench_wait = step("bench-wait");
    assert!(bench_wait.contains("status=0"), "{bench_wait}");
    let undo = step("undo");
    assert!(undo.contains(&format!("{bdf}: released to nvme")), "{undo}");
    assert!(undo.contains("hugepages: back to 0"), "{undo}");
    assert_eq!(step("driver-after").trim(), "nvme");
    assert_eq!(step("hugepages-after").trim(), "0");
    let unbound = step("unbound-open");
    assert!(unbound.contains("is bound to the `nvme` driver, not vfio-pci: run `udm setup --bind"), "{unbound}");
    assert!(unbound.contains("status=1"), "{unbound}");
}
