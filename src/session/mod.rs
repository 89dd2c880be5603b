//! One client connection from TLS accept to the end of the splice: the pipeline all three
//! protocols share. Only the [`Dialogue`] differs between them.
//!
//! On a STARTTLS listener the connection starts in plaintext with the protocol's pre-TLS
//! dialogue ([`protocol::pre_tls_dialogue`]), which can only offer the upgrade. When the
//! client asks for it, every byte still buffered is dropped (commands pipelined after
//! STARTTLS are never executed, the CVE-2011-0411 class), the TLS handshake runs, and the
//! session goes on exactly as on an implicit TLS listener, with a new dialogue and no
//! greeting. One pre-login deadline covers the plaintext part, the handshake and the login.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::Instrument;

use crate::audit::{Event, Outcome, SessionRecord};
use crate::metrics::LoginResult;
use crate::protocol::limits::MAX_LOGIN_ATTEMPTS;
use crate::protocol::{self, Credentials, Dialogue, Protocol, Step};
use crate::state::{Shutdown, State};
use crate::tls::stream::ServerTls;

pub mod budget;
pub mod registry;
pub mod relay;

use budget::Claim;
use relay::Counters;

use crate::access::certificate::PresentedCertificate;
use crate::access::decision::{self, Admitted, Refusal};
use crate::access::slots::IpSlot;

/// Bytes the input buffer grows by when it is full before login; the first such step of
/// each connection is free, what comes after is taken from the pre-login buffer budget.
const READ_CHUNK: usize = 1024;

/// Runs the session of a client whose TLS handshake is done, and writes its audit line.
/// `peer` is the client's address: the connecting peer's, or the one a trusted balancer
/// (`via`) named in its PROXY protocol header. `address_slot` is that address's connection
/// slot; `None` when the address was over its limit, and the session only says so and
/// closes. `certificate` is what the client presented in the handshake.
///
/// Not an `async fn`: the session is built here and moved once into the future that runs
/// it, instead of being kept as an argument beside that future for the connection's life.
#[allow(clippy::too_many_arguments)]
pub fn run<S>(
    server: Arc<State>,
    protocol: Protocol,
    client: S,
    peer: SocketAddr,
    via: Option<SocketAddr>,
    shutdown: Shutdown,
    address_slot: Option<IpSlot>,
    certificate: Option<PresentedCertificate>,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut session = Session::new(server.clone(), protocol, client, peer, via, shutdown, true);
    session.presented(certificate);
    audited(server, protocol, peer, via, async move {
        session.serve(address_slot).await;
        session.record
    })
}

/// Runs the session of a client on a STARTTLS listener, from the plaintext greeting on,
/// and writes its audit line. As [`run`], plus `handshake_slot`: the client address's
/// unfinished-handshake slot, held until the TLS handshake after STARTTLS is done.
#[allow(clippy::too_many_arguments)]
pub fn run_starttls<S>(
    server: Arc<State>,
    protocol: Protocol,
    client: S,
    peer: SocketAddr,
    via: Option<SocketAddr>,
    shutdown: Shutdown,
    address_slot: Option<IpSlot>,
    handshake_slot: IpSlot,
) -> impl Future<Output = ()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let session = Session::new(server.clone(), protocol, client, peer, via, shutdown, false);
    audited(server, protocol, peer, via, serve_starttls(session, address_slot, handshake_slot))
}

/// Runs `session` in the connection's span, counted as active while it runs, and writes the
/// audit line of the record it returns.
///
/// The session's future is boxed: it lives as long as the connection, and awaiting it
/// inline would store it twice in the connection's task (once as captured, once as
/// awaited), which an `async` wrapper cannot avoid.
fn audited(
    server: Arc<State>,
    protocol: Protocol,
    peer: SocketAddr,
    via: Option<SocketAddr>,
    session: impl Future<Output = SessionRecord>,
) -> impl Future<Output = ()> {
    let via_text = via.map_or_else(|| "-".to_owned(), |v| v.to_string());
    let span = tracing::info_span!("session", protocol = protocol.name(), peer = %peer, via = %via_text);
    let session = Box::pin(session);
    async move {
        let _active = server.metrics().session_started(protocol);
        let record = session.await;
        server.audit(&record, Event::Session);
    }
    .instrument(span)
}

/// A STARTTLS session: the plaintext part, the upgrade, then the same pipeline as on an
/// implicit TLS listener. Returns the record to audit.
async fn serve_starttls<S>(mut plain: Session<S>, address_slot: Option<IpSlot>, handshake_slot: IpSlot) -> SessionRecord
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Some(_address_slot) = address_slot else {
        plain.too_many_connections().await;
        return plain.record;
    };
    match plain.pre_login().await {
        PreLogin::StartTls => {}
        // The pre-TLS dialogue never yields a login; a session never splices in plaintext.
        PreLogin::Admitted(_) | PreLogin::Ended => {
            plain.close().await;
            return plain.record;
        }
    }
    let mut tls = match plain.start_tls(handshake_slot).await {
        Ok(tls) => tls,
        Err(record) => return record,
    };
    match tls.pre_login().await {
        PreLogin::Admitted(admitted) => tls.splice(admitted).await,
        PreLogin::StartTls | PreLogin::Ended => {
            tls.close().await;
        }
    }
    tls.record
}

/// How the pre-login dialogue ended.
enum PreLogin {
    /// Logged in upstream: splice. Boxed: the other outcomes carry nothing.
    Admitted(Box<Admitted>),
    /// The client asked for TLS on a STARTTLS listener, and was told to go ahead.
    StartTls,
    /// The connection ended without a login.
    Ended,
}

struct Session<S> {
    server: Arc<State>,
    protocol: Protocol,
    dialogue: Box<dyn Dialogue>,
    client: S,
    peer: SocketAddr,
    input: BytesMut,
    /// This connection's share of the pre-login buffer budget.
    claim: Claim,
    record: SessionRecord,
    shutdown: Shutdown,
    /// The end of the pre-login time: from the connection's start, across a STARTTLS.
    deadline: Instant,
    /// Whether the client connection is TLS already. Only then may a login be decided.
    encrypted: bool,
    /// The greeting is still to be sent: not after STARTTLS.
    greet: bool,
    /// The certificate the client presented in the TLS handshake.
    certificate: Option<PresentedCertificate>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Session<S> {
    /// A session for a new connection: `encrypted` on implicit TLS listeners (with the
    /// protocol's dialogue), plaintext with the pre-TLS dialogue otherwise.
    fn new(
        server: Arc<State>,
        protocol: Protocol,
        client: S,
        peer: SocketAddr,
        via: Option<SocketAddr>,
        shutdown: Shutdown,
        encrypted: bool,
    ) -> Self {
        let mut record = SessionRecord::new(protocol, peer, &server.default_upstream(protocol));
        record.via = via;
        let settings = server.dialogue_settings(protocol);
        let dialogue = if encrypted {
            protocol::dialogue(protocol, &settings)
        } else {
            protocol::pre_tls_dialogue(protocol, &settings)
        };
        Session {
            dialogue,
            claim: server.preauth_budget.claim(),
            deadline: Instant::now() + server.limits.preauth_timeout(),
            server,
            protocol,
            client,
            peer,
            // Sized by what arrives (see `read_more`), not ahead of it.
            input: BytesMut::new(),
            record,
            shutdown,
            encrypted,
            greet: true,
            certificate: None,
        }
    }

    /// Notes the certificate the client presented in the TLS handshake, for the decision
    /// and the audit line.
    fn presented(&mut self, certificate: Option<PresentedCertificate>) {
        self.record.certificate = certificate.as_ref().map(|c| c.id.to_string());
        self.certificate = certificate;
    }

    async fn serve(&mut self, address_slot: Option<IpSlot>) {
        let Some(_address_slot) = address_slot else {
            self.too_many_connections().await;
            return;
        };
        match self.pre_login().await {
            PreLogin::Admitted(admitted) => self.splice(admitted).await,
            PreLogin::StartTls | PreLogin::Ended => {
                self.close().await;
            }
        }
    }

    /// Closes the client connection (TLS close_notify, then the transport), within the
    /// handshake timeout: a client that stopped reading cannot hold the session open.
    async fn close(&mut self) {
        let limit = self.server.limits.handshake_timeout();
        let _ = tokio::time::timeout(limit, self.client.shutdown()).await;
    }

    /// Says the client's address holds too many connections, and closes.
    async fn too_many_connections(&mut self) {
        let limit = self.server.sessions.per_ip();
        self.record.set(Outcome::Busy, format!("too many connections from the client IP (limit {limit})"));
        let bye = self.dialogue.too_many_connections();
        let _ = self.write(&bye, Instant::now() + self.server.limits.handshake_timeout()).await;
        self.close().await;
    }

    /// The TLS handshake after STARTTLS, within the handshake timeout and the pre-login
    /// deadline; the session goes on over TLS with the protocol's dialogue and no greeting.
    /// The record to audit when the handshake fails.
    async fn start_tls(self, handshake_slot: IpSlot) -> Result<Session<ServerTls<S>>, SessionRecord> {
        let Session { server, protocol, client, peer, mut record, shutdown, deadline, claim, .. } = self;
        let limit = deadline.min(Instant::now() + server.limits.handshake_timeout());
        let handshake = tokio::time::timeout_at(limit, server.tls().accept(client)).await;
        drop(handshake_slot);
        let client = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                server.metrics().tls_failure(protocol);
                record.set(Outcome::Abandoned, format!("TLS handshake after STARTTLS failed: {e}"));
                return Err(record);
            }
            Err(_) => {
                server.metrics().tls_failure(protocol);
                record.set(Outcome::TimedOut, "no TLS handshake after STARTTLS in time");
                return Err(record);
            }
        };
        let dialogue = protocol::dialogue(protocol, &server.dialogue_settings(protocol));
        let certificate = PresentedCertificate::from_handshake(client.tls().peer_certificates());
        let mut session = Session {
            server,
            protocol,
            dialogue,
            client,
            peer,
            input: BytesMut::new(),
            claim,
            record,
            shutdown,
            deadline,
            encrypted: true,
            greet: false,
            certificate: None,
        };
        session.presented(certificate);
        Ok(session)
    }

    /// The pre-login dialogue, bounded by the pre-login deadline: greeting (unless the
    /// session continues after STARTTLS), commands, logins.
    async fn pre_login(&mut self) -> PreLogin {
        match self.dialogue_loop().await {
            Some(outcome) => outcome,
            None => PreLogin::Ended,
        }
    }

    /// See [`Session::pre_login`]; `None` when the connection ended without a login.
    async fn dialogue_loop(&mut self) -> Option<PreLogin> {
        let deadline = self.deadline;
        // After STARTTLS the client speaks first (IMAP CAPABILITY, POP3 CAPA, SMTP EHLO).
        if std::mem::take(&mut self.greet) {
            let greeting = self.dialogue.greeting();
            self.write(&greeting, deadline).await?;
        }
        loop {
            let started = std::time::Instant::now();
            let step = self.dialogue.step(&mut self.input);
            // A step only ever frees buffered bytes: give them back.
            self.claim.resize(self.buffered());
            let decision = match step {
                Step::Literal(size) => {
                    let granted = self.claim.resize(self.buffered().saturating_add(size));
                    if !granted {
                        tracing::debug!(
                            size,
                            budget = self.server.preauth_budget.limit(),
                            "literal refused: the pre-login buffer budget is spent"
                        );
                    }
                    self.dialogue.literal_room(granted);
                    continue;
                }
                Step::NeedMore => {
                    self.read_more(deadline).await?;
                    continue;
                }
                Step::Reply(bytes) => {
                    self.write(&bytes, deadline).await?;
                    continue;
                }
                Step::Close(bytes) => {
                    self.record.set(
                        Outcome::Abandoned,
                        "the pre-login dialogue ended the connection (logout or a protocol limit)",
                    );
                    let _ = self.write(&bytes, deadline).await;
                    return None;
                }
                Step::StartTls(reply) => {
                    if self.encrypted {
                        self.record.set(Outcome::ProtocolError, "STARTTLS on a connection already using TLS");
                        return None;
                    }
                    // Whatever the client sent after the command is plaintext it must not
                    // be able to inject into the TLS session: dropped before anything else.
                    let dropped = self.input.len();
                    self.input = BytesMut::new();
                    self.claim.resize(self.buffered());
                    if dropped > 0 {
                        tracing::debug!(bytes = dropped, "dropped plaintext sent after STARTTLS");
                    }
                    self.write(&reply, deadline).await?;
                    return Some(PreLogin::StartTls);
                }
                Step::Login(_) if !self.encrypted => {
                    // Pre-TLS dialogues never yield one; a password is never checked in plaintext.
                    self.record.set(Outcome::ProtocolError, "login offered before TLS");
                    return None;
                }
                Step::Login(credentials) => {
                    self.attempt(Some(&credentials.user), credentials.mechanism);
                    self.record.mode = (!credentials.upstream_prefix.is_empty()).then_some("recent");
                    // Boxed at once: an admitted login is large, and would otherwise take
                    // room in every connection's future.
                    self.decide(&credentials, deadline).await?.map(Box::new)
                }
                Step::Refused(rejected) => {
                    self.attempt(rejected.user.as_deref(), rejected.mechanism);
                    if rejected.fault == protocol::CredentialFault::TlsRequired {
                        // Nothing the client sent with it is kept, not even a user name.
                        self.record.user = None;
                    }
                    self.record.mode = None;
                    Err(decision::refuse(&self.server, self.peer.ip(), rejected.fault).await)
                }
            };
            self.count_login(&decision, started.elapsed());
            match decision {
                Ok(admitted) => {
                    // Whatever is still buffered is forwarded at once, outside the budget.
                    self.claim.resize(0);
                    let reply = self.dialogue.accepted(&admitted.upstream.info);
                    self.write(&reply, deadline).await?;
                    self.record.profile = Some(admitted.grant.to_string());
                    self.record.route = Some(admitted.route.name.clone());
                    self.record.upstream.clone_from(&admitted.route.upstream);
                    self.record.app_password.clone_from(&admitted.app_password);
                    return Some(PreLogin::Admitted(admitted));
                }
                Err(Refusal::Denied(denial)) => {
                    self.record.set(Outcome::Denied, denial.reason());
                    self.server.audit(&self.record, Event::LoginRefused);
                    // Slow down guessing without holding a thread; shutdown cuts it short.
                    let delay = self.server.counters.failure_delay(self.peer.ip()).await;
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = self.shutdown.stop_accepting.cancelled() => {}
                    }
                    let reply = self.dialogue.denied();
                    self.write(&reply, deadline).await?;
                }
                Err(Refusal::Unavailable(reason)) => {
                    self.record.set(Outcome::Unavailable, reason.to_string());
                    self.server.audit(&self.record, Event::LoginRefused);
                    let reply = self.dialogue.unavailable();
                    self.write(&reply, deadline).await?;
                }
            }
            if self.record.attempts >= MAX_LOGIN_ATTEMPTS {
                return None;
            }
        }
    }

    /// Counts one more login attempt and notes who tried (normalized; `(invalid)` when the
    /// name is unusable) and how.
    fn attempt(&mut self, user: Option<&str>, mechanism: &'static str) {
        self.record.attempts += 1;
        let user = user.and_then(|user| decision::normalize_user(user).ok());
        self.record.user = Some(user.unwrap_or_else(|| "(invalid)".into()));
        self.record.mechanism = Some(mechanism);
    }

    /// Runs the access decision for `credentials` within the pre-login deadline; `None`
    /// (with the record updated and the client told) when the deadline or a shutdown came
    /// first.
    async fn decide(&mut self, credentials: &Credentials, deadline: Instant) -> Option<Result<Admitted, Refusal>> {
        // Boxed: the decision's future is large and only lives during a login, so it must
        // not sit inline in every idle session's future.
        let admit =
            Box::pin(decision::admit(&self.server, self.protocol, self.peer, credentials, self.certificate.as_ref()));
        tokio::select! {
            decision = admit => Some(decision),
            // Time queued for the directory or the hashing pool counts too.
            () = tokio::time::sleep_until(deadline) => {
                self.record.set(Outcome::TimedOut, "no login decision within the pre-login timeout");
                let bye = self.dialogue.timed_out();
                let _ = self.write(&bye, Instant::now() + self.server.limits.handshake_timeout()).await;
                None
            }
            () = self.shutdown.stop_accepting.cancelled() => {
                self.record.set(Outcome::Shutdown, "server shut down during login");
                let bye = self.dialogue.shutting_down();
                let _ = self.write(&bye, deadline).await;
                None
            }
        }
    }

    /// Updates the login metrics and the user's last upstream result.
    fn count_login(&self, decision: &Result<Box<Admitted>, Refusal>, elapsed: std::time::Duration) {
        let metrics = self.server.metrics();
        metrics.login_latency.observe(elapsed);
        let user = self.record.user.as_deref().unwrap_or("-");
        let last = self.server.last_results();
        match decision {
            Ok(_) => {
                metrics.login(LoginResult::OK);
                last.record(user, self.protocol, true, "OK");
            }
            Err(refusal) => {
                metrics.login(refusal.labels());
                if refusal.is_upstream() {
                    last.record(user, self.protocol, false, refusal.to_string());
                }
            }
        }
    }

    /// Bytes this connection buffers before login that count against the budget: the
    /// input buffer beyond its free first chunk, and what the dialogue holds.
    fn buffered(&self) -> usize {
        self.input.capacity().saturating_sub(READ_CHUNK).saturating_add(self.dialogue.held())
    }

    /// Reads more client input; `None` (with the record updated) when the session must end.
    /// The buffer grows only when it is full, and only within the budget.
    async fn read_more(&mut self, deadline: Instant) -> Option<()> {
        if self.input.len() == self.input.capacity() {
            self.input.reserve(READ_CHUNK);
            if !self.claim.resize(self.buffered()) {
                self.record.set(Outcome::Busy, "the pre-login buffer budget is spent");
                let bye = self.dialogue.busy();
                let _ = self.write(&bye, deadline).await;
                return None;
            }
        }
        let read = tokio::select! {
            read = tokio::time::timeout_at(deadline, self.client.read_buf(&mut self.input)) => read,
            () = self.shutdown.stop_accepting.cancelled() => {
                self.record.set(Outcome::Shutdown, "server shut down before login");
                let bye = self.dialogue.shutting_down();
                let _ = self.write(&bye, deadline).await;
                return None;
            }
        };
        match read {
            Err(_) => {
                if self.record.attempts == 0 {
                    self.record.set(Outcome::TimedOut, "no login within the pre-login timeout");
                }
                let bye = self.dialogue.timed_out();
                let _ = self.write(&bye, deadline + self.server.limits.handshake_timeout()).await;
                None
            }
            Ok(Ok(0)) => None,
            Ok(Ok(_)) => Some(()),
            // A client that simply hangs up without a TLS close_notify is still just leaving.
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => None,
            Ok(Err(e)) => {
                if self.record.attempts == 0 {
                    self.record.set(Outcome::Abandoned, format!("client connection failed before login: {e}"));
                }
                None
            }
        }
    }

    /// Writes to the client before login; `None` when the client cannot be written to in time.
    async fn write(&mut self, bytes: &[u8], deadline: Instant) -> Option<()> {
        let write = async {
            self.client.write_all(bytes).await?;
            self.client.flush().await
        };
        match tokio::time::timeout_at(deadline, write).await {
            Ok(Ok(())) => Some(()),
            _ => None,
        }
    }

    /// Forwards what each side already sent, then splices until the session ends.
    ///
    /// Everything the login produced besides the upstream stream and the session slot (the
    /// box, the grant, what the client's success reply needed) is freed before the session
    /// settles in: an idle session keeps only what it uses.
    async fn splice(&mut self, admitted: Box<Admitted>) {
        // Taken apart in a block of its own: the box and the parts not kept are freed here,
        // and the future keeps no room for them while the session lasts.
        let (mut upstream_stream, leftover, _slot, route, app_password) = {
            let admitted = admitted;
            let Admitted { upstream, slot, grant, route, app_password } = *admitted;
            drop(grant);
            let crate::upstream::LoggedIn { stream, leftover, info } = upstream;
            drop(info);
            (stream, leftover, slot, route, app_password)
        };
        let counters = Arc::new(Counters::default());
        // The login buffers are not needed while the session lives; only what they hold is.
        let pipelined = std::mem::take(&mut self.input);
        if !pipelined.is_empty() {
            if upstream_stream.write_all(&pipelined).await.is_err() || upstream_stream.flush().await.is_err() {
                self.record.set(Outcome::LoggedIn, "upstream failed right after login");
                return;
            }
            counters.up.fetch_add(pipelined.len() as u64, Ordering::Relaxed);
        }
        drop(pipelined);
        if !leftover.is_empty() {
            if self.client.write_all(&leftover).await.is_err() || self.client.flush().await.is_err() {
                self.record.set(Outcome::LoggedIn, "client failed right after login");
                return;
            }
            counters.down.fetch_add(leftover.len() as u64, Ordering::Relaxed);
        }
        drop(leftover);
        let idle = self.server.limits.idle_timeout();
        let close = self.shutdown.close_sessions.clone();
        let server = self.server.clone();
        let user = self.record.user.clone().unwrap_or_default();
        let certificate = self.certificate.clone();
        let registration =
            server.live().register(user, self.protocol, self.peer.ip(), route, certificate, app_password);
        registration.track(counters.clone());
        let revoked = registration.revoked();
        let end = relay::splice(&mut self.client, &mut upstream_stream, idle, counters.clone(), async move {
            tokio::select! {
                () = close.cancelled() => {}
                () = revoked => {}
            }
        })
        .await;
        self.record.bytes_up = counters.up.load(Ordering::Relaxed);
        self.record.bytes_down = counters.down.load(Ordering::Relaxed);
        server.metrics().relayed(self.protocol, self.record.bytes_up, self.record.bytes_down);
        match registration.revoked_reason() {
            Some(reason) => self.record.set(Outcome::LoggedIn, reason),
            None => self.record.set(Outcome::LoggedIn, end.describe()),
        }
    }
}

#[cfg(test)]
mod tests {
    //! The session loop in process, over an in-memory pipe instead of TLS: the pre-login
    //! state machine with the file directory, no server needed.

    use std::time::Duration;

    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    use super::*;
    use crate::config::Config;

    const DENIAL: &str = "NO [AUTHENTICATIONFAILED] You are not allowed to access this server";

    /// A state with the file directory (one user, `alice@example.com` / `pw`) and a profile
    /// allowing 127.0.0.1; refusals never reach the upstream.
    async fn state(dir: &std::path::Path) -> Arc<State> {
        state_with(dir, "").await
    }

    /// Like [`state`], with extra `[limits]` lines.
    async fn state_with(dir: &std::path::Path, limits: &str) -> Arc<State> {
        crate::tls::generate_self_signed("proxy.test", &dir.join("c.pem"), &dir.join("k.pem")).unwrap();
        let users = dir.join("users.toml");
        crate::stores::directory::file::set_password(&users, "alice@example.com", &crate::secret::Secret::new("pw"))
            .unwrap();
        std::fs::write(
            dir.join("profiles.toml"),
            "[[profile]]\nname = \"office\"\nallow = [\"127.0.0.1\"]\nusers = [\"alice@example.com\"]\n",
        )
        .unwrap();
        let text = format!(
            "[server]\nhostname = \"proxy.test\"\nstate_dir = \"state\"\n\
             [limits]\npreauth_timeout_secs = 30\n{limits}\n[lockout]\nfailure_delay_ms = 0\n{}",
            crate::config::MINIMAL
        );
        let config = Config::parse(&text, &dir.join("proxy.toml"), dir.to_owned()).unwrap();
        State::from_config(&config).await.unwrap()
    }

    /// Starts a session on one end of a pipe and returns the other end, as the client.
    fn start(state: &Arc<State>, shutdown: &Shutdown, with_slot: bool) -> BufReader<DuplexStream> {
        let (client, server_side) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let slot = if with_slot { state.sessions.try_ip(peer.ip()) } else { None };
        tokio::spawn(run(state.clone(), Protocol::Imap, server_side, peer, None, shutdown.clone(), slot, None));
        BufReader::new(client)
    }

    async fn line(c: &mut BufReader<DuplexStream>) -> String {
        let mut line = String::new();
        c.read_line(&mut line).await.unwrap();
        line.trim_end().to_owned()
    }

    async fn send(c: &mut BufReader<DuplexStream>, text: &str) {
        c.get_mut().write_all(text.as_bytes()).await.unwrap();
    }

    /// The size of the future behind a function's result, without calling it.
    #[allow(clippy::too_many_arguments)]
    fn output_size<A, B, C, D, E, F, G, H, R>(_: impl Fn(A, B, C, D, E, F, G, H) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    fn output_size1<A, R>(_: impl Fn(A) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    fn output_size2<A, B, R>(_: impl Fn(A, B) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// Every connection's task holds its session's future for the whole session, so its
    /// size is paid once per idle session (and once per pending connection); printed so
    /// that a change that bloats it shows.
    #[test]
    fn the_size_of_a_sessions_future() {
        type Client = ServerTls<tokio::net::TcpStream>;
        let task = output_size(run::<Client>);
        let state = std::mem::size_of::<Session<Client>>();
        let client_tls = std::mem::size_of::<Client>();
        let upstream_tls = std::mem::size_of::<crate::upstream::UpstreamStream>();
        let serve = output_size2(Session::<Client>::serve);
        let pre_login = output_size1(Session::<Client>::pre_login);
        let splice = output_size2(Session::<Client>::splice);
        eprintln!(
            "task future {task} bytes, and boxed: Session {state} (its client TLS stream {client_tls}) + serve {serve} \
             (pre-login {pre_login}, splice {splice} with the upstream TLS stream {upstream_tls})"
        );
        assert!(task <= 512, "the task's own future of {task} bytes: the session runs boxed");
        assert!(serve >= splice && serve >= pre_login, "serve holds one phase at a time");
        assert!(state + serve <= 6 * 1024, "a session's boxed future of {} bytes", state + serve);
    }

    /// A stream whose close never completes: a TLS client that stopped reading, so our
    /// close_notify cannot go out.
    struct NeverCloses(DuplexStream);

    impl tokio::io::AsyncRead for NeverCloses {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
        }
    }

    impl tokio::io::AsyncWrite for NeverCloses {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.0).poll_flush(cx)
        }
        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Pending
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_never_takes_the_close_does_not_hold_the_session() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let (client, server_side) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        let slot = state.sessions.try_ip(peer.ip());
        let session = tokio::spawn(run(
            state.clone(),
            Protocol::Imap,
            NeverCloses(server_side),
            peer,
            None,
            Shutdown::default(),
            slot,
            None,
        ));
        let mut c = BufReader::new(client);
        assert!(line(&mut c).await.starts_with("* OK"));
        send(&mut c, "a1 LOGOUT\r\n").await;
        // The clock is paused: it jumps ahead whenever every task waits.
        let limit = state.limits.handshake_timeout() + std::time::Duration::from_secs(60);
        tokio::time::timeout(limit, session)
            .await
            .expect("the session ended although its close never completed")
            .unwrap();
    }

    #[tokio::test]
    async fn refused_logins_get_the_denial_and_the_third_closes_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let mut c = start(&state, &Shutdown::default(), true);
        assert!(line(&mut c).await.starts_with("* OK"));
        send(&mut c, "a1 CAPABILITY\r\n").await;
        assert!(line(&mut c).await.starts_with("* CAPABILITY IMAP4rev1"));
        assert!(line(&mut c).await.starts_with("a1 OK"));
        for (i, (user, password)) in
            [("bob@example.com", "pw"), ("alice@example.com", "wrong"), ("a b", "x")].iter().enumerate()
        {
            send(&mut c, &format!("l{i} LOGIN \"{user}\" {password}\r\n")).await;
            assert_eq!(line(&mut c).await, format!("l{i} {DENIAL}"));
        }
        assert_eq!(line(&mut c).await, "", "closed after the third refusal");
        let denied = |reason| {
            state.metrics().logins(crate::metrics::LoginResult { outcome: crate::metrics::Outcome::Denied, reason })
        };
        assert_eq!(denied("unknown user"), 1);
        assert_eq!(denied("wrong password"), 1);
        assert_eq!(denied("invalid user name"), 1);
    }

    #[tokio::test]
    async fn refusals_made_by_the_dialogue_are_counted_and_audited_like_the_others() {
        use base64::Engine;
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let mut c = start(&state, &Shutdown::default(), true);
        assert!(line(&mut c).await.starts_with("* OK"));
        let foreign = base64::engine::general_purpose::STANDARD.encode("bob\0alice@example.com\0pw");
        send(&mut c, &format!("p1 AUTHENTICATE PLAIN {foreign}\r\n")).await;
        assert_eq!(line(&mut c).await, format!("p1 {DENIAL}"));
        send(&mut c, "p2 LOGIN alice@example.com \"\"\r\n").await;
        assert_eq!(line(&mut c).await, format!("p2 {DENIAL}"));
        let denied = |reason| {
            state.metrics().logins(crate::metrics::LoginResult { outcome: crate::metrics::Outcome::Denied, reason })
        };
        assert_eq!(denied("authorization identity differs from the user"), 1);
        assert_eq!(denied("empty password"), 1);
    }

    #[tokio::test]
    async fn literals_and_lines_beyond_the_pre_login_budget_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(dir.path(), "preauth_buffer_budget = 2000").await;
        let budget = state.preauth_budget.clone();
        let mut first = start(&state, &Shutdown::default(), true);
        assert!(line(&mut first).await.starts_with("* OK"));
        send(&mut first, "a1 LOGIN alice@example.com {1500}\r\n").await;
        assert_eq!(line(&mut first).await, "+ Ready for literal data");
        assert_eq!(budget.used(), 1500, "the literal's room is taken before the continuation");

        let mut second = start(&state, &Shutdown::default(), true);
        assert!(line(&mut second).await.starts_with("* OK"));
        send(&mut second, "b1 LOGIN alice@example.com {1500}\r\n").await;
        assert_eq!(line(&mut second).await, "b1 NO [LIMIT] Server busy; literal refused, try again later");
        send(&mut second, "b2 NOOP\r\n").await;
        assert_eq!(line(&mut second).await, "b2 OK NOOP completed", "the connection goes on");
        // A line that outgrows the free first chunk needs the budget too.
        send(&mut second, &"x".repeat(3000)).await;
        assert_eq!(line(&mut second).await, "* BYE [UNAVAILABLE] Server busy; try again later");
        assert_eq!(line(&mut second).await, "");

        // The literal's room is given back when the command ends.
        send(&mut first, &format!("{}\r\n", "p".repeat(1500))).await;
        assert_eq!(line(&mut first).await, format!("a1 {DENIAL}"));
        assert_eq!(budget.used(), 0);
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_told_goodbye_at_the_pre_login_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let mut c = start(&state, &Shutdown::default(), true);
        assert!(line(&mut c).await.starts_with("* OK"));
        let started = tokio::time::Instant::now();
        assert!(line(&mut c).await.starts_with("* BYE"), "the timeout's goodbye");
        assert!(started.elapsed() >= Duration::from_secs(30), "not before the pre-login timeout");
        assert_eq!(line(&mut c).await, "");
    }

    #[tokio::test]
    async fn shutdown_before_login_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let shutdown = Shutdown::default();
        let mut c = start(&state, &shutdown, true);
        assert!(line(&mut c).await.starts_with("* OK"));
        shutdown.stop_accepting.cancel();
        assert_eq!(line(&mut c).await, "* BYE Server shutting down");
        assert_eq!(line(&mut c).await, "");
    }

    #[tokio::test]
    async fn an_address_over_its_limit_is_told_so_without_a_greeting() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let mut c = start(&state, &Shutdown::default(), false);
        assert_eq!(line(&mut c).await, "* BYE [UNAVAILABLE] Too many connections from your address; try again later");
        assert_eq!(line(&mut c).await, "");
    }

    /// Starts a STARTTLS session on one end of a pipe and returns the other end.
    fn start_starttls(state: &Arc<State>, shutdown: &Shutdown) -> BufReader<DuplexStream> {
        let (client, server_side) = tokio::io::duplex(64 * 1024);
        let peer: SocketAddr = "127.0.0.1:40001".parse().unwrap();
        let slot = state.sessions.try_ip(peer.ip());
        let handshake = state.sessions.try_handshake(peer.ip()).unwrap();
        let session =
            run_starttls(state.clone(), Protocol::Imap, server_side, peer, None, shutdown.clone(), slot, handshake);
        tokio::spawn(session);
        BufReader::new(client)
    }

    /// A TLS client trusting the test state's self-signed certificate.
    async fn upgrade(
        dir: &std::path::Path,
        c: BufReader<DuplexStream>,
    ) -> BufReader<tokio_rustls::client::TlsStream<DuplexStream>> {
        use rustls::pki_types::pem::PemObject;
        assert!(c.buffer().is_empty(), "the server said more after its go-ahead");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(rustls::pki_types::CertificateDer::from_pem_file(dir.join("c.pem")).unwrap()).unwrap();
        let config =
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from("proxy.test").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, c.into_inner()).await.unwrap();
        BufReader::new(tls)
    }

    #[tokio::test]
    async fn starttls_drops_what_was_pipelined_and_goes_on_over_tls() {
        let dir = tempfile::tempdir().unwrap();
        let state = state_with(dir.path(), "max_handshakes_per_ip = 1").await;
        let ip = "127.0.0.1".parse().unwrap();
        let mut c = start_starttls(&state, &Shutdown::default());
        assert_eq!(line(&mut c).await, "* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Postern ready.");
        assert!(state.sessions.try_handshake(ip).is_none(), "a plaintext connection holds a handshake slot");
        send(&mut c, "a LOGIN alice@example.com pw\r\n").await;
        assert_eq!(line(&mut c).await, "a NO [PRIVACYREQUIRED] Use STARTTLS first; no login before TLS");
        send(&mut c, "b STARTTLS\r\nc LOGIN alice@example.com wrong\r\nd LOGOUT\r\n").await;
        assert_eq!(line(&mut c).await, "b OK Begin TLS negotiation now");
        let mut c = upgrade(dir.path(), c).await;
        c.get_mut().write_all(b"e NOOP\r\n").await.unwrap();
        let mut answer = String::new();
        c.read_line(&mut answer).await.unwrap();
        assert_eq!(answer, "e OK NOOP completed\r\n", "no greeting, no answer to what came after STARTTLS");
        c.get_mut().write_all(b"f LOGIN alice@example.com wrong\r\n").await.unwrap();
        answer.clear();
        c.read_line(&mut answer).await.unwrap();
        assert_eq!(answer, format!("f {DENIAL}\r\n"), "logins are decided over TLS");
        let denied = |reason| {
            state.metrics().logins(crate::metrics::LoginResult { outcome: crate::metrics::Outcome::Denied, reason })
        };
        assert_eq!(denied("login attempted before STARTTLS"), 1);
        assert_eq!(denied("wrong password"), 1, "the pipelined LOGIN never ran");
        assert!(state.sessions.try_handshake(ip).is_some(), "given back once the handshake is done");
    }

    #[tokio::test(start_paused = true)]
    async fn the_pre_login_deadline_covers_the_plaintext_part() {
        let dir = tempfile::tempdir().unwrap();
        let state = state(dir.path()).await;
        let mut c = start_starttls(&state, &Shutdown::default());
        assert!(line(&mut c).await.starts_with("* OK"));
        let started = tokio::time::Instant::now();
        assert_eq!(line(&mut c).await, "* BYE Autologout; login took too long");
        assert!(started.elapsed() >= Duration::from_secs(30));
        assert_eq!(line(&mut c).await, "");
    }
}
