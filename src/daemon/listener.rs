//! Accepting connections: a connection permit is taken before `accept`, the per-address
//! caps (connections, unfinished handshakes) right after it, and the TLS handshake runs in
//! the connection's own task under a timeout, so a slow client never holds up the accept
//! loop and one address cannot hold the permits everyone shares.
//!
//! On a listener behind a load balancer (`proxy_protocol = true`), the peer must be one of
//! the `trusted_proxies`, and its PROXY protocol header is read first, under its own
//! timeout and size limit, with at most `limits.max_proxy_headers_per_ip` headers being
//! read at once per balancer. The address the header names is the client's from then on:
//! the per-address caps are taken on it, and the session, audit line, profiles and lockout
//! all see it, with the balancer recorded as `via`.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::access::profiles::canonical_ip;
use crate::access::slots::IpSlot;
use crate::audit::{Event, Outcome, SessionRecord};
use crate::config::ClientTls;
use crate::metrics::ProxyRefusal;
use crate::protocol::Protocol;
use crate::protocol::proxy::{self, Command, Header, Invalid, Parsed};
use crate::session;
use crate::state::{Shutdown, State};

/// Longest pause after repeated accept errors (e.g. out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// A listener's PROXY protocol settings: the balancers allowed to send the header.
#[derive(Debug, Clone)]
pub struct ProxyProtocol {
    trusted: Vec<IpNet>,
}

impl ProxyProtocol {
    /// Settings trusting the balancers in `trusted`.
    pub fn new(trusted: Vec<IpNet>) -> Self {
        Self { trusted }
    }

    /// Whether `ip` (canonical) is a trusted balancer.
    pub fn trusts(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }
}

/// Why the PROXY protocol header could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeaderError {
    /// The bytes are not a valid header.
    #[error(transparent)]
    Invalid(#[from] Invalid),
    /// The connection ended before the header was complete.
    #[error("the connection ended after {0} bytes, before the header was complete")]
    Truncated(usize),
    /// Reading failed.
    #[error("reading the header failed: {0}")]
    Io(#[source] std::io::Error),
}

impl HeaderError {
    /// The metrics label of the refusal.
    pub fn label(&self) -> ProxyRefusal {
        match self {
            HeaderError::Invalid(Invalid::Signature) => ProxyRefusal::Signature,
            HeaderError::Invalid(Invalid::V1TooLong | Invalid::V2TooLong(_)) => ProxyRefusal::TooLong,
            HeaderError::Invalid(Invalid::Family(_)) => ProxyRefusal::Family,
            HeaderError::Invalid(_) => ProxyRefusal::Malformed,
            HeaderError::Truncated(_) | HeaderError::Io(_) => ProxyRefusal::Truncated,
        }
    }
}

/// Reads one PROXY protocol header from `io`, exactly: never a byte past its end, so what
/// follows (the TLS handshake) stays unread. Bounded in size by the parser; the caller
/// bounds it in time.
pub async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<Header, HeaderError> {
    let mut buf = [0u8; proxy::V2_MAX_LEN];
    let mut filled = 0;
    loop {
        match proxy::parse(&buf[..filled]) {
            Parsed::Header(header) => return Ok(header),
            Parsed::Invalid(invalid) => return Err(invalid.into()),
            Parsed::NeedMore(n) => {
                // The parser never asks past its size limits; this guards the buffer anyway.
                let Some(end) = filled.checked_add(n).filter(|&end| end <= buf.len()) else {
                    return Err(Invalid::V2TooLong(filled.saturating_add(n)).into());
                };
                while filled < end {
                    match io.read(&mut buf[filled..end]).await {
                        Ok(0) => return Err(HeaderError::Truncated(filled)),
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(HeaderError::Io(e)),
                    }
                }
            }
        }
    }
}

/// Accepts connections on `listener` until shutdown, one task per connection. With
/// `proxy_protocol`, connections come from trusted balancers and start with a PROXY header.
/// `security` says whether clients start TLS at once or with STARTTLS.
#[allow(clippy::too_many_arguments)]
pub async fn accept_loop(
    listener: TcpListener,
    protocol: Protocol,
    security: ClientTls,
    proxy_protocol: Option<Arc<ProxyProtocol>>,
    server: Arc<State>,
    permits: Arc<Semaphore>,
    tasks: TaskTracker,
    shutdown: Shutdown,
) {
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = shutdown.stop_accepting.cancelled() => return,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.stop_accepting.cancelled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(pair) => {
                backoff = Duration::from_millis(10);
                pair
            }
            Err(e) => {
                tracing::warn!(%protocol, error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                continue;
            }
        };
        // One address, one key: an IPv4 client on a dual-stack socket counts as its IPv4.
        let peer = SocketAddr::new(canonical_ip(peer.ip()), peer.port());
        if let Some(proxy_protocol) = &proxy_protocol {
            if !proxy_protocol.trusts(peer.ip()) {
                let reason = format!(
                    "connection from {}, which is not in {protocol}.trusted_proxies, on a PROXY protocol listener",
                    peer.ip()
                );
                refuse(&server, protocol, peer, ProxyRefusal::Untrusted, Outcome::Denied, reason);
                continue;
            }
            // A balancer carries every client: its address is capped on header reads only.
            let Some(header_slot) = server.sessions.try_proxy_header(peer.ip()) else {
                server.metrics().proxy_refusal(protocol, ProxyRefusal::Busy);
                tracing::debug!(%protocol, balancer = %peer, "too many PROXY headers being read from the balancer; closed at accept");
                continue;
            };
            let server = server.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                let _permit = permit;
                proxied(tcp, peer, protocol, security, server, shutdown, header_slot).await;
            });
            continue;
        }
        let Some(handshake) = server.sessions.try_handshake(peer.ip()) else {
            server.metrics().tls_failure(protocol);
            tracing::debug!(%protocol, %peer, "too many unfinished TLS handshakes from the address; closed at accept");
            continue;
        };
        let address_slot = server.sessions.try_ip(peer.ip());
        let server = server.clone();
        let shutdown = shutdown.clone();
        tasks.spawn(async move {
            let _permit = permit;
            handle(tcp, peer, None, protocol, security, server, shutdown, handshake, address_slot).await;
        });
    }
}

/// Counts, logs and audits a connection closed because of its PROXY protocol header.
fn refuse(server: &State, protocol: Protocol, peer: SocketAddr, label: ProxyRefusal, outcome: Outcome, reason: String) {
    server.metrics().proxy_refusal(protocol, label);
    let mut record = SessionRecord::new(protocol, peer, &server.default_upstream(protocol));
    record.set(outcome, reason);
    server.audit(&record, Event::ProxyHeaderRefused);
}

/// A connection from a trusted balancer: its header, then the client's TLS session.
async fn proxied(
    mut tcp: TcpStream,
    balancer: SocketAddr,
    protocol: Protocol,
    security: ClientTls,
    server: Arc<State>,
    shutdown: Shutdown,
    header_slot: IpSlot,
) {
    let timeout = server.limits.proxy_header_timeout();
    let read = tokio::select! {
        read = tokio::time::timeout(timeout, read_header(&mut tcp)) => read,
        () = shutdown.stop_accepting.cancelled() => return,
    };
    drop(header_slot);
    let header = match read {
        Ok(Ok(header)) => header,
        Ok(Err(e)) => {
            let reason = format!("PROXY protocol header from balancer {balancer} refused: {e}");
            let outcome = match e {
                HeaderError::Truncated(_) | HeaderError::Io(_) => Outcome::Abandoned,
                HeaderError::Invalid(_) => Outcome::ProtocolError,
            };
            refuse(&server, protocol, balancer, e.label(), outcome, reason);
            return;
        }
        Err(_) => {
            let reason =
                format!("no complete PROXY protocol header from balancer {balancer} within {} s", timeout.as_secs());
            refuse(&server, protocol, balancer, ProxyRefusal::Timeout, Outcome::TimedOut, reason);
            return;
        }
    };
    let client = match header.command {
        Command::Local => {
            tracing::debug!(%protocol, %balancer, version = ?header.version, "PROXY header without a client (balancer health check); closed");
            return;
        }
        Command::Proxy { source, .. } => SocketAddr::new(canonical_ip(source.ip()), source.port()),
    };
    // The per-address caps apply to the client the balancer relays, taken as at accept.
    let Some(handshake) = server.sessions.try_handshake(client.ip()) else {
        server.metrics().tls_failure(protocol);
        tracing::debug!(%protocol, peer = %client, %balancer, "too many unfinished TLS handshakes from the address; closed");
        return;
    };
    let address_slot = server.sessions.try_ip(client.ip());
    handle(tcp, client, Some(balancer), protocol, security, server, shutdown, handshake, address_slot).await;
}

/// Runs one client connection: the TLS handshake then the session, or, on a STARTTLS
/// listener, the session, which does the handshake when the client asks. Either way the
/// connection counts as an unfinished handshake of its address until the handshake is done.
#[allow(clippy::too_many_arguments)]
async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    via: Option<SocketAddr>,
    protocol: Protocol,
    security: ClientTls,
    server: Arc<State>,
    shutdown: Shutdown,
    handshake_slot: IpSlot,
    address_slot: Option<IpSlot>,
) {
    let _ = tcp.set_nodelay(true);
    if security == ClientTls::Starttls {
        session::run_starttls(server, protocol, tcp, peer, via, shutdown, address_slot, handshake_slot).await;
        return;
    }
    // The handshake's state and its result (each a whole TLS stream) live in this block
    // only, so the connection's task does not keep room for them while the session runs.
    let session = {
        let accept = Box::pin(server.tls().accept(tcp));
        let handshake = tokio::time::timeout(server.limits.handshake_timeout(), accept).await;
        drop(handshake_slot);
        let client = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                server.metrics().tls_failure(protocol);
                tracing::debug!(%protocol, %peer, ?via, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                server.metrics().tls_failure(protocol);
                tracing::debug!(%protocol, %peer, ?via, "TLS handshake timed out");
                return;
            }
        };
        let certificate =
            crate::access::certificate::PresentedCertificate::from_handshake(client.tls().peer_certificates());
        session::run(server, protocol, client, peer, via, shutdown, address_slot, certificate)
    };
    session.await;
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;
    use crate::protocol::proxy::build;

    #[allow(clippy::too_many_arguments)]
    fn output_size<A, B, C, D, E, F, G, H, I, R>(_: impl Fn(A, B, C, D, E, F, G, H, I) -> R) -> usize {
        std::mem::size_of::<R>()
    }

    /// A connection's task holds this future for its whole life, beside the session's own
    /// boxed future; printed so that a change that bloats it shows.
    #[test]
    fn the_size_of_a_connections_future() {
        let size = output_size(handle);
        eprintln!("connection future (TLS accept, then the session): {size} bytes");
        assert!(size <= 1024, "a connection's future of {size} bytes; box what only the handshake needs");
    }

    /// Writes `bytes` then `after` into a pipe, reads the header, and returns the result
    /// with what is left unread in the pipe.
    async fn read_from(bytes: &[u8], after: &[u8], close: bool) -> (Result<Header, HeaderError>, Vec<u8>) {
        let (mut writer, mut reader) = tokio::io::duplex(4096);
        writer.write_all(bytes).await.unwrap();
        writer.write_all(after).await.unwrap();
        if close {
            drop(writer);
        } else {
            // Keep the writer open while reading, as a balancer keeps the connection.
            tokio::spawn(async move {
                let _hold = writer;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            });
        }
        let result = read_header(&mut reader).await;
        let mut rest = vec![0u8; after.len()];
        if result.is_ok() {
            reader.read_exact(&mut rest).await.unwrap();
        }
        (result, rest)
    }

    #[tokio::test]
    async fn the_reader_takes_exactly_the_header_and_leaves_the_tls_bytes() {
        let hello = b"\x16\x03\x01\x00\x05hello";
        let (source, destination) = ("192.0.2.7:4000".parse().unwrap(), "198.51.100.1:993".parse().unwrap());
        for header in
            [build::v1(source, destination), build::v2(source, destination, b"\x04\x00\x01\x00"), build::v2_local()]
        {
            let (result, rest) = read_from(&header, hello, false).await;
            assert_eq!(result.unwrap().len, header.len());
            assert_eq!(rest, hello, "the bytes after the header are left for TLS");
        }
        let (result, rest) = read_from(b"PROXY UNKNOWN\r\n", hello, false).await;
        assert_eq!((result.unwrap().command, rest.as_slice()), (Command::Local, &hello[..]));
    }

    #[tokio::test]
    async fn truncated_and_invalid_headers_are_errors() {
        let (source, destination) = ("192.0.2.7:4000".parse().unwrap(), "198.51.100.1:993".parse().unwrap());
        let header = build::v2(source, destination, &[]);
        let (result, _) = read_from(&header[..20], b"", true).await;
        assert!(matches!(result, Err(HeaderError::Truncated(20))), "{result:?}");
        let (result, _) = read_from(b"", b"", true).await;
        assert!(matches!(result, Err(HeaderError::Truncated(0))), "{result:?}");
        let (result, _) = read_from(b"\x16\x03\x01\x00\x05hello-hello-hello", b"", false).await;
        assert_eq!(result.unwrap_err().label(), ProxyRefusal::Signature);
        let (result, _) = read_from(&[b'P'; 200], b"", false).await;
        assert_eq!(result.unwrap_err().label(), ProxyRefusal::Signature);
        let mut long = b"PROXY TCP4 ".to_vec();
        long.resize(300, b'1');
        let (result, _) = read_from(&long, b"", false).await;
        assert_eq!(result.unwrap_err().label(), ProxyRefusal::TooLong);
        let (result, _) = read_from(&build::v2_raw(0x21, 0x31, &[0; 216]), b"", false).await;
        assert_eq!(result.unwrap_err().label(), ProxyRefusal::Family);
    }

    #[test]
    fn trusted_proxies_match_by_network() {
        let p = ProxyProtocol::new(vec!["10.0.0.0/24".parse().unwrap(), "2001:db8::1/128".parse().unwrap()]);
        assert!(p.trusts("10.0.0.7".parse().unwrap()));
        assert!(!p.trusts("10.0.1.7".parse().unwrap()));
        assert!(p.trusts("2001:db8::1".parse().unwrap()));
        assert!(!p.trusts("2001:db8::2".parse().unwrap()));
    }
}
