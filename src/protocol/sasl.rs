//! SASL mechanisms: decoding what clients send (PLAIN, LOGIN) and encoding what Postern
//! sends upstream (PLAIN, XOAUTH2). Placeholder until the decoders land.

use crate::secret::Secret;

/// Why a SASL response could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SaslError {
    /// The response is not valid base64.
    #[error("invalid base64 in SASL response")]
    InvalidBase64,
    /// The decoded response does not have the mechanism's shape.
    #[error("malformed SASL response")]
    Malformed,
}

/// A decoded SASL PLAIN response (RFC 4616).
#[derive(Debug)]
pub struct PlainResponse {
    /// Authorization identity; empty when the client did not give one.
    pub authzid: String,
    /// Authentication identity: the user name.
    pub authcid: String,
    /// The password.
    pub password: Secret,
}

/// Decodes a base64 SASL PLAIN response.
pub fn decode_plain(_b64: &[u8]) -> Result<PlainResponse, SaslError> {
    Err(SaslError::Malformed)
}

/// Decodes one base64 line of SASL LOGIN (user name or password) into UTF-8 text.
pub fn decode_login_field(_b64: &[u8]) -> Result<Secret, SaslError> {
    Err(SaslError::Malformed)
}

/// Base64 SASL PLAIN initial response for `user` and `password`, no authzid.
pub fn encode_plain(_user: &str, _password: &str) -> String {
    String::new()
}

/// Base64 SASL XOAUTH2 initial response for `user` and bearer `token`.
pub fn encode_xoauth2(_user: &str, _token: &str) -> String {
    String::new()
}
