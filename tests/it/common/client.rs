//! A small async mail client for tests: raw byte I/O over TLS (trusting the test CA) or plain
//! TCP, with helpers for IMAP literals, POP3 multi-line responses and connection close.
//!
//! Every read has a deadline and panics with a clear message when it passes, so a hung server
//! or proxy fails the test instead of stalling it.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long any single read helper may wait before the test fails.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The name the client expects in server certificates (the test CA issues for it).
const SERVER_NAME: &str = "localhost";

enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while [`MailClient::start_tls`] swaps the stream.
    Gone,
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(std::io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// A connection to a mail server (or the proxy) with a read buffer.
pub struct MailClient {
    stream: Stream,
    /// Bytes received but not yet handed out (`split_to` is O(1), so line-by-line reads of
    /// multi-megabyte responses stay linear).
    buf: BytesMut,
    /// Whether the peer has closed its side (EOF or TLS close seen).
    eof: bool,
}

/// A TLS connector trusting only the test CA in `ca_file`.
pub fn tls_connector(ca_file: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("read test CA file") {
        roots.add(cert.expect("parse test CA PEM")).expect("add test CA");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn tls_handshake(tcp: TcpStream, ca_file: &Path) -> TlsStream<TcpStream> {
    let name = ServerName::try_from(SERVER_NAME).expect("server name");
    let peer = tcp.peer_addr().ok();
    match tokio::time::timeout(READ_TIMEOUT, tls_connector(ca_file).connect(name, tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => panic!("TLS handshake with {peer:?} failed: {e}"),
        Err(_) => panic!("TLS handshake with {peer:?} timed out after {READ_TIMEOUT:?}"),
    }
}

async fn tcp_connect(local_ip: Option<IpAddr>, addr: SocketAddr) -> TcpStream {
    let attempt = async {
        match local_ip {
            None => TcpStream::connect(addr).await,
            Some(ip) => {
                let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await
            }
        }
    };
    match tokio::time::timeout(READ_TIMEOUT, attempt).await {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => panic!("connecting to {addr} (from {local_ip:?}) failed: {e}"),
        Err(_) => panic!("connecting to {addr} timed out after {READ_TIMEOUT:?}"),
    }
}

/// Connects over implicit TLS, verifying the server as `localhost` against `ca_file`.
pub async fn connect_tls(addr: SocketAddr, ca_file: &Path) -> MailClient {
    let tcp = tcp_connect(None, addr).await;
    MailClient::new(Stream::Tls(Box::new(tls_handshake(tcp, ca_file).await)))
}

/// Like [`connect_tls`], presenting the client certificate chain in `cert_file` with the
/// private key in `key_file` (PEM).
pub async fn connect_tls_with_certificate(
    addr: SocketAddr,
    ca_file: &Path,
    cert_file: &Path,
    key_file: &Path,
) -> MailClient {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("read test CA file") {
        roots.add(cert.expect("parse test CA PEM")).expect("add test CA");
    }
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_file)
        .expect("read the client certificate")
        .map(|c| c.expect("parse the client certificate"))
        .collect();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key_file).expect("read the client key");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .expect("client certificate and key");
    let tcp = tcp_connect(None, addr).await;
    let name = ServerName::try_from(SERVER_NAME).expect("server name");
    let tls = tokio::time::timeout(READ_TIMEOUT, TlsConnector::from(Arc::new(config)).connect(name, tcp))
        .await
        .expect("TLS handshake in time")
        .expect("TLS handshake with a client certificate");
    MailClient::new(Stream::Tls(Box::new(tls)))
}

/// Like [`connect_tls`], with the local end bound to `local_ip` (e.g. 127.0.0.2) so tests can
/// exercise source-address rules.
pub async fn connect_tls_from(local_ip: IpAddr, addr: SocketAddr, ca_file: &Path) -> MailClient {
    let tcp = tcp_connect(Some(local_ip), addr).await;
    MailClient::new(Stream::Tls(Box::new(tls_handshake(tcp, ca_file).await)))
}

/// Connects over plain TCP (for STARTTLS ports or to probe that plaintext is refused).
pub async fn connect_plain(addr: SocketAddr) -> MailClient {
    MailClient::new(Stream::Plain(tcp_connect(None, addr).await))
}

/// Like [`connect_plain`], with the local end bound to `local_ip`.
pub async fn connect_plain_from(local_ip: IpAddr, addr: SocketAddr) -> MailClient {
    MailClient::new(Stream::Plain(tcp_connect(Some(local_ip), addr).await))
}

impl MailClient {
    fn new(stream: Stream) -> Self {
        MailClient { stream, buf: BytesMut::new(), eof: false }
    }

    /// Writes `bytes` and flushes.
    pub async fn send(&mut self, bytes: &[u8]) {
        self.try_send(bytes).await.expect("send to server");
    }

    /// Writes `bytes` and flushes, reporting a closed connection instead of panicking.
    pub async fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Upgrades a plain connection to TLS after the server agreed to STARTTLS/STLS.
    pub async fn start_tls(&mut self, ca_file: &Path) {
        assert!(self.buf.is_empty(), "server sent data after agreeing to STARTTLS: {:?}", self.buffered());
        match std::mem::replace(&mut self.stream, Stream::Gone) {
            Stream::Plain(tcp) => self.stream = Stream::Tls(Box::new(tls_handshake(tcp, ca_file).await)),
            _ => panic!("start_tls on a connection that is not plain TCP"),
        }
    }

    fn buffered(&self) -> String {
        let tail = &self.buf[self.buf.len().saturating_sub(512)..];
        String::from_utf8_lossy(tail).into_owned()
    }

    /// Reads more bytes into the buffer; returns false at EOF (a TLS close counts as EOF).
    async fn fill(&mut self, what: &str) -> bool {
        if self.eof {
            return false;
        }
        let mut chunk = vec![0u8; 64 * 1024];
        match tokio::time::timeout(READ_TIMEOUT, self.stream.read(&mut chunk)).await {
            Err(_) => panic!("timed out after {READ_TIMEOUT:?} waiting for {what}; buffered: {:?}", self.buffered()),
            Ok(Ok(0)) => {
                self.eof = true;
                false
            }
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                true
            }
            Ok(Err(e)) if is_close(&e) => {
                self.eof = true;
                false
            }
            Ok(Err(e)) => panic!("read error waiting for {what}: {e}; buffered: {:?}", self.buffered()),
        }
    }

    /// One line as raw bytes including its line ending; panics on EOF or timeout.
    pub async fn read_line_bytes(&mut self) -> Vec<u8> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                return self.buf.split_to(searched + i + 1).to_vec();
            }
            searched = self.buf.len();
            if !self.fill("a line").await {
                panic!("connection closed while waiting for a line; partial: {:?}", self.buffered());
            }
        }
    }

    /// One line without its CRLF (lossy UTF-8); panics on EOF or after [`READ_TIMEOUT`].
    pub async fn read_line(&mut self) -> String {
        let line = self.read_line_bytes().await;
        String::from_utf8_lossy(&line).trim_end_matches(['\r', '\n']).to_owned()
    }

    /// Reads exactly `n` bytes; panics on EOF or timeout. Efficient for multi-megabyte reads.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        if self.buf.len() >= n {
            return self.buf.split_to(n).to_vec();
        }
        let mut out = Vec::with_capacity(n);
        out.extend_from_slice(&self.buf);
        self.buf.clear();
        let mut chunk = vec![0u8; 256 * 1024];
        while out.len() < n {
            let want = (n - out.len()).min(chunk.len());
            match tokio::time::timeout(READ_TIMEOUT, self.stream.read(&mut chunk[..want])).await {
                Err(_) => panic!("timed out reading {n} bytes (got {})", out.len()),
                Ok(Ok(0)) => panic!("connection closed after {} of {n} bytes", out.len()),
                Ok(Ok(got)) => out.extend_from_slice(&chunk[..got]),
                Ok(Err(e)) => panic!("read error after {} of {n} bytes: {e}", out.len()),
            }
        }
        out
    }

    /// One IMAP response line with any literals (`{n}` / `{n+}`) spliced in: the returned bytes
    /// run up to the CRLF that ends the whole response.
    pub async fn read_imap_response_bytes(&mut self) -> Vec<u8> {
        let mut response = Vec::new();
        loop {
            let line = self.read_line_bytes().await;
            let literal = literal_len(&line);
            response.extend_from_slice(&line);
            match literal {
                Some(n) => response.extend(self.read_exact(n).await),
                None => return response,
            }
        }
    }

    /// IMAP: sends `command` tagged `tag` and returns the tagged answer line.
    pub async fn tagged(&mut self, tag: &str, command: &str) -> String {
        self.send(format!("{tag} {command}\r\n").as_bytes()).await;
        self.read_until_tagged(tag).await.pop().expect("tagged line")
    }

    /// IMAP: all responses up to and including the tagged one starting with `tag `
    /// (each without its final CRLF; literal contents stay embedded, lossy UTF-8).
    pub async fn read_until_tagged(&mut self, tag: &str) -> Vec<String> {
        let prefix = format!("{tag} ");
        let mut lines = Vec::new();
        loop {
            let bytes = self.read_imap_response_bytes().await;
            let line = String::from_utf8_lossy(&bytes).trim_end_matches(['\r', '\n']).to_owned();
            let done = line.starts_with(&prefix);
            lines.push(line);
            if done {
                return lines;
            }
        }
    }

    /// IMAP: `tag FETCH seq BODY.PEEK[]` in the selected mailbox, returning exactly the message
    /// bytes from the literal; panics unless the command completes with `tag OK`.
    pub async fn imap_fetch_body(&mut self, tag: &str, seq: u32) -> Vec<u8> {
        self.send(format!("{tag} FETCH {seq} BODY.PEEK[]\r\n").as_bytes()).await;
        let prefix = format!("{tag} ");
        let mut body = None;
        loop {
            let line = self.read_line_bytes().await;
            if let Some(n) = literal_len(&line) {
                let data = self.read_exact(n).await;
                if body.is_none() && is_fetch_body(&line) {
                    body = Some(data);
                }
                continue;
            }
            let text = String::from_utf8_lossy(&line);
            if text.starts_with(&prefix) {
                assert!(text[prefix.len()..].starts_with("OK"), "FETCH {seq} failed: {}", text.trim_end());
                return body.unwrap_or_else(|| panic!("FETCH {seq} completed without a BODY[] literal"));
            }
        }
    }

    /// POP3: the data of a multi-line response (call after reading its `+OK` line), up to the
    /// terminating `.` line, with dot-stuffing undone and line endings kept as received.
    pub async fn pop3_multiline(&mut self) -> Vec<u8> {
        let mut data = Vec::new();
        loop {
            let line = self.read_line_bytes().await;
            if line == b".\r\n" || line == b".\n" {
                return data;
            }
            data.extend_from_slice(line.strip_prefix(b".").unwrap_or(&line));
        }
    }

    /// Everything until the peer closes (buffered bytes included); panics if it stays open
    /// longer than [`READ_TIMEOUT`] since the last byte.
    pub async fn read_to_end_or_close(&mut self) -> Vec<u8> {
        while self.fill("the connection to close").await {}
        std::mem::take(&mut self.buf).to_vec()
    }

    /// Asserts the peer closes the connection within [`READ_TIMEOUT`] (discarding anything it
    /// sends first, such as a `* BYE` line).
    pub async fn expect_closed(&mut self) {
        let deadline = tokio::time::Instant::now() + READ_TIMEOUT;
        while !self.eof {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout(left, self.stream.read(&mut chunk)).await {
                Err(_) => panic!("connection still open after {READ_TIMEOUT:?}; buffered: {:?}", self.buffered()),
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
        self.buf.clear();
    }

    /// This end's address, to find the connection in the proxy's log.
    pub fn local_addr(&self) -> SocketAddr {
        match &self.stream {
            Stream::Plain(s) => s.local_addr(),
            Stream::Tls(s) => s.get_ref().0.local_addr(),
            Stream::Gone => panic!("no connection while STARTTLS swaps it"),
        }
        .expect("local address")
    }

    /// Whether the peer has been seen to close the connection.
    pub fn is_closed(&self) -> bool {
        self.eof
    }

    /// Sends a TLS close_notify (if TLS) and shuts down the write side.
    pub async fn shutdown(&mut self) {
        let _ = self.stream.shutdown().await;
    }
}

/// Errors that mean the peer went away rather than a protocol failure.
fn is_close(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe)
}

/// The length of a literal announced at the end of an IMAP line (`{n}` or `{n+}` before CRLF).
pub fn literal_len(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\n")?;
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let line = line.strip_suffix(b"}")?;
    let line = line.strip_suffix(b"+").unwrap_or(line);
    let open = line.iter().rposition(|&b| b == b'{')?;
    let digits = &line[open + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Whether an untagged FETCH line announces the whole-message `BODY[]` literal.
fn is_fetch_body(line: &[u8]) -> bool {
    let text = String::from_utf8_lossy(line).to_ascii_uppercase();
    text.starts_with("* ") && text.contains(" FETCH ") && text.contains("BODY[] {")
}
