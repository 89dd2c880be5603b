//! What a refused (or restricted) user bind says about the account.
//!
//! Active Directory answers every refused bind with result code 49 and tells why in the
//! diagnostic text: `80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext
//! error, data 533, v4563` (the `data` value is a hexadecimal Windows error code).
//! OpenLDAP's password policy overlay (ppolicy) answers a bind that asked for it with the
//! password policy response control (draft-behera-ldap-password-policy), whose `error`
//! field names the state; a bind that must change its password even *succeeds*, restricted
//! to changing the password, so the control is read on success too.

use super::super::{AccountState, DirectoryError};

/// OID of the password policy request and response controls.
pub const PPOLICY_OID: &str = "1.3.6.1.4.1.42.2.27.8.5.1";

/// An Active Directory bind diagnostic (`data` code of an `AcceptSecurityContext error`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdState {
    /// `52e`: wrong password (for an existing user).
    WrongPassword,
    /// `525`: no such user.
    NoSuchUser,
    /// `530`: logons not permitted at this time.
    LogonHours,
    /// `531`: logons not permitted from this workstation.
    Workstation,
    /// `532`: the password has expired.
    PasswordExpired,
    /// `533`: the account is disabled.
    Disabled,
    /// `701`: the account has expired.
    AccountExpired,
    /// `773`: the user must change the password before logging on.
    MustChangePassword,
    /// `775`: the account is locked in the directory.
    Locked,
}

impl AdState {
    /// The state for a Windows error code, if it is one of the known bind diagnostics.
    pub fn from_code(code: u32) -> Option<Self> {
        Some(match code {
            0x52e => AdState::WrongPassword,
            0x525 => AdState::NoSuchUser,
            0x530 => AdState::LogonHours,
            0x531 => AdState::Workstation,
            0x532 => AdState::PasswordExpired,
            0x533 => AdState::Disabled,
            0x701 => AdState::AccountExpired,
            0x773 => AdState::MustChangePassword,
            0x775 => AdState::Locked,
            _ => return None,
        })
    }

    /// What the diagnostic means for the login.
    pub fn into_error(self) -> DirectoryError {
        match self {
            AdState::WrongPassword => DirectoryError::WrongPassword,
            AdState::NoSuchUser => DirectoryError::UnknownUser,
            AdState::LogonHours => DirectoryError::Account(AccountState::LogonHours),
            AdState::Workstation => DirectoryError::Account(AccountState::Workstation),
            AdState::PasswordExpired => DirectoryError::Account(AccountState::PasswordExpired),
            AdState::Disabled => DirectoryError::Account(AccountState::Disabled),
            AdState::AccountExpired => DirectoryError::Account(AccountState::Expired),
            AdState::MustChangePassword => DirectoryError::Account(AccountState::PasswordMustChange),
            AdState::Locked => DirectoryError::Account(AccountState::Locked),
        }
    }
}

/// The Active Directory state in a bind's diagnostic `message`, if it carries a known one:
/// the hexadecimal `data` code after `AcceptSecurityContext error`. Other texts (OpenLDAP's,
/// AD's for other errors, unknown codes) give `None`.
pub fn ad_diagnostic(message: &str) -> Option<AdState> {
    const MARKER: &str = "acceptsecuritycontext error";
    let lower = message.to_ascii_lowercase();
    let after = &lower[lower.find(MARKER)? + MARKER.len()..];
    let data = after.split(',').map(str::trim).find_map(|part| part.strip_prefix("data "))?;
    let digits: &str = data.trim_start();
    let end = digits.find(|c: char| !c.is_ascii_hexdigit()).unwrap_or(digits.len());
    let code = u32::from_str_radix(&digits[..end], 16).ok()?;
    AdState::from_code(code)
}

/// The `error` of a password policy response control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyError {
    /// `passwordExpired (0)`.
    PasswordExpired,
    /// `accountLocked (1)`.
    AccountLocked,
    /// `changeAfterReset (2)`: the password was reset by an administrator.
    ChangeAfterReset,
    /// Any other value: errors of password changes (`passwordModNotAllowed (3)` to
    /// `passwordTooLong (9)`) or unknown ones; none refuses a bind by itself.
    Other(u32),
}

impl PolicyError {
    /// The account state this error reports for a bind, if any.
    pub fn account_state(self) -> Option<AccountState> {
        match self {
            PolicyError::PasswordExpired => Some(AccountState::PasswordExpired),
            PolicyError::AccountLocked => Some(AccountState::Locked),
            PolicyError::ChangeAfterReset => Some(AccountState::PasswordMustChange),
            PolicyError::Other(_) => None,
        }
    }
}

/// The `warning` of a password policy response control.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyWarning {
    /// Seconds until the password expires.
    TimeBeforeExpiration(u32),
    /// Logins left with the expired password.
    GraceAuthNsRemaining(u32),
}

/// A decoded password policy response control.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PolicyResponse {
    /// The warning, if any.
    pub warning: Option<PolicyWarning>,
    /// The error, if any.
    pub error: Option<PolicyError>,
}

/// A password policy response control value that is not valid BER for its ASN.1 type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed password policy response control: {0}")]
pub struct MalformedControl(&'static str);

/// Decodes the value of a password policy response control:
///
/// ```text
/// PasswordPolicyResponseValue ::= SEQUENCE {
///     warning [0] CHOICE {
///         timeBeforeExpiration [0] INTEGER (0 .. maxInt),
///         graceAuthNsRemaining [1] INTEGER (0 .. maxInt) } OPTIONAL,
///     error   [1] ENUMERATED { passwordExpired (0), accountLocked (1),
///                              changeAfterReset (2), ... } OPTIONAL }
/// ```
pub fn parse_ppolicy(value: &[u8]) -> Result<PolicyResponse, MalformedControl> {
    let (tag, body, rest) = tlv(value)?;
    if tag != 0x30 || !rest.is_empty() {
        return Err(MalformedControl("not a single SEQUENCE"));
    }
    let mut response = PolicyResponse::default();
    let mut fields = body;
    while !fields.is_empty() {
        let (tag, content, rest) = tlv(fields)?;
        fields = rest;
        match tag {
            0xa0 if response.warning.is_none() && response.error.is_none() => {
                let (choice, number, rest) = tlv(content)?;
                if !rest.is_empty() {
                    return Err(MalformedControl("trailing bytes in the warning"));
                }
                let number = non_negative(number)?;
                response.warning = Some(match choice {
                    0x80 => PolicyWarning::TimeBeforeExpiration(number),
                    0x81 => PolicyWarning::GraceAuthNsRemaining(number),
                    _ => return Err(MalformedControl("unknown warning")),
                });
            }
            0x81 if response.error.is_none() => {
                response.error = Some(match non_negative(content)? {
                    0 => PolicyError::PasswordExpired,
                    1 => PolicyError::AccountLocked,
                    2 => PolicyError::ChangeAfterReset,
                    other => PolicyError::Other(other),
                });
            }
            _ => return Err(MalformedControl("unexpected or repeated field")),
        }
    }
    Ok(response)
}

/// Splits one BER element (single-byte tag, definite length) off `input`: its tag, its
/// content and what follows it.
fn tlv(input: &[u8]) -> Result<(u8, &[u8], &[u8]), MalformedControl> {
    let truncated = MalformedControl("truncated");
    let (&tag, rest) = input.split_first().ok_or(truncated.clone())?;
    if tag & 0x1f == 0x1f {
        return Err(MalformedControl("multi-byte tag"));
    }
    let (&first, mut rest) = rest.split_first().ok_or(truncated.clone())?;
    let length = if first < 0x80 {
        usize::from(first)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 {
            return Err(MalformedControl("unsupported length"));
        }
        if rest.len() < count {
            return Err(truncated);
        }
        let (bytes, after) = rest.split_at(count);
        rest = after;
        bytes.iter().fold(0usize, |n, &b| (n << 8) | usize::from(b))
    };
    if rest.len() < length {
        return Err(truncated);
    }
    let (content, after) = rest.split_at(length);
    Ok((tag, content, after))
}

/// A BER INTEGER / ENUMERATED content in `0 ..= maxInt` (2^31 - 1).
fn non_negative(content: &[u8]) -> Result<u32, MalformedControl> {
    match content {
        [] => Err(MalformedControl("empty integer")),
        [first, ..] if first & 0x80 != 0 => Err(MalformedControl("negative integer")),
        _ if content.len() > 5 || (content.len() == 5 && content[0] != 0) => {
            Err(MalformedControl("integer out of range"))
        }
        _ => {
            let n = content.iter().fold(0u64, |n, &b| (n << 8) | u64::from(b));
            u32::try_from(n).ok().filter(|&n| n <= i32::MAX as u32).ok_or(MalformedControl("integer out of range"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Diagnostics as Active Directory (2012 R2 to 2022) and Samba AD send them; AD ends
    /// the text with a NUL.
    const RECORDED: [(&str, AdState); 9] = [
        (
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 52e, v4563\0",
            AdState::WrongPassword,
        ),
        (
            "80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext error, data 525, v1db1",
            AdState::NoSuchUser,
        ),
        (
            "80090308: LdapErr: DSID-0C090447, comment: AcceptSecurityContext error, data 530, v3839\0",
            AdState::LogonHours,
        ),
        (
            "80090308: LdapErr: DSID-0C09042F, comment: AcceptSecurityContext error, data 531, v2580\0",
            AdState::Workstation,
        ),
        (
            "80090308: LdapErr: DSID-0C090569, comment: AcceptSecurityContext error, data 532, v4f7c\0",
            AdState::PasswordExpired,
        ),
        (
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 533, v4563\0",
            AdState::Disabled,
        ),
        (
            "80090308: LdapErr: DSID-0C0903A9, comment: AcceptSecurityContext error, data 701, v1db1",
            AdState::AccountExpired,
        ),
        (
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 773, v4563\0",
            AdState::MustChangePassword,
        ),
        ("8009030C: LdapErr: DSID-0C0904DC, comment: AcceptSecurityContext error, data 775, v2580\0", AdState::Locked),
    ];

    #[test]
    fn each_recorded_ad_diagnostic_is_recognized() {
        for (message, state) in RECORDED {
            assert_eq!(ad_diagnostic(message), Some(state), "{message:?}");
        }
    }

    #[test]
    fn ad_diagnostics_map_to_directory_errors() {
        assert!(matches!(AdState::WrongPassword.into_error(), DirectoryError::WrongPassword));
        assert!(matches!(AdState::NoSuchUser.into_error(), DirectoryError::UnknownUser));
        assert!(matches!(AdState::Disabled.into_error(), DirectoryError::Account(AccountState::Disabled)));
        assert!(matches!(AdState::AccountExpired.into_error(), DirectoryError::Account(AccountState::Expired)));
        assert!(matches!(AdState::Locked.into_error(), DirectoryError::Account(AccountState::Locked)));
        assert!(matches!(
            AdState::MustChangePassword.into_error(),
            DirectoryError::Account(AccountState::PasswordMustChange)
        ));
    }

    #[test]
    fn other_texts_carry_no_ad_state() {
        for message in [
            "",
            "Invalid credentials",
            // OpenLDAP's texts and AD's for other failures.
            "unable to bind as the user",
            "00002028: LdapErr: DSID-0C090259, comment: The server requires binds to turn on integrity checking if SSL\\TLS are not already active on the connection, data 0, v4563\0",
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data 534, v4563\0",
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data , v4563",
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data zz, v4563",
            "80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, v4563",
            "data 533",
        ] {
            assert_eq!(ad_diagnostic(message), None, "{message:?}");
        }
        // Case and a missing version do not matter.
        assert_eq!(
            ad_diagnostic("80090308: LdapErr: comment: ACCEPTSECURITYCONTEXT ERROR, DATA 533"),
            Some(AdState::Disabled)
        );
    }

    #[test]
    fn ppolicy_errors_are_decoded() {
        // What slapd sends: SEQUENCE { error [1] ENUMERATED }.
        let locked = parse_ppolicy(&[0x30, 0x03, 0x81, 0x01, 0x01]).unwrap();
        assert_eq!(locked, PolicyResponse { warning: None, error: Some(PolicyError::AccountLocked) });
        let expired = parse_ppolicy(&[0x30, 0x03, 0x81, 0x01, 0x00]).unwrap();
        assert_eq!(expired.error, Some(PolicyError::PasswordExpired));
        let reset = parse_ppolicy(&[0x30, 0x03, 0x81, 0x01, 0x02]).unwrap();
        assert_eq!(reset.error, Some(PolicyError::ChangeAfterReset));
        let too_short = parse_ppolicy(&[0x30, 0x03, 0x81, 0x01, 0x06]).unwrap();
        assert_eq!(too_short.error, Some(PolicyError::Other(6)));

        assert_eq!(PolicyError::AccountLocked.account_state(), Some(AccountState::Locked));
        assert_eq!(PolicyError::PasswordExpired.account_state(), Some(AccountState::PasswordExpired));
        assert_eq!(PolicyError::ChangeAfterReset.account_state(), Some(AccountState::PasswordMustChange));
        assert_eq!(PolicyError::Other(6).account_state(), None);
    }

    #[test]
    fn ppolicy_warnings_are_decoded() {
        // timeBeforeExpiration 86400 (0x015180).
        let soon = parse_ppolicy(&[0x30, 0x07, 0xa0, 0x05, 0x80, 0x03, 0x01, 0x51, 0x80]).unwrap();
        assert_eq!(soon, PolicyResponse { warning: Some(PolicyWarning::TimeBeforeExpiration(86_400)), error: None });
        // graceAuthNsRemaining 2, then an error.
        let grace = parse_ppolicy(&[0x30, 0x08, 0xa0, 0x03, 0x81, 0x01, 0x02, 0x81, 0x01, 0x00]).unwrap();
        assert_eq!(grace.warning, Some(PolicyWarning::GraceAuthNsRemaining(2)));
        assert_eq!(grace.error, Some(PolicyError::PasswordExpired));
        // A value needing a leading zero: 128 seconds.
        let leading = parse_ppolicy(&[0x30, 0x06, 0xa0, 0x04, 0x80, 0x02, 0x00, 0x80]).unwrap();
        assert_eq!(leading.warning, Some(PolicyWarning::TimeBeforeExpiration(128)));
        // The empty response (nothing to report) and a long-form length.
        assert_eq!(parse_ppolicy(&[0x30, 0x00]).unwrap(), PolicyResponse::default());
        assert_eq!(
            parse_ppolicy(&[0x30, 0x81, 0x03, 0x81, 0x01, 0x01]).unwrap().error,
            Some(PolicyError::AccountLocked)
        );
    }

    #[test]
    fn malformed_ppolicy_values_are_errors_not_panics() {
        for bytes in [
            &[][..],
            &[0x30],
            &[0x30, 0x05, 0x81, 0x01, 0x01],
            &[0x31, 0x03, 0x81, 0x01, 0x01],
            &[0x30, 0x03, 0x81, 0x01, 0x01, 0x00],
            &[0x30, 0x02, 0x81, 0x00],
            &[0x30, 0x03, 0x81, 0x01, 0xff],
            &[0x30, 0x06, 0x81, 0x01, 0x01, 0x81, 0x01, 0x01],
            &[0x30, 0x03, 0x82, 0x01, 0x01],
            &[0x30, 0x05, 0xa0, 0x03, 0x82, 0x01, 0x01],
            &[0x30, 0x08, 0x81, 0x06, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00],
            &[0x30, 0x84, 0xff, 0xff, 0xff, 0xff],
            &[0x30, 0x85, 0x01, 0x01, 0x01, 0x01, 0x01],
            &[0x3f, 0x01, 0x00],
        ] {
            assert!(parse_ppolicy(bytes).is_err(), "{bytes:02x?} was accepted");
        }
    }
}
