//! Per-user refresh tokens (RFC 6749 §6), for accounts where delegation is not available:
//! each user's refresh token is kept in the vault and traded here for access tokens. When
//! the endpoint rotates it, the caller writes the new one back to the vault.

use std::path::Path;

use super::grant::{self, Issued};
use super::http::{Form, HttpsClient, HttpsUrl};
use super::{SetupError, TokenError, read_secret_file};
use crate::secret::Secret;

/// The OAuth2 client the refresh tokens were issued to.
#[derive(Debug)]
pub struct Client {
    client_id: String,
    client_secret: Option<Secret>,
    token_url: HttpsUrl,
    scope: Option<String>,
}

impl Client {
    /// A client at `token_url`; `secret_file` holds the client secret, if the client has one.
    pub fn load(
        token_url: &str,
        client_id: &str,
        secret_file: Option<&Path>,
        scope: Option<&str>,
    ) -> Result<Self, SetupError> {
        let token_url =
            HttpsUrl::parse(token_url).map_err(|e| SetupError::Config { key: "token_url", message: e.to_string() })?;
        Ok(Self {
            client_id: client_id.to_owned(),
            client_secret: secret_file.map(read_secret_file).transpose()?,
            token_url,
            scope: scope.map(str::to_owned),
        })
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &HttpsUrl {
        &self.token_url
    }

    /// Trades `refresh_token` for an access token (and maybe a new refresh token).
    pub async fn fetch(&self, client: &HttpsClient, refresh_token: &Secret) -> Result<Issued, TokenError> {
        let mut form = Form::new()
            .field("grant_type", "refresh_token")
            .field("refresh_token", refresh_token.expose())
            .field("client_id", &self.client_id);
        if let Some(secret) = &self.client_secret {
            form = form.field("client_secret", secret.expose());
        }
        if let Some(scope) = &self.scope {
            form = form.field("scope", scope);
        }
        grant::request(client, &self.token_url, form).await
    }
}
