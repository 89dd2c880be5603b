//! Postern's HTTPS front ends, each on its own listener: the admin console and the
//! mail-client onboarding service.
//!
//! [`serve`] runs one of them: TLS with the certificate in force (reloads apply to new
//! connections), HTTP/1.1 with a bounded request head, a bounded number of connections, a
//! handshake deadline and a lifetime per connection. Each request carries the client's
//! address as a [`ClientAddr`] extension.

pub mod onboarding;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

pub mod console;

/// The address of the client that sent a request (an axum extension).
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub SocketAddr);

/// How long and how much one connection may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to finish the TLS handshake.
    pub handshake: Duration,
    /// Time to receive a request head.
    pub header_read: Duration,
    /// Time a connection may stay open, keep-alive included.
    pub connection: Duration,
    /// Largest buffered request head, in bytes (at least 8 KiB).
    pub max_buffer: usize,
    /// Most header lines in a request.
    pub max_headers: usize,
    /// Connections served at once; the rest wait in the listen backlog.
    pub max_connections: usize,
    /// Connections one client address (an IPv6 /64) may hold at once; more are closed at
    /// accept, so one client cannot take the slots everyone shares.
    pub max_connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake: Duration::from_secs(10),
            header_read: Duration::from_secs(10),
            connection: Duration::from_secs(120),
            max_buffer: 16 * 1024,
            max_headers: 64,
            max_connections: 64,
            max_connections_per_ip: 8,
        }
    }
}

/// Longest pause after failed accepts (descriptors exhausted, ...), doubling from 10 ms.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Serves `router` over HTTPS on `listener` until `stop` is cancelled; `tls` gives the
/// acceptor for each new connection. `name` labels the log lines.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Arc<dyn Fn() -> TlsAcceptor + Send + Sync>,
    router: axum::Router,
    stop: CancellationToken,
    limits: Limits,
) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(limits.max_buffer.max(8 * 1024))
        .max_headers(limits.max_headers);
    let builder = Arc::new(builder);
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let per_address = Arc::new(PerAddress::default());
    let mut backoff = Duration::from_millis(10);
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, pause_ms = backoff.as_millis(), "{name}: accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        () = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                    continue;
                }
            },
            () = stop.cancelled() => return,
        };
        backoff = Duration::from_millis(10);
        let Some(address_slot) = per_address.clone().take(peer.ip(), limits.max_connections_per_ip) else {
            tracing::debug!(%peer, "{name}: too many connections from this address; closed");
            continue;
        };
        let (builder, router, stop, acceptor) = (builder.clone(), router.clone(), stop.clone(), tls());
        tokio::spawn(async move {
            let _permit = permit;
            let _address_slot = address_slot;
            let served = async {
                let stream = match tokio::time::timeout(limits.handshake, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "{name}: TLS handshake failed"),
                    Err(_) => return tracing::debug!(%peer, "{name}: TLS handshake timed out"),
                };
                let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ClientAddr(peer));
                    let mut router = router.clone();
                    async move { tower_service_call(&mut router, request.map(axum::body::Body::new)).await }
                });
                let connection = builder.serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(limits.connection, connection).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "{name}: connection failed"),
                    Err(_) => tracing::debug!(%peer, "{name}: connection open too long; dropped"),
                }
            };
            tokio::select! {
                () = served => {}
                () = stop.cancelled() => {}
            }
        });
    }
}

/// Calls the router as a tower service (it is always ready and never fails).
async fn tower_service_call(
    router: &mut axum::Router,
    request: axum::extract::Request,
) -> Result<axum::response::Response, std::convert::Infallible> {
    use tower_service::Service;
    router.call(request).await
}

/// Connections held per client address (IPv4, or an IPv6 /64).
#[derive(Default)]
struct PerAddress(std::sync::Mutex<std::collections::HashMap<IpAddr, usize>>);

/// One connection's hold on its address's count; released when dropped.
struct AddressSlot {
    table: Arc<PerAddress>,
    key: IpAddr,
}

impl PerAddress {
    fn key(ip: IpAddr) -> IpAddr {
        match crate::access::profiles::canonical_ip(ip) {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
            v4 => v4,
        }
    }

    /// A slot for `ip` if it holds fewer than `max`.
    fn take(self: Arc<Self>, ip: IpAddr, max: usize) -> Option<AddressSlot> {
        let key = Self::key(ip);
        let mut table = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let held = table.entry(key).or_insert(0);
        if *held >= max.max(1) {
            return None;
        }
        *held += 1;
        drop(table);
        Some(AddressSlot { table: self, key })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut table = self.table.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(held) = table.get_mut(&self.key) {
            *held -= 1;
            if *held == 0 {
                table.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_address_holds_at_most_its_share_of_connections() {
        let table = Arc::new(PerAddress::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<_> = (0..3).map(|_| table.clone().take(a, 3).expect("under the cap")).collect();
        assert!(table.clone().take(a, 3).is_none(), "the fourth is refused");
        assert!(table.clone().take("192.0.2.2".parse().unwrap(), 3).is_some(), "another address is not");
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let same_64: Vec<_> = (0..3).map(|i| table.clone().take(v6(&format!("2001:db8::{i}")), 3).unwrap()).collect();
        assert!(table.clone().take(v6("2001:db8::ffff"), 3).is_none(), "one /64 is one client");
        drop(held);
        drop(same_64);
        assert!(table.0.lock().unwrap().is_empty(), "released slots leave nothing behind");
    }
}
