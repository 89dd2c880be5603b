//! Microsoft 365 application credentials: the client-credentials grant at the tenant's
//! token endpoint gives one token for every mailbox the application was granted in
//! Exchange Online; the mailbox is named only in the XOAUTH2 exchange.

use std::path::Path;

use super::grant::{self, Issued};
use super::http::{Form, HttpsClient, HttpsUrl};
use super::{SetupError, TokenError, read_secret_file};
use crate::secret::Secret;

/// IMAP.AccessAsApp, POP.AccessAsApp and SMTP.SendAsApp, as granted to the application.
pub const DEFAULT_SCOPE: &str = "https://outlook.office365.com/.default";

/// A Microsoft Entra application allowed to open mailboxes.
#[derive(Debug)]
pub struct App {
    client_id: String,
    client_secret: Secret,
    token_url: HttpsUrl,
    scope: String,
}

impl App {
    /// Reads the client secret from `secret_file` (refused if group or others may read it).
    /// `token_url` overrides the tenant's v2.0 endpoint.
    pub fn load(
        tenant: Option<&str>,
        client_id: &str,
        secret_file: &Path,
        token_url: Option<&str>,
        scope: Option<&str>,
    ) -> Result<Self, SetupError> {
        let url_text = match (token_url, tenant) {
            (Some(url), _) => url.to_owned(),
            (None, Some(tenant)) => format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token"),
            (None, None) => {
                return Err(SetupError::Config {
                    key: "tenant",
                    message: "required with source = \"microsoft\"".into(),
                });
            }
        };
        let token_url =
            HttpsUrl::parse(&url_text).map_err(|e| SetupError::Config { key: "token_url", message: e.to_string() })?;
        Ok(Self {
            client_id: client_id.to_owned(),
            client_secret: read_secret_file(secret_file)?,
            token_url,
            scope: scope.unwrap_or(DEFAULT_SCOPE).to_owned(),
        })
    }

    /// The token endpoint.
    pub fn token_url(&self) -> &HttpsUrl {
        &self.token_url
    }

    /// Asks for the application's token.
    pub async fn fetch(&self, client: &HttpsClient) -> Result<Issued, TokenError> {
        let form = Form::new()
            .field("grant_type", "client_credentials")
            .field("client_id", &self.client_id)
            .field("client_secret", self.client_secret.expose())
            .field("scope", &self.scope);
        grant::request(client, &self.token_url, form).await
    }
}
