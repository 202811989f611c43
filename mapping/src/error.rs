//! Errors of the mapping layer.
//!
//! * [`TableError`]: a table text was refused; names the line, the field and what was
//!   expected. A refused table changes nothing.
//! * [`TargetError`]: a target constructor (or a resume hook) refused; names the argument.
//! * [`MappingError`]: a registry operation failed; says what to do.

use udm_drivers::{DeviceError, IoError};

/// Why a target constructor or hook refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    /// A device area lies (partly) outside the device.
    #[error("device `{device}`: sectors {start}..{end} are outside its {size} sectors")]
    AreaOutOfRange {
        /// The device named in the table.
        device: String,
        /// First sector used.
        start: u64,
        /// One past the last sector used.
        end: u64,
        /// The device's size in sectors.
        size: u64,
    },
    /// The number of arguments is wrong.
    #[error("expected {expected}, found {found} argument(s)")]
    ArgCount {
        /// What the target takes, e.g. "exactly 2 arguments: <dev> <offset>".
        expected: String,
        /// How many were given.
        found: usize,
    },
    /// One argument is malformed or out of range.
    #[error("argument {position} ({name}) `{value}`: expected {expected}")]
    BadArg {
        /// 1-based position among the target's arguments.
        position: usize,
        /// The argument's name in the target's syntax, e.g. "offset".
        name: &'static str,
        /// The text given.
        value: String,
        /// What would have been accepted.
        expected: String,
    },
    /// The target would map a device onto itself, directly or through other devices.
    #[error("device `{device}` would depend on itself: {path}")]
    Cycle {
        /// The device named in the table.
        device: String,
        /// The chain of names that closes the loop.
        path: String,
    },
    /// Synchronous I/O done by a constructor failed.
    #[error("{what} on `{device}` failed: {error}")]
    Io {
        /// What the constructor was doing.
        what: String,
        /// The device.
        device: String,
        /// The I/O error.
        error: IoError,
    },
    /// The target's rules refuse the arguments as a whole (e.g. length not divisible).
    #[error("{0}")]
    Invalid(String),
    /// A device area is not aligned to the device's logical block size.
    #[error("device `{device}`: sectors {start}+{len} are not aligned to its {block_size}-byte logical block size")]
    Misaligned {
        /// The device named in the table.
        device: String,
        /// First sector used.
        start: u64,
        /// Sectors used.
        len: u64,
        /// The device's logical block size.
        block_size: u32,
    },
    /// The table names a device the registry does not know.
    #[error("no device named `{0}`: register a backend or create the mapped device first")]
    NoSuchDevice(String),
    /// Opening a per-thread queue on a device failed.
    #[error("cannot open a queue on `{device}`: {reason}")]
    QueueOpen {
        /// The device.
        device: String,
        /// The underlying error, as text.
        reason: String,
    },
    /// A pre-resume hook refused to let the table go live.
    #[error("resume refused: {0}")]
    Vetoed(String),
}

/// Why a table text was refused. Every variant carries the 1-based line number of the
/// text it came from (comments and blank lines count).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    /// The table has no target lines.
    #[error("the table is empty: give at least one line `<start> <length> <target> <args...>`")]
    Empty,
    /// Segments must be contiguous from sector 0.
    #[error(
        "line {line}: Gap in table: field `start` is {found}, expected {expected} (segments must be contiguous from 0)"
    )]
    Gap {
        /// Line number.
        line: usize,
        /// The start the line gave.
        found: u64,
        /// Where the previous segment ended.
        expected: u64,
    },
    /// A field is missing.
    #[error("line {line}: field `{field}` is missing: expected `<start> <length> <target> <args...>`")]
    MissingField {
        /// Line number.
        line: usize,
        /// Which field.
        field: &'static str,
    },
    /// A numeric field is not an unsigned decimal integer (or does not fit in 64 bits).
    #[error("line {line}: field `{field}` is `{value}`: expected an unsigned decimal integer below 2^64")]
    BadNumber {
        /// Line number.
        line: usize,
        /// Which field.
        field: &'static str,
        /// The text given.
        value: String,
    },
    /// A segment's start plus length passes 2^64 sectors.
    #[error("line {line}: `start` + `length` overflow 64 bits")]
    Overflow {
        /// Line number.
        line: usize,
    },
    /// A target's constructor refused its arguments.
    #[error("line {line}: target `{target}`: {error}")]
    Target {
        /// Line number.
        line: usize,
        /// The target type.
        target: String,
        /// The constructor's reason.
        error: Box<TargetError>,
    },
    /// The target type name is longer than the kernel's limit.
    #[error("line {line}: field `target` `{name}` is longer than 15 characters")]
    TypeNameTooLong {
        /// Line number.
        line: usize,
        /// The name given.
        name: String,
    },
    /// The target type is not known.
    #[error("line {line}: field `target` is `{name}`: expected one of {known}")]
    UnknownTarget {
        /// Line number.
        line: usize,
        /// The name given.
        name: String,
        /// The registered target types, comma separated.
        known: String,
    },
    /// A segment's start or length is not a multiple of the table's logical block size.
    #[error("line {line}: sectors {start}+{length} are not aligned to the {block_size}-byte logical block size of the devices below")]
    Unaligned {
        /// Line number.
        line: usize,
        /// The segment start.
        start: u64,
        /// The segment length.
        length: u64,
        /// The largest logical block size among the table's devices.
        block_size: u32,
    },
    /// A segment of length 0.
    #[error("line {line}: field `length` is 0: expected a positive number of sectors")]
    ZeroLength {
        /// Line number.
        line: usize,
    },
}

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MappingError {
    /// The name is taken.
    #[error("a device named `{0}` already exists: choose another name or remove it first")]
    AlreadyExists(String),
    /// The operation needs a mapped device but the name is a backend.
    #[error("`{0}` is a backend, not a mapped device: tables can only be loaded into mapped devices")]
    NotMapped(String),
    /// A suspend with a timeout did not drain in time; the device was left running.
    #[error(
        "suspending `{name}` timed out after {} s with {in_flight}: the device was left active, as it was; \
         find out why the devices below do not complete I/O (`udm stats`, `udm dm status`), then retry, \
         or suspend without --timeout to wait for them",
        timeout.as_secs_f64()
    )]
    SuspendTimedOut {
        /// The device.
        name: String,
        /// How long the suspend waited.
        timeout: std::time::Duration,
        /// What was still in flight.
        in_flight: crate::mapped::InFlight,
    },
    /// A suspend still draining was cancelled by a resume; the device was left running.
    #[error("suspending `{name}` was cancelled by a resume with {in_flight}: the device is active")]
    SuspendCancelled {
        /// The device.
        name: String,
        /// What was still in flight.
        in_flight: crate::mapped::InFlight,
    },
    /// Another lifecycle operation is draining the device.
    #[error("`{name}` is being {op} by another command: wait until it returns (or times out), then retry")]
    InTransition {
        /// The device.
        name: String,
        /// What is happening to it ("suspended", "removed").
        op: &'static str,
    },
    /// The device is in use.
    #[error("`{name}` is in use ({reason}): close it or remove its users first, or force the removal")]
    Busy {
        /// The device.
        name: String,
        /// Who uses it.
        reason: String,
    },
    /// A lower-layer device operation failed.
    #[error("device `{name}`: {source}")]
    Device {
        /// The device.
        name: String,
        /// What failed.
        #[source]
        source: DeviceError,
    },
    /// A name is not acceptable.
    #[error("invalid device name `{name}`: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A UUID is not acceptable or already used.
    #[error("invalid uuid `{uuid}`: {reason}")]
    InvalidUuid {
        /// The uuid given.
        uuid: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// There is no inactive table to act on.
    #[error("`{0}` has no inactive table: load one first")]
    NoInactiveTable(String),
    /// There is no live table to act on.
    #[error("`{0}` has no live table: load a table and resume the device")]
    NoLiveTable(String),
    /// No device has that name.
    #[error("no device named `{0}`: see `ls` for the devices that exist")]
    NoSuchDevice(String),
    /// A table was refused; nothing changed.
    #[error("table for `{name}` refused (nothing changed): {source}")]
    Table {
        /// The device the table was for.
        name: String,
        /// Why.
        #[source]
        source: Box<TableError>,
    },
    /// A target hook refused the operation.
    #[error("device `{name}`: {source}")]
    Target {
        /// The device.
        name: String,
        /// Why.
        #[source]
        source: Box<TargetError>,
    },
}
