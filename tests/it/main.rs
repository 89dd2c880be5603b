//! Postern's integration tests, in one binary so the real servers they need (slapd, Dovecot,
//! the SMTP sink and the OAuth2 token server) start once for the whole suite.
//!
//! Tests share those servers and this process (its log capture, its environment), so each
//! test uses its own users, and nothing here changes process-wide state after start-up.

mod common;
mod install;

mod alerts;
mod app_passwords;
mod balancer;
mod cli;
mod client_certs;
mod console;
mod flood;
mod forgery;
mod harness;
mod hashing;
mod hostile;
mod imap;
mod ldap;
mod lockout_race;
mod memory;
mod oauth;
mod onboarding;
mod paths;
mod pop3;
mod routes;
mod secrets;
mod service;
mod shared_state;
mod smtp;
mod starttls;
mod upstream_methods;
mod upstream_tls;
mod vault_writers;
