//! `udm setup`: prepares a machine for udm's NVMe driver and reports what it has.
//!
//! * no options: a report (NVMe controllers and their drivers, IOMMU groups, VFIO,
//!   hugepages, locked-memory limit), changing nothing;
//! * `--bind BDF` / `--all-nvme`: hands controllers to vfio-pci (refusing ones with a
//!   mounted file system), remembering their previous driver;
//! * `--hugepages N`: reserves N 2 MiB hugepages;
//! * `--undo`: gives every controller back to its previous driver and restores the
//!   hugepage count, from the state file (`$UDM_STATE_DIR/setup.json`, default /run/udm).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::{Deserialize, Serialize};
use udm_drivers::nvme::{self, vfio};

/// Arguments of `udm setup`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  udm setup                          # report only\n  udm setup --bind 0000:01:00.0 --hugepages 512\n  udm setup --all-nvme\n  udm setup --undo"
)]
pub struct SetupArgs {
    /// Bind this PCI function (e.g. 0000:01:00.0) to vfio-pci. Repeatable.
    #[arg(long, value_name = "BDF")]
    pub bind: Vec<String>,
    /// Bind every NVMe controller that has no mounted file system.
    #[arg(long)]
    pub all_nvme: bool,
    /// Give this function back to the driver it had before `--bind`. Repeatable.
    #[arg(long, value_name = "BDF")]
    pub unbind: Vec<String>,
    /// Reserve this many 2 MiB hugepages.
    #[arg(long, value_name = "N")]
    pub hugepages: Option<u64>,
    /// Undo everything earlier `udm setup` runs did.
    #[arg(long, conflicts_with_all = ["bind", "all_nvme", "unbind", "hugepages"])]
    pub undo: bool,
    /// Bind even if a namespace of the controller is mounted or in use (data loss!).
    #[arg(long)]
    pub force: bool,
}

/// What earlier runs changed, so `--undo` can restore it.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    /// PCI function -> the driver it had before (None: no driver).
    bound: Vec<(String, Option<String>)>,
    /// The hugepage count before the first change.
    hugepages_before: Option<u64>,
}

fn state_path() -> PathBuf {
    std::env::var_os("UDM_STATE_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/run/udm")).join("setup.json")
}

fn load_state() -> State {
    std::fs::read_to_string(state_path()).ok().and_then(|s| serde_json::from_str(&s).ok()).unwrap_or_default()
}

fn save_state(state: &State) -> Result<(), String> {
    let path = state_path();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(state).expect("state serialises");
    std::fs::write(&path, text).map_err(|e| format!("writing {}: {e}", path.display()))
}

fn write_sys(path: impl AsRef<Path>, value: &str) -> Result<(), String> {
    let path = path.as_ref();
    std::fs::write(path, value).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied { " (run as root)" } else { "" };
        format!("writing `{value}` to {}: {e}{hint}", path.display())
    })
}

fn dev_dir(bdf: &str) -> PathBuf {
    Path::new(vfio::SYSFS_PCI).join(bdf)
}

/// Block devices (nvme0n1…) the kernel made for a controller.
fn kernel_block_devices(bdf: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(ctrls) = std::fs::read_dir(dev_dir(bdf).join("nvme")) else { return out };
    for c in ctrls.flatten() {
        let Ok(entries) = std::fs::read_dir(c.path()) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("nvme") && name.contains('n') && e.path().join("size").exists() {
                out.push(name);
            }
        }
    }
    out.sort();
    out
}

/// Mounted file systems or swap on any of `disks` (or their partitions).
fn in_use(disks: &[String]) -> Vec<String> {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let swaps = std::fs::read_to_string("/proc/swaps").unwrap_or_default();
    let mut out = Vec::new();
    for line in mounts.lines().chain(swaps.lines()) {
        let mut fields = line.split_whitespace();
        let (Some(src), target) = (fields.next(), fields.next().unwrap_or("")) else { continue };
        if let Some(dev) = src.strip_prefix("/dev/") {
            if disks.iter().any(|d| dev == d || dev.starts_with(&format!("{d}p"))) {
                out.push(format!("/dev/{dev} on {target}"));
            }
        }
    }
    out
}

fn ensure_vfio_pci() -> Result<(), String> {
    if Path::new("/sys/bus/pci/drivers/vfio-pci").exists() {
        return Ok(());
    }
    let status = std::process::Command::new("modprobe").arg("vfio-pci").status();
    match status {
        Ok(s) if s.success() && Path::new("/sys/bus/pci/drivers/vfio-pci").exists() => Ok(()),
        _ => {
            Err("the vfio-pci driver is not loaded and `modprobe vfio-pci` failed: install the kernel's VFIO modules \
                  and enable the IOMMU (intel_iommu=on or amd_iommu=on)"
                .into())
        }
    }
}

fn bind(bdf: &str, force: bool, state: &mut State) -> Result<(), String> {
    let bdf = vfio::normalize_bdf(bdf).map_err(|e| e.to_string())?;
    let dir = dev_dir(&bdf);
    if !dir.exists() {
        return Err(format!("there is no PCI function {bdf} (see `udm nvme list`)"));
    }
    let previous = vfio::bound_driver(&bdf);
    if previous.as_deref() == Some("vfio-pci") {
        println!("{bdf}: already bound to vfio-pci");
        return Ok(());
    }
    let busy = in_use(&kernel_block_devices(&bdf));
    if !busy.is_empty() && !force {
        return Err(format!(
            "{bdf} is in use: {}. Unmount first (or pass --force to take it anyway, losing whatever uses it)",
            busy.join(", ")
        ));
    }
    if vfio::iommu_group(&bdf).is_none() {
        return Err(format!(
            "{bdf} has no IOMMU group: enable the IOMMU (intel_iommu=on or amd_iommu=on on the kernel command line)"
        ));
    }
    ensure_vfio_pci()?;
    if previous.is_some() {
        write_sys(dir.join("driver/unbind"), &bdf)?;
    }
    write_sys(dir.join("driver_override"), "vfio-pci")?;
    write_sys("/sys/bus/pci/drivers_probe", &bdf)?;
    if vfio::bound_driver(&bdf).as_deref() != Some("vfio-pci") {
        return Err(format!("{bdf} did not bind to vfio-pci (see `dmesg`)"));
    }
    if !state.bound.iter().any(|(b, _)| *b == bdf) {
        state.bound.push((bdf.clone(), previous.clone()));
    }
    println!(
        "{bdf}: bound to vfio-pci (was {}), IOMMU group {}",
        previous.as_deref().unwrap_or("no driver"),
        vfio::iommu_group(&bdf).map(|g| g.to_string()).unwrap_or_default()
    );
    Ok(())
}

fn unbind(bdf: &str, state: &mut State) -> Result<(), String> {
    let bdf = vfio::normalize_bdf(bdf).map_err(|e| e.to_string())?;
    let dir = dev_dir(&bdf);
    let previous = state.bound.iter().find(|(b, _)| *b == bdf).and_then(|(_, d)| d.clone());
    if vfio::bound_driver(&bdf).as_deref() == Some("vfio-pci") {
        write_sys(dir.join("driver/unbind"), &bdf)?;
    }
    // An empty override lets the kernel pick the normal driver again.
    write_sys(dir.join("driver_override"), "\n")?;
    write_sys("/sys/bus/pci/drivers_probe", &bdf)?;
    state.bound.retain(|(b, _)| *b != bdf);
    println!(
        "{bdf}: released to {} (was expected: {})",
        vfio::bound_driver(&bdf).as_deref().unwrap_or("no driver"),
        previous.as_deref().unwrap_or("no driver")
    );
    Ok(())
}

fn hugepages_now() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/nr_hugepages").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0)
}

fn set_hugepages(n: u64, state: &mut State) -> Result<(), String> {
    state.hugepages_before.get_or_insert(hugepages_now());
    write_sys("/proc/sys/vm/nr_hugepages", &n.to_string())?;
    let got = hugepages_now();
    if got < n {
        println!("hugepages: asked for {n}, the kernel reserved {got} (memory is fragmented: reserve them at boot with hugepages={n})");
    } else {
        println!("hugepages: {got} x 2 MiB reserved");
    }
    Ok(())
}

fn report() {
    println!("NVMe controllers:");
    let ctrls = nvme::list_controllers();
    if ctrls.is_empty() {
        println!("  none");
    }
    for (bdf, driver) in &ctrls {
        let group = vfio::iommu_group(bdf);
        let disks = kernel_block_devices(bdf);
        let busy = in_use(&disks);
        println!(
            "  {bdf}  driver={}  iommu_group={}{}{}",
            driver.as_deref().unwrap_or("none"),
            group.map(|g| g.to_string()).unwrap_or_else(|| "none (IOMMU off?)".into()),
            if disks.is_empty() { String::new() } else { format!("  disks={}", disks.join(",")) },
            if busy.is_empty() { String::new() } else { format!("  IN USE: {}", busy.join(", ")) },
        );
        if let Some(g) = group {
            let others: Vec<String> = vfio::group_members(g).into_iter().filter(|m| m != bdf).collect();
            if !others.is_empty() {
                println!("      shares IOMMU group {g} with {}", others.join(", "));
            }
        }
    }
    println!(
        "VFIO: {}",
        if Path::new("/dev/vfio/vfio").exists() { "available" } else { "not loaded (udm setup --bind loads vfio-pci)" }
    );
    println!("hugepages: {} reserved, {} free (2 MiB)", hugepages_now(), udm_drivers::dma::free_hugepages());
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into `lim`.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) };
    let memlock = if lim.rlim_cur == libc::RLIM_INFINITY {
        "unlimited".to_string()
    } else {
        format!("{} KiB", lim.rlim_cur / 1024)
    };
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    println!("locked-memory limit: {memlock}{}", if root { " (root: not enforced for VFIO)" } else { "" });
    let state = load_state();
    if !state.bound.is_empty() {
        let list: Vec<&str> = state.bound.iter().map(|(b, _)| b.as_str()).collect();
        println!("bound by udm setup: {} (undo with `udm setup --undo`)", list.join(", "));
    }
}

/// Runs `udm setup`.
pub fn main(args: SetupArgs) -> ExitCode {
    let mut state = load_state();
    let mut errors = Vec::new();
    let changed =
        args.undo || args.all_nvme || !args.bind.is_empty() || !args.unbind.is_empty() || args.hugepages.is_some();
    if args.undo {
        for (bdf, _) in state.bound.clone() {
            if let Err(e) = unbind(&bdf, &mut state) {
                errors.push(e);
            }
        }
        if let Some(n) = state.hugepages_before.take() {
            match write_sys("/proc/sys/vm/nr_hugepages", &n.to_string()) {
                Ok(()) => println!("hugepages: back to {n}"),
                Err(e) => errors.push(e),
            }
        }
    }
    let mut targets = args.bind.clone();
    if args.all_nvme {
        for (bdf, driver) in nvme::list_controllers() {
            if driver.as_deref() == Some("vfio-pci") {
                continue;
            }
            let busy = in_use(&kernel_block_devices(&bdf));
            if busy.is_empty() || args.force {
                targets.push(bdf);
            } else {
                println!("{bdf}: skipped, in use: {}", busy.join(", "));
            }
        }
    }
    for bdf in &targets {
        if let Err(e) = bind(bdf, args.force, &mut state) {
            errors.push(e);
        }
    }
    for bdf in &args.unbind {
        if let Err(e) = unbind(bdf, &mut state) {
            errors.push(e);
        }
    }
    if let Some(n) = args.hugepages {
        if let Err(e) = set_hugepages(n, &mut state) {
            errors.push(e);
        }
    }
    if changed {
        if let Err(e) = save_state(&state) {
            errors.push(e);
        }
    } else {
        report();
    }
    for e in &errors {
        eprintln!("udm setup: {e}");
    }
    if errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
