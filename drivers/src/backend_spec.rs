//! Backends named on a command line or in a config file:
//!
//! | spec | device |
//! |---|---|
//! | `null:1G[,bs=4096][,read-zeroes=off]` | [`NullDevice`]: stores nothing, reads zeroes (or leave buffers untouched) |
//! | `mem:64M[,bs=4096]` | [`MemDevice`]: a RAM disk |
//! | `file:/path[,ro][,direct=off][,bs=4096]` | [`FileDevice`]: a file or block device via io_uring |
//! | `fault:<faults>@<spec>` | [`FaultDevice`] over any other spec |
//! | `nvme:0000:00:04.0/1[,timeout-ms=N][,shadow=off]` | namespace 1 of an NVMe controller bound to vfio-pci ([`crate::nvme`]) |
//!
//! The faults are comma-separated: `fail-after=N` (every request fails after N writes),
//! `power-loss=N[,seed=S]` (write N is torn, later writes dropped), `stall-after=N`
//! (every request after N writes is held, never completed: a hung disk), `corrupt=SECTOR`
//! (repeatable: reads of that sector come back with one byte inverted), and
//! `volatile-cache[,power-loss=N][,seed=S]`: a volatile write cache like a real disk's
//! (writes are acknowledged from the cache and reach the device only at a flush or with
//! FUA); with `power-loss=N` the power goes during write N: a seeded subset of the
//! unflushed writes is lost, some are torn at block granularity, the survivors land in a
//! seeded order, and flushed and FUA writes survive; afterwards writes vanish and reads
//! show what survived (see [`crate::backends::fault`]). For example
//! `fault:corrupt=2048@mem:64M`, `fault:power-loss=100,seed=7@file:/tmp/disk.img` or
//! `fault:volatile-cache,power-loss=500,seed=3@mem:64M`.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backends::fault::{FaultDevice, FaultPlan, WriteFault};
use crate::backends::file::{FileDevice, FileOptions};
use crate::backends::mem::MemDevice;
use crate::backends::null::NullDevice;
use crate::device::BlockDevice;
use crate::error::DeviceError;
use crate::units::parse_size;

/// A parsed backend specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// `null:<size>[,bs=<block size>][,read-zeroes=off]`
    Null {
        /// Size in bytes.
        bytes: u64,
        /// Logical block size.
        block_size: u32,
        /// Reads fill the buffer with zeroes (default); off leaves it untouched, like
        /// SPDK's null bdev, Linux null_blk and QEMU's `null-co` by default.
        read_zeroes: bool,
    },
    /// `mem:<size>[,bs=<block size>]`
    Mem {
        /// Size in bytes.
        bytes: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// `file:/path[,ro][,direct=off][,bs=<block size>]`
    File {
        /// The file or block device.
        path: PathBuf,
        /// How to open it.
        options: FileOptions,
    },
    /// `nvme:<PCI address>[/<namespace>][,timeout-ms=N][,shadow=off]`
    Nvme {
        /// The controller's PCI address, in full form.
        bdf: String,
        /// The namespace (1 when not given).
        nsid: u32,
        /// I/O command timeout in milliseconds (default 30000).
        timeout_ms: Option<u64>,
        /// Use shadow doorbells when offered (default on).
        shadow_doorbells: bool,
    },
    /// `fault:<faults>@<inner spec>`
    Fault {
        /// Faults armed at creation.
        plan: FaultPlan,
        /// The wrapped device.
        inner: Box<BackendSpec>,
    },
}

/// Options that follow the first comma.
#[derive(Debug, Default)]
struct Options<'a> {
    pairs: Vec<(&'a str, Option<&'a str>)>,
}

impl<'a> Options<'a> {
    fn parse(text: &'a str) -> Self {
        let pairs = text
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|kv| match kv.split_once('=') {
                Some((k, v)) => (k, Some(v)),
                None => (kv, None),
            })
            .collect();
        Options { pairs }
    }

    fn take(&mut self, key: &str) -> Option<Option<&'a str>> {
        let idx = self.pairs.iter().position(|(k, _)| *k == key)?;
        Some(self.pairs.remove(idx).1)
    }

    fn finish(self, spec: &str) -> Result<(), DeviceError> {
        match self.pairs.first() {
            None => Ok(()),
            Some((k, _)) => Err(bad(spec, format!("unknown option `{k}`"))),
        }
    }
}

fn bad(spec: &str, reason: impl Into<String>) -> DeviceError {
    DeviceError::BadSpec { spec: spec.to_string(), reason: reason.into() }
}

impl BackendSpec {
    /// Parses a specification.
    pub fn parse(spec: &str) -> Result<Self, DeviceError> {
        let (kind, rest) = spec
            .split_once(':')
            .ok_or_else(|| bad(spec, "expected <kind>:<argument>, e.g. null:1G, mem:1G, file:/path/disk.img"))?;
        if kind == "fault" {
            return Self::parse_fault(spec, rest);
        }
        let (arg, opts) = rest.split_once(',').unwrap_or((rest, ""));
        let mut opts = Options::parse(opts);
        let block_size = match opts.take("bs") {
            None => None,
            Some(v) => {
                let v = v.ok_or_else(|| bad(spec, "bs needs a value, e.g. bs=4096"))?;
                let n = parse_size(v).map_err(|e| bad(spec, e))?;
                Some(u32::try_from(n).map_err(|_| bad(spec, "block size too large"))?)
            }
        };
        let parsed = match kind {
            "null" | "mem" => {
                let bytes = parse_size(arg).map_err(|e| bad(spec, e))?;
                let block_size = block_size.unwrap_or(512);
                if kind == "null" {
                    let read_zeroes = match opts.take("read-zeroes") {
                        None | Some(Some("on")) => true,
                        Some(Some("off")) => false,
                        Some(_) => return Err(bad(spec, "read-zeroes is `read-zeroes=on` or `read-zeroes=off`")),
                    };
                    BackendSpec::Null { bytes, block_size, read_zeroes }
                } else {
                    BackendSpec::Mem { bytes, block_size }
                }
            }
            "file" => {
                if arg.is_empty() {
                    return Err(bad(spec, "file needs a path, e.g. file:/var/lib/udm/disk.img"));
                }
                let read_only = match opts.take("ro") {
                    None => false,
                    Some(None) => true,
                    Some(Some(_)) => return Err(bad(spec, "ro takes no value: write `,ro`")),
                };
                let direct = match opts.take("direct") {
                    None => true,
                    Some(Some("on")) => true,
                    Some(Some("off")) => false,
                    Some(_) => return Err(bad(spec, "direct is `direct=on` or `direct=off`")),
                };
                BackendSpec::File { path: PathBuf::from(arg), options: FileOptions { read_only, direct, block_size } }
            }
            "nvme" => {
                let (bdf, nsid) = match arg.split_once('/') {
                    Some((b, n)) => (b, n.parse().map_err(|_| bad(spec, format!("`{n}` is not a namespace number")))?),
                    None => (arg, 1),
                };
                let bdf = crate::nvme::vfio::normalize_bdf(bdf).map_err(|e| bad(spec, e.to_string()))?;
                if nsid == 0 {
                    return Err(bad(spec, "namespaces are numbered from 1"));
                }
                let timeout_ms = match opts.take("timeout-ms") {
                    None => None,
                    Some(v) => Some(
                        v.and_then(|v| v.parse().ok())
                            .filter(|&t| t > 0)
                            .ok_or_else(|| bad(spec, "timeout-ms needs a positive number of milliseconds"))?,
                    ),
                };
                let shadow_doorbells = match opts.take("shadow") {
                    None | Some(Some("on")) => true,
                    Some(Some("off")) => false,
                    Some(_) => return Err(bad(spec, "shadow is `shadow=on` or `shadow=off`")),
                };
                if block_size.is_some() {
                    return Err(bad(spec, "an NVMe namespace has its own block size: drop bs="));
                }
                BackendSpec::Nvme { bdf, nsid, timeout_ms, shadow_doorbells }
            }
            other => {
                return Err(bad(spec, format!("unknown backend kind `{other}`: use null, mem, file, nvme or fault")));
            }
        };
        opts.finish(spec)?;
        Ok(parsed)
    }

    fn parse_fault(spec: &str, rest: &str) -> Result<Self, DeviceError> {
        let (faults, inner) = rest
            .split_once('@')
            .ok_or_else(|| bad(spec, "expected fault:<faults>@<device spec>, e.g. fault:corrupt=2048@mem:64M"))?;
        let mut opts = Options::parse(faults);
        let number = |key: &str, v: Option<&str>| -> Result<u64, DeviceError> {
            v.and_then(|v| v.parse().ok()).ok_or_else(|| bad(spec, format!("{key} needs a number, e.g. {key}=100")))
        };
        let mut plan = FaultPlan::default();
        while let Some(v) = opts.take("corrupt") {
            plan.corrupt_sectors.push(number("corrupt", v)?);
        }
        let seed = opts.take("seed").map(|v| number("seed", v)).transpose()?.unwrap_or(0);
        let volatile = match opts.take("volatile-cache") {
            None => false,
            Some(None) => true,
            Some(Some(_)) => {
                return Err(bad(spec, "volatile-cache takes no value: write `volatile-cache,power-loss=N`"))
            }
        };
        let power_loss = match opts.take("power-loss") {
            None => None,
            Some(v) => match number("power-loss", v)? {
                0 => return Err(bad(spec, "power-loss counts writes from 1")),
                n => Some(n),
            },
        };
        plan.writes = match (volatile, opts.take("fail-after"), power_loss, opts.take("stall-after")) {
            (true, None, power_loss, None) => Some(WriteFault::VolatileCache { power_loss, seed }),
            (true, ..) => return Err(bad(spec, "volatile-cache combines only with power-loss, seed and corrupt")),
            (false, Some(v), None, None) => Some(WriteFault::FailAfterWrites(number("fail-after", v)?)),
            (false, None, Some(write), None) => Some(WriteFault::PowerLossAtWrite { write, seed }),
            (false, None, None, Some(v)) => Some(WriteFault::StallAfterWrites(number("stall-after", v)?)),
            (false, None, None, None) => None,
            _ => return Err(bad(spec, "choose one of fail-after, power-loss and stall-after")),
        };
        opts.finish(spec)?;
        let inner = Box::new(Self::parse(inner)?);
        Ok(BackendSpec::Fault { plan, inner })
    }

    /// Creates the device.
    pub fn open(&self) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        Ok(match self {
            BackendSpec::Null { bytes, block_size, read_zeroes } => {
                Arc::new(NullDevice::new(*bytes, *block_size)?.with_read_zeroes(*read_zeroes))
            }
            BackendSpec::Mem { bytes, block_size } => Arc::new(MemDevice::new(*bytes, *block_size)?),
            BackendSpec::File { path, options } => Arc::new(FileDevice::open(path, options)?),
            BackendSpec::Nvme { bdf, nsid, timeout_ms, shadow_doorbells } => {
                let mut options = crate::nvme::ControllerOptions::default();
                if let Some(ms) = timeout_ms {
                    options.io_timeout = std::time::Duration::from_millis(*ms);
                }
                options.shadow_doorbells = *shadow_doorbells;
                Arc::new(crate::nvme::open_namespace(bdf, *nsid, options)?)
            }
            BackendSpec::Fault { plan, inner } => Arc::new(FaultDevice::with_plan(inner.open()?, plan)),
        })
    }
}

/// Parses and opens a backend in one step.
pub fn open_backend(spec: &str) -> Result<Arc<dyn BlockDevice>, DeviceError> {
    BackendSpec::parse(spec)?.open()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs_and_names_what_is_wrong() {
        assert_eq!(
            BackendSpec::parse("null:1G").unwrap(),
            BackendSpec::Null { bytes: 1 << 30, block_size: 512, read_zeroes: true }
        );
        assert_eq!(
            BackendSpec::parse("null:1G,read-zeroes=off").unwrap(),
            BackendSpec::Null { bytes: 1 << 30, block_size: 512, read_zeroes: false }
        );
        assert!(BackendSpec::parse("null:1G,read-zeroes=maybe").is_err());
        assert_eq!(
            BackendSpec::parse("mem:64M,bs=4096").unwrap(),
            BackendSpec::Mem { bytes: 64 << 20, block_size: 4096 }
        );
        assert_eq!(
            BackendSpec::parse("file:/tmp/x.img,ro,direct=off,bs=4k").unwrap(),
            BackendSpec::File {
                path: "/tmp/x.img".into(),
                options: FileOptions { read_only: true, direct: false, block_size: Some(4096) }
            }
        );
        assert_eq!(
            BackendSpec::parse("fault:corrupt=8,corrupt=16,power-loss=3,seed=9@mem:1M").unwrap(),
            BackendSpec::Fault {
                plan: FaultPlan {
                    writes: Some(WriteFault::PowerLossAtWrite { write: 3, seed: 9 }),
                    corrupt_sectors: vec![8, 16]
                },
                inner: Box::new(BackendSpec::Mem { bytes: 1 << 20, block_size: 512 })
            }
        );
        assert_eq!(
            BackendSpec::parse("fault:stall-after=5@null:1M").unwrap(),
            BackendSpec::Fault {
                plan: FaultPlan { writes: Some(WriteFault::StallAfterWrites(5)), corrupt_sectors: vec![] },
                inner: Box::new(BackendSpec::Null { bytes: 1 << 20, block_size: 512, read_zeroes: true })
            }
        );
        assert_eq!(
            BackendSpec::parse("fault:volatile-cache,power-loss=500,seed=3@mem:1M").unwrap(),
            BackendSpec::Fault {
                plan: FaultPlan {
                    writes: Some(WriteFault::VolatileCache { power_loss: Some(500), seed: 3 }),
                    corrupt_sectors: vec![]
                },
                inner: Box::new(BackendSpec::Mem { bytes: 1 << 20, block_size: 512 })
            }
        );
        assert_eq!(
            BackendSpec::parse("fault:volatile-cache@mem:1M").unwrap(),
            BackendSpec::Fault {
                plan: FaultPlan {
                    writes: Some(WriteFault::VolatileCache { power_loss: None, seed: 0 }),
                    corrupt_sectors: vec![]
                },
                inner: Box::new(BackendSpec::Mem { bytes: 1 << 20, block_size: 512 })
            }
        );
        assert_eq!(
            BackendSpec::parse("nvme:00:04.0/2,timeout-ms=500,shadow=off").unwrap(),
            BackendSpec::Nvme { bdf: "0000:00:04.0".into(), nsid: 2, timeout_ms: Some(500), shadow_doorbells: false }
        );
        assert_eq!(
            BackendSpec::parse("nvme:0000:00:04.0").unwrap(),
            BackendSpec::Nvme { bdf: "0000:00:04.0".into(), nsid: 1, timeout_ms: None, shadow_doorbells: true }
        );
        for bad in [
            "null",
            "disk:1G",
            "mem:abc",
            "mem:1G,bs",
            "mem:1G,colour=red",
            "null:1G,bs=3",
            "file:",
            "file:/tmp/x,ro=yes",
            "file:/tmp/x,direct=maybe",
            "file:/nonexistent/udm.img",
            "fault:mem:1M",
            "fault:corrupt=x@mem:1M",
            "fault:power-loss=0@mem:1M",
            "fault:fail-after=1,power-loss=2@mem:1M",
            "fault:stall-after=1,fail-after=2@mem:1M",
            "fault:stall-after=x@mem:1M",
            "fault:drop=1@mem:1M",
            "fault:volatile-cache=yes@mem:1M",
            "fault:volatile-cache,power-loss=0@mem:1M",
            "fault:volatile-cache,fail-after=3@mem:1M",
            "fault:volatile-cache,stall-after=3@mem:1M",
            "fault:volatile-cache,power-loss=x@mem:1M",
            "fault:corrupt=1@disk:1M",
            "nvme:",
            "nvme:00:04",
            "nvme:0000:00:04.0/0",
            "nvme:0000:00:04.0/x",
            "nvme:0000:00:04.0/1,timeout-ms=0",
            "nvme:0000:00:04.0/1,shadow=maybe",
            "nvme:0000:00:04.0/1,bs=4096",
            "nvme:0000:ff:1f.7/1",
        ] {
            let e = BackendSpec::parse(bad).and_then(|s| s.open().map(|_| s));
            assert!(e.is_err(), "{bad} should be refused");
            assert!(e.unwrap_err().to_string().len() > 20);
        }
    }
}
