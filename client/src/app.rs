//! The `kv-client` program: flags to a connection, then one command or the shell. Its
//! own module so that `cli` (commands and their output) and `shell` (which runs those
//! commands line by line) do not depend on each other.

use std::io::IsTerminal;

use crate::cli::{execute, Cli, Printer, EXIT_ERROR};
use crate::{shell, Client, ClientOptions};

/// The TLS options the flags ask for, if any.
fn cli_tls(cli: &Cli) -> Result<Option<crate::ClientTls>, capkv::ApiError> {
    let (Some(ca), Some(cert), Some(key)) = (&cli.tls_ca, &cli.tls_cert, &cli.tls_key) else {
        return Ok(None);
    };
    let files = capkv_rpc::tls::TlsFiles {
        ca: ca.clone(),
        cert: cert.clone(),
        key: key.clone(),
    };
    // Default name: the host part of host:port (IPv6 in brackets), of the first address
    // when several gateways are named (their certificates name one service).
    let first = crate::addresses(&cli.addr)[0];
    let host = first.rsplit_once(':').map_or(first, |(h, _)| h);
    let name = cli.tls_server_name.clone().unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_string()
    });
    crate::ClientTls::from_files(&files, &name)
        .map(Some)
        .map_err(|e| capkv::ApiError::new(capkv::ErrorCode::InvalidArgument, e.to_string()))
}

/// Entry point of the `kv-client` binary; returns the process exit code.
pub fn main_with(cli: Cli) -> u8 {
    // Logs stay off unless RUST_LOG asks: the CLI reports its own errors.
    let trace = capkv_telemetry::TraceConfig {
        otlp_endpoint: cli.otlp_endpoint.clone().unwrap_or_default(),
        ..capkv_telemetry::TraceConfig::default()
    };
    let telemetry = match capkv_telemetry::init(&capkv_telemetry::Settings {
        log_filter: "off",
        log_style: capkv_telemetry::LogStyle::Text,
        trace: &trace,
        default_service_name: "kv-client",
    }) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return EXIT_ERROR;
        }
    };
    let code = run_cli(cli);
    // Flush this run's spans before exiting.
    telemetry.shutdown();
    code
}

fn run_cli(cli: Cli) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return EXIT_ERROR;
        }
    };
    rt.block_on(async move {
        let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
        let mut printer = Printer {
            json: cli.json,
            out: &mut out,
            err: &mut err,
        };
        let options = ClientOptions {
            token: cli.token.clone(),
            timeout: cli.timeout,
            retry: crate::RetryPolicy {
                max_attempts: cli.attempts,
                initial_backoff: cli.retry_backoff,
                max_backoff: cli.retry_max_backoff.max(cli.retry_backoff),
                ..crate::RetryPolicy::default()
            },
            idempotent_writes: !cli.no_idempotency,
            resume_session: cli.session.as_ref().map(|h| h.0.clone()),
            tls: match cli_tls(&cli) {
                Ok(t) => t,
                Err(e) => return printer.error(&e),
            },
            ..ClientOptions::default()
        };
        // A caller's key names one write: in the shell, every write would share it (the
        // second of two equal writes replayed the first, silently not applied).
        if cli.idempotency_key.is_some() && cli.command.is_none() {
            return printer.error(&capkv::ApiError::new(
                capkv::ErrorCode::InvalidArgument,
                "usage: --idempotency-key names one write: give it with a command, not to the shell",
            ));
        }
        let client = match Client::connect(&cli.addr, options).await {
            Ok(c) => match cli.idempotency_key {
                Some(k) => c.with_idempotency_key(k),
                None => c,
            },
            Err(e) => return printer.error(&e),
        };
        match &cli.command {
            Some(cmd) => execute(&client, cmd, &mut printer, true).await,
            None if std::io::stdin().is_terminal() => shell::interactive(&client, cli.json).await,
            None => shell::lines(&client, cli.json, std::io::stdin().lock(), &mut printer).await,
        }
    })
}
