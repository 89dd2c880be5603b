//! The two fields every login carries, checked the same way whichever command or SASL
//! mechanism brought them.

use crate::secret::Secret;

/// Checks a user name as sent by the client and returns it trimmed.
///
/// It must be UTF-8 and non-empty, with no control characters: they have no place in a
/// mail address and could forge log lines or protocol lines upstream.
pub fn user_name(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?.trim();
    if text.is_empty() || text.chars().any(char::is_control) {
        return None;
    }
    Some(text.to_owned())
}

/// Checks a password as sent by the client.
///
/// Any UTF-8 is allowed except NUL, CR and LF, which no upstream syntax can carry.
/// Empty passwords are refused outright: a directory may treat an empty simple bind
/// as an anonymous bind that "succeeds".
pub fn password(raw: &[u8]) -> Option<Secret> {
    if raw.is_empty() || raw.iter().any(|b| matches!(b, b'\0' | b'\r' | b'\n')) {
        return None;
    }
    std::str::from_utf8(raw).ok().map(Secret::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_checks() {
        assert_eq!(user_name(b"  Alice@Example.com ").as_deref(), Some("Alice@Example.com"));
        assert_eq!(user_name(b"j\xc3\xbcrgen").as_deref(), Some("jürgen"));
        for bad in [&b""[..], b"   ", b"a\0b", b"a\rb", b"a\nb", b"a\x1bb", b"\xff"] {
            assert_eq!(user_name(bad), None);
        }
        assert_eq!(password("pä ss\"w\\rd ".as_bytes()).unwrap().expose(), "pä ss\"w\\rd ");
        for bad in [&b""[..], b"a\0", b"a\r", b"\nb", b"\xc3"] {
            assert!(password(bad).is_none());
        }
    }
}
