//! LDAP / Active Directory: users are found by a search or a DN template, passwords are
//! checked with a simple bind as the user.
//!
//! Connections: one long-lived connection, bound as the service account (or anonymous),
//! carries every lookup; `ldap3` multiplexes concurrent operations over it and it is
//! re-established lazily after a failure. A user bind changes a connection's identity, so
//! password checks run on separate connections taken from a small pool of idle ones; each
//! check binds first, so whoever last bound on a pooled connection never matters.
//!
//! Group names: every group DN (from `group_attribute` on the user's entry and from the
//! optional group search) is reported twice, lower-cased: as the full DN
//! (`cn=mail-users,ou=groups,dc=example,dc=com`) and as the value of its first RDN
//! (`mail-users`), so a profile may name either.
//!
//! Nested groups (`nested_groups`): with `"in-chain"` one search under the group base asks
//! Active Directory for every group containing the user at any depth
//! (`LDAP_MATCHING_RULE_IN_CHAIN`); with `"recursive"` Postern itself searches the groups
//! containing the user's groups, level by level, at most [`MAX_NESTING_DEPTH`] levels and
//! [`MAX_NESTED_GROUPS`] groups, each group once (so cycles end).
//!
//! Account states: a refused bind whose answer names a state of the account (Active
//! Directory's diagnostic codes, OpenLDAP's password policy control; see [`states`]) is
//! reported as [`DirectoryError::Account`], not as a wrong password.
//!
//! The directory failing (unreachable, TLS refused, timeout, unexpected result code) is
//! reported per login as [`DirectoryError::Unavailable`]; the proxy starts regardless.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use std::collections::HashSet;

use ldap3::controls::RawControl;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult, Scope, SearchEntry, SearchOptions};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use super::{DirectoryError, Entry};
use crate::secret::Secret;

pub mod states;

use states::{PPOLICY_OID, ad_diagnostic, parse_ppolicy};

/// LDAP result code: the search hit its size limit (more entries than asked for).
const RC_SIZE_LIMIT_EXCEEDED: u32 = 4;
/// LDAP result code: the base DN (or templated user DN) does not exist.
const RC_NO_SUCH_OBJECT: u32 = 32;
/// LDAP result code: wrong DN/password pair (also disabled or expired accounts on AD).
const RC_INVALID_CREDENTIALS: u32 = 49;
/// Longer user names are refused without asking the server.
const MAX_USER_LEN: usize = 320;
/// `nested_groups = "recursive"`: how many levels of groups containing groups are followed
/// above the user's own groups.
pub const MAX_NESTING_DEPTH: usize = 8;
/// `nested_groups`: the most groups a user is reported in (own and enclosing); more are
/// left out, with a warning.
pub const MAX_NESTED_GROUPS: usize = 256;
/// `nested_groups = "recursive"`: groups whose enclosing groups one search asks for.
const GROUPS_PER_SEARCH: usize = 32;
/// OID of Active Directory's `LDAP_MATCHING_RULE_IN_CHAIN`.
const IN_CHAIN_RULE: &str = "1.2.840.113556.1.4.1941";
/// `nested_groups = "recursive"` without a group search: the filter finding the groups
/// that contain the group `{dn}`.
const NESTING_FILTER: &str = "(member={dn})";

fn default_filter() -> String {
    "(mail={user})".to_owned()
}
fn default_group_attribute() -> String {
    "memberOf".to_owned()
}
fn default_group_filter() -> String {
    "(&(objectClass=groupOfNames)(member={dn}))".to_owned()
}
fn default_timeout_secs() -> u64 {
    5
}
fn default_pool_size() -> usize {
    4
}

/// `nested_groups`: whether and how groups inside groups count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NestedGroups {
    /// `false` (the default): only the groups that list the user themselves.
    #[default]
    Off,
    /// `"in-chain"`: Active Directory resolves the nesting, in one search with the
    /// `LDAP_MATCHING_RULE_IN_CHAIN` filter `(member:1.2.840.113556.1.4.1941:=<user DN>)`.
    InChain,
    /// `"recursive"`: any server; Postern searches the groups containing the user's groups,
    /// level by level (bounded by [`MAX_NESTING_DEPTH`] and [`MAX_NESTED_GROUPS`]).
    Recursive,
}

impl<'de> serde::Deserialize<'de> for NestedGroups {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;

        #[derive(serde::Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Flag(bool),
            Name(String),
        }
        match Raw::deserialize(deserializer)? {
            Raw::Flag(false) => Ok(NestedGroups::Off),
            Raw::Flag(true) => Err(D::Error::custom(
                "nested_groups = true: say how, \"in-chain\" (Active Directory) or \"recursive\" (any server)",
            )),
            Raw::Name(name) => match name.as_str() {
                "in-chain" => Ok(NestedGroups::InChain),
                "recursive" => Ok(NestedGroups::Recursive),
                "off" => Ok(NestedGroups::Off),
                other => Err(D::Error::custom(format!(
                    "nested_groups = {other:?}: expected false, \"in-chain\" or \"recursive\""
                ))),
            },
        }
    }
}

/// `[directory] kind = "ldap"`.
///
/// Users are located either with `bind_dn_template` (the DN is computed from the login
/// name) or by searching `base_dn` with `filter`; the template wins when both are set.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapConfig {
    /// Server address: `ldap://host[:port]` or `ldaps://host[:port]`.
    pub url: String,
    /// Upgrade an `ldap://` connection with StartTLS before anything else is sent.
    #[serde(default)]
    pub starttls: bool,
    /// Extra trusted CA certificates (PEM) for the server's certificate, in addition to the
    /// system roots; relative to the config file's folder.
    pub ca_file: Option<PathBuf>,
    /// Service account DN for lookups; without it lookups search anonymously (search mode)
    /// or do not touch the server (template mode).
    pub bind_dn: Option<String>,
    /// The service account's password.
    pub bind_password: Option<Secret>,
    /// A file holding the service account's password (trailing newline ignored); relative
    /// to the config file's folder. Alternative to `bind_password`.
    pub bind_password_file: Option<PathBuf>,
    /// Where users are searched (subtree).
    pub base_dn: Option<String>,
    /// Search filter finding the user; `{user}` becomes the RFC 4515-escaped login name.
    #[serde(default = "default_filter")]
    pub filter: String,
    /// The user's DN, with `{user}` replaced by the RFC 4514-escaped login name, e.g.
    /// `uid={user},ou=people,dc=example,dc=com`; used instead of a search.
    pub bind_dn_template: Option<String>,
    /// Attribute of the user's entry listing the DNs of their groups; empty disables it.
    #[serde(default = "default_group_attribute")]
    pub group_attribute: String,
    /// Where to search for groups containing the user, for directories without `memberOf`.
    pub group_base_dn: Option<String>,
    /// Filter for the group search; `{dn}` becomes the user's DN and `{user}` the login
    /// name, both RFC 4515-escaped.
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    /// Whether groups containing the user's groups count as the user's groups too:
    /// `false`, `"in-chain"` (Active Directory) or `"recursive"` (any server). Both search
    /// under `group_base_dn`, or `base_dn` without it; `"recursive"` finds the groups
    /// containing a group with `group_filter` (its `{dn}` being the group's DN), or with
    /// `(member={dn})` when there is no group search.
    #[serde(default)]
    pub nested_groups: NestedGroups,
    /// Limit in seconds for connecting (TCP, TLS, StartTLS) and for every single operation.
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// How many fresh connections for password checks are kept open, ready. Each serves one
    /// password check and is then closed (a user's password never stays in a reused
    /// connection's buffers); a replacement is dialled in the background.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
}

impl LdapConfig {
    /// Checks the settings without touching the network; the error names the offending key.
    pub fn validate(&self) -> Result<(), DirectoryError> {
        let bad = |msg: String| Err(DirectoryError::Config(msg));
        let tls_scheme = match self.url.split_once("://") {
            Some(("ldap", rest)) | Some(("ldaps", rest)) if host_part(rest).is_some() => self.url.starts_with("ldaps:"),
            _ => return bad(format!("url: expected ldap://host[:port] or ldaps://host[:port], got {:?}", self.url)),
        };
        if self.starttls && tls_scheme {
            return bad("starttls: only for ldap:// URLs; ldaps:// is already TLS".to_owned());
        }
        if self.ca_file.is_some() && !tls_scheme && !self.starttls {
            return bad("ca_file: set, but the connection uses no TLS (use ldaps:// or starttls = true)".to_owned());
        }
        match (&self.bind_dn, &self.bind_password, &self.bind_password_file) {
            (_, Some(_), Some(_)) => return bad("bind_password and bind_password_file: set only one".to_owned()),
            (Some(_), None, None) => return bad("bind_password: required with bind_dn".to_owned()),
            (None, Some(_), _) | (None, _, Some(_)) => return bad("bind_dn: required with a bind password".to_owned()),
            _ => {}
        }
        if matches!(&self.bind_dn, Some(dn) if dn.trim().is_empty()) {
            return bad("bind_dn: empty".to_owned());
        }
        match (&self.bind_dn_template, &self.base_dn) {
            (Some(template), _) => {
                if !template.contains("{user}") {
                    return bad("bind_dn_template: must contain {user}".to_owned());
                }
            }
            (None, Some(base)) => {
                if base.trim().is_empty() {
                    return bad("base_dn: empty".to_owned());
                }
                if !self.filter.contains("{user}") {
                    return bad("filter: must contain {user}".to_owned());
                }
                if ldap3::parse_filter(self.filter.replace("{user}", "x")).is_err() {
                    return bad(format!("filter: not a valid LDAP filter: {}", self.filter));
                }
            }
            (None, None) => return bad("base_dn or bind_dn_template: one is required to find users".to_owned()),
        }
        if self.group_base_dn.is_some() {
            if !self.group_filter.contains("{dn}") && !self.group_filter.contains("{user}") {
                return bad("group_filter: must contain {dn} or {user}".to_owned());
            }
            if ldap3::parse_filter(self.group_filter.replace("{dn}", "x").replace("{user}", "x")).is_err() {
                return bad(format!("group_filter: not a valid LDAP filter: {}", self.group_filter));
            }
        }
        if self.nested_groups != NestedGroups::Off {
            if self.group_base_dn.as_ref().or(self.base_dn.as_ref()).is_none_or(|b| b.trim().is_empty()) {
                return bad("nested_groups: needs group_base_dn (or base_dn) to search groups under".to_owned());
            }
            if self.nested_groups == NestedGroups::Recursive
                && self.group_base_dn.is_some()
                && !self.group_filter.contains("{dn}")
            {
                return bad("nested_groups = \"recursive\": group_filter must contain {dn}".to_owned());
            }
        }
        if self.timeout_secs == 0 {
            return bad("timeout_secs: must be at least 1".to_owned());
        }
        if self.pool_size == 0 {
            return bad("pool_size: must be at least 1".to_owned());
        }
        Ok(())
    }
}

/// The `host[:port]` part after `scheme://`, if there is a host.
fn host_part(rest: &str) -> Option<&str> {
    let authority = rest.split('/').next().unwrap_or_default();
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => authority.split(':').next().unwrap_or_default(),
    };
    (!host.is_empty()).then_some(host)
}

/// How the user's DN is found.
enum Locate {
    /// The DN is `template` with `{user}` replaced.
    Template(String),
    /// Search `base_dn` (subtree) with `filter`.
    Search { base_dn: String, filter: String },
}

/// How nested groups are found (see [`NestedGroups`]).
enum Nesting {
    Off,
    /// One in-chain search under `base`.
    InChain {
        base: String,
    },
    /// Level by level under `base`, each level with `filter` for every group found.
    Recursive {
        base: String,
        filter: String,
    },
}

impl Nesting {
    fn new(config: &LdapConfig) -> Self {
        let base = config.group_base_dn.clone().or_else(|| config.base_dn.clone()).unwrap_or_default();
        match config.nested_groups {
            NestedGroups::Off => Nesting::Off,
            NestedGroups::InChain => Nesting::InChain { base },
            NestedGroups::Recursive => {
                let filter = match &config.group_base_dn {
                    Some(_) => config.group_filter.clone(),
                    None => NESTING_FILTER.to_owned(),
                };
                Nesting::Recursive { base, filter }
            }
        }
    }
}

/// The filter asking Active Directory for every group containing `dn` at any depth.
fn in_chain_filter(dn: &str) -> String {
    format!("(member:{IN_CHAIN_RULE}:={})", escape_filter_value(dn))
}

/// One filter matching the groups that contain any of `groups`: `template` with `{dn}` as
/// each group's DN (and `{user}` as the login name), or-ed.
fn enclosing_filter(template: &str, groups: &[String], user: &str) -> String {
    let user = escape_filter_value(user);
    let parts: Vec<String> =
        groups.iter().map(|dn| template.replace("{dn}", &escape_filter_value(dn)).replace("{user}", &user)).collect();
    match parts.as_slice() {
        [one] => one.clone(),
        _ => format!("(|{})", parts.concat()),
    }
}

/// A DN as compared to spot a group seen before.
fn dn_key(dn: &str) -> String {
    dn.trim().to_lowercase()
}

/// What a user bind's answer means: accepted, or the refusal for the login. A password
/// policy control naming a state wins (a bind that must change its password succeeds,
/// restricted); then result code 49 is a wrong password unless Active Directory's
/// diagnostic names a state or an unknown user; any other non-zero code is a fault.
fn judge_bind(result: &LdapResult) -> Result<(), Fault> {
    let policy = result.ctrls.iter().filter(|c| c.1.ctype == PPOLICY_OID).find_map(|c| match &c.1.val {
        Some(value) => match parse_ppolicy(value) {
            Ok(response) => Some(response),
            Err(e) => {
                tracing::debug!(error = %e, "ignoring a password policy response control");
                None
            }
        },
        None => None,
    });
    if let Some(state) = policy.and_then(|p| p.error).and_then(|e| e.account_state()) {
        return Err(Fault::Refused(DirectoryError::Account(state)));
    }
    match result.rc {
        0 => Ok(()),
        RC_INVALID_CREDENTIALS => Err(Fault::Refused(
            ad_diagnostic(&result.text).map_or(DirectoryError::WrongPassword, states::AdState::into_error),
        )),
        rc => Err(Fault::Code(rc, result.text.clone())),
    }
}

/// Why an operation on a connection failed.
enum Fault {
    /// The connection broke or could not be used; it must be discarded.
    Link(String),
    /// No answer within the timeout; the connection is discarded.
    Timeout,
    /// The server answered with this result code and diagnostic text.
    Code(u32, String),
    /// A user bind was refused: this is the answer for the login.
    Refused(DirectoryError),
}

impl Fault {
    /// The error for a login, with `secret` (if any) scrubbed from the message.
    fn unavailable(self, context: &str, secret: Option<&Secret>) -> DirectoryError {
        let message = match self {
            Fault::Link(detail) => format!("{context}: {detail}"),
            Fault::Timeout => format!("{context}: no answer in time"),
            Fault::Code(rc, text) if text.is_empty() => format!("{context}: result code {rc}"),
            Fault::Code(rc, text) => format!("{context}: result code {rc} ({text})"),
            Fault::Refused(error) => return error,
        };
        DirectoryError::Unavailable(scrub(message, secret))
    }
}

/// `message` with every occurrence of `secret` replaced, in case a server echoes it.
fn scrub(message: String, secret: Option<&Secret>) -> String {
    match secret {
        Some(s) if !s.is_empty() && message.contains(s.expose()) => message.replace(s.expose(), "***"),
        _ => message,
    }
}

/// An LDAP directory.
pub struct LdapDirectory {
    url: String,
    settings: LdapConnSettings,
    timeout: Duration,
    service: Option<(String, Secret)>,
    locate: Locate,
    group_attribute: Option<String>,
    /// Group search base DN and filter.
    group_search: Option<(String, String)>,
    /// How nested groups are found.
    nesting: Nesting,
    /// The connection for lookups, when one is open.
    lookup_conn: Mutex<Option<Ldap>>,
    /// Fresh connections for password checks, never yet used for a bind.
    bind_pool: Arc<Mutex<Vec<Ldap>>>,
    pool_size: usize,
}

impl LdapDirectory {
    /// Checks `config`, loads its files (relative to `base_dir`) and tries to connect.
    ///
    /// Only configuration problems are errors: an unreachable server is logged and then
    /// reported per login, so the proxy still starts.
    pub async fn open(config: &LdapConfig, base_dir: &Path) -> Result<Self, DirectoryError> {
        config.validate()?;
        let timeout = Duration::from_secs(config.timeout_secs);
        let uses_tls = config.url.starts_with("ldaps:") || config.starttls;
        let mut settings = LdapConnSettings::new().set_conn_timeout(timeout).set_starttls(config.starttls);
        if uses_tls {
            let ca_file = config.ca_file.as_ref().map(|p| base_dir.join(p));
            settings = settings.set_config(tls_config(ca_file.as_deref())?);
        } else if !is_loopback_url(&config.url) {
            tracing::warn!(url = %config.url, "LDAP without TLS: passwords cross the network in clear text");
        }
        let service = match &config.bind_dn {
            Some(dn) => Some((dn.clone(), service_password(config, base_dir)?)),
            None => None,
        };
        let locate = match (&config.bind_dn_template, &config.base_dn) {
            (Some(template), _) => Locate::Template(template.clone()),
            (None, Some(base_dn)) => Locate::Search { base_dn: base_dn.clone(), filter: config.filter.clone() },
            (None, None) => {
                return Err(DirectoryError::Config("base_dn or bind_dn_template: one is required".to_owned()));
            }
        };
        let directory = Self {
            url: config.url.clone(),
            settings,
            timeout,
            service,
            locate,
            group_attribute: Some(config.group_attribute.clone()).filter(|a| !a.is_empty()),
            group_search: config.group_base_dn.clone().map(|base| (base, config.group_filter.clone())),
            nesting: Nesting::new(config),
            lookup_conn: Mutex::new(None),
            bind_pool: Arc::new(Mutex::new(Vec::new())),
            pool_size: config.pool_size,
        };
        directory.probe().await;
        Ok(directory)
    }

    /// Opens a first connection so that problems show in the log at startup.
    async fn probe(&self) {
        let result = if self.lookups_use_server() {
            self.lookup_connection().await.map(drop)
        } else {
            self.connect().await.map(|ldap| self.release_bind_connection(ldap))
        };
        match result {
            Ok(()) => tracing::debug!(url = %self.url, "LDAP directory reachable"),
            Err(e) => {
                tracing::warn!(url = %self.url, error = %e, "LDAP directory not usable at startup; logins fail until it is")
            }
        }
    }

    /// See [`super::Directory::reachable`]: a base search of the root DSE on the lookup
    /// connection (any answer, even a refusal, shows the server is there), or a fresh
    /// connection when lookups do not use the server.
    pub async fn reachable(&self) -> Result<(), DirectoryError> {
        if !self.lookups_use_server() {
            let ldap = self.connect().await?;
            self.release_bind_connection(ldap);
            return Ok(());
        }
        for attempt in 0..2 {
            let (mut ldap, reused) = self.lookup_connection().await?;
            match self.search(&mut ldap, "", Scope::Base, "(objectClass=*)", &["1.1".to_owned()], 1).await {
                Ok(_) | Err(Fault::Code(..)) => return Ok(()),
                Err(Fault::Link(_)) if reused && attempt == 0 => self.forget_lookup_connection(),
                Err(fault) => {
                    self.forget_lookup_connection();
                    return Err(fault.unavailable("LDAP health check", None));
                }
            }
        }
        Err(DirectoryError::Unavailable("LDAP health check: connection keeps failing".to_owned()))
    }

    /// Whether `lookup` asks the server (it does unless a template is used without a service account).
    fn lookups_use_server(&self) -> bool {
        matches!(self.locate, Locate::Search { .. }) || self.service.is_some()
    }

    /// See [`super::Directory::lookup`].
    pub async fn lookup(&self, user: &str) -> Result<Entry, DirectoryError> {
        if user.is_empty() || user.len() > MAX_USER_LEN {
            return Err(DirectoryError::UnknownUser);
        }
        if !self.lookups_use_server() {
            if let Locate::Template(template) = &self.locate {
                let dn = template.replace("{user}", &escape_dn_value(user));
                return Ok(Entry { user: user.to_owned(), dn: Some(dn), groups: None });
            }
        }
        for attempt in 0..2 {
            let (mut ldap, reused) = self.lookup_connection().await?;
            match self.find_user(&mut ldap, user).await {
                Ok(found) => return found,
                Err(Fault::Link(_)) if reused && attempt == 0 => {
                    // Most likely the server dropped an idle connection: try once more afresh.
                    self.forget_lookup_connection();
                }
                Err(fault) => {
                    if matches!(fault, Fault::Link(_) | Fault::Timeout) {
                        self.forget_lookup_connection();
                    }
                    let error = fault.unavailable("LDAP user lookup", None);
                    tracing::warn!(url = %self.url, error = %error, "LDAP lookup failed");
                    return Err(error);
                }
            }
        }
        Err(DirectoryError::Unavailable("LDAP user lookup: connection keeps failing".to_owned()))
    }

    /// Finds `user`'s entry and groups on the lookup connection.
    async fn find_user(&self, ldap: &mut Ldap, user: &str) -> Result<Result<Entry, DirectoryError>, Fault> {
        let attrs = self.entry_attributes();
        let result = match &self.locate {
            Locate::Template(template) => {
                let dn = template.replace("{user}", &escape_dn_value(user));
                self.search(ldap, &dn, Scope::Base, "(objectClass=*)", &attrs, 2).await
            }
            Locate::Search { base_dn, filter } => {
                let filter = filter.replace("{user}", &escape_filter_value(user));
                self.search(ldap, base_dn, Scope::Subtree, &filter, &attrs, 2).await
            }
        };
        let mut entries = match result {
            Err(Fault::Code(RC_NO_SUCH_OBJECT, _)) if matches!(self.locate, Locate::Template(_)) => {
                return Ok(Err(DirectoryError::UnknownUser));
            }
            other => other?,
        };
        let entry = match entries.len() {
            0 => return Ok(Err(DirectoryError::UnknownUser)),
            1 => entries.remove(0),
            _ => {
                tracing::warn!(user, "LDAP search found several entries for one login; refusing it");
                return Ok(Err(DirectoryError::UnknownUser));
            }
        };
        let groups = self.groups(ldap, &entry, user).await?;
        Ok(Ok(Entry { user: user.to_owned(), dn: Some(entry.dn), groups: Some(groups) }))
    }

    /// See [`super::Directory::verify`].
    pub async fn verify(&self, entry: &Entry, password: &Secret) -> Result<Vec<String>, DirectoryError> {
        // An empty password (or DN) would make the simple bind anonymous, which "succeeds".
        if password.is_empty() {
            return Err(DirectoryError::WrongPassword);
        }
        let Some(dn) = entry.dn.as_deref().filter(|dn| !dn.is_empty()) else {
            return Err(DirectoryError::Config("LDAP: the entry to verify has no DN".to_owned()));
        };
        let mut attempt = 0;
        let mut ldap = loop {
            attempt += 1;
            let (mut ldap, reused) = self.bind_connection().await?;
            // Asks a password policy overlay to say why it refuses; other servers ignore it.
            let policy = RawControl { ctype: PPOLICY_OID.to_owned(), crit: false, val: None };
            let bind = ldap.with_controls(policy).simple_bind(dn, password.expose());
            match self.timed(bind).await.and_then(|r| judge_bind(&r)) {
                Ok(()) => break ldap,
                Err(Fault::Refused(error)) => {
                    self.release_bind_connection(ldap);
                    if let DirectoryError::Account(state) = &error {
                        tracing::debug!(dn, %state, "the directory refuses the account");
                    }
                    return Err(error);
                }
                Err(Fault::Code(rc, text)) => {
                    self.release_bind_connection(ldap);
                    return Err(Fault::Code(rc, text).unavailable("LDAP bind", Some(password)));
                }
                Err(Fault::Link(_)) if reused && attempt == 1 => continue,
                Err(fault) => return Err(fault.unavailable("LDAP bind", Some(password))),
            }
        };
        let groups = match &entry.groups {
            Some(groups) => groups.clone(),
            None => match self.own_groups(&mut ldap, dn, &entry.user).await {
                Ok(groups) => groups,
                Err(fault) => return Err(fault.unavailable("LDAP group lookup", Some(password))),
            },
        };
        self.release_bind_connection(ldap);
        Ok(groups)
    }

    /// The groups of the user bound on `ldap` as `dn`, read with the user's own rights.
    async fn own_groups(&self, ldap: &mut Ldap, dn: &str, user: &str) -> Result<Vec<String>, Fault> {
        let entry = if self.group_attribute.is_some() {
            let attrs = self.entry_attributes();
            let mut found = self.search(ldap, dn, Scope::Base, "(objectClass=*)", &attrs, 1).await?;
            found.pop()
        } else {
            None
        };
        let entry = entry.unwrap_or_else(|| SearchEntry {
            dn: dn.to_owned(),
            attrs: Default::default(),
            bin_attrs: Default::default(),
        });
        self.groups(ldap, &entry, user).await
    }

    /// Group names from `entry`'s group attribute and from the group search.
    async fn groups(&self, ldap: &mut Ldap, entry: &SearchEntry, user: &str) -> Result<Vec<String>, Fault> {
        let mut dns: Vec<String> = match &self.group_attribute {
            Some(attr) => entry
                .attrs
                .iter()
                .filter(|(name, _)| name.eq_ignore_ascii_case(attr))
                .flat_map(|(_, values)| values.iter().cloned())
                .collect(),
            None => Vec::new(),
        };
        if let Some((base, filter)) = &self.group_search {
            let filter =
                filter.replace("{dn}", &escape_filter_value(&entry.dn)).replace("{user}", &escape_filter_value(user));
            let found = self.search(ldap, base, Scope::Subtree, &filter, &["1.1".to_owned()], 0).await?;
            dns.extend(found.into_iter().map(|group| group.dn));
        }
        match &self.nesting {
            Nesting::Off => {}
            Nesting::InChain { base } => {
                let limit = i32::try_from(MAX_NESTED_GROUPS).unwrap_or(i32::MAX);
                let filter = in_chain_filter(&entry.dn);
                let found = self.search(ldap, base, Scope::Subtree, &filter, &["1.1".to_owned()], limit).await?;
                dns.extend(found.into_iter().map(|group| group.dn));
            }
            Nesting::Recursive { base, filter } => {
                let enclosing = self.enclosing_groups(ldap, base, filter, &dns, user).await?;
                dns.extend(enclosing);
            }
        }
        if dns.len() > MAX_NESTED_GROUPS {
            tracing::warn!(user, limit = MAX_NESTED_GROUPS, "the user is in too many groups; the rest are ignored");
            dns.truncate(MAX_NESTED_GROUPS);
        }
        Ok(group_names(dns))
    }

    /// The DNs of the groups containing any of `groups`, directly or through other groups,
    /// found level by level; each group is searched for once, so cycles end, and the search
    /// stops after [`MAX_NESTING_DEPTH`] levels or [`MAX_NESTED_GROUPS`] groups.
    async fn enclosing_groups(
        &self,
        ldap: &mut Ldap,
        base: &str,
        filter: &str,
        groups: &[String],
        user: &str,
    ) -> Result<Vec<String>, Fault> {
        let mut seen: HashSet<String> = HashSet::new();
        let mut level: Vec<String> = groups.iter().filter(|dn| seen.insert(dn_key(dn))).cloned().collect();
        let mut found = Vec::new();
        for _ in 0..MAX_NESTING_DEPTH {
            let mut next = Vec::new();
            for chunk in level.chunks(GROUPS_PER_SEARCH) {
                let filter = enclosing_filter(filter, chunk, user);
                let limit = i32::try_from(MAX_NESTED_GROUPS).unwrap_or(i32::MAX);
                for group in self.search(ldap, base, Scope::Subtree, &filter, &["1.1".to_owned()], limit).await? {
                    if seen.len() >= MAX_NESTED_GROUPS {
                        tracing::warn!(user, limit = MAX_NESTED_GROUPS, "nested groups beyond the limit are ignored");
                        return Ok(found);
                    }
                    if seen.insert(dn_key(&group.dn)) {
                        next.push(group.dn.clone());
                        found.push(group.dn);
                    }
                }
            }
            if next.is_empty() {
                return Ok(found);
            }
            level = next;
        }
        tracing::warn!(user, depth = MAX_NESTING_DEPTH, "groups nested deeper than the limit, if any, are ignored");
        Ok(found)
    }

    /// The attributes to request for a user's entry.
    fn entry_attributes(&self) -> Vec<String> {
        match &self.group_attribute {
            Some(attr) => vec![attr.clone()],
            None => vec!["1.1".to_owned()],
        }
    }

    /// Runs a search with the timeout; `size_limit` 0 means the server's limit.
    async fn search(
        &self,
        ldap: &mut Ldap,
        base: &str,
        scope: Scope,
        filter: &str,
        attrs: &[String],
        size_limit: i32,
    ) -> Result<Vec<SearchEntry>, Fault> {
        let time_limit = i32::try_from(self.timeout.as_secs()).unwrap_or(i32::MAX);
        let options = SearchOptions::new().sizelimit(size_limit).timelimit(time_limit);
        let search = ldap.with_search_options(options).search(base, scope, filter, attrs.to_vec());
        let ldap3::SearchResult(raw, result) = self.timed(search).await?;
        if result.rc != 0 && result.rc != RC_SIZE_LIMIT_EXCEEDED {
            return Err(Fault::Code(result.rc, result.text));
        }
        raw.into_iter()
            .map(|r| {
                // `construct` panics on a malformed entry; a bad server must not take us down.
                std::panic::catch_unwind(AssertUnwindSafe(|| SearchEntry::construct(r)))
                    .map_err(|_| Fault::Link("malformed search entry from the server".to_owned()))
            })
            .collect()
    }

    /// Awaits an `ldap3` operation within the timeout.
    async fn timed<T>(&self, operation: impl Future<Output = Result<T, LdapError>>) -> Result<T, Fault> {
        match tokio::time::timeout(self.timeout, operation).await {
            Err(_) => Err(Fault::Timeout),
            Ok(Err(LdapError::LdapResult { result })) => Err(Fault::Code(result.rc, result.text)),
            Ok(Err(LdapError::Timeout { .. })) => Err(Fault::Timeout),
            Ok(Err(e)) => Err(Fault::Link(e.to_string())),
            Ok(Ok(value)) => Ok(value),
        }
    }

    /// A new connection (TLS and StartTLS done), its driver running on the runtime.
    async fn connect(&self) -> Result<Ldap, DirectoryError> {
        connect(self.settings.clone(), &self.url, self.timeout).await
    }

    /// The shared lookup connection, bound as the service account; `true` if it was reused.
    async fn lookup_connection(&self) -> Result<(Ldap, bool), DirectoryError> {
        {
            let mut cached = self.lookup_conn.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(ldap) = cached.as_mut() {
                if !ldap.is_closed() {
                    return Ok((ldap.clone(), true));
                }
            }
            *cached = None;
        }
        let mut ldap = self.connect().await?;
        if let Some((dn, password)) = &self.service {
            let bind = ldap.simple_bind(dn, password.expose());
            match self.timed(bind).await.and_then(|r| code_to_fault(r.rc, r.text)) {
                Ok(()) => {}
                Err(Fault::Code(RC_INVALID_CREDENTIALS, _)) => {
                    tracing::warn!(bind_dn = %dn, "LDAP service account bind rejected: check bind_dn and its password");
                    return Err(DirectoryError::Unavailable("LDAP service account bind rejected".to_owned()));
                }
                Err(fault) => return Err(fault.unavailable("LDAP service account bind", Some(password))),
            }
        }
        *self.lookup_conn.lock().unwrap_or_else(PoisonError::into_inner) = Some(ldap.clone());
        Ok((ldap, false))
    }

    fn forget_lookup_connection(&self) {
        self.lookup_conn.lock().unwrap_or_else(PoisonError::into_inner).take();
    }

    /// A connection for a password check, never used for a bind before; `true` if it was
    /// dialled ahead (and may have been closed by the server meanwhile). Taking one from the
    /// spares dials a replacement in the background.
    async fn bind_connection(&self) -> Result<(Ldap, bool), DirectoryError> {
        loop {
            let spare = self.bind_pool.lock().unwrap_or_else(PoisonError::into_inner).pop();
            match spare {
                Some(mut ldap) => {
                    self.refill_spares();
                    if !ldap.is_closed() {
                        return Ok((ldap, true));
                    }
                }
                None => {
                    self.refill_spares();
                    return Ok((self.connect().await?, false));
                }
            }
        }
    }

    /// Dials fresh connections in the background until `pool_size` are ready.
    fn refill_spares(&self) {
        let missing =
            self.pool_size.saturating_sub(self.bind_pool.lock().unwrap_or_else(PoisonError::into_inner).len());
        if missing == 0 || tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let (pool, settings, url, timeout, size) =
            (self.bind_pool.clone(), self.settings.clone(), self.url.clone(), self.timeout, self.pool_size);
        tokio::spawn(async move {
            for _ in 0..missing {
                let Ok(ldap) = connect(settings.clone(), &url, timeout).await else { return };
                let mut spares = pool.lock().unwrap_or_else(PoisonError::into_inner);
                if spares.len() >= size {
                    return;
                }
                spares.push(ldap);
            }
        });
    }

    /// Closes a connection that carried a user's bind: its buffers held the password, so it
    /// is never reused, and the memory it frees is wiped by the allocator.
    fn release_bind_connection(&self, mut ldap: Ldap) {
        tokio::spawn(async move {
            let _ = ldap.unbind().await;
        });
    }
}

/// A new connection to `url` (TLS and StartTLS done, each step within `timeout`), its driver
/// running on the runtime.
async fn connect(settings: LdapConnSettings, url: &str, timeout: Duration) -> Result<Ldap, DirectoryError> {
    let connecting = LdapConnAsync::with_settings(settings, url);
    let unavailable = |why: String| DirectoryError::Unavailable(format!("connecting to {url}: {why}"));
    let (conn, ldap) = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => return Err(unavailable(format!("no answer within {timeout:?}"))),
        Ok(Err(e)) => return Err(unavailable(e.to_string())),
        Ok(Ok(pair)) => pair,
    };
    tokio::spawn(async move {
        if let Err(e) = conn.drive().await {
            tracing::debug!(error = %e, "LDAP connection ended with an error");
        }
    });
    Ok(ldap)
}

/// `Ok` for result code 0, else the code as a fault.
fn code_to_fault(rc: u32, text: String) -> Result<(), Fault> {
    if rc == 0 { Ok(()) } else { Err(Fault::Code(rc, text)) }
}

/// Whether `url`'s host is the local machine, where clear text is acceptable.
fn is_loopback_url(url: &str) -> bool {
    let host = url.split_once("://").and_then(|(_, rest)| host_part(rest)).unwrap_or_default();
    host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The service account password from the config or its file.
fn service_password(config: &LdapConfig, base_dir: &Path) -> Result<Secret, DirectoryError> {
    if let Some(password) = &config.bind_password {
        return Ok(password.clone());
    }
    let Some(file) = &config.bind_password_file else {
        return Err(DirectoryError::Config("bind_password: required with bind_dn".to_owned()));
    };
    let path = base_dir.join(file);
    let text = crate::secret::read_secret_text(&path)
        .map_err(|e| DirectoryError::Config(format!("bind_password_file {e}")))?;
    let password = Secret::new(text.expose().trim_end_matches(['\r', '\n']));
    if password.is_empty() {
        return Err(DirectoryError::Config(format!("bind_password_file {}: empty", path.display())));
    }
    Ok(password)
}

/// TLS settings trusting the system roots plus the certificates in `ca_file`.
fn tls_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, DirectoryError> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        tracing::debug!(%error, "some system CA certificates could not be loaded");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let config_error =
            |e: &dyn std::fmt::Display| DirectoryError::Config(format!("ca_file {}: {e}", path.display()));
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| config_error(&e))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| config_error(&e))?;
        if certs.is_empty() {
            return Err(config_error(&"no certificates in the file"));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| config_error(&e))?;
        }
    }
    if roots.is_empty() {
        return Err(DirectoryError::Config("ca_file: no trusted CA certificates; name one".to_owned()));
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| DirectoryError::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Escapes `value` for use inside an LDAP search filter (RFC 4515): the filter
/// metacharacters, NUL, and every byte outside printable ASCII become `\xx`.
fn escape_filter_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for &byte in value.as_bytes() {
        match byte {
            b'*' | b'(' | b')' | b'\\' => out.push_str(&format!("\\{byte:02x}")),
            0x20..=0x7e => out.push(char::from(byte)),
            _ => out.push_str(&format!("\\{byte:02x}")),
        }
    }
    out
}

/// Escapes `value` as an attribute value in a DN string (RFC 4514): the special
/// characters get a backslash, a leading `#` or space and a trailing space are escaped,
/// and control characters become `\xx`.
fn escape_dn_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 8);
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' | '=' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_ascii_control() => out.push_str(&format!("\\{:02x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// Lower-cased group DNs plus the value of each one's first RDN, without duplicates.
fn group_names(dns: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for dn in dns {
        let full = dn.trim().to_lowercase();
        if full.is_empty() {
            continue;
        }
        let short = first_rdn_value(&full);
        for name in [Some(full), short].into_iter().flatten() {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

/// The (unescaped) value of the first attribute of the first RDN of `dn`, if it has one.
fn first_rdn_value(dn: &str) -> Option<String> {
    let (_, rest) = dn.split_once('=')?;
    let mut bytes = Vec::new();
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        match c {
            ',' | '+' => break,
            '\\' => {
                let Some(next) = chars.next() else { break };
                let hex = next.to_digit(16).zip(chars.clone().next().and_then(|d| d.to_digit(16)));
                match hex {
                    Some((hi, lo)) => {
                        chars.next();
                        bytes.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                    }
                    None => bytes.extend_from_slice(next.encode_utf8(&mut [0; 4]).as_bytes()),
                }
            }
            c => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
    }
    let value = String::from_utf8_lossy(&bytes).trim().to_owned();
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml_text: &str) -> LdapConfig {
        toml::from_str(toml_text).unwrap()
    }

    fn search_config() -> LdapConfig {
        config(
            r#"url = "ldap://127.0.0.1:389"
               base_dn = "dc=example,dc=com"
               bind_dn = "cn=svc,dc=example,dc=com"
               bind_password = "pw""#,
        )
    }

    fn error_of(c: &LdapConfig) -> String {
        match c.validate() {
            Err(DirectoryError::Config(msg)) => msg,
            other => panic!("expected a config error, got {other:?}"),
        }
    }

    #[test]
    fn filter_escaping_neutralizes_metacharacters() {
        assert_eq!(escape_filter_value("alice@example.com"), "alice@example.com");
        assert_eq!(escape_filter_value("*"), "\\2a");
        assert_eq!(escape_filter_value("*)(uid=*"), "\\2a\\29\\28uid=\\2a");
        assert_eq!(escape_filter_value("a\\b"), "a\\5cb");
        assert_eq!(escape_filter_value("a\0b"), "a\\00b");
        assert_eq!(escape_filter_value("jürgen"), "j\\c3\\bcrgen");
        assert!(ldap3::parse_filter(format!("(mail={})", escape_filter_value("*)(|(uid=*"))).is_ok());
    }

    #[test]
    fn dn_escaping_follows_rfc_4514() {
        assert_eq!(escape_dn_value("alice"), "alice");
        assert_eq!(escape_dn_value("a,b+c"), "a\\,b\\+c");
        assert_eq!(escape_dn_value("x=y;z"), "x\\=y\\;z");
        assert_eq!(escape_dn_value("\"<q>\\"), "\\\"\\<q\\>\\\\");
        assert_eq!(escape_dn_value("#lead"), "\\#lead");
        assert_eq!(escape_dn_value("mid#dle"), "mid#dle");
        assert_eq!(escape_dn_value(" pad "), "\\ pad\\ ");
        assert_eq!(escape_dn_value("a\0b"), "a\\00b");
        assert_eq!(escape_dn_value("jürgen"), "jürgen");
    }

    #[test]
    fn group_names_give_dn_and_first_rdn_value() {
        let names = group_names([
            "cn=Mail-Users,ou=Groups,dc=example,dc=com".to_owned(),
            "CN=mail-users,OU=groups,DC=example,DC=com".to_owned(),
            "cn=a\\2cb,ou=groups".to_owned(),
            "cn=x+uid=y,ou=groups".to_owned(),
        ]);
        assert_eq!(
            names,
            [
                "cn=mail-users,ou=groups,dc=example,dc=com",
                "mail-users",
                "cn=a\\2cb,ou=groups",
                "a,b",
                "cn=x+uid=y,ou=groups",
                "x"
            ]
        );
        assert_eq!(group_names(["plain".to_owned()]), ["plain"]);
    }

    #[test]
    fn defaults_apply() {
        let c = search_config();
        c.validate().unwrap();
        assert_eq!(c.filter, "(mail={user})");
        assert_eq!(c.group_attribute, "memberOf");
        assert_eq!(c.timeout_secs, 5);
        assert!(!c.starttls);
    }

    #[test]
    fn validation_names_the_offending_key() {
        let mut c = search_config();
        c.url = "http://example.com".to_owned();
        assert!(error_of(&c).starts_with("url"));
        c.url = "ldap://".to_owned();
        assert!(error_of(&c).starts_with("url"));

        let mut c = search_config();
        c.url = "ldaps://ldap.example.com".to_owned();
        c.starttls = true;
        assert!(error_of(&c).starts_with("starttls"));

        let mut c = search_config();
        c.ca_file = Some("ca.pem".into());
        assert!(error_of(&c).starts_with("ca_file"));

        let mut c = search_config();
        c.base_dn = None;
        assert!(error_of(&c).contains("bind_dn_template"));

        let mut c = search_config();
        c.base_dn = None;
        c.bind_dn_template = Some("uid=alice,ou=people".to_owned());
        assert!(error_of(&c).starts_with("bind_dn_template"));

        let mut c = search_config();
        c.filter = "(mail=alice)".to_owned();
        assert!(error_of(&c).starts_with("filter"));
        c.filter = "(mail={user}".to_owned();
        assert!(error_of(&c).starts_with("filter"));

        let mut c = search_config();
        c.bind_password = None;
        assert!(error_of(&c).starts_with("bind_password"));
        c.bind_password_file = Some("pw".into());
        c.bind_password = Some(Secret::new("x"));
        assert!(error_of(&c).contains("bind_password_file"));

        let mut c = search_config();
        c.bind_dn = None;
        assert!(error_of(&c).starts_with("bind_dn"));

        let mut c = search_config();
        c.group_base_dn = Some("ou=groups".to_owned());
        c.group_filter = "(member=x)".to_owned();
        assert!(error_of(&c).starts_with("group_filter"));

        let mut c = search_config();
        c.timeout_secs = 0;
        assert!(error_of(&c).starts_with("timeout_secs"));
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let parsed: Result<LdapConfig, _> =
            toml::from_str("url = \"ldap://h\"\nbase_dn = \"x\"\nfliter = \"(a={user})\"");
        assert!(parsed.is_err());
    }

    #[test]
    fn template_mode_needs_no_service_account() {
        let c = config("url = \"ldaps://ldap.example.com:636\"\nbind_dn_template = \"uid={user},ou=people\"");
        c.validate().unwrap();
    }

    #[test]
    fn debug_output_redacts_the_service_password() {
        let c = config("url = \"ldap://h\"\nbase_dn = \"x\"\nbind_dn = \"cn=s\"\nbind_password = \"very-secret-pw\"");
        assert!(!format!("{c:?}").contains("very-secret-pw"));
    }

    #[test]
    fn errors_never_repeat_the_password() {
        let pw = Secret::new("hunter2");
        let e = Fault::Code(53, "refusing hunter2".to_owned()).unavailable("LDAP bind", Some(&pw));
        assert!(!e.to_string().contains("hunter2"));
    }

    #[test]
    fn loopback_detection() {
        assert!(is_loopback_url("ldap://127.0.0.1:389"));
        assert!(is_loopback_url("ldap://localhost"));
        assert!(is_loopback_url("ldap://[::1]:389"));
        assert!(!is_loopback_url("ldap://ldap.example.com"));
    }

    #[test]
    fn nested_groups_take_false_or_a_method() {
        let with = |value: &str| {
            toml::from_str::<LdapConfig>(&format!("url = \"ldap://h\"\nbase_dn = \"x\"\nnested_groups = {value}"))
        };
        assert_eq!(search_config().nested_groups, NestedGroups::Off);
        assert_eq!(with("false").unwrap().nested_groups, NestedGroups::Off);
        assert_eq!(with("\"in-chain\"").unwrap().nested_groups, NestedGroups::InChain);
        assert_eq!(with("\"recursive\"").unwrap().nested_groups, NestedGroups::Recursive);
        assert!(with("true").unwrap_err().to_string().contains("in-chain"));
        assert!(with("\"deep\"").is_err());

        let mut c =
            config("url = \"ldap://h\"\nbind_dn_template = \"uid={user},ou=people\"\nnested_groups = \"in-chain\"");
        assert!(error_of(&c).starts_with("nested_groups"));
        c.group_base_dn = Some("ou=groups".to_owned());
        c.validate().unwrap();
        c.nested_groups = NestedGroups::Recursive;
        c.group_filter = "(memberUid={user})".to_owned();
        assert!(error_of(&c).starts_with("nested_groups"));
    }

    #[test]
    fn nesting_filters_are_escaped_and_parse() {
        let dn = "cn=a\\2cb (x*),ou=people,dc=example,dc=com";
        let chain = in_chain_filter(dn);
        assert_eq!(chain, "(member:1.2.840.113556.1.4.1941:=cn=a\\5c2cb \\28x\\2a\\29,ou=people,dc=example,dc=com)");
        assert!(ldap3::parse_filter(&chain).is_ok());

        let groups = ["cn=g1,ou=groups".to_owned(), "cn=g(2),ou=groups".to_owned()];
        assert_eq!(enclosing_filter(NESTING_FILTER, &groups[..1], "u"), "(member=cn=g1,ou=groups)");
        let both = enclosing_filter("(&(objectClass=groupOfNames)(member={dn}))", &groups, "u");
        assert_eq!(
            both,
            "(|(&(objectClass=groupOfNames)(member=cn=g1,ou=groups))(&(objectClass=groupOfNames)(member=cn=g\\282\\29,ou=groups)))"
        );
        assert!(ldap3::parse_filter(&both).is_ok());
    }

    fn bind_result(rc: u32, text: &str, policy: Option<&[u8]>) -> LdapResult {
        let ctrls = policy
            .map(|value| {
                ldap3::controls::Control(
                    None,
                    RawControl { ctype: PPOLICY_OID.to_owned(), crit: false, val: Some(value.to_vec()) },
                )
            })
            .into_iter()
            .collect();
        LdapResult { rc, matched: String::new(), text: text.to_owned(), refs: Vec::new(), ctrls }
    }

    fn judged(result: &LdapResult) -> Result<(), DirectoryError> {
        judge_bind(result).map_err(|fault| fault.unavailable("LDAP bind", None))
    }

    #[test]
    fn bind_answers_are_judged() {
        use super::super::AccountState;

        assert!(judged(&bind_result(0, "", None)).is_ok());
        assert!(matches!(judged(&bind_result(49, "", None)), Err(DirectoryError::WrongPassword)));
        let ad = |code: &str| {
            format!("80090308: LdapErr: DSID-0C09044E, comment: AcceptSecurityContext error, data {code}, v4563\0")
        };
        assert!(matches!(judged(&bind_result(49, &ad("52e"), None)), Err(DirectoryError::WrongPassword)));
        assert!(matches!(judged(&bind_result(49, &ad("525"), None)), Err(DirectoryError::UnknownUser)));
        assert!(matches!(
            judged(&bind_result(49, &ad("533"), None)),
            Err(DirectoryError::Account(AccountState::Disabled))
        ));
        assert!(matches!(judged(&bind_result(49, &ad("534"), None)), Err(DirectoryError::WrongPassword)));
        assert!(matches!(judged(&bind_result(53, "unwilling", None)), Err(DirectoryError::Unavailable(_))));

        // ppolicy: refused with a state, or accepted but restricted to a password change.
        let locked: &[u8] = &[0x30, 0x03, 0x81, 0x01, 0x01];
        let reset: &[u8] = &[0x30, 0x03, 0x81, 0x01, 0x02];
        assert!(matches!(
            judged(&bind_result(49, "", Some(locked))),
            Err(DirectoryError::Account(AccountState::Locked))
        ));
        assert!(matches!(
            judged(&bind_result(0, "", Some(reset))),
            Err(DirectoryError::Account(AccountState::PasswordMustChange))
        ));
        // A warning alone, or a malformed control, changes nothing.
        let warning: &[u8] = &[0x30, 0x05, 0xa0, 0x03, 0x80, 0x01, 0x3c];
        assert!(judged(&bind_result(0, "", Some(warning))).is_ok());
        assert!(judged(&bind_result(0, "", Some(&[0x30, 0x09]))).is_ok());
        assert!(matches!(judged(&bind_result(49, "", Some(&[0xff]))), Err(DirectoryError::WrongPassword)));
    }

    #[test]
    fn directory_is_shareable_between_tasks() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<LdapDirectory>();
    }
}
