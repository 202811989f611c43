//! Opening the file: `O_DIRECT` first, buffered when the file system refuses it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::FileOptions;
use crate::error::DeviceError;

/// Opens `path` as `options` ask; returns the file and whether it is in `O_DIRECT` mode.
pub(super) fn open_file(path: &Path, options: &FileOptions) -> Result<(File, bool), DeviceError> {
    open_with_fallback(path, options, |direct| {
        let mut o = OpenOptions::new();
        o.read(true).write(!options.read_only);
        o.custom_flags(libc::O_CLOEXEC | if direct { libc::O_DIRECT } else { 0 });
        o.open(path)
    })
}

/// The fallback rule, apart from the system call so that it can be tested: a file system
/// that cannot do `O_DIRECT` (tmpfs on old kernels, some FUSE and network file systems)
/// fails the open with EINVAL, and then buffered I/O is the best there is.
pub(super) fn open_with_fallback(
    path: &Path,
    options: &FileOptions,
    mut open: impl FnMut(bool) -> io::Result<File>,
) -> Result<(File, bool), DeviceError> {
    if options.direct {
        match open(true) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                tracing::info!(
                    path = %path.display(),
                    "the file system does not support O_DIRECT here: using buffered I/O through the page cache"
                );
            }
            Err(e) => return Err(open_error(path, options, e)),
        }
    }
    open(false).map(|f| (f, false)).map_err(|e| open_error(path, options, e))
}

fn open_error(path: &Path, options: &FileOptions, e: io::Error) -> DeviceError {
    let mode = if options.read_only { "reading" } else { "reading and writing" };
    let hint = match e.kind() {
        io::ErrorKind::NotFound => {
            format!(" (create it first, e.g. `truncate -s 1G {}`, or name an existing block device)", path.display())
        }
        io::ErrorKind::PermissionDenied if !options.read_only => {
            " (check its permissions, or open it read-only with `,ro`)".to_string()
        }
        _ if e.raw_os_error() == Some(libc::EROFS) => " (the file system is read-only: add `,ro`)".to_string(),
        _ => String::new(),
    };
    DeviceError::io(format!("cannot open {} for {mode}{hint}", path.display()), e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_to_buffered_when_o_direct_is_refused() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        let opts = FileOptions::default();
        let mut tried = Vec::new();
        let (_, direct) = open_with_fallback(tmp.path(), &opts, |direct| {
            tried.push(direct);
            if direct {
                Err(io::Error::from_raw_os_error(libc::EINVAL))
            } else {
                File::open(tmp.path())
            }
        })
        .unwrap();
        assert!(!direct);
        assert_eq!(tried, [true, false]);
    }

    #[test]
    fn other_open_errors_are_reported_with_a_hint() {
        let opts = FileOptions::default();
        let missing = Path::new("/nonexistent/udm-test-image");
        let e = open_file(missing, &opts).unwrap_err().to_string();
        assert!(e.contains("truncate -s"), "{e}");
        let buffered_only = FileOptions { direct: false, ..FileOptions::default() };
        let mut tried = Vec::new();
        let _ = open_with_fallback(missing, &buffered_only, |direct| {
            tried.push(direct);
            Err(io::Error::from_raw_os_error(libc::ENOENT))
        });
        assert_eq!(tried, [false], "direct=off must never try O_DIRECT");
    }
}
