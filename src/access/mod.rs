//! Who may log in: the [`decision`] (the one place the rules are applied), the security
//! [`profiles`] it reads, [`lockout`] after repeated failures, the concurrent session
//! [`slots`] per user and per address, and the [`store`] that keeps those counters (in
//! memory or shared in Redis).

pub mod admin;
pub mod certificate;
pub mod decision;
pub mod lockout;
pub mod profiles;
pub mod slots;
pub mod store;
