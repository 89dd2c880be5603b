//! A TLS stream over rustls's unbuffered API, for the mail connections on both sides.
//!
//! rustls's buffered connection keeps a read buffer of at least 4 KiB per connection for its
//! whole life and reads the socket 4 KiB at a time. Here the stream owns its buffers and
//! holds none while the connection is idle: an idle connection waits with a read into the
//! stack, received bytes go to a heap buffer only while a record is incomplete or a burst
//! streams, and each buffer is given back at the first wait that follows less than
//! [`STREAMING`] bytes of traffic (a burst is over). During a burst a read takes up to
//! [`MAX_INCOMING`] bytes from the socket at once.
//!
//! Buffers are bounded: received TLS bytes by [`MAX_INCOMING`] (more than a whole record),
//! decrypted bytes waiting for the reader by what one receive buffer held, encrypted bytes
//! waiting for the socket by [`MAX_OUTGOING`] before a write waits.

use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, UnbufferedStatus};
use rustls::{ClientConfig, CommonState, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes read into the stack while waiting for a quiet connection to speak.
const WAIT_READ: usize = 2048;
/// The smallest heap receive buffer; it doubles while bytes keep arriving.
const MIN_INCOMING: usize = 1024;
/// The largest receive buffer: room for the largest handshake message rustls accepts
/// (64 KiB, kept whole across its records until complete) and one more full record.
const MAX_INCOMING: usize = 96 * 1024;
/// The largest plaintext one write encrypts: four full records.
const MAX_WRITE_CHUNK: usize = 64 * 1024;
/// Encrypted bytes waiting for the socket beyond which a write waits for them to go out.
const MAX_OUTGOING: usize = 64 * 1024;
/// Bytes moved between two waits from which a direction counts as streaming: its buffer
/// is kept for the next round instead of being given back and grown again.
const STREAMING: usize = 16 * 1024;

/// The two kinds of unbuffered connection, seen the same way.
pub trait Side {
    /// The side's connection data.
    type Data;
    /// Processes the received TLS bytes in `incoming` (see rustls's `process_tls_records`).
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data>;
    /// The connection's negotiated parameters and peer certificates.
    fn common(&self) -> &CommonState;
}

impl Side for UnbufferedServerConnection {
    type Data = ServerConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

impl Side for UnbufferedClientConnection {
    type Data = ClientConnectionData;
    fn process<'c, 'i>(&'c mut self, incoming: &'i mut [u8]) -> UnbufferedStatus<'c, 'i, Self::Data> {
        self.process_tls_records(incoming)
    }
    fn common(&self) -> &CommonState {
        self
    }
}

/// A client connection accepted by this server.
pub type ServerTls<IO> = TlsStream<IO, UnbufferedServerConnection>;
/// A connection this server opened to an upstream.
pub type ClientTls<IO> = TlsStream<IO, UnbufferedClientConnection>;

/// Accepts TLS connections with one server config.
#[derive(Clone)]
pub struct TlsAcceptor(Arc<ServerConfig>);

impl From<Arc<ServerConfig>> for TlsAcceptor {
    fn from(config: Arc<ServerConfig>) -> Self {
        Self(config)
    }
}

impl TlsAcceptor {
    /// Runs the server side of the handshake on `io`.
    pub async fn accept<IO: AsyncRead + AsyncWrite + Unpin>(self, io: IO) -> io::Result<ServerTls<IO>> {
        let conn = UnbufferedServerConnection::new(self.0).map_err(tls_error)?;
        let mut stream = TlsStream::new(io, conn);
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }
}

/// Runs the client side of a handshake with `name` on `io`.
pub async fn connect<IO: AsyncRead + AsyncWrite + Unpin>(
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
    io: IO,
) -> io::Result<ClientTls<IO>> {
    let conn = UnbufferedClientConnection::new(config, name).map_err(tls_error)?;
    let mut stream = TlsStream::new(io, conn);
    std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
    Ok(stream)
}

/// A TLS connection over `IO` whose handshake is done.
pub struct TlsStream<IO, C> {
    io: IO,
    conn: C,
    /// Received TLS bytes: `incoming[start..end]` is not processed yet. Empty (unallocated)
    /// while nothing is pending between bursts.
    incoming: Vec<u8>,
    start: usize,
    end: usize,
    /// Decrypted bytes the reader has not taken yet: `plain[taken..]`.
    plain: Vec<u8>,
    taken: usize,
    /// Encrypted bytes for the socket: `outgoing[sent..queued]`; the vector's length is the
    /// space it has (zeroed once), not what is queued.
    outgoing: Vec<u8>,
    sent: usize,
    queued: usize,
    /// The peer's data ended with its close_notify.
    peer_closed: bool,
    /// Our close_notify is queued.
    closing: bool,
    /// rustls reported an error: nothing more is processed (a record it refused would be
    /// parsed again), every later call fails.
    failed: bool,
    /// TLS bytes received since the last wait; from [`STREAMING`] on, a burst is streaming
    /// in and the receive buffer is kept over the wait.
    received_since_wait: usize,
    /// TLS bytes queued since the last flush; from [`STREAMING`] on, the send buffer is kept
    /// over the flush.
    queued_since_flush: usize,
}

/// What one round of record processing did.
enum Step {
    /// Something was done (handshake bytes encoded, plaintext taken); go on.
    Again,
    /// Nothing more can happen without more bytes from the peer.
    NeedInput,
    /// Application data can be written; `usize` plaintext bytes of the write were encrypted.
    Wrote(usize),
    /// The peer sent its close_notify.
    PeerClosed,
    /// Both sides sent close_notify.
    Closed,
}

/// What a round of processing is for.
enum Purpose<'a, 'b> {
    /// Reading: records go to the reader's buffer first, the rest waits in `plain`.
    Read(Option<&'a mut ReadBuf<'b>>),
    /// Writing these bytes.
    Write(&'a [u8]),
    /// Queueing our close_notify.
    Close,
}

impl<IO, C> TlsStream<IO, C> {
    fn new(io: IO, conn: C) -> Self {
        Self {
            io,
            conn,
            incoming: Vec::new(),
            start: 0,
            end: 0,
            plain: Vec::new(),
            taken: 0,
            outgoing: Vec::new(),
            sent: 0,
            queued: 0,
            peer_closed: false,
            closing: false,
            failed: false,
            received_since_wait: 0,
            queued_since_flush: 0,
        }
    }

    /// The underlying transport.
    pub fn get_ref(&self) -> &IO {
        &self.io
    }

    /// Heap bytes the stream holds in its buffers now (received, decrypted, to send).
    pub fn buffered_capacity(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }
}

impl<IO, C: Side> TlsStream<IO, C> {
    /// The negotiated parameters and the peer's certificates.
    pub fn tls(&self) -> &CommonState {
        self.conn.common()
    }

    /// One round of rustls's state machine over the unprocessed received bytes; after an
    /// error, only errors.
    fn step(&mut self, purpose: Purpose<'_, '_>) -> io::Result<Step> {
        if self.failed {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "the TLS connection failed"));
        }
        let step = self.process(purpose);
        self.failed = step.is_err();
        step
    }

    /// See [`TlsStream::step`].
    fn process(&mut self, purpose: Purpose<'_, '_>) -> io::Result<Step> {
        let Self { conn, incoming, start, end, plain, outgoing, queued, .. } = self;
        let status = conn.process(&mut incoming[*start..*end]);
        // Discarded bytes are never looked at again, whatever the state says.
        *start += status.discard;
        let state = status.state.map_err(tls_error)?;
        let step = match state {
            ConnectionState::ReadTraffic(mut traffic) => {
                let mut sink = match purpose {
                    Purpose::Read(sink) => sink,
                    Purpose::Write(_) | Purpose::Close => None,
                };
                while let Some(record) = traffic.next_record() {
                    let payload = record.map_err(tls_error)?.payload;
                    let direct = match sink.as_deref_mut() {
                        Some(buf) if plain.is_empty() => payload.len().min(buf.remaining()),
                        _ => 0,
                    };
                    if let Some(buf) = sink.as_deref_mut() {
                        buf.put_slice(&payload[..direct]);
                    }
                    plain.extend_from_slice(&payload[direct..]);
                }
                Step::Again
            }
            ConnectionState::EncodeTlsData(mut encode) => {
                queue(outgoing, queued, 512, |out| encode.encode(out).map_err(Retry::from))?;
                Step::Again
            }
            ConnectionState::TransmitTlsData(transmit) => {
                // What was encoded is queued in `outgoing`; it is sent before any read waits.
                transmit.done();
                Step::Again
            }
            ConnectionState::BlockedHandshake => Step::NeedInput,
            ConnectionState::WriteTraffic(mut traffic) => match purpose {
                Purpose::Read(_) => Step::NeedInput,
                Purpose::Write(data) => {
                    let data = &data[..data.len().min(MAX_WRITE_CHUNK)];
                    // Record headers and tags: generously more than any suite adds.
                    let room = data.len() + data.len().div_ceil(16 * 1024) * 64;
                    queue(outgoing, queued, room, |out| traffic.encrypt(data, out).map_err(Retry::from))?;
                    Step::Wrote(data.len())
                }
                Purpose::Close => {
                    queue(outgoing, queued, 64, |out| traffic.queue_close_notify(out).map_err(Retry::from))?;
                    Step::Wrote(0)
                }
            },
            ConnectionState::PeerClosed => Step::PeerClosed,
            ConnectionState::Closed => Step::Closed,
            ConnectionState::ReadEarlyData(_) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, "unexpected TLS early data"));
            }
            _ => return Err(io::Error::other("unexpected TLS connection state")),
        };
        if *start == *end {
            *start = 0;
            *end = 0;
        }
        Ok(step)
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin, C: Side> TlsStream<IO, C> {
    /// Drives the handshake until application data may flow and our part of it is sent.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            let step = match self.step(Purpose::Read(None)) {
                Ok(step) => step,
                Err(e) => {
                    self.send_alert(cx);
                    return Poll::Ready(Err(e));
                }
            };
            match step {
                Step::Again => {}
                Step::NeedInput if self.conn.common().is_handshaking() => {
                    if ready!(self.poll_receive(cx))? == 0 {
                        return Poll::Ready(Err(unexpected_eof()));
                    }
                }
                Step::NeedInput | Step::Wrote(_) => {
                    ready!(self.poll_send(cx))?;
                    self.outgoing = Vec::new();
                    return Poll::Ready(Ok(()));
                }
                Step::PeerClosed | Step::Closed => return Poll::Ready(Err(unexpected_eof())),
            }
        }
    }

    /// [`TlsStream::step`], and on its first error the alert rustls queued for the peer.
    fn step_or_alert(&mut self, cx: &mut Context<'_>, purpose: Purpose<'_, '_>) -> io::Result<Step> {
        let failed_before = self.failed;
        let step = self.step(purpose);
        if step.is_err() && !failed_before {
            self.send_alert(cx);
        }
        step
    }

    /// Right after rustls reported an error: passes on the alert it queued for the peer, if
    /// the socket takes it at once. One round only: it encodes what is queued before it
    /// would look at received bytes again.
    fn send_alert(&mut self, cx: &mut Context<'_>) {
        if let Ok(Step::Again) = self.process(Purpose::Read(None)) {
            let _ = self.poll_send(cx);
        }
    }

    /// Writes queued TLS bytes to the socket; ready once all are written. The buffer
    /// stays for the next write (see [`AsyncWrite::poll_flush`] for its release).
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.queued {
            let written = Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.sent..self.queued]);
            let Poll::Ready(written) = written else {
                // What went out is dropped from the front, so a slow reader never makes the
                // buffer grow past what waits for it.
                self.outgoing.copy_within(self.sent..self.queued, 0);
                self.queued -= self.sent;
                self.sent = 0;
                return Poll::Pending;
            };
            let n = written?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.sent = 0;
        self.queued = 0;
        Poll::Ready(Ok(()))
    }

    /// Reads more TLS bytes from the socket; the count, 0 at its end.
    ///
    /// With nothing pending the read goes to the stack, so a quiet connection holds no
    /// receive buffer while it waits; whatever arrives moves to the heap buffer.
    fn poll_receive(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.incoming.is_empty() {
            let mut stack = [MaybeUninit::<u8>::uninit(); WAIT_READ];
            let mut buf = ReadBuf::uninit(&mut stack);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
            let got = buf.filled();
            if !got.is_empty() {
                // A full stack buffer means more is on its way: room for it, but no more
                // than a few times what arrived (a stalled half record holds little).
                let size = if got.len() == WAIT_READ { 4 * WAIT_READ } else { got.len().next_power_of_two() };
                self.incoming = vec![0; size.max(MIN_INCOMING)];
                self.incoming[..got.len()].copy_from_slice(got);
                self.start = 0;
                self.end = got.len();
                self.received_since_wait += got.len();
            }
            return Poll::Ready(Ok(got.len()));
        }
        if self.start > 0 && self.incoming.len() - self.end < MIN_INCOMING {
            self.incoming.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.incoming.len() - self.end < MIN_INCOMING && self.incoming.len() < MAX_INCOMING {
            let grown = (self.incoming.len() * 2).min(MAX_INCOMING);
            self.incoming.resize(grown, 0);
        }
        if self.end == self.incoming.len() {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, "TLS message too large")));
        }
        let mut buf = ReadBuf::new(&mut self.incoming[self.end..]);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        let n = buf.filled().len();
        self.end += n;
        self.received_since_wait += n;
        Poll::Ready(Ok(n))
    }

    /// Before a wait: gives back the receive buffer when nothing in it is pending, or moves
    /// a pending part of a record to a buffer its size, unless a burst is streaming in.
    fn release_incoming(&mut self) {
        if std::mem::take(&mut self.received_since_wait) >= STREAMING {
            return;
        }
        let pending = self.end - self.start;
        if pending == 0 {
            self.incoming = Vec::new();
        } else {
            let size = (2 * pending).max(MIN_INCOMING);
            if self.incoming.len() <= 2 * size {
                return;
            }
            let mut smaller = vec![0; size];
            smaller[..pending].copy_from_slice(&self.incoming[self.start..self.end]);
            self.incoming = smaller;
        }
        self.start = 0;
        self.end = pending;
    }

    /// Copies waiting plaintext to `buf`; gives the buffer back once it is all taken.
    fn take_plain(&mut self, buf: &mut ReadBuf<'_>) {
        let n = (self.plain.len() - self.taken).min(buf.remaining());
        buf.put_slice(&self.plain[self.taken..self.taken + n]);
        self.taken += n;
        if self.taken == self.plain.len() {
            self.plain = Vec::new();
            self.taken = 0;
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin, C: Side + Unpin> AsyncRead for TlsStream<IO, C> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.taken < this.plain.len() {
            this.take_plain(buf);
            return Poll::Ready(Ok(()));
        }
        if this.peer_closed {
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        // Never writes: what rustls queues while reading (a key update's answer) goes out
        // with the next write or flush, so a reader never takes a writer's wake-up.
        loop {
            match this.step_or_alert(cx, Purpose::Read(Some(&mut *buf)))? {
                Step::Again => {
                    if buf.filled().len() > before || this.taken < this.plain.len() {
                        if buf.remaining() > 0 && this.taken < this.plain.len() {
                            this.take_plain(buf);
                        }
                        return Poll::Ready(Ok(()));
                    }
                }
                Step::NeedInput | Step::Wrote(_) => match this.poll_receive(cx) {
                    Poll::Ready(Ok(0)) => {
                        // The transport ended without a close_notify: the peer's data may be
                        // truncated.
                        return Poll::Ready(Err(unexpected_eof()));
                    }
                    Poll::Ready(Ok(_)) => {}
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        this.release_incoming();
                        return Poll::Pending;
                    }
                },
                Step::PeerClosed | Step::Closed => {
                    this.peer_closed = true;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin, C: Side + Unpin> AsyncWrite for TlsStream<IO, C> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.closing {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS connection closed for writing")));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.queued - this.sent >= MAX_OUTGOING {
            ready!(this.poll_send(cx))?;
        }
        loop {
            match this.step_or_alert(cx, Purpose::Write(data))? {
                Step::Wrote(n) => {
                    this.queued_since_flush += n;
                    if let Poll::Ready(Err(e)) = this.poll_send(cx) {
                        return Poll::Ready(Err(e));
                    }
                    return Poll::Ready(Ok(n));
                }
                Step::Again => {}
                Step::PeerClosed => this.peer_closed = true,
                Step::NeedInput => {
                    // Only before the handshake is done, which the constructors finish.
                    return Poll::Ready(Err(io::Error::other("TLS handshake not complete")));
                }
                Step::Closed => {
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS connection closed")));
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_send(cx))?;
        // Unless a burst is streaming out, the send buffer goes back until the next write.
        if std::mem::take(&mut this.queued_since_flush) < STREAMING {
            this.outgoing = Vec::new();
        }
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // After a TLS error there is no close_notify to send, only the transport to close.
        this.closing |= this.failed;
        while !this.closing {
            match this.step_or_alert(cx, Purpose::Close)? {
                Step::Wrote(_) | Step::Closed | Step::NeedInput => this.closing = true,
                Step::PeerClosed => this.peer_closed = true,
                Step::Again => {}
            }
        }
        ready!(this.poll_send(cx))?;
        this.outgoing = Vec::new();
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

/// Runs `encode` on the free room after `queued` in `outgoing` (at least `room` bytes,
/// more if rustls asks for more) and queues what it wrote.
fn queue(
    outgoing: &mut Vec<u8>,
    queued: &mut usize,
    mut room: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, Retry>,
) -> io::Result<()> {
    loop {
        if outgoing.len() < *queued + room {
            outgoing.resize(*queued + room, 0);
        }
        match encode(&mut outgoing[*queued..]) {
            Ok(n) => {
                *queued += n;
                return Ok(());
            }
            Err(Retry::WithRoom(size)) => room = size,
            Err(Retry::Failed(message)) => return Err(io::Error::other(message)),
        }
    }
}

/// Why rustls did not encode into the room it was given.
enum Retry {
    /// The room was too small; rustls needs this much.
    WithRoom(usize),
    /// Anything else.
    Failed(String),
}

impl From<EncodeError> for Retry {
    fn from(e: EncodeError) -> Self {
        match e {
            EncodeError::InsufficientSize(e) => Retry::WithRoom(e.required_size),
            e => Retry::Failed(e.to_string()),
        }
    }
}

impl From<EncryptError> for Retry {
    fn from(e: EncryptError) -> Self {
        match e {
            EncryptError::InsufficientSize(e) => Retry::WithRoom(e.required_size),
            e => Retry::Failed(e.to_string()),
        }
    }
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn unexpected_eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "peer closed connection without sending TLS close_notify")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, duplex};

    /// A server config with a fresh self-signed certificate, and a client config trusting it.
    fn configs(dir: &std::path::Path, min: crate::tls::TlsVersion) -> (Arc<ServerConfig>, Arc<ClientConfig>) {
        let (cert, key) = (dir.join("c.pem"), dir.join("k.pem"));
        crate::tls::generate_self_signed("proxy.test", &cert, &key).unwrap();
        let server = crate::tls::server_config(&cert, &key, min, None).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(&cert).unwrap()).unwrap();
        let client = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        (server, Arc::new(client))
    }

    fn name() -> ServerName<'static> {
        ServerName::try_from("proxy.test").unwrap()
    }

    /// Both ends of a fresh connection over an in-memory pipe, both on this stream.
    async fn pair(capacity: usize) -> (ServerTls<DuplexStream>, ClientTls<DuplexStream>) {
        let dir = tempfile::tempdir().unwrap();
        let (server, client) = configs(dir.path(), crate::tls::TlsVersion::Tls12);
        let (a, b) = duplex(capacity);
        let (s, c) = tokio::join!(TlsAcceptor::from(server).accept(a), connect(client, name(), b));
        (s.unwrap(), c.unwrap())
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed ^ (i >> 13) as u8)).collect()
    }

    #[tokio::test]
    async fn bytes_arrive_intact_both_ways_in_every_size() {
        let (server, client) = pair(8 * 1024).await;
        let sizes = [1usize, 5, 255, 2048, 2049, 16 * 1024, 16 * 1024 + 1, 70_000, 3_000_000];
        let (mut sr, mut sw) = tokio::io::split(server);
        let (mut cr, mut cw) = tokio::io::split(client);
        let up = tokio::spawn(async move {
            for (i, &n) in sizes.iter().enumerate() {
                cw.write_all(&pattern(n, i as u8)).await.unwrap();
            }
            cw.shutdown().await.unwrap();
        });
        let down = tokio::spawn(async move {
            for (i, &n) in sizes.iter().enumerate() {
                sw.write_all(&pattern(n, 100 + i as u8)).await.unwrap();
            }
            sw.shutdown().await.unwrap();
        });
        let mut got_up = Vec::new();
        sr.read_to_end(&mut got_up).await.unwrap();
        let mut got_down = Vec::new();
        cr.read_to_end(&mut got_down).await.unwrap();
        up.await.unwrap();
        down.await.unwrap();
        let want_up: Vec<u8> = sizes.iter().enumerate().flat_map(|(i, &n)| pattern(n, i as u8)).collect();
        let want_down: Vec<u8> = sizes.iter().enumerate().flat_map(|(i, &n)| pattern(n, 100 + i as u8)).collect();
        assert!(got_up == want_up, "client to server bytes differ");
        assert!(got_down == want_down, "server to client bytes differ");
    }

    #[tokio::test]
    async fn a_quiet_connection_holds_no_buffer() {
        let (mut server, mut client) = pair(256 * 1024).await;
        client.write_all(b"a1 IDLE\r\n").await.unwrap();
        client.flush().await.unwrap();
        let mut line = [0u8; 9];
        server.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"a1 IDLE\r\n");
        server.write_all(&pattern(200_000, 3)).await.unwrap();
        server.flush().await.unwrap();
        let mut big = vec![0u8; 200_000];
        client.read_exact(&mut big).await.unwrap();
        assert!(big == pattern(200_000, 3));
        // A small message after the burst, then both sides wait.
        server.write_all(b"+ idling\r\n").await.unwrap();
        server.flush().await.unwrap();
        let mut idling = [0u8; 10];
        client.read_exact(&mut idling).await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut one = [0u8; 1];
        // The first wait after a burst keeps the receive buffer (more may stream in); the
        // next one gives it back.
        for _ in 0..2 {
            for stream in [&mut server as &mut (dyn AsyncRead + Unpin), &mut client] {
                let mut buf = ReadBuf::new(&mut one);
                assert!(Pin::new(stream).poll_read(&mut cx, &mut buf).is_pending());
            }
        }
        assert_eq!(server.buffered_capacity(), 0, "the server side holds no buffer while it waits");
        assert_eq!(client.buffered_capacity(), 0, "the client side holds no buffer while it waits");
    }

    #[tokio::test]
    async fn close_notify_is_the_end_and_a_bare_close_is_an_error() {
        let (mut server, mut client) = pair(64 * 1024).await;
        client.write_all(b"bye").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"bye");
        // The other direction still works after the client's close_notify.
        server.write_all(b"* BYE").await.unwrap();
        server.flush().await.unwrap();
        let mut bye = [0u8; 5];
        client.read_exact(&mut bye).await.unwrap();
        assert_eq!(&bye, b"* BYE");

        let (mut server, client) = pair(64 * 1024).await;
        drop(client);
        let err = server.read(&mut [0u8; 16]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn it_talks_to_the_buffered_rustls_both_ways_and_over_tls12() {
        let dir = tempfile::tempdir().unwrap();
        let (server, client) = configs(dir.path(), crate::tls::TlsVersion::Tls12);
        // Our server, the buffered client.
        let (a, b) = duplex(16 * 1024);
        let (s, c) = tokio::join!(
            TlsAcceptor::from(server.clone()).accept(a),
            tokio_rustls::TlsConnector::from(client).connect(name(), b)
        );
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        exchange(&mut s, &mut c, 100_000).await;

        // The buffered server, our client, TLS 1.2 only.
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_file(dir.path().join("c.pem")).unwrap()).unwrap();
        let tls12 = ClientConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS12])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = duplex(16 * 1024);
        let (s, c) =
            tokio::join!(tokio_rustls::TlsAcceptor::from(server).accept(a), connect(Arc::new(tls12), name(), b));
        let (mut s, mut c) = (s.unwrap(), c.unwrap());
        assert_eq!(c.tls().protocol_version(), Some(rustls::ProtocolVersion::TLSv1_2));
        exchange(&mut s, &mut c, 40_000).await;
    }

    /// Sends `len` bytes each way at once and checks what arrives.
    async fn exchange<A, B>(a: &mut A, b: &mut B, len: usize)
    where
        A: AsyncRead + AsyncWrite + Unpin,
        B: AsyncRead + AsyncWrite + Unpin,
    {
        async fn one_way<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, send: Vec<u8>, want: Vec<u8>) {
            let mut got = vec![0u8; want.len()];
            let (mut r, mut w) = tokio::io::split(s);
            let write = async {
                w.write_all(&send).await.unwrap();
                w.flush().await.unwrap();
            };
            let read = async { r.read_exact(&mut got).await.unwrap() };
            tokio::join!(write, read);
            assert!(got == want, "bytes differ");
        }
        tokio::join!(one_way(a, pattern(len, 1), pattern(len, 2)), one_way(b, pattern(len, 2), pattern(len, 1)));
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let (server, _) = configs(dir.path(), crate::tls::TlsVersion::Tls12);
        for junk in [&b"a1 LOGIN bob secret\r\n"[..], &[0x16, 0x03, 0x01, 0xff, 0xff, 1, 2, 3], &[0x17; 40], &[]] {
            let (a, mut b) = duplex(64 * 1024);
            b.write_all(junk).await.unwrap();
            b.shutdown().await.unwrap();
            let accepted = TlsAcceptor::from(server.clone()).accept(a).await;
            assert!(accepted.is_err(), "{junk:?} was taken for a handshake");
        }
    }

    #[tokio::test]
    async fn a_stalled_half_record_holds_about_what_arrived() {
        let (server, client) = pair(64 * 1024).await;
        // Take the client apart to write raw bytes on its transport: a record header that
        // announces 16 KiB, then 3 KiB of it.
        let mut raw = client.io;
        let mut server = server;
        let mut record = vec![0x17, 0x03, 0x03, 0x40, 0x10];
        record.extend(std::iter::repeat_n(0u8, 3 * 1024));
        raw.write_all(&record).await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut one = [0u8; 1];
        let mut buf = ReadBuf::new(&mut one);
        assert!(Pin::new(&mut server).poll_read(&mut cx, &mut buf).is_pending());
        let held = server.buffered_capacity();
        assert!(held > 0 && held <= 8 * 1024, "{held} bytes held for 3 KiB of a record");
    }

    #[tokio::test]
    async fn clients_that_list_aes_256_first_get_aes_128() {
        let first = rustls::crypto::aws_lc_rs::default_provider().cipher_suites[0].suite();
        assert_eq!(first, rustls::CipherSuite::TLS13_AES_256_GCM_SHA384, "the client's own order");
        let (server, client) = pair(64 * 1024).await;
        for side in [server.tls(), client.tls()] {
            assert_eq!(
                side.negotiated_cipher_suite().map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
            );
        }
    }

    #[tokio::test]
    async fn a_peer_that_does_not_read_never_makes_the_send_buffer_grow() {
        let (mut server, client) = pair(16 * 1024).await;
        let mut raw = client.io;
        let chunk = pattern(MAX_WRITE_CHUNK, 5);
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut most = 0;
        for _ in 0..50 {
            // Write until the transport pushes back, then let a little drain.
            while let Poll::Ready(written) = Pin::new(&mut server).poll_write(&mut cx, &chunk) {
                written.unwrap();
                most = most.max(server.outgoing.capacity());
            }
            let mut drained = vec![0u8; 5000];
            raw.read_exact(&mut drained).await.unwrap();
        }
        assert!(most <= 2 * MAX_OUTGOING + 4096, "the send buffer reached {most} bytes");
    }

    #[tokio::test]
    async fn a_corrupt_record_fails_the_stream_for_good_and_it_still_closes() {
        let (server, client) = pair(64 * 1024).await;
        let mut raw = client.io;
        let mut server = server;
        // An application-data record whose tag cannot verify.
        let mut record = vec![0x17, 0x03, 0x03, 0x00, 0x40];
        record.extend([0x5a; 0x40]);
        raw.write_all(&record).await.unwrap();
        let err = server.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(server.read(&mut [0u8; 64]).await.is_err(), "a failed stream stays failed");
        assert!(server.write_all(b"* BYE\r\n").await.is_err(), "and writes nothing more");
        // Closing sends the alert rustls queued, once, and shuts the transport.
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        raw.read_to_end(&mut rest).await.unwrap();
        assert_eq!(rest.first(), Some(&0x17), "the alert, encrypted as TLS 1.3 sends it");
    }

    #[tokio::test]
    async fn a_half_record_left_after_a_burst_moves_to_a_buffer_its_size() {
        let (mut server, client) = pair(256 * 1024).await;
        let mut client = client;
        client.write_all(&pattern(200_000, 6)).await.unwrap();
        client.flush().await.unwrap();
        let mut got = vec![0u8; 200_000];
        server.read_exact(&mut got).await.unwrap();
        let mut raw = client.io;
        raw.write_all(&[0x17, 0x03, 0x03, 0x40, 0x10, 1, 2, 3]).await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut one = [0u8; 1];
        for _ in 0..2 {
            let mut buf = ReadBuf::new(&mut one);
            assert!(Pin::new(&mut server).poll_read(&mut cx, &mut buf).is_pending());
        }
        assert_eq!(server.incoming.len(), MIN_INCOMING, "8 bytes of a record wait in the smallest buffer");
    }
}
