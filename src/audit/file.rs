//! The audit file: one JSON object per line (`[audit] file`), appended by the daemon and
//! the admin commands that reveal secrets, and read back by `postern audit`.
//!
//! Every line carries `time` (RFC 3339, UTC) and `unix` (seconds) next to the event's own
//! fields, so the file is both readable and filterable without a date library.

use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Why the audit file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuditFileError {
    /// Opening, writing or reading failed.
    #[error("audit file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// A `--since` value that is not a duration.
    #[error("`{0}` is not a duration: use e.g. 90s, 15m, 1h, 7d")]
    Since(String),
}

/// The audit file, open for appending.
#[derive(Debug)]
pub struct AuditFile {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditFile {
    /// Opens (creating with mode 0600) the file at `path` for appending.
    pub fn open(path: &Path) -> Result<Self, AuditFileError> {
        let io_error = |source| AuditFileError::Io { path: path.to_owned(), source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_error)?;
        }
        let file = OpenOptions::new().append(true).create(true).mode(0o600).open(path).map_err(io_error)?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(file) })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event` (a JSON object) stamped with `at`. Failures are logged, not returned:
    /// a full disk must not end mail sessions.
    pub fn write(&self, at: SystemTime, event: serde_json::Value) {
        let line = stamped(at, event);
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(line.as_bytes()) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the audit file");
        }
    }
}

/// `event` with `time` and `unix` fields first, as one line with its newline.
fn stamped(at: SystemTime, event: serde_json::Value) -> String {
    let unix = at.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let mut object = serde_json::Map::new();
    object.insert("time".into(), rfc3339(unix).into());
    object.insert("unix".into(), unix.into());
    if let serde_json::Value::Object(fields) = event {
        object.extend(fields);
    }
    let mut line = serde_json::Value::Object(object).to_string();
    line.push('\n');
    line
}

/// Appends one event to the audit file at `path` (for one-shot admin commands).
pub fn append(path: &Path, event: serde_json::Value) -> Result<(), AuditFileError> {
    let file = AuditFile::open(path)?;
    let line = stamped(SystemTime::now(), event);
    let mut handle = file.file.lock().unwrap_or_else(|e| e.into_inner());
    handle.write_all(line.as_bytes()).map_err(|source| AuditFileError::Io { path: path.to_owned(), source })
}

/// What `postern audit` asks for.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only lines about this user (case-insensitive).
    pub user: Option<String>,
    /// Only lines at or after this Unix time.
    pub since: Option<u64>,
    /// Only lines before this Unix time.
    pub until: Option<u64>,
    /// Only lines whose client address starts with this text (an address or its prefix).
    pub client: Option<String>,
    /// Only lines with this outcome (`logged-in`, `denied`, ...).
    pub outcome: Option<String>,
}

impl Filter {
    fn matches(&self, event: &serde_json::Value) -> bool {
        let user_ok = self
            .user
            .as_ref()
            .is_none_or(|u| event.get("user").and_then(|v| v.as_str()).is_some_and(|v| v.eq_ignore_ascii_case(u)));
        let unix = event.get("unix").and_then(|v| v.as_u64());
        let time_ok = self.since.is_none_or(|s| unix.is_some_and(|t| t >= s))
            && self.until.is_none_or(|u| unix.is_some_and(|t| t < u));
        let text = |key: &str| event.get(key).and_then(|v| v.as_str()).unwrap_or_default();
        let client_ok = self.client.as_ref().is_none_or(|c| text("client").starts_with(c.as_str()));
        let outcome_ok = self.outcome.as_ref().is_none_or(|o| text("outcome") == o || text("event") == o);
        user_ok && time_ok && client_ok && outcome_ok
    }
}

/// The lines of the audit file at `path` that pass `filter`, oldest first. Lines that are
/// not JSON objects (a torn last line) are skipped.
pub fn read(path: &Path, filter: &Filter) -> Result<Vec<serde_json::Value>, AuditFileError> {
    let io_error = |source| AuditFileError::Io { path: path.to_owned(), source };
    let file = File::open(path).map_err(io_error)?;
    let mut found = Vec::new();
    for line in BufReader::new(file).lines() {
        let line = line.map_err(io_error)?;
        if let Ok(event @ serde_json::Value::Object(_)) = serde_json::from_str::<serde_json::Value>(&line) {
            if filter.matches(&event) {
                found.push(event);
            }
        }
    }
    Ok(found)
}

/// Parses a look-back like `90s`, `15m`, `1h`, `7d` (a bare number is seconds).
pub fn parse_since(text: &str) -> Result<Duration, AuditFileError> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| AuditFileError::Since(text.to_owned()))?;
    let seconds = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => return Err(AuditFileError::Since(text.to_owned())),
    };
    Ok(Duration::from_secs(number.saturating_mul(seconds)))
}

/// Unix seconds as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let rem = unix % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian date (the days-from-civil inverse, by eras of 400 years).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_format_as_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_767_225_599), "2025-12-31T23:59:59Z");
    }

    #[test]
    fn since_takes_units_and_rejects_junk() {
        assert_eq!(parse_since("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_since("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_since("2d").unwrap(), Duration::from_secs(172_800));
        assert!(parse_since("h").is_err());
        assert!(parse_since("1y").is_err());
    }

    #[test]
    fn written_lines_are_read_back_filtered() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log/audit.jsonl");
        let file = AuditFile::open(&path).unwrap();
        let old = UNIX_EPOCH + Duration::from_secs(1000);
        file.write(old, serde_json::json!({"event": "session", "user": "a@x"}));
        file.write(SystemTime::now(), serde_json::json!({"event": "session", "user": "A@x"}));
        file.write(SystemTime::now(), serde_json::json!({"event": "session", "user": "b@x"}));
        std::fs::OpenOptions::new().append(true).open(&path).unwrap().write_all(b"{torn").unwrap();
        let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
        assert_eq!(mode & 0o777, 0o600);
        let all = read(&path, &Filter::default()).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[0]["time"], "1970-01-01T00:16:40Z");
        let filter = Filter { user: Some("a@x".into()), since: Some(2000), ..Filter::default() };
        assert_eq!(read(&path, &filter).unwrap().len(), 1);
    }
}
