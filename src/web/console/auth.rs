//! Console logins: short-lived sessions in memory behind a `__Host-` cookie (HttpOnly,
//! Secure, SameSite=Strict), a CSRF token per session that every form carries, and the
//! [`Admin`] extractor that every page but the login page requires.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use base64::Engine as _;
use rand::RngCore;
use rand::rngs::OsRng;
use subtle::ConstantTimeEq;

use super::{Console, page};
use crate::web::ClientAddr;

/// The session cookie's name: `__Host-` makes browsers insist on Secure, Path=/ and no
/// Domain, so no other site or subdomain can set or read it.
pub const COOKIE: &str = "__Host-postern-console";

/// Most console logins held at once; the oldest goes first beyond it.
const MAX_SESSIONS: usize = 256;

/// A logged-in admin's session.
#[derive(Debug, Clone)]
struct AdminSession {
    admin: String,
    csrf: String,
    ip: IpAddr,
    expires: Instant,
}

/// The console's sessions, in memory: a restart logs every admin out.
#[derive(Debug)]
pub struct Sessions {
    lifetime: Duration,
    map: Mutex<HashMap<String, AdminSession>>,
}

fn random_token() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

impl Sessions {
    /// Sessions that end `lifetime` after their login.
    pub fn new(lifetime: Duration) -> Self {
        Self { lifetime, map: Mutex::new(HashMap::new()) }
    }

    /// Starts a session for `admin` at `ip`; returns its cookie value.
    pub fn create(&self, admin: &str, ip: IpAddr) -> String {
        let token = random_token();
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, s| s.expires > now);
        if map.len() >= MAX_SESSIONS
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.expires).map(|(t, _)| t.clone())
        {
            map.remove(&oldest);
        }
        let session = AdminSession { admin: admin.to_owned(), csrf: random_token(), ip, expires: now + self.lifetime };
        map.insert(token.clone(), session);
        token
    }

    /// The admin and CSRF token of a live session `token` used from `ip`. A session ends
    /// its lifetime after the login however busy it is (the cookie's `Max-Age` says the
    /// same): a copied token does not live on, and an admin taken out of the admin groups
    /// or locked out loses the console within one lifetime.
    fn touch(&self, token: &str, ip: IpAddr) -> Option<(String, String)> {
        let now = Instant::now();
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let session = map.get(token)?;
        if session.expires <= now || session.ip != ip {
            map.remove(token);
            return None;
        }
        Some((session.admin.clone(), session.csrf.clone()))
    }

    /// Ends the session `token`.
    pub fn end(&self, token: &str) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).remove(token);
    }
}

/// The cookie value of `name` in the request's headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(n, v)| (n == name).then_some(v))
}

/// The `Set-Cookie` value that starts a session.
pub fn session_cookie(token: &str, lifetime: Duration) -> HeaderValue {
    let value = format!("{COOKIE}={token}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}", lifetime.as_secs());
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static("invalid=1"))
}

/// The `Set-Cookie` value that ends a session.
pub fn cleared_cookie() -> HeaderValue {
    HeaderValue::from_static("__Host-postern-console=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// A logged-in admin, for the pages that need one; others are sent to the login page.
#[derive(Debug, Clone)]
pub struct Admin {
    /// The admin's user name (normalized).
    pub name: String,
    /// The session's CSRF token, for the forms of the page.
    pub csrf: String,
    /// The session cookie's value.
    pub token: String,
    /// The admin's address.
    pub ip: IpAddr,
}

impl Admin {
    /// The navigation bar of a page on section `active`.
    pub fn nav(&self, active: &'static str) -> Option<page::Nav> {
        Some(page::Nav { admin: self.name.clone(), csrf: self.csrf.clone(), active })
    }

    /// Whether a form's `csrf` field is this session's token (compared in constant time).
    pub fn csrf_ok(&self, presented: &str) -> bool {
        !presented.is_empty() && bool::from(presented.as_bytes().ct_eq(self.csrf.as_bytes()))
    }

    /// Checks a form's CSRF token; the refusal to send when it is missing or wrong.
    pub fn csrf_refusal(&self, presented: &str) -> Option<Response> {
        if self.csrf_ok(presented) {
            None
        } else {
            tracing::warn!(target: "audit", event = "console_csrf_refused", admin = %self.name, ip = %self.ip, "console: a form without a valid CSRF token was refused");
            Some(page::error(
                StatusCode::FORBIDDEN,
                "The form's security token is missing or stale. Go back, reload the page and try again.",
            ))
        }
    }
}

impl FromRequestParts<Arc<Console>> for Admin {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Arc<Console>) -> Result<Self, Self::Rejection> {
        let ip = parts
            .extensions
            .get::<ClientAddr>()
            .map(|c| c.0.ip())
            .ok_or_else(|| page::error(StatusCode::INTERNAL_SERVER_ERROR, "The client address is unknown."))?;
        let token = cookie(&parts.headers, COOKIE).unwrap_or_default().to_owned();
        match console.sessions.touch(&token, ip) {
            Some((name, csrf)) => Ok(Admin { name, csrf, token, ip }),
            None => Err(Redirect::to("/login").into_response()),
        }
    }
}

/// `POST` requests from another site are refused whatever they carry: browsers send
/// `Origin` (or `Sec-Fetch-Site`) with every form post.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site.is_some_and(|s| s != "same-origin" && s != "none") {
        return false;
    }
    match (headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()), headers.get(header::HOST)) {
        (Some(origin), Some(host)) => host.to_str().is_ok_and(|host| origin == format!("https://{host}")),
        (Some(_), None) => false,
        (None, _) => true,
    }
}

/// The login form's fields.
#[derive(serde::Deserialize)]
pub struct LoginForm {
    user: String,
    password: String,
}

/// `GET /login`.
pub async fn login_page() -> Response {
    page::login(None)
}

/// `POST /login`: the console's access decision (`access::admin`), then a session.
pub async fn login(
    State(console): State<Arc<Console>>,
    axum::Extension(ClientAddr(peer)): axum::Extension<ClientAddr>,
    headers: HeaderMap,
    axum::Form(form): axum::Form<LoginForm>,
) -> Response {
    if !same_origin(&headers) {
        return page::error(StatusCode::FORBIDDEN, "Cross-site form posts are refused.");
    }
    let password = crate::secret::Secret::new(form.password);
    let result =
        crate::access::admin::admit_admin(&console.state, &console.access, peer.ip(), &form.user, &password).await;
    drop(password);
    // A refused login's audit line names the user only when the name is a user name: what
    // was typed may be a password typed into the wrong field.
    let shown_user = crate::user::normalize(&form.user).unwrap_or_else(|_| "(invalid)".to_owned());
    match result {
        Ok(admin) => {
            console.audit(&admin, peer.ip(), "console_login", "", "ok");
            let token = console.sessions.create(&admin, peer.ip());
            let mut response = Redirect::to("/").into_response();
            response.headers_mut().insert(header::SET_COOKIE, session_cookie(&token, console.sessions.lifetime));
            response
        }
        Err(refusal) => {
            console.audit(&shown_user, peer.ip(), "console_login_refused", "", &refusal.to_string());
            let delay = console.state.counters.failure_delay(peer.ip()).await;
            tokio::time::sleep(delay).await;
            let message = match refusal {
                crate::access::decision::Refusal::Denied(_) => "You are not allowed to access this server",
                crate::access::decision::Refusal::Unavailable(_) => {
                    "The directory or another service is unavailable; try again in a minute."
                }
            };
            let mut response = page::login(Some(message));
            *response.status_mut() = StatusCode::FORBIDDEN;
            response
        }
    }
}

/// The logout form's fields.
#[derive(serde::Deserialize)]
pub struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /logout`.
pub async fn logout(
    State(console): State<Arc<Console>>,
    admin: Admin,
    axum::Form(form): axum::Form<CsrfForm>,
) -> Response {
    if let Some(refused) = admin.csrf_refusal(&form.csrf) {
        return refused;
    }
    console.sessions.end(&admin.token);
    console.audit(&admin.name, admin.ip, "console_logout", "", "ok");
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().insert(header::SET_COOKIE, cleared_cookie());
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_bound_to_its_address_and_ends_with_its_lifetime() {
        let sessions = Sessions::new(Duration::from_millis(50));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let token = sessions.create("admin@example.com", ip);
        let (admin, csrf) = sessions.touch(&token, ip).unwrap();
        assert_eq!(admin, "admin@example.com");
        assert!(csrf.len() >= 43, "256 random bits");
        assert!(sessions.touch("forged", ip).is_none());
        assert!(sessions.touch(&token, "127.0.0.2".parse().unwrap()).is_none(), "another address ends it");
        assert!(sessions.touch(&token, ip).is_none(), "and it stays ended");
        let token = sessions.create("admin@example.com", ip);
        std::thread::sleep(Duration::from_millis(80));
        assert!(sessions.touch(&token, ip).is_none(), "past its lifetime");
    }

    #[test]
    fn a_session_kept_busy_still_ends_with_its_lifetime() {
        // The cookie's Max-Age is the lifetime counted from the login; the server must not
        // keep the session past it however busy it is kept (a copied token would otherwise
        // live for ever, and an admin removed from the admin groups would keep the console).
        let sessions = Sessions::new(Duration::from_millis(100));
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let token = sessions.create("admin@example.com", ip);
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(400) {
            if sessions.touch(&token, ip).is_none() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            sessions.touch(&token, ip).is_none(),
            "the session is still alive {:?} after a login whose cookie lasted 100ms",
            started.elapsed()
        );
    }

    #[test]
    fn csrf_tokens_must_match_exactly() {
        let admin =
            Admin { name: "a".into(), csrf: "token-1".into(), token: "t".into(), ip: "127.0.0.1".parse().unwrap() };
        assert!(admin.csrf_ok("token-1"));
        assert!(!admin.csrf_ok(""));
        assert!(!admin.csrf_ok("token-2"));
        assert!(!admin.csrf_ok("token-1x"));
    }

    #[test]
    fn cross_site_posts_are_told_apart_from_same_origin_ones() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        assert!(same_origin(&headers(&[
            ("host", "console.example:10443"),
            ("origin", "https://console.example:10443")
        ])));
        assert!(!same_origin(&headers(&[("host", "console.example:10443"), ("origin", "https://evil.example")])));
        assert!(!same_origin(&headers(&[("sec-fetch-site", "cross-site")])));
        assert!(same_origin(&headers(&[])), "non-browser clients send neither; the CSRF token still applies");
    }

    #[test]
    fn the_session_cookie_is_host_only_secure_httponly_and_strict() {
        let value = session_cookie("abc", Duration::from_secs(900));
        let value = value.to_str().unwrap();
        for part in ["__Host-postern-console=abc", "Path=/", "Secure", "HttpOnly", "SameSite=Strict", "Max-Age=900"] {
            assert!(value.contains(part), "{value}");
        }
        assert!(!value.contains("Domain"));
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; __Host-postern-console=tok; b=2"));
        assert_eq!(cookie(&headers, COOKIE), Some("tok"));
    }
}
