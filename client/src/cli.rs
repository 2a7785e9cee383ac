//! The `kv-client` command line: flags, subcommands, and running one command.
//!
//! Exit codes (also in `kv-client --help`):
//! - 0: success
//! - 1: not found (`get` or `delete` of a missing key)
//! - 2: usage error (bad flags or arguments)
//! - 3: a write's condition failed
//! - 4: any other error (server error code, connection failure, deadline)

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde_json::Value;

use crate::output;
use crate::{ApiError, Client, Condition, ErrorCode, KeyLease, ScanBounds, ScanOptions};

pub const EXIT_OK: u8 = 0;
pub const EXIT_NOT_FOUND: u8 = 1;
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_CONDITION_FAILED: u8 = 3;
pub const EXIT_ERROR: u8 = 4;

const EXIT_CODES_HELP: &str =
    "Exit codes: 0 ok, 1 not found, 2 usage error, 3 condition failed, 4 other error.\n\
With no command on a terminal, opens an interactive shell; with stdin not a terminal, \
runs one command per line from stdin.\n\
--json prints one JSON object per result; bytes that are not UTF-8 appear base64-encoded \
under key_base64 / value_base64.";

/// Command-line client for capkv.
#[derive(Parser, Debug)]
#[command(name = "kv-client", version, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Server address; several gateways of one service comma-separated (`a:7070,b:7070`):
    /// the first that answers serves, the next ones take over when it is lost.
    #[arg(long, env = "CAPKV_ADDR", default_value = "127.0.0.1:7070")]
    pub addr: String,
    /// Bearer token for servers that require one.
    #[arg(
        long,
        env = "CAPKV_TOKEN",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub token: String,
    /// Deadline of each call, e.g. `500ms`, `5s`.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Print one JSON object per result.
    #[arg(long)]
    pub json: bool,
    /// Attempts per call, first included (1 = no retries; at most 5). Only `unavailable`,
    /// `overloaded` and calls never sent are retried; a write whose outcome is unknown only
    /// with an idempotency key (the default).
    #[arg(long, value_name = "N", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=5))]
    pub attempts: u32,
    /// First retry backoff; each next one doubles, with jitter.
    #[arg(long, value_name = "D", default_value = "10ms", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// Longest retry backoff.
    #[arg(long, value_name = "D", default_value = "1s", value_parser = humantime::parse_duration)]
    pub retry_max_backoff: Duration,
    /// Send writes without an idempotency key (then a write whose outcome is unknown is
    /// not retried).
    #[arg(long)]
    pub no_idempotency: bool,
    /// Idempotency key for the write (32 hex digits), e.g. to replay a write and read its
    /// recorded outcome; default: a random one per write, shown by --json.
    #[arg(long, value_name = "HEX", conflicts_with = "no_idempotency", value_parser = parse_idempotency_key)]
    pub idempotency_key: Option<[u8; 16]>,
    /// Continue the write session this token (hex, from a write's --json output) names:
    /// with --idempotency-key, replays a write made by an earlier kv-client.
    #[arg(long, value_name = "HEX", value_parser = parse_hex)]
    pub session: Option<HexBytes>,
    /// Export a span per call and per attempt to this OTLP/gRPC collector, e.g.
    /// `http://127.0.0.1:4317` (also from the standard OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
    /// Mutual TLS: the CA the server's certificate must come from (PEM); with --tls-cert
    /// and --tls-key. `scripts/dev-ca.sh` makes a development set.
    #[arg(long, env = "CAPKV_TLS_CA", value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's certificate chain (PEM).
    #[arg(long, env = "CAPKV_TLS_CERT", value_name = "FILE", requires = "tls_ca")]
    pub tls_cert: Option<std::path::PathBuf>,
    /// Mutual TLS: this client's private key (PEM).
    #[arg(long, env = "CAPKV_TLS_KEY", value_name = "FILE", requires = "tls_ca")]
    pub tls_key: Option<std::path::PathBuf>,
    /// The name the server's certificate must carry [default: the host of --addr].
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Bytes given in hex on the command line (a newtype: clap reads a bare `Vec<u8>` as a
/// list of numbers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HexBytes(pub Vec<u8>);

fn parse_hex(s: &str) -> Result<HexBytes, String> {
    output::from_hex(s)
        .map(HexBytes)
        .ok_or_else(|| "expected hex digits".to_string())
}

fn parse_idempotency_key(s: &str) -> Result<[u8; 16], String> {
    output::from_hex(s)
        .and_then(|b| <[u8; 16]>::try_from(b).ok())
        .ok_or_else(|| "expected 32 hex digits".to_string())
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Print the value of KEY.
    Get { key: OsString },
    /// Store VALUE under KEY (VALUE from --file, or from stdin when omitted).
    Put {
        key: OsString,
        value: Option<OsString>,
        /// Read the value from this file.
        #[arg(long, conflicts_with = "value")]
        file: Option<PathBuf>,
        /// Only if the key's current version is N (0 = absent).
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
        /// Only if the key does not exist.
        #[arg(long, conflicts_with = "if_version")]
        if_absent: bool,
        /// The key lives by lease ID (hex, from `lease grant`): deleted when it ends.
        #[arg(long, value_name = "ID", value_parser = parse_lease_id)]
        lease: Option<u64>,
        /// The key lives for this long (e.g. 30s) unless put again: a lease of its own.
        #[arg(long, value_name = "D", conflicts_with = "lease", value_parser = humantime::parse_duration)]
        ttl: Option<std::time::Duration>,
    },
    /// Delete KEY.
    Delete {
        key: OsString,
        /// Only if the key's current version is N.
        #[arg(long, value_name = "N")]
        if_version: Option<u64>,
    },
    /// List keys in order, by prefix or range.
    Scan {
        #[command(flatten)]
        range: RangeArgs,
        /// Page size (0 = the server's default).
        #[arg(long, value_name = "N", default_value_t = 0)]
        limit: u32,
        /// Resume from a previous page's cursor (hex).
        #[arg(long, value_name = "HEX")]
        cursor: Option<String>,
        /// Print keys only.
        #[arg(long)]
        keys_only: bool,
    },
    /// Print every change to keys by prefix or range, one line (or JSON object) per
    /// event, as they happen, until interrupted (or COUNT events). Across reconnects it
    /// goes on where it stopped, with no event twice or missed.
    Watch {
        #[command(flatten)]
        range: RangeArgs,
        /// First revision to show (0 = from the next write).
        #[arg(long, value_name = "N", default_value_t = 0)]
        from: u64,
        /// Stop after this many events.
        #[arg(long, value_name = "COUNT")]
        count: Option<u64>,
    },
    /// Leases: keys put with one (`put --lease ID`) are deleted when it expires or is
    /// revoked.
    Lease {
        #[command(subcommand)]
        action: LeaseAction,
    },
    /// Add DELTA (default 1) to the integer under KEY, like Redis INCRBY.
    Incr {
        key: OsString,
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        delta: i64,
    },
    /// Liveness and readiness of the server.
    Health,
    /// Server and API version.
    Version,
    /// Operator actions (need the server's admin token).
    Admin {
        /// The server's admin token.
        #[arg(
            long,
            env = "CAPKV_ADMIN_TOKEN",
            default_value = "",
            hide_env_values = true,
            hide_default_value = true
        )]
        admin_token: String,
        #[command(subcommand)]
        action: AdminAction,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum AdminAction {
    /// Inject faults: `set PLAN`, `show`, `clear`.
    Faults {
        #[command(subcommand)]
        action: FaultsAction,
    },
    /// Compact the server's storage now.
    Compact,
    /// Make the server read its configuration again (as SIGHUP does); prints what changed.
    Reload,
    /// Write a checkpoint (backup) of the server's store into DIR, a path on the server's
    /// machine that must not exist yet; start a server on DIR to restore it.
    Checkpoint { dir: String },
}

/// The keys a `scan` or `watch` covers: a prefix, or a range.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq)]
pub struct RangeArgs {
    /// Keys starting with P.
    #[arg(long, value_name = "P", conflicts_with_all = ["start", "end"])]
    prefix: Option<OsString>,
    /// First key (inclusive).
    #[arg(long, value_name = "K")]
    start: Option<OsString>,
    /// End key (exclusive).
    #[arg(long, value_name = "K")]
    end: Option<OsString>,
}

impl RangeArgs {
    fn bounds(&self) -> ScanBounds {
        match &self.prefix {
            Some(pfx) => ScanBounds::Prefix(bytes(pfx)),
            None => ScanBounds::Range {
                start: self.start.as_ref().map(bytes).unwrap_or_default(),
                end: self.end.as_ref().map(bytes).unwrap_or_default(),
            },
        }
    }
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum LeaseAction {
    /// Grant a lease of TTL (e.g. 10s); prints its id.
    Grant {
        #[arg(value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
    },
    /// Keep lease ID alive, renewing it every third of its TTL until interrupted (or once).
    Keepalive {
        #[arg(value_parser = parse_lease_id)]
        id: u64,
        /// Renew once and exit.
        #[arg(long)]
        once: bool,
    },
    /// Revoke lease ID now: its keys are deleted.
    Revoke {
        #[arg(value_parser = parse_lease_id)]
        id: u64,
    },
    /// Time left on lease ID, and its keys.
    Ttl {
        #[arg(value_parser = parse_lease_id)]
        id: u64,
    },
}

fn parse_lease_id(s: &str) -> Result<u64, String> {
    u64::from_str_radix(s.trim_start_matches("0x"), 16)
        .ok()
        .filter(|&id| id != 0)
        .ok_or_else(|| "expected a lease id in hex (from `lease grant`)".to_string())
}

#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum FaultsAction {
    /// Arm PLAN, e.g. 'seed=7; get fail=unavailable p=0.3; * latency=300ms for=1m'.
    /// Rules: METHOD ACTION [p=P] [for=D] [times=N]; ACTION: fail=CODE, latency=D[+-J], stall,
    /// drop-reply, close.
    Set { plan: String },
    /// Print the armed plan.
    Show,
    /// Disarm every rule.
    Clear,
}

/// Names of the commands, for the shell's completion and help.
pub const COMMAND_NAMES: [&str; 10] = [
    "get", "put", "delete", "scan", "watch", "incr", "lease", "health", "version", "admin",
];

fn bytes(s: &OsString) -> Vec<u8> {
    s.clone().into_vec()
}

/// Where a command writes: collects stdout text and stderr text so the shell, the line
/// mode and tests can all use the same code.
pub struct Printer<'a> {
    pub json: bool,
    pub out: &'a mut dyn Write,
    pub err: &'a mut dyn Write,
}

impl Printer<'_> {
    fn value(&mut self, v: Value) {
        let _ = writeln!(self.out, "{v}");
    }
    fn text(&mut self, s: &str) {
        let _ = write!(self.out, "{s}");
        if !s.ends_with('\n') {
            let _ = writeln!(self.out);
        }
    }
    pub(crate) fn error(&mut self, e: &ApiError) -> u8 {
        if self.json {
            self.value(output::error_json(e));
        } else {
            let _ = writeln!(self.err, "error: {e}");
        }
        match e.code {
            ErrorCode::NotFound => EXIT_NOT_FOUND,
            ErrorCode::ConditionFailed => EXIT_CONDITION_FAILED,
            ErrorCode::InvalidArgument if e.message.starts_with("usage:") => EXIT_USAGE,
            _ => EXIT_ERROR,
        }
    }
}

/// Upper bound on a value read from a file or stdin: the default server limit plus one
/// byte, so an oversized value still reaches the server and gets its precise error.
const MAX_INPUT_VALUE_BYTES: u64 = 64 * 1024 * 1024;

fn read_value(
    value: &Option<OsString>,
    file: &Option<PathBuf>,
    stdin_ok: bool,
) -> Result<Vec<u8>, ApiError> {
    let usage = |m: String| ApiError::new(ErrorCode::InvalidArgument, format!("usage: {m}"));
    if let Some(v) = value {
        if v != "-" {
            return Ok(bytes(v));
        }
    }
    let mut buf = Vec::new();
    let read = match file {
        Some(path) => std::fs::File::open(path)
            .and_then(|f| f.take(MAX_INPUT_VALUE_BYTES).read_to_end(&mut buf))
            .map_err(|e| usage(format!("cannot read {}: {e}", path.display()))),
        None if stdin_ok => std::io::stdin()
            .lock()
            .take(MAX_INPUT_VALUE_BYTES)
            .read_to_end(&mut buf)
            .map_err(|e| usage(format!("cannot read stdin: {e}"))),
        None => Err(usage("put needs a VALUE here (or --file)".into())),
    };
    read.map(|_| buf)
}

/// `lease ...`: grant, keep alive, revoke, or show a lease.
async fn lease(client: &Client, action: &LeaseAction, p: &mut Printer<'_>) -> u8 {
    let status = |p: &mut Printer<'_>, s: &crate::LeaseStatus, verb: &str| {
        if p.json {
            p.value(serde_json::json!({
                "id": format!("{:x}", s.id), "ttl_ms": s.ttl_ms,
                "remaining_ms": s.remaining_ms, "keys": s.keys,
            }));
        } else {
            p.text(&format!(
                "lease {:x} {verb}: {} ms left of {} ms, {} keys",
                s.id, s.remaining_ms, s.ttl_ms, s.keys
            ));
        }
    };
    match action {
        LeaseAction::Grant { ttl } => {
            let (client, idem) = client.for_one_write();
            match client.grant_lease(*ttl).await {
                Ok(g) if p.json => {
                    let v = serde_json::json!({"id": format!("{:x}", g.id), "ttl_ms": g.ttl_ms});
                    p.value(with_key(&client, v, idem).await);
                    EXIT_OK
                }
                Ok(g) => {
                    p.text(&format!("{:x}", g.id));
                    EXIT_OK
                }
                Err(e) => p.error(&e),
            }
        }
        LeaseAction::Ttl { id } => match client.lease_time_to_live(*id).await {
            Ok(s) => {
                status(p, &s, "alive");
                EXIT_OK
            }
            Err(e) => p.error(&e),
        },
        LeaseAction::Revoke { id } => {
            let (client, idem) = client.for_one_write();
            match client.revoke_lease(*id).await {
                Ok(o) if p.json => {
                    let v = serde_json::json!({"deleted": o.deleted, "revision": o.revision});
                    p.value(with_key(&client, v, idem).await);
                    EXIT_OK
                }
                Ok(o) => {
                    p.text(&format!(
                        "revoked: {} keys deleted, revision={}",
                        o.deleted, o.revision
                    ));
                    EXIT_OK
                }
                Err(e) => p.error(&e),
            }
        }
        LeaseAction::Keepalive { id, once } => loop {
            let s = match client.keep_alive(*id).await {
                Ok(s) => s,
                Err(e) => return p.error(&e),
            };
            status(p, &s, "kept alive");
            let _ = p.out.flush();
            if *once {
                return EXIT_OK;
            }
            // A third of the TTL, as etcd's client does; at least 10 ms.
            let every = std::time::Duration::from_millis((s.ttl_ms / 3).max(10));
            tokio::select! {
                () = tokio::time::sleep(every) => {}
                _ = tokio::signal::ctrl_c() => return EXIT_OK,
            }
        },
    }
}

/// How long one watch page waits for a change before asking again.
const WATCH_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// `watch`: pages of events, printed as they come, until interrupted or `count` events.
async fn watch(
    client: &Client,
    bounds: ScanBounds,
    from: u64,
    count: Option<u64>,
    p: &mut Printer<'_>,
) -> u8 {
    let mut w = client.watch(bounds, from);
    let mut left = count.unwrap_or(u64::MAX);
    while left > 0 {
        let page = tokio::select! {
            page = w.next(WATCH_WAIT) => page,
            _ = tokio::signal::ctrl_c() => return EXIT_OK,
        };
        let page = match page {
            Ok(page) => page,
            Err(e) => return p.error(&e),
        };
        for e in page
            .events
            .iter()
            .take(usize::try_from(left).unwrap_or(usize::MAX))
        {
            if p.json {
                p.value(output::event_json(e));
            } else {
                p.text(&output::event_human(e));
            }
            left -= 1;
        }
        let _ = p.out.flush();
    }
    EXIT_OK
}

/// Runs one command and prints its result; returns the exit code. `stdin_ok` says
/// whether `put` may read its value from stdin (not when stdin carries commands).
pub async fn execute(client: &Client, cmd: &Command, p: &mut Printer<'_>, stdin_ok: bool) -> u8 {
    match cmd {
        Command::Get { key } => match client.get(&bytes(key)).await {
            Ok(Some(e)) => {
                if p.json {
                    p.value(output::entry_json(&e, true));
                } else {
                    p.text(&output::human_bytes(&e.value));
                }
                EXIT_OK
            }
            Ok(None) => p.error(&ApiError::new(ErrorCode::NotFound, "key not found")),
            Err(e) => p.error(&e),
        },
        Command::Put {
            key,
            value,
            file,
            if_version,
            if_absent,
            lease,
            ttl,
        } => {
            let value = match read_value(value, file, stdin_ok) {
                Ok(v) => v,
                Err(e) => return p.error(&e),
            };
            let cond = match (if_version, if_absent) {
                (Some(v), _) => Condition::IfVersion(*v),
                (None, true) => Condition::IfAbsent,
                (None, false) => Condition::None,
            };
            let lease = match (lease, ttl) {
                (Some(id), _) => KeyLease::Lease(*id),
                (None, Some(ttl)) => KeyLease::Ttl(*ttl),
                (None, None) => KeyLease::None,
            };
            let (client, idem) = client.for_one_write();
            match client
                .put_with_lease(&bytes(key), &value, cond, lease)
                .await
            {
                Ok(o) if p.json => {
                    p.value(with_key(&client, output::put_json(&o), idem).await);
                    EXIT_OK
                }
                Ok(o) if o.lease != 0 => {
                    p.text(&format!(
                        "OK version={} revision={} lease={:x}",
                        o.version, o.revision, o.lease
                    ));
                    EXIT_OK
                }
                Ok(o) => {
                    p.text(&format!("OK version={} revision={}", o.version, o.revision));
                    EXIT_OK
                }
                Err(e) => p.error(&e),
            }
        }
        Command::Delete { key, if_version } => {
            let cond = if_version.map_or(Condition::None, Condition::IfVersion);
            let (client, idem) = client.for_one_write();
            match client.delete_if(&bytes(key), cond).await {
                Ok(o) => {
                    if p.json {
                        p.value(with_key(&client, output::delete_json(&o), idem).await);
                    } else if o.existed {
                        p.text(&format!("deleted revision={}", o.revision));
                    } else {
                        let _ = writeln!(p.err, "not found");
                    }
                    if o.existed {
                        EXIT_OK
                    } else {
                        EXIT_NOT_FOUND
                    }
                }
                Err(e) => p.error(&e),
            }
        }
        Command::Scan {
            range,
            limit,
            cursor,
            keys_only,
        } => {
            let cursor = match cursor.as_deref().map(output::from_hex) {
                None => Vec::new(),
                Some(Some(c)) => c,
                Some(None) => {
                    return p.error(&ApiError::new(
                        ErrorCode::InvalidArgument,
                        "usage: --cursor must be hex",
                    ))
                }
            };
            let opts = ScanOptions {
                bounds: range.bounds(),
                limit: *limit,
                cursor,
                keys_only: *keys_only,
            };
            match client.scan(opts).await {
                Ok(page) => {
                    if p.json {
                        p.value(output::scan_json(&page, !keys_only));
                    } else {
                        let _ = write!(p.out, "{}", output::scan_human(&page, !keys_only));
                    }
                    EXIT_OK
                }
                Err(e) => p.error(&e),
            }
        }
        Command::Watch { range, from, count } => {
            watch(client, range.bounds(), *from, *count, p).await
        }
        Command::Lease { action } => lease(client, action, p).await,
        Command::Incr { key, delta } => {
            let (client, idem) = client.for_one_write();
            match client.increment(&bytes(key), *delta).await {
                Ok(o) if p.json => {
                    let v = serde_json::json!({"value": o.value, "version": o.version, "revision": o.revision});
                    p.value(with_key(&client, v, idem).await);
                    EXIT_OK
                }
                Ok(o) => {
                    p.text(&o.value.to_string());
                    EXIT_OK
                }
                Err(e) => p.error(&e),
            }
        }
        Command::Health => match client.health().await {
            Ok(h) if p.json => {
                p.value(output::health_json(&h));
                EXIT_OK
            }
            Ok(h) => {
                p.text(&format!(
                    "live={} ready={} status={}",
                    h.live, h.ready, h.status
                ));
                EXIT_OK
            }
            Err(e) => p.error(&e),
        },
        Command::Version => match client.version().await {
            Ok(v) if p.json => {
                p.value(output::version_json(&v));
                EXIT_OK
            }
            Ok(v) => {
                p.text(&format!("capkv {} (api {})", v.service, v.api_version));
                EXIT_OK
            }
            Err(e) => p.error(&e),
        },
        Command::Admin {
            admin_token,
            action,
        } => {
            let faults = match action {
                AdminAction::Checkpoint { dir } => {
                    return match client.checkpoint(admin_token, dir).await {
                        Ok(()) if p.json => {
                            p.value(serde_json::json!({"checkpoint": dir}));
                            EXIT_OK
                        }
                        Ok(()) => {
                            p.text(&format!("OK checkpoint written to {dir}"));
                            EXIT_OK
                        }
                        Err(e) => p.error(&e),
                    };
                }
                AdminAction::Reload => {
                    return match client.reload_config(admin_token).await {
                        Ok(changes) if p.json => {
                            p.value(serde_json::json!({"reloaded": true, "changes": changes}));
                            EXIT_OK
                        }
                        Ok(changes) => {
                            p.text(&format!("OK reloaded: {changes}"));
                            EXIT_OK
                        }
                        Err(e) => p.error(&e),
                    };
                }
                AdminAction::Compact => {
                    return match client.compact(admin_token).await {
                        Ok(()) if p.json => {
                            p.value(serde_json::json!({"compacted": true}));
                            EXIT_OK
                        }
                        Ok(()) => {
                            p.text("OK compacted");
                            EXIT_OK
                        }
                        Err(e) => p.error(&e),
                    };
                }
                AdminAction::Faults { action } => match action {
                    FaultsAction::Set { plan } => client.set_faults(admin_token, plan).await,
                    FaultsAction::Show => client.show_faults(admin_token).await,
                    FaultsAction::Clear => client.clear_faults(admin_token).await,
                },
            };
            match faults {
                Ok(f) if p.json => {
                    p.value(serde_json::json!({"plan": f.plan, "rules": f.rules}));
                    EXIT_OK
                }
                Ok(f) => {
                    p.text(&format!("{} rules armed: {}", f.rules, f.plan));
                    EXIT_OK
                }
                Err(e) => p.error(&e),
            }
        }
    }
}

/// Adds the write's idempotency key and session token (hex) to its JSON result: with
/// `--session` and `--idempotency-key` they replay the write.
async fn with_key(client: &Client, mut v: Value, key: Option<[u8; 16]>) -> Value {
    let Some(k) = key else { return v };
    let session = client.session_token().await.ok().flatten();
    if let Some(obj) = v.as_object_mut() {
        obj.insert("idempotency_key".into(), Value::String(output::hex(&k)));
        if let Some(t) = session {
            obj.insert("session".into(), Value::String(output::hex(&t)));
        }
    }
    v
}
