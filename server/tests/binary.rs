//! The `kv-server` binary itself: the startup line scripts rely on, config errors, the
//! redacted `--print-config`, and SIGTERM with calls in flight.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Stdio};

use common::Proc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capkv::ErrorCode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Starts kv-server on port 0 (two workers, the memory engine unless `extra` picks one)
/// and returns it with its address.
fn spawn_server(extra: &[&str]) -> (Proc, SocketAddr) {
    let mut args = vec!["--listen", "127.0.0.1:0", "--workers", "2"];
    // Process behaviour is engine-independent: memory unless the test picks one.
    if !extra.contains(&"--engine") {
        args.extend(["--engine", "memory"]);
    }
    args.extend_from_slice(extra);
    let (child, addr, _logs) = common::spawn_kv_server(&args, &[]);
    (child, addr.parse().expect("a socket address"))
}

/// Waits for the child to exit, bounded; kills it (by PID) if it does not.
/// SIGTERM by PID, and a clean exit within 20 s.
fn terminate(child: &mut Child) {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(child, Duration::from_secs(20)).success());
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::scope(|s| {
        s.spawn(|| {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(limit) {
            Ok(status) => status.expect("wait for kv-server"),
            Err(_) => {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
                panic!("kv-server did not exit within {limit:?}");
            }
        }
    })
}

#[test]
fn print_config_redacts_and_bad_config_exits_2() {
    let out = common::kv_server(&["--print-config", "--listen", "127.0.0.1:9"])
        .stdout(Stdio::piped())
        .env("CAPKV_AUTH__TOKEN", "super-secret-value")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen = \"127.0.0.1:9\""), "{text}");
    assert!(
        text.contains("<redacted>") && !text.contains("super-secret-value"),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_key_bytes = \"lots\"\n").unwrap();
    let out = common::kv_server(&["--config"]).arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("max_key_bytes"), "{err}");
}

/// Runs kv-server on RocksDB at `data_dir` and expects it to fail at start.
fn failed_start(data_dir: &std::path::Path) -> String {
    let out = common::kv_server(&["--engine", "rocksdb", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "a storage failure exits 1");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn storage_that_cannot_open_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let err = failed_start(&file);
    assert!(err.contains("not a directory"), "{err}");

    // A directory held by a running server.
    let data = dir.path().join("data");
    let (mut first, _) =
        spawn_server(&["--engine", "rocksdb", "--data-dir", data.to_str().unwrap()]);
    let err = failed_start(&data);
    assert!(err.contains("in use by another process"), "{err}");
    terminate(&mut first);

    // Files RocksDB cannot make sense of.
    std::fs::write(data.join("CURRENT"), b"MANIFEST-999999\n").unwrap();
    let err = failed_start(&data);
    assert!(err.contains("cannot open the storage engine"), "{err}");
}

/// The memory-log engine and RocksDB never start over each other's files, and a log
/// directory held by a running server is refused.
#[test]
fn an_engine_refuses_another_engine_s_directory() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    let (mut first, _) = spawn_server(&[
        "--engine",
        "memory-log",
        "--data-dir",
        log.to_str().unwrap(),
    ]);
    let out = common::kv_server(&["--engine", "memory-log", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&log)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("in use by another process"), "{err}");
    terminate(&mut first);
    let err = failed_start(&log);
    assert!(err.contains("start with --engine memory-log"), "{err}");

    let rocks = dir.path().join("rocks");
    let (mut first, _) =
        spawn_server(&["--engine", "rocksdb", "--data-dir", rocks.to_str().unwrap()]);
    terminate(&mut first);
    let out = common::kv_server(&["--engine", "memory-log", "--listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(&rocks)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("holds a RocksDB database"), "{err}");
}

#[test]
fn port_in_use_is_a_clear_error() {
    let (mut first, addr) = spawn_server(&[]);
    let out = common::kv_server(&["--listen", &addr.to_string(), "--log-format", "json"])
        .args(["--engine", "memory"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot listen"));
    terminate(&mut first);
}

#[test]
fn sigterm_with_calls_in_flight_drains_and_exits_zero() {
    for trial in 0..3 {
        let (mut child, addr) = spawn_server(&[]);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let done = Arc::new(AtomicUsize::new(0));
        let (ok, clean_errors) = rt.block_on(async {
            let (started_tx, mut started_rx) = tokio::sync::mpsc::channel::<()>(64);
            let mut tasks = Vec::new();
            for c in 0..8 {
                let done = Arc::clone(&done);
                let started = started_tx.clone();
                tasks.push(tokio::spawn(async move {
                    let client = common::client(addr).await;
                    let (mut ok, mut clean) = (0usize, 0usize);
                    // Bounded: stops at the first error (the server went away) or after
                    // a fixed number of calls.
                    for i in 0..20_000 {
                        let key = format!("t{trial}-c{c}-{i}");
                        let r = if i % 2 == 0 {
                            client.put(key.as_bytes(), b"v").await.map(|_| ())
                        } else {
                            client.get(key.as_bytes()).await.map(|_| ())
                        };
                        match r {
                            Ok(()) => ok += 1,
                            Err(e) => {
                                // A clean error: the drain's `unavailable`, or the
                                // connection closing (also `unavailable`). Never a hang
                                // (deadline) or an internal error.
                                assert_eq!(e.code, ErrorCode::Unavailable, "{e:?}");
                                clean += 1;
                                break;
                            }
                        }
                        if done.fetch_add(1, Ordering::Relaxed) == 200 {
                            let _ = started.send(()).await;
                        }
                    }
                    (ok, clean)
                }));
            }
            drop(started_tx);
            // Signal once the clients are well into their loops.
            started_rx.recv().await.expect("clients made progress");
            kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
            let mut totals = (0, 0);
            for t in tasks {
                let (o, c) = tokio::time::timeout(Duration::from_secs(30), t)
                    .await
                    .expect("every call got a reply or an error in time")
                    .expect("client task panicked");
                totals.0 += o;
                totals.1 += c;
            }
            totals
        });
        let status = wait_exit(&mut child, Duration::from_secs(20));
        assert_eq!(
            status.code(),
            Some(0),
            "trial {trial}: exit status {status:?}"
        );
        assert!(ok > 0);
        eprintln!("trial {trial}: {ok} calls ok, {clean_errors} clients ended with a clean error");
    }
}

#[test]
fn a_closed_log_pipe_does_not_take_the_server_down() {
    let mut child = common::kv_server(&["--listen", "127.0.0.1:0", "--log-format", "json"])
        .args(["--workers", "1", "--engine", "memory", "--dev-admin"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn kv-server");
    let stderr = child.stderr.take().unwrap();
    let mut child = Proc(child);
    // Read up to the listening line, then close our end of the pipe: every later log
    // line meets a broken pipe.
    let addr = common::listening_addr(&mut BufReader::new(stderr).lines()).expect("listening line");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let options = capkv_client::ClientOptions {
            retry: capkv_client::RetryPolicy::none(),
            ..Default::default()
        };
        let c = capkv_client::Client::connect(&addr, options).await.unwrap();
        for i in 0..20u8 {
            // Admin calls log at info and warn level.
            c.show_faults("")
                .await
                .expect("served despite the closed log pipe");
            c.put(&[i], b"v").await.unwrap();
        }
    });
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    assert!(wait_exit(&mut child, Duration::from_secs(20)).success());
}
