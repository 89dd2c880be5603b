//! The `postern` command line: parses arguments, sets up logging, and calls the library.

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use postern::cli::{self, SecretSource};
use postern::config::LogFormat;
use postern::daemon;
use postern::protocol::Protocol;

/// Every heap block is wiped when it is freed: passwords and tokens pass through buffers of
/// libraries Postern cannot wipe itself (the TLS library's records, the LDAP client's
/// requests), and freed memory must not keep them.
#[global_allocator]
static ALLOCATOR: zeroizing_alloc::ZeroAlloc<std::alloc::System> = zeroizing_alloc::ZeroAlloc(std::alloc::System);

/// Exit status of operational failures; clap exits with 2 on usage errors.
const FAILURE: u8 = 1;

/// Authenticating IMAP/POP3/SMTP TLS proxy.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// The configuration file.
    #[arg(long, short, global = true, env = "POSTERN_CONFIG", default_value = "/etc/postern/proxy.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy until SIGTERM; SIGHUP reloads profiles, vault, directory and certificate.
    Serve,
    /// Validate the configuration and the files it names (present, private), explaining any error.
    Check,
    /// Ask the running daemon for uptime, sessions and reloads over its control socket.
    Status {
        /// Also show this user's last upstream login result.
        #[arg(long)]
        user: Option<String>,
    },
    /// Log in upstream with a user's stored credential and print OK or the upstream's answer.
    Probe {
        /// The user's mail address.
        user: String,
        /// The upstream to try.
        #[arg(long, value_enum, default_value = "imap")]
        protocol: ProtocolArg,
    },
    /// Read the audit file: the access history of users.
    Audit {
        /// Only this user.
        #[arg(long)]
        user: Option<String>,
        /// Only this recent, e.g. 90s, 15m, 1h, 7d.
        #[arg(long)]
        since: Option<String>,
        /// The audit file; `[audit] file` of the config when absent.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Security profiles.
    #[command(subcommand)]
    Access(AccessCommand),
    /// The vault of upstream credentials.
    #[command(subcommand)]
    Vault(VaultCommand),
    /// Users: directory passwords (file directory) and upstream credentials.
    #[command(subcommand)]
    User(UserCommand),
    /// Certificates: the server's, and client certificates issued by Postern's CA.
    #[command(subcommand)]
    Cert(CertCommand),
    /// The small CA under state_dir that issues client certificates.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create the CA (key 0600, certificate, empty CRL) in state_dir/ca; never overwrites one.
    Init {
        /// The CA's name, shown to users when their mail client asks which certificate to use.
        #[arg(long, default_value = "Postern client CA")]
        name: String,
        /// Days the CA certificate is valid.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum ProtocolArg {
    Imap,
    Pop3,
    Smtp,
}

impl From<ProtocolArg> for Protocol {
    fn from(p: ProtocolArg) -> Self {
        match p {
            ProtocolArg::Imap => Protocol::Imap,
            ProtocolArg::Pop3 => Protocol::Pop3,
            ProtocolArg::Smtp => Protocol::Smtp,
        }
    }
}

#[derive(Subcommand)]
enum AccessCommand {
    /// Explain which profiles apply to a user and whether an address may log in.
    Explain {
        /// The user's mail address.
        user: String,
        /// The client address, IPv4 or IPv6.
        ip: IpAddr,
        /// The protocol the client would use.
        #[arg(long, value_enum, default_value = "imap")]
        protocol: ProtocolArg,
        /// A client certificate (PEM) to judge against [tls] client_ca and client_crl.
        #[arg(long)]
        cert: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum VaultCommand {
    /// Create the vault key and file in the state directory (never overwrites a key).
    Init,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Set a user's directory password in the file directory (prompted, or one line of stdin).
    SetPassword {
        /// The user's mail address.
        user: String,
    },
    /// Store the credential Postern logs in upstream with for this user.
    SetUpstream {
        /// The user's mail address.
        user: String,
        /// Generate a random password, print it once, and store it.
        #[arg(long, conflicts_with = "stdin", required_unless_present = "stdin")]
        generate: bool,
        /// Read the password (e.g. an app password) from standard input.
        #[arg(long)]
        stdin: bool,
        /// With --stdin: what is read is the user's OAuth2 refresh token, not a password.
        #[arg(long, requires = "stdin")]
        refresh_token: bool,
        /// Upstream login name, when it differs from the mail address.
        #[arg(long)]
        upstream_user: Option<String>,
    },
    /// Enrol the user's OAuth2 refresh token with the device authorization grant: prints a
    /// code to enter on the provider's page, waits for the approval, stores the token.
    Authorize {
        /// The user's mail address.
        user: String,
        /// The refresh-token source, when several `[oauth.NAME]` tables are configured.
        #[arg(long)]
        source: Option<String>,
    },
    /// Replace a user's upstream password, keeping the old one as "previous" until confirmed.
    Rotate {
        /// The user's mail address.
        user: String,
        /// Read the new password from standard input instead of generating one.
        #[arg(long, conflicts_with = "confirm")]
        stdin: bool,
        /// The new password works upstream: forget the previous one.
        #[arg(long)]
        confirm: bool,
    },
    /// Per-device app passwords, accepted where a profile says password = "app" or "either".
    #[command(subcommand)]
    AppPassword(AppPasswordCommand),
    /// Lift a user's lockout after repeated wrong passwords (asks the running daemon).
    Unlock {
        /// The user's mail address.
        user: String,
    },
    /// Remove a user's upstream credential (and file-directory entry); live sessions close on reload.
    Remove {
        /// The user's mail address.
        user: String,
    },
    /// List users: whether an upstream credential is stored and when it last changed (never secrets).
    List,
    /// Show what is stored for a user; the secret only with --reveal, which is audited.
    ShowUpstream {
        /// The user's mail address.
        user: String,
        /// Print the secret itself.
        #[arg(long)]
        reveal: bool,
    },
    /// Import upstream passwords from CSV with a header `user,password[,upstream_user]`.
    Import {
        /// The CSV file.
        file: PathBuf,
        /// Store the valid rows even when some are rejected.
        #[arg(long)]
        skip_invalid: bool,
    },
    /// Export stored credentials as CSV; secrets only with --reveal (audited).
    Export {
        /// Write here (mode 0600) instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
        /// Include the secrets.
        #[arg(long)]
        reveal: bool,
    },
}

#[derive(Subcommand)]
enum AppPasswordCommand {
    /// Generate an app password for one device, print it once, and store only its hash.
    Add {
        /// The user's mail address.
        user: String,
        /// What the password is for, e.g. "phone" (unique per user).
        #[arg(long)]
        label: String,
    },
    /// List a user's app passwords: label, created, last used (never the passwords).
    List {
        /// The user's mail address.
        user: String,
    },
    /// Revoke one app password; the running daemon closes the sessions it opened at once.
    Revoke {
        /// The user's mail address.
        user: String,
        /// The label given when it was added.
        label: String,
    },
}

#[derive(Subcommand)]
enum CertCommand {
    /// Write a self-signed ECDSA certificate and key (for first runs and tests).
    Generate {
        /// Host name the certificate is for.
        #[arg(long, default_value = "localhost")]
        hostname: String,
        /// Certificate file to write.
        #[arg(long)]
        cert: PathBuf,
        /// Key file to write (mode 0600).
        #[arg(long)]
        key: PathBuf,
    },
    /// Issue a client certificate for a user as a password-protected PKCS#12 file; the
    /// password is printed once.
    Issue {
        /// The user's mail address (put in the certificate as its email name).
        user: String,
        /// The PKCS#12 file to write (mode 0600; never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Days the certificate is valid.
        #[arg(long, default_value_t = 365)]
        days: u32,
    },
    /// Revoke a client certificate by serial (hex, as `cert list` shows) and rewrite the CRL.
    Revoke {
        /// The serial number.
        serial: String,
    },
    /// List the client certificates the CA issued: serial, user, expiry, revoked or not.
    List,
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("POSTERN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = match &cli.command {
        Command::Serve => cli::load_config(&cli.config).map(|c| c.audit.format).unwrap_or_default(),
        _ => LogFormat::Text,
    };
    init_logging(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(FAILURE);
        }
    };
    let config = cli.config.as_path();
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve => daemon::serve(config).await,
            Command::Check => cli::check(config).await,
            Command::Status { user } => cli::status(config, user.as_deref()).await,
            Command::Probe { user, protocol } => cli::probe(config, &user, protocol.into()).await,
            Command::Audit { user, since, file } => {
                cli::audit(config, file.as_deref(), user.as_deref(), since.as_deref())
            }
            Command::Access(AccessCommand::Explain { user, ip, protocol, cert }) => {
                cli::explain(config, &user, ip, protocol.into(), cert.as_deref()).await
            }
            Command::Vault(VaultCommand::Init) => cli::vault_init(config),
            Command::User(UserCommand::SetPassword { user }) => cli::set_password(config, &user),
            Command::User(UserCommand::SetUpstream { user, generate, refresh_token, upstream_user, .. }) => {
                let source = match (generate, refresh_token) {
                    (true, _) => SecretSource::Generate,
                    (false, true) => SecretSource::RefreshToken,
                    (false, false) => SecretSource::Stdin,
                };
                cli::set_upstream(config, &user, source, upstream_user)
            }
            Command::User(UserCommand::Rotate { user, stdin, confirm }) => {
                let source = if stdin { SecretSource::Stdin } else { SecretSource::Generate };
                cli::rotate(config, &user, source, confirm)
            }
            Command::User(UserCommand::Authorize { user, source }) => {
                cli::authorize(config, &user, source.as_deref()).await
            }
            Command::User(UserCommand::Remove { user }) => cli::remove(config, &user),
            Command::User(UserCommand::Unlock { user }) => cli::unlock(config, &user).await,
            Command::User(UserCommand::AppPassword(command)) => match command {
                AppPasswordCommand::Add { user, label } => cli::app_passwords::add(config, &user, &label).await,
                AppPasswordCommand::List { user } => cli::app_passwords::list(config, &user),
                AppPasswordCommand::Revoke { user, label } => cli::app_passwords::revoke(config, &user, &label).await,
            },
            Command::User(UserCommand::List) => cli::list(config),
            Command::User(UserCommand::ShowUpstream { user, reveal }) => cli::show_upstream(config, &user, reveal),
            Command::User(UserCommand::Import { file, skip_invalid }) => cli::import(config, &file, skip_invalid),
            Command::User(UserCommand::Export { output, reveal }) => cli::export(config, output.as_deref(), reveal),
            Command::Cert(CertCommand::Generate { hostname, cert, key }) => cli::cert_generate(&hostname, &cert, &key),
            Command::Cert(CertCommand::Issue { user, out, days }) => cli::cert_issue(config, &user, &out, days),
            Command::Cert(CertCommand::Revoke { serial }) => cli::cert_revoke(config, &serial),
            Command::Cert(CertCommand::List) => cli::cert_list(config),
            Command::Ca(CaCommand::Init { name, days }) => cli::ca_init(config, &name, days),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(FAILURE)
        }
    }
}
