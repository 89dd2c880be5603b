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

/// Installs the capturing subscriber (once per binary) at `trace` level for Postern and
/// `debug` for everything else, so even verbose paths are covered by secret checks.
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
            .ok();
        buffer
    });
}

/// Everything logged so far.
pub fn all() -> String {
    capture();
    let buffer = BUFFER.get().expect("capture installed");
    String::from_utf8_lossy(&buffer.0.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
}

/// Waits until an audit line for `user` (and containing each of `needles`) is logged and
/// returns it; panics with the audit lines seen when none comes within 10 s.
pub async fn wait_for_audit(user: &str, needles: &[&str]) -> String {
    let user_field = format!("\"user\":\"{user}\"");
    for _ in 0..100 {
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
