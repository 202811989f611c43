//! What a device name and a UUID may be. Names appear in table text, so they must
//! survive printing and re-parsing: `#` (which starts a comment wherever it is) and
//! control characters are refused; whitespace and backslashes are escaped on output.

use crate::error::MappingError;

/// Longest device name (the kernel's DM_NAME_LEN - 1).
pub const MAX_NAME_LEN: usize = 127;
/// Longest UUID (the kernel's DM_UUID_LEN - 1).
pub const MAX_UUID_LEN: usize = 128;

/// Checks a device name.
pub fn validate_name(name: &str) -> Result<(), MappingError> {
    let bad = |reason| Err(MappingError::InvalidName { name: name.to_string(), reason });
    if name.is_empty() {
        return bad("a name cannot be empty");
    }
    if name.len() > MAX_NAME_LEN {
        return bad("a name is at most 127 bytes");
    }
    if name == "." || name == ".." {
        return bad("`.` and `..` are not names");
    }
    if name.contains('/') {
        return bad("a name cannot contain `/`");
    }
    if name.contains('#') {
        return bad("a name cannot contain `#` (it starts a comment in table text)");
    }
    if name.starts_with(|c: char| c.is_whitespace()) || name.ends_with(|c: char| c.is_whitespace()) {
        return bad("a name cannot start or end with whitespace (table lines are trimmed)");
    }
    if name.chars().any(char::is_control) {
        return bad("a name cannot contain control characters");
    }
    Ok(())
}

/// Checks a UUID.
pub(crate) fn validate_uuid(uuid: &str) -> Result<(), MappingError> {
    let bad = |reason| Err(MappingError::InvalidUuid { uuid: uuid.to_string(), reason });
    if uuid.is_empty() {
        return bad("a uuid cannot be empty (leave it out instead)");
    }
    if uuid.len() > MAX_UUID_LEN {
        return bad("a uuid is at most 128 bytes");
    }
    if uuid.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return bad("a uuid cannot contain whitespace or control characters");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["vg-base", "a b", "x\\y", &"n".repeat(127)] {
            assert!(validate_name(ok).is_ok(), "{ok}");
        }
        for bad in ["", ".", "..", "a/b", "a#b", "a\nb", " a", "a ", &"n".repeat(128)] {
            let e = validate_name(bad).unwrap_err();
            assert!(matches!(e, MappingError::InvalidName { .. }), "{bad}");
        }
        assert!(validate_uuid("LVM-abc").is_ok());
        assert!(validate_uuid("a b").is_err());
        assert!(validate_uuid("").is_err());
    }
}
