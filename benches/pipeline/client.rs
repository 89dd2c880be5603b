//! A lean IMAP client for load: implicit TLS (full handshakes, no resumption, so every
//! connection costs what a fresh mail client costs) or plain TCP, and just enough parsing to
//! skip literals and find tagged answers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use bytes::{Buf, BytesMut};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
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
        Self::connect_from(None, addr, tls).await
    }

    /// [`Imap::connect`] from the local address `from` (another loopback address, say)
    /// when given.
    pub async fn connect_from(from: Option<IpAddr>, addr: SocketAddr, tls: Option<&TlsConnector>) -> io::Result<Imap> {
        let tcp = match from {
            Some(ip) => {
                let socket = if ip.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
                socket.bind(SocketAddr::new(ip, 0))?;
                socket.connect(addr).await?
            }
            None => TcpStream::connect(addr).await?,
        };
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
    pub async fn line(&mut self) -> io::Result<BytesMut> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..].iter().position(|&b| b == b'\n') {
                return Ok(self.buf.split_to(searched + i + 1));
            }
            searched = self.buf.len();
            self.fill().await?;
        }
    }

    /// Reads `n` bytes (a literal's contents), appending them to `keep` when given, else
    /// dropping them.
    async fn skip(&mut self, mut n: usize, mut keep: Option<&mut Vec<u8>>) -> io::Result<()> {
        loop {
            let here = n.min(self.buf.len());
            if let Some(keep) = keep.as_deref_mut() {
                keep.extend_from_slice(&self.buf[..here]);
            }
            self.buf.advance(here);
            n -= here;
            if n == 0 {
                return Ok(());
            }
            self.fill().await?;
        }
    }

    /// Writes `bytes` as they are and flushes them.
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Sends `command` with a new tag and reads up to its tagged answer, which must be OK;
    /// returns the literal bytes skipped on the way.
    pub async fn command(&mut self, command: &str) -> io::Result<usize> {
        let (line, skipped) = self.exchange(command, None).await?;
        if line.split(' ').nth(1) == Some("OK") {
            return Ok(skipped);
        }
        Err(protocol_error(format!("{command:.20}: {line}")))
    }

    /// Like [`Imap::command`], returning the literals' bytes instead of skipping them.
    pub async fn command_keeping(&mut self, command: &str) -> io::Result<Vec<u8>> {
        let mut kept = Vec::new();
        let (line, _) = self.exchange(command, Some(&mut kept)).await?;
        if line.split(' ').nth(1) == Some("OK") {
            return Ok(kept);
        }
        Err(protocol_error(format!("{command:.20}: {line}")))
    }

    /// Sends `command` with a new tag and returns its tagged answer whatever the status
    /// (tag included, CRLF trimmed).
    pub async fn answer(&mut self, command: &str) -> io::Result<String> {
        self.exchange(command, None).await.map(|(line, _)| line)
    }

    /// Sends `command` with a new tag and reads up to its tagged answer: that line and the
    /// literal bytes read on the way (kept in `keep` when given).
    async fn exchange(&mut self, command: &str, mut keep: Option<&mut Vec<u8>>) -> io::Result<(String, usize)> {
        self.tag += 1;
        let tag = format!("t{}", self.tag);
        self.send(format!("{tag} {command}\r\n").as_bytes()).await?;
        let mut skipped = 0;
        loop {
            let line = self.line().await?;
            if let Some(n) = literal_len(&line) {
                self.skip(n, keep.as_deref_mut()).await?;
                skipped += n;
                continue;
            }
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                return Ok((String::from_utf8_lossy(&line).trim_end().to_owned(), skipped));
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

    /// Ends `IDLE` (`DONE`) and waits for the IDLE command's tagged OK.
    pub async fn idle_done(&mut self) -> io::Result<()> {
        let tag = format!("t{}", self.tag);
        self.send(b"DONE\r\n").await?;
        loop {
            let line = self.line().await?;
            if line.starts_with(tag.as_bytes()) && line.get(tag.len()) == Some(&b' ') {
                if line[tag.len() + 1..].starts_with(b"OK") {
                    return Ok(());
                }
                return Err(protocol_error(format!("DONE: {}", String::from_utf8_lossy(&line).trim_end())));
            }
        }
    }

    /// Reads until the server closes the connection and returns everything read meanwhile
    /// (what was buffered included). A reset, or a TLS close without `close_notify`, counts
    /// as closed.
    pub async fn until_closed(&mut self) -> io::Result<Vec<u8>> {
        let mut seen = self.buf.split().to_vec();
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk).await {
                Ok(0) => return Ok(seen),
                Ok(n) => seen.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset) => {
                    return Ok(seen);
                }
                Err(e) => return Err(e),
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
