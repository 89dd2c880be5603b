//! Postern: an authenticating IMAP, POP3 and SMTP submission TLS proxy.
//!
//! Clients log in with their mail address and directory password; Postern checks the
//! source address against the user's security profiles, verifies the password against
//! the directory, logs in upstream with a stored credential the user never sees, and
//! then splices bytes both ways.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod admin;
pub mod audit;
pub mod auditlog;
pub mod config;
pub mod control;
pub mod directory;
pub mod fsutil;
pub mod limits;
pub mod listener;
pub mod live;
pub mod metrics;
pub mod notify;
pub mod oauth;
pub mod protocol;
pub mod relay;
pub mod secret;
pub mod server;
pub mod session;
pub mod tls;
pub mod upstream;
pub mod vault;
pub mod watch;
