//! POP3 login upstream: greeting, `CAPA`, optional `XCLIENT` with the client's address, then
//! `AUTH PLAIN`, `AUTH LOGIN`, `USER`/`PASS` or `AUTH XOAUTH2` as [`mechanism::choose`] says.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncWrite};
use zeroize::Zeroizing;

use super::mechanism::{self, Method, Offer};
use super::{Conn, UpstreamAuth, UpstreamError, b64, check_line_safe, excerpt, refused};
use crate::protocol::{Protocol, UpstreamInfo, sasl};

/// Most `CAPA` lines read.
const MAX_CAPA_LINES: usize = 100;

pub(super) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    auth: &UpstreamAuth,
    client: Option<SocketAddr>,
) -> Result<(Conn<S>, UpstreamInfo), UpstreamError> {
    let greeting = conn.read_line().await?;
    if !greeting.starts_with("+OK") {
        return Err(UpstreamError::Protocol(excerpt(&greeting)));
    }
    let capa = capa(&mut conn).await?;
    let offer = offer(capa.as_deref());
    // Dovecot tells trusted clients in its greeting (`+OK [XCLIENT] ...`), others in CAPA.
    let xclient = greeting[3..].trim_start().to_ascii_uppercase().starts_with("[XCLIENT]")
        || capa.iter().flatten().any(|l| first_word_is(l, "XCLIENT"));
    if let Some(client) = client {
        if xclient {
            conn.send(format!("XCLIENT ADDR={} PORT={}\r\n", client.ip(), client.port()).as_bytes()).await?;
            let answer = conn.read_line().await?;
            if !answer.starts_with("+OK") {
                tracing::info!(answer = %excerpt(&answer), "upstream did not take the client's address (XCLIENT)");
            }
        } else {
            tracing::debug!("upstream does not offer XCLIENT; the client's address is not passed on");
        }
    }

    let method = mechanism::choose(Protocol::Pop3, &offer, auth.kind())?;
    tracing::debug!(method = method.name(), "upstream login method");
    check_line_safe("upstream user name", auth.user())?;
    let mut challenge = None;
    let answer = match (auth, method) {
        (UpstreamAuth::Password { user, password }, Method::UserPass) => {
            check_line_safe("upstream password", password.expose())?;
            conn.send(format!("USER {user}\r\n").as_bytes()).await?;
            let answer = conn.read_line().await?;
            if !answer.starts_with("+OK") {
                return Err(UpstreamError::Refused(excerpt(&answer)));
            }
            let mut pass = Zeroizing::new(Vec::with_capacity(password.expose().len() + 7));
            pass.extend_from_slice(b"PASS ");
            pass.extend_from_slice(password.expose().as_bytes());
            pass.extend_from_slice(b"\r\n");
            conn.send(&pass).await?;
            conn.read_line().await?
        }
        (UpstreamAuth::Password { user, password }, Method::Login) => {
            check_line_safe("upstream password", password.expose())?;
            let responses = [b64(user), b64(password.expose())];
            exchange(&mut conn, "AUTH LOGIN\r\n", &responses, &mut challenge).await?
        }
        (UpstreamAuth::Password { user, password }, _) => {
            check_line_safe("upstream password", password.expose())?;
            let ir = Zeroizing::new(sasl::encode_plain(user, password.expose()));
            let command = Zeroizing::new(format!("AUTH PLAIN {}\r\n", ir.as_str()));
            exchange(&mut conn, &command, &[], &mut challenge).await?
        }
        (UpstreamAuth::XOAuth2 { user, token }, _) => {
            let ir = Zeroizing::new(sasl::encode_xoauth2(user, token.expose()));
            let command = Zeroizing::new(format!("AUTH XOAUTH2 {}\r\n", ir.as_str()));
            exchange(&mut conn, &command, &[], &mut challenge).await?
        }
    };
    if !answer.starts_with("+OK") {
        return Err(refused(&answer, challenge.as_deref()));
    }
    Ok((conn, UpstreamInfo::default()))
}

/// Sends a SASL `AUTH` command and answers each continuation (`+ ...`) with the next of
/// `responses`; after them, a continuation is an error challenge: kept in `challenge` and
/// answered with an empty line, as XOAUTH2 requires. Returns the final `+OK`/`-ERR` line.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    command: &str,
    responses: &[Zeroizing<String>],
    challenge: &mut Option<String>,
) -> Result<String, UpstreamError> {
    conn.send(command.as_bytes()).await?;
    let mut next = responses.iter();
    loop {
        let answer = conn.read_line().await?;
        if !answer.starts_with('+') || answer.starts_with("+OK") {
            return Ok(answer);
        }
        match next.next() {
            Some(response) => {
                conn.send_secret_line(response).await?;
            }
            None if challenge.is_none() => {
                *challenge = Some(answer[1..].trim().to_owned());
                conn.send(b"\r\n").await?;
            }
            None => return Err(UpstreamError::Protocol("too many SASL challenges".into())),
        }
    }
}

/// The `CAPA` lines (RFC 2449), or `None` when the server does not support `CAPA`.
async fn capa<S: AsyncRead + AsyncWrite + Unpin>(conn: &mut Conn<S>) -> Result<Option<Vec<String>>, UpstreamError> {
    conn.send(b"CAPA\r\n").await?;
    let answer = conn.read_line().await?;
    if !answer.starts_with("+OK") {
        return Ok(None);
    }
    let mut lines = Vec::new();
    loop {
        let line = conn.read_line().await?;
        if line == "." {
            return Ok(Some(lines));
        }
        if lines.len() >= MAX_CAPA_LINES {
            return Err(UpstreamError::Protocol("CAPA answer with too many lines".into()));
        }
        lines.push(line.strip_prefix('.').unwrap_or(&line).to_owned());
    }
}

fn first_word_is(line: &str, word: &str) -> bool {
    line.split_ascii_whitespace().next().is_some_and(|w| w.eq_ignore_ascii_case(word))
}

/// What `CAPA` offers: its `SASL` mechanisms and `USER`; without `CAPA`, `USER` is assumed.
fn offer(capa: Option<&[String]>) -> Offer {
    let Some(lines) = capa else {
        return Offer { sasl: None, password_command: true };
    };
    let sasl = lines.iter().filter(|l| first_word_is(l, "SASL")).flat_map(|l| l.split_ascii_whitespace().skip(1));
    Offer::new(sasl, lines.iter().any(|l| first_word_is(l, "USER")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::upstream::script::serve;

    fn auth(password: &str) -> UpstreamAuth {
        UpstreamAuth::Password { user: "recent:u@example.com".into(), password: Secret::new(password) }
    }

    const CAPA_USER: &str = "+OK\r\nTOP\r\nUSER\r\nSASL XOAUTH2\r\n.\r\n";

    #[tokio::test]
    async fn user_pass_logs_in_with_the_whole_password() {
        let (conn, server) = serve(
            "+OK ready\r\n",
            vec![("CAPA", CAPA_USER), ("USER recent:u@example.com", "+OK\r\n"), ("PASS a b \"c\"", "+OK in\r\n")],
        );
        login(conn, &auth("a b \"c\""), None).await.unwrap();
        assert_eq!(server.await.unwrap()[2], "PASS a b \"c\"\r\n");
        // A server without CAPA gets USER/PASS too.
        let (conn, server) = serve(
            "+OK ready\r\n",
            vec![("CAPA", "-ERR unknown command\r\n"), ("USER", "+OK\r\n"), ("PASS x", "+OK in\r\n")],
        );
        login(conn, &auth("x"), None).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 3);
    }

    #[tokio::test]
    async fn sasl_plain_then_sasl_login_come_before_user() {
        let (conn, server) = serve(
            "+OK ready\r\n",
            vec![("CAPA", "+OK\r\nUSER\r\nSASL PLAIN LOGIN\r\n.\r\n"), ("AUTH PLAIN ", "+OK in\r\n")],
        );
        login(conn, &auth("pw"), None).await.unwrap();
        use base64::Engine;
        let ir = base64::engine::general_purpose::STANDARD.encode("\0recent:u@example.com\0pw");
        assert_eq!(server.await.unwrap()[1], format!("AUTH PLAIN {ir}\r\n"));
        let (conn, server) = serve(
            "+OK ready\r\n",
            vec![
                ("CAPA", "+OK\r\nUSER\r\nSASL LOGIN\r\n.\r\n"),
                ("AUTH LOGIN\r\n", "+ VXNlcm5hbWU6\r\n"),
                ("cmVjZW50OnVAZXhhbXBsZS5jb20=\r\n", "+ UGFzc3dvcmQ6\r\n"),
                ("cMOkcw==\r\n", "+OK Logged in.\r\n"),
            ],
        );
        login(conn, &auth("päs"), None).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 4);
    }

    #[tokio::test]
    async fn xclient_carries_the_client_address_when_offered() {
        let client: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        let (conn, server) = serve(
            "+OK [XCLIENT] Dovecot ready.\r\n",
            vec![
                ("CAPA", CAPA_USER),
                ("XCLIENT ADDR=192.0.2.7 PORT=4242\r\n", "+OK Updated\r\n"),
                ("USER", "+OK\r\n"),
                ("PASS", "+OK in\r\n"),
            ],
        );
        login(conn, &auth("x"), Some(client)).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 4);
        let (conn, server) =
            serve("+OK ready\r\n", vec![("CAPA", CAPA_USER), ("USER", "+OK\r\n"), ("PASS", "+OK in\r\n")]);
        login(conn, &auth("x"), Some(client)).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 3, "no XCLIENT when not offered");
    }

    #[tokio::test]
    async fn a_token_needs_xoauth2_on_offer() {
        let token = UpstreamAuth::XOAuth2 { user: "u@example.com".into(), token: Secret::new("tok") };
        let (conn, _s) = serve("+OK ready\r\n", vec![("CAPA", "+OK\r\nUSER\r\nSASL PLAIN\r\n.\r\n")]);
        match login(conn, &token, None).await {
            Err(UpstreamError::NoMethod(e)) => assert_eq!(e.offered, "SASL PLAIN USER"),
            other => panic!("expected no method, got {:?}", other.map(|(_, i)| i)),
        }
        let (conn, server) = serve("+OK ready\r\n", vec![("CAPA", CAPA_USER), ("AUTH XOAUTH2 ", "+OK in\r\n")]);
        login(conn, &token, None).await.unwrap();
        assert_eq!(server.await.unwrap().len(), 2);
    }

    #[test]
    fn offers_come_from_capa() {
        let lines = |s: &[&str]| s.iter().map(|l| l.to_string()).collect::<Vec<_>>();
        assert_eq!(offer(Some(&lines(&["TOP", "user", "SASL plain LOGIN"]))), Offer::new(["PLAIN", "LOGIN"], true));
        assert_eq!(offer(Some(&lines(&["TOP"]))), Offer::new([], false));
        assert_eq!(offer(None), Offer { sasl: None, password_command: true });
    }

    #[tokio::test]
    async fn a_refused_pass_keeps_the_answer_and_a_bad_greeting_is_a_protocol_error() {
        let (conn, _s) = serve(
            "+OK ready\r\n",
            vec![("CAPA", CAPA_USER), ("USER", "+OK\r\n"), ("PASS", "-ERR [AUTH] Authentication failed.\r\n")],
        );
        match login(conn, &auth("x"), None).await {
            Err(UpstreamError::Refused(answer)) => assert!(answer.contains("[AUTH]"), "{answer}"),
            other => panic!("expected a refusal, got {:?}", other.map(|(_, i)| i)),
        }
        let (conn, _s) = serve("-ERR go away\r\n", vec![]);
        assert!(matches!(login(conn, &auth("x"), None).await, Err(UpstreamError::Protocol(_))));
    }
}
