//! Accepting connections: a connection permit is taken before `accept`, the per-address
//! caps (connections, unfinished handshakes) right after it, and the TLS handshake runs in
//! the connection's own task under a timeout, so a slow client never holds up the accept
//! loop and one address cannot hold the permits everyone shares.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use crate::access::profiles::canonical_ip;
use crate::access::slots::IpSlot;
use crate::protocol::Protocol;
use crate::session;
use crate::state::{Shutdown, State};

/// Longest pause after repeated accept errors (e.g. out of file descriptors).
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts connections on `listener` until shutdown, one task per connection.
pub async fn accept_loop(
    listener: TcpListener,
    protocol: Protocol,
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
            handle(tcp, peer, protocol, server, shutdown, handshake, address_slot).await;
        });
    }
}

async fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    server: Arc<State>,
    shutdown: Shutdown,
    handshake_slot: IpSlot,
    address_slot: Option<IpSlot>,
) {
    let _ = tcp.set_nodelay(true);
    let handshake = tokio::time::timeout(server.limits.handshake_timeout(), server.tls().accept(tcp)).await;
    drop(handshake_slot);
    let client = match handshake {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => {
            server.metrics().tls_failure(protocol);
            tracing::debug!(%protocol, %peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            server.metrics().tls_failure(protocol);
            tracing::debug!(%protocol, %peer, "TLS handshake timed out");
            return;
        }
    };
    session::run(server, protocol, client, peer, shutdown, address_slot).await;
}
