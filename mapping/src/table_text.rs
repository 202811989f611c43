//! The table text dmsetup reads (spec §1.1), and its printing.
//!
//! ```text
//! # comment line
//! 0      2048 linear  disk0 0      # inline comment
//! 2048   4096 striped 2 8 disk1 0 disk2 0
//! ```
//!
//! Per line: trim; skip blank lines and lines starting with `#`; read `start`, `length`
//! and `target` as whitespace-separated fields; the rest is the argument string, cut at
//! the first `#` anywhere in it. The arguments split on whitespace, a backslash making the
//! next character literal (the kernel's `dm_split_args`). Numbers are strict: unsigned
//! decimal digits only, no sign, no suffix, no overflow.

use crate::error::TableError;

/// Longest target type name the kernel accepts.
pub const MAX_TARGET_NAME: usize = 15;

/// One target line of a table, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableLine {
    /// 1-based line number in the text (comments and blank lines count).
    pub line: usize,
    /// First sector of the segment.
    pub start: u64,
    /// Sectors in the segment.
    pub length: u64,
    /// Target type name.
    pub target: String,
    /// Arguments, unescaped.
    pub args: Vec<String>,
}

/// Parses a table text into its lines and checks their layout: at least one line,
/// lengths above zero, contiguous from sector 0. Targets are not constructed here.
pub fn parse_table_text(text: &str) -> Result<Vec<TableLine>, TableError> {
    let mut lines = Vec::new();
    let mut next_start = 0u64;
    for (idx, raw) in text.split('\n').enumerate() {
        let line = idx + 1;
        let Some(parsed) = parse_line(line, raw)? else { continue };
        if parsed.start != next_start {
            return Err(TableError::Gap { line, found: parsed.start, expected: next_start });
        }
        next_start = parsed.start.checked_add(parsed.length).ok_or(TableError::Overflow { line })?;
        lines.push(parsed);
    }
    if lines.is_empty() {
        return Err(TableError::Empty);
    }
    Ok(lines)
}

/// Parses one physical line; `None` for blank and comment lines.
fn parse_line(line: usize, raw: &str) -> Result<Option<TableLine>, TableError> {
    let text = raw.trim_matches(|c: char| c.is_ascii_whitespace());
    if text.is_empty() || text.starts_with('#') {
        return Ok(None);
    }
    let (start_text, rest) = next_field(text);
    let (length_text, rest) = next_field(rest);
    let (target, rest) = next_field(rest);
    let start = field_number(line, "start", start_text)?;
    if length_text.is_empty() {
        return Err(TableError::MissingField { line, field: "length" });
    }
    let length = field_number(line, "length", length_text)?;
    if target.is_empty() {
        return Err(TableError::MissingField { line, field: "target" });
    }
    if length == 0 {
        return Err(TableError::ZeroLength { line });
    }
    if target.len() > MAX_TARGET_NAME {
        return Err(TableError::TypeNameTooLong { line, name: target.to_string() });
    }
    let arg_text = match rest.find('#') {
        Some(cut) => &rest[..cut],
        None => rest,
    };
    Ok(Some(TableLine { line, start, length, target: target.to_string(), args: split_args(arg_text) }))
}

/// The next whitespace-delimited field and the text after it.
fn next_field(text: &str) -> (&str, &str) {
    let text = text.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let end = text.find(|c: char| c.is_ascii_whitespace()).unwrap_or(text.len());
    (&text[..end], &text[end..])
}

fn field_number(line: usize, field: &'static str, value: &str) -> Result<u64, TableError> {
    parse_strict_u64(value).ok_or_else(|| TableError::BadNumber { line, field, value: value.to_string() })
}

/// An unsigned decimal integer made only of ASCII digits that fits in 64 bits.
pub fn parse_strict_u64(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// Splits an argument string like the kernel's `dm_split_args`: whitespace separates,
/// a backslash makes the next character literal (a trailing lone backslash stays).
pub fn split_args(text: &str) -> Vec<String> {
    let mut args = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_ascii_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return args;
        }
        let mut arg = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_whitespace() {
                break;
            }
            chars.next();
            if c == '\\' {
                if let Some(escaped) = chars.next() {
                    arg.push(escaped);
                    continue;
                }
            }
            arg.push(c);
        }
        args.push(arg);
    }
}

/// Escapes one argument so that [`split_args`] gives it back: whitespace and backslashes
/// get a backslash. (`#` cannot be escaped in dmsetup's format; device names and target
/// arguments that udm prints never contain it.)
pub fn escape_arg(arg: &str) -> String {
    let mut out = String::with_capacity(arg.len());
    for c in arg.chars() {
        if c == '\\' || c.is_ascii_whitespace() {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// Formats one table or status line as dmsetup prints it: `<start> <length> <type> <args>`,
/// always with a space after the type (so empty args leave a trailing space).
pub fn format_line(start: u64, length: u64, target: &str, args: &str) -> String {
    format!("{start} {length} {target} {args}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_blank_lines_and_inline_comments() {
        let text = "\n  # a comment\n0 8 linear  d0 0 # the first\r\n\t8 8 zero   \n#x\n16 8 error a b#c\n";
        let lines = parse_table_text(text).unwrap();
        assert_eq!(lines.len(), 3);
        assert_eq!(
            lines[0],
            TableLine { line: 3, start: 0, length: 8, target: "linear".into(), args: vec!["d0".into(), "0".into()] }
        );
        assert_eq!(lines[1].line, 4);
        assert!(lines[1].args.is_empty());
        assert_eq!(lines[2].args, vec!["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn backslash_escapes() {
        assert_eq!(split_args(r"a\ b c\\d e\"), vec!["a b".to_string(), r"c\d".into(), r"e\".into()]);
        assert_eq!(split_args(&escape_arg("my dev\\x")), vec!["my dev\\x".to_string()]);
    }

    #[test]
    fn strict_numbers() {
        for bad in ["+1", "-1", "1k", "0x10", " 1", "", "18446744073709551616", "1.0"] {
            assert_eq!(parse_strict_u64(bad), None, "{bad}");
        }
        assert_eq!(parse_strict_u64("007"), Some(7));
        assert_eq!(parse_strict_u64("18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn errors_name_line_field_and_expectation() {
        let e = parse_table_text("0 8 zero\n9 8 zero").unwrap_err();
        assert_eq!(e, TableError::Gap { line: 2, found: 9, expected: 8 });
        assert!(e.to_string().contains("Gap in table"));
        let e = parse_table_text("# c\n0 8x zero").unwrap_err();
        assert_eq!(e, TableError::BadNumber { line: 2, field: "length", value: "8x".into() });
        assert!(e.to_string().contains("line 2") && e.to_string().contains("unsigned decimal"));
        assert_eq!(parse_table_text("0").unwrap_err(), TableError::MissingField { line: 1, field: "length" });
        assert_eq!(parse_table_text("0 8").unwrap_err(), TableError::MissingField { line: 1, field: "target" });
        assert_eq!(parse_table_text("0 0 zero").unwrap_err(), TableError::ZeroLength { line: 1 });
        assert_eq!(parse_table_text("# only\n\n").unwrap_err(), TableError::Empty);
        assert_eq!(parse_table_text("1 8 zero").unwrap_err(), TableError::Gap { line: 1, found: 1, expected: 0 });
        assert!(matches!(parse_table_text("0 8 abcdefghijklmnop").unwrap_err(), TableError::TypeNameTooLong { .. }));
        assert_eq!(
            parse_table_text("0 18446744073709551615 zero\n18446744073709551615 1 zero").unwrap_err(),
            TableError::Overflow { line: 2 }
        );
    }

    #[test]
    fn printing_keeps_the_trailing_space() {
        assert_eq!(format_line(0, 32768, "linear", ""), "0 32768 linear ");
    }
}
