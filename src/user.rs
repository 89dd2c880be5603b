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
/// [`MAX_USER_NAME`] and names with whitespace or [invisible](is_invisible) characters
/// inside: they have no place in a mail address and could forge or disguise log and
/// protocol lines (a right-to-left override makes one name read as another).
pub fn normalize(raw: &str) -> Result<String, InvalidUserName> {
    let user = raw.trim();
    let valid =
        !user.is_empty() && user.len() <= MAX_USER_NAME && !user.chars().any(|c| c.is_whitespace() || is_invisible(c));
    if valid { Ok(user.to_lowercase()) } else { Err(InvalidUserName(escape(raw).into_owned())) }
}

/// Whether `c` changes how the text around it shows instead of showing itself: a control
/// character (Unicode Cc), a format character (Cf: bidirectional overrides and isolates,
/// zero-width joiners and spaces, the byte order mark, tag characters; Unicode 15's list),
/// or a line or paragraph separator (Zl, Zp).
pub fn is_invisible(c: char) -> bool {
    c.is_control()
        || matches!(c,
            '\u{00AD}' | '\u{0600}'..='\u{0605}' | '\u{061C}' | '\u{06DD}' | '\u{070F}'
            | '\u{0890}'..='\u{0891}' | '\u{08E2}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
            | '\u{2028}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206F}' | '\u{FEFF}'
            | '\u{FFF9}'..='\u{FFFB}' | '\u{110BD}' | '\u{110CD}' | '\u{13430}'..='\u{1343F}'
            | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}' | '\u{E0001}' | '\u{E0020}'..='\u{E007F}')
}

/// `text` with every [invisible](is_invisible) character written as `\u{XXXX}`, so a log
/// line or audit field shows what was sent and cannot be forged or disguised by it.
pub fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(is_invisible) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if is_invisible(c) {
            out.push_str(&format!("\\u{{{:04X}}}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
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
        assert!(err.contains("a\\u{000A}b") && err.contains("full mail address"), "{err}");
    }

    #[test]
    fn bidi_overrides_separators_and_zero_width_characters_are_refused_and_escaped() {
        for sneaky in ["eve\u{202E}moc.elpmaxe@x", "a\u{2028}b@x", "a\u{2029}b@x", "al\u{200D}ice@x", "\u{FEFF}a@x"] {
            assert!(normalize(sneaky).is_err(), "{sneaky:?}");
            let shown = escape(sneaky);
            assert!(!shown.chars().any(is_invisible), "{shown}");
        }
        assert_eq!(escape("eve\u{202E}x"), "eve\\u{202E}x");
        assert_eq!(escape("jürgen@example.com"), "jürgen@example.com", "ordinary text is untouched");
        assert!(normalize("jürgen@example.com").is_ok());
    }
}
