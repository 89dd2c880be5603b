//! RS256 JSON Web Tokens (RFC 7519), as the JWT-bearer grant (RFC 7523) needs them: the
//! header and claims as JSON, each base64url without padding, signed with RSASSA-PKCS1-v1_5
//! over SHA-256 by the service account's key.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;
use serde::Serialize;
use zeroize::Zeroizing;

use crate::secret::Secret;

/// Why a key could not be loaded or a JWT signed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// The key is not a PEM PKCS#8 RSA private key.
    #[error("not a PEM PKCS#8 RSA private key: {0}")]
    Key(String),
    /// Signing failed (aws-lc reports no detail).
    #[error("RSA signing failed")]
    Sign,
}

/// The claims of a JWT-bearer grant assertion.
#[derive(Debug, Serialize)]
pub struct Claims<'a> {
    /// Issuer: the service account's address.
    pub iss: &'a str,
    /// Subject: the mailbox to act for.
    pub sub: &'a str,
    /// Space-separated scopes asked for.
    pub scope: &'a str,
    /// Audience: the token endpoint.
    pub aud: &'a str,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Expires at, seconds since the Unix epoch.
    pub exp: u64,
}

#[derive(Serialize)]
struct Header<'a> {
    alg: &'static str,
    typ: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kid: Option<&'a str>,
}

/// An RSA private key that signs JWTs. aws-lc wipes the key material when it is dropped.
pub struct RsaSigner {
    key: RsaKeyPair,
    key_id: Option<String>,
    rng: SystemRandom,
}

impl std::fmt::Debug for RsaSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaSigner").field("key_id", &self.key_id).finish_non_exhaustive()
    }
}

impl RsaSigner {
    /// Loads a `-----BEGIN PRIVATE KEY-----` PEM; `key_id` goes into the JWT header (`kid`).
    pub fn from_pkcs8_pem(pem: &str, key_id: Option<String>) -> Result<Self, JwtError> {
        let der = Zeroizing::new(
            PrivatePkcs8KeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| JwtError::Key(e.to_string()))?,
        );
        let key = RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()).map_err(|e| JwtError::Key(e.to_string()))?;
        Ok(Self { key, key_id, rng: SystemRandom::new() })
    }

    /// The signed JWT `header.claims.signature`. It is a credential until it expires.
    pub fn sign(&self, claims: &Claims<'_>) -> Result<Secret, JwtError> {
        let header = Header { alg: "RS256", typ: "JWT", kid: self.key_id.as_deref() };
        let header = serde_json::to_vec(&header).map_err(|_| JwtError::Sign)?;
        let claims = serde_json::to_vec(claims).map_err(|_| JwtError::Sign)?;
        let mut jwt = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(claims));
        let mut signature = vec![0u8; self.key.public_modulus_len()];
        self.key.sign(&RSA_PKCS1_SHA256, &self.rng, jwt.as_bytes(), &mut signature).map_err(|_| JwtError::Sign)?;
        jwt.push('.');
        jwt.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(Secret::new(jwt))
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};

    use super::*;

    fn pem_of(key: &RsaKeyPair) -> String {
        let der = key.as_der().unwrap();
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        let lines: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
        format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n"))
    }

    #[test]
    fn signed_jwt_verifies_with_the_public_key_and_carries_the_claims() {
        let key = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let signer = RsaSigner::from_pkcs8_pem(&pem_of(&key), Some("kid-1".into())).unwrap();
        let claims =
            Claims { iss: "sa@p.iam", sub: "a@example.com", scope: "s", aud: "https://t/token", iat: 10, exp: 3610 };
        let jwt = signer.sign(&claims).unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        assert_eq!(header, serde_json::json!({"alg": "RS256", "typ": "JWT", "kid": "kid-1"}));
        let body: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(body["sub"], "a@example.com");
        assert_eq!(body["exp"], 3610);
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public_key().as_ref());
        public.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &signature).unwrap();
        assert!(!format!("{signer:?}").contains("BEGIN"));
    }

    #[test]
    fn non_keys_are_refused() {
        assert!(matches!(RsaSigner::from_pkcs8_pem("nope", None), Err(JwtError::Key(_))));
        let junk = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n";
        assert!(matches!(RsaSigner::from_pkcs8_pem(junk, None), Err(JwtError::Key(_))));
    }
}
