//! `[console]`: the admin web console's listener and who may use it.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

use super::{ConfigError, parse_network};

/// `[console]`: off when absent.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// The HTTPS address, e.g. `127.0.0.1:10443`.
    pub listen: SocketAddr,
    /// Its own certificate chain (PEM); the `[tls]` certificate when absent.
    pub cert: Option<PathBuf>,
    /// Its own private key (PEM, mode 0600); with `cert`.
    pub key: Option<PathBuf>,
    /// Directory groups whose members may use the console (compared without regard to case).
    pub admin_groups: Vec<String>,
    /// Client networks the console answers (CIDR or single addresses); others get nothing.
    #[serde(default = "loopback")]
    pub allow: Vec<String>,
    /// Minutes a console login lasts, however busy (at most 8 hours).
    #[serde(default = "default_session_minutes")]
    pub session_minutes: u64,
}

fn loopback() -> Vec<String> {
    vec!["127.0.0.1/32".into(), "::1/128".into()]
}

fn default_session_minutes() -> u64 {
    15
}

impl ConsoleConfig {
    /// The parsed `allow` networks (validated when the config was loaded).
    pub fn allowed_networks(&self) -> Vec<ipnet::IpNet> {
        self.allow.iter().filter_map(|a| parse_network(a)).map(|n| n.trunc()).collect()
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &str, message: String| ConfigError::Invalid { key: format!("console.{key}"), message };
        if self.admin_groups.iter().all(|g| g.trim().is_empty()) {
            return Err(invalid(
                "admin_groups",
                "name at least one directory group whose members administer Postern".into(),
            ));
        }
        if self.allow.is_empty() {
            return Err(invalid("allow", "name the networks admins connect from, e.g. [\"10.0.0.0/24\"]".into()));
        }
        if let Some(bad) = self.allow.iter().find(|a| parse_network(a).is_none()) {
            return Err(invalid("allow", format!("`{bad}` is not a CIDR block or address")));
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(invalid("cert", "give both cert and key, or neither to use the [tls] certificate".into()));
        }
        if self.session_minutes == 0 || self.session_minutes > 480 {
            return Err(invalid("session_minutes", "must be between 1 and 480".into()));
        }
        Ok(())
    }
}
