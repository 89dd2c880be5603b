//! Where the decision and the upstream login get their facts: the [`directory`] (who the
//! user is, their password and groups), the users' per-device [`app_passwords`], the
//! [`vault`] (each user's upstream credential) and the [`oauth`] token sources (access
//! tokens for XOAUTH2).

pub mod app_passwords;
pub mod directory;
pub mod oauth;
pub mod vault;
