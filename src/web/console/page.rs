//! Rendering: the page templates (`templates/console/`, HTML-escaped by the template engine)
//! and the responses every page shares.

use askama::Template;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

/// The navigation bar of a logged-in page.
pub struct Nav {
    /// The admin's name.
    pub admin: String,
    /// The session's CSRF token, for the logout form.
    pub csrf: String,
    /// The section shown.
    pub active: &'static str,
}

/// A rendered page, or a plain error if the template fails.
pub fn html(template: &impl Template) -> Response {
    match template.render() {
        Ok(body) => ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "console: a page could not be rendered");
            (StatusCode::INTERNAL_SERVER_ERROR, "The page could not be rendered; see the daemon's log.\n")
                .into_response()
        }
    }
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct Login<'a> {
    nav: Option<Nav>,
    message: Option<&'a str>,
}

/// The login page, with a message after a refused login.
pub fn login(message: Option<&str>) -> Response {
    html(&Login { nav: None, message })
}

/// A result page: what happened, a secret shown once, details, and where to go back to.
#[derive(Template)]
#[template(path = "console/message.html")]
pub struct Message {
    /// The navigation bar, when an admin is logged in.
    pub nav: Option<Nav>,
    /// The heading.
    pub title: String,
    /// `ok` or `error`.
    pub class: &'static str,
    /// What happened.
    pub message: String,
    /// A generated secret, shown this once.
    pub secret: Option<String>,
    /// More text (an upstream's answer, a validation error), preformatted.
    pub details: String,
    /// The page to go back to.
    pub back: &'static str,
}

/// An error page with `status`.
pub fn error(status: StatusCode, message: &str) -> Response {
    let page = Message {
        nav: None,
        title: "Refused".into(),
        class: "error",
        message: message.to_owned(),
        secret: None,
        details: String::new(),
        back: "/",
    };
    let mut response = html(&page);
    *response.status_mut() = status;
    response
}

/// The result of an admin's action, shown on a page of its own under `nav`.
pub fn result(nav: Option<Nav>, ok: bool, message: String, details: String, back: &'static str) -> Response {
    let page = Message {
        nav,
        title: if ok { "Done".into() } else { "Not done".into() },
        class: if ok { "ok" } else { "error" },
        message,
        secret: None,
        details,
        back,
    };
    let mut response = html(&page);
    if !ok {
        *response.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
    }
    response
}
