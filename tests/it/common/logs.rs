//! Captures everything the proxy logs in this test binary, as JSON lines, so tests can
//! assert on audit lines and check that no secret is ever written.

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

static BUFFER: OnceLock<Buffer> = OnceLock::new();

/// Installs the capturing subscriber, once for the whole test binary, at `trace` level for
/// Postern and `debug` for everything else, so even verbose paths are covered by secret
/// checks. Panics if it cannot be installed (another global subscriber was set first): a
/// test searching the log would otherwise search nothing and could pass by accident.
pub fn capture() {
    BUFFER.get_or_init(|| {
        let buffer = Buffer::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_env_filter(tracing_subscriber::EnvFilter::new("debug,postern=trace,audit=trace"))
            .with_writer(move || writer.clone())
            .try_init()
            .unwrap_or_else(|e| panic!("cannot install the log capture, so log checks would see nothing: {e}"));
        buffer
    });
}

/// Everything logged so far; panics when nothing at all was captured, so a check that
/// something is absent from the log cannot pass for want of a log.
pub fn all() -> String {
    capture();
    let buffer = BUFFER.get().expect("capture installed");
    let text = String::from_utf8_lossy(&buffer.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    assert!(!text.is_empty(), "the log capture is installed but has captured nothing; check the filter");
    text
}

/// Waits until a line containing each of `needles` is logged and returns it; panics when none
/// comes within 30 s.
pub async fn wait_for_line(needles: &[&str]) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(line) = all().lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return line.to_owned();
        }
        assert!(tokio::time::Instant::now() < deadline, "no log line with {needles:?} within 30 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until an audit line for `user` (and containing each of `needles`) is logged and
/// returns it; panics with the audit lines seen when none comes within 30 s.
pub async fn wait_for_audit(user: &str, needles: &[&str]) -> String {
    let user_field = format!("\"user\":\"{user}\"");
    for _ in 0..300 {
        if let Some(line) = all().lines().find(|l| {
            l.contains("\"target\":\"audit\"") && l.contains(&user_field) && needles.iter().all(|n| l.contains(n))
        }) {
            return line.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let seen: Vec<String> = all().lines().filter(|l| l.contains("\"target\":\"audit\"")).map(str::to_owned).collect();
    panic!("no audit line for {user} with {needles:?}; audit lines so far:\n{}", seen.join("\n"));
}
