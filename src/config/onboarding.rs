//! `[onboarding]`: the public HTTPS listener mail clients ask for their settings (Mozilla
//! autoconfig, Microsoft Autodiscover, Apple configuration profiles).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Deserialize;

/// Default of `max_requests_per_minute`: enough for a client's few lookups and retries,
/// far too few for an address-guessing crawl.
pub const DEFAULT_MAX_REQUESTS_PER_MINUTE: u32 = 30;

/// Most `max_requests_per_minute` accepted.
const MAX_REQUESTS_PER_MINUTE: u32 = 6000;

/// Longest `display_name` accepted (mail clients show it in one line).
const MAX_DISPLAY_NAME: usize = 100;

/// `[onboarding]` (off when absent). Every key applies at start; the certificate (its own or
/// `[tls]`'s) is re-read on reload.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnboardingConfig {
    /// Address of the HTTPS listener, e.g. `0.0.0.0:443`.
    pub listen: SocketAddr,
    /// Its own PEM certificate chain (names `autoconfig.<domain>`, `autodiscover.<domain>`);
    /// `[tls] cert` when absent. Needs `key`.
    pub cert: Option<PathBuf>,
    /// Its own PEM private key (mode 0600); `[tls] key` when absent. Needs `cert`.
    pub key: Option<PathBuf>,
    /// The host name mail clients are told to connect to; `server.hostname` when absent.
    pub host: Option<String>,
    /// The mail domains answered, e.g. `["example.com"]`; any other gets nothing useful.
    pub domains: Vec<String>,
    /// The provider name clients show (e.g. "Example Corp mail"); the domain when absent.
    pub display_name: Option<String>,
    /// Requests one client address may make per minute (an IPv6 /64 counts as one address).
    #[serde(default = "default_max_requests_per_minute")]
    pub max_requests_per_minute: u32,
}

fn default_max_requests_per_minute() -> u32 {
    DEFAULT_MAX_REQUESTS_PER_MINUTE
}

impl OnboardingConfig {
    /// The host name clients are told to connect to: `host`, else `server_hostname`.
    pub fn host<'a>(&'a self, server_hostname: &'a str) -> &'a str {
        self.host.as_deref().unwrap_or(server_hostname)
    }

    /// Checks every key; the error is the key's dotted path and what to do.
    pub(super) fn validate(&self, server_hostname: &str) -> Result<(), (String, String)> {
        let invalid = |key: &str, message: String| Err((format!("onboarding.{key}"), message));
        match (&self.cert, &self.key) {
            (Some(_), None) => return invalid("key", "`cert` needs `key` too (or leave both out for [tls]'s)".into()),
            (None, Some(_)) => return invalid("cert", "`key` needs `cert` too (or leave both out for [tls]'s)".into()),
            (Some(p), _) | (_, Some(p)) if p.as_os_str().is_empty() => {
                return invalid("cert", "must be a file path; leave `cert` and `key` out for [tls]'s".into());
            }
            _ => {}
        }
        match &self.host {
            Some(host) if !is_domain_name(host) => {
                return invalid("host", format!("`{host}` is not a DNS host name, e.g. \"mail-gw.example.com\""));
            }
            None if !is_domain_name(server_hostname) => {
                return invalid(
                    "host",
                    format!("server.hostname `{server_hostname}` is not a DNS host name: set onboarding.host"),
                );
            }
            _ => {}
        }
        if self.domains.is_empty() {
            return invalid("domains", "name the mail domains to answer, e.g. [\"example.com\"]".into());
        }
        let mut seen = std::collections::HashSet::new();
        for domain in &self.domains {
            if !is_domain_name(domain) {
                return invalid("domains", format!("`{domain}` is not a domain name, e.g. \"example.com\""));
            }
            if !seen.insert(domain.to_ascii_lowercase()) {
                return invalid("domains", format!("`{domain}` is listed twice"));
            }
        }
        if let Some(name) = &self.display_name {
            let usable = !name.trim().is_empty()
                && name.chars().count() <= MAX_DISPLAY_NAME
                && !name.chars().any(crate::user::is_invisible);
            if !usable {
                return invalid(
                    "display_name",
                    format!("give one line of at most {MAX_DISPLAY_NAME} visible characters, or leave it out"),
                );
            }
        }
        if !(1..=MAX_REQUESTS_PER_MINUTE).contains(&self.max_requests_per_minute) {
            return invalid("max_requests_per_minute", format!("must be between 1 and {MAX_REQUESTS_PER_MINUTE}"));
        }
        Ok(())
    }
}

/// Whether `name` is a DNS name: dot-separated labels of ASCII letters, digits and inner
/// hyphens, 1 to 63 characters each, 253 in all.
pub fn is_domain_name(name: &str) -> bool {
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    !name.is_empty() && name.len() <= 253 && name.split('.').all(label_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domain_names_are_checked_label_by_label() {
        for good in ["example.com", "mail-gw.example.co.jp", "localhost", "xn--bcher-kva.example"] {
            assert!(is_domain_name(good), "{good}");
        }
        let long_label = format!("{}.com", "a".repeat(64));
        for bad in ["", "example..com", ".example.com", "-a.com", "a-.com", "a b.com", "a_b.com", "ex\u{e4}mple.com"] {
            assert!(!is_domain_name(bad), "{bad:?}");
        }
        assert!(!is_domain_name(&long_label));
    }
}
