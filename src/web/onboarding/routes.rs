//! The onboarding listener's HTTP side: which path serves which document, the per-address
//! rate limit, security headers and one log line per request (method, path without query,
//! client address, domain, status and result; never a body).

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use super::rate::{Limited, RateLimiter};
use super::{MailAddress, Site, autoconfig, autodiscover, mobileconfig};
use crate::web::ClientAddr;

/// Mozilla autoconfig, at `autoconfig.<domain>`.
pub const AUTOCONFIG_PATH: &str = "/mail/config-v1.1.xml";
/// Mozilla autoconfig, at `<domain>` itself.
pub const WELL_KNOWN_AUTOCONFIG_PATH: &str = "/.well-known/autoconfig/mail/config-v1.1.xml";
/// Microsoft Autodiscover POX (Outlook also asks with capitals, [`AUTODISCOVER_PATH_CAPS`]).
pub const AUTODISCOVER_PATH: &str = "/autodiscover/autodiscover.xml";
/// Microsoft Autodiscover POX as Outlook often spells it.
pub const AUTODISCOVER_PATH_CAPS: &str = "/Autodiscover/Autodiscover.xml";
/// Apple configuration profile, `?emailaddress=name@example.com`.
pub const MOBILECONFIG_PATH: &str = "/apple/mobileconfig";

/// Longest request path written to the log.
const MAX_LOGGED_PATH: usize = 200;

/// Sent with every response: nothing here runs scripts, loads anything or may be framed.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; frame-ancestors 'none'; form-action 'self'";

const BAD_ADDRESS: &str = "That is not a mail address. Give your whole address, e.g. ?emailaddress=name@example.com\n";
const UNKNOWN_DOMAIN: &str =
    "No mail settings are published here for that domain. Ask your mail administrator for the server settings.\n";
const NO_PROFILE: &str = "This server publishes no Apple Mail profile (it has no IMAP or POP3, or no SMTP listener). \
     Ask your mail administrator for the server settings.\n";
const NOT_FOUND: &str = "Nothing here. Mail clients find their settings by themselves; on an iPhone, iPad or Mac \
     open / in Safari to download a profile.\n";

/// The page Apple users open in Safari to download their profile; no script, no style.
const START_PAGE: &str = "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
<meta name=\"viewport\" content=\"width=device-width\"><title>Mail settings</title></head><body>\
<h1>Mail settings</h1><p>Thunderbird and Outlook set themselves up from your address. On an iPhone, \
iPad or Mac, enter your address to download a profile for Mail, then install it in Settings \
(no password is asked here; Mail asks for it once installed).</p>\
<form method=\"get\" action=\"/apple/mobileconfig\"><label>Mail address \
<input type=\"email\" name=\"emailaddress\" required autocomplete=\"email\"></label> \
<button type=\"submit\">Download profile</button></form></body></html>\n";

#[derive(Clone)]
struct Context {
    site: Arc<Site>,
    limiter: Arc<RateLimiter>,
}

/// What the log line says about a request besides its status.
#[derive(Clone)]
struct Logged {
    domain: Option<String>,
    result: &'static str,
}

#[derive(serde::Deserialize)]
struct AddressQuery {
    emailaddress: Option<String>,
}

/// The routes over `site`, rate-limited by `limiter`.
pub fn router(site: Arc<Site>, limiter: Arc<RateLimiter>) -> Router {
    let context = Context { site, limiter };
    Router::new()
        .route("/", get(start_page))
        .route(AUTOCONFIG_PATH, get(autoconfig))
        .route(WELL_KNOWN_AUTOCONFIG_PATH, get(autoconfig))
        .route(AUTODISCOVER_PATH, post(autodiscover))
        .route(AUTODISCOVER_PATH_CAPS, post(autodiscover))
        .route(MOBILECONFIG_PATH, get(mobileconfig))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(autodiscover::MAX_REQUEST_BYTES))
        .layer(middleware::from_fn_with_state(context.clone(), guard))
        .with_state(context)
}

/// `response` marked for the log with the domain asked about and the result.
fn answer(domain: Option<&str>, result: &'static str, response: impl IntoResponse) -> Response {
    let mut response = response.into_response();
    response.extensions_mut().insert(Logged { domain: domain.map(str::to_owned), result });
    response
}

fn text(status: StatusCode, body: &'static str) -> impl IntoResponse {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body)
}

/// Rate limit first, then the route; security headers and the log line after.
async fn guard(State(context): State<Context>, request: Request, next: Next) -> Response {
    let client = request.extensions().get::<ClientAddr>().map(|c| c.0);
    let ip = client.map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.ip());
    let method = request.method().clone();
    let path: String = request.uri().path().chars().take(MAX_LOGGED_PATH).collect();
    let mut response = match context.limiter.check(ip, Instant::now()) {
        Ok(()) => next.run(request).await,
        Err(limited) => too_many_requests(limited),
    };
    let logged = response.extensions_mut().remove::<Logged>();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CONTENT_SECURITY_POLICY));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    let (domain, result) = match &logged {
        Some(l) => (l.domain.as_deref().unwrap_or("-"), l.result),
        None if response.status() == StatusCode::TOO_MANY_REQUESTS => ("-", "rate limited"),
        None => ("-", "refused"),
    };
    tracing::info!(
        method = %method,
        path = %crate::user::escape(&path),
        client = %client.map_or_else(|| "-".to_owned(), |c| c.to_string()),
        domain,
        status = response.status().as_u16(),
        result,
        "onboarding request"
    );
    response
}

fn too_many_requests(limited: Limited) -> Response {
    let body = format!("Too many requests from your address. Try again in {} seconds.\n", limited.retry_after_secs);
    let retry_after = HeaderValue::from(limited.retry_after_secs);
    let headers = [
        (header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8")),
        (header::RETRY_AFTER, retry_after),
    ];
    (StatusCode::TOO_MANY_REQUESTS, headers, body).into_response()
}

async fn start_page() -> Response {
    answer(None, "start page", ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], START_PAGE))
}

async fn not_found() -> Response {
    answer(None, "no such page", text(StatusCode::NOT_FOUND, NOT_FOUND))
}

/// The mail domain a request's `Host` names: `autoconfig.<domain>` or `<domain>` itself
/// (without port or trailing dot, lower case); `None` when it is no DNS name.
fn host_domain(headers: &HeaderMap) -> Option<String> {
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_end_matches('.').to_ascii_lowercase();
    let domain = name.strip_prefix("autoconfig.").unwrap_or(&name);
    crate::config::is_domain_name(domain).then(|| domain.to_owned())
}

async fn autoconfig(
    State(context): State<Context>,
    headers: HeaderMap,
    query: Result<Query<AddressQuery>, QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else { return answer(None, "bad query", text(StatusCode::BAD_REQUEST, BAD_ADDRESS)) };
    let domain = match query.emailaddress.as_deref().map(MailAddress::parse) {
        Some(Ok(address)) => address.domain().to_owned(),
        Some(Err(_)) => return answer(None, "bad address", text(StatusCode::BAD_REQUEST, BAD_ADDRESS)),
        None => match host_domain(&headers) {
            Some(domain) => domain,
            None => return answer(None, "no domain", text(StatusCode::NOT_FOUND, UNKNOWN_DOMAIN)),
        },
    };
    if !context.site.serves(&domain) {
        return answer(Some(&domain), "unknown domain", text(StatusCode::NOT_FOUND, UNKNOWN_DOMAIN));
    }
    let document = autoconfig::client_config(&context.site, &domain);
    answer(Some(&domain), "autoconfig", ([(header::CONTENT_TYPE, autoconfig::CONTENT_TYPE)], document))
}

async fn autodiscover(State(context): State<Context>, body: Result<Bytes, BytesRejection>) -> Response {
    use autodiscover::ErrorCode;
    let xml = |status: StatusCode, code: ErrorCode| {
        (status, [(header::CONTENT_TYPE, autodiscover::CONTENT_TYPE)], autodiscover::error(code))
    };
    let body = match body {
        Ok(body) => body,
        Err(rejection) => return answer(None, "body refused", xml(rejection.status(), ErrorCode::InvalidRequest)),
    };
    let request = match autodiscover::parse_request(&body) {
        Ok(request) => request,
        Err(_) => return answer(None, "bad request", xml(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest)),
    };
    let Ok(address) = MailAddress::parse(&request.email) else {
        return answer(None, "bad address", xml(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest));
    };
    let domain = address.domain();
    if !context.site.serves(domain) {
        return answer(Some(domain), "unknown domain", xml(StatusCode::OK, ErrorCode::AddressNotFound));
    }
    if request.schema.as_deref().is_some_and(|s| s != autodiscover::OUTLOOK_RESPONSE_SCHEMA) {
        return answer(Some(domain), "schema not offered", xml(StatusCode::OK, ErrorCode::SchemaNotAvailable));
    }
    let document = autodiscover::settings(&context.site, &address);
    answer(Some(domain), "autodiscover", ([(header::CONTENT_TYPE, autodiscover::CONTENT_TYPE)], document))
}

async fn mobileconfig(State(context): State<Context>, query: Result<Query<AddressQuery>, QueryRejection>) -> Response {
    let raw = match query {
        Ok(Query(AddressQuery { emailaddress: Some(raw) })) => raw,
        _ => return answer(None, "no address", text(StatusCode::BAD_REQUEST, BAD_ADDRESS)),
    };
    let Ok(address) = MailAddress::parse(&raw) else {
        return answer(None, "bad address", text(StatusCode::BAD_REQUEST, BAD_ADDRESS));
    };
    let domain = address.domain();
    if !context.site.serves(domain) {
        return answer(Some(domain), "unknown domain", text(StatusCode::NOT_FOUND, UNKNOWN_DOMAIN));
    }
    let profile = match mobileconfig::profile(&context.site, &address) {
        Ok(profile) => profile,
        Err(_) => return answer(Some(domain), "no servers for a profile", text(StatusCode::NOT_FOUND, NO_PROFILE)),
    };
    // The domain is a checked DNS name: safe inside the quoted file name.
    let disposition = format!("attachment; filename=\"{domain}.mobileconfig\"");
    let headers =
        [(header::CONTENT_TYPE, mobileconfig::CONTENT_TYPE.to_owned()), (header::CONTENT_DISPOSITION, disposition)];
    answer(Some(domain), "apple profile", (headers, profile))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_header_names_the_domain_with_or_without_autoconfig() {
        let domain = |host: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, HeaderValue::from_str(host).unwrap());
            host_domain(&headers)
        };
        assert_eq!(domain("autoconfig.Example.com").as_deref(), Some("example.com"));
        assert_eq!(domain("autoconfig.example.com:443").as_deref(), Some("example.com"));
        assert_eq!(domain("example.com.").as_deref(), Some("example.com"));
        assert_eq!(domain("[::1]:443"), None);
        assert_eq!(domain("exa_mple.com"), None);
        assert_eq!(host_domain(&HeaderMap::new()), None);
    }
}
