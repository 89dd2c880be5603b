//! Google service accounts with domain-wide delegation: for each mailbox, a JWT signed with
//! the service account's key (issuer the service account, subject the mailbox) is traded
//! for an access token with the JWT-bearer grant (RFC 7523).

use std::path::Path;

use serde::Deserialize;

use super::grant::{self, Issued};
use super::http::{Form, HttpsClient, HttpsUrl};
use super::jwt::{Claims, RsaSigner};
use super::{SetupError, TokenError, read_private_file};
use crate::secret::Secret;

/// The grant type of RFC 7523.
const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
/// Full IMAP, POP3 and SMTP access, the only scope Gmail accepts for XOAUTH2.
pub const DEFAULT_SCOPE: &str = "https://mail.google.com/";
/// Google's token endpoint, when the key file does not name one.
const DEFAULT_TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// Lifetime of each assertion; Google accepts at most one hour.
const ASSERTION_LIFETIME_SECS: u64 = 3600;

/// The fields of a service account's JSON key file that Postern uses.
#[derive(Deserialize)]
struct KeyFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    client_email: String,
    private_key: Secret,
    private_key_id: Option<String>,
    token_uri: Option<String>,
}

/// A loaded service account.
#[derive(Debug)]
pub struct ServiceAccount {
    client_email: String,
    signer: RsaSigner,
    token_url: HttpsUrl,
    scope: String,
}

impl ServiceAccount {
    /// Loads the JSON key file at `path` (refused if group or others may read it).
    /// `token_url` overrides the file's `token_uri`; `scope` the default scope.
    pub fn load(path: &Path, token_url: Option<&str>, scope: Option<&str>) -> Result<Self, SetupError> {
        let what = "service account key file";
        let text = read_private_file(path, what)?;
        let file_error = |message: String| SetupError::File { what, path: path.to_owned(), message };
        let key: KeyFile = serde_json::from_str(text.expose())
            .map_err(|e| file_error(format!("not a service account JSON key ({e})")))?;
        if let Some(kind) = &key.kind
            && kind != "service_account"
        {
            return Err(file_error(format!("\"type\" is {kind:?}, expected \"service_account\"")));
        }
        if key.client_email.is_empty() || key.client_email.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(file_error("\"client_email\" is empty or malformed".into()));
        }
        let signer = RsaSigner::from_pkcs8_pem(key.private_key.expose(), key.private_key_id.clone())
            .map_err(|e| file_error(format!("\"private_key\": {e}")))?;
        let (url_text, key_name) = match token_url {
            Some(url) => (url.to_owned(), "oauth.token_url"),
            None => (key.token_uri.clone().unwrap_or_else(|| DEFAULT_TOKEN_URI.to_owned()), "token_uri"),
        };
        let token_url = HttpsUrl::parse(&url_text).map_err(|e| file_error(format!("{key_name}: {e}")))?;
        Ok(Self { client_email: key.client_email, signer, token_url, scope: scope.unwrap_or(DEFAULT_SCOPE).to_owned() })
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &HttpsUrl {
        &self.token_url
    }

    /// Asks for a token acting as `mailbox`.
    pub async fn fetch(&self, client: &HttpsClient, mailbox: &str) -> Result<Issued, TokenError> {
        let iat = super::unix_now();
        let claims = Claims {
            iss: &self.client_email,
            sub: mailbox,
            scope: &self.scope,
            aud: self.token_url.as_str(),
            iat,
            exp: iat + ASSERTION_LIFETIME_SECS,
        };
        let assertion = self.signer.sign(&claims).map_err(|e| TokenError::Sign(e.to_string()))?;
        let form = Form::new().field("grant_type", JWT_BEARER).field("assertion", assertion.expose());
        grant::request(client, &self.token_url, form).await
    }
}
