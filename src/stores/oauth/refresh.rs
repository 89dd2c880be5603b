//! Per-user refresh tokens (RFC 6749 §6), for accounts where delegation is not available:
//! each user's refresh token is kept in the vault and traded here for access tokens. When
//! the endpoint rotates it, the caller writes the new one back to the vault.

use std::path::Path;

use super::device::{self, DeviceAuthorization, DeviceError};
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
    device_url: Option<HttpsUrl>,
}

impl Client {
    /// A client at `token_url`; `secret_file` holds the client secret, if the client has one;
    /// `device_url` is the device authorization endpoint, for enrolling users (RFC 8628).
    pub fn load(
        token_url: &str,
        client_id: &str,
        secret_file: Option<&Path>,
        scope: Option<&str>,
        device_url: Option<&str>,
    ) -> Result<Self, SetupError> {
        let url = |key: &'static str, text: &str| {
            HttpsUrl::parse(text).map_err(|e| SetupError::Config { key, message: e.to_string() })
        };
        Ok(Self {
            client_id: client_id.to_owned(),
            client_secret: secret_file.map(read_secret_file).transpose()?,
            token_url: url("token_url", token_url)?,
            scope: scope.map(str::to_owned),
            device_url: device_url.map(|u| url("device_authorization_url", u)).transpose()?,
        })
    }

    /// Starts a device authorization (RFC 8628 §3.1): the codes to show whoever approves.
    pub async fn start_device(&self, client: &HttpsClient) -> Result<DeviceAuthorization, DeviceError> {
        let url = self.device_url.as_ref().ok_or(DeviceError::NotConfigured)?;
        let mut form = Form::new().field("client_id", &self.client_id);
        if let Some(scope) = &self.scope {
            form = form.field("scope", scope);
        }
        let response = client
            .post_form(url, form)
            .await
            .map_err(|source| DeviceError::Token(TokenError::Unreachable { url: url.to_string(), source }))?;
        device::parse_authorization(response.status, &response.body)
    }

    /// Polls the token endpoint once for `authorization` (RFC 8628 §3.4).
    pub async fn poll_device(
        &self,
        client: &HttpsClient,
        authorization: &DeviceAuthorization,
    ) -> Result<Issued, TokenError> {
        let mut form = Form::new()
            .field("grant_type", "urn:ietf:params:oauth:grant-type:device_code")
            .field("device_code", authorization.device_code.expose())
            .field("client_id", &self.client_id);
        if let Some(secret) = &self.client_secret {
            form = form.field("client_secret", secret.expose());
        }
        grant::request(client, &self.token_url, form).await
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
