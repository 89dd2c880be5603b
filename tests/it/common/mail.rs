//! Test messages and protocol helpers shared by the integration tests.

use super::client::MailClient;

/// A CRLF message of roughly `size` bytes tagged `marker` in its subject and Message-ID,
/// with dot-leading lines (to exercise dot-stuffing) and UTF-8 in the body.
pub fn message(marker: &str, size: usize) -> Vec<u8> {
    let mut m = format!(
        "From: alice@example.com\r\nTo: bob@example.com\r\nSubject: {marker}\r\nMessage-ID: <{marker}@example.com>\r\n\r\n"
    )
    .into_bytes();
    m.extend_from_slice(".a line starting with a dot\r\n..two dots\r\nUTF-8: \u{e4}\u{f6}\u{fc}\r\n".as_bytes());
    let mut i = 0u64;
    while m.len() < size {
        m.extend_from_slice(format!("line {i} {marker} {}\r\n", "x".repeat((i % 200) as usize)).as_bytes());
        i += 1;
    }
    m.extend_from_slice(b"end\r\n");
    m
}

/// `message` dot-stuffed and terminated for SMTP `DATA`.
pub fn dot_stuffed(message: &[u8]) -> Vec<u8> {
    let mut stuffed = Vec::with_capacity(message.len() + 16);
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line.starts_with(b".") {
            stuffed.push(b'.');
        }
        stuffed.extend_from_slice(line);
    }
    stuffed.extend_from_slice(b".\r\n");
    stuffed
}

/// Reads an SMTP reply (all continuation lines) and checks every line has `code`.
pub async fn smtp_reply(c: &mut MailClient, code: &str) -> Vec<String> {
    let mut lines = Vec::new();
    loop {
        let line = c.read_line().await;
        let last = line.as_bytes().get(3) != Some(&b'-');
        lines.push(line);
        if last {
            break;
        }
    }
    assert!(lines.iter().all(|l| l.starts_with(code)), "expected {code}: {lines:?}");
    lines
}

/// Base64 (standard alphabet, padded).
pub fn b64(bytes: impl AsRef<[u8]>) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
