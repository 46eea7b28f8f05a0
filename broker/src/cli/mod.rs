//! The `keybroker` command line: the server (`serve`, `dev`, `check-config`) and client
//! subcommands for humans and scripts.

mod bulk;
mod commands;
#[cfg(feature = "dev")]
mod dev;

use std::{path::PathBuf, process::ExitCode};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::{Config, LogFormat};

/// keybroker: KEKs stay in the HSM; DEKs are wrapped and unwrapped over mutual TLS.
#[derive(Parser, Debug)]
#[command(name = "keybroker", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A refused call, as the commands print it: the gRPC code and the broker's message.
pub(super) fn status(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

#[derive(Subcommand, Debug)]
enum DomainCommand {
    /// Create the security domain in the configured token, as its security officer: three
    /// trusted wrap keys (one per KEK role, each forcing the KEK template on what it unwraps)
    /// and a MAC key. Once per token; refuses if one exists. The SO PIN comes from
    /// --so-pin-file or the KEYBROKER_SO_PIN environment variable, never the command line.
    Init {
        /// The broker's configuration file (module, token, user PIN).
        #[arg(long, short)]
        config: PathBuf,
        /// A file holding the SO PIN.
        #[arg(long)]
        so_pin_file: Option<PathBuf>,
    },
    /// Show the configured token's security domain id (or why there is none).
    Show {
        /// The broker's configuration file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the broker with a configuration file.
    Serve {
        /// The configuration file (see examples/keybroker.toml).
        #[arg(long, short)]
        config: PathBuf,
        /// Listen on this address instead of the configured one (e.g. 127.0.0.1:0).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
    },
    /// Validate a configuration file and probe its HSM (token, login, mechanisms), then exit.
    /// Prints the capability report (every mechanism keybroker uses: listed, known-answer test,
    /// what it serves) also when the broker would refuse the token; exits 1 then.
    CheckConfig {
        /// The configuration file.
        #[arg(long, short)]
        config: PathBuf,
        /// Output format.
        #[arg(long, short, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Development mode: make a SoftHSM2 token, a PKI and a config under a state directory
    /// (first run only), start the broker on loopback, show a wrap/unwrap, keep serving.
    #[cfg(feature = "dev")]
    Dev {
        /// Where the dev token, certificates, config and database live.
        #[arg(long, default_value = "keybroker-dev")]
        state_dir: PathBuf,
        /// Listen address.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
    },
    /// The security domain that backups are made in (the token's security officer).
    Domain {
        #[command(subcommand)]
        command: DomainCommand,
    },
    /// The HYOK kill switch (administrator role).
    Hyok {
        #[command(subcommand)]
        command: HyokCommand,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// The audit trail: verify a log file, or query a running broker.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Manage keys (control plane).
    Key {
        #[command(subcommand)]
        command: KeyCommand,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Wrap a DEK you supply under a key's newest version; prints the envelope (base64).
    Wrap {
        /// The key, "tenant/name".
        key: String,
        /// The DEK in hex.
        #[arg(
            long,
            conflicts_with = "plaintext_base64",
            required_unless_present = "plaintext_base64"
        )]
        plaintext_hex: Option<String>,
        /// The DEK in base64.
        #[arg(long)]
        plaintext_base64: Option<String>,
        /// Additional authenticated data (UTF-8 text) to bind.
        #[arg(long, default_value = "")]
        aad: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Unwrap an envelope (base64); prints the DEK (hex).
    Unwrap {
        /// The envelope, base64.
        wrapped: String,
        /// The key that made it (optional; checked if given).
        #[arg(long)]
        key: Option<String>,
        /// The AAD it was made with.
        #[arg(long, default_value = "")]
        aad: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Unwrap a raw RSA-OAEP ciphertext (base64) made with a key's exported public key.
    UnwrapRaw {
        /// The key, "tenant/name".
        key: String,
        /// The ciphertext, base64.
        ciphertext: String,
        /// The key version whose public key was used.
        #[arg(long)]
        version: u32,
        /// rsa-oaep-sha256 or rsa-oaep-sha1.
        #[arg(long)]
        algorithm: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Generate a DEK in the HSM; prints it (hex) and its envelope (base64).
    GenerateDataKey {
        /// The key, "tenant/name".
        key: String,
        /// DEK length in bytes (16-64, a multiple of 8).
        #[arg(long, default_value_t = 32)]
        length: u32,
        /// Additional authenticated data (UTF-8 text) to bind.
        #[arg(long, default_value = "")]
        aad: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Re-wrap an envelope under the newest version (of its key, or of --to).
    Rewrap {
        /// The envelope, base64.
        wrapped: String,
        /// The AAD it was made with.
        #[arg(long, default_value = "")]
        aad: String,
        /// Wrap under this key instead.
        #[arg(long)]
        to: Option<String>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Encrypt a small payload (1 byte to 64 KiB; one OAEP block for an RSA key) under a key
    /// that allows encrypt; prints the ciphertext (base64) with its key, version and algorithm.
    Encrypt {
        /// The key, "tenant/name".
        key: String,
        /// The payload as UTF-8 text.
        #[arg(long, conflicts_with_all = ["plaintext_base64", "plaintext_file"], required_unless_present_any = ["plaintext_base64", "plaintext_file"])]
        plaintext: Option<String>,
        /// The payload in base64.
        #[arg(long, conflicts_with = "plaintext_file")]
        plaintext_base64: Option<String>,
        /// Read the payload from this file.
        #[arg(long)]
        plaintext_file: Option<PathBuf>,
        /// Additional authenticated data (UTF-8 text) to bind (AES-256-GCM keys only).
        #[arg(long, default_value = "")]
        aad: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Decrypt a ciphertext (base64) made by `encrypt`; prints the payload (base64), or writes
    /// it to --out (a new file, mode 0600).
    Decrypt {
        /// The ciphertext, base64.
        ciphertext: String,
        /// The key that made it (optional; checked if given).
        #[arg(long)]
        key: Option<String>,
        /// The AAD it was made with.
        #[arg(long, default_value = "")]
        aad: String,
        /// Write the payload (raw bytes) to this new file instead of printing it.
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Sign a digest with the newest version of a signing key (ec-p256, ec-p384, or an RSA key
    /// made with --algorithm rsa-sign); prints the signature (base64; r || s for ES256/ES384).
    Sign {
        /// The key, "tenant/name".
        key: String,
        /// ES256, ES384, RS256, RS384, RS512, PS256, PS384 or PS512.
        #[arg(long)]
        alg: String,
        /// The digest in hex (SHA-256: 64 hex digits, SHA-384: 96, SHA-512: 128).
        #[arg(long, conflicts_with_all = ["digest_base64", "file"], required_unless_present_any = ["digest_base64", "file"])]
        digest_hex: Option<String>,
        /// The digest in base64.
        #[arg(long, conflicts_with = "file")]
        digest_base64: Option<String>,
        /// Hash this file (with the algorithm's hash) and sign the digest.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Verify a signature over a digest with a version of a signing key, inside the HSM. Exit
    /// status 1 when it is not valid.
    Verify {
        /// The key, "tenant/name".
        key: String,
        /// ES256, ES384, RS256, RS384, RS512, PS256, PS384 or PS512.
        #[arg(long)]
        alg: String,
        /// The version that signed (0 = newest).
        #[arg(long, default_value_t = 0)]
        version: u32,
        /// The digest in hex.
        #[arg(long, conflicts_with_all = ["digest_base64", "file"], required_unless_present_any = ["digest_base64", "file"])]
        digest_hex: Option<String>,
        /// The digest in base64.
        #[arg(long, conflicts_with = "file")]
        digest_base64: Option<String>,
        /// Hash this file (with the algorithm's hash) and verify over its digest.
        #[arg(long)]
        file: Option<PathBuf>,
        /// The signature, hex or base64.
        #[arg(long)]
        signature: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print random bytes from the HSM's RNG (1 to 4096), base64 (or hex with --hex).
    Random {
        /// How many bytes.
        count: u32,
        /// Print hex instead of base64.
        #[arg(long)]
        hex: bool,
        #[command(flatten)]
        conn: ConnArgs,
    },
    /// Print an RSA or EC key's public key.
    PublicKey {
        /// The key, "tenant/name".
        key: String,
        /// Version (0 = newest).
        #[arg(long, default_value_t = 0)]
        version: u32,
        /// pem or jwk.
        #[arg(long, default_value = "pem")]
        format: String,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
enum HyokCommand {
    /// Cut HYOK service identities off: from the moment this returns, their wraps and unwraps
    /// are refused, across all keys, until `reconnect` (survives broker restarts).
    Disconnect {
        /// Why (recorded in the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Let HYOK service identities in again.
    Reconnect {
        /// Why (recorded in the audit trail).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Show the state.
    Status,
}

// Parsed once per process: the size difference between variants does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
enum AuditCommand {
    /// Verify an audit log offline: hash chain, sequence, and (with --config) every checkpoint
    /// MAC in the HSM and the last checkpoint the broker recorded. Exit status 1 on tampering.
    Verify {
        /// The audit log file.
        file: PathBuf,
        /// The broker's config: check checkpoint MACs with its HSM and detect truncation against
        /// its store (SoftHSM2 needs SOFTHSM2_CONF as for `serve`).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Read audit records from a running broker (auditor role).
    Query {
        /// Only this key ("tenant/name").
        #[arg(long)]
        key: Option<String>,
        /// Only this caller identity.
        #[arg(long)]
        caller: Option<String>,
        /// Only this outcome (OK, PERMISSION_DENIED, ...).
        #[arg(long)]
        outcome: Option<String>,
        /// Only records at or after (ms since the epoch).
        #[arg(long, default_value_t = 0)]
        since_ms: i64,
        /// Only records before (ms since the epoch).
        #[arg(long, default_value_t = 0)]
        until_ms: i64,
        /// At most this many records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[command(flatten)]
        conn: ConnArgs,
    },
}

#[derive(Subcommand, Debug)]
enum KeyCommand {
    /// Create a key (generated inside the HSM).
    Create {
        /// "tenant/name".
        name: String,
        /// aes-256, rsa-2048, rsa-3072, rsa-4096, ec-p256 or ec-p384 (EC keys sign and verify).
        #[arg(long = "type", default_value = "aes-256")]
        key_type: String,
        /// aes-256-gcm, aes-kwp (RFC 5649), aes-kw (RFC 3394), rsa-oaep-sha256, rsa-oaep-sha1,
        /// rsa-sign (an RSA signing key) or ecdsa (default: by type).
        #[arg(long)]
        algorithm: Option<String>,
        /// Create an external key by reference instead: the `[[external_proxy]]` name (of the
        /// broker's configuration) its versions live behind. Needs --remote-key; the remote
        /// key's metadata decides type and algorithm.
        #[arg(long, requires = "remote_key", conflicts_with_all = ["key_type", "algorithm"])]
        external: Option<String>,
        /// The key's name at the external proxy (with --external).
        #[arg(long, requires = "external")]
        remote_key: Option<String>,
        /// Create a double key instead (double key encryption): its local member, an
        /// AES-256-GCM key of this broker ("tenant/name"). Needs --double-external.
        #[arg(long, requires = "double_external", conflicts_with_all = ["key_type", "algorithm", "external"])]
        double_local: Option<String>,
        /// The double key's external member, an external key ("tenant/name").
        #[arg(long, requires = "double_local")]
        double_external: Option<String>,
        /// Allowed operations, comma-separated, as for `key update` (default: wrap, unwrap,
        /// generate-data-key and rewrap; sign and verify for signing keys). Give
        /// encrypt,decrypt for a key that encrypts payloads.
        #[arg(long, conflicts_with_all = ["external", "double_local"])]
        operations: Option<String>,
        /// Tags: --tag team=payments --tag env=prod.
        #[arg(long = "tag")]
        tags: Vec<String>,
    },
    /// Show a key.
    Get {
        /// "tenant/name".
        name: String,
    },
    /// List a tenant's keys.
    List {
        /// The tenant.
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Add a new version.
    Rotate {
        /// "tenant/name".
        name: String,
    },
    /// Change attributes (only the options given).
    Update {
        /// "tenant/name".
        name: String,
        /// Enable the key.
        #[arg(long, conflicts_with = "disable")]
        enable: bool,
        /// Disable the key (every operation refused).
        #[arg(long)]
        disable: bool,
        /// Allowed operations, comma-separated: wrap,unwrap,generate-data-key,rewrap,encrypt,decrypt
        /// (wrapping keys) or sign,verify (signing keys).
        #[arg(long)]
        operations: Option<String>,
        /// Replace the tags: --tag team=payments --tag env=prod (give --tag "" to clear).
        #[arg(long = "tag")]
        tags: Vec<String>,
        /// Versions below this refuse to unwrap.
        #[arg(long)]
        min_decryption_version: Option<u32>,
        /// Turn purge protection on (it can never be turned off).
        #[arg(long)]
        purge_protection: bool,
        /// Set the time fields (all four together; unset ones are cleared).
        #[arg(long)]
        set_times: bool,
        /// Not valid before (ms since the epoch), with --set-times.
        #[arg(long, default_value_t = 0)]
        not_before_ms: i64,
        /// Expires at (ms since the epoch), with --set-times.
        #[arg(long, default_value_t = 0)]
        expires_ms: i64,
        /// Rotate automatically every N ms, with --set-times.
        #[arg(long, default_value_t = 0)]
        rotation_period_ms: i64,
        /// Rotated versions expire N ms after creation, with --set-times.
        #[arg(long, default_value_t = 0)]
        version_expiry_ms: i64,
    },
    /// Re-wrap a file of envelopes under the newest versions (after a rotation, before
    /// raising the minimum decryption version and trimming). Reads one base64 envelope per
    /// line, optionally followed by a tab and its AAD (UTF-8); writes one new envelope per line,
    /// in the same order (an empty line where an item failed). The DEKs never leave the broker.
    /// Progress goes to stderr when it is a terminal; a summary to stdout. Exits 1 if any item
    /// failed.
    RewrapAll {
        /// The file of envelopes (`-` for stdin).
        #[arg(long)]
        input: PathBuf,
        /// Where the new envelopes go (`-` for stdout; then the summary goes to stderr).
        #[arg(long)]
        output_file: PathBuf,
        /// Wrap under this key instead of each envelope's own.
        #[arg(long)]
        to: Option<String>,
        /// Requests in flight at once (1-256).
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Show progress on stderr: auto (when stderr is a terminal), always or never.
        #[arg(long, value_enum, default_value_t = Progress::Auto)]
        progress: Progress,
    },
    /// List versions with usage (wraps, unwraps, last use).
    Versions {
        /// "tenant/name".
        name: String,
    },
    /// Destroy every version below the minimum decryption version (irreversible).
    Trim {
        /// "tenant/name".
        name: String,
    },
    /// Soft-delete a key (recoverable until purged).
    Delete {
        /// "tenant/name".
        name: String,
    },
    /// List soft-deleted keys.
    Deleted {
        /// The tenant.
        #[arg(long, default_value = "default")]
        tenant: String,
    },
    /// Bring a soft-deleted key back.
    Recover {
        /// "tenant/name".
        name: String,
    },
    /// Destroy a soft-deleted key's material: every DEK under it becomes unreadable, forever.
    Purge {
        /// "tenant/name".
        name: String,
    },
    /// Back a key up (every version, wrapped under the HSM's security domain) into a file.
    Backup {
        /// "tenant/name".
        name: String,
        /// Where to write the blob.
        #[arg(long)]
        out: PathBuf,
    },
    /// Restore a key from a backup file (same name, every version; the name must be free).
    Restore {
        /// A file written by `key backup`.
        file: PathBuf,
    },
    /// BYOK step 1: create an RSA import key; prints its id and public key (PEM).
    ImportKey {
        /// rsa-3072 or rsa-4096.
        #[arg(long = "type", default_value = "rsa-3072")]
        key_type: String,
        /// Write the public key PEM to this file.
        #[arg(long)]
        pem_out: Option<PathBuf>,
        /// The algorithm of the key it will import: aes-256-gcm (default), aes-kwp or aes-kw.
        #[arg(long)]
        algorithm: Option<String>,
    },
    /// BYOK step 2: import AES-256 key material wrapped for an import key (see docs/src/lifecycle.md, "BYOK").
    Import {
        /// "tenant/name".
        name: String,
        /// The import key id from `key import-key`.
        #[arg(long)]
        import_key_id: String,
        /// The wrapped material: the 32-byte AES key encrypted with RSA-OAEP under the import
        /// key (`openssl pkeyutl -encrypt`, docs/src/lifecycle.md).
        #[arg(long)]
        wrapped_file: PathBuf,
        /// aes-256-gcm, aes-kwp or aes-kw (default: the import key's).
        #[arg(long)]
        algorithm: Option<String>,
    },
}

/// How a client command reaches the broker.
#[derive(Args, Debug, Clone)]
pub struct ConnArgs {
    /// The broker.
    #[arg(
        long,
        env = "KEYBROKER_ENDPOINT",
        default_value = "https://127.0.0.1:8443",
        global = true
    )]
    endpoint: String,
    /// CA certificate that issued the broker's certificate (PEM).
    #[arg(long, env = "KEYBROKER_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    /// Client certificate (PEM).
    #[arg(long, env = "KEYBROKER_CLIENT_CERT", global = true)]
    client_cert: Option<PathBuf>,
    /// Client private key (PEM).
    #[arg(long, env = "KEYBROKER_CLIENT_KEY", global = true)]
    client_key: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t = Output::Text, global = true)]
    output: Output,
    /// Access justification reason for data-plane calls (e.g. CUSTOMER_INITIATED_ACCESS).
    #[arg(long, env = "KEYBROKER_JUSTIFICATION", global = true)]
    justification: Option<String>,
    /// Free text for the justification (ticket number...).
    #[arg(long, global = true)]
    justification_detail: Option<String>,
    /// Request id recorded in the audit trail.
    #[arg(long, global = true)]
    request_id: Option<String>,
    /// Correlation id recorded in the audit trail.
    #[arg(long, global = true)]
    correlation_id: Option<String>,
}

/// When to show a progress line.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Progress {
    /// When stderr is a terminal.
    Auto,
    /// Always (e.g. to a log).
    Always,
    /// Never.
    Never,
}

/// Output format of client commands.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq, Eq)]
pub enum Output {
    /// For people.
    Text,
    /// One JSON document.
    Json,
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::{EnvFilter, fmt};
    // cryptoki's own lines come through crate::log_bridge at the broker's levels (a mechanism
    // number it has no name for is DEBUG, not ERROR).
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,h2=warn,tower=warn,hyper=warn"));
    use std::io::IsTerminal;
    let builder = fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Json => tracing::subscriber::set_global_default(builder.json().finish()),
        LogFormat::Text => tracing::subscriber::set_global_default(builder.finish()),
    };
    if installed.is_ok() {
        let _ = crate::log_bridge::install(tracing::level_filters::LevelFilter::current());
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // `keybroker key list | head`: a closed stdout is not a crash.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") && msg.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
    let cli = Cli::parse();
    let result = runtime().and_then(|rt| rt.block_on(run(cli)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keybroker: error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<(), String> {
    // First, for every command: those that read a PIN or the audit trail and those that hold
    // DEKs alike (crate::secrets). Logging is not set up yet, so a failure goes to stderr.
    if let Err(e) = crate::secrets::disable_core_dumps() {
        eprintln!("keybroker: warning: {e}");
    }
    match cli.command {
        Command::Serve { config, listen } => {
            let mut cfg = Config::load(&config)?;
            if let Some(l) = listen {
                cfg.server.listen = l;
            }
            init_logging(cfg.log.format);
            Ok(crate::server::run(cfg, crate::server::shutdown_signal()).await?)
        }
        Command::CheckConfig { config, output } => {
            let cfg = Config::load(&config)?;
            init_logging(cfg.log.format);
            commands::check_config(&cfg, output).await
        }
        Command::Audit {
            command: AuditCommand::Verify { file, config },
        } => {
            let cfg = match config {
                Some(c) => {
                    let cfg = Config::load(&c)?;
                    init_logging(cfg.log.format);
                    Some(cfg)
                }
                None => None,
            };
            commands::audit_verify(&file, cfg.as_ref()).await
        }
        Command::Domain { command } => {
            let config = match &command {
                DomainCommand::Init { config, .. } | DomainCommand::Show { config } => config,
            };
            let cfg = Config::load(config)?;
            init_logging(cfg.log.format);
            let so_pin_file = match command {
                DomainCommand::Init { so_pin_file, .. } => Some(so_pin_file),
                DomainCommand::Show { .. } => None,
            };
            commands::domain(&cfg, so_pin_file).await
        }
        #[cfg(feature = "dev")]
        Command::Dev { state_dir, listen } => {
            init_logging(LogFormat::Text);
            dev::run(&state_dir, listen).await
        }
        other => commands::client_command(other).await,
    }
}
