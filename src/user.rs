//! The one rule for user names: every place that takes a user name from a client, an admin
//! or a file (the decision, profiles, vault, file directory, control socket, admin commands)
//! turns it into the same identity here, so no two of them can disagree on who a user is.

/// Longest user name accepted (the longest legal mail address).
pub const MAX_USER_NAME: usize = 254;

/// A user name that cannot be anyone's identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}` is not a usable user name: give the full mail address, without spaces or control characters")]
pub struct InvalidUserName(pub String);

/// The identity of `raw`: trimmed and lower-cased. Refuses empty names, names longer than
/// [`MAX_USER_NAME`] and names with whitespace or control characters inside (they have no
/// place in a mail address and could forge log or protocol lines).
pub fn normalize(raw: &str) -> Result<String, InvalidUserName> {
    let user = raw.trim();
    let valid =
        !user.is_empty() && user.len() <= MAX_USER_NAME && !user.chars().any(|c| c.is_control() || c.is_whitespace());
    if valid { Ok(user.to_lowercase()) } else { Err(InvalidUserName(raw.escape_debug().to_string())) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_names_are_trimmed_lowercased_and_checked() {
        assert_eq!(normalize(" Alice@Example.COM ").unwrap(), "alice@example.com");
        for bad in ["", "   ", "a b@example.com", "a\0b@example.com", "a\r\nb", "a\tb"] {
            assert!(normalize(bad).is_err(), "{bad:?}");
        }
        assert!(normalize(&"a".repeat(MAX_USER_NAME)).is_ok());
        assert!(normalize(&"a".repeat(MAX_USER_NAME + 1)).is_err());
    }

    #[test]
    fn the_error_names_the_input_escaped() {
        let err = normalize("a\nb").unwrap_err().to_string();
        assert!(err.contains("a\\nb") && err.contains("full mail address"), "{err}");
    }
}
