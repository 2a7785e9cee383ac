//! Helpers shared by the server's integration tests: an in-process server on port 0,
//! clients, and a raw capnp connection for tests that need to send what the client
//! library would not.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use capkv::kv_capnp::gateway;
use capkv_client::{Client, ClientOptions, ScanBounds, ScanOptions};
use capkv_server::{Config, RunningServer};
use capnp_rpc::{rpc_twoparty_capnp, RpcSystem};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A runtime of two worker threads, for tests that drive `Client`s from tasks of their
/// own.
pub fn two_threads() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

/// The repository's root (the server crate lives one level down).
pub fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the server crate lives in the repository")
        .to_path_buf()
}

/// A repository file as text, by its path from the root.
pub fn read_repo_file(rel: &str) -> String {
    std::fs::read_to_string(repo().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The tests' server config. `CAPKV_RPC_ENGINE` (`capnp-rpc` or `capkv`) and
/// `CAPKV_IO_LOOP` (`capkv` or `tokio`), which spawned kv-server processes read too, pick
/// the RPC engine and what runs connections, so the whole suite runs on either.
pub fn test_config() -> Config {
    let mut config = Config::local_ephemeral();
    match std::env::var("CAPKV_RPC_ENGINE").as_deref() {
        Ok("capkv") => config.rpc_engine = capkv_server::config::RpcEngine::Capkv,
        Ok("capnp-rpc") => config.rpc_engine = capkv_server::config::RpcEngine::CapnpRpc,
        Err(_) => {}
        Ok(other) => panic!("CAPKV_RPC_ENGINE={other}: capnp-rpc or capkv"),
    }
    match std::env::var("CAPKV_IO_LOOP").as_deref() {
        Ok("capkv") => config.io_loop = capkv_server::config::IoLoop::Capkv,
        Ok("tokio") => config.io_loop = capkv_server::config::IoLoop::Tokio,
        Err(_) => {}
        Ok(other) => panic!("CAPKV_IO_LOOP={other}: capkv or tokio"),
    }
    config
}

/// [`test_config`] with the Admin capability behind `token`.
pub fn admin_config(token: &str) -> Config {
    let mut config = test_config();
    config.admin.token = Some(capkv_server::config::Secret::new(token));
    config
}

pub fn start(config: Config) -> RunningServer {
    RunningServer::start(config).expect("server starts")
}

/// Every key under `bounds` with its value and version, by paging through a scan.
pub async fn read_all(
    client: &Client,
    bounds: ScanBounds,
) -> std::collections::HashMap<Vec<u8>, (Vec<u8>, u64)> {
    let mut all = std::collections::HashMap::new();
    let mut cursor = Vec::new();
    for _ in 0..10_000 {
        let page = client
            .scan(ScanOptions {
                bounds: bounds.clone(),
                cursor: cursor.clone(),
                limit: 1000,
                ..ScanOptions::default()
            })
            .await
            .expect("scan");
        for e in page.entries {
            all.insert(e.key, (e.value, e.version));
        }
        match page.next_cursor {
            Some(next) => cursor = next,
            None => return all,
        }
    }
    panic!("scan did not finish in 10,000 pages");
}

pub async fn client(addr: SocketAddr) -> Client {
    client_with(addr, "").await
}

/// A client that does not retry, so each refusal or deadline is seen as it is.
pub async fn plain_client(addr: SocketAddr) -> Client {
    let options = ClientOptions {
        timeout: Duration::from_secs(10),
        retry: capkv_client::RetryPolicy::none(),
        ..ClientOptions::default()
    };
    Client::connect(&addr.to_string(), options)
        .await
        .expect("connect")
}

pub async fn client_with(addr: SocketAddr, token: &str) -> Client {
    let options = ClientOptions {
        token: token.to_string(),
        timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    };
    Client::connect(&addr.to_string(), options)
        .await
        .expect("connect")
}

/// A raw capnp connection; must run inside a `LocalSet`.
pub async fn raw_gateway(addr: SocketAddr) -> gateway::Client {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    bootstrap_over(capkv_rpc::transport::vat_network(
        stream,
        rpc_twoparty_capnp::Side::Client,
        capkv::response_reader_options(&capkv::Limits::default()),
    ))
}

/// A capnp-rpc client over `network`, its `RpcSystem` spawned on this thread's `LocalSet`:
/// the server's bootstrap `Gateway`.
fn bootstrap_over(
    network: impl capnp_rpc::VatNetwork<rpc_twoparty_capnp::Side> + 'static,
) -> gateway::Client {
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let gw: gateway::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
    tokio::task::spawn_local(rpc);
    gw
}

/// A raw capnp connection to a server over an in-process stream (no socket, no thread):
/// the server is `config` over a memory engine, served on this thread's `LocalSet` (so run
/// inside one, e.g. with [`local`]). Returns the bootstrap and the server's shared state.
/// For RPC behaviour tests whose subject is not the network.
pub fn in_process_gateway(
    config: &Config,
) -> (gateway::Client, std::sync::Arc<capkv_server::chain::Shared>) {
    in_process_gateway_over(config, std::sync::Arc::new(capkv_store::MemoryStore::new()))
}

/// [`in_process_gateway`] over a store the test made.
pub fn in_process_gateway_over(
    config: &Config,
    store: std::sync::Arc<dyn capkv_store::Store>,
) -> (gateway::Client, std::sync::Arc<capkv_server::chain::Shared>) {
    use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};
    let (ours, shared) = in_process_stream_over(config, store);
    let (r, w) = tokio::io::split(ours);
    let network = capnp_rpc::twoparty::VatNetwork::new(
        r.compat(),
        w.compat_write(),
        rpc_twoparty_capnp::Side::Client,
        capkv::response_reader_options(&capkv::Limits::default()),
    );
    (bootstrap_over(network), shared)
}

/// The client end of a byte stream whose other end a server (`config`, memory engine)
/// serves on this thread's `LocalSet`: for tests that send hand-built protocol messages.
pub fn in_process_stream(
    config: &Config,
) -> (
    tokio::io::DuplexStream,
    std::sync::Arc<capkv_server::chain::Shared>,
) {
    in_process_stream_over(config, std::sync::Arc::new(capkv_store::MemoryStore::new()))
}

fn in_process_stream_over(
    config: &Config,
    store: std::sync::Arc<dyn capkv_store::Store>,
) -> (
    tokio::io::DuplexStream,
    std::sync::Arc<capkv_server::chain::Shared>,
) {
    let shared = std::sync::Arc::new(capkv_server::chain::Shared::new(config, store));
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    capkv_server::server::serve_in_process(std::sync::Arc::clone(&shared), theirs);
    (ours, shared)
}

/// The code in a raw response's result error arm (`$module` names the result struct, e.g.
/// `put_result`), or `None` for success.
#[allow(unused_macros)]
macro_rules! code_of {
    ($resp:expr, $module:ident) => {{
        let resp = $resp;
        match resp.get().unwrap().get_result().unwrap().which().unwrap() {
            capkv::kv_capnp::$module::Which::Error(e) => {
                Some(capkv::ApiError::read(e.unwrap()).code)
            }
            _ => None,
        }
    }};
}
#[allow(unused_imports)]
pub(crate) use code_of;

/// Sends `req` the way API v2 clients do, pipelining on the capability in union member 0
/// of the method's result struct, and returns the response future with that capability.
/// The reference for "clients built against API v2 keep working" (capkv's own client
/// pipelines on the `...Cap` fields through the generated Pipeline API since API v3).
///
/// capnpc-rust generates no pipeline accessors for union members, yet pipelining on them is
/// well defined on the wire: every `*Result` struct that returns a capability puts it in
/// union member 0, which shares pointer slot 0 with `error`, and the result struct is field
/// 0 of the method's results. If the call failed (the slot holds an `Error`), calls on the
/// pipelined capability fail with an exception and the response says why.
pub fn send_v2_pipelined<P, R, C>(
    req: capnp::capability::Request<P, R>,
) -> (
    impl std::future::Future<Output = capnp::Result<capnp::capability::Response<R>>>,
    C,
)
where
    R: capnp::traits::Owned + capnp::traits::Pipelined,
    C: capnp::capability::FromClientHook,
{
    let capnp::capability::RemotePromise {
        promise, pipeline, ..
    } = req.hook.send();
    let cap = C::new(pipeline.get_pointer_field(0).get_pointer_field(0).as_cap());
    let response = async move { Ok(capnp::capability::Response::new(promise.await?.hook)) };
    (response, cap)
}

/// Forwards bytes from `from` to `to`, each chunk delivered `delay` after it was read,
/// in order (a delay line, not a per-chunk sleep, so throughput is not throttled).
async fn delay_line(
    delay: Duration,
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(1024);
    let writer = tokio::spawn(async move {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&chunk).await.is_err() {
                break;
            }
        }
    });
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let at = tokio::time::Instant::now() + delay;
                if tx.send((at, buf[..n].to_vec())).await.is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

/// Starts a delaying proxy to `upstream`; returns its address. Serves any number of
/// connections until the test's runtime ends.
pub async fn delaying_proxy(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(delay_line(delay, cr, sw));
            tokio::spawn(delay_line(delay, sr, cw));
        }
    });
    addr
}

/// A port free a moment ago on 127.0.0.1.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts a process that listens on a port it is told and cannot report one it chose
/// (redis-server, Prometheus), on a port free a moment ago; when it exits before printing
/// `ready` (another test's connection took the port in between, and it could not bind), on
/// another, at most five times. Its stdout and stderr are drained by threads for its whole
/// life, so it never writes into a full or closed pipe.
pub fn spawn_on_free_port(
    mut command: impl FnMut(u16) -> std::process::Command,
    ready: &'static str,
) -> (Proc, u16) {
    use std::io::{BufRead, BufReader, Read};
    use std::process::Stdio;
    fn drain(
        out: impl Read + Send + 'static,
        ready: &'static str,
        tx: std::sync::mpsc::Sender<()>,
    ) {
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if line.contains(ready) {
                    let _ = tx.send(());
                }
            }
        });
    }
    let mut tried = Vec::new();
    for _ in 0..5 {
        let port = free_port();
        let mut cmd = command(port);
        let mut child = Proc(
            cmd.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/setup.sh installs it)")),
        );
        let (tx, rx) = std::sync::mpsc::channel();
        drain(child.stdout.take().unwrap(), ready, tx.clone());
        drain(child.stderr.take().unwrap(), ready, tx);
        match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => return (child, port),
            // Both pipes closed: it exited without saying it was ready.
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait();
                tried.push((port, status));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("{cmd:?} never printed {ready:?}")
            }
        }
    }
    panic!("no port worked: {tried:?}")
}

/// Runs a `!Send` async body to its value on a current-thread runtime inside a `LocalSet`.
pub fn local_result<T, F: std::future::Future<Output = T>>(f: F) -> T {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f)
}

/// Runs a `!Send` test body on a current-thread runtime inside a `LocalSet`.
pub fn local<F: std::future::Future<Output = ()>>(f: F) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, f);
}

/// A child process (kv-server, prometheus) killed by its PID when dropped, however the
/// test ends; derefs to the `Child`.
pub struct Proc(pub std::process::Child);

impl std::ops::Deref for Proc {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// The kv-server binary of this build.
pub const KV_SERVER: &str = env!("CARGO_BIN_EXE_kv-server");

/// The kv-client binary of this build (cargo builds it beside kv-server).
pub fn kv_client_bin() -> std::path::PathBuf {
    std::path::PathBuf::from(KV_SERVER).with_file_name("kv-client")
}

/// kv-server with `args`, `RUST_LOG` removed and stdout discarded: the one way the tests
/// start it. Run it with `.output()` for a run that ends by itself (`--print-config`, a
/// refused start); [`spawn_kv_server`] for one that serves.
pub fn kv_server(args: &[&str]) -> std::process::Command {
    let mut cmd = std::process::Command::new(KV_SERVER);
    cmd.args(args)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::null());
    cmd
}

/// A serving kv-server started with `args` (after `--log-format json`) and `envs` (which
/// may set `RUST_LOG` again); returns once it listens, with its address and its log lines,
/// every one from the first. A thread keeps reading stderr for the process's whole life
/// (dropping the receiver only drops lines), so the server never blocks on a full pipe.
/// Include `capkv_server=info` in any `--log-level` given: the listening line is at info.
pub fn spawn_kv_server(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Proc, String, std::sync::mpsc::Receiver<String>) {
    let (proc, listening, logs) = spawn_listening(args, envs);
    (proc, listening.addr, logs)
}

/// [`spawn_kv_server`] with its operator HTTP listener on a port the kernel picks
/// (`--metrics-listen 127.0.0.1:0`); returns that listener's address too. A port picked
/// by the test and freed before the server binds it can be taken meanwhile by any
/// connection another test opens.
pub fn spawn_kv_server_with_metrics(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Proc, String, String, std::sync::mpsc::Receiver<String>) {
    let mut all = vec!["--metrics-listen", "127.0.0.1:0"];
    all.extend_from_slice(args);
    let (proc, listening, logs) = spawn_listening(&all, envs);
    let metrics = listening
        .metrics_addr
        .expect("the listening line names the metrics address");
    (proc, listening.addr, metrics, logs)
}

fn spawn_listening(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Proc, Listening, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let mut cmd = kv_server(&["--log-format", "json"]);
    cmd.args(args).stderr(std::process::Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = Proc(cmd.spawn().expect("spawn kv-server"));
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    // The lines up to `listening` also go to `startup`, which finds the address, so the
    // caller's receiver still starts at the first line.
    let (startup_tx, startup_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut startup_tx = Some(startup_tx);
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if let Some(startup) = &startup_tx {
                if startup.send(line.clone()).is_err() {
                    startup_tx = None;
                }
            }
            let _ = tx.send(line);
        }
    });
    let patience = Duration::from_secs(60);
    let listening = listening_line(&mut std::iter::from_fn(|| {
        startup_rx.recv_timeout(patience).ok().map(Ok)
    }))
    .expect("kv-server listening");
    (child, listening, rx)
}

/// How the resource tests run kv-server: the memory engine, two workers, any port.
pub const MEMORY_SERVER_ARGS: [&str; 6] = [
    "--listen",
    "127.0.0.1:0",
    "--engine",
    "memory",
    "--workers",
    "2",
];

/// A kv-server on the RocksDB engine in `data_dir`, on a free loopback port, without
/// scheduled compaction: (process, address).
pub fn spawn_rocks_server(data_dir: &std::path::Path) -> (Proc, String) {
    let dir = data_dir.to_string_lossy();
    let (child, addr, _logs) = spawn_kv_server(
        &[
            "--engine",
            "rocksdb",
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "warn,capkv_server=info",
            "--data-dir",
            &dir,
        ],
        &[("CAPKV_STORAGE__COMPACTION_INTERVAL_S", "0")],
    );
    (child, addr)
}

/// A kv-server process as the resource tests run it: `spawn_kv_server` with
/// [`MEMORY_SERVER_ARGS`] first and `args` after them.
pub fn spawn_memory_server(
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Proc, String, std::sync::mpsc::Receiver<String>) {
    let mut all = MEMORY_SERVER_ARGS.to_vec();
    all.extend_from_slice(args);
    spawn_kv_server(&all, envs)
}

/// A `/proc/PID/status` field in bytes (`VmRSS:` now, `VmHWM:` the peak so far); 0 when
/// the process is gone.
pub fn proc_status_bytes(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// What kv-server's `listening` line says.
pub struct Listening {
    /// The RPC address.
    pub addr: String,
    /// The operator HTTP address, when there is that listener.
    pub metrics_addr: Option<String>,
}

/// Reads kv-server's JSON log lines (at most 50: startup logs a handful) up to its
/// `listening` line and returns what it says; `None` if the process ended first.
pub fn listening_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
) -> Option<Listening> {
    for line in lines.take(50) {
        let Ok(line) = line else { break };
        let v: serde_json::Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("log lines are JSON ({e}), not {line:?}"));
        if v["message"] == "listening" {
            return Some(Listening {
                addr: v["addr"].as_str()?.to_string(),
                metrics_addr: v["metrics_addr"].as_str().map(str::to_string),
            });
        }
    }
    None
}

/// The RPC address of [`listening_line`].
pub fn listening_addr(lines: &mut impl Iterator<Item = std::io::Result<String>>) -> Option<String> {
    listening_line(lines).map(|l| l.addr)
}

/// Whether any of RocksDB's own log files in `dir` (`LOG`, `LOG.old.*`) holds `needle`.
pub fn rocksdb_log_mentions(dir: &std::path::Path, needle: &str) -> bool {
    std::fs::read_dir(dir)
        .expect("read the data directory")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("LOG"))
        .any(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains(needle)
        })
}
