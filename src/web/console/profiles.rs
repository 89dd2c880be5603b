//! The profiles pages: the list, one profile's form, a diff preview of the file as it would
//! be written, and the save. The file is edited in place (comments and the other profiles
//! untouched), validated with the daemon's own parser, written atomically only if nobody
//! changed it since the preview, and applied the way a hand edit is: loaded, swapped in,
//! live sessions re-checked.

use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::response::Response;

use super::Console;
use super::auth::Admin;
use super::page::{self, Nav};
use crate::access::profiles::Profiles;

/// One profile as the form shows it.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize)]
pub struct ProfileForm {
    /// The profile's name as it is in the file; empty for a new profile.
    #[serde(default)]
    pub original: String,
    /// The name.
    #[serde(default)]
    pub name: String,
    /// `on` when mail access is granted (an HTML checkbox).
    #[serde(default)]
    pub mail_access: Option<String>,
    /// Covered protocols, `on` each; none or all means every protocol.
    #[serde(default)]
    pub imap: Option<String>,
    /// See `imap`.
    #[serde(default)]
    pub pop3: Option<String>,
    /// See `imap`.
    #[serde(default)]
    pub smtp: Option<String>,
    /// Allowed addresses and networks, one per line.
    #[serde(default)]
    pub allow: String,
    /// Users, one per line.
    #[serde(default)]
    pub users: String,
    /// Directory groups, one per line.
    #[serde(default)]
    pub groups: String,
    /// `on` to delete the profile instead.
    #[serde(default)]
    pub delete: Option<String>,
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
}

fn lines(text: &str) -> Vec<String> {
    text.lines().map(str::trim).filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

fn strings(item: Option<&toml_edit::Item>) -> Vec<String> {
    item.and_then(|i| i.as_array())
        .map(|a| a.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// The profiles of the file's text, as forms, in file order.
pub fn read_forms(text: &str) -> Result<Vec<ProfileForm>, String> {
    let doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| e.to_string())?;
    let Some(tables) = doc.get("profile").and_then(|p| p.as_array_of_tables()) else {
        return Ok(Vec::new());
    };
    Ok(tables
        .iter()
        .map(|t| {
            let name = t.get("name").and_then(|n| n.as_str()).unwrap_or_default().to_owned();
            let protocols = strings(t.get("protocols"));
            let has = |p: &str| (protocols.is_empty() || protocols.iter().any(|x| x == p)).then(|| "on".to_owned());
            ProfileForm {
                original: name.clone(),
                name,
                mail_access: t.get("mail_access").and_then(|v| v.as_bool()).unwrap_or(true).then(|| "on".into()),
                imap: has("imap"),
                pop3: has("pop3"),
                smtp: has("smtp"),
                allow: strings(t.get("allow")).join("\n"),
                users: strings(t.get("users")).join("\n"),
                groups: strings(t.get("groups")).join("\n"),
                delete: None,
                csrf: String::new(),
            }
        })
        .collect())
}

fn array(values: Vec<String>) -> toml_edit::Item {
    let mut array = toml_edit::Array::new();
    for value in values {
        array.push(value);
    }
    toml_edit::value(array)
}

/// The file's text with the form applied to one profile (or the profile deleted, or a new
/// one appended); comments and every other profile stay as they are. Errors say what to
/// fix; the result still needs the daemon's own validation.
pub fn apply(text: &str, form: &ProfileForm) -> Result<String, String> {
    let mut doc: toml_edit::DocumentMut = text.parse().map_err(|e: toml_edit::TomlError| e.to_string())?;
    let name = form.name.trim();
    if form.delete.is_none() && name.is_empty() {
        return Err("give the profile a name".into());
    }
    if !doc.contains_key("profile") {
        doc.insert("profile", toml_edit::Item::ArrayOfTables(toml_edit::ArrayOfTables::new()));
    }
    let tables =
        doc["profile"].as_array_of_tables_mut().ok_or("`profile` in the file is not a list of [[profile]] tables")?;
    let index = tables.iter().position(|t| t.get("name").and_then(|n| n.as_str()) == Some(form.original.as_str()));
    if form.original.is_empty() && tables.iter().any(|t| t.get("name").and_then(|n| n.as_str()) == Some(name)) {
        return Err(format!("a profile named {name:?} exists already"));
    }
    if form.delete.is_some() {
        let index = index.ok_or_else(|| format!("no profile named {:?} in the file", form.original))?;
        tables.remove(index);
        return Ok(doc.to_string());
    }
    let table = match index {
        Some(i) => tables.get_mut(i).ok_or("the profile vanished")?,
        None if form.original.is_empty() => {
            tables.push(toml_edit::Table::new());
            let last = tables.len() - 1;
            tables.get_mut(last).ok_or("cannot add a profile")?
        }
        None => {
            return Err(format!(
                "no profile named {:?} in the file; it may have been renamed meanwhile",
                form.original
            ));
        }
    };
    table["name"] = toml_edit::value(name);
    if form.mail_access.is_some() {
        table.remove("mail_access");
    } else {
        table["mail_access"] = toml_edit::value(false);
    }
    let protocols: Vec<String> = [("imap", &form.imap), ("pop3", &form.pop3), ("smtp", &form.smtp)]
        .into_iter()
        .filter(|(_, on)| on.is_some())
        .map(|(p, _)| p.to_owned())
        .collect();
    if protocols.is_empty() || protocols.len() == 3 {
        table.remove("protocols");
    } else {
        table["protocols"] = array(protocols);
    }
    table["allow"] = array(lines(&form.allow));
    for (key, text) in [("users", &form.users), ("groups", &form.groups)] {
        let values = lines(text);
        if values.is_empty() {
            table.remove(key);
        } else {
            table[key] = array(values);
        }
    }
    Ok(doc.to_string())
}

/// One line of a diff, for the preview.
pub struct DiffLine {
    /// `add`, `del` or empty.
    pub class: &'static str,
    /// The line with its `+`, `-` or ` ` sign.
    pub text: String,
}

/// The unified diff of `old` to `new`, line by line.
pub fn diff(old: &str, new: &str) -> Vec<DiffLine> {
    let diff = similar::TextDiff::from_lines(old, new);
    let text = diff.unified_diff().context_radius(3).header("profiles (now)", "profiles (after saving)").to_string();
    text.lines()
        .map(|line| DiffLine {
            class: match line.as_bytes().first() {
                Some(b'+') if !line.starts_with("+++") => "add",
                Some(b'-') if !line.starts_with("---") => "del",
                _ => "",
            },
            text: line.to_owned(),
        })
        .collect()
}

/// A fingerprint of the file's text, so a save can tell the file changed since the preview.
pub fn fingerprint(text: &str) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

#[derive(Template)]
#[template(path = "console/profiles.html")]
struct ListPage {
    nav: Option<Nav>,
    profiles: Vec<ProfileForm>,
    error: String,
}

#[derive(Template)]
#[template(path = "console/profile_edit.html")]
struct EditPage {
    nav: Option<Nav>,
    form: ProfileForm,
    csrf: String,
    error: String,
}

#[derive(Template)]
#[template(path = "console/profile_preview.html")]
struct PreviewPage {
    nav: Option<Nav>,
    name: String,
    deleting: bool,
    diff: Vec<DiffLine>,
    new_text: String,
    base: String,
    csrf: String,
}

fn read_file(console: &Console) -> Result<String, String> {
    let path = console.profiles_path();
    std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// `GET /profiles`.
pub async fn list(State(console): State<Arc<Console>>, admin: Admin) -> Response {
    let (profiles, error) = match read_file(&console).and_then(|t| read_forms(&t)) {
        Ok(forms) => (forms, String::new()),
        Err(e) => (Vec::new(), e),
    };
    page::html(&ListPage { nav: admin.nav("profiles"), profiles, error })
}

/// The edit page's query: which profile; none for a new one.
#[derive(serde::Deserialize)]
pub struct Which {
    #[serde(default)]
    name: String,
}

/// `GET /profiles/edit?name=NAME`.
pub async fn edit(State(console): State<Arc<Console>>, admin: Admin, Query(which): Query<Which>) -> Response {
    let forms = match read_file(&console).and_then(|t| read_forms(&t)) {
        Ok(forms) => forms,
        Err(e) => {
            return page::result(admin.nav(""), false, "The profiles file cannot be read.".into(), e, "/profiles");
        }
    };
    let form = if which.name.is_empty() {
        ProfileForm { mail_access: Some("on".into()), ..ProfileForm::default() }
    } else {
        match forms.into_iter().find(|f| f.name == which.name) {
            Some(form) => form,
            None => {
                return page::result(
                    admin.nav(""),
                    false,
                    format!("No profile named {:?}.", which.name),
                    String::new(),
                    "/profiles",
                );
            }
        }
    };
    page::html(&EditPage { nav: admin.nav("profiles"), csrf: admin.csrf.clone(), form, error: String::new() })
}

/// `POST /profiles/preview`: the form applied to the file, validated, shown as a diff.
pub async fn preview(
    State(console): State<Arc<Console>>,
    admin: Admin,
    axum::Form(form): axum::Form<ProfileForm>,
) -> Response {
    if let Some(refused) = admin.csrf_refusal(&form.csrf) {
        return refused;
    }
    let old = match read_file(&console) {
        Ok(text) => text,
        Err(e) => {
            return page::result(admin.nav(""), false, "The profiles file cannot be read.".into(), e, "/profiles");
        }
    };
    let checked = apply(&old, &form).and_then(|new| Profiles::parse(&new).map(|_| new));
    match checked {
        Ok(new_text) => page::html(&PreviewPage {
            nav: admin.nav("profiles"),
            name: if form.original.is_empty() { form.name.clone() } else { form.original.clone() },
            deleting: form.delete.is_some(),
            diff: diff(&old, &new_text),
            base: fingerprint(&old),
            new_text,
            csrf: admin.csrf.clone(),
        }),
        Err(error) => {
            let mut response =
                page::html(&EditPage { nav: admin.nav("profiles"), csrf: admin.csrf.clone(), form, error });
            *response.status_mut() = axum::http::StatusCode::UNPROCESSABLE_ENTITY;
            response
        }
    }
}

/// The save form: the file's new text and the fingerprint of the text it was made from.
#[derive(serde::Deserialize)]
pub struct SaveForm {
    #[serde(default)]
    new_text: String,
    #[serde(default)]
    base: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    csrf: String,
}

/// `POST /profiles/save`: writes the previewed text if the file is still what the preview
/// was made from, then applies it like a hand edit.
pub async fn save(
    State(console): State<Arc<Console>>,
    admin: Admin,
    axum::Form(form): axum::Form<SaveForm>,
) -> Response {
    if let Some(refused) = admin.csrf_refusal(&form.csrf) {
        return refused;
    }
    // One save at a time, so two saves from the same preview cannot both pass the check.
    let _one_at_a_time = console.saving.lock().await;
    let path = console.profiles_path();
    let current = match read_file(&console) {
        Ok(text) => text,
        Err(e) => {
            return page::result(admin.nav(""), false, "The profiles file cannot be read.".into(), e, "/profiles");
        }
    };
    if fingerprint(&current) != form.base {
        return page::result(
            admin.nav(""),
            false,
            "The profiles file changed since the preview (someone else saved, or it was edited by hand). Nothing was written; open the profile again.".into(),
            String::new(),
            "/profiles",
        );
    }
    let profiles = match Profiles::parse(&form.new_text) {
        Ok(p) => p,
        Err(e) => {
            return page::result(
                admin.nav(""),
                false,
                "The profiles are not valid; nothing was written.".into(),
                e,
                "/profiles",
            );
        }
    };
    let new_text = form.new_text.clone();
    let target = path.clone();
    let written =
        tokio::task::spawn_blocking(move || crate::fsutil::write_private_atomic(&target, new_text.as_bytes())).await;
    if let Err(e) = written.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
        return page::result(admin.nav(""), false, format!("Cannot write {}.", path.display()), e, "/profiles");
    }
    console.state.set_profiles(profiles);
    let closed = crate::access::decision::revalidate(&console.state).await;
    // The whole file is what was written: the audit names it by fingerprint, before and after.
    let change = format!(
        "profile {}; file sha256 {} -> {}",
        form.name,
        &form.base[..form.base.len().min(16)],
        &fingerprint(&form.new_text)[..16]
    );
    console.audit(&admin.name, admin.ip, "console_profiles_saved", "", &change);
    page::result(
        admin.nav(""),
        true,
        format!(
            "Saved. The profiles apply to every login from now on; {closed} live session(s) no longer allowed were closed."
        ),
        String::new(),
        "/profiles",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# Office networks: edit with care.
[[profile]]
name = "office"
allow = ["127.0.0.1/32"]   # the front desk
users = ["alice@example.com"]

[[profile]]
name = "travel"
allow = ["192.0.2.0/24"]
groups = ["travellers"]
protocols = ["imap"]
"#;

    fn form_of(name: &str) -> ProfileForm {
        read_forms(FILE).unwrap().into_iter().find(|f| f.name == name).unwrap()
    }

    #[test]
    fn the_form_reads_each_profile_as_the_file_has_it() {
        let travel = form_of("travel");
        assert_eq!(travel.allow, "192.0.2.0/24");
        assert_eq!(travel.groups, "travellers");
        assert_eq!((travel.imap.is_some(), travel.pop3.is_some(), travel.smtp.is_some()), (true, false, false));
        assert!(form_of("office").mail_access.is_some());
    }

    #[test]
    fn an_edit_changes_one_profile_and_keeps_comments_and_the_others() {
        let mut office = form_of("office");
        office.allow = "127.0.0.1/32\n 198.51.100.7 \n\n".into();
        let new = apply(FILE, &office).unwrap();
        assert!(new.contains("# Office networks: edit with care."), "{new}");
        assert!(new.contains("\"198.51.100.7\""), "{new}");
        assert!(new.contains("name = \"travel\"") && new.contains("protocols = [\"imap\"]"), "{new}");
        let profiles = Profiles::parse(&new).unwrap();
        let ip = "198.51.100.7".parse().unwrap();
        assert!(profiles.for_user("alice@example.com", &[])[0].matching_entry(ip).is_some());
        let changed: Vec<_> = diff(FILE, &new).into_iter().filter(|l| !l.class.is_empty()).map(|l| l.text).collect();
        assert_eq!(changed.len(), 2, "one line out, one in: {changed:?}");
    }

    #[test]
    fn new_profiles_are_appended_and_deleted_ones_removed() {
        let new = ProfileForm {
            name: "vpn".into(),
            mail_access: Some("on".into()),
            allow: "10.8.0.0/16".into(),
            groups: "staff".into(),
            pop3: Some("on".into()),
            ..ProfileForm::default()
        };
        let text = apply(FILE, &new).unwrap();
        assert_eq!(Profiles::parse(&text).unwrap().len(), 3);
        assert!(text.contains("protocols = [\"pop3\"]"), "{text}");
        let duplicate = ProfileForm { name: "office".into(), ..new.clone() };
        assert!(apply(FILE, &duplicate).unwrap_err().contains("exists already"));
        let delete = ProfileForm { delete: Some("on".into()), ..form_of("travel") };
        let text = apply(FILE, &delete).unwrap();
        assert_eq!(Profiles::parse(&text).unwrap().len(), 1);
        assert!(!text.contains("travellers"));
    }

    #[test]
    fn a_broken_entry_is_caught_by_the_daemons_own_parser() {
        let mut office = form_of("office");
        office.allow = "not-an-address".into();
        let text = apply(FILE, &office).unwrap();
        let error = Profiles::parse(&text).unwrap_err();
        assert!(error.contains("office") && error.contains("not-an-address"), "{error}");
    }

    #[test]
    fn the_fingerprint_changes_with_the_text() {
        assert_eq!(fingerprint(FILE), fingerprint(FILE));
        assert_ne!(fingerprint(FILE), fingerprint(&FILE.replace("travel", "trip")));
        assert_eq!(fingerprint("").len(), 64);
    }
}
