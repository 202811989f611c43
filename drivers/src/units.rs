//! Sizes as people write them: `512`, `4k`, `64KiB`, `1G`, `2TiB`, `100s` (sectors).

/// Parses a byte size with an optional binary suffix (k, m, g, t, with or without `iB`/`B`;
/// `s` for 512-byte sectors). Plain numbers are bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits_end == 0 {
        return Err(format!("`{text}` is not a size: expected a number like 4096, 64k, 1G"));
    }
    let n: u64 = t[..digits_end].parse().map_err(|_| format!("`{text}` is too large"))?;
    let mult: u64 = match t[digits_end..].to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "s" => 512,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown size suffix `{other}` in `{text}`: use k, M, G, T or s (sectors)")),
    };
    n.checked_mul(mult).ok_or_else(|| format!("`{text}` is too large"))
}

/// Formats a byte count with the largest exact binary unit (`1G`, `64K`, `4608`).
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes != 0 && bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("8s"), Ok(4096));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("12q").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("20000000T").is_err());
        assert_eq!(format_size(1 << 30), "1G");
        assert_eq!(format_size(4608), "4608");
    }
}
