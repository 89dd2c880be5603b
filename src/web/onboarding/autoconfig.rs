//! Mozilla autoconfig: the ISPDB `clientConfig` version 1.1 document Thunderbird (and
//! other clients: K-9/Thunderbird for Android, Evolution, KMail) fetch from
//! `autoconfig.<domain>/mail/config-v1.1.xml` or
//! `<domain>/.well-known/autoconfig/mail/config-v1.1.xml`.

use std::fmt::Write;

use super::Site;
use super::xml::escape;
use crate::config::ClientTls;
use crate::protocol::Protocol;

/// The document's media type.
pub const CONTENT_TYPE: &str = "application/xml; charset=utf-8";

/// The `clientConfig` for `domain` (served by `site`): an `incomingServer` per IMAP and
/// POP3 listener kind, an `outgoingServer` per SMTP listener kind, implicit TLS (`SSL`)
/// before `STARTTLS`, IMAP before POP3. The user name is the whole address
/// (`%EMAILADDRESS%`), the password the directory one, sent inside TLS
/// (`password-cleartext`).
pub fn client_config(site: &Site, domain: &str) -> String {
    let mut out = String::with_capacity(2048);
    out.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<clientConfig version=\"1.1\">\n");
    let _ = writeln!(out, "  <emailProvider id=\"{}\">", escape(domain));
    let _ = writeln!(out, "    <domain>{}</domain>", escape(domain));
    let _ = writeln!(out, "    <displayName>{}</displayName>", escape(site.display_name(domain)));
    let _ = writeln!(out, "    <displayShortName>{}</displayShortName>", escape(site.display_name(domain)));
    for (protocol, element, kind) in [
        (Protocol::Imap, "incomingServer", "imap"),
        (Protocol::Pop3, "incomingServer", "pop3"),
        (Protocol::Smtp, "outgoingServer", "smtp"),
    ] {
        for server in site.servers(protocol) {
            let socket = match server.tls {
                ClientTls::Implicit => "SSL",
                ClientTls::Starttls => "STARTTLS",
            };
            let _ = write!(
                out,
                "    <{element} type=\"{kind}\">\n      <hostname>{host}</hostname>\n      <port>{port}</port>\n      \
                 <socketType>{socket}</socketType>\n      <username>%EMAILADDRESS%</username>\n      \
                 <authentication>password-cleartext</authentication>\n    </{element}>\n",
                host = escape(site.host()),
                port = server.port,
            );
        }
    }
    out.push_str("  </emailProvider>\n</clientConfig>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::onboarding::tests::site;
    use crate::web::onboarding::xml::parse;

    #[test]
    fn the_client_config_lists_every_listener_with_host_port_and_socket_type() {
        let doc = parse(&client_config(&site(None), "example.com"));
        assert_eq!(doc.name, "clientConfig");
        assert_eq!(doc.attribute("version"), Some("1.1"));
        let provider = doc.child("emailProvider");
        assert_eq!(provider.attribute("id"), Some("example.com"));
        assert_eq!(provider.text_at("domain"), "example.com");
        assert_eq!(provider.text_at("displayName"), "example.com");
        let servers = |element: &str| {
            provider
                .all(element)
                .into_iter()
                .map(|s| {
                    assert_eq!(s.text_at("hostname"), "mail-gw.example.com");
                    assert_eq!(s.text_at("username"), "%EMAILADDRESS%");
                    assert_eq!(s.text_at("authentication"), "password-cleartext");
                    let kind = s.attribute("type").unwrap().to_owned();
                    (kind, s.text_at("port").to_owned(), s.text_at("socketType").to_owned())
                })
                .collect::<Vec<_>>()
        };
        let entry = |k: &str, p: &str, s: &str| (k.to_owned(), p.to_owned(), s.to_owned());
        assert_eq!(
            servers("incomingServer"),
            [entry("imap", "10993", "SSL"), entry("imap", "10143", "STARTTLS"), entry("pop3", "10995", "SSL")]
        );
        assert_eq!(servers("outgoingServer"), [entry("smtp", "10465", "SSL"), entry("smtp", "10587", "STARTTLS")]);
    }

    #[test]
    fn names_are_escaped_and_read_back_unchanged() {
        let name = "Tom & Jerry's <\"mail\">";
        let text = client_config(&site(Some(name)), "example.org");
        assert!(!text.contains("<\"mail\">"), "{text}");
        let doc = parse(&text);
        assert_eq!(doc.child("emailProvider").text_at("displayName"), name);
        assert_eq!(doc.child("emailProvider").attribute("id"), Some("example.org"));
    }
}
