//! Who may log in: the [`decision`] (the one place the rules are applied), the security
//! [`profiles`] it reads, [`lockout`] after repeated failures, and the concurrent session
//! [`slots`] per user and per address.

pub mod decision;
pub mod lockout;
pub mod profiles;
pub mod slots;
