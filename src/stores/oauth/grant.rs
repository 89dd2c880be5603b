//! One request to an OAuth2 token endpoint (RFC 6749 §5) and the reading of its answer,
//! shared by every grant type.

use std::time::Duration;

use serde::Deserialize;

use super::TokenError;
use super::http::{Form, HttpsClient, HttpsUrl};
use crate::secret::Secret;

/// Lifetime assumed when the endpoint does not say (`expires_in` is only recommended).
const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Longest lifetime believed, so a bogus answer cannot pin a token in the cache.
const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Longest access token accepted (Microsoft's JWTs run to a few kilobytes).
const MAX_TOKEN_LEN: usize = 16 * 1024;

/// A token the endpoint issued.
#[derive(Debug)]
pub struct Issued {
    /// The access token.
    pub token: Secret,
    /// How long it is valid from now.
    pub lifetime: Duration,
    /// A new refresh token, when the endpoint rotated it.
    pub refresh_token: Option<Secret>,
}

#[derive(Deserialize)]
struct Success {
    access_token: Secret,
    token_type: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<Secret>,
}

#[derive(Deserialize)]
struct Failure {
    error: String,
    error_description: Option<String>,
}

/// Posts `form` to `url` and reads the token from the answer.
pub async fn request(client: &HttpsClient, url: &HttpsUrl, form: Form) -> Result<Issued, TokenError> {
    let response =
        client.post_form(url, form).await.map_err(|source| TokenError::Unreachable { url: url.to_string(), source })?;
    parse(url, response.status, &response.body)
}

/// Reads a token endpoint's answer.
fn parse(url: &HttpsUrl, status: u16, body: &[u8]) -> Result<Issued, TokenError> {
    let bad = |message: String| TokenError::BadResponse { url: url.to_string(), message };
    if status != 200 {
        return Err(match serde_json::from_slice::<Failure>(body) {
            Ok(f) => TokenError::Rejected {
                url: url.to_string(),
                status,
                error: printable(&f.error, 80),
                description: f.error_description.map(|d| printable(&d, 300)).unwrap_or_default(),
            },
            Err(_) => TokenError::Status { url: url.to_string(), status },
        });
    }
    // serde_json's messages never quote string values of the expected type, so no token leaks here.
    let success: Success = serde_json::from_slice(body).map_err(|e| bad(format!("not a token answer: {e}")))?;
    if let Some(kind) = &success.token_type
        && !kind.eq_ignore_ascii_case("bearer")
    {
        return Err(bad(format!("token_type is {:?}, not Bearer", printable(kind, 40))));
    }
    let token = success.access_token;
    if token.is_empty() || token.expose().len() > MAX_TOKEN_LEN || !token.expose().bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(bad("access_token is empty, too long or not printable ASCII".to_owned()));
    }
    let lifetime = match success.expires_in {
        None => DEFAULT_LIFETIME,
        Some(serde_json::Value::Number(n)) => {
            n.as_u64().map(Duration::from_secs).ok_or_else(|| bad("expires_in is not a whole number".into()))?
        }
        // Some endpoints (Microsoft's v1) send it as a string.
        Some(serde_json::Value::String(s)) => {
            s.parse().map(Duration::from_secs).map_err(|_| bad("expires_in is not a whole number".into()))?
        }
        Some(_) => return Err(bad("expires_in is not a number".into())),
    };
    if lifetime.is_zero() {
        return Err(bad("expires_in is 0".into()));
    }
    let refresh_token = success.refresh_token.filter(|r| !r.is_empty());
    Ok(Issued { token, lifetime: lifetime.min(MAX_LIFETIME), refresh_token })
}

/// `text` without control characters, cut to `max` characters, for error messages.
fn printable(text: &str, max: usize) -> String {
    text.chars().filter(|c| !c.is_control()).take(max).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url() -> HttpsUrl {
        HttpsUrl::parse("https://login.example/token").unwrap()
    }

    #[test]
    fn success_answers_give_token_lifetime_and_rotation() {
        let issued =
            parse(&url(), 200, br#"{"access_token":"ya29.abc","token_type":"Bearer","expires_in":3599}"#).unwrap();
        assert_eq!(issued.token.expose(), "ya29.abc");
        assert_eq!(issued.lifetime, Duration::from_secs(3599));
        assert!(issued.refresh_token.is_none());
        let issued =
            parse(&url(), 200, br#"{"access_token":"t","token_type":"bearer","expires_in":"60","refresh_token":"r2"}"#)
                .unwrap();
        assert_eq!(issued.lifetime, Duration::from_secs(60));
        assert_eq!(issued.refresh_token.unwrap().expose(), "r2");
        assert_eq!(parse(&url(), 200, br#"{"access_token":"t"}"#).unwrap().lifetime, DEFAULT_LIFETIME);
    }

    #[test]
    fn errors_name_the_oauth_error_but_never_the_token() {
        let err = parse(&url(), 400, br#"{"error":"invalid_grant","error_description":"Token has been\nrevoked."}"#)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "token endpoint https://login.example/token refused the request (HTTP 400): invalid_grant: Token has beenrevoked."
        );
        let err = parse(&url(), 503, b"<html>down</html>").unwrap_err();
        assert!(matches!(err, TokenError::Status { status: 503, .. }), "{err}");
        for body in [
            &br#"{"access_token":"secret-tok","token_type":"mac"}"#[..],
            br#"{"access_token":"secret tok"}"#,
            br#"{"access_token":"secret-tok","expires_in":0}"#,
            br#"{"access_token":"secret-tok","expires_in":-5}"#,
            br#"{"token":"secret-tok"}"#,
        ] {
            let err = parse(&url(), 200, body).unwrap_err().to_string();
            assert!(err.contains("unusable answer") && !err.contains("secret"), "{err}");
        }
    }
}
