//! The daemon's HTTP endpoint: HTTP/1.1 on a local address, serving `GET /metrics` and the
//! load balancers' readiness check `GET /healthz` ([`super::health`]); the admin console
//! planned later will share it.
//!
//! Every connection is bounded: the request head must arrive within a few seconds and fit
//! in a small buffer, one request is answered per connection, and a connection that is
//! still open after [`Limits::connection`] is dropped. Only a few connections are served at
//! once; the rest wait in the listen backlog.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::health::{Health, Readiness};
use crate::metrics::Metrics;

const TEXT: &str = "text/plain; charset=utf-8";

/// How long and how much one connection may take.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time to receive the whole request head.
    pub header_read: Duration,
    /// Time a connection may stay open, answer included.
    pub connection: Duration,
    /// Largest buffered request head, in bytes (at least 8 KiB).
    pub max_buffer: usize,
    /// Most header lines in a request.
    pub max_headers: usize,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(5),
            connection: Duration::from_secs(15),
            max_buffer: 16 * 1024,
            max_headers: 32,
            max_connections: 16,
        }
    }
}

/// Longest pause after failed accepts (descriptors exhausted, ...), doubling from 10 ms.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// What the endpoint serves.
#[derive(Clone)]
pub struct Services {
    /// `/metrics`.
    pub metrics: Arc<Metrics>,
    /// `/healthz`.
    pub readiness: Arc<Readiness>,
}

/// Serves the endpoint on `listener` with the default [`Limits`] until `stop` is cancelled.
pub async fn serve(listener: TcpListener, services: Services, stop: CancellationToken) {
    serve_with(listener, services, stop, Limits::default()).await;
}

/// Serves the endpoint on `listener` with `limits` until `stop` is cancelled; connections
/// still open then are dropped.
pub async fn serve_with(listener: TcpListener, services: Services, stop: CancellationToken, limits: Limits) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .max_buf_size(limits.max_buffer.max(8 * 1024))
        .max_headers(limits.max_headers)
        .keep_alive(false);
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
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, pause_ms = backoff.as_millis(), "http: accept failed");
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
        let (builder, services, stop) = (builder.clone(), services.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let services = services.clone();
                let (method, path) = (request.method().clone(), request.uri().path().to_owned());
                async move { Ok::<_, Infallible>(respond(&method, &path, &services).await) }
            });
            let connection = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                served = tokio::time::timeout(limits.connection, connection) => match served {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "http: connection failed"),
                    Err(_) => tracing::debug!(%peer, "http: connection took too long; dropped"),
                },
                () = stop.cancelled() => {}
            }
            drop(permit);
        });
    }
}

/// The answer to one request.
async fn respond(method: &Method, path: &str, services: &Services) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (method, path) {
        (&Method::GET | &Method::HEAD, "/metrics") => {
            (StatusCode::OK, crate::metrics::CONTENT_TYPE, services.metrics.render())
        }
        (&Method::GET | &Method::HEAD, "/healthz") => {
            let health: Health = services.readiness.check().await;
            let status = if health.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, TEXT, health.body())
        }
        (&Method::GET | &Method::HEAD, _) => {
            (StatusCode::NOT_FOUND, TEXT, "not found; try /metrics or /healthz\n".to_owned())
        }
        _ => (StatusCode::METHOD_NOT_ALLOWED, TEXT, "only GET and HEAD\n".to_owned()),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
    }
    response
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::daemon::health::tests::FakeProbe;
    use crate::protocol::Protocol;

    /// A server on a free loopback port, its address and the token that stops it.
    async fn start(limits: Limits) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
        let (address, stop, server, _, _) = start_with_health(limits).await;
        (address, stop, server)
    }

    /// [`start`], with the fake probe behind `/healthz` and the token that starts draining.
    async fn start_with_health(
        limits: Limits,
    ) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>, Arc<FakeProbe>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let metrics = Arc::new(Metrics::default());
        metrics.tls_failure(Protocol::Imap);
        let probe = Arc::new(FakeProbe::default());
        let draining = CancellationToken::new();
        let readiness = Arc::new(Readiness::new(Box::new(probe.clone()), draining.clone()));
        readiness.set_listening();
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve_with(listener, Services { metrics, readiness }, stop.clone(), limits));
        (address, stop, server, probe, draining)
    }

    /// Sends one request with hyper's client; the status, content type and body.
    async fn request(address: SocketAddr, method: Method, path: &str) -> (StatusCode, String, String) {
        let stream = TcpStream::connect(address).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(connection);
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("host", address.to_string())
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let content_type =
            response.headers().get(CONTENT_TYPE).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, content_type, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Writes `bytes` on a raw connection and reads until the server closes it.
    async fn raw(address: SocketAddr, bytes: &[u8]) -> String {
        let mut stream = TcpStream::connect(address).await.unwrap();
        stream.write_all(bytes).await.unwrap();
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the server kept the connection open");
        String::from_utf8_lossy(&answer).into_owned()
    }

    #[tokio::test]
    async fn get_and_head_metrics_answer_the_exposition() {
        let (address, stop, _) = start(Limits::default()).await;
        let (status, content_type, body) = request(address, Method::GET, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, crate::metrics::CONTENT_TYPE);
        assert!(body.contains("postern_tls_handshake_failures_total{protocol=\"imap\"} 1"), "{body}");
        let (status, content_type, body) = request(address, Method::GET, "/metrics?x=1").await;
        assert_eq!((status, content_type.as_str()), (StatusCode::OK, crate::metrics::CONTENT_TYPE));
        assert!(body.contains("# TYPE postern_reloads_total counter"), "{body}");
        let (status, _, body) = request(address, Method::HEAD, "/metrics").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, ""));
        stop.cancel();
    }

    #[tokio::test]
    async fn healthz_answers_ready_not_ready_and_draining() {
        let (address, stop, _, probe, draining) = start_with_health(Limits::default()).await;
        *probe.answer.lock().unwrap() = Some("directory: LDAP down".into());
        let (status, content_type, body) = request(address, Method::GET, "/healthz").await;
        assert_eq!((status, content_type.as_str()), (StatusCode::SERVICE_UNAVAILABLE, TEXT));
        assert_eq!(body, "not ready: directory: LDAP down\n");
        draining.cancel();
        let (status, _, body) = request(address, Method::GET, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "draining\n"));
        assert_eq!(request(address, Method::POST, "/healthz").await.0, StatusCode::METHOD_NOT_ALLOWED);
        stop.cancel();
        let (address, stop, _, _, _) = start_with_health(Limits::default()).await;
        let (status, _, body) = request(address, Method::GET, "/healthz").await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "ready\n"));
        assert_eq!(request(address, Method::HEAD, "/healthz").await.0, StatusCode::OK);
        stop.cancel();
    }

    #[tokio::test]
    async fn other_paths_are_not_found_and_other_methods_not_allowed() {
        let (address, stop, _) = start(Limits::default()).await;
        let (status, content_type, body) = request(address, Method::GET, "/").await;
        assert_eq!((status, content_type.as_str()), (StatusCode::NOT_FOUND, TEXT));
        assert!(body.contains("/metrics"), "{body}");
        assert_eq!(request(address, Method::HEAD, "/metric").await.0, StatusCode::NOT_FOUND);
        assert_eq!(request(address, Method::POST, "/metrics").await.0, StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(request(address, Method::DELETE, "/").await.0, StatusCode::METHOD_NOT_ALLOWED);
        let answer = raw(address, b"PUT /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 405") && answer.contains("allow: GET, HEAD"), "{answer}");
        stop.cancel();
    }

    #[tokio::test]
    async fn one_request_per_connection_then_the_server_closes_it() {
        let (address, stop, _) = start(Limits::default()).await;
        let answer =
            raw(address, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "{answer}");
        assert_eq!(answer.matches("HTTP/1.1 200").count(), 1, "{answer}");
        stop.cancel();
    }

    #[tokio::test]
    async fn bad_oversized_and_silent_requests_are_cut_off() {
        let limits = Limits { header_read: Duration::from_millis(200), ..Limits::default() };
        let (address, stop, _) = start(limits).await;
        let answer = raw(address, b"\x00\xffnot http at all\r\n\r\n").await;
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 400"), "{answer}");
        let huge = format!("GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "a".repeat(64 * 1024));
        let answer = raw(address, huge.as_bytes()).await;
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
        let many: String = (0..100).map(|i| format!("X-{i}: y\r\n")).collect();
        let answer = raw(address, format!("GET /metrics HTTP/1.1\r\n{many}\r\n").as_bytes()).await;
        assert!(answer.is_empty() || answer.starts_with("HTTP/1.1 431"), "{answer}");
        let started = std::time::Instant::now();
        let answer = raw(address, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(3), "a half-sent head is dropped after the header timeout");
        assert_eq!(request(address, Method::GET, "/metrics").await.0, StatusCode::OK, "still serving");
        stop.cancel();
    }

    #[tokio::test]
    async fn a_connection_is_dropped_after_its_time_limit_and_stop_ends_the_server() {
        let limits = Limits {
            connection: Duration::from_millis(300),
            header_read: Duration::from_secs(30),
            ..Limits::default()
        };
        let (address, stop, server) = start(limits).await;
        let started = std::time::Instant::now();
        let answer = raw(address, b"GET /metrics HTTP/1.1\r\n").await;
        assert!(answer.is_empty(), "{answer}");
        assert!(started.elapsed() < Duration::from_secs(3));
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server).await.unwrap().unwrap();
        assert!(TcpStream::connect(address).await.is_err(), "the listener is closed");
    }
}
