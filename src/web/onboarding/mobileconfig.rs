//! Apple configuration profiles (`.mobileconfig`) for iPhone, iPad and macOS Mail: one
//! `com.apple.mail.managed` payload with the incoming (IMAP, else POP3) and outgoing (SMTP)
//! server, the address as user name and no password (Mail asks for it on first use).
//! Unsigned: the device shows the profile as "Not Verified" before installing.

use std::fmt::Write;

use super::xml::escape;
use super::{MailAddress, Site};
use crate::protocol::Protocol;

/// The profile's media type (Safari hands it to the profile installer).
pub const CONTENT_TYPE: &str = "application/x-apple-aspen-config";

/// Why no profile can be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    /// Mail profiles need an incoming (IMAP or POP3) and an outgoing (SMTP) server.
    #[error("this server has no IMAP or POP3 listener, or no SMTP listener, to put in a mail profile")]
    NoServers,
}

/// The profile for `address` (whose domain `site` serves). Payload UUIDs are derived from
/// the host and address, so downloading again gives the same profile and installing it
/// replaces the earlier one; identifiers live under the reversed host name.
pub fn profile(site: &Site, address: &MailAddress) -> Result<String, ProfileError> {
    let (incoming, account_type) = match (site.preferred(Protocol::Imap), site.preferred(Protocol::Pop3)) {
        (Some(imap), _) => (imap, "EmailTypeIMAP"),
        (None, Some(pop3)) => (pop3, "EmailTypePOP"),
        (None, None) => return Err(ProfileError::NoServers),
    };
    let outgoing = site.preferred(Protocol::Smtp).ok_or(ProfileError::NoServers)?;
    let domain = address.domain();
    let name = escape(site.display_name(domain));
    let host = escape(site.host());
    let user = escape(address.as_str());
    let tag = hex(&digest(&["tag", site.host(), address.as_str()])[..8]);
    let base = format!("{}.postern.{tag}", reversed(site.host()));
    let description = format!("{name} ({user})");
    let title = format!("{name} mail");
    let mail_description = format!("Mail settings for {user}");
    let profile_description = format!("Sets up Mail for {user} through {host}");
    let mail_id = format!("{base}.mail");
    let (mail_uuid, profile_uuid) = (uuid(site, address, "mail"), uuid(site, address, "profile"));
    let mut out = String::with_capacity(4096);
    out.push_str(concat!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n",
        "<!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n",
        "<plist version=\"1.0\">\n<dict>\n  <key>PayloadContent</key>\n  <array>\n    <dict>\n"
    ));
    let mail = [
        ("EmailAccountDescription", Value::String(&description)),
        ("EmailAccountType", Value::String(account_type)),
        ("EmailAddress", Value::String(&user)),
        ("IncomingMailServerAuthentication", Value::String("EmailAuthPassword")),
        ("IncomingMailServerHostName", Value::String(&host)),
        ("IncomingMailServerPortNumber", Value::Integer(incoming.port)),
        ("IncomingMailServerUseSSL", Value::Bool(true)),
        ("IncomingMailServerUsername", Value::String(&user)),
        ("OutgoingMailServerAuthentication", Value::String("EmailAuthPassword")),
        ("OutgoingMailServerHostName", Value::String(&host)),
        ("OutgoingMailServerPortNumber", Value::Integer(outgoing.port)),
        ("OutgoingMailServerUseSSL", Value::Bool(true)),
        ("OutgoingMailServerUsername", Value::String(&user)),
        ("OutgoingPasswordSameAsIncomingPassword", Value::Bool(true)),
        ("PayloadDescription", Value::String(&mail_description)),
        ("PayloadDisplayName", Value::String(&title)),
        ("PayloadIdentifier", Value::String(&mail_id)),
        ("PayloadType", Value::String("com.apple.mail.managed")),
        ("PayloadUUID", Value::String(&mail_uuid)),
        ("PayloadVersion", Value::Integer(1)),
    ];
    write_dict(&mut out, "      ", &mail);
    out.push_str("    </dict>\n  </array>\n");
    let profile = [
        ("PayloadDescription", Value::String(&profile_description)),
        ("PayloadDisplayName", Value::String(&title)),
        ("PayloadIdentifier", Value::String(&base)),
        ("PayloadOrganization", Value::String(&name)),
        ("PayloadRemovalDisallowed", Value::Bool(false)),
        ("PayloadType", Value::String("Configuration")),
        ("PayloadUUID", Value::String(&profile_uuid)),
        ("PayloadVersion", Value::Integer(1)),
    ];
    write_dict(&mut out, "  ", &profile);
    out.push_str("</dict>\n</plist>\n");
    Ok(out)
}

/// A plist value; strings are already escaped.
enum Value<'a> {
    String(&'a str),
    Integer(u16),
    Bool(bool),
}

fn write_dict(out: &mut String, indent: &str, entries: &[(&str, Value<'_>)]) {
    for (key, value) in entries {
        let _ = write!(out, "{indent}<key>{key}</key>");
        let _ = match value {
            Value::String(s) => writeln!(out, "<string>{s}</string>"),
            Value::Integer(n) => writeln!(out, "<integer>{n}</integer>"),
            Value::Bool(true) => writeln!(out, "<true/>"),
            Value::Bool(false) => writeln!(out, "<false/>"),
        };
    }
}

/// `mail-gw.example.com` as `com.example.mail-gw`.
fn reversed(host: &str) -> String {
    host.split('.').rev().collect::<Vec<_>>().join(".")
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in ["postern onboarding profile"].iter().chain(parts) {
        context.update(part.as_bytes());
        context.update(&[0]);
    }
    let mut out = [0; 32];
    out.copy_from_slice(context.finish().as_ref());
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name-based UUID (RFC 9562 version 8) for the payload `kind` of `address`'s profile.
fn uuid(site: &Site, address: &MailAddress, kind: &str) -> String {
    let mut b: [u8; 16] = digest(&[kind, site.host(), address.as_str()])[..16].try_into().unwrap_or([0; 16]);
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b).to_ascii_uppercase();
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ClientTls, OnboardingConfig};
    use crate::web::onboarding::tests::site;
    use crate::web::onboarding::xml::{Element, parse};

    /// The plist dict's keys and values, in order ("true"/"false" for booleans).
    fn entries(dict: &Element) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for pair in dict.children.chunks(2) {
            assert_eq!(pair[0].name, "key");
            let value = match pair[1].name.as_str() {
                "true" | "false" => pair[1].name.clone(),
                _ => pair[1].text.clone(),
            };
            out.push((pair[0].text.clone(), value));
        }
        out
    }

    fn value<'a>(entries: &'a [(String, String)], key: &str) -> &'a str {
        entries.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_else(|| panic!("no {key}"))
    }

    #[test]
    fn the_profile_has_one_mail_payload_with_imap_smtp_ssl_and_the_address_as_user() {
        let address = MailAddress::parse("alice@example.com").unwrap();
        let text = profile(&site(Some("Example <Corp>")), &address).unwrap();
        let plist = parse(&text);
        assert_eq!((plist.name.as_str(), plist.attribute("version")), ("plist", Some("1.0")));
        let top = plist.child("dict");
        let outer = entries(top);
        assert_eq!(value(&outer, "PayloadType"), "Configuration");
        assert_eq!(value(&outer, "PayloadOrganization"), "Example <Corp>");
        let payloads = top.child("array").all("dict");
        assert_eq!(payloads.len(), 1);
        let mail = entries(payloads[0]);
        for (key, expected) in [
            ("PayloadType", "com.apple.mail.managed"),
            ("EmailAccountType", "EmailTypeIMAP"),
            ("EmailAddress", "alice@example.com"),
            ("IncomingMailServerHostName", "mail-gw.example.com"),
            ("IncomingMailServerPortNumber", "10993"),
            ("IncomingMailServerUseSSL", "true"),
            ("IncomingMailServerUsername", "alice@example.com"),
            ("IncomingMailServerAuthentication", "EmailAuthPassword"),
            ("OutgoingMailServerHostName", "mail-gw.example.com"),
            ("OutgoingMailServerPortNumber", "10465"),
            ("OutgoingMailServerUseSSL", "true"),
            ("OutgoingMailServerUsername", "alice@example.com"),
            ("OutgoingPasswordSameAsIncomingPassword", "true"),
        ] {
            assert_eq!(value(&mail, key), expected, "{key}");
        }
        assert!(
            !mail.iter().chain(&outer).any(|(k, _)| k.contains("Password") && !k.contains("SameAs")),
            "no password"
        );
        let (outer_id, mail_id) = (value(&outer, "PayloadIdentifier"), value(&mail, "PayloadIdentifier"));
        assert!(outer_id.starts_with("com.example.mail-gw.postern.") && mail_id == format!("{outer_id}.mail"));
        let (a, b) = (value(&outer, "PayloadUUID"), value(&mail, "PayloadUUID"));
        assert_ne!(a, b, "payload UUIDs are unique");
        for u in [a, b] {
            assert_eq!(u.len(), 36);
            assert_eq!(u.split('-').map(str::len).collect::<Vec<_>>(), [8, 4, 4, 4, 12]);
            assert_eq!(&u[14..15], "8", "version 8: {u}");
        }
        let again = profile(&site(Some("Example <Corp>")), &address).unwrap();
        assert_eq!(again, text, "the same address gets the same profile (a reinstall replaces it)");
        let bob = profile(&site(None), &MailAddress::parse("bob@example.com").unwrap()).unwrap();
        let bob_top = entries(parse(&bob).child("dict"));
        assert_ne!(value(&bob_top, "PayloadUUID"), a);
        assert_ne!(value(&bob_top, "PayloadIdentifier"), outer_id);
    }

    #[test]
    fn pop3_is_the_incoming_server_without_imap_and_smtp_is_required() {
        let config: OnboardingConfig = toml::from_str("listen = \"0.0.0.0:443\"\ndomains = [\"example.com\"]").unwrap();
        let at = |port: u16| format!("0.0.0.0:{port}").parse().unwrap();
        let address = MailAddress::parse("a@example.com").unwrap();
        let pop_only = Site::new(&config, "mx.example.com", [(Protocol::Pop3, ClientTls::Implicit, at(10995))]);
        assert_eq!(profile(&pop_only, &address), Err(ProfileError::NoServers));
        let pop_smtp = Site::new(
            &config,
            "mx.example.com",
            [(Protocol::Pop3, ClientTls::Implicit, at(10995)), (Protocol::Smtp, ClientTls::Starttls, at(10587))],
        );
        let mail = entries(parse(&profile(&pop_smtp, &address).unwrap()).child("dict").child("array").child("dict"));
        assert_eq!(value(&mail, "EmailAccountType"), "EmailTypePOP");
        assert_eq!(value(&mail, "IncomingMailServerPortNumber"), "10995");
        assert_eq!(value(&mail, "OutgoingMailServerPortNumber"), "10587");
    }
}
