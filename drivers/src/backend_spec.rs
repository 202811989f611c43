//! Backends named on a command line or in a config file:
//! `null:1G`, `mem:64M,bs=4096`, with `,ro` for a read-only device.

use std::sync::Arc;

use crate::backends::mem::MemDevice;
use crate::backends::null::NullDevice;
use crate::device::BlockDevice;
use crate::error::DeviceError;
use crate::units::parse_size;

/// A parsed backend specification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendSpec {
    /// `null:<size>[,bs=<block size>]`
    Null {
        /// Size in bytes.
        bytes: u64,
        /// Logical block size.
        block_size: u32,
    },
    /// `mem:<size>[,bs=<block size>]`
    Mem {
        /// Size in bytes.
        bytes: u64,
        /// Logical block size.
        block_size: u32,
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
        let (kind, rest) =
            spec.split_once(':').ok_or_else(|| bad(spec, "expected <kind>:<argument>, e.g. null:1G, mem:1G"))?;
        let (arg, opts) = rest.split_once(',').unwrap_or((rest, ""));
        let mut opts = Options::parse(opts);
        let block_size = match opts.take("bs") {
            None => 512,
            Some(v) => {
                let v = v.ok_or_else(|| bad(spec, "bs needs a value, e.g. bs=4096"))?;
                let n = parse_size(v).map_err(|e| bad(spec, e))?;
                u32::try_from(n).map_err(|_| bad(spec, "block size too large"))?
            }
        };
        let parsed = match kind {
            "null" | "mem" => {
                let bytes = parse_size(arg).map_err(|e| bad(spec, e))?;
                if kind == "null" {
                    BackendSpec::Null { bytes, block_size }
                } else {
                    BackendSpec::Mem { bytes, block_size }
                }
            }
            other => return Err(bad(spec, format!("unknown backend kind `{other}`: use null or mem"))),
        };
        opts.finish(spec)?;
        Ok(parsed)
    }

    /// Creates the device.
    pub fn open(&self) -> Result<Arc<dyn BlockDevice>, DeviceError> {
        Ok(match *self {
            BackendSpec::Null { bytes, block_size } => Arc::new(NullDevice::new(bytes, block_size)?),
            BackendSpec::Mem { bytes, block_size } => Arc::new(MemDevice::new(bytes, block_size)?),
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
        assert_eq!(BackendSpec::parse("null:1G").unwrap(), BackendSpec::Null { bytes: 1 << 30, block_size: 512 });
        assert_eq!(
            BackendSpec::parse("mem:64M,bs=4096").unwrap(),
            BackendSpec::Mem { bytes: 64 << 20, block_size: 4096 }
        );
        for bad in ["null", "disk:1G", "mem:abc", "mem:1G,bs", "mem:1G,colour=red", "null:1G,bs=3"] {
            let e = BackendSpec::parse(bad).and_then(|s| s.open().map(|_| s));
            assert!(e.is_err(), "{bad} should be refused");
            assert!(e.unwrap_err().to_string().len() > 20);
        }
    }
}
