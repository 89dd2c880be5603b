//! Local HTTPS webhooks for the alerts: a sink recording the JSON bodies posted to it (with a
//! certificate from the test CA, on 127.0.0.1:0), answering a chosen status, and a listener
//! that accepts connections and never answers.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Response;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use postern::config::TlsVersion;

use super::pki;

/// A webhook sink; stops when dropped.
pub struct Sink {
    /// `https://localhost:PORT/hook`.
    pub url: String,
    bodies: Arc<Mutex<Vec<Value>>>,
    task: JoinHandle<()>,
    _dir: tempfile::TempDir,
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Sink {
    /// A sink answering every POST with `status` (after recording its body).
    pub async fn start(status: u16) -> Sink {
        let dir = tempfile::tempdir().expect("sink dir");
        let issued = pki::pki().issue_in("webhook", dir.path());
        let tls =
            postern::tls::server_config(&issued.cert_file, &issued.key_file, TlsVersion::Tls12, None).expect("TLS");
        let acceptor = TlsAcceptor::from(tls);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind sink");
        let url = format!("https://localhost:{}/hook", listener.local_addr().expect("address").port());
        let bodies = Arc::new(Mutex::new(Vec::new()));
        let recorded = bodies.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { continue };
                let (acceptor, recorded) = (acceptor.clone(), recorded.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                        let recorded = recorded.clone();
                        async move {
                            let body = request.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                            let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                            recorded.lock().unwrap().push(value);
                            let response =
                                Response::builder().status(status).body(Full::new(Bytes::from_static(b"{}"))).unwrap();
                            Ok::<_, std::convert::Infallible>(response)
                        }
                    });
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tls), service).await;
                });
            }
        });
        Sink { url, bodies, task, _dir: dir }
    }

    /// Every body received so far.
    pub fn all(&self) -> Vec<Value> {
        self.bodies.lock().unwrap().clone()
    }

    /// The bodies received so far whose `event` is `name`.
    pub fn events(&self, name: &str) -> Vec<Value> {
        self.all().into_iter().filter(|b| b["event"] == name).collect()
    }

    /// Waits (up to 20 s) until `count` `name` events arrived, and returns them all.
    pub async fn wait_for(&self, name: &str, count: usize) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let events = self.events(name);
            if events.len() >= count {
                return events;
            }
            assert!(tokio::time::Instant::now() < deadline, "no {count} {name} event(s); got {:?}", self.all());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A listener that accepts connections and holds them without a byte: a webhook that hangs.
pub struct Hanging {
    /// `https://localhost:PORT/hook`.
    pub url: String,
    task: JoinHandle<()>,
}

impl Drop for Hanging {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Hanging {
    /// Starts one on 127.0.0.1:0.
    pub async fn start() -> Hanging {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("https://localhost:{}/hook", listener.local_addr().expect("address").port());
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((tcp, _)) = listener.accept().await {
                held.push(tcp);
            }
        });
        Hanging { url, task }
    }
}
