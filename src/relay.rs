//! The splice: bytes both ways between a logged-in client and its upstream session.
//!
//! Each direction is its own copy loop. A client that closes its write half (half-close)
//! has that passed on to the upstream while the upstream's answers keep flowing back, so a
//! final `LOGOUT`/`QUIT` answer is never lost. The upstream closing ends the session once its
//! last bytes reach the client: a mail server that hung up has nothing more to say. The
//! session also ends when nothing moved either way for the idle timeout, or at shutdown.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

/// Size of each direction's copy buffer.
const BUFFER_SIZE: usize = 16 * 1024;

/// Why a splice ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// Both sides closed.
    Closed,
    /// Nothing moved in either direction for the idle timeout.
    Idle,
    /// A read or write failed (reset, TLS error).
    Error,
    /// The server is shutting down.
    Shutdown,
}

impl End {
    /// How the end reads in the audit log.
    pub fn describe(self) -> &'static str {
        match self {
            End::Closed => "closed",
            End::Idle => "idle timeout",
            End::Error => "connection error",
            End::Shutdown => "server shutdown",
        }
    }
}

/// Byte counts of a splice, readable while it runs.
#[derive(Debug, Default)]
pub struct Counters {
    /// Client to upstream.
    pub up: AtomicU64,
    /// Upstream to client.
    pub down: AtomicU64,
}

/// Copies between `client` and `upstream` until both close, `idle` passes without traffic,
/// or `shutdown` completes.
pub async fn splice<C, U>(
    client: C,
    upstream: U,
    idle: Duration,
    counters: Arc<Counters>,
    shutdown: impl std::future::Future<Output = ()>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_read, mut client_write) = tokio::io::split(client);
    let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream);
    let last_activity = AtomicU64::new(0);
    let start = Instant::now();
    let up = pump(&mut client_read, &mut upstream_write, &counters.up, &last_activity, start);
    let down = pump(&mut upstream_read, &mut client_write, &counters.down, &last_activity, start);
    let both = async {
        tokio::pin!(up, down);
        let mut client_done = false;
        loop {
            tokio::select! {
                result = &mut up, if !client_done => {
                    if result.is_err() {
                        return End::Error;
                    }
                    client_done = true;
                }
                result = &mut down => return if result.is_ok() { End::Closed } else { End::Error },
            }
        }
    };
    let watchdog = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let deadline = start + last + idle;
            tokio::time::sleep_until(deadline).await;
            let seen = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            if seen == last {
                return;
            }
        }
    };
    tokio::select! {
        end = both => end,
        () = watchdog => End::Idle,
        () = shutdown => End::Shutdown,
    }
}

async fn pump<R, W>(
    reader: &mut R,
    writer: &mut W,
    count: &AtomicU64,
    last_activity: &AtomicU64,
    start: Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER_SIZE];
    loop {
        let n = reader.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on; the other direction keeps going.
            return writer.shutdown().await;
        }
        writer.write_all(&buf[..n]).await?;
        writer.flush().await?;
        count.fetch_add(n as u64, Ordering::Relaxed);
        last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::duplex;

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let (client_near, mut client_far) = duplex(64);
        let (upstream_near, mut upstream_far) = duplex(64);
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(splice(
            client_near,
            upstream_near,
            Duration::from_secs(60),
            counters.clone(),
            std::future::pending(),
        ));
        client_far.write_all(b"a1 NOOP\r\n").await.unwrap();
        client_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        upstream_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"a1 NOOP\r\n", "upstream sees the data, then EOF");
        // The other direction still works after the client's half-close.
        let writer = tokio::spawn(async move {
            upstream_far.write_all(&vec![7u8; 100_000]).await.unwrap();
            upstream_far.shutdown().await.unwrap();
        });
        let mut back = Vec::new();
        client_far.read_to_end(&mut back).await.unwrap();
        writer.await.unwrap();
        assert_eq!(back.len(), 100_000);
        assert_eq!(task.await.unwrap(), End::Closed);
        assert_eq!(counters.up.load(Ordering::Relaxed), 9);
        assert_eq!(counters.down.load(Ordering::Relaxed), 100_000);
    }

    #[tokio::test]
    async fn upstream_closing_ends_the_session_even_if_the_client_stays() {
        let (client_near, mut client_far) = duplex(64);
        let (upstream_near, mut upstream_far) = duplex(64);
        let task = tokio::spawn(splice(
            client_near,
            upstream_near,
            Duration::from_secs(60),
            Arc::new(Counters::default()),
            std::future::pending(),
        ));
        upstream_far.write_all(b"* BYE\r\n").await.unwrap();
        upstream_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"* BYE\r\n");
        assert_eq!(task.await.unwrap(), End::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_end_but_active_ones_do_not() {
        let (client_near, mut client_far) = duplex(64);
        let (upstream_near, mut upstream_far) = duplex(64);
        let task = tokio::spawn(splice(
            client_near,
            upstream_near,
            Duration::from_secs(100),
            Arc::new(Counters::default()),
            std::future::pending(),
        ));
        for _ in 0..5 {
            tokio::time::sleep(Duration::from_secs(60)).await;
            client_far.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            upstream_far.read_exact(&mut one).await.unwrap();
        }
        assert!(!task.is_finished(), "traffic every 60 s keeps a 100 s idle timeout away");
        tokio::time::sleep(Duration::from_secs(101)).await;
        assert_eq!(task.await.unwrap(), End::Idle);
    }

    #[tokio::test]
    async fn shutdown_ends_the_splice() {
        let (client_near, _client_far) = duplex(64);
        let (upstream_near, _upstream_far) = duplex(64);
        let end = splice(client_near, upstream_near, Duration::from_secs(60), Arc::new(Counters::default()), async {}).await;
        assert_eq!(end, End::Shutdown);
    }
}
