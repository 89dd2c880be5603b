//! The live sessions page: who is logged in, from where, over what, since when, how many
//! bytes; and closing one, which its audit line records with the admin's name.

use std::sync::Arc;

use askama::Template;
use axum::extract::State;
use axum::response::Response;

use super::Console;
use super::auth::Admin;
use super::page::{self, Nav};
use crate::audit::file::rfc3339;

/// One row of the sessions table.
pub struct Row {
    id: u64,
    user: String,
    client: String,
    protocol: String,
    route: String,
    since: String,
    bytes: String,
}

#[derive(Template)]
#[template(path = "console/sessions.html")]
struct SessionsPage {
    nav: Option<Nav>,
    rows: Vec<Row>,
    csrf: String,
}

/// `GET /sessions`.
pub async fn list(State(console): State<Arc<Console>>, admin: Admin) -> Response {
    let mut sessions = console.state.live().snapshot();
    sessions.sort_by(|a, b| (&a.user, a.id).cmp(&(&b.user, b.id)));
    let rows = sessions
        .iter()
        .map(|s| {
            let since = s.since.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
            let (up, down) = s.bytes();
            Row {
                id: s.id,
                user: s.user.clone(),
                client: s.ip.to_string(),
                protocol: s.protocol.to_string(),
                route: format!("{} ({})", s.route.name, s.route.upstream),
                since: rfc3339(since),
                bytes: format!("{up} up, {down} down"),
            }
        })
        .collect();
    page::html(&SessionsPage { nav: admin.nav("sessions"), rows, csrf: admin.csrf.clone() })
}

/// The close form.
#[derive(serde::Deserialize)]
pub struct CloseForm {
    #[serde(default)]
    id: u64,
    #[serde(default)]
    csrf: String,
}

/// `POST /sessions/close`.
pub async fn close(
    State(console): State<Arc<Console>>,
    admin: Admin,
    axum::Form(form): axum::Form<CloseForm>,
) -> Response {
    if let Some(refused) = admin.csrf_refusal(&form.csrf) {
        return refused;
    }
    match console.state.live().get(form.id) {
        Some(session) => {
            session.revoke(format!("closed: by {} in the console", admin.name));
            console.audit(&admin.name, admin.ip, "console_session_closed", &session.user, "ok");
            page::result(
                admin.nav(""),
                true,
                format!("Closed {}'s {} session from {}.", session.user, session.protocol, session.ip),
                String::new(),
                "/sessions",
            )
        }
        None => {
            page::result(admin.nav(""), false, "That session has ended already.".into(), String::new(), "/sessions")
        }
    }
}
