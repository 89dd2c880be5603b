//! POP3 login upstream: greeting, `USER`/`PASS` or `AUTH XOAUTH2`.

use tokio::io::{AsyncRead, AsyncWrite};

use super::{Conn, UpstreamAuth, UpstreamError, check_line_safe, excerpt, refused};
use crate::protocol::{UpstreamInfo, sasl};

pub(super) async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    auth: &UpstreamAuth,
) -> Result<(Conn<S>, UpstreamInfo), UpstreamError> {
    let greeting = conn.read_line().await?;
    if !greeting.starts_with("+OK") {
        return Err(UpstreamError::Protocol(excerpt(&greeting)));
    }
    let mut challenge = None;
    let answer = match auth {
        UpstreamAuth::Password { user, password } => {
            check_line_safe("upstream user name", user)?;
            check_line_safe("upstream password", password.expose())?;
            conn.send(format!("USER {user}\r\n").as_bytes()).await?;
            let answer = conn.read_line().await?;
            if !answer.starts_with("+OK") {
                return Err(UpstreamError::Refused(excerpt(&answer)));
            }
            let mut pass = Vec::with_capacity(password.expose().len() + 7);
            pass.extend_from_slice(b"PASS ");
            pass.extend_from_slice(password.expose().as_bytes());
            pass.extend_from_slice(b"\r\n");
            let sent = conn.send(&pass).await;
            zeroize::Zeroize::zeroize(&mut pass);
            sent?;
            conn.read_line().await?
        }
        UpstreamAuth::XOAuth2 { user, token } => {
            check_line_safe("upstream user name", user)?;
            let ir = zeroize::Zeroizing::new(sasl::encode_xoauth2(user, token.expose()));
            let command = zeroize::Zeroizing::new(format!("AUTH XOAUTH2 {}\r\n", ir.as_str()));
            conn.send(command.as_bytes()).await?;
            let mut answer = conn.read_line().await?;
            if answer.starts_with('+') && !answer.starts_with("+OK") {
                challenge = Some(answer[1..].trim().to_owned());
                conn.send(b"\r\n").await?;
                answer = conn.read_line().await?;
            }
            answer
        }
    };
    if !answer.starts_with("+OK") {
        return Err(refused(&answer, challenge.as_deref()));
    }
    Ok((conn, UpstreamInfo::default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::upstream::script::serve;

    fn auth(password: &str) -> UpstreamAuth {
        UpstreamAuth::Password { user: "recent:u@example.com".into(), password: Secret::new(password) }
    }

    #[tokio::test]
    async fn user_pass_logs_in_with_the_whole_password() {
        let (conn, server) =
            serve("+OK ready\r\n", vec![("USER recent:u@example.com", "+OK\r\n"), ("PASS a b \"c\"", "+OK in\r\n")]);
        login(conn, &auth("a b \"c\"")).await.unwrap();
        assert_eq!(server.await.unwrap()[1], "PASS a b \"c\"\r\n");
    }

    #[tokio::test]
    async fn a_refused_pass_keeps_the_answer_and_a_bad_greeting_is_a_protocol_error() {
        let (conn, _s) =
            serve("+OK ready\r\n", vec![("USER", "+OK\r\n"), ("PASS", "-ERR [AUTH] Authentication failed.\r\n")]);
        match login(conn, &auth("x")).await {
            Err(UpstreamError::Refused(answer)) => assert!(answer.contains("[AUTH]"), "{answer}"),
            other => panic!("expected a refusal, got {:?}", other.map(|(_, i)| i)),
        }
        let (conn, _s) = serve("-ERR go away\r\n", vec![]);
        assert!(matches!(login(conn, &auth("x")).await, Err(UpstreamError::Protocol(_))));
    }
}
