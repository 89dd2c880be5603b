//! A lean IMAP client for load: implicit TLS (full handshakes, no resumption, so every
//! connection costs what a fresh mail client costs) or plain TCP, and just enough parsing to
//! skip literals and find tagged answers.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Any byte stream the client can talk over.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// A TLS connector trusting only the CA in `ca_file`, with session resumption off.
pub fn connector(ca_file: &Path) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).expect("read CA file") {
        roots.add(cert.expect("parse CA PEM")).expect("add CA");
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.resumption = rustls::client::Resumption::disabled();
    TlsConnector::from(Arc::new(config))
}

/// One IMAP connection.
pub struct Imap {
    stream: Box<dyn Io>,
    buf: BytesMut,
    tag: u32,
}

fn protocol_error(what: String) -> io::Error {
    io::Error::other(what)
}

impl Imap {
    /// Connects (TLS when `tls` is given, verifying `localhost`) and reads the greeting.
    pub async fn connect(addr: SocketAddr, tls: Option<&TlsConnector>) -> io::Result<Imap> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let stream: Box<dyn Io> = match tls {
            Some(connector) => {
                let name = ServerName::try_from("localhost").map_err(|e| protocol_error(e.to_string()))?;
                Box::new(connector.connect(name, tcp).await?)
            }
            None => Box::new(tcp),
        };
        let mut imap = Imap { stream, buf: BytesMut::with_capacity(4096), tag: 0 };
        let greeting = imap.line().await?;
        if !greeting.starts_with(b"* OK") {
            return Err(protocol_error(format!("greeting: {}", String::from_utf8_lossy(&greeting))));
        }
        Ok(imap)
    }

    async fn fill(&mut self) -> io::Result<()> {
        self.buf.reserve(64 * 1024);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    /// The next line, CRLF included.
    async fn line(&mut self) -> io::Result<BytesMut> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                return Ok(self.buf.split_to(searched + i + 1));
            }
            searched = self.buf.len();
            self.fill().await?;
        }
    }

    /// Reads and drops `n` bytes (a literal's contents).
    async fn skip(&mut self, mut n: usize) -> io::Result<()> {
        loop {
            let here = n.min(self.buf.len());
            self.buf.advance(here);
            n -= here;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Sends `command` with a new tag and reads up to its tagged answer, which must be OK;
    /// returns the literal bytes skipped on the way.
    pub async fn command(&mut self, command: &str) -> io::Result<usize> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        let mut skipped = 0;
        loop {
            let line = self.line().await?;
            if let Some(n) = literal_len(&line) {
                self.skip(n).await?;
                skipped += n;
                continue;
            }
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                let status = &line[tag.len() + 1..];
                if status.starts_with(b"OK") {
                    return Ok(skipped);
                }
                return Err(protocol_error(format!("{command:.20}: {}", String::from_utf8_lossy(&line).trim_end())));
            }
        }
    }

    /// `LOGIN` with quoted user and password.
    pub async fn login(&mut self, user: &str, password: &str) -> io::Result<()> {
        self.command(&format!("LOGIN \"{user}\" \"{password}\"")).await.map(drop)
    }

    /// Starts `IDLE` and waits for the continuation; the session then stays idle.
    pub async fn idle(&mut self) -> io::Result<()> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.send(format!("{tag} IDLE\r\n").as_bytes()).await?;
        loop {
            let line = self.line().await?;
            if line.starts_with(b"+") {
                return Ok(());
            }
            if line.starts_with(tag.as_bytes()) {
                return Err(protocol_error(format!("IDLE: {}", String::from_utf8_lossy(&line).trim_end())));
            }
        }
    }

    /// `LOGOUT`, then waits for the server to close.
    pub async fn logout(mut self) -> io::Result<()> {
        self.command("LOGOUT").await?;
        let mut rest = [0u8; 256];
        while matches!(self.stream.read(&mut rest).await, Ok(n) if n > 0) {}
        Ok(())
    }
}

/// The length of a literal announced at the end of a line (`{n}` before CRLF).
fn literal_len(line: &[u8]) -> Option<usize> {
    let line = line.strip_suffix(b"\r\n")?.strip_suffix(b"}")?;
    let open = line.iter().rposition(|&b| b == b'{')?;
    std::str::from_utf8(&line[open + 1..]).ok()?.parse().ok()
}
