//! The splice: bytes both ways between a logged-in client and its upstream session.
//!
//! Each direction is its own copy loop. A client that closes its write half (half-close)
//! has that passed on to the upstream while the upstream's answers keep flowing back, so a
//! final `LOGOUT`/`QUIT` answer is never lost. The upstream closing ends the session once its
//! last bytes reach the client: a mail server that hung up has nothing more to say. The
//! session also ends when nothing moved either way for the idle timeout, or at shutdown.
//!
//! Most sessions sit idle (IMAP IDLE) most of the time, so an idle direction holds no buffer:
//! it waits with a small inline read, small messages are written straight from there, and only
//! a burst larger than that borrows a heap buffer, which grows while the burst streams and is
//! released at the first wait that follows less than [`STREAMING`] bytes (the burst is over).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Bytes read inline while a direction waits; messages this small never touch the heap.
const INLINE_SIZE: usize = 256;
/// A burst's first heap buffer.
const BURST_SIZE: usize = 16 * 1024;
/// The buffer a direction grows to while it streams (e.g. a large FETCH).
const STREAM_SIZE: usize = 64 * 1024;
/// Bytes read between two waits from which a direction counts as streaming and keeps its
/// buffer over the wait.
const STREAMING: usize = 16 * 1024;

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
    mut client: C,
    mut upstream: U,
    idle: Duration,
    counters: Arc<Counters>,
    shutdown: impl std::future::Future<Output = ()>,
) -> End
where
    C: AsyncRead + AsyncWrite + Unpin,
    U: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let activity = Activity { start, last: AtomicU64::new(0) };
    let mut up = Pump::default();
    let mut down = Pump::default();
    let mut client_done = false;
    // Both directions in one poll: no split, no lock, and the streams stay where they are.
    let both = std::future::poll_fn(|cx| {
        if !client_done {
            match up.poll_copy(cx, Pin::new(&mut client), Pin::new(&mut upstream), &counters.up, &activity) {
                Poll::Ready(Ok(())) => client_done = true,
                Poll::Ready(Err(_)) => return Poll::Ready(End::Error),
                Poll::Pending => {}
            }
        }
        match down.poll_copy(cx, Pin::new(&mut upstream), Pin::new(&mut client), &counters.down, &activity) {
            Poll::Ready(Ok(())) => Poll::Ready(End::Closed),
            Poll::Ready(Err(_)) => Poll::Ready(End::Error),
            Poll::Pending => Poll::Pending,
        }
    });
    let watchdog = async {
        loop {
            let last = Duration::from_millis(activity.last.load(Ordering::Relaxed));
            let deadline = start + last + idle;
            tokio::time::sleep_until(deadline).await;
            let seen = Duration::from_millis(activity.last.load(Ordering::Relaxed));
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

/// When bytes last moved, in milliseconds since the splice started.
struct Activity {
    start: Instant,
    last: AtomicU64,
}

impl Activity {
    fn touch(&self) {
        self.last.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// One direction's copy state. `data[start..end]` is read but not yet written, where `data`
/// is the heap buffer during a burst and the inline buffer otherwise.
struct Pump {
    inline: [u8; INLINE_SIZE],
    heap: Vec<u8>,
    start: usize,
    end: usize,
    /// Bytes read since the direction last waited.
    moved: usize,
    /// Written since the last flush.
    unflushed: bool,
    /// The reader reached its end; what is left is written, then the writer shut down.
    eof: bool,
}

impl Default for Pump {
    fn default() -> Self {
        Self { inline: [0; INLINE_SIZE], heap: Vec::new(), start: 0, end: 0, moved: 0, unflushed: false, eof: false }
    }
}

impl Pump {
    /// Moves bytes from `reader` to `writer`; ready once the reader ended and the end was
    /// passed on (writer shut down), or on the first error.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
        count: &AtomicU64,
        activity: &Activity,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            while self.start < self.end {
                let data = if self.heap.is_empty() { &self.inline[..] } else { &self.heap[..] };
                let n = ready!(writer.as_mut().poll_write(cx, &data[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.unflushed = true;
                count.fetch_add(n as u64, Ordering::Relaxed);
                activity.touch();
            }
            self.start = 0;
            self.end = 0;
            if self.eof {
                if self.unflushed {
                    ready!(writer.as_mut().poll_flush(cx))?;
                    self.unflushed = false;
                }
                return writer.as_mut().poll_shutdown(cx);
            }
            if self.heap.is_empty() {
                // Waiting: only the inline buffer is at stake.
                let mut buf = ReadBuf::new(&mut self.inline);
                match reader.as_mut().poll_read(cx, &mut buf) {
                    Poll::Pending => {
                        self.moved = 0;
                        return self.poll_idle_flush(cx, writer.as_mut());
                    }
                    Poll::Ready(result) => result?,
                }
                let n = buf.filled().len();
                self.moved += n;
                if n == 0 {
                    self.eof = true;
                } else if n == INLINE_SIZE {
                    // Possibly a burst: move to the heap and take what else is ready.
                    let mut heap = vec![0u8; BURST_SIZE];
                    heap[..n].copy_from_slice(&self.inline);
                    self.heap = heap;
                    self.end = n;
                    self.fill(cx, reader.as_mut())?;
                } else {
                    self.end = n;
                }
                continue;
            }
            match self.fill(cx, reader.as_mut())? {
                Filled::Some => {}
                Filled::Eof => self.eof = true,
                Filled::Nothing => {
                    // Unless a burst is streaming, give the buffer back before waiting: a
                    // streaming direction keeps it instead of growing a new one each round.
                    if std::mem::take(&mut self.moved) < STREAMING {
                        self.heap = Vec::new();
                    }
                    return self.poll_idle_flush(cx, writer.as_mut());
                }
            }
        }
    }

    /// Reads into the heap buffer after `end` until it is full or the reader has nothing
    /// ready; a buffer that fills up grows to [`STREAM_SIZE`] for the next round.
    fn fill<R: AsyncRead + ?Sized>(&mut self, cx: &mut Context<'_>, mut reader: Pin<&mut R>) -> io::Result<Filled> {
        let before = self.end;
        while self.end < self.heap.len() {
            let mut buf = ReadBuf::new(&mut self.heap[self.end..]);
            match reader.as_mut().poll_read(cx, &mut buf) {
                Poll::Pending => break,
                Poll::Ready(result) => result?,
            }
            let n = buf.filled().len();
            if n == 0 {
                return Ok(if self.end > before { Filled::Some } else { Filled::Eof });
            }
            self.end += n;
            self.moved += n;
        }
        if self.end == self.heap.len() && self.heap.len() < STREAM_SIZE {
            self.heap.resize(STREAM_SIZE, 0);
        }
        Ok(if self.end > before { Filled::Some } else { Filled::Nothing })
    }

    /// Nothing to read right now: flush what was written, then wait.
    fn poll_idle_flush<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        writer: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(writer.poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Pending
    }
}

/// What one [`Pump::fill`] got.
enum Filled {
    Some,
    Nothing,
    Eof,
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};
    use tokio::task::JoinHandle;

    /// A running splice between two in-memory pipes of `capacity` bytes: the far ends of the
    /// client and upstream sides, and the splice's task.
    fn spliced(
        capacity: usize,
        idle_secs: u64,
        counters: Arc<Counters>,
    ) -> (DuplexStream, DuplexStream, JoinHandle<End>) {
        let (client_near, client_far) = duplex(capacity);
        let (upstream_near, upstream_far) = duplex(capacity);
        let task = tokio::spawn(splice(
            client_near,
            upstream_near,
            Duration::from_secs(idle_secs),
            counters,
            std::future::pending(),
        ));
        (client_far, upstream_far, task)
    }

    #[tokio::test]
    async fn bytes_flow_both_ways_and_half_close_is_passed_on() {
        let counters = Arc::new(Counters::default());
        let (mut client_far, mut upstream_far, task) = spliced(64, 60, counters.clone());
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
        let (mut client_far, mut upstream_far, task) = spliced(64, 60, Arc::new(Counters::default()));
        upstream_far.write_all(b"* BYE\r\n").await.unwrap();
        upstream_far.shutdown().await.unwrap();
        let mut got = Vec::new();
        client_far.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"* BYE\r\n");
        assert_eq!(task.await.unwrap(), End::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_sessions_end_but_active_ones_do_not() {
        let (mut client_far, mut upstream_far, task) = spliced(64, 100, Arc::new(Counters::default()));
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

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect()
    }

    #[tokio::test]
    async fn bursts_of_every_size_arrive_intact_both_ways() {
        let (client_far, upstream_far, task) = spliced(8 * 1024, 60, Arc::new(Counters::default()));
        let sizes = [1, INLINE_SIZE - 1, INLINE_SIZE, INLINE_SIZE + 1, BURST_SIZE, 3 * STREAM_SIZE + 17, 1_000_000];
        let down_data: Vec<u8> = sizes.iter().enumerate().flat_map(|(i, &n)| pattern(n, i as u8)).collect();
        let up_data = pattern(700_000, 9);
        let (down_expected, up_expected) = (down_data.clone(), up_data.clone());
        let (mut client_read, mut client_write) = tokio::io::split(client_far);
        let (mut upstream_read, mut upstream_write) = tokio::io::split(upstream_far);
        let server = tokio::spawn(async move {
            for (i, &n) in sizes.iter().enumerate() {
                upstream_write.write_all(&pattern(n, i as u8)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let mut got = vec![0u8; up_expected.len()];
            upstream_read.read_exact(&mut got).await.unwrap();
            assert!(got == up_expected, "client-to-upstream bytes differ");
            upstream_write.shutdown().await.unwrap();
        });
        let client = tokio::spawn(async move { client_write.write_all(&up_data).await.unwrap() });
        let mut got = Vec::new();
        client_read.read_to_end(&mut got).await.unwrap();
        client.await.unwrap();
        assert!(got == down_expected, "upstream-to-client bytes differ");
        server.await.unwrap();
        assert_eq!(task.await.unwrap(), End::Closed);
    }

    #[tokio::test]
    async fn a_direction_holds_no_heap_buffer_once_the_burst_is_over() {
        let (mut far_writer, mut reader) = duplex(256 * 1024);
        let (mut writer, mut far_reader) = duplex(256 * 1024);
        let activity = Activity { start: Instant::now(), last: AtomicU64::new(0) };
        let count = AtomicU64::new(0);
        let mut pump = Pump::default();
        far_writer.write_all(&pattern(100_000, 1)).await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let poll = pump.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer), &count, &activity);
        assert!(poll.is_pending(), "nothing more to read: the pump waits");
        assert_eq!(count.load(Ordering::Relaxed), 100_000);
        assert!(pump.heap.capacity() > 0, "a streaming burst keeps its buffer over the first wait");
        let mut got = vec![0u8; 100_000];
        far_reader.read_exact(&mut got).await.unwrap();
        assert!(got == pattern(100_000, 1));
        // A small message goes through the inline buffer alone.
        far_writer.write_all(b"t1 NOOP\r\n").await.unwrap();
        let poll = pump.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer), &count, &activity);
        assert!(poll.is_pending());
        assert_eq!(pump.heap.capacity(), 0, "the wait after a small message gives the buffer back");
        let poll = pump.poll_copy(&mut cx, Pin::new(&mut reader), Pin::new(&mut writer), &count, &activity);
        assert!(poll.is_pending());
        assert_eq!(pump.heap.capacity(), 0, "a small message goes through the inline buffer alone");
        let mut line = [0u8; 9];
        far_reader.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"t1 NOOP\r\n");
    }

    #[tokio::test]
    async fn shutdown_ends_the_splice() {
        let (client_near, _client_far) = duplex(64);
        let (upstream_near, _upstream_far) = duplex(64);
        let end =
            splice(client_near, upstream_near, Duration::from_secs(60), Arc::new(Counters::default()), async {}).await;
        assert_eq!(end, End::Shutdown);
    }
}
