//! The access history page: the audit file searched by user, client address, outcome and
//! time range, newest first, and the same search as a CSV download.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use askama::Template;
use axum::extract::{Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::Console;
use super::auth::Admin;
use super::page::{self, Nav};
use crate::audit::file::{Filter, parse_since, read};

/// Most lines shown on the page (the newest); the CSV has every match.
const SHOWN: usize = 500;

/// The search form.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Search {
    #[serde(default)]
    user: String,
    #[serde(default)]
    client: String,
    #[serde(default)]
    outcome: String,
    /// How far back, e.g. `24h` or `7d`.
    #[serde(default)]
    since: String,
    /// Up to how long ago, e.g. `1h`.
    #[serde(default)]
    until: String,
}

/// The columns of the page and the CSV.
const COLUMNS: [&str; 10] =
    ["time", "event", "user", "client", "protocol", "outcome", "reason", "profile", "route", "upstream"];

fn ago(text: &str) -> Result<Option<u64>, String> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let back = parse_since(text.trim()).map_err(|e| e.to_string())?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    Ok(Some(now.saturating_sub(back).as_secs()))
}

/// The lines of the audit file matching `search`, oldest first, as rows of [`COLUMNS`].
async fn rows(console: &Console, search: &Search) -> Result<Vec<Vec<String>>, String> {
    let config = console.config();
    let Some(file) = &config.audit.file else {
        return Err("No audit file is configured ([audit] file), so there is no history to search.".into());
    };
    let user = match search.user.trim() {
        "" => None,
        user => Some(crate::user::normalize(user).map_err(|e| format!("user: {e}"))?),
    };
    let filter = Filter {
        user,
        since: ago(&search.since)?,
        until: ago(&search.until)?,
        client: Some(search.client.trim().to_owned()).filter(|c| !c.is_empty()),
        outcome: Some(search.outcome.trim().to_owned()).filter(|o| !o.is_empty()),
    };
    // Reading the audit file is file work: off the threads that run mail sessions.
    let path = config.resolve(file);
    let events = tokio::task::spawn_blocking(move || read(&path, &filter))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    Ok(events
        .iter()
        .map(|event| {
            COLUMNS
                .iter()
                .map(|&key| match event.get(key) {
                    Some(serde_json::Value::String(s)) => s.clone(),
                    Some(serde_json::Value::Null) | None => match key {
                        "user" => event
                            .get("admin")
                            .and_then(|a| a.as_str())
                            .map(|a| format!("admin {a}"))
                            .unwrap_or_default(),
                        "outcome" => event.get("result").and_then(|r| r.as_str()).unwrap_or_default().to_owned(),
                        _ => String::new(),
                    },
                    Some(other) => other.to_string(),
                })
                .collect()
        })
        .collect())
}

/// `field` made inert for spreadsheets, which run cells starting with `=`, `+`, `-` or `@`
/// as formulas: such cells get a leading `'`.
fn inert(field: &str) -> String {
    if field.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{field}") } else { field.to_owned() }
}

#[derive(Template)]
#[template(path = "console/history.html")]
struct HistoryPage {
    nav: Option<Nav>,
    search: Search,
    columns: [&'static str; 10],
    rows: Vec<Vec<String>>,
    total: usize,
    error: String,
    query: String,
}

/// `GET /history`.
pub async fn search(
    State(console): State<Arc<Console>>,
    admin: Admin,
    Query(search): Query<Search>,
    raw: axum::extract::RawQuery,
) -> Response {
    let (mut rows, error) = match rows(&console, &search).await {
        Ok(rows) => (rows, String::new()),
        Err(e) => (Vec::new(), e),
    };
    let total = rows.len();
    rows.reverse();
    rows.truncate(SHOWN);
    let query = raw.0.unwrap_or_default();
    page::html(&HistoryPage { nav: admin.nav("history"), search, columns: COLUMNS, rows, total, error, query })
}

/// `GET /history.csv`: every match, oldest first.
pub async fn csv(State(console): State<Arc<Console>>, admin: Admin, Query(search): Query<Search>) -> Response {
    match rows(&console, &search).await {
        Ok(rows) => {
            console.audit(
                &admin.name,
                admin.ip,
                "console_history_download",
                search.user.trim(),
                &format!("{} lines", rows.len()),
            );
            let mut text = crate::csv::line(&COLUMNS);
            for row in &rows {
                let fields: Vec<String> = row.iter().map(|f| inert(f)).collect();
                let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
                text.push_str(&crate::csv::line(&fields));
            }
            (
                [
                    (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                    (header::CONTENT_DISPOSITION, "attachment; filename=\"postern-access-history.csv\""),
                ],
                text,
            )
                .into_response()
        }
        Err(e) => page::result(admin.nav(""), false, "The history cannot be read.".into(), e, "/history"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cells_a_spreadsheet_would_run_are_made_inert() {
        assert_eq!(inert("=HYPERLINK(\"x\")"), "'=HYPERLINK(\"x\")");
        assert_eq!(inert("@SUM(1)"), "'@SUM(1)");
        assert_eq!(inert("alice@example.com"), "alice@example.com");
        assert_eq!(inert("-"), "'-");
    }
}
