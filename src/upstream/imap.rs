//! IMAP login upstream: greeting, capabilities, optional `ID` with the client's address,
//! then `LOGIN`, `AUTHENTICATE PLAIN`, `AUTHENTICATE LOGIN` or `AUTHENTICATE XOAUTH2` as
//! [`mechanism::choose`] says.

use std::collections::VecDeque;
use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use super::mechanism::{self, Method, Offer};
use super::{Conn, UpstreamAuth, UpstreamError, b64, check_line_safe, excerpt, refused};
use crate::protocol::imap::{self, Astring};
use crate::protocol::{Protocol, UpstreamInfo, sasl};

const TAG: &str = "P1";
const CAPA_TAG: &str = "P2";
const PRE_CAPA_TAG: &str = "P0";
const ID_TAG: &str = "P3";

pub(super) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    auth: &UpstreamAuth,
    client: Option<SocketAddr>,
) -> Result<(Conn<S>, UpstreamInfo), UpstreamError> {
    let greeting = conn.read_line().await?;
    if starts_with_ci(&greeting, "* PREAUTH") {
        return Err(UpstreamError::Protocol(
            "upstream greeted with PREAUTH; refusing an unauthenticated session".into(),
        ));
    }
    if !starts_with_ci(&greeting, "* OK") {
        return Err(UpstreamError::Protocol(excerpt(&greeting)));
    }
    let mut pre_login = bracket_capabilities(&greeting);
    if pre_login.is_none() {
        conn.send(format!("{PRE_CAPA_TAG} CAPABILITY\r\n").as_bytes()).await?;
        let (status, text) =
            read_tagged(&mut conn, PRE_CAPA_TAG, &mut pre_login, &mut None, &mut VecDeque::new()).await?;
        if !status.eq_ignore_ascii_case("OK") {
            return Err(UpstreamError::Protocol(excerpt(&text)));
        }
    }
    let pre_login = pre_login.unwrap_or_default();
    let has = |name: &str| pre_login.split_ascii_whitespace().any(|w| w.eq_ignore_ascii_case(name));
    let (literal_plus, sasl_ir) = (has("LITERAL+"), has("SASL-IR"));

    if let Some(client) = client {
        if has("ID") {
            let command = format!(
                "{ID_TAG} ID (\"x-originating-ip\" \"{}\" \"x-originating-port\" \"{}\")\r\n",
                client.ip(),
                client.port()
            );
            conn.send(command.as_bytes()).await?;
            let (status, text) = read_tagged(&mut conn, ID_TAG, &mut None, &mut None, &mut VecDeque::new()).await?;
            if !status.eq_ignore_ascii_case("OK") {
                tracing::info!(answer = %excerpt(&text), "upstream did not take the client's address (ID)");
            }
        } else {
            tracing::debug!("upstream does not offer ID; the client's address is not passed on");
        }
    }

    let method = mechanism::choose(Protocol::Imap, &offer(&pre_login), auth.kind())?;
    tracing::debug!(method = method.name(), "upstream login method");
    let mut capabilities = None;
    let mut challenge = None;
    let mut responses: VecDeque<Zeroizing<String>> = VecDeque::new();
    check_line_safe("upstream user name", auth.user())?;
    let done = match (auth, method) {
        (UpstreamAuth::Password { user, password }, Method::ImapLogin) => {
            check_line_safe("upstream password", password.expose())?;
            let mut command = Zeroizing::new(format!("{TAG} LOGIN ").into_bytes());
            append_astring(&mut conn, &mut command, user, literal_plus).await?;
            command.push(b' ');
            append_astring(&mut conn, &mut command, password.expose(), literal_plus).await?;
            command.extend_from_slice(b"\r\n");
            conn.send(&command).await?;
            read_tagged(&mut conn, TAG, &mut capabilities, &mut challenge, &mut responses).await?
        }
        (UpstreamAuth::Password { user, password }, Method::Login) => {
            check_line_safe("upstream password", password.expose())?;
            responses.push_back(b64(user));
            responses.push_back(b64(password.expose()));
            conn.send(format!("{TAG} AUTHENTICATE LOGIN\r\n").as_bytes()).await?;
            read_tagged(&mut conn, TAG, &mut capabilities, &mut challenge, &mut responses).await?
        }
        (auth, _) => {
            let (name, ir) = match auth {
                UpstreamAuth::Password { user, password } => {
                    check_line_safe("upstream password", password.expose())?;
                    ("PLAIN", Zeroizing::new(sasl::encode_plain(user, password.expose())))
                }
                UpstreamAuth::XOAuth2 { user, token } => {
                    ("XOAUTH2", Zeroizing::new(sasl::encode_xoauth2(user, token.expose())))
                }
            };
            let command = if sasl_ir {
                Zeroizing::new(format!("{TAG} AUTHENTICATE {name} {}\r\n", ir.as_str()))
            } else {
                responses.push_back(ir);
                Zeroizing::new(format!("{TAG} AUTHENTICATE {name}\r\n"))
            };
            conn.send(command.as_bytes()).await?;
            read_tagged(&mut conn, TAG, &mut capabilities, &mut challenge, &mut responses).await?
        }
    };
    let (status, text) = done;
    if !status.eq_ignore_ascii_case("OK") {
        return Err(refused(&format!("{status} {text}"), challenge.as_deref()));
    }
    if capabilities.is_none() {
        capabilities = bracket_capabilities(&text);
    }
    if capabilities.is_none() {
        conn.send(format!("{CAPA_TAG} CAPABILITY\r\n").as_bytes()).await?;
        let (status, text) =
            read_tagged(&mut conn, CAPA_TAG, &mut capabilities, &mut None, &mut VecDeque::new()).await?;
        if !status.eq_ignore_ascii_case("OK") {
            return Err(UpstreamError::Protocol(excerpt(&text)));
        }
    }
    Ok((conn, UpstreamInfo { capabilities }))
}

/// What a pre-login capability list offers: its `AUTH=` mechanisms, and `LOGIN` unless
/// `LOGINDISABLED`.
fn offer(capabilities: &str) -> Offer {
    let words: Vec<&str> = capabilities.split_ascii_whitespace().collect();
    Offer::new(
        words.iter().filter_map(|w| strip_prefix_ci(w, "AUTH=")),
        !words.iter().any(|w| w.eq_ignore_ascii_case("LOGINDISABLED")),
    )
}

/// Reads responses up to the tagged one, noting capabilities. Each continuation (`+ ...`)
/// is answered with the next of `responses`; once they are used up, a continuation is a
/// SASL error challenge: answered with an empty line, as XOAUTH2 requires, and kept in
/// `challenge` for the refusal.
async fn read_tagged<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    tag: &str,
    capabilities: &mut Option<String>,
    challenge: &mut Option<String>,
    responses: &mut VecDeque<Zeroizing<String>>,
) -> Result<(String, String), UpstreamError> {
    loop {
        let line = conn.read_line().await?;
        if let Some(rest) = strip_prefix_ci(&line, "* CAPABILITY ") {
            *capabilities = Some(rest.trim().to_owned());
        } else if line.starts_with('+') && !responses.is_empty() {
            if let Some(response) = responses.pop_front() {
                conn.send_secret_line(&response).await?;
            }
        } else if let Some(rest) = line.strip_prefix('+') {
            let text = rest.trim();
            if !text.is_empty() {
                tracing::debug!(challenge = %excerpt(&sasl_error_text(text)), "upstream SASL error challenge");
                *challenge = Some(text.to_owned());
            }
            conn.send(b"\r\n").await?;
        } else if let Some(rest) = line.strip_prefix(tag).and_then(|r| r.strip_prefix(' ')) {
            let (status, text) = rest.split_once(' ').unwrap_or((rest, ""));
            return Ok((status.to_owned(), text.to_owned()));
        } else if line.ends_with('}') {
            return Err(UpstreamError::Protocol("literal in a login response".into()));
        }
    }
}

/// Decodes a base64 SASL error challenge for the log, or keeps it as sent.
fn sasl_error_text(challenge: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(challenge)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| challenge.to_owned())
}

/// Appends `value` as the IMAP string form it needs. A synchronizing literal is sent at once
/// (with the command so far) and the server's `+` awaited.
async fn append_astring<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    command: &mut Vec<u8>,
    value: &str,
    literal_plus: bool,
) -> Result<(), UpstreamError> {
    match imap::encode_astring(value) {
        Astring::Inline(bytes) => command.extend_from_slice(&bytes),
        Astring::Literal(bytes) => {
            command.extend_from_slice(imap::literal_header(bytes.len(), literal_plus).as_bytes());
            if !literal_plus {
                conn.send(command).await?;
                command.clear();
                let line = conn.read_line().await?;
                if !line.starts_with('+') {
                    return Err(UpstreamError::Refused(excerpt(&line)));
                }
            }
            command.extend_from_slice(bytes);
        }
    }
    Ok(())
}

/// The capability list in a `[CAPABILITY ...]` response code, if any.
fn bracket_capabilities(text: &str) -> Option<String> {
    let start = text.find('[')?;
    let inner = &text[start + 1..];
    let rest = strip_prefix_ci(inner, "CAPABILITY ")?;
    let end = rest.find(']')?;
    Some(rest[..end].trim().to_owned())
}

fn starts_with_ci(text: &str, prefix: &str) -> bool {
    strip_prefix_ci(text, prefix).is_some()
}

fn strip_prefix_ci<'a>(text: &'a str, prefix: &str) -> Option<&'a str> {
    let head = text.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &text[prefix.len()..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::upstream::script::serve;

    fn password(user: &str, password: &str) -> UpstreamAuth {
        UpstreamAuth::Password { user: user.into(), password: Secret::new(password) }
    }

    #[tokio::test]
    async fn preauth_greetings_are_refused() {
        let (conn, _server) = serve("* PREAUTH [CAPABILITY IMAP4rev1] hello\r\n", vec![]);
        let err = login(conn, &password("u", "p"), None).await.err().unwrap();
        assert!(err.to_string().contains("PREAUTH"), "{err}");
    }

    #[tokio::test]
    async fn capabilities_are_asked_for_when_the_login_answer_has_none() {
        let (conn, server) = serve(
            "* OK ready\r\n",
            vec![
                ("P0 CAPABILITY", "* CAPABILITY IMAP4rev1 AUTH=PLAIN\r\nP0 OK done\r\n"),
                ("P1 LOGIN alice@example.com \"p \\\"q\\\"\"", "P1 OK Logged in\r\n"),
                ("P2 CAPABILITY", "* CAPABILITY IMAP4rev1 IDLE\r\nP2 OK done\r\n* 3 EXISTS\r\n"),
            ],
        );
        let (conn, info) = login(conn, &password("alice@example.com", "p \"q\""), None).await.unwrap();
        assert_eq!(info.capabilities.as_deref(), Some("IMAP4rev1 IDLE"));
        let (_, leftover) = conn.into_parts();
        assert_eq!(&leftover[..], b"* 3 EXISTS\r\n", "what follows the login answer belongs to the client");
        assert_eq!(server.await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn eight_bit_passwords_go_as_literals_after_the_continuation() {
        let (conn, server) = serve(
            "* OK [CAPABILITY IMAP4rev1] ready\r\n",
            vec![("P1 LOGIN u {6}", "+ go on\r\n"), ("pässw", "P1 OK [CAPABILITY IMAP4rev1] in\r\n")],
        );
        let (_, info) = login(conn, &password("u", "pässw"), None).await.unwrap();
        assert_eq!(info.capabilities.as_deref(), Some("IMAP4rev1"));
        let seen = server.await.unwrap();
        assert_eq!(seen[1], "pässw\r\n");
    }

    #[tokio::test]
    async fn a_refusal_keeps_the_upstream_answer() {
        let (conn, _server) = serve(
            "* OK [CAPABILITY IMAP4rev1] ready\r\n",
            vec![("P1 LOGIN", "P1 NO [AUTHENTICATIONFAILED] Invalid credentials\r\n")],
        );
        match login(conn, &password("u", "p"), None).await {
            Err(UpstreamError::Refused(answer)) => assert!(answer.contains("Invalid credentials"), "{answer}"),
            other => panic!("expected a refusal, got {:?}", other.map(|(_, i)| i)),
        }
    }

    #[tokio::test]
    async fn xoauth2_error_challenges_are_answered_and_reported() {
        use base64::Engine;
        let challenge = base64::engine::general_purpose::STANDARD.encode(r#"{"status":"401","schemes":"bearer"}"#);
        let greeting = "* OK [CAPABILITY IMAP4rev1 SASL-IR AUTH=XOAUTH2] ready\r\n";
        let reply: &'static str = Box::leak(format!("+ {challenge}\r\n").into_boxed_str());
        let (conn, server) = serve(
            greeting,
            vec![("P1 AUTHENTICATE XOAUTH2 ", reply), ("\r\n", "P1 NO SASL authentication failed\r\n")],
        );
        let auth = UpstreamAuth::XOAuth2 { user: "u@example.com".into(), token: Secret::new("tok") };
        match login(conn, &auth, None).await {
            Err(UpstreamError::Refused(answer)) => assert!(answer.contains("status=401"), "{answer}"),
            other => panic!("expected a refusal, got {:?}", other.map(|(_, i)| i)),
        }
        assert_eq!(server.await.unwrap().len(), 2, "the challenge was answered with an empty line");
    }

    #[tokio::test]
    async fn logindisabled_leads_to_authenticate_login_with_each_field_in_base64() {
        let (conn, server) = serve(
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGINDISABLED AUTH=LOGIN] ready\r\n",
            vec![
                ("P1 AUTHENTICATE LOGIN\r\n", "+ VXNlcm5hbWU6\r\n"),
                ("dUBleGFtcGxlLmNvbQ==\r\n", "+ UGFzc3dvcmQ6\r\n"),
                ("cCAiw6QiIFw=\r\n", "P1 OK [CAPABILITY IMAP4rev1 IDLE] Logged in\r\n"),
            ],
        );
        let (_, info) = login(conn, &password("u@example.com", "p \"ä\" \\"), None).await.unwrap();
        assert_eq!(info.capabilities.as_deref(), Some("IMAP4rev1 IDLE"));
        assert_eq!(server.await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn authenticate_plain_waits_for_the_continuation_without_sasl_ir() {
        let (conn, server) = serve(
            "* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=PLAIN AUTH=LOGIN] ready\r\n",
            vec![("P1 AUTHENTICATE PLAIN\r\n", "+ \r\n"), ("AHUAcA==\r\n", "P1 OK [CAPABILITY IMAP4rev1] in\r\n")],
        );
        login(conn, &password("u", "p"), None).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 2);
        let (conn, server) = serve(
            "* OK [CAPABILITY IMAP4rev1 SASL-IR LOGINDISABLED AUTH=PLAIN] ready\r\n",
            vec![("P1 AUTHENTICATE PLAIN AHUAcA==\r\n", "P1 OK [CAPABILITY IMAP4rev1] in\r\n")],
        );
        login(conn, &password("u", "p"), None).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn nothing_fitting_is_a_typed_error_naming_the_offer() {
        let (conn, _server) = serve("* OK [CAPABILITY IMAP4rev1 LOGINDISABLED AUTH=XOAUTH2] ready\r\n", vec![]);
        match login(conn, &password("u", "p"), None).await {
            Err(UpstreamError::NoMethod(e)) => assert_eq!(e.offered, "AUTH=XOAUTH2 LOGINDISABLED"),
            other => panic!("expected no method, got {:?}", other.map(|(_, i)| i)),
        }
    }

    #[tokio::test]
    async fn the_client_address_goes_in_an_id_before_the_login_when_offered() {
        let client: SocketAddr = "[::ffff:192.0.2.7]:4242".parse().unwrap();
        let client = super::super::canonical(client);
        let (conn, server) = serve(
            "* OK [CAPABILITY IMAP4rev1 ID] ready\r\n",
            vec![
                (
                    "P3 ID (\"x-originating-ip\" \"192.0.2.7\" \"x-originating-port\" \"4242\")\r\n",
                    "* ID NIL\r\nP3 OK ID completed\r\n",
                ),
                ("P1 LOGIN u p\r\n", "P1 OK [CAPABILITY IMAP4rev1] in\r\n"),
            ],
        );
        login(conn, &password("u", "p"), Some(client)).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 2);
        // Without ID on offer, nothing is sent before the login.
        let (conn, server) =
            serve("* OK [CAPABILITY IMAP4rev1] ready\r\n", vec![("P1 LOGIN u p", "P1 OK [CAPABILITY X] in\r\n")]);
        login(conn, &password("u", "p"), Some(client)).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 1);
    }

    #[test]
    fn offers_come_from_auth_capabilities_and_logindisabled() {
        assert_eq!(offer("IMAP4rev1 SASL-IR auth=plain AUTH=LOGIN"), Offer::new(["PLAIN", "LOGIN"], true));
        assert_eq!(offer("IMAP4rev1 LOGINDISABLED AUTH=XOAUTH2"), Offer::new(["XOAUTH2"], false));
    }

    #[test]
    fn capabilities_come_from_response_codes() {
        assert_eq!(
            bracket_capabilities("* OK [CAPABILITY IMAP4rev1 SASL-IR LITERAL+] ready").as_deref(),
            Some("IMAP4rev1 SASL-IR LITERAL+")
        );
        assert_eq!(bracket_capabilities("OK [capability IMAP4rev1 IDLE] Logged in").as_deref(), Some("IMAP4rev1 IDLE"));
        assert_eq!(bracket_capabilities("OK Logged in"), None);
        assert_eq!(bracket_capabilities("OK [ALERT] hi"), None);
    }

    async fn encoded(value: &str, literal_plus: bool) -> (Vec<u8>, Vec<u8>) {
        let (client, mut server) = tokio::io::duplex(1024);
        let responder = tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut seen = vec![0u8; 1024];
            let n = server.read(&mut seen).await.unwrap_or(0);
            seen.truncate(n);
            if seen.ends_with(b"}\r\n") {
                server.write_all(b"+ go ahead\r\n").await.unwrap();
            }
            seen
        });
        let mut conn = Conn::new(client);
        let mut command = b"P1 LOGIN ".to_vec();
        append_astring(&mut conn, &mut command, value, literal_plus).await.unwrap();
        if !value.is_ascii() && !literal_plus {
            drop(conn);
        }
        let sent_early = if !value.is_ascii() && !literal_plus { responder.await.unwrap() } else { Vec::new() };
        (sent_early, command)
    }

    #[tokio::test]
    async fn astrings_pick_atom_quoted_or_literal() {
        assert_eq!(encoded("alice@example.com", false).await.1, b"P1 LOGIN alice@example.com");
        assert_eq!(encoded(r#"p "a" \b"#, false).await.1, br#"P1 LOGIN "p \"a\" \\b""#);
        assert_eq!(encoded("", false).await.1, b"P1 LOGIN \"\"");
        assert_eq!(encoded("pässwörd", true).await.1, "P1 LOGIN {10+}\r\npässwörd".as_bytes());
        let (early, rest) = encoded("pässwörd", false).await;
        assert_eq!(early, b"P1 LOGIN {10}\r\n");
        assert_eq!(rest, "pässwörd".as_bytes());
    }
}
