//! POP3 login upstream: greeting, `USER`/`PASS` or `AUTH XOAUTH2`.

use super::{Conn, LoggedIn, UpstreamAuth, UpstreamError, UpstreamStream, check_line_safe, excerpt, refused};
use crate::protocol::{UpstreamInfo, sasl};

pub(super) async fn login(mut conn: Conn<UpstreamStream>, auth: &UpstreamAuth) -> Result<LoggedIn, UpstreamError> {
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
    let (stream, leftover) = conn.into_parts();
    Ok(LoggedIn { stream, info: UpstreamInfo::default(), leftover })
}
