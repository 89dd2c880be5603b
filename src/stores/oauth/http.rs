//! A small HTTPS client for token endpoints (and alert webhooks): one form or JSON POST per
//! connection, over TLS verified with the system roots (plus an optional extra CA), bounded
//! in time and size.
//!
//! Token requests are rare (one per user and hour at most), so connections are not pooled.
//! Request bodies carry credentials: they are built in wiped buffers and handed to hyper
//! without a copy; the response body is copied into a wiped buffer as soon as it is read.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::Request;
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST, USER_AGENT};
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use zeroize::Zeroizing;

/// Largest token endpoint answer read, in bytes.
pub const MAX_RESPONSE: usize = 64 * 1024;

/// Why an HTTPS exchange did not produce a response.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpError {
    /// The URL is not an absolute `https://` URL Postern can use.
    #[error("invalid URL {url:?}: {message}")]
    Url {
        /// The URL as configured.
        url: String,
        /// What is wrong.
        message: String,
    },
    /// TCP connect failed.
    #[error("cannot connect: {0}")]
    Connect(String),
    /// The TLS handshake failed (untrusted or mismatched certificate, protocol error).
    #[error("TLS failed: {0}")]
    Tls(String),
    /// The HTTP exchange failed midway.
    #[error("HTTP exchange failed: {0}")]
    Exchange(String),
    /// No complete answer within the timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The answer is larger than [`MAX_RESPONSE`].
    #[error("answer larger than {MAX_RESPONSE} bytes")]
    TooLarge,
}

/// An absolute `https://` URL, checked once at startup.
#[derive(Clone)]
pub struct HttpsUrl {
    text: String,
    host: String,
    port: u16,
    authority: String,
    path: String,
    server_name: ServerName<'static>,
}

impl HttpsUrl {
    /// Parses `text`, which must be `https://host[:port]/path` without user information.
    pub fn parse(text: &str) -> Result<Self, HttpError> {
        let bad = |message: &str| HttpError::Url { url: text.to_owned(), message: message.to_owned() };
        let uri: hyper::Uri = text.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must start with https://"));
        }
        let authority = uri.authority().ok_or_else(|| bad("has no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("must not contain a user name or password"));
        }
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        let server_name =
            ServerName::try_from(host.clone()).map_err(|_| bad("host is not a valid DNS name or IP address"))?;
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
        Ok(Self {
            text: text.to_owned(),
            port: authority.port_u16().unwrap_or(443),
            authority: authority.as_str().to_owned(),
            host,
            path,
            server_name,
        })
    }

    /// The URL as given.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for HttpsUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "HttpsUrl({})", self.text)
    }
}

/// An `application/x-www-form-urlencoded` body, built in a buffer that is wiped on drop.
#[derive(Default)]
pub struct Form(Zeroizing<Vec<u8>>);

impl Form {
    /// An empty form.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends `name=value`, both percent-encoded.
    pub fn field(mut self, name: &str, value: &str) -> Self {
        if !self.0.is_empty() {
            self.0.push(b'&');
        }
        encode_into(&mut self.0, name);
        self.0.push(b'=');
        encode_into(&mut self.0, value);
        self
    }
}

fn encode_into(out: &mut Vec<u8>, value: &str) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in value.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// A response: its status and body (wiped on drop; it may hold a token).
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The body, at most [`MAX_RESPONSE`] bytes.
    pub body: Zeroizing<Vec<u8>>,
}

/// Posts forms to token endpoints.
pub struct HttpsClient {
    connector: TlsConnector,
    timeout: Duration,
}

impl HttpsClient {
    /// A client verifying servers with `tls`, giving each whole exchange `timeout`.
    pub fn new(tls: Arc<ClientConfig>, timeout: Duration) -> Self {
        Self { connector: TlsConnector::from(tls), timeout }
    }

    /// Posts `form` to `url` and reads the whole answer, within the timeout.
    pub async fn post_form(&self, url: &HttpsUrl, form: Form) -> Result<Response, HttpError> {
        let body = Bytes::from_owner(form.0);
        tokio::time::timeout(self.timeout, self.exchange(url, "application/x-www-form-urlencoded", body))
            .await
            .unwrap_or(Err(HttpError::Timeout(self.timeout)))
    }

    /// Posts the JSON document `body` to `url` and reads the whole answer, within the
    /// timeout.
    pub async fn post_json(&self, url: &HttpsUrl, body: Bytes) -> Result<Response, HttpError> {
        tokio::time::timeout(self.timeout, self.exchange(url, "application/json", body))
            .await
            .unwrap_or(Err(HttpError::Timeout(self.timeout)))
    }

    async fn exchange(&self, url: &HttpsUrl, content_type: &'static str, body: Bytes) -> Result<Response, HttpError> {
        let tcp =
            TcpStream::connect((url.host.as_str(), url.port)).await.map_err(|e| HttpError::Connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let tls =
            self.connector.connect(url.server_name.clone(), tcp).await.map_err(|e| HttpError::Tls(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| HttpError::Exchange(e.to_string()))?;
        let request = Request::post(url.path.as_str())
            .header(HOST, url.authority.as_str())
            .header(CONTENT_TYPE, content_type)
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, concat!("postern/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(body))
            .map_err(|e| HttpError::Exchange(e.to_string()))?;
        let exchange = async move {
            let response = sender.send_request(request).await.map_err(|e| HttpError::Exchange(e.to_string()))?;
            let status = response.status().as_u16();
            let collected = Limited::new(response.into_body(), MAX_RESPONSE).collect().await.map_err(|e| {
                if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    HttpError::TooLarge
                } else {
                    HttpError::Exchange(e.to_string())
                }
            })?;
            let bytes = collected.to_bytes();
            Ok(Response { status, body: Zeroizing::new(bytes.to_vec()) })
            // `sender` is dropped here, which lets `connection` finish.
        };
        let (result, _) = tokio::join!(exchange, connection);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_https_without_user_info() {
        let url = HttpsUrl::parse("https://oauth2.googleapis.com/token").unwrap();
        assert_eq!((url.host.as_str(), url.port, url.path.as_str()), ("oauth2.googleapis.com", 443, "/token"));
        let url = HttpsUrl::parse("https://127.0.0.1:8443/t/o?x=1").unwrap();
        assert_eq!((url.port, url.path.as_str(), url.authority.as_str()), (8443, "/t/o?x=1", "127.0.0.1:8443"));
        assert_eq!(HttpsUrl::parse("https://localhost").unwrap().path, "/");
        for bad in ["http://example.com/token", "https://user:pw@example.com/", "example.com/token", "https:///x"] {
            assert!(HttpsUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn form_fields_are_percent_encoded() {
        let form =
            Form::new().field("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer").field("k y", "a+b/c=d&é~");
        assert_eq!(
            std::str::from_utf8(&form.0).unwrap(),
            "grant_type=urn%3Aietf%3Aparams%3Aoauth%3Agrant-type%3Ajwt-bearer&k%20y=a%2Bb%2Fc%3Dd%26%C3%A9~"
        );
    }
}
