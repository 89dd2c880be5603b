//! Where the decision and the upstream login get their facts: the [`directory`] (who the
//! user is, their password and groups), the [`vault`] (each user's upstream credential)
//! and the [`oauth`] token sources (access tokens for XOAUTH2); the [`ca`] issues client
//! certificates.

pub mod ca;
pub mod directory;
pub mod oauth;
pub mod vault;
