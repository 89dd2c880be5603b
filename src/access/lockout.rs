//! Lockout after repeated password failures.
//!
//! The session asks [`Lockout::is_locked`] before anything else and reports each password
//! failure and success. Until thresholds are configured, nobody is ever locked.

/// Tracks password failures per user.
#[derive(Debug, Default)]
pub struct Lockout {}

impl Lockout {
    /// A lockout that never locks.
    pub fn disabled() -> Self {
        Self {}
    }

    /// Whether `user` is currently locked out.
    pub fn is_locked(&self, _user: &str) -> bool {
        false
    }

    /// Records a wrong password for `user`.
    pub fn record_failure(&self, _user: &str) {}

    /// Records a successful password check for `user`.
    pub fn record_success(&self, _user: &str) {}
}
