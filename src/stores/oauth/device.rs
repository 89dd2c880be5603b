//! Enrolling a user's refresh token without a browser on the server: the device
//! authorization grant (RFC 8628). Postern asks the authorization server for a user code,
//! the admin (or the user) opens the verification page anywhere and enters it, and Postern
//! polls the token endpoint until the grant is approved, denied or expired.
//!
//! Reading the answers is pure ([`parse_authorization`], [`classify`]); the polling loop
//! only adds the waits.

use std::time::Duration;

use serde::Deserialize;

use super::TokenError;
use super::grant::Issued;
use crate::secret::Secret;

/// Polling interval when the server names none (RFC 8628 §3.2).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// What a `slow_down` answer adds to the interval (RFC 8628 §3.5).
pub const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// Shortest interval honoured, whatever the server says: polling is never a busy loop.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// Longest the grant is waited for, whatever the server says.
const MAX_WAIT: Duration = Duration::from_secs(30 * 60);
/// Longest user code, verification address or device code accepted.
const MAX_FIELD: usize = 2048;

/// The codes of one device authorization request.
#[derive(Debug)]
pub struct DeviceAuthorization {
    /// The page where the code is entered.
    pub verification_uri: String,
    /// The page with the code filled in, when the server offers one.
    pub verification_uri_complete: Option<String>,
    /// The code to enter there.
    pub user_code: String,
    /// How long the codes are valid.
    pub expires_in: Duration,
    /// How long to wait between polls.
    pub interval: Duration,
    /// The device code the token endpoint is polled with; a secret until it expires.
    pub(super) device_code: Secret,
}

/// Why no refresh token was enrolled.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The token source is not a refresh-token source, or has no device authorization URL.
    #[error(
        "device enrolment needs [oauth] source = \"refresh-token\" with device_authorization_url set to the authorization server's device endpoint"
    )]
    NotConfigured,
    /// The authorization server's answer to the device request is unusable.
    #[error("unusable answer from the device authorization endpoint: {0}")]
    BadAuthorization(String),
    /// Whoever entered the code refused the access.
    #[error("the access was denied at the verification page; nothing was stored")]
    Denied,
    /// The code was not entered in time.
    #[error("the code expired before it was entered; run the command again")]
    Expired,
    /// The grant was approved but came without a refresh token.
    #[error("the grant was approved but the server issued no refresh token: allow offline access for the client")]
    NoRefreshToken,
    /// The token endpoint could not be asked or answered with another error.
    #[error(transparent)]
    Token(#[from] TokenError),
}

#[derive(Deserialize)]
struct AuthorizationAnswer {
    device_code: Secret,
    user_code: String,
    verification_uri: Option<String>,
    /// Google's name for `verification_uri`.
    verification_url: Option<String>,
    verification_uri_complete: Option<String>,
    expires_in: u64,
    interval: Option<u64>,
}

/// Reads the device authorization endpoint's answer (RFC 8628 §3.2).
pub fn parse_authorization(status: u16, body: &[u8]) -> Result<DeviceAuthorization, DeviceError> {
    if status != 200 {
        let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
        return Err(DeviceError::BadAuthorization(format!("HTTP {status}: {}", crate::user::escape(&text))));
    }
    let answer: AuthorizationAnswer =
        serde_json::from_slice(body).map_err(|e| DeviceError::BadAuthorization(e.to_string()))?;
    let verification_uri = answer
        .verification_uri
        .or(answer.verification_url)
        .ok_or_else(|| DeviceError::BadAuthorization("no verification_uri".into()))?;
    let printable =
        |text: &str| !text.is_empty() && text.len() <= MAX_FIELD && !text.chars().any(crate::user::is_invisible);
    if !printable(&answer.user_code) || !printable(&verification_uri) || answer.device_code.expose().len() > MAX_FIELD {
        return Err(DeviceError::BadAuthorization("a code or address is empty, too long or not printable".into()));
    }
    let https = |uri: &str| uri.starts_with("https://");
    if !https(&verification_uri)
        || answer.verification_uri_complete.as_deref().is_some_and(|u| !https(u) || !printable(u))
    {
        return Err(DeviceError::BadAuthorization("the verification address is not an https:// address".into()));
    }
    Ok(DeviceAuthorization {
        verification_uri,
        verification_uri_complete: answer.verification_uri_complete,
        user_code: answer.user_code,
        expires_in: Duration::from_secs(answer.expires_in).min(MAX_WAIT),
        interval: answer.interval.map_or(DEFAULT_INTERVAL, Duration::from_secs).max(MIN_INTERVAL),
        device_code: answer.device_code,
    })
}

/// What one poll of the token endpoint said.
#[derive(Debug)]
pub enum Poll {
    /// Not entered yet: wait the interval and poll again.
    Pending,
    /// Polling too fast: add [`SLOW_DOWN_STEP`] to the interval.
    SlowDown,
    /// Approved: the tokens.
    Granted(Issued),
}

/// Classifies the token endpoint's answer to a device-code poll (RFC 8628 §3.5).
pub fn classify(answer: Result<Issued, TokenError>) -> Result<Poll, DeviceError> {
    match answer {
        Ok(issued) => Ok(Poll::Granted(issued)),
        Err(TokenError::Rejected { error, .. }) if error == "authorization_pending" => Ok(Poll::Pending),
        Err(TokenError::Rejected { error, .. }) if error == "slow_down" => Ok(Poll::SlowDown),
        Err(TokenError::Rejected { error, .. }) if error == "access_denied" => Err(DeviceError::Denied),
        Err(TokenError::Rejected { error, .. }) if error == "expired_token" => Err(DeviceError::Expired),
        Err(other) => Err(DeviceError::Token(other)),
    }
}

/// Polls with `poll` every interval until the grant is decided or the codes expire, and
/// returns the refresh token. Waits use tokio's clock.
pub async fn wait_for_grant<F, Fut>(authorization: &DeviceAuthorization, mut poll: F) -> Result<Secret, DeviceError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Issued, TokenError>>,
{
    let deadline = tokio::time::Instant::now() + authorization.expires_in;
    let mut interval = authorization.interval;
    loop {
        tokio::time::sleep(interval).await;
        if tokio::time::Instant::now() >= deadline {
            return Err(DeviceError::Expired);
        }
        match classify(poll().await)? {
            Poll::Pending => {}
            Poll::SlowDown => interval += SLOW_DOWN_STEP,
            Poll::Granted(issued) => return issued.refresh_token.ok_or(DeviceError::NoRefreshToken),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rejected(error: &str) -> Result<Issued, TokenError> {
        Err(TokenError::Rejected {
            url: "https://t/token".into(),
            status: 400,
            error: error.into(),
            description: String::new(),
        })
    }

    fn granted(refresh: Option<&str>) -> Result<Issued, TokenError> {
        Ok(Issued {
            token: Secret::new("at"),
            lifetime: Duration::from_secs(60),
            refresh_token: refresh.map(Secret::new),
        })
    }

    fn authorization(interval: u64, expires_in: u64) -> DeviceAuthorization {
        let body = serde_json::json!({
            "device_code": "dc", "user_code": "ABCD-EFGH", "verification_uri": "https://as.example/device",
            "expires_in": expires_in, "interval": interval,
        });
        parse_authorization(200, body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn the_authorization_answer_is_checked() {
        let a = authorization(3, 600);
        assert_eq!(
            (a.user_code.as_str(), a.interval, a.expires_in),
            ("ABCD-EFGH", Duration::from_secs(3), Duration::from_secs(600))
        );
        let google = br#"{"device_code":"d","user_code":"U","verification_url":"https://www.google.com/device","expires_in":1800}"#;
        let a = parse_authorization(200, google).unwrap();
        assert_eq!((a.verification_uri.as_str(), a.interval), ("https://www.google.com/device", DEFAULT_INTERVAL));
        for bad in [
            &br#"{"device_code":"d","user_code":"U","expires_in":60}"#[..],
            br#"{"device_code":"d","user_code":"U","verification_uri":"http://plain/device","expires_in":60}"#,
            br#"{"device_code":"d","user_code":"U\u202e","verification_uri":"https://a/d","expires_in":60}"#,
            br#"{"device_code":"d","user_code":"","verification_uri":"https://a/d","expires_in":60}"#,
            b"not json",
        ] {
            assert!(parse_authorization(200, bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        assert!(matches!(
            parse_authorization(400, b"{\"error\":\"invalid_client\"}"),
            Err(DeviceError::BadAuthorization(_))
        ));
        assert_eq!(authorization(0, 60).interval, MIN_INTERVAL, "never a busy loop");
    }

    #[tokio::test(start_paused = true)]
    async fn pending_and_slow_down_wait_then_the_refresh_token_is_returned() {
        let mut answers =
            vec![rejected("authorization_pending"), rejected("slow_down"), granted(Some("rt"))].into_iter();
        let started = tokio::time::Instant::now();
        let token =
            wait_for_grant(&authorization(2, 600), || std::future::ready(answers.next().unwrap())).await.unwrap();
        assert_eq!(token.expose(), "rt");
        assert_eq!(started.elapsed(), Duration::from_secs(2 + 2 + 7), "2 s, 2 s, then 2 + 5 s after slow_down");
    }

    #[tokio::test(start_paused = true)]
    async fn denial_expiry_and_a_grant_without_refresh_token_are_errors() {
        let once = |a: Result<Issued, TokenError>| {
            let mut a = Some(a);
            move || std::future::ready(a.take().unwrap_or_else(|| rejected("authorization_pending")))
        };
        assert!(matches!(
            wait_for_grant(&authorization(1, 60), once(rejected("access_denied"))).await,
            Err(DeviceError::Denied)
        ));
        assert!(matches!(
            wait_for_grant(&authorization(1, 60), once(rejected("expired_token"))).await,
            Err(DeviceError::Expired)
        ));
        assert!(matches!(
            wait_for_grant(&authorization(1, 60), once(granted(None))).await,
            Err(DeviceError::NoRefreshToken)
        ));
        let never = || std::future::ready(rejected("authorization_pending"));
        assert!(
            matches!(wait_for_grant(&authorization(5, 12), never).await, Err(DeviceError::Expired)),
            "gives up at expiry"
        );
        assert!(matches!(
            wait_for_grant(&authorization(1, 60), once(rejected("invalid_client"))).await,
            Err(DeviceError::Token(TokenError::Rejected { .. }))
        ));
    }
}
