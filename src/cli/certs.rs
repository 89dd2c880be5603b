//! `postern ca init` and `postern cert issue | revoke | list`: client certificates from the
//! CA in `state_dir/ca` (`crate::stores::ca`).

use std::path::Path;

use anyhow::{Context, bail};
use time::OffsetDateTime;

use super::{load_config, normalized};
use crate::stores::ca::{self, Ca};

fn date(unix: i64) -> String {
    crate::audit::file::rfc3339(u64::try_from(unix).unwrap_or(0))
}

/// Creates the CA and says what to put in the config.
pub fn ca_init(path: &Path, name: &str, days: u32) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let state_dir = config.resolve(&config.server.state_dir);
    let ca = Ca::init(&state_dir, name, days)?;
    println!("created the CA {name:?} in {}", Ca::dir(&state_dir).display());
    println!("key (keep it private, back it up): {}", Ca::dir(&state_dir).join(ca::CA_KEY_FILE).display());
    println!("next: in [tls] of {} set", path.display());
    println!("  client_ca = {:?}", ca.cert_file().display().to_string());
    println!("  client_crl = {:?}", ca.crl_file().display().to_string());
    println!("then give profiles client_cert = \"required\" or \"alternative\" and reload (systemctl reload postern)");
    Ok(())
}

/// Issues a certificate for `user`, writes it as a PKCS#12 file to `out` (0600, never
/// over an existing file) and prints its password once.
pub fn cert_issue(path: &Path, user: &str, out: &Path, days: u32) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let user = normalized(user)?;
    if days == 0 {
        bail!("--days must be at least 1");
    }
    if out.exists() {
        bail!("{} exists; choose another --out (an issued file is never overwritten)", out.display());
    }
    let state_dir = config.resolve(&config.server.state_dir);
    let mut ca = Ca::open(&state_dir)?;
    let now = OffsetDateTime::now_utc();
    // A little slack for clients whose clocks run behind.
    let issued = ca.issue(&user, now - time::Duration::minutes(10), now + time::Duration::days(i64::from(days)))?;
    let password = crate::stores::vault::generate_password();
    let p12 = issued.pkcs12(&user, ca.cert_der(), password.expose())?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fsutil::write_private_atomic(out, &p12).with_context(|| format!("writing {}", out.display()))?;
    println!(
        "issued a certificate for {user}: serial {}, valid until {}",
        issued.serial,
        date(issued.not_after.unix_timestamp())
    );
    println!("wrote {} (mode 0600)", out.display());
    println!("PKCS#12 password (shown only now; give it to the user apart from the file): {}", password.expose());
    Ok(())
}

/// Revokes `serial`, and writes the new CRL where `[tls] client_crl` points.
pub fn cert_revoke(path: &Path, serial: &str) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let state_dir = config.resolve(&config.server.state_dir);
    let mut ca = Ca::open(&state_dir)?;
    let (record, crl) = ca.revoke(serial)?;
    println!("revoked serial {} ({})", record.serial, record.user);
    match &config.tls.client_crl {
        Some(target) => {
            let target = config.resolve(target);
            if target != ca.crl_file() {
                ca::write_public(&target, crl.as_bytes())?;
            }
            println!("wrote the CRL to {}; reload to apply it: systemctl reload postern", target.display());
        }
        None => println!(
            "wrote the CRL to {}; it takes effect once [tls] client_crl = {:?} is set and postern is reloaded",
            ca.crl_file().display(),
            ca.crl_file().display().to_string()
        ),
    }
    Ok(())
}

/// Lists the certificates the CA issued.
pub fn cert_list(path: &Path) -> anyhow::Result<()> {
    let config = load_config(path)?;
    let ca = Ca::open(&config.resolve(&config.server.state_dir))?;
    let now = OffsetDateTime::now_utc().unix_timestamp();
    println!("{:<32}  {:<20}  {:<10}  user", "serial", "expires", "status");
    for record in ca.issued() {
        let status = match record.revoked_at {
            Some(_) => "revoked",
            None if record.not_after < now => "expired",
            None => "valid",
        };
        println!("{:<32}  {:<20}  {:<10}  {}", record.serial, date(record.not_after), status, record.user);
    }
    Ok(())
}
