//! SMTP submission login upstream: greeting, `EHLO`, optional `STARTTLS`, `AUTH`.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Conn, UpstreamAuth, UpstreamError, check_line_safe, excerpt, refused};
use crate::protocol::{UpstreamInfo, sasl};

/// A complete (possibly multi-line) SMTP reply.
struct Reply {
    code: u16,
    lines: Vec<String>,
}

impl Reply {
    fn text(&self) -> String {
        excerpt(&self.lines.join(" / "))
    }
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
) -> Result<(Conn<S>, UpstreamInfo), UpstreamError> {
    greet_and_hello(&mut conn, hello, greeting).await?;
    let mut challenge = None;
    let answer = match auth {
        UpstreamAuth::Password { user, password } => {
            check_line_safe("upstream user name", user)?;
            let mut ir = sasl::encode_plain(user, password.expose());
            let sent = conn.send(format!("AUTH PLAIN {ir}\r\n").as_bytes()).await;
            zeroize::Zeroize::zeroize(&mut ir);
            sent?;
            read_reply(&mut conn).await?
        }
        UpstreamAuth::XOAuth2 { user, token } => {
            check_line_safe("upstream user name", user)?;
            let ir = zeroize::Zeroizing::new(sasl::encode_xoauth2(user, token.expose()));
            let command = zeroize::Zeroizing::new(format!("AUTH XOAUTH2 {}\r\n", ir.as_str()));
            conn.send(command.as_bytes()).await?;
            let mut answer = read_reply(&mut conn).await?;
            if answer.code == 334 {
                challenge = answer.lines.first().and_then(|l| l.get(4..)).map(|c| c.trim().to_owned());
                conn.send(b"\r\n").await?;
                answer = read_reply(&mut conn).await?;
            }
            answer
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
        login(conn, &auth(), "client.example", true).await.unwrap();
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
        let (conn, _s) =
            serve("220 ready\r\n", vec![("EHLO", "250 ok\r\n"), ("AUTH PLAIN", "535 5.7.8 Bad credentials\r\n")]);
        assert!(matches!(login(conn, &auth(), "c", true).await, Err(UpstreamError::Refused(_))));
        let (conn, _s) = serve("220 ready\r\n", vec![]);
        assert!(matches!(login(conn, &auth(), "c\r\nMAIL FROM:<x>", true).await, Err(UpstreamError::Protocol(_))));
    }
}
