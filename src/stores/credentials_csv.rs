//! Upstream credentials in bulk as CSV (`user,password[,upstream_user]` with a header line):
//! validating an import, storing it, and the export. `postern user import/export` and the
//! console's users page both use these.

use std::collections::HashSet;

use super::vault::{UpstreamSecret, Vault, VaultError};
use crate::csv;
use crate::secret::Secret;

/// A row of an import that passed validation.
pub struct ImportRow {
    /// The user (normalized).
    pub user: String,
    /// The upstream password.
    pub secret: Secret,
    /// The upstream login name, when it differs from the user.
    pub upstream_user: Option<String>,
}

/// Why an import cannot be read at all (bad rows are reported one by one instead).
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    /// The text is not CSV.
    #[error(transparent)]
    Csv(#[from] csv::CsvError),
    /// There is no header line.
    #[error("the file is empty; expected a header line `user,password[,upstream_user]`")]
    Empty,
    /// The header lacks a required column.
    #[error("the header line must name the columns `user` and `password` (and optionally `upstream_user`)")]
    Header,
}

/// Validates every row of an import; returns the good rows and one message per bad row.
pub fn validate(text: &str) -> Result<(Vec<ImportRow>, Vec<String>), ImportError> {
    let records = csv::parse(text)?;
    let Some((header, rows)) = records.split_first() else {
        return Err(ImportError::Empty);
    };
    let column = |name: &str| header.fields.iter().position(|f| f.trim().eq_ignore_ascii_case(name));
    let (Some(user_col), Some(secret_col)) = (column("user"), column("password")) else {
        return Err(ImportError::Header);
    };
    let upstream_col = column("upstream_user");
    let mut accepted = Vec::new();
    let mut rejected = Vec::new();
    let mut seen = HashSet::new();
    for record in rows {
        let cell = |i: usize| record.fields.get(i).map(String::as_str).unwrap_or("");
        let user = match crate::user::normalize(cell(user_col)) {
            Ok(user) => user,
            Err(_) => {
                rejected.push(format!(
                    "line {}: `{}` is not a usable user name",
                    record.line,
                    crate::user::escape(cell(user_col))
                ));
                continue;
            }
        };
        if !seen.insert(user.clone()) {
            rejected.push(format!("line {}: {user} appears more than once", record.line));
            continue;
        }
        let secret = cell(secret_col);
        if secret.is_empty() {
            rejected.push(format!("line {}: {user} has an empty password", record.line));
            continue;
        }
        if secret.chars().any(char::is_control) {
            rejected.push(format!("line {}: {user}'s password contains control characters", record.line));
            continue;
        }
        let upstream_user = upstream_col.map(cell).map(str::trim).filter(|u| !u.is_empty());
        if upstream_user.is_some_and(|u| u.chars().any(|c| c.is_control() || c.is_whitespace())) {
            rejected
                .push(format!("line {}: {user}'s upstream_user contains spaces or control characters", record.line));
            continue;
        }
        accepted.push(ImportRow { user, secret: Secret::new(secret), upstream_user: upstream_user.map(str::to_owned) });
    }
    Ok((accepted, rejected))
}

/// Stores `rows` in `vault` (inside [`Vault::update`]); `progress` hears how many are done.
/// On an error, the user it happened at (rows before it are stored).
pub fn store(vault: &mut Vault, rows: &[ImportRow], progress: impl Fn(usize)) -> Result<(), (String, VaultError)> {
    for (i, row) in rows.iter().enumerate() {
        let mut entry = UpstreamSecret::password(row.secret.clone());
        entry.upstream_user = row.upstream_user.clone();
        vault.set(&row.user, entry).map_err(|e| (row.user.clone(), e))?;
        progress(i + 1);
    }
    Ok(())
}

/// Every stored credential as CSV (user, upstream_user, kind, changed, previous_pending, and
/// the password with `reveal`, which the caller must audit first). A secret: wiped when
/// dropped.
pub fn export(vault: &Vault, reveal: bool) -> Result<Secret, VaultError> {
    let mut text = String::new();
    let mut header = vec!["user", "upstream_user", "kind", "changed", "previous_pending"];
    if reveal {
        header.push("password");
    }
    text.push_str(&csv::line(&header));
    for l in &vault.list() {
        let changed = crate::audit::file::rfc3339(l.changed);
        let pending = if l.has_previous { "yes" } else { "no" };
        let mut row =
            vec![l.user.as_str(), l.upstream_user.as_deref().unwrap_or(""), l.kind.as_str(), &changed, pending];
        let secret = if reveal { vault.get(&l.user)?.map(|s| s.secret) } else { None };
        if let Some(secret) = &secret {
            row.push(secret.expose());
        }
        text.push_str(&csv::line(&row));
    }
    Ok(Secret::new(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_validation_reports_each_bad_row() {
        let text = "user,password,upstream_user\r\nA@x.org,pw1,\r\nbad user,pw2\r\na@x.org,pw3\r\nb@x.org,\r\nc@x.org,pw,\"has space\"\r\nd@x.org,\"p,w\",d@gmail.com\r\n";
        let (ok, bad) = validate(text).unwrap();
        let users: Vec<&str> = ok.iter().map(|r| r.user.as_str()).collect();
        assert_eq!(users, ["a@x.org", "d@x.org"]);
        assert_eq!(ok[1].secret.expose(), "p,w");
        assert_eq!(ok[1].upstream_user.as_deref(), Some("d@gmail.com"));
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert!(bad[0].starts_with("line 3") && bad[1].contains("more than once") && bad[2].contains("empty"));
        assert!(validate("name,secret\n").is_err());
        assert!(validate("").is_err());
    }
}
