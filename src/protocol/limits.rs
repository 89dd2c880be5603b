//! Protocol limits that are not configurable: hard ceilings that protect memory.
//!
//! Configurable limits (timeouts, line and literal sizes) live in [`crate::config::Limits`];
//! these constants are their upper bounds and the defaults parsers are tested with.

/// Default longest pre-login command line, in bytes, terminator included.
pub const DEFAULT_MAX_LINE: usize = 8 * 1024;
/// Default largest literal accepted before login (e.g. a password sent as `{n}`): a user
/// name or password literal never comes near it. SASL responses, XOAUTH2-sized ones
/// included, are lines bounded by the line limit, not literals.
pub const DEFAULT_MAX_LITERAL: usize = 8 * 1024;
/// Default budget of bytes all connections together may buffer before login.
pub const DEFAULT_PREAUTH_BUFFER_BUDGET: usize = 64 * 1024 * 1024;
/// Failed or invalid commands tolerated before login, after which the connection closes.
pub const MAX_BAD_COMMANDS: u32 = 10;
/// Refused logins tolerated on one connection before it is closed.
pub const MAX_LOGIN_ATTEMPTS: u32 = 3;
