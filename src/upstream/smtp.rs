//! SMTP submission login upstream: greeting, `EHLO`, optional `STARTTLS`, optional `XCLIENT`
//! with the client's address (then `EHLO` again), then `AUTH PLAIN`, `AUTH LOGIN` or
//! `AUTH XOAUTH2` as [`mechanism::choose`] says.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use super::mechanism::{self, Method, Offer};
use super::{Conn, UpstreamAuth, UpstreamError, b64, check_line_safe, excerpt, refused};
use crate::protocol::{Protocol, UpstreamInfo, sasl};

/// A complete (possibly multi-line) SMTP reply.
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        excerpt(&self.lines.join(" / "))
    }

    /// The parameters of EHLO keyword `name` (`AUTH`, `XCLIENT`), if the reply has it. The
    /// old `AUTH=PLAIN` form counts as `AUTH PLAIN`.
    fn extension(&self, name: &str) -> Option<Vec<String>> {
        self.lines.iter().skip(1).find_map(|line| {
            let text = line.get(4..)?;
            let (keyword, params) = match text.split_once([' ', '=']) {
                Some((k, p)) => (k, p),
                None => (text, ""),
            };
            keyword
                .eq_ignore_ascii_case(name)
                .then(|| params.split_ascii_whitespace().map(str::to_ascii_uppercase).collect())
        })
    }
}

/// What an EHLO reply offers: its `AUTH` mechanisms.
fn offer(ehlo: &Reply) -> Offer {
    Offer { sasl: Some(ehlo.extension("AUTH").unwrap_or_default()), password_command: false }
}

/// The `XCLIENT` command for `client`, with the attributes the upstream lists.
fn xclient_command(attributes: &[String], client: SocketAddr) -> String {
    let addr = match client.ip() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => format!("IPV6:{v6}"),
    };
    let mut command = format!("XCLIENT ADDR={addr}");
    if attributes.iter().any(|a| a == "PORT") {
        command.push_str(&format!(" PORT={}", client.port()));
    }
    command.push_str("\r\n");
    command
}

async fn read_reply<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<S>) -> Result<Reply, UpstreamError> {
    let mut lines = Vec::new();
    loop {
        let line = conn.read_line().await?;
        let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
        let Some(code) = code else {
            return Err(UpstreamError::Protocol(excerpt(&line)));
        };
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line);
        if last {
            return Ok(Reply { code, lines });
        }
        if lines.len() > 100 {
            return Err(UpstreamError::Protocol("reply with too many lines".into()));
        }
    }
}

async fn greet_and_hello<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    hello: &str,
    expect_greeting: bool,
) -> Result<Reply, UpstreamError> {
    if expect_greeting {
        let greeting = read_reply(conn).await?;
        if greeting.code != 220 {
            return Err(UpstreamError::Protocol(greeting.text()));
        }
    }
    check_line_safe("EHLO name", hello)?;
    conn.send(format!("EHLO {hello}\r\n").as_bytes()).await?;
    let ehlo = read_reply(conn).await?;
    if ehlo.code != 250 {
        return Err(UpstreamError::Protocol(ehlo.text()));
    }
    Ok(ehlo)
}

/// Upgrades a plain submission connection with `STARTTLS` and returns the bare TCP stream for
/// the TLS handshake. Anything the server sent beyond its `220` answer is a protocol error:
/// bytes read before the handshake must never be trusted after it.
pub(super) async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    hello: &str,
) -> Result<S, UpstreamError> {
    let ehlo = greet_and_hello(&mut conn, hello, true).await?;
    if !ehlo.lines.iter().any(|l| l.get(4..).is_some_and(|e| e.eq_ignore_ascii_case("STARTTLS"))) {
        return Err(UpstreamError::Protocol("upstream does not offer STARTTLS".into()));
    }
    conn.send(b"STARTTLS\r\n").await?;
    let answer = read_reply(&mut conn).await?;
    if answer.code != 220 {
        return Err(UpstreamError::Protocol(answer.text()));
    }
    let (stream, leftover) = conn.into_parts();
    if !leftover.is_empty() {
        return Err(UpstreamError::Protocol("upstream sent data before the TLS handshake".into()));
    }
    Ok(stream)
}

/// Logs in over TLS. `greeting` is false after STARTTLS, where no new greeting comes.
pub(super) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    auth: &UpstreamAuth,
    hello: &str,
    greeting: bool,
    client: Option<SocketAddr>,
) -> Result<(Conn<S>, UpstreamInfo), UpstreamError> {
    let mut ehlo = greet_and_hello(&mut conn, hello, greeting).await?;
    if let Some(client) = client {
        match ehlo.extension("XCLIENT") {
            Some(attributes) if attributes.iter().any(|a| a == "ADDR") => {
                conn.send(xclient_command(&attributes, client).as_bytes()).await?;
                let answer = read_reply(&mut conn).await?;
                if answer.code == 220 {
                    // XCLIENT restarts the session: a new greeting, so EHLO again.
                    ehlo = greet_and_hello(&mut conn, hello, false).await?;
                } else {
                    tracing::info!(answer = %answer.text(), "upstream did not take the client's address (XCLIENT)");
                }
            }
            _ => tracing::debug!("upstream does not offer XCLIENT ADDR; the client's address is not passed on"),
        }
    }
    let method = mechanism::choose(Protocol::Smtp, &offer(&ehlo), auth.kind())?;
    tracing::debug!(method = method.name(), "upstream login method");
    check_line_safe("upstream user name", auth.user())?;
    let mut challenge = None;
    let (command, responses) = match (auth, method) {
        (UpstreamAuth::Password { user, password }, Method::Login) => {
            (Zeroizing::new("AUTH LOGIN\r\n".to_owned()), vec![b64(user), b64(password.expose())])
        }
        (UpstreamAuth::Password { user, password }, _) => {
            let ir = Zeroizing::new(sasl::encode_plain(user, password.expose()));
            (Zeroizing::new(format!("AUTH PLAIN {}\r\n", ir.as_str())), Vec::new())
        }
        (UpstreamAuth::XOAuth2 { user, token }, _) => {
            let ir = Zeroizing::new(sasl::encode_xoauth2(user, token.expose()));
            (Zeroizing::new(format!("AUTH XOAUTH2 {}\r\n", ir.as_str())), Vec::new())
        }
    };
    conn.send(command.as_bytes()).await?;
    let mut responses = responses.into_iter();
    let answer = loop {
        let answer = read_reply(&mut conn).await?;
        if answer.code != 334 {
            break answer;
        }
        match responses.next() {
            Some(response) => {
                conn.send_secret_line(&response).await?;
            }
            // After the responses, a challenge is an error report: XOAUTH2 wants an empty
            // line for it, and the final answer follows.
            None if challenge.is_none() => {
                challenge = answer.lines.first().and_then(|l| l.get(4..)).map(|c| c.trim().to_owned());
                conn.send(b"\r\n").await?;
            }
            None => return Err(UpstreamError::Protocol("too many SASL challenges".into())),
        }
    };
    match answer.code {
        235 => {}
        500..=599 => return Err(refused(&answer.text(), challenge.as_deref())),
        _ => return Err(UpstreamError::Protocol(answer.text())),
    }
    Ok((conn, UpstreamInfo::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::upstream::script::serve;

    fn auth() -> UpstreamAuth {
        UpstreamAuth::Password { user: "u@example.com".into(), password: Secret::new("pw") }
    }

    #[tokio::test]
    async fn multi_line_replies_and_auth_plain() {
        let (conn, server) = serve(
            "220-mx.example ESMTP\r\n220 ready\r\n",
            vec![
                ("EHLO client.example", "250-mx.example\r\n250-AUTH PLAIN\r\n250 8BITMIME\r\n"),
                ("AUTH PLAIN ", "235 2.7.0 ok\r\n"),
            ],
        );
        login(conn, &auth(), "client.example", true, None).await.unwrap();
        let seen = server.await.unwrap();
        use base64::Engine;
        let ir = base64::engine::general_purpose::STANDARD.encode("\0u@example.com\0pw");
        assert_eq!(seen[1], format!("AUTH PLAIN {ir}\r\n"));
    }

    #[tokio::test]
    async fn bytes_sent_before_the_tls_handshake_are_never_trusted() {
        let ehlo = "250-mx\r\n250 STARTTLS\r\n";
        let (conn, _s) = serve("220 ready\r\n", vec![("EHLO", ehlo), ("STARTTLS", "220 go ahead\r\n250 injected\r\n")]);
        let err = starttls(conn, "c").await.expect_err("refused");
        assert!(err.to_string().contains("before the TLS handshake"), "{err}");
        let (conn, _s) = serve("220 ready\r\n", vec![("EHLO", ehlo), ("STARTTLS", "220 go ahead\r\n")]);
        assert!(starttls(conn, "c").await.is_ok());
        let (conn, _s) = serve("220 ready\r\n", vec![("EHLO", "250 mx\r\n")]);
        assert!(starttls(conn, "c").await.err().unwrap().to_string().contains("does not offer STARTTLS"));
    }

    #[tokio::test]
    async fn permanent_failures_are_refusals_and_bad_hello_names_are_not_sent() {
        let (conn, _s) = serve(
            "220 ready\r\n",
            vec![("EHLO", "250-ok\r\n250 AUTH PLAIN\r\n"), ("AUTH PLAIN", "535 5.7.8 Bad credentials\r\n")],
        );
        assert!(matches!(login(conn, &auth(), "c", true, None).await, Err(UpstreamError::Refused(_))));
        let (conn, _s) = serve("220 ready\r\n", vec![]);
        assert!(matches!(
            login(conn, &auth(), "c\r\nMAIL FROM:<x>", true, None).await,
            Err(UpstreamError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn office_365_style_offers_get_auth_login_for_a_password() {
        let (conn, server) = serve(
            "220 ready\r\n",
            vec![
                ("EHLO c", "250-outlook.office365.com\r\n250-AUTH LOGIN XOAUTH2\r\n250 8BITMIME\r\n"),
                ("AUTH LOGIN\r\n", "334 VXNlcm5hbWU6\r\n"),
                ("dUBleGFtcGxlLmNvbQ==\r\n", "334 UGFzc3dvcmQ6\r\n"),
                ("cHc=\r\n", "235 2.7.0 Authentication successful\r\n"),
            ],
        );
        login(conn, &auth(), "c", true, None).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 4);
        let token = UpstreamAuth::XOAuth2 { user: "u@example.com".into(), token: Secret::new("tok") };
        let (conn, server) = serve(
            "220 ready\r\n",
            vec![("EHLO c", "250-o\r\n250 AUTH LOGIN XOAUTH2\r\n"), ("AUTH XOAUTH2 ", "235 2.7.0 ok\r\n")],
        );
        login(conn, &token, "c", true, None).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 2);
        let (conn, _s) = serve("220 ready\r\n", vec![("EHLO c", "250-o\r\n250 AUTH PLAIN LOGIN\r\n")]);
        let err = login(conn, &token, "c", true, None).await.err().expect("no method");
        assert_eq!(
            err.to_string(),
            "the upstream offers no login method for an OAuth2 token (it offers: AUTH PLAIN LOGIN)"
        );
    }

    #[tokio::test]
    async fn xclient_goes_first_and_ehlo_is_repeated_after_it() {
        let client: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        let (conn, server) = serve(
            "220 ready\r\n",
            vec![
                ("EHLO c", "250-mx\r\n250-AUTH PLAIN\r\n250 XCLIENT ADDR PORT HELO\r\n"),
                ("XCLIENT ADDR=192.0.2.7 PORT=4242\r\n", "220 mx ready\r\n"),
                ("EHLO c", "250-mx\r\n250 AUTH PLAIN\r\n"),
                ("AUTH PLAIN ", "235 ok\r\n"),
            ],
        );
        login(conn, &auth(), "c", true, Some(client)).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 4);
        let v6: SocketAddr = "[2001:db8::1]:25".parse().unwrap();
        assert_eq!(xclient_command(&["ADDR".into()], v6), "XCLIENT ADDR=IPV6:2001:db8::1\r\n");
        // Not offered: nothing sent.
        let (conn, server) =
            serve("220 ready\r\n", vec![("EHLO c", "250-mx\r\n250 AUTH=PLAIN\r\n"), ("AUTH PLAIN ", "235 ok\r\n")]);
        login(conn, &auth(), "c", true, Some(client)).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 2);
    }
}
