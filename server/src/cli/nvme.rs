//! `udm nvme list` and `udm nvme identify`: what NVMe controllers this machine has and
//! what one of them reports through udm's own driver.

use std::process::ExitCode;

use udm_drivers::nvme::{self, vfio, ControllerOptions, NvmeNamespace};
use udm_drivers::BlockDevice;

/// Arguments of `udm nvme`.
#[derive(Debug, clap::Args)]
pub struct NvmeArgs {
    #[command(subcommand)]
    command: NvmeCommand,
}

#[derive(Debug, clap::Subcommand)]
enum NvmeCommand {
    /// Lists NVMe controllers (PCI class 01:08:02), their drivers and IOMMU groups.
    List {
        /// One JSON object per controller.
        #[arg(long)]
        json: bool,
    },
    /// Opens a controller bound to vfio-pci and prints what Identify reports.
    Identify {
        /// PCI address, e.g. 0000:01:00.0.
        bdf: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn sysfs(bdf: &str, file: &str) -> Option<String> {
    std::fs::read_to_string(format!("{}/{bdf}/{file}", vfio::SYSFS_PCI)).ok().map(|s| s.trim().to_string())
}

/// Model and serial as the kernel's nvme driver shows them, when it owns the device.
fn kernel_identity(bdf: &str) -> Option<(String, String)> {
    let dir = std::fs::read_dir(format!("{}/{bdf}/nvme", vfio::SYSFS_PCI)).ok()?.flatten().next()?.path();
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().map(|s| s.trim().to_string());
    Some((read("model")?, read("serial")?))
}

fn list(json: bool) -> ExitCode {
    let ctrls = nvme::list_controllers();
    if !json {
        println!("{:<14} {:<10} {:<11} {:<6} {:<28} SERIAL", "PCI", "DRIVER", "VENDOR:DEV", "GROUP", "MODEL");
    }
    for (bdf, driver) in ctrls {
        let id = format!(
            "{}:{}",
            sysfs(&bdf, "vendor").unwrap_or_default().trim_start_matches("0x"),
            sysfs(&bdf, "device").unwrap_or_default().trim_start_matches("0x")
        );
        let group = vfio::iommu_group(&bdf);
        // Through the kernel when it drives the controller; through udm's driver when
        // vfio-pci has it (opening it briefly).
        let (model, serial) = match driver.as_deref() {
            Some("vfio-pci") => match nvme::open_controller(&bdf, ControllerOptions::default()) {
                Ok(c) => (c.identity().model.clone(), c.identity().serial.clone()),
                Err(e) => (format!("(cannot open: {e})"), String::new()),
            },
            _ => kernel_identity(&bdf).unwrap_or_default(),
        };
        if json {
            let v = serde_json::json!({
                "pci": bdf, "driver": driver, "id": id, "iommu_group": group, "model": model, "serial": serial,
                "spec": format!("nvme:{bdf}/1"),
            });
            println!("{v}");
        } else {
            println!(
                "{:<14} {:<10} {:<11} {:<6} {:<28} {}",
                bdf,
                driver.as_deref().unwrap_or("-"),
                id,
                group.map(|g| g.to_string()).unwrap_or_else(|| "-".into()),
                model,
                serial
            );
        }
    }
    ExitCode::SUCCESS
}

fn identify(bdf: &str, json: bool) -> ExitCode {
    let ctrl = match nvme::open_controller(bdf, ControllerOptions::default()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("udm nvme identify: {e}");
            return ExitCode::FAILURE;
        }
    };
    let id = ctrl.identity();
    let caps = ctrl.capabilities();
    let mut namespaces = Vec::new();
    for (nsid, ns) in ctrl.namespaces() {
        let usable = NvmeNamespace::new(&ctrl, *nsid).map(|d| d.info());
        namespaces.push(serde_json::json!({
            "nsid": nsid,
            "spec": format!("nvme:{}/{nsid}", ctrl.bdf()),
            "blocks": ns.size_blocks,
            "block_size": ns.block_size,
            "metadata_size": ns.metadata_size,
            "bytes": ns.size_blocks * u64::from(ns.block_size),
            "write_protected": ns.write_protected,
            "usable": usable.as_ref().map(|_| true).unwrap_or(false),
            "problem": usable.err().map(|e| e.to_string()),
        }));
    }
    let v = serde_json::json!({
        "pci": ctrl.bdf(),
        "vendor_id": format!("{:#06x}", id.vendor_id),
        "model": id.model,
        "serial": id.serial,
        "firmware": id.firmware,
        "version": ctrl.version(),
        "controller_id": id.controller_id,
        "mdts": id.mdts,
        "max_transfer_bytes": ctrl.max_transfer(),
        "max_queue_entries": caps.max_queue_entries,
        "doorbell_stride": caps.doorbell_stride,
        "ready_timeout_ms": caps.timeout_ms,
        "io_queue_pairs": ctrl.io_queue_pairs(),
        "shadow_doorbells": ctrl.uses_shadow_doorbells(),
        "volatile_write_cache": id.volatile_write_cache,
        "oncs": format!("{:#06x}", id.oncs),
        "oacs": format!("{:#06x}", id.oacs),
        "subnqn": id.subnqn,
        "namespaces": namespaces,
    });
    if json {
        println!("{v}");
        return ExitCode::SUCCESS;
    }
    println!("{} {} (serial {}, firmware {}, NVMe {})", ctrl.bdf(), id.model, id.serial, id.firmware, ctrl.version());
    println!(
        "  max transfer {} KiB (MDTS {}), {} I/O queue pairs of up to {} entries, shadow doorbells {}",
        ctrl.max_transfer() / 1024,
        id.mdts,
        ctrl.io_queue_pairs(),
        caps.max_queue_entries,
        if ctrl.uses_shadow_doorbells() { "on" } else { "off" }
    );
    println!(
        "  volatile write cache: {}, dataset management: {}, write zeroes: {}",
        id.volatile_write_cache,
        id.oncs & udm_drivers::nvme::identify::ONCS_DSM != 0,
        id.oncs & udm_drivers::nvme::identify::ONCS_WRITE_ZEROES != 0
    );
    for n in v["namespaces"].as_array().into_iter().flatten() {
        println!(
            "  namespace {}: {} blocks x {} B = {} MiB{}  -> {}",
            n["nsid"],
            n["blocks"],
            n["block_size"],
            n["bytes"].as_u64().unwrap_or(0) >> 20,
            n["problem"].as_str().map(|p| format!(" (unusable: {p})")).unwrap_or_default(),
            n["spec"].as_str().unwrap_or("")
        );
    }
    ExitCode::SUCCESS
}

/// Runs `udm nvme`.
pub fn main(args: NvmeArgs) -> ExitCode {
    match args.command {
        NvmeCommand::List { json } => list(json),
        NvmeCommand::Identify { bdf, json } => identify(&bdf, json),
    }
}
