//! The `postern` command line: parses arguments, sets up logging, and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use postern::admin::{self, SecretSource};
use postern::config::LogFormat;

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
    /// Run the proxy until SIGTERM; SIGHUP reloads profiles and the vault.
    Serve,
    /// Validate the configuration and the files it names, explaining any error.
    Check,
    /// The vault of upstream credentials.
    #[command(subcommand)]
    Vault(VaultCommand),
    /// Users: directory passwords (file directory) and upstream credentials.
    #[command(subcommand)]
    User(UserCommand),
    /// Certificates.
    #[command(subcommand)]
    Cert(CertCommand),
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
        /// Upstream login name, when it differs from the mail address.
        #[arg(long)]
        upstream_user: Option<String>,
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
        Command::Serve => admin::load_config(&cli.config).map(|c| c.audit.format).unwrap_or_default(),
        _ => LogFormat::Text,
    };
    init_logging(format);
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let config = cli.config.as_path();
    let result = runtime.block_on(async {
        match cli.command {
            Command::Serve => admin::serve(config).await,
            Command::Check => admin::check(config).await,
            Command::Vault(VaultCommand::Init) => admin::vault_init(config),
            Command::User(UserCommand::SetPassword { user }) => admin::set_password(config, &user),
            Command::User(UserCommand::SetUpstream { user, generate, upstream_user, .. }) => {
                let source = if generate { SecretSource::Generate } else { SecretSource::Stdin };
                admin::set_upstream(config, &user, source, upstream_user)
            }
            Command::Cert(CertCommand::Generate { hostname, cert, key }) => admin::cert_generate(&hostname, &cert, &key),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
