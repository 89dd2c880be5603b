//! Postern's HTTPS front ends, each on its own listener: the admin console and the
//! mail-client onboarding service.
//!
//! [`serve`] runs one of them: TLS with the certificate in force (reloads apply to new
//! connections), HTTP/1.1 with a bounded request head, a bounded number of connections, a
//! handshake deadline and a lifetime per connection. Each request carries the client's
//! address as a [`ClientAddr`] extension.

pub mod onboarding;

use std::net::SocketAddr;
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
        let (builder, router, stop, acceptor) = (builder.clone(), router.clone(), stop.clone(), tls());
        tokio::spawn(async move {
            let _permit = permit;
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
