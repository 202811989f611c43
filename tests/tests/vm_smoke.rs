//! The VM harness itself: a guest boots, runs a script, reports its output and status,
//! carries host binaries in and loads modules with their dependencies.

use std::time::Duration;

use udm_tests::vm::{modules, Backing, Guest, NvmeController, NvmeNamespace};

#[test]
fn guest_runs_a_script_and_reports_output_and_status() {
    let img = tempfile::NamedTempFile::new().unwrap();
    img.as_file().set_len(16 << 20).unwrap();
    let out = Guest::new()
        .expect("guest kernel (run scripts/vm-prepare.sh)")
        .intel_iommu()
        .modules(modules::VFIO)
        .nvme(NvmeController::new("udmsmoke", 4).namespace(NvmeNamespace::new(Backing::raw(img.path()), 4096)))
        .binary("/usr/bin/od")
        .file("/etc/greeting", "hello from the host\n")
        .script(
            "cat /etc/greeting\n\
             echo sum=$((40 + 2))\n\
             cat /sys/bus/pci/devices/0000:00:04.0/class\n\
             ls /sys/bus/pci/devices/0000:00:04.0/iommu_group/devices\n\
             grep -q vfio_pci /proc/modules && echo vfio-loaded\n\
             printf 'AB' | od -An -tx1\n\
             exit 7",
        )
        .timeout(Duration::from_secs(180))
        .run()
        .unwrap();
    assert_eq!(out.status, 7, "console:\n{}", out.console);
    for expected in ["hello from the host", "sum=42", "0x010802", "0000:00:04.0", "vfio-loaded", "41 42"] {
        assert!(out.output.contains(expected), "`{expected}` missing from:\n{}", out.output);
    }
}

#[test]
fn module_dependencies_come_first() {
    let kernel = udm_tests::vm::GuestKernel::from_env().expect("guest kernel (run scripts/vm-prepare.sh)");
    let order = kernel.resolve_modules(&["vfio-pci".to_string(), "dm-snapshot".to_string()]).unwrap();
    let names: Vec<String> = order.iter().map(|p| p.file_stem().unwrap().to_string_lossy().replace('-', "_")).collect();
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap_or_else(|| panic!("{n} missing from {names:?}"));
    assert!(pos("vfio") < pos("vfio_pci_core"));
    assert!(pos("vfio_pci_core") < pos("vfio_pci"));
    assert!(pos("dm_mod") < pos("dm_snapshot"));
    assert!(pos("dm_bufio") < pos("dm_snapshot"));
    assert!(kernel.resolve_modules(&["no-such-module".to_string()]).is_err());
}
