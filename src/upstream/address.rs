//! An upstream's `host:port`, resolved once per [`TTL`] instead of once per login.
//!
//! Every login opens a new connection upstream. Resolving the name each time costs a lookup
//! on the blocking pool (and, for a provider's host name, a DNS round trip on the login's
//! path); the addresses are kept for [`TTL`] and forgotten early when none of them answers,
//! so a provider that moves is followed within a login or a minute.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// How long resolved addresses are used before the name is looked up again.
pub const TTL: Duration = Duration::from_secs(60);

/// An upstream address and its resolved socket addresses.
pub struct UpstreamAddress {
    address: String,
    resolved: Mutex<Option<Resolved>>,
}

#[derive(Clone)]
struct Resolved {
    at: Instant,
    addrs: Arc<[SocketAddr]>,
}

impl UpstreamAddress {
    /// `address` is `host:port` as configured.
    pub fn new(address: &str) -> Self {
        Self { address: address.to_owned(), resolved: Mutex::new(None) }
    }

    /// Connects to the first address that answers, in the resolver's order.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let addrs = self.addresses().await?;
        let mut last = None;
        for addr in addrs.iter() {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        // None answered: the next login looks the name up again.
        self.forget();
        Err(last.unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address")))
    }

    /// The addresses in use: the ones kept if still fresh, else a new lookup.
    async fn addresses(&self) -> io::Result<Arc<[SocketAddr]>> {
        if let Some(addrs) = self.fresh(Instant::now()) {
            return Ok(addrs);
        }
        let addrs: Arc<[SocketAddr]> = tokio::net::lookup_host(&self.address).await?.collect();
        if addrs.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "the name resolved to no address"));
        }
        *self.lock() = Some(Resolved { at: Instant::now(), addrs: addrs.clone() });
        Ok(addrs)
    }

    fn fresh(&self, now: Instant) -> Option<Arc<[SocketAddr]>> {
        self.lock().as_ref().filter(|r| now.duration_since(r.at) < TTL).map(|r| r.addrs.clone())
    }

    fn forget(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Resolved>> {
        self.resolved.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn addresses_are_kept_for_the_ttl_and_looked_up_again_after_it() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let upstream = UpstreamAddress::new(&format!("localhost:{port}"));
        assert!(upstream.fresh(Instant::now()).is_none());
        upstream.connect().await.unwrap();
        let kept = upstream.fresh(Instant::now()).expect("kept after a connect");
        assert!(kept.iter().all(|a| a.ip().is_loopback() && a.port() == port));
        tokio::time::advance(TTL - Duration::from_secs(1)).await;
        assert!(upstream.fresh(Instant::now()).is_some(), "still fresh within the TTL");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(upstream.fresh(Instant::now()).is_none(), "looked up again after the TTL");
        upstream.connect().await.unwrap();
        assert!(upstream.fresh(Instant::now()).is_some());
    }

    #[tokio::test]
    async fn when_no_address_answers_they_are_forgotten() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let upstream = UpstreamAddress::new(&format!("127.0.0.1:{port}"));
        assert!(upstream.connect().await.is_err(), "nothing listens there");
        assert!(upstream.fresh(Instant::now()).is_none(), "a failed connect forgets the addresses");
    }
}
