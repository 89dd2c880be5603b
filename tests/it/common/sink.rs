//! A minimal SMTP server that accepts and records every message; Dovecot's submission service
//! relays to it, so tests can check what a client submitted through the proxy.
//!
//! Plain TCP on 127.0.0.1, one std thread per connection, started once per test binary.

use std::io::{self, BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Longest command line accepted (RFC 5321 allows 512; extensions make it a bit longer).
const MAX_COMMAND_LINE: usize = 4096;
/// Largest message body accepted, so odd input cannot exhaust memory.
const MAX_MESSAGE: usize = 256 * 1024 * 1024;
/// An idle connection is dropped after this long.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// One message as the sink received it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The reverse path from `MAIL FROM:<...>`, without the angle brackets (may be empty).
    pub from: String,
    /// The forward paths from each accepted `RCPT TO:<...>`, without angle brackets.
    pub recipients: Vec<String>,
    /// The message after dot-unstuffing, CRLF line endings as sent, without the final `.` line.
    pub data: Vec<u8>,
}

impl Received {
    /// Whether the message data contains `needle` (e.g. a unique marker a test put in it).
    pub fn data_contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.data.windows(needle.len()).any(|w| w == needle)
    }
}

/// The running sink: its address and everything it has received so far.
pub struct Sink {
    /// Where the sink listens (127.0.0.1, a free port).
    pub addr: SocketAddr,
    messages: Mutex<Vec<Received>>,
    arrived: Condvar,
}

static SINK: OnceLock<&'static Sink> = OnceLock::new();

/// The shared sink, listening from the first call on for the rest of the test binary.
pub fn sink() -> &'static Sink {
    SINK.get_or_init(|| {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind SMTP sink");
        let addr = listener.local_addr().expect("SMTP sink address");
        let sink: &'static Sink =
            Box::leak(Box::new(Sink { addr, messages: Mutex::new(Vec::new()), arrived: Condvar::new() }));
        std::thread::Builder::new()
            .name("smtp-sink".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let _ = std::thread::Builder::new().name("smtp-sink-conn".into()).spawn(move || {
                        let _ = sink.serve(stream);
                    });
                }
            })
            .expect("spawn SMTP sink");
        sink
    })
}

impl Sink {
    /// A snapshot of all messages received so far, oldest first.
    pub fn messages(&self) -> Vec<Received> {
        self.lock().clone()
    }

    /// Blocks until a message matching `predicate` has arrived (or already had) and returns it;
    /// `None` after `timeout`. In a single-threaded tokio test use [`Sink::wait_for_async`].
    pub fn wait_for(&self, predicate: impl Fn(&Received) -> bool, timeout: Duration) -> Option<Received> {
        let deadline = Instant::now() + timeout;
        let mut messages = self.lock();
        loop {
            if let Some(found) = messages.iter().find(|m| predicate(m)) {
                return Some(found.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            messages = self.arrived.wait_timeout(messages, left).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Like [`Sink::wait_for`], but polls without blocking the async runtime's thread.
    pub async fn wait_for_async(&self, predicate: impl Fn(&Received) -> bool, timeout: Duration) -> Option<Received> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(found) = self.lock().iter().find(|m| predicate(m)) {
                return Some(found.clone());
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Received>> {
        self.messages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn store(&self, message: Received) {
        self.lock().push(message);
        self.arrived.notify_all();
    }

    /// Runs one SMTP session; any I/O error or oversized input just ends it.
    fn serve(&self, stream: TcpStream) -> io::Result<()> {
        stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
        let mut out = stream.try_clone()?;
        let mut input = BufReader::new(stream);
        let mut from: Option<String> = None;
        let mut recipients = Vec::new();
        out.write_all(b"220 sink.localhost ESMTP test sink\r\n")?;
        loop {
            let Some(line) = read_line(&mut input, MAX_COMMAND_LINE)? else {
                return Ok(());
            };
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\r', '\n']);
            let (verb, arg) = line.split_once(' ').unwrap_or((line, ""));
            let reply: &[u8] = match verb.to_ascii_uppercase().as_str() {
                "EHLO" => b"250-sink.localhost\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 268435456\r\n",
                "HELO" => b"250 sink.localhost\r\n",
                "MAIL" => match path_after(arg, "FROM:") {
                    Some(path) => {
                        from = Some(path);
                        recipients.clear();
                        b"250 2.1.0 sender ok\r\n"
                    }
                    None => b"501 5.5.4 syntax: MAIL FROM:<address>\r\n",
                },
                "RCPT" => match (&from, path_after(arg, "TO:")) {
                    (None, _) => b"503 5.5.1 MAIL first\r\n",
                    (Some(_), Some(path)) => {
                        recipients.push(path);
                        b"250 2.1.5 recipient ok\r\n"
                    }
                    (Some(_), None) => b"501 5.5.4 syntax: RCPT TO:<address>\r\n",
                },
                "DATA" if from.is_none() || recipients.is_empty() => b"503 5.5.1 MAIL and RCPT first\r\n",
                "DATA" => {
                    out.write_all(b"354 end data with <CRLF>.<CRLF>\r\n")?;
                    let Some(data) = read_data(&mut input)? else {
                        return Ok(());
                    };
                    self.store(Received {
                        from: from.take().unwrap_or_default(),
                        recipients: std::mem::take(&mut recipients),
                        data,
                    });
                    b"250 2.0.0 queued\r\n"
                }
                "RSET" => {
                    from = None;
                    recipients.clear();
                    b"250 2.0.0 ok\r\n"
                }
                "NOOP" => b"250 2.0.0 ok\r\n",
                "QUIT" => {
                    out.write_all(b"221 2.0.0 bye\r\n")?;
                    return Ok(());
                }
                _ => b"502 5.5.2 command not recognized\r\n",
            };
            out.write_all(reply)?;
        }
    }
}

/// The address inside `<...>` following `keyword` (case-insensitive), ignoring any parameters.
fn path_after(arg: &str, keyword: &str) -> Option<String> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    let inner = rest.strip_prefix('<')?;
    let end = inner.find('>')?;
    Some(inner[..end].to_owned())
}

/// Reads the DATA section up to the lone `.` line, undoing dot-stuffing; `None` on EOF.
fn read_data(input: &mut impl BufRead) -> io::Result<Option<Vec<u8>>> {
    let mut data = Vec::new();
    loop {
        let budget = MAX_MESSAGE.saturating_sub(data.len()).max(3);
        let Some(line) = read_line(input, budget)? else {
            return Ok(None);
        };
        if line == b".\r\n" || line == b".\n" {
            return Ok(Some(data));
        }
        let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(unstuffed);
    }
}

/// One line including its `\n`; `None` on EOF before any byte; an error beyond `max` bytes.
fn read_line(input: &mut impl BufRead, max: usize) -> io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    loop {
        let chunk = input.fill_buf()?;
        if chunk.is_empty() {
            return Ok(if line.is_empty() { None } else { Some(line) });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        line.extend_from_slice(&chunk[..take]);
        input.consume(take);
        if line.len() > max {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "line too long"));
        }
        if done {
            return Ok(Some(line));
        }
    }
}
