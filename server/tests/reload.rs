//! Live reload of a real kv-server process: SIGHUP and `Admin.reloadConfig` re-read the
//! config file. Token rotation without a restart (the new token works within 1 s, the old
//! one until the overlap ends, no call dropped by the reload); limits and the log level
//! change live; an invalid file is refused and the running config stays.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use capkv::ErrorCode;
use capkv_client::{Client, ClientOptions};
use common::Proc;

const ADMIN: &str = "reload-admin";
/// Bound on every wait here; generous for a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(30);

/// `tables` are TOML tables appended after the fixed ones; `workers` is top-level.
fn write_config(path: &Path, token: &str, workers: u32, tables: &str) {
    let text = format!(
        "engine = \"memory\"\nlisten = \"127.0.0.1:0\"\nworkers = {workers}\n\
         [auth]\ntoken = \"{token}\"\nrotation_overlap_s = 3\n\
         [admin]\ntoken = \"{ADMIN}\"\n{tables}"
    );
    // Write then rename: a reload never reads a half-written file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Server {
    proc: Proc,
    addr: String,
    logs: mpsc::Receiver<String>,
}

impl Server {
    fn start(config: &Path) -> Self {
        let config = config.to_string_lossy();
        let (proc, addr, logs) = common::spawn_kv_server(&["--config", &config], &[]);
        Server { proc, addr, logs }
    }

    fn hup(&self) {
        let pid = nix::unistd::Pid::from_raw(self.proc.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGHUP).unwrap();
    }

    /// Waits (bounded) for a log line containing every one of `parts`.
    fn wait_log(&self, parts: &[&str]) -> String {
        let give_up = Instant::now() + PATIENCE;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            let line = self
                .logs
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {parts:?}"));
            if parts.iter().all(|p| line.contains(p)) {
                return line;
            }
        }
    }
}

async fn connect(addr: &str, token: &str) -> Client {
    let options = ClientOptions {
        token: token.into(),
        timeout: Duration::from_secs(5),
        ..ClientOptions::default()
    };
    Client::connect(addr, options).await.expect("connect")
}

/// Whether a fresh connection opening with `token` is served.
async fn token_works(addr: &str, token: &str) -> Result<(), ApiErrorCode> {
    let c = connect(addr, token).await;
    c.get(b"probe").await.map(|_| ()).map_err(|e| e.code)
}

type ApiErrorCode = ErrorCode;

#[test]
fn token_rotation_on_sighup_keeps_every_call() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kv.toml");
    write_config(&config, "token-one", 1, "");
    let server = Server::start(&config);
    let addr = server.addr.clone();
    common::local(async move {
        assert_eq!(token_works(&addr, "token-one").await, Ok(()));
        assert_eq!(
            token_works(&addr, "token-two").await,
            Err(ErrorCode::Unauthenticated)
        );

        // Clients keep calling through the reload, on connections opened with the old
        // token and on new ones: none of their calls may fail.
        let stop = Arc::new(AtomicBool::new(false));
        let calls = Arc::new(AtomicU64::new(0));
        let mut loaders = Vec::new();
        for i in 0..4 {
            let (stop, calls, addr) = (Arc::clone(&stop), Arc::clone(&calls), addr.clone());
            loaders.push(tokio::task::spawn_local(async move {
                let c = connect(&addr, "token-one").await;
                let key = format!("k{i}");
                let mut n = 0u64;
                // Bounded: stops when told, and at most 200,000 calls.
                while !stop.load(Ordering::Relaxed) && n < 200_000 {
                    c.put(key.as_bytes(), n.to_string().as_bytes())
                        .await
                        .expect("no call fails across a reload");
                    n += 1;
                    calls.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        // Let the loaders get going (bounded by the number of calls, not by time).
        let started = Instant::now();
        while calls.load(Ordering::Relaxed) < 100 {
            assert!(started.elapsed() < PATIENCE, "the loaders never got going");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        write_config(&config, "token-two", 1, "");
        let hup_at = Instant::now();
        server.hup();
        // The new token works within 1 s of the signal.
        let mut new_ok_after = None;
        while hup_at.elapsed() < PATIENCE {
            if token_works(&addr, "token-two").await.is_ok() {
                new_ok_after = Some(hup_at.elapsed());
                break;
            }
        }
        let new_ok_after = new_ok_after.expect("the new token works");
        assert!(
            new_ok_after < Duration::from_secs(1),
            "the new token took {new_ok_after:?}"
        );
        server.wait_log(&["configuration reloaded", "auth.token rotated"]);
        // Inside the overlap window (3 s) the old token still opens.
        if hup_at.elapsed() < Duration::from_secs(2) {
            assert_eq!(token_works(&addr, "token-one").await, Ok(()));
        }
        // After it, the old token fails; polling is bounded by PATIENCE.
        let mut old_failed_after = None;
        while hup_at.elapsed() < PATIENCE {
            if token_works(&addr, "token-one").await == Err(ErrorCode::Unauthenticated) {
                old_failed_after = Some(hup_at.elapsed());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let old_failed_after = old_failed_after.expect("the old token ends");
        assert!(
            old_failed_after >= Duration::from_secs(3),
            "the old token ended before the overlap: {old_failed_after:?}"
        );

        stop.store(true, Ordering::Relaxed);
        for l in loaders {
            l.await.expect("loader finished without a failed call");
        }
        eprintln!(
            "new token served {new_ok_after:?} after SIGHUP; old refused after \
             {old_failed_after:?}; {} calls across the reload, 0 failed",
            calls.load(Ordering::Relaxed)
        );
    });
}

#[test]
fn admin_reload_changes_limits_and_log_level_and_refuses_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("kv.toml");
    write_config(&config, "t", 1, "[log]\nlevel = \"info\"\n");
    let server = Server::start(&config);
    let addr = server.addr.clone();
    common::local(async {
        let c = connect(&addr, "t").await;
        c.put(b"big", &[7u8; 2000])
            .await
            .expect("2000 bytes fit the default");
        assert_eq!(c.reload_config(ADMIN).await.unwrap(), "nothing changed");

        // Limits and log level, through Admin.reloadConfig.
        write_config(
            &config,
            "t",
            1,
            "[limits]\nmax_value_bytes = 1000\n[log]\nlevel = \"capkv::request=debug,info\"\n",
        );
        let changes = c.reload_config(ADMIN).await.unwrap();
        assert!(changes.contains("limits changed"), "{changes}");
        assert!(changes.contains("log.level changed"), "{changes}");
        let e = c.put(b"big", &[7u8; 2000]).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::ValueTooLarge, "{e}");
        c.put(b"small", &[7u8; 500]).await.unwrap();
        // Request lines now appear (debug level for capkv::request).
        server.wait_log(&["capkv::request", "\"method\":\"put\""]);

        // An invalid file is refused whole; the running config stays.
        std::fs::write(&config, "limits = \"not a table\"\n").unwrap();
        let e = c.reload_config(ADMIN).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        server.wait_log(&["configuration reload refused"]);
        let e = c.put(b"big", &[7u8; 2000]).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::ValueTooLarge, "the old limits stay");
        // A valid file that fails validation, by SIGHUP this time.
        write_config(&config, "t", 1, "[limits]\nmax_value_bytes = 0\n");
        server.hup();
        let line = server.wait_log(&["configuration reload refused"]);
        assert!(line.contains("max_value_bytes"), "{line}");
        c.put(b"small", &[7u8; 500]).await.unwrap();

        // A setting that needs a restart is reported and ignored.
        write_config(&config, "t", 3, "");
        let changes = c.reload_config(ADMIN).await.unwrap();
        assert!(changes.contains("limits changed"), "{changes}");
        server.wait_log(&["changes only on restart", "workers"]);
        c.put(b"big", &[7u8; 2000])
            .await
            .expect("default limits again");
        assert_eq!(
            c.reload_config("wrong").await.unwrap_err().code,
            ErrorCode::Unauthenticated
        );
    });
}
