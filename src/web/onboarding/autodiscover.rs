//! Microsoft Autodiscover, the plain-old-XML (POX) form Outlook posts to
//! `https://autodiscover.<domain>/autodiscover/autodiscover.xml`: the request names the
//! address, the answer is an `email` account with an `IMAP`, `POP3` and `SMTP` protocol
//! block each (MS-OXDSCLI).

use std::fmt::Write;

use quick_xml::events::Event;

use super::xml::{escape, reference};
use super::{MailAddress, Site};
use crate::config::ClientTls;
use crate::protocol::Protocol;

/// The response's media type.
pub const CONTENT_TYPE: &str = "text/xml; charset=utf-8";

/// Largest request body read; a real request is a few hundred bytes.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;

/// Deepest element nesting accepted in a request (a real one has three levels).
const MAX_DEPTH: usize = 8;

/// Longest `EMailAddress` or `AcceptableResponseSchema` text kept.
const MAX_VALUE: usize = 512;

/// The schema Outlook asks for and gets.
pub const OUTLOOK_RESPONSE_SCHEMA: &str =
    "http://schemas.microsoft.com/exchange/autodiscover/outlook/responseschema/2006a";

/// The outer schema of every Autodiscover response.
const RESPONSE_SCHEMA: &str = "http://schemas.microsoft.com/exchange/autodiscover/responseschema/2006";

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `Request/EMailAddress`, as sent (check it with [`MailAddress::parse`]).
    pub email: String,
    /// `Request/AcceptableResponseSchema`, when sent.
    pub schema: Option<String>,
}

/// Why a request body is not an Autodiscover request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// Not well-formed XML, not UTF-8, or nested too deep.
    #[error("the request is not well-formed XML")]
    Malformed,
    /// A `<!DOCTYPE>` or an entity other than XML's predefined ones: never expanded.
    #[error("the request declares or uses entities; send plain XML")]
    Entity,
    /// The root is not `Autodiscover`, or `Request/EMailAddress` is missing or too long.
    #[error("the request has no Autodiscover/Request/EMailAddress")]
    NoAddress,
}

/// Reads `EMailAddress` and `AcceptableResponseSchema` from a request body (namespace
/// prefixes ignored). No DTD is read and no entity expanded.
pub fn parse_request(body: &[u8]) -> Result<Request, RequestError> {
    let mut reader = quick_xml::Reader::from_reader(body);
    let mut path: Vec<Vec<u8>> = Vec::new();
    let (mut email, mut schema): (Option<String>, Option<String>) = (None, None);
    loop {
        let event = reader.read_event().map_err(|_| RequestError::Malformed)?;
        let target = match path.iter().map(Vec::as_slice).collect::<Vec<_>>().as_slice() {
            [b"Autodiscover", b"Request", b"EMailAddress"] => Some(&mut email),
            [b"Autodiscover", b"Request", b"AcceptableResponseSchema"] => Some(&mut schema),
            _ => None,
        };
        let append = |target: Option<&mut Option<String>>, text: &str| -> Result<(), RequestError> {
            if let Some(value) = target {
                let value = value.get_or_insert_with(String::new);
                if value.len() + text.len() > MAX_VALUE {
                    return Err(RequestError::NoAddress);
                }
                value.push_str(text);
            }
            Ok(())
        };
        match event {
            Event::Start(e) => {
                if path.len() == MAX_DEPTH {
                    return Err(RequestError::Malformed);
                }
                if path.is_empty() && e.local_name().as_ref() != b"Autodiscover" {
                    return Err(RequestError::NoAddress);
                }
                path.push(e.local_name().as_ref().to_vec());
            }
            Event::End(_) => {
                path.pop();
            }
            Event::Text(t) => append(target, &t.decode().map_err(|_| RequestError::Malformed)?)?,
            Event::CData(c) => append(target, &c.decode().map_err(|_| RequestError::Malformed)?)?,
            Event::GeneralRef(r) => {
                let c = reference(&r).ok_or(RequestError::Entity)?;
                append(target, c.encode_utf8(&mut [0; 4]))?;
            }
            Event::DocType(_) => return Err(RequestError::Entity),
            Event::Eof => break,
            Event::Empty(_) | Event::Comment(_) | Event::Decl(_) | Event::PI(_) => {}
        }
    }
    let email = email.ok_or(RequestError::NoAddress)?;
    Ok(Request { email, schema: schema.map(|s| s.trim().to_owned()) })
}

/// Error codes of an Autodiscover error response (MS-OXDSCLI 2.2.4.1.1.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 500: no configuration for this address (a domain Postern does not serve).
    AddressNotFound,
    /// 600: the request is not a well-formed Autodiscover request.
    InvalidRequest,
    /// 601: the requested response schema is not offered.
    SchemaNotAvailable,
}

impl ErrorCode {
    fn number_and_message(self) -> (u16, &'static str) {
        match self {
            ErrorCode::AddressNotFound => (500, "The e-mail address cannot be found."),
            ErrorCode::InvalidRequest => (600, "Invalid Request"),
            ErrorCode::SchemaNotAvailable => (601, "Provider is not available"),
        }
    }
}

/// An error response: the code and its standard message, nothing about any server.
pub fn error(code: ErrorCode) -> String {
    let (number, message) = code.number_and_message();
    format!(
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Autodiscover xmlns=\"{RESPONSE_SCHEMA}\">\n  <Response>\n    \
         <Error>\n      <ErrorCode>{number}</ErrorCode>\n      <Message>{message}</Message>\n      <DebugData />\n    \
         </Error>\n  </Response>\n</Autodiscover>\n"
    )
}

/// The settings for `address` (whose domain `site` serves): one `Protocol` block per
/// protocol with a listener, naming its preferred one (implicit TLS when there is one:
/// `SSL on`, `Encryption SSL`; else STARTTLS: `Encryption TLS`), the address as login name,
/// no SPA, authentication required.
pub fn settings(site: &Site, address: &MailAddress) -> String {
    let mut out = String::with_capacity(2048);
    let _ = write!(
        out,
        "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Autodiscover xmlns=\"{RESPONSE_SCHEMA}\">\n  \
         <Response xmlns=\"{OUTLOOK_RESPONSE_SCHEMA}\">\n    <Account>\n      <AccountType>email</AccountType>\n      \
         <Action>settings</Action>\n"
    );
    for (protocol, kind) in [(Protocol::Imap, "IMAP"), (Protocol::Pop3, "POP3"), (Protocol::Smtp, "SMTP")] {
        let Some(server) = site.preferred(protocol) else { continue };
        let encryption = match server.tls {
            ClientTls::Implicit => "SSL",
            ClientTls::Starttls => "TLS",
        };
        let _ = write!(
            out,
            "      <Protocol>\n        <Type>{kind}</Type>\n        <Server>{host}</Server>\n        <Port>{port}</Port>\n        \
             <LoginName>{login}</LoginName>\n        <DomainRequired>off</DomainRequired>\n        <SPA>off</SPA>\n        \
             <SSL>on</SSL>\n        <Encryption>{encryption}</Encryption>\n        <AuthRequired>on</AuthRequired>\n      \
             </Protocol>\n",
            host = escape(site.host()),
            port = server.port,
            login = escape(address.as_str()),
        );
    }
    out.push_str("    </Account>\n  </Response>\n</Autodiscover>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::web::onboarding::tests::site;
    use crate::web::onboarding::xml::parse;

    fn request(address: &str) -> String {
        format!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Autodiscover xmlns=\"http://schemas.microsoft.com/exchange/autodiscover/outlook/requestschema/2006\">\n  <Request>\n    <EMailAddress>{address}</EMailAddress>\n    <AcceptableResponseSchema>{OUTLOOK_RESPONSE_SCHEMA}</AcceptableResponseSchema>\n  </Request>\n</Autodiscover>"
        )
    }

    #[test]
    fn outlooks_request_gives_its_address_and_schema() {
        let parsed = parse_request(request("alice@example.com").as_bytes()).unwrap();
        assert_eq!(parsed.email, "alice@example.com");
        assert_eq!(parsed.schema.as_deref(), Some(OUTLOOK_RESPONSE_SCHEMA));
        let prefixed = "<a:Autodiscover xmlns:a=\"x\"><a:Request><a:EMailAddress>t&amp;j&#64;example.com</a:EMailAddress></a:Request></a:Autodiscover>";
        let parsed = parse_request(prefixed.as_bytes()).unwrap();
        assert_eq!((parsed.email.as_str(), parsed.schema), ("t&j@example.com", None));
    }

    #[test]
    fn hostile_or_broken_requests_are_refused_without_expanding_anything() {
        let lol = "<?xml version=\"1.0\"?><!DOCTYPE a [<!ENTITY a \"aaaaaaaaaa\"><!ENTITY b \"&a;&a;&a;&a;\">]><Autodiscover><Request><EMailAddress>&b;</EMailAddress></Request></Autodiscover>";
        assert_eq!(parse_request(lol.as_bytes()), Err(RequestError::Entity));
        let undeclared = "<Autodiscover><Request><EMailAddress>&xxe;</EMailAddress></Request></Autodiscover>";
        assert_eq!(parse_request(undeclared.as_bytes()), Err(RequestError::Entity));
        let deep = format!("<Autodiscover>{}", "<a>".repeat(20));
        assert_eq!(parse_request(deep.as_bytes()), Err(RequestError::Malformed));
        for no_address in [
            "<Other><Request><EMailAddress>a@example.com</EMailAddress></Request></Other>",
            "<Autodiscover><Request></Request></Autodiscover>",
            "<Autodiscover><EMailAddress>a@example.com</EMailAddress></Autodiscover>",
        ] {
            assert_eq!(parse_request(no_address.as_bytes()), Err(RequestError::NoAddress), "{no_address}");
        }
        let long = request(&format!("{}@example.com", "a".repeat(MAX_VALUE)));
        assert_eq!(parse_request(long.as_bytes()), Err(RequestError::NoAddress));
        for broken in [&b"<Autodiscover><Request>"[..], b"<Autodiscover></Request>", b"\xff\xfe<", b"<a b=>"] {
            assert!(parse_request(broken).is_err(), "{broken:?}");
        }
        // Every prefix of a real request is refused or read, never a panic.
        let real = request("alice@example.com");
        for end in 0..real.len() {
            let _ = parse_request(&real.as_bytes()[..end]);
        }
    }

    #[test]
    fn settings_name_each_protocols_preferred_listener() {
        let address = MailAddress::parse("T&J@Example.com").unwrap();
        let doc = parse(&settings(&site(None), &address));
        assert_eq!(doc.name, "Autodiscover");
        assert_eq!(doc.attribute("xmlns"), Some(RESPONSE_SCHEMA));
        let response = doc.child("Response");
        assert_eq!(response.attribute("xmlns"), Some(OUTLOOK_RESPONSE_SCHEMA));
        let account = response.child("Account");
        assert_eq!(account.text_at("AccountType"), "email");
        assert_eq!(account.text_at("Action"), "settings");
        let blocks: Vec<_> = account
            .all("Protocol")
            .into_iter()
            .map(|p| {
                assert_eq!(p.text_at("Server"), "mail-gw.example.com");
                assert_eq!(p.text_at("LoginName"), "t&j@example.com");
                assert_eq!(p.text_at("SPA"), "off");
                assert_eq!(p.text_at("AuthRequired"), "on");
                assert_eq!(p.text_at("SSL"), "on");
                (p.text_at("Type").to_owned(), p.text_at("Port").to_owned(), p.text_at("Encryption").to_owned())
            })
            .collect();
        let block = |t: &str, p: &str, e: &str| (t.to_owned(), p.to_owned(), e.to_owned());
        assert_eq!(
            blocks,
            [block("IMAP", "10993", "SSL"), block("POP3", "10995", "SSL"), block("SMTP", "10465", "SSL")]
        );
    }

    #[test]
    fn a_starttls_only_protocol_is_announced_with_tls_encryption() {
        let config: crate::config::OnboardingConfig =
            toml::from_str("listen = \"0.0.0.0:443\"\ndomains = [\"example.com\"]").unwrap();
        let listeners = [(Protocol::Smtp, ClientTls::Starttls, "0.0.0.0:10587".parse().unwrap())];
        let site = Site::new(&config, "mx.example.com", listeners);
        let doc = parse(&settings(&site, &MailAddress::parse("a@example.com").unwrap()));
        let account = doc.child("Response").child("Account");
        let protocols = account.all("Protocol");
        assert_eq!(protocols.len(), 1, "only protocols with listeners");
        assert_eq!(protocols[0].text_at("Port"), "10587");
        assert_eq!(protocols[0].text_at("Encryption"), "TLS");
    }

    #[test]
    fn error_responses_carry_the_code_and_no_server() {
        for (code, number) in [
            (ErrorCode::AddressNotFound, "500"),
            (ErrorCode::InvalidRequest, "600"),
            (ErrorCode::SchemaNotAvailable, "601"),
        ] {
            let text = error(code);
            let doc = parse(&text);
            assert_eq!(doc.attribute("xmlns"), Some(RESPONSE_SCHEMA));
            let err = doc.child("Response").child("Error");
            assert_eq!(err.text_at("ErrorCode"), number);
            assert!(!err.text_at("Message").is_empty());
            assert!(!text.contains("mail-gw") && !text.contains("<Protocol>") && !text.contains("Port"), "{text}");
        }
    }
}
