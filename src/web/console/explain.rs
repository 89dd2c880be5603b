//! The `access explain` page: the same explanation as `postern access explain USER IP`
//! (`crate::cli::explain::explanation`), as a form.

use std::net::IpAddr;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::response::Response;

use super::Console;
use super::auth::Admin;
use super::page::{self, Nav};
use crate::protocol::Protocol;

/// The form.
#[derive(Debug, Default, serde::Deserialize)]
pub struct Question {
    #[serde(default)]
    user: String,
    #[serde(default)]
    ip: String,
    #[serde(default)]
    protocol: String,
}

#[derive(Template)]
#[template(path = "console/explain.html")]
struct ExplainPage {
    nav: Option<Nav>,
    question: Question,
    lines: Vec<String>,
    error: String,
}

/// `GET /explain?user=U&ip=IP&protocol=P`.
pub async fn explain(State(console): State<Arc<Console>>, admin: Admin, Query(question): Query<Question>) -> Response {
    let mut lines = Vec::new();
    let mut error = String::new();
    if !question.user.trim().is_empty() || !question.ip.trim().is_empty() {
        let protocol = match question.protocol.as_str() {
            "pop3" => Protocol::Pop3,
            "smtp" => Protocol::Smtp,
            _ => Protocol::Imap,
        };
        match (crate::user::normalize(&question.user), question.ip.trim().parse::<IpAddr>()) {
            (Err(e), _) => error = format!("user: {e}"),
            (_, Err(_)) => error = "address: give an IPv4 or IPv6 address, e.g. 203.0.113.7".into(),
            (Ok(user), Ok(ip)) => {
                match crate::cli::explain::explanation(&console.config(), &user, ip, protocol, None).await {
                    Ok(explained) => lines = explained,
                    Err(e) => error = format!("{e:#}"),
                }
            }
        }
    }
    page::html(&ExplainPage { nav: admin.nav("explain"), question, lines, error })
}
