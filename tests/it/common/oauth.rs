//! A local OAuth2 authorization server over HTTPS, standing in for Google's and Microsoft's
//! token endpoints and for the introspection endpoint Dovecot's oauth2 passdb asks.
//!
//! - `POST /google/token`: the JWT-bearer grant. The assertion's RS256 signature is checked
//!   with the test service account's public key, and every claim (iss, sub, scope, aud, iat,
//!   exp = iat + 3600) is checked; a token for `sub` is issued.
//! - `POST /ms/<tenant>/oauth2/v2.0/token`: the client-credentials grant for the test
//!   application; one token valid for every mailbox of example.com.
//! - `POST /refresh/token`: the refresh-token grant, rotating refresh tokens on request, and
//!   the device-code grant (RFC 8628) for codes from `POST /refresh/device`, which tests
//!   approve or deny as the person at the verification page would.
//! - `POST /introspect/user` and `/introspect/app`: RFC 7662 introspection for Dovecot,
//!   answering `active` with the mailbox (`email`) the token is for, or `app@example.com`
//!   for the application token (Dovecot then compares only the domain).
//!
//! Tokens live `lifetime` seconds (per subject, settable). Tests can end (expire) or revoke a
//! subject's tokens, block a subject entirely, and count the grants per subject. The server runs on
//! its own thread and runtime, once per test binary, so it outlives each test's runtime.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize};
use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use tokio_rustls::TlsAcceptor;

use postern::config::{Config, TlsVersion};
use postern::daemon::{self, Running};
use postern::secret::Secret;
use postern::state::State as ProxyState;
use postern::stores::vault::{UpstreamSecret, Vault};

use super::{dovecot, pki, slapd};

/// The test service account's address (the JWT issuer).
pub const SERVICE_ACCOUNT: &str = "postern-test@postern-tests.iam.gserviceaccount.com";
/// The test Microsoft tenant.
pub const TENANT: &str = "postern-test.onmicrosoft.com";
/// The test Microsoft application.
pub const MS_CLIENT_ID: &str = "11111111-2222-3333-4444-555555555555";
/// Its client secret.
pub const MS_CLIENT_SECRET: &str = "ms~Secret.value_with/odd+chars=";
/// The client the refresh tokens are issued to.
pub const REFRESH_CLIENT_ID: &str = "postern-refresh-client";
/// Its client secret.
pub const REFRESH_CLIENT_SECRET: &str = "refresh-client-secret-9f8e";
/// Subject under which the Microsoft application's tokens are counted.
pub const APP_SUBJECT: &str = "app";

const GOOGLE_SCOPE: &str = "https://mail.google.com/";
const MS_SCOPE: &str = "https://outlook.office365.com/.default";
const DEFAULT_LIFETIME: u64 = 3600;

struct Issued {
    subject: String,
    expires: u64,
    revoked: bool,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, Issued>,
    refresh_tokens: HashMap<String, String>,
    grants: HashMap<String, u32>,
    lifetimes: HashMap<String, u64>,
    blocked: HashSet<String>,
    rotating: HashSet<String>,
    /// Why assertions or requests were refused, for failure messages.
    refusals: Vec<String>,
    /// Every secret handed out, to check none of them is ever logged.
    secrets: Vec<String>,
    /// Device authorizations by device code: the user code and, once decided, the subject
    /// approved (`Ok`) or the denial (`Err`).
    devices: HashMap<String, (String, Option<Result<String, ()>>)>,
}

/// The running token server.
pub struct TokenServer {
    /// `https://localhost:<port>`.
    pub base_url: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The service account key's PKCS#8 PEM (the file's `private_key`).
    pub private_key_pem: String,
    state: Arc<Mutex<State>>,
}

static SERVER: OnceLock<TokenServer> = OnceLock::new();

/// The shared token server, started on first use.
pub fn token_server() -> &'static TokenServer {
    SERVER.get_or_init(start)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn start() -> TokenServer {
    let key = RsaKeyPair::generate(KeySize::Rsa2048).expect("RSA key");
    let der = key.as_der().expect("PKCS#8 DER");
    let b64 = STANDARD.encode(der.as_ref());
    let body: Vec<&str> = b64.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).unwrap()).collect();
    let private_key_pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", body.join("\n"));
    let public_key = key.public_key().as_ref().to_vec();

    let dir = tempfile::Builder::new().prefix("postern-oauth-").tempdir().expect("token server dir").keep();
    let issued = pki::pki().issue_in("oauth", &dir);
    let tls = postern::tls::server_config(&issued.cert_file, &issued.key_file, TlsVersion::Tls12, None)
        .expect("token server TLS");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind token server");
    listener.set_nonblocking(true).expect("nonblocking");
    let addr = listener.local_addr().expect("token server address");
    let base_url = format!("https://localhost:{}", addr.port());
    let state = Arc::new(Mutex::new(State::default()));
    state.lock().unwrap().secrets.extend([MS_CLIENT_SECRET.to_owned(), REFRESH_CLIENT_SECRET.to_owned(), b64.clone()]);

    let shared = Shared {
        state: state.clone(),
        public_key,
        google_audience: format!("{base_url}/google/token"),
        base_url: base_url.clone(),
    };
    std::thread::Builder::new()
        .name("oauth-test-server".into())
        .spawn(move || {
            let runtime =
                tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
            runtime.block_on(serve(listener, TlsAcceptor::from(tls), Arc::new(shared)));
        })
        .expect("spawn token server");
    TokenServer { base_url, addr, private_key_pem, state }
}

struct Shared {
    state: Arc<Mutex<State>>,
    public_key: Vec<u8>,
    google_audience: String,
    base_url: String,
}

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = hyper::service::service_fn(move |request| {
                let shared = shared.clone();
                async move { Ok::<_, std::convert::Infallible>(handle(&shared, request).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())))
        .unwrap()
}

fn oauth_error(state: &mut State, error: &str, description: String) -> Response<Full<Bytes>> {
    state.refusals.push(format!("{error}: {description}"));
    json(StatusCode::BAD_REQUEST, serde_json::json!({"error": error, "error_description": description}))
}

/// Decodes an `application/x-www-form-urlencoded` body.
fn form(body: &[u8]) -> HashMap<String, String> {
    let decode = |s: &str| {
        let bytes = s.as_bytes();
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            match bytes[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < bytes.len() => {
                    let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                    out.push(hex.and_then(|h| u8::from_str_radix(h, 16).ok()).unwrap_or(b'?'));
                    i += 2;
                }
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    String::from_utf8_lossy(body)
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(k), decode(v))
        })
        .collect()
}

async fn handle(shared: &Shared, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path().to_owned();
    let is_form = request
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"application/x-www-form-urlencoded"));
    let post = request.method() == hyper::Method::POST;
    let body = match request.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return json(StatusCode::BAD_REQUEST, serde_json::json!({"error": "invalid_request"})),
    };
    let fields = form(&body);
    let mut state = shared.state.lock().unwrap();
    if !post || !is_form {
        return oauth_error(&mut state, "invalid_request", format!("expected a form POST to {path}"));
    }
    let field = |name: &str| fields.get(name).map(String::as_str).unwrap_or("");
    match path.as_str() {
        "/google/token" => {
            if field("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
                return oauth_error(&mut state, "unsupported_grant_type", field("grant_type").to_owned());
            }
            match verify_assertion(shared, field("assertion")) {
                Ok(subject) => issue(&mut state, &subject, GOOGLE_SCOPE, None),
                Err(why) => oauth_error(&mut state, "invalid_grant", why),
            }
        }
        p if p == format!("/ms/{TENANT}/oauth2/v2.0/token") => {
            if field("grant_type") != "client_credentials" {
                return oauth_error(&mut state, "unsupported_grant_type", field("grant_type").to_owned());
            }
            if field("client_id") != MS_CLIENT_ID || field("client_secret") != MS_CLIENT_SECRET {
                return oauth_error(&mut state, "invalid_client", "wrong client id or secret".into());
            }
            if field("scope") != MS_SCOPE {
                return oauth_error(&mut state, "invalid_scope", field("scope").to_owned());
            }
            issue(&mut state, APP_SUBJECT, MS_SCOPE, None)
        }
        "/refresh/device" => {
            if field("client_id") != REFRESH_CLIENT_ID {
                return oauth_error(&mut state, "invalid_client", "wrong client id".into());
            }
            let device_code = format!("dc-{}", random_hex(16));
            let user_code = format!("UC-{}", random_hex(4).to_uppercase());
            state.devices.insert(device_code.clone(), (user_code.clone(), None));
            state.secrets.push(device_code.clone());
            let page = format!("{}/device", shared.base_url);
            json(
                StatusCode::OK,
                serde_json::json!({
                    "device_code": device_code, "user_code": user_code, "verification_uri": page,
                    "verification_uri_complete": format!("{page}?user_code={user_code}"),
                    "expires_in": 600, "interval": 1,
                }),
            )
        }
        "/refresh/token" if field("grant_type") == "urn:ietf:params:oauth:grant-type:device_code" => {
            if field("client_id") != REFRESH_CLIENT_ID || field("client_secret") != REFRESH_CLIENT_SECRET {
                return oauth_error(&mut state, "invalid_client", "wrong client id or secret".into());
            }
            match state.devices.get(field("device_code")).map(|(_, decision)| decision.clone()) {
                None => oauth_error(&mut state, "invalid_grant", "unknown device code".into()),
                Some(None) => oauth_error(&mut state, "authorization_pending", "not decided yet".into()),
                Some(Some(Err(()))) => oauth_error(&mut state, "access_denied", "denied at the page".into()),
                Some(Some(Ok(subject))) => {
                    state.devices.remove(field("device_code"));
                    let refresh = format!("rt-{}", random_hex(16));
                    state.refresh_tokens.insert(refresh.clone(), subject.clone());
                    state.secrets.push(refresh.clone());
                    issue(&mut state, &subject, "mail", Some(refresh))
                }
            }
        }
        "/refresh/token" => {
            if field("grant_type") != "refresh_token" {
                return oauth_error(&mut state, "unsupported_grant_type", field("grant_type").to_owned());
            }
            if field("client_id") != REFRESH_CLIENT_ID || field("client_secret") != REFRESH_CLIENT_SECRET {
                return oauth_error(&mut state, "invalid_client", "wrong client id or secret".into());
            }
            let Some(user) = state.refresh_tokens.get(field("refresh_token")).cloned() else {
                *state.grants.entry("refresh:unknown".into()).or_default() += 1;
                return oauth_error(&mut state, "invalid_grant", "unknown or revoked refresh token".into());
            };
            let rotated = state.rotating.contains(&user).then(|| {
                state.refresh_tokens.remove(field("refresh_token"));
                let new = format!("rt-{}", random_hex(16));
                state.refresh_tokens.insert(new.clone(), user.clone());
                state.secrets.push(new.clone());
                new
            });
            issue(&mut state, &user, "mail", rotated)
        }
        "/introspect/user" | "/introspect/app" => {
            let now = now();
            let app = path.ends_with("/app");
            let answer = match state.tokens.get(field("token")) {
                Some(t) if (t.subject == APP_SUBJECT) == app => {
                    let active = !t.revoked && t.expires > now && !state.blocked.contains(&t.subject);
                    let email = if app { "app@example.com".to_owned() } else { t.subject.clone() };
                    serde_json::json!({"active": active, "email": email, "exp": t.expires})
                }
                _ => serde_json::json!({"active": false, "email": "unknown-token@invalid"}),
            };
            json(StatusCode::OK, answer)
        }
        _ => json(StatusCode::NOT_FOUND, serde_json::json!({"error": "not_found"})),
    }
}

fn issue(state: &mut State, subject: &str, scope: &str, refresh_token: Option<String>) -> Response<Full<Bytes>> {
    *state.grants.entry(subject.to_owned()).or_default() += 1;
    let lifetime = state.lifetimes.get(subject).copied().unwrap_or(DEFAULT_LIFETIME);
    let token = format!("at-{}", random_hex(24));
    state
        .tokens
        .insert(token.clone(), Issued { subject: subject.to_owned(), expires: now() + lifetime, revoked: false });
    state.secrets.push(token.clone());
    let mut answer =
        serde_json::json!({"access_token": token, "token_type": "Bearer", "expires_in": lifetime, "scope": scope});
    if let Some(r) = refresh_token {
        answer["refresh_token"] = r.into();
    }
    json(StatusCode::OK, answer)
}

/// Checks the assertion's signature and claims; the subject it acts for.
fn verify_assertion(shared: &Shared, jwt: &str) -> Result<String, String> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else { return Err("not three JWT parts".into()) };
    let decode = |p: &str| URL_SAFE_NO_PAD.decode(p).map_err(|e| format!("bad base64url: {e}"));
    let signature = decode(signature)?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &shared.public_key)
        .verify(format!("{header}.{claims}").as_bytes(), &signature)
        .map_err(|_| "signature does not verify".to_owned())?;
    let header: serde_json::Value = serde_json::from_slice(&decode(header)?).map_err(|e| e.to_string())?;
    if header["alg"] != "RS256" || header["typ"] != "JWT" {
        return Err(format!("header {header}"));
    }
    let claims: serde_json::Value = serde_json::from_slice(&decode(claims)?).map_err(|e| e.to_string())?;
    let (iat, exp) = (claims["iat"].as_u64().unwrap_or(0), claims["exp"].as_u64().unwrap_or(0));
    let checks = [
        (claims["iss"] == SERVICE_ACCOUNT, "iss"),
        (claims["scope"] == GOOGLE_SCOPE, "scope"),
        (claims["aud"] == shared.google_audience.as_str(), "aud"),
        (iat.abs_diff(now()) <= 60, "iat"),
        (exp == iat + 3600, "exp"),
        (claims["sub"].as_str().is_some_and(|s| s.contains('@')), "sub"),
    ];
    if let Some((_, claim)) = checks.iter().find(|(ok, _)| !ok) {
        return Err(format!("claim {claim} is wrong in {claims}"));
    }
    let subject = claims["sub"].as_str().unwrap_or_default().to_owned();
    if claims.as_object().map(|o| o.len()) != Some(6) {
        return Err(format!("unexpected claims {claims}"));
    }
    Ok(subject)
}

impl TokenServer {
    /// URL of the Google-style token endpoint (the key file's `token_uri`).
    pub fn google_token_url(&self) -> String {
        format!("{}/google/token", self.base_url)
    }

    /// URL of Dovecot's introspection endpoint for per-user or application tokens.
    pub fn introspection_url(&self, app: bool) -> String {
        format!("{}/introspect/{}", self.base_url, if app { "app" } else { "user" })
    }

    /// How many tokens were issued (or, for `refresh:unknown`, refused) for `subject`.
    pub fn grants(&self, subject: &str) -> u32 {
        self.state.lock().unwrap().grants.get(subject).copied().unwrap_or(0)
    }

    /// Tokens issued for `subject` from now on live `secs` seconds.
    pub fn set_lifetime(&self, subject: &str, secs: u64) {
        self.state.lock().unwrap().lifetimes.insert(subject.to_owned(), secs);
    }

    /// Revokes every token issued for `subject` so far; new ones work.
    pub fn revoke_issued(&self, subject: &str) {
        for t in self.state.lock().unwrap().tokens.values_mut().filter(|t| t.subject == subject) {
            t.revoked = true;
        }
    }

    /// Ends every token issued for `subject` so far, as if its lifetime had run out: the
    /// introspection endpoint answers `active: false` for it; new ones work.
    pub fn expire_issued(&self, subject: &str) {
        let past = now().saturating_sub(1);
        for t in self.state.lock().unwrap().tokens.values_mut().filter(|t| t.subject == subject) {
            t.expires = t.expires.min(past);
        }
    }

    /// Makes the introspection endpoint refuse every token of `subject`.
    pub fn block(&self, subject: &str) {
        self.state.lock().unwrap().blocked.insert(subject.to_owned());
    }

    /// Issues a refresh token for `user`; with `rotate`, each use replaces it.
    pub fn new_refresh_token(&self, user: &str, rotate: bool) -> String {
        let token = format!("rt-{}", random_hex(16));
        let mut state = self.state.lock().unwrap();
        state.refresh_tokens.insert(token.clone(), user.to_owned());
        state.secrets.push(token.clone());
        if rotate {
            state.rotating.insert(user.to_owned());
        }
        token
    }

    /// Decides the device authorization with `user_code`, as the person at the verification
    /// page would: approved for `subject`, or denied (`None`).
    pub fn decide_device(&self, user_code: &str, subject: Option<&str>) {
        let mut state = self.state.lock().unwrap();
        let entry = state.devices.values_mut().find(|(code, _)| code == user_code).expect("a device code was issued");
        entry.1 = Some(subject.map(str::to_owned).ok_or(()));
    }

    /// Whether `token` is a refresh token the server would accept now.
    pub fn refresh_token_valid(&self, token: &str) -> bool {
        self.state.lock().unwrap().refresh_tokens.contains_key(token)
    }

    /// Every secret the server knows or handed out (tokens, client secrets, key body).
    pub fn secrets(&self) -> Vec<String> {
        self.state.lock().unwrap().secrets.clone()
    }

    /// Requests refused so far, with the reason.
    pub fn refusals(&self) -> Vec<String> {
        self.state.lock().unwrap().refusals.clone()
    }

    /// Writes a service account JSON key file (mode 0600) into `dir`, with `token_uri`.
    pub fn write_google_key(&self, dir: &Path, token_uri: &str) -> PathBuf {
        let path = dir.join("service-account.json");
        let key = serde_json::json!({
            "type": "service_account",
            "project_id": "postern-tests",
            "private_key_id": "0123456789abcdef",
            "private_key": self.private_key_pem,
            "client_email": SERVICE_ACCOUNT,
            "client_id": "100000000000000000001",
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": token_uri,
        });
        write_private(&path, &serde_json::to_string_pretty(&key).unwrap());
        path
    }
}

/// Writes `text` to `path` with mode 0600.
pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write private file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

/// Which token source a test proxy uses.
pub enum Source {
    /// Google service account; the key file's `token_uri` is the test server's unless given.
    Google { token_uri: Option<String> },
    /// Microsoft client credentials for the test tenant.
    Microsoft,
    /// Refresh tokens in the vault.
    Refresh,
}

/// A proxy whose three upstreams log in with XOAUTH2, started in-process.
pub struct OAuthProxy {
    /// Bound IMAPS address.
    pub imaps: SocketAddr,
    /// Bound POP3S address.
    pub pop3s: SocketAddr,
    /// Bound SMTPS address.
    pub smtps: SocketAddr,
    /// The CA clients must trust.
    pub ca_file: PathBuf,
    /// The running server (for its token source and metrics).
    pub server: Arc<ProxyState>,
    /// The admin console's address, when the config has a `[console]` table.
    pub console: Option<SocketAddr>,
    /// The config text, for tests that tweak and reload it.
    pub config_text: String,
    config: Config,
    running: Option<Running>,
    /// The temporary folder of config, keys and state.
    pub dir: tempfile::TempDir,
}

/// The config text of a test proxy using `source`, with `[oauth]` extras appended.
pub fn config_text(dir: &Path, source: &Source, oauth_extra: &str) -> String {
    let tokens = token_server();
    let pki = pki::pki();
    let issued = pki.issue_in("proxy", dir);
    let dovecot = dovecot::dovecot();
    let s = slapd::slapd();
    let oauth = match source {
        Source::Google { token_uri } => {
            let uri = token_uri.clone().unwrap_or_else(|| tokens.google_token_url());
            let key = tokens.write_google_key(dir, &uri);
            format!("source = \"google-service-account\"\nservice_account_key = {:?}\n", key.display().to_string())
        }
        Source::Microsoft => {
            write_private(&dir.join("ms-secret"), &format!("{MS_CLIENT_SECRET}\n"));
            format!(
                "source = \"microsoft\"\ntenant = {TENANT:?}\nclient_id = {MS_CLIENT_ID:?}\nclient_secret_file = \"ms-secret\"\ntoken_url = \"{}/ms/{TENANT}/oauth2/v2.0/token\"\n",
                tokens.base_url
            )
        }
        Source::Refresh => {
            write_private(&dir.join("refresh-secret"), REFRESH_CLIENT_SECRET);
            format!(
                "source = \"refresh-token\"\ntoken_url = \"{}/refresh/token\"\nclient_id = {REFRESH_CLIENT_ID:?}\nclient_secret_file = \"refresh-secret\"\n",
                tokens.base_url
            )
        }
    };
    let ca = pki.ca_file.display().to_string();
    format!(
        r#"
[server]
hostname = "proxy.test"
state_dir = "state"
shutdown_grace_secs = 1

[tls]
cert = {cert:?}
key = {key:?}

[limits]
upstream_timeout_secs = 5

[directory]
kind = "ldap"
url = {url:?}
bind_dn = {bind_dn:?}
bind_password = {bind_password:?}
base_dn = {base_dn:?}
timeout_secs = 3

[access]
profiles = "profiles.toml"

[imap]
listen = ["127.0.0.1:0"]
upstream = "localhost:{imap}"
upstream_ca_file = {ca:?}
upstream_auth = "xoauth2"

[pop3]
listen = ["127.0.0.1:0"]
upstream = "localhost:{pop3}"
upstream_ca_file = {ca:?}
upstream_auth = "xoauth2"

[smtp]
listen = ["127.0.0.1:0"]
upstream = "localhost:{smtp}"
upstream_ca_file = {ca:?}
upstream_auth = "xoauth2"

[oauth]
{oauth}ca_file = {ca:?}
timeout_secs = 3
{oauth_extra}
"#,
        cert = issued.cert_file.display().to_string(),
        key = issued.key_file.display().to_string(),
        url = s.url,
        bind_dn = s.service_dn,
        bind_password = s.service_password,
        base_dn = s.base_dn,
        imap = dovecot.imaps.port(),
        pop3 = dovecot.pop3s.port(),
        smtp = dovecot.submissions.port(),
    )
}

impl OAuthProxy {
    /// Starts a proxy using `source`, letting `users` in from 127.0.0.1; `oauth_extra` is
    /// appended to the `[oauth]` table.
    pub async fn start(source: Source, users: &[&str], oauth_extra: &str) -> OAuthProxy {
        Self::start_edited(source, users, oauth_extra, |text, _| text).await
    }

    /// Like [`OAuthProxy::start`], with the config text passed through `edit` (given the
    /// proxy's folder, for files the edit names) first.
    pub async fn start_edited(
        source: Source,
        users: &[&str],
        oauth_extra: &str,
        edit: impl FnOnce(String, &Path) -> String,
    ) -> OAuthProxy {
        super::logs::capture();
        let dir = tempfile::tempdir().expect("proxy temp dir");
        let text = edit(config_text(dir.path(), &source, oauth_extra), dir.path());
        let config_path = dir.path().join("proxy.toml");
        std::fs::write(&config_path, &text).expect("write config");
        std::fs::write(dir.path().join("profiles.toml"), super::proxy::profile_for(users)).expect("write profiles");
        let config = Config::load(&config_path).expect("test config is valid");
        let server = ProxyState::from_config(&config).await.expect("proxy starts");
        let running = daemon::start(server.clone(), &config, Duration::from_secs(1)).await.expect("proxy listens");
        let addr = |p: postern::protocol::Protocol| running.addresses[&p][0];
        OAuthProxy {
            imaps: addr(postern::protocol::Protocol::Imap),
            pop3s: addr(postern::protocol::Protocol::Pop3),
            smtps: addr(postern::protocol::Protocol::Smtp),
            ca_file: pki::pki().ca_file.clone(),
            console: running.console_address,
            server,
            config_text: text,
            config,
            running: Some(running),
            dir,
        }
    }

    /// The proxy's state folder (vault).
    pub fn state_dir(&self) -> PathBuf {
        self.config.resolve(&self.config.server.state_dir)
    }

    /// Stores `refresh_token` as `user`'s upstream credential and reloads the vault.
    pub fn store_refresh_token(&self, user: &str, refresh_token: &str) {
        let mut vault = Vault::open(&self.state_dir()).expect("vault");
        vault.set(user, UpstreamSecret::refresh_token(Secret::new(refresh_token))).expect("vault set");
        self.server.upstreams.set_vault(Vault::open(&self.state_dir()).expect("vault"));
    }

    /// Re-reads the vault, as a reload does (after an admin command changed it).
    pub fn reload_vault(&self) {
        self.server.upstreams.set_vault(Vault::open(&self.state_dir()).expect("vault"));
    }

    /// The refresh token stored for `user` now.
    pub fn stored_refresh_token(&self, user: &str) -> String {
        let vault = Vault::open(&self.state_dir()).expect("vault");
        vault.get(user).expect("vault get").expect("entry").secret.expose().to_owned()
    }

    /// Stops the proxy.
    pub async fn stop(mut self) {
        if let Some(running) = self.running.take() {
            running.stop().await;
        }
    }
}

/// A user in slapd (directory password `password`) with a Dovecot mailbox whose password
/// nobody uses: the proxy gets in with tokens only.
pub fn add_user(uid: &str, password: &str) -> String {
    let mail = format!("{uid}@example.com");
    slapd::slapd().add_user(uid, &mail, password, &[]);
    dovecot::dovecot().add_user(&mail, &format!("unused-{}", random_hex(8)));
    mail
}
