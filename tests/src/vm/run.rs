//! Booting a [`Guest`]: the initramfs, the QEMU command line, console capture and the
//! timeout.

use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::error::{tail, VmError};
use super::initramfs::Initramfs;
use super::{Guest, BEGIN_MARKER, END_MARKER};

/// What a guest printed and how its script ended.
#[derive(Debug, Clone)]
pub struct GuestOutput {
    /// Everything on the serial console (kernel messages included), `\r` removed.
    pub console: String,
    /// What the script printed: the console between the begin and end markers (kernel
    /// messages printed meanwhile are included too).
    pub output: String,
    /// The script's exit status.
    pub status: i32,
    /// Wall time from QEMU's start to its exit.
    pub elapsed: Duration,
}

impl GuestOutput {
    /// Panics, showing the console's tail, unless the script exited with status 0.
    #[track_caller]
    pub fn assert_success(&self) {
        assert_eq!(
            self.status,
            0,
            "the guest script failed (status {}); console tail:\n{}",
            self.status,
            tail(&self.console, 80)
        );
    }
}

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin /proc /sys /dev /tmp /mnt /run
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mkdir -p /dev/hugepages && mount -t hugetlbfs hugetlbfs /dev/hugepages
for m in $(cat /etc/udm-modules); do
  insmod "$m" || echo "udm-vm: insmod $m failed"
done
echo
echo "===UDM-GUEST-BEGIN==="
sh -e /etc/udm-script
rc=$?
echo
echo "===UDM-GUEST-END status=$rc==="
sync
poweroff -f
"#;

impl Guest {
    /// The initramfs this guest boots with.
    pub fn initramfs(&self) -> Result<Initramfs, VmError> {
        let mut root = self.root.clone();
        root.host_file(&self.kernel.busybox, "/bin/busybox")?;
        root.file("/init", INIT.as_bytes().to_vec(), 0o755);
        let mut list = String::new();
        let names: Vec<String> = self.modules.clone();
        for (i, ko) in self.kernel.resolve_modules(&names)?.iter().enumerate() {
            let name = ko.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let guest = format!("/lib/modules/{i:03}-{name}");
            root.host_file(ko, &guest)?;
            list.push_str(&guest);
            list.push('\n');
        }
        root.file("/etc/udm-modules", list.into_bytes(), 0o644);
        for (host, guest) in &self.binaries {
            root.host_binary(host, guest)?;
        }
        for (host, guest) in &self.host_files {
            root.host_file(host, guest)?;
        }
        root.file("/etc/udm-script", self.script.clone().into_bytes(), 0o755);
        Ok(root)
    }

    /// The QEMU arguments (without the initramfs path).
    pub fn qemu_command_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &str| a.push(s.to_string());
        push("-nodefaults");
        push("-no-reboot");
        push("-display");
        push("none");
        push("-machine");
        push(if self.intel_iommu { "q35,kernel-irqchip=split" } else { "q35" });
        push("-accel");
        push(if self.smp > 1 { "tcg,thread=multi" } else { "tcg" });
        push("-cpu");
        push("max");
        push("-smp");
        push(&self.smp.to_string());
        push("-m");
        push(&format!("{}M", self.memory_mib));
        if self.shared_memory {
            push("-object");
            push(&format!("memory-backend-memfd,id=mem,size={}M,share=on", self.memory_mib));
            push("-numa");
            push("node,memdev=mem");
        }
        push("-serial");
        push("stdio");
        push("-kernel");
        push(&self.kernel.image.to_string_lossy());
        // no_timer_check: under TCG on a loaded host the kernel's boot-time check of the
        // IO-APIC timer can miss its window and panic ("timer doesn't work through
        // Interrupt-remapped IO-APIC"); virtual machines skip it.
        let mut cmdline =
            vec!["console=ttyS0", "panic=-1", "quiet", "init_on_alloc=0", "no_timer_check", "rdinit=/init"]
                .into_iter()
                .map(String::from)
                .collect::<Vec<_>>();
        cmdline.extend(self.kernel_args.iter().cloned());
        push("-append");
        push(&cmdline.join(" "));
        // QEMU wants the IOMMU before any PCI device.
        if self.intel_iommu {
            push("-device");
            push("intel-iommu,intremap=on,caching-mode=on");
        }
        for (i, c) in self.nvme.iter().enumerate() {
            a.extend(c.args(i));
        }
        for (i, d) in self.virtio_disks.iter().enumerate() {
            a.extend(d.args(i));
        }
        for (i, v) in self.vhost_user.iter().enumerate() {
            a.extend(v.args(i));
        }
        a.extend(self.qemu_args.iter().cloned());
        a
    }

    /// Boots the guest, runs the script and waits for QEMU to exit (or kills it at the
    /// timeout). Set `UDM_VM_VERBOSE=1` to see the console live on stderr.
    pub fn run(&self) -> Result<GuestOutput, VmError> {
        let dir = tempfile::tempdir().map_err(|e| VmError::io("creating a temporary directory", e))?;
        let initrd = dir.path().join("initramfs.cpio");
        std::fs::write(&initrd, self.initramfs()?.to_cpio())
            .map_err(|e| VmError::io(format!("writing {}", initrd.display()), e))?;
        let mut args = self.qemu_command_args();
        args.push("-initrd".into());
        args.push(initrd.to_string_lossy().into_owned());
        let verbose = std::env::var_os("UDM_VM_VERBOSE").is_some_and(|v| v != "0");
        if verbose {
            eprintln!("udm-vm: {} {}", self.qemu.display(), args.join(" "));
        }
        let start = Instant::now();
        let mut child = Command::new(&self.qemu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| VmError::Spawn { program: self.qemu.display().to_string(), source })?;
        let console = Arc::new(Mutex::new(String::new()));
        let stdout = child.stdout.take().expect("stdout is piped");
        let reader = {
            let console = Arc::clone(&console);
            std::thread::spawn(move || pump(stdout, &console, verbose))
        };
        let stderr_text = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("stderr is piped");
        let err_reader = {
            let text = Arc::clone(&stderr_text);
            std::thread::spawn(move || pump(stderr, &text, verbose))
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if start.elapsed() < self.timeout => std::thread::sleep(Duration::from_millis(50)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let _ = reader.join();
                    let _ = err_reader.join();
                    let text = console.lock().expect("console lock").clone();
                    return Err(VmError::Timeout { secs: self.timeout.as_secs(), tail: tail(&text, 60) });
                }
                Err(e) => return Err(VmError::io("waiting for QEMU", e)),
            }
        };
        let elapsed = start.elapsed();
        let _ = reader.join();
        let _ = err_reader.join();
        let console = console.lock().expect("console lock").clone();
        let qemu_stderr = stderr_text.lock().expect("stderr lock").clone();
        let for_error = console.clone();
        parse_console(console, elapsed).ok_or_else(|| VmError::NoEndMarker {
            qemu_status: status.to_string(),
            tail: tail(&console_with_stderr(&for_error, &qemu_stderr), 60),
        })
    }
}

fn console_with_stderr(console: &str, stderr: &str) -> String {
    if stderr.is_empty() {
        console.to_string()
    } else {
        format!("{console}\n--- QEMU stderr ---\n{stderr}")
    }
}

/// Copies a pipe into `sink` as it arrives (and to stderr when `verbose`).
fn pump(mut pipe: impl Read, sink: &Mutex<String>, verbose: bool) {
    let mut buf = [0u8; 4096];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let text = String::from_utf8_lossy(&buf[..n]).replace('\r', "");
                if verbose {
                    eprint!("{text}");
                }
                sink.lock().expect("console lock").push_str(&text);
            }
        }
    }
}

/// Splits the console at the markers; `None` when the end marker is missing.
fn parse_console(console: String, elapsed: Duration) -> Option<GuestOutput> {
    let end = console.rfind(END_MARKER)?;
    let after = &console[end + END_MARKER.len()..];
    let status: i32 = after.strip_prefix(" status=")?.split("===").next()?.trim().parse().ok()?;
    let begin = console[..end].rfind(BEGIN_MARKER).map(|b| b + BEGIN_MARKER.len()).unwrap_or(0);
    let output = console[begin..end].trim_matches('\n').to_string();
    Some(GuestOutput { console, output, status, elapsed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers_and_status() {
        let c = format!("boot\n{BEGIN_MARKER}\nhello\nworld\n\n{END_MARKER} status=3===\nreboot").to_string();
        let out = parse_console(c, Duration::ZERO).unwrap();
        assert_eq!(out.output, "hello\nworld");
        assert_eq!(out.status, 3);
        assert!(parse_console(format!("{BEGIN_MARKER}\nhello"), Duration::ZERO).is_none());
    }
}
