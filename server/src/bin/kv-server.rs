//! `kv-server`: parses flags, loads the config, and runs the server until a signal.
use std::path::PathBuf;
use std::process::ExitCode;

use capkv_server::config::{Config, Engine, FlagOverrides, LogFormat};
use clap::Parser;

// capnp-rpc makes several small heap objects per call (promises, question and answer
// entries, message segments): malloc and free were 8% of kv-server's profile, and
// mimalloc gave 10-18% more calls/s at 50 connections in back-to-back runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// capkv: a key-value service spoken over Cap'n Proto RPC.
///
/// Configuration precedence: flags > CAPKV_* environment > --config file > defaults.
/// Nested keys in the environment use `__`, e.g. CAPKV_LIMITS__MAX_KEY_BYTES=512 or
/// CAPKV_AUTH__TOKEN=secret.
#[derive(Parser, Debug)]
#[command(name = "kv-server", version)]
struct Args {
    /// TOML config file.
    #[arg(long, env = "CAPKV_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of the RPC listener [default: 127.0.0.1:7070].
    #[arg(long, value_name = "ADDR")]
    listen: Option<std::net::SocketAddr>,
    /// Storage engine [default: rocksdb].
    #[arg(long, value_enum)]
    engine: Option<Engine>,
    /// Data directory of persistent engines [default: ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the Prometheus /metrics listener [default: none].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
    /// Worker threads; 0 = one per core [default: 0].
    #[arg(long)]
    workers: Option<usize>,
    /// Log filter, e.g. `info` or `capkv::request=debug,info` [default: info].
    #[arg(long, value_name = "FILTER")]
    log_level: Option<String>,
    /// Log format [default: auto: JSON lines, text on a terminal].
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
    /// Mutual TLS: this server's certificate chain (PEM); with --tls-key and
    /// --tls-client-ca. `scripts/dev-ca.sh` makes a development set.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// Mutual TLS: this server's private key (PEM).
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Mutual TLS: the CA whose certificates clients must present (PEM).
    #[arg(long, value_name = "FILE")]
    tls_client_ca: Option<PathBuf>,
    /// With --engine etcd: the cluster's client URLs, comma-separated
    /// (`storage.etcd.endpoints`).
    #[arg(long, value_name = "URLS", value_delimiter = ',')]
    etcd_endpoints: Option<Vec<String>>,
    /// Development only: allow the Admin capability without an admin token.
    #[arg(long)]
    dev_admin: bool,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    print_config: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let flags = FlagOverrides {
        listen: args.listen,
        metrics_listen: args.metrics_listen,
        engine: args.engine,
        data_dir: args.data_dir,
        workers: args.workers,
        log_level: args.log_level,
        log_format: args.log_format,
        dev_admin: args.dev_admin.then_some(true),
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_client_ca: args.tls_client_ca,
        etcd_endpoints: args.etcd_endpoints,
    };
    let config = match Config::load(args.config.as_deref(), &flags) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kv-server: {e}");
            return ExitCode::from(2);
        }
    };
    if args.print_config {
        print!("{}", config.to_redacted_toml());
        return ExitCode::SUCCESS;
    }
    let telemetry = match capkv_server::logging::init(&config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("kv-server: {e}");
            return ExitCode::from(2);
        }
    };
    let source = (args.config.clone(), flags);
    let code = match run(config, source) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "kv-server failed");
            eprintln!("kv-server: {e:#}");
            ExitCode::FAILURE
        }
    };
    // The last spans (the drain) are flushed after the store is closed.
    telemetry.shutdown();
    code
}

fn run(config: Config, (file, flags): (Option<PathBuf>, FlagOverrides)) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Before anything listens: a SIGTERM sent once `listening` is logged must drain.
        let signals = capkv_server::signals::Shutdown::install();
        let server = capkv_server::Server::bind(config).await?;
        // Reloads read the same sources as the start: file, environment, flags.
        let shared = server.shared();
        shared.set_config_loader(Box::new(move || Config::load(file.as_deref(), &flags)));
        tokio::spawn(async move {
            if let Err(e) = capkv_server::signals::reload_on_sighup(shared).await {
                tracing::error!(error = %e, "cannot install the SIGHUP handler; reload only through Admin");
            }
        });
        let shutdown = async {
            match signals {
                Ok(signals) => signals.requested().await,
                Err(e) => tracing::error!(error = %e, "cannot install signal handlers; stopping"),
            }
        };
        server.run(shutdown).await?;
        Ok(())
    })
}
