//! Which upstream a user logs in to: the first `[[route]]` matching the user's mail domain,
//! address or one of their directory groups, else the protocol tables (the route named
//! [`DEFAULT_ROUTE`]). A [`Routing`] is built whole from a config and swapped whole on
//! reload; token sources whose settings did not change are carried over with their caches.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::Upstream;
use crate::config::{Config, RouteConfig, UpstreamAuthMode, UpstreamConfig};
use crate::metrics::TokenEndpointMetrics;
use crate::protocol::Protocol;
use crate::stores::oauth::{SetupError, TokenSource};
use crate::tls::TlsError;

/// The name of the route made of the protocol tables, for users no `[[route]]` matches.
pub const DEFAULT_ROUTE: &str = "default";

/// The route a session took, kept to find the sessions a reload moves elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteTaken {
    /// The route's name.
    pub name: String,
    /// The upstream's `host:port`.
    pub upstream: String,
}

impl RouteTaken {
    /// Route `name` to the upstream at `upstream`.
    pub fn new(name: &str, upstream: &str) -> Self {
        Self { name: name.to_owned(), upstream: upstream.to_owned() }
    }
}

/// Why the upstreams could not be set up from the config.
#[derive(Debug, thiserror::Error)]
pub enum SetupUpstreamsError {
    /// An upstream's TLS settings (CA file, pins, server name) are unusable.
    #[error(transparent)]
    Tls(#[from] TlsError),
    /// The `[oauth]` token source could not be set up.
    #[error("oauth: {0}")]
    OAuth(#[from] SetupError),
}

/// One upstream of a route, with the token source its XOAUTH2 logins use.
pub struct Target {
    /// The upstream server.
    pub upstream: Upstream,
    /// The token source, when `upstream_auth = "xoauth2"`.
    pub oauth: Option<Arc<TokenSource>>,
    /// The token source's name, for messages.
    pub oauth_name: Option<String>,
}

/// Who a route is for: any one of its domains, users or groups.
#[derive(Debug, Default)]
struct Matcher {
    domains: HashSet<String>,
    users: HashSet<String>,
    groups: HashSet<String>,
}

impl Matcher {
    fn of(route: &RouteConfig) -> Self {
        let set = |items: &[String], normalize: fn(&str) -> String| items.iter().map(|i| normalize(i)).collect();
        Self {
            domains: set(&route.domains, |d| d.trim().to_lowercase()),
            // Validation has checked that every entry normalizes.
            users: set(&route.users, |u| crate::user::normalize(u).unwrap_or_default()),
            groups: set(&route.groups, |g| g.trim().to_lowercase()),
        }
    }

    fn matches(&self, user: &str, groups: &[String]) -> bool {
        let domain = user.rsplit_once('@').map_or("", |(_, d)| d);
        self.users.contains(user)
            || self.domains.contains(domain)
            || groups.iter().any(|g| self.groups.contains(&g.trim().to_lowercase()))
    }
}

/// The rule that picks a user's route, alone: the `[[route]]` tables' matchers in file
/// order. [`Routing::resolve`] uses it, and so does `postern access explain`, which needs no
/// upstream set up.
#[derive(Debug, Default)]
pub struct RouteMatchers(Vec<Matcher>);

impl RouteMatchers {
    /// The matchers of `config`'s routes.
    pub fn from_config(config: &Config) -> Self {
        Self(config.route.iter().map(Matcher::of).collect())
    }

    /// The index in `config.route` of the first route matching `user` (normalized) with
    /// directory `groups`; `None` for the default route.
    pub fn find(&self, user: &str, groups: &[String]) -> Option<usize> {
        self.0.iter().position(|m| m.matches(user, groups))
    }

    /// Whether some route matches by group (so groups must be known to route a user).
    pub fn uses_groups(&self) -> bool {
        self.0.iter().any(|m| !m.groups.is_empty())
    }
}

/// A route: who it is for and its upstream per protocol.
pub struct Route {
    name: String,
    targets: HashMap<Protocol, Target>,
}

impl Route {
    /// The route's name ([`DEFAULT_ROUTE`] for the protocol tables).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The route's upstream for `protocol`; `None` when the route has none (its users cannot
    /// use that protocol).
    pub fn target(&self, protocol: Protocol) -> Option<&Target> {
        self.targets.get(&protocol)
    }

    /// The `host:port` of the route's upstream for `protocol`, if it has one.
    pub fn address(&self, protocol: Protocol) -> Option<&str> {
        self.target(protocol).map(|t| t.upstream.address())
    }
}

/// Every route of a config, the default last.
pub struct Routing {
    matchers: RouteMatchers,
    routes: Vec<Route>,
    default: Route,
}

/// What the parts of a new [`Routing`] are built with.
struct Builder<'a> {
    config: &'a Config,
    previous: Option<&'a Routing>,
    sources: HashMap<String, Arc<TokenSource>>,
    exported: &'a TokenEndpointMetrics,
}

impl Builder<'_> {
    fn target(&mut self, protocol: Protocol, upstream: &UpstreamConfig) -> Result<Target, SetupUpstreamsError> {
        let config = self.config;
        let ca = upstream.upstream_ca_file.as_ref().map(|f| config.resolve(f));
        let timeout: Duration = config.limits.upstream_timeout();
        let server = Upstream::new(protocol, upstream, ca.as_deref(), &config.server.hostname, timeout)?;
        let (oauth, oauth_name) = match upstream.upstream_auth {
            UpstreamAuthMode::Password => (None, None),
            UpstreamAuthMode::Xoauth2 => match config.oauth.choose(upstream.oauth_source.as_deref()) {
                // Validation has made sure the source exists.
                None => (None, None),
                Some((name, _)) => (Some(self.source(name)?), Some(name.to_owned())),
            },
        };
        Ok(Target { upstream: server, oauth, oauth_name })
    }

    /// The token source `name`: the running one if its settings are unchanged (keeping its
    /// cached tokens), else a new one.
    fn source(&mut self, name: &str) -> Result<Arc<TokenSource>, SetupUpstreamsError> {
        if let Some(source) = self.sources.get(name) {
            return Ok(source.clone());
        }
        let settings = self.config.oauth.get(name).cloned();
        let kept = self.previous.and_then(|p| p.source(name)).filter(|s| settings.as_ref() == Some(s.settings()));
        let source = match kept {
            Some(source) => source,
            None => Arc::new(TokenSource::named(self.config, name, self.exported)?),
        };
        self.sources.insert(name.to_owned(), source.clone());
        Ok(source)
    }
}

impl Routing {
    /// Builds the routes `config` describes; token sources of `previous` whose settings are
    /// unchanged are kept. Token requests are counted in `exported`.
    pub fn from_config(
        config: &Config,
        previous: Option<&Routing>,
        exported: &TokenEndpointMetrics,
    ) -> Result<Self, SetupUpstreamsError> {
        let mut builder = Builder { config, previous, sources: HashMap::new(), exported };
        let mut routes = Vec::new();
        for route in &config.route {
            let mut targets = HashMap::new();
            for protocol in Protocol::ALL {
                if let Some(upstream) = route.upstream(protocol) {
                    targets.insert(protocol, builder.target(protocol, upstream)?);
                }
            }
            routes.push(Route { name: route.name.clone(), targets });
        }
        let mut targets = HashMap::new();
        for (protocol, p) in config.protocols() {
            targets.insert(protocol, builder.target(protocol, &p.upstream)?);
        }
        let default = Route { name: DEFAULT_ROUTE.to_owned(), targets };
        Ok(Self { matchers: RouteMatchers::from_config(config), routes, default })
    }

    /// The route of `user` (normalized) with directory `groups`: the first that matches, or
    /// the default.
    pub fn resolve(&self, user: &str, groups: &[String]) -> &Route {
        self.matchers.find(user, groups).map_or(&self.default, |i| &self.routes[i])
    }

    /// Whether some route matches by group (so groups must be known to route a user).
    pub fn uses_groups(&self) -> bool {
        self.matchers.uses_groups()
    }

    /// Every route, the default last.
    pub fn routes(&self) -> impl Iterator<Item = &Route> {
        self.routes.iter().chain(std::iter::once(&self.default))
    }

    /// The route called `name`.
    pub fn get(&self, name: &str) -> Option<&Route> {
        self.routes().find(|r| r.name == name)
    }

    /// The token source called `name`, if some upstream uses it.
    pub fn source(&self, name: &str) -> Option<Arc<TokenSource>> {
        self.routes()
            .flat_map(|r| r.targets.values())
            .find(|t| t.oauth_name.as_deref() == Some(name))
            .and_then(|t| t.oauth.clone())
    }

    /// Every token source in use, each once, by name.
    pub fn sources(&self) -> Vec<(String, Arc<TokenSource>)> {
        let mut seen = HashMap::new();
        for target in self.routes().flat_map(|r| r.targets.values()) {
            if let (Some(name), Some(source)) = (&target.oauth_name, &target.oauth) {
                seen.entry(name.clone()).or_insert_with(|| source.clone());
            }
        }
        let mut sources: Vec<_> = seen.into_iter().collect();
        sources.sort_by(|a, b| a.0.cmp(&b.0));
        sources
    }
}

/// The routing of a config's text, for tests.
#[cfg(test)]
pub(crate) fn routing_of(text: &str) -> Routing {
    let config =
        Config::parse(text, std::path::Path::new("proxy.toml"), std::path::PathBuf::from("/etc/postern")).unwrap();
    Routing::from_config(&config, None, &TokenEndpointMetrics::default()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::MINIMAL;

    fn routing() -> Routing {
        routing_of(&format!(
            r#"{MINIMAL}
            [pop3]
            listen = ["127.0.0.1:10995"]
            upstream = "pop.gmail.com:995"
            [[route]]
            name = "m365"
            domains = ["M365.Example.com"]
            users = ["Carol@Example.com"]
            [route.imap]
            upstream = "outlook.office365.com:993"
            [[route]]
            name = "travellers"
            groups = ["Travellers"]
            [route.imap]
            upstream = "imap.travel.example:993"
            [route.pop3]
            upstream = "pop.travel.example:995"
            "#
        ))
    }

    #[test]
    fn the_first_route_matching_domain_user_or_group_wins_and_the_protocol_tables_are_the_default() {
        let r = routing();
        let name = |user: &str, groups: &[&str]| {
            let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
            r.resolve(user, &groups).name().to_owned()
        };
        assert_eq!(name("alice@m365.example.com", &[]), "m365", "by domain, case-insensitively");
        assert_eq!(name("carol@example.com", &[]), "m365", "by user");
        assert_eq!(name("alice@example.com", &["travellers"]), "travellers", "by group");
        assert_eq!(name("carol@example.com", &["TRAVELLERS"]), "m365", "file order decides");
        assert_eq!(name("alice@example.com", &["staff"]), DEFAULT_ROUTE);
        assert_eq!(name("alice@sub.m365.example.com", &[]), DEFAULT_ROUTE, "a subdomain is another domain");
        assert!(r.uses_groups());
    }

    #[test]
    fn a_route_without_a_protocol_table_has_no_upstream_for_it() {
        let r = routing();
        let m365 = r.get("m365").unwrap();
        assert_eq!(m365.address(Protocol::Imap), Some("outlook.office365.com:993"));
        assert!(m365.target(Protocol::Pop3).is_none(), "not the default's: the route's users have no POP3");
        let default = r.get(DEFAULT_ROUTE).unwrap();
        assert_eq!(default.address(Protocol::Pop3), Some("pop.gmail.com:995"));
        assert_eq!(r.routes().map(Route::name).collect::<Vec<_>>(), ["m365", "travellers", DEFAULT_ROUTE]);
    }
}
