//! What the table fuzz target checks, shared with the bounded proptest run in
//! `mapping/tests/table_fuzz.rs` (included there by path).
//!
//! 1. Parsing any text never panics; an error names a line inside the text.
//! 2. Parsed lines print and re-parse to the same lines.
//! 3. Loading the text into a registry with backends (running the constructors)
//!    never panics; a refused table changes nothing; a loaded table prints text that
//!    loads to the same table; a little I/O through it completes without panicking.

use std::sync::Arc;

use udm_drivers::backends::null::NullDevice;
use udm_drivers::{Completion, IoRequest, IoSegment, SgList};
use udm_mapping::table_text::{escape_arg, format_line, parse_table_text};
use udm_mapping::{Registry, TableError, TableSlot};

/// Runs every check on `text`.
pub fn check_table_text(text: &str) {
    let lines = match parse_table_text(text) {
        Ok(lines) => lines,
        Err(e) => {
            let line_count = text.split('\n').count();
            let line = match &e {
                TableError::Empty => 0,
                TableError::Gap { line, .. }
                | TableError::MissingField { line, .. }
                | TableError::BadNumber { line, .. }
                | TableError::Overflow { line }
                | TableError::Target { line, .. }
                | TableError::TypeNameTooLong { line, .. }
                | TableError::UnknownTarget { line, .. }
                | TableError::Unaligned { line, .. }
                | TableError::ZeroLength { line } => *line,
            };
            assert!(line <= line_count, "error names line {line} of {line_count}: {e}");
            assert!(!e.to_string().is_empty());
            return;
        }
    };
    // dmsetup trims a line before unescaping, so a line's last argument cannot end in
    // whitespace (`a\ ` at the end of a line reads back as `a\`). udm's device names
    // never end in whitespace, so printed tables are not affected.
    if lines.iter().any(|l| l.args.last().is_some_and(|a| a.ends_with(|c: char| c.is_ascii_whitespace()))) {
        check_load(text);
        return;
    }
    let printed: String = lines
        .iter()
        .map(|l| {
            let args: Vec<String> = l.args.iter().map(|a| escape_arg(a)).collect();
            format_line(l.start, l.length, &l.target, &args.join(" ")) + "\n"
        })
        .collect();
    let again = parse_table_text(&printed).expect("printed lines re-parse");
    assert_eq!(again.len(), lines.len());
    for (a, b) in lines.iter().zip(&again) {
        assert_eq!((a.start, a.length, &a.target, &a.args), (b.start, b.length, &b.target, &b.args));
    }
    check_load(text);
}

fn check_load(text: &str) {
    let reg = Registry::new();
    for (name, sectors) in [("d0", 1u64 << 20), ("d1", 1 << 12), ("d2", 1 << 40)] {
        reg.register_backend(name, Arc::new(NullDevice::new(sectors * 512, 512).unwrap())).unwrap();
    }
    reg.create("m0", None, Some("0 4096 linear d1 0")).unwrap();
    reg.create("vol", None, None).unwrap();
    let before = reg.table("vol", TableSlot::Inactive).unwrap();
    if reg.load("vol", text).is_err() {
        assert_eq!(reg.table("vol", TableSlot::Inactive).unwrap(), before, "a refused table changed state");
        return;
    }
    let printed = reg.table("vol", TableSlot::Inactive).unwrap();
    reg.load("vol", &printed).expect("a printed table loads again");
    assert_eq!(reg.table("vol", TableSlot::Inactive).unwrap(), printed);
    reg.resume("vol").expect("resume");
    let _ = reg.status("vol", TableSlot::Live).unwrap();
    let dev = reg.device("vol").unwrap();
    let size = dev.info().sectors;
    let mut q = dev.open_queue(4).unwrap();
    let mut buf = vec![0u8; 8 * 512];
    // SAFETY: `buf` outlives the requests: every one is reaped before returning.
    let seg = unsafe { IoSegment::new(buf.as_mut_ptr(), buf.len()) };
    // SAFETY: as above; `seg` lives on this frame.
    let sg = unsafe { SgList::from_segment(&seg) };
    let hash = text.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let reqs = [
        IoRequest::read(hash % size, sg, 1),
        IoRequest::write(size.saturating_sub(8), sg, 2),
        IoRequest::flush(3),
        IoRequest::discard(0, size.min(1 << 16), 4),
    ];
    for r in reqs {
        q.submit(r).unwrap();
    }
    q.kick();
    let mut out = [Completion::EMPTY; 4];
    let mut done = 0;
    while done < reqs.len() {
        done += q.poll(&mut out[..]);
    }
    assert_eq!(q.in_flight(), 0);
}
