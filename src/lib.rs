//! Postern: an authenticating IMAP, POP3 and SMTP submission TLS proxy.
//!
//! Clients log in with their mail address and directory password; Postern checks the
//! source address against the user's security profiles, verifies the password against
//! the directory, logs in upstream with a stored credential the user never sees, and
//! then splices bytes both ways.
//!
//! The modules follow the path of a connection: [`daemon`] accepts it, [`session`] runs
//! its dialogue (parsed by [`protocol`]) and asks [`access`] for the decision, which uses
//! the [`stores`] (directory, vault, OAuth2 tokens); [`upstream`] logs in with the user's
//! stored credential and the session splices; [`audit`] and [`metrics`] record it. The
//! [`cli`] holds the admin commands; [`state`] is what every session shares.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod access;
pub mod alerts;
pub mod audit;
pub mod cli;
pub mod config;
pub mod csv;
pub mod daemon;
pub mod fsutil;
pub mod metrics;
pub mod protocol;
pub mod secret;
pub mod session;
pub mod state;
pub mod stores;
pub mod tls;
pub mod upstream;
pub mod user;
pub mod web;
