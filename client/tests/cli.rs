//! The `kv-client` binary against a real server on port 0: every subcommand round-trips,
//! `--json` parses, exit codes are as documented, line mode works, and the interactive
//! shell works through a pseudo-terminal.

use std::io::Write;
use std::process::{Command, Output, Stdio};

use capkv_server::{Config, RunningServer};

const BIN: &str = env!("CARGO_BIN_EXE_kv-client");

fn server() -> RunningServer {
    RunningServer::start(Config::local_ephemeral()).unwrap()
}

fn run(addr: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .arg("--addr")
        .arg(addr)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        input.write_all(data).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn put_get_scan_delete_round_trip() {
    let s = server();
    let addr = s.addr().to_string();
    let o = run(&addr, &["put", "greeting", "hello world"], None);
    assert!(o.status.success(), "{o:?}");
    assert_eq!(stdout(&o), "OK version=1 revision=1\n");
    let o = run(&addr, &["get", "greeting"], None);
    assert_eq!(stdout(&o), "hello world\n");
    run(&addr, &["put", "greet2", "x"], None);
    run(&addr, &["put", "other", "y"], None);
    let o = run(&addr, &["scan", "--prefix", "greet"], None);
    assert_eq!(stdout(&o), "greet2\tx\ngreeting\thello world\n");
    let o = run(&addr, &["scan", "--start", "greetz", "--keys-only"], None);
    assert_eq!(stdout(&o), "other\n");
    let o = run(&addr, &["delete", "greeting"], None);
    assert!(o.status.success());
    let o = run(&addr, &["get", "greeting"], None);
    assert_eq!(o.status.code(), Some(1), "not found has its own exit code");
    let o = run(&addr, &["delete", "greeting"], None);
    assert_eq!(o.status.code(), Some(1));
    let o = run(&addr, &["health"], None);
    assert_eq!(stdout(&o), "live=true ready=true status=serving\n");
    let o = run(&addr, &["version"], None);
    assert!(stdout(&o).starts_with("capkv "), "{o:?}");
}

#[test]
fn json_output_parses_and_is_binary_safe() {
    let s = server();
    let addr = s.addr().to_string();
    // Value from stdin, with bytes that are not UTF-8.
    let o = run(&addr, &["--json", "put", "bin"], Some(&[0xff, 0x00, 0x41]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["version"], 1);
    let o = run(&addr, &["--json", "get", "bin"], None);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["key"], "bin");
    assert_eq!(v["value_base64"], "/wBB");
    assert_eq!(v["version"], 1);
    let o = run(&addr, &["--json", "get", "nope"], None);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["code"], "not_found");
    let o = run(&addr, &["--json", "scan", "--limit", "1"], None);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    for args in [
        &["--json", "health"][..],
        &["--json", "version"],
        &["--json", "delete", "bin"],
    ] {
        let o = run(&addr, args, None);
        serde_json::from_slice::<serde_json::Value>(&o.stdout).expect("JSON");
    }
}

#[test]
fn value_from_file_conditions_and_exit_codes() {
    let s = server();
    let addr = s.addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("value.bin");
    std::fs::write(&f, b"from a file").unwrap();
    let o = run(&addr, &["put", "f", "--file", f.to_str().unwrap()], None);
    assert!(o.status.success());
    assert_eq!(stdout(&run(&addr, &["get", "f"], None)), "from a file\n");
    let o = run(&addr, &["put", "f", "x", "--if-absent"], None);
    assert_eq!(o.status.code(), Some(3), "condition failed");
    let o = run(&addr, &["put", "f", "x", "--if-version", "1"], None);
    assert!(o.status.success());
    let o = run(&addr, &["delete", "f", "--if-version", "1"], None);
    assert_eq!(o.status.code(), Some(3));
    let o = run(&addr, &["put", "", "x"], None);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty_key"));
    let o = run(&addr, &["frobnicate"], None);
    assert_eq!(o.status.code(), Some(2), "usage error");
    let o = run("127.0.0.1:1", &["get", "k"], None);
    assert_eq!(o.status.code(), Some(4), "connection refused");
    assert!(String::from_utf8_lossy(&o.stderr).contains("unavailable"));
}

#[test]
fn line_mode_runs_one_command_per_line() {
    let s = server();
    let addr = s.addr().to_string();
    let script = b"# comment\nput k1 \"two words\"\nget k1\n\nbogus\nscan\ndelete k1\n";
    let o = run(&addr, &[], Some(script));
    assert_eq!(
        o.status.code(),
        Some(2),
        "the bad line sets the exit status"
    );
    assert_eq!(
        stdout(&o),
        "OK version=1 revision=1\ntwo words\nk1\ttwo words\ndeleted revision=2\n"
    );
    let o = run(&addr, &["--json"], Some(b"put a 1\nget a\n"));
    assert!(o.status.success());
    for line in stdout(&o).lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("one JSON object per line");
    }
}

#[test]
fn interactive_shell_through_a_pty() {
    let s = server();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(BIN);
    cmd.arg("--addr")
        .arg(s.addr().to_string())
        .env("CAPKV_HISTORY", dir.path().join("history"))
        .env("TERM", "xterm");
    let mut p = rexpect::session::spawn_command(cmd, Some(10_000)).unwrap();
    p.exp_string("capkv>").unwrap();
    p.send_line("put shellkey shellvalue").unwrap();
    p.exp_string("OK version=1").unwrap();
    p.send_line("get shellkey").unwrap();
    p.exp_string("shellvalue").unwrap();
    p.send_line("help").unwrap();
    p.exp_string("scan").unwrap();
    p.send_line("nonsense").unwrap();
    p.exp_string("unrecognized subcommand").unwrap();
    // Tab completion of a command name.
    p.send("hea\t").unwrap();
    p.flush().unwrap();
    p.send_line("").unwrap();
    p.exp_string("live=true").unwrap();
    p.send_line("exit").unwrap();
    p.exp_eof().unwrap();
    let history = std::fs::read_to_string(dir.path().join("history")).unwrap();
    assert!(history.contains("put shellkey shellvalue"), "{history}");
}

#[test]
fn admin_faults_set_show_clear() {
    let mut config = Config::local_ephemeral();
    config.admin.token = Some(capkv_server::config::Secret::new("ops"));
    let s = RunningServer::start(config).unwrap();
    let addr = s.addr().to_string();
    let admin = |args: &[&str]| {
        let mut all = vec!["admin", "--admin-token", "ops"];
        all.extend_from_slice(args);
        run(&addr, &all, None)
    };
    let o = admin(&["faults", "set", "get fail=permission_denied"]);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    assert!(stdout(&o).contains("1 rules armed"), "{}", stdout(&o));
    let o = run(&addr, &["get", "k"], None);
    assert_eq!(o.status.code(), Some(4), "the injected error");
    assert!(String::from_utf8_lossy(&o.stderr).contains("permission_denied"));
    let o = admin(&["faults", "show"]);
    assert!(
        stdout(&o).contains("get fail=permission_denied"),
        "{}",
        stdout(&o)
    );
    let o = admin(&["faults", "clear"]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        run(&addr, &["get", "k"], None).status.code(),
        Some(1),
        "not found again"
    );
    let o = run(
        &addr,
        &["admin", "--admin-token", "nope", "faults", "show"],
        None,
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unauthenticated"));
    let o = admin(&["--help"]);
    assert!(stdout(&o).contains("compact"));
    let o = admin(&["faults", "set", "get explode"]);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown action"));
}

/// A caller's idempotency key names one write: the shell, where every write would share
/// it (two equal increments: the second replayed the first), refuses it.
#[test]
fn an_idempotency_key_is_refused_without_a_command() {
    let s = server();
    let addr = s.addr().to_string();
    let key = "00112233445566778899aabbccddeeff";
    let o = run(
        &addr,
        &["--idempotency-key", key],
        Some(b"incr c 1\nincr c 1\n"),
    );
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("names one write"));
    let o = run(&addr, &["get", "c"], None);
    assert_eq!(o.status.code(), Some(1), "nothing was written: {o:?}");
}

#[test]
fn incr_shows_its_idempotency_key_and_replays_with_it() {
    let s = server();
    let addr = s.addr().to_string();
    let o = run(&addr, &["--json", "incr", "hits", "5"], None);
    assert_eq!(o.status.code(), Some(0), "{o:?}");
    let v: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(v["value"], 5);
    let key = v["idempotency_key"].as_str().unwrap().to_string();
    let session = v["session"].as_str().unwrap().to_string();
    assert_eq!((key.len(), session.len()), (32, 64));
    // The same session and key again: the recorded outcome, not a second increment.
    let replay = [
        "--session",
        &session,
        "--idempotency-key",
        &key,
        "incr",
        "hits",
        "5",
    ];
    let o = run(&addr, &replay, None);
    assert_eq!(stdout(&o).trim(), "5");
    // Other parameters under that key are refused.
    let o = run(
        &addr,
        &[
            "--session",
            &session,
            "--idempotency-key",
            &key,
            "incr",
            "hits",
            "6",
        ],
        None,
    );
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("idempotency_key_reused"));
    // A new session is a new scope.
    let o = run(
        &addr,
        &["--idempotency-key", &key, "incr", "hits", "5"],
        None,
    );
    assert_eq!(stdout(&o).trim(), "10");
    let o = run(&addr, &["--no-idempotency", "incr", "hits", "-2"], None);
    assert_eq!(stdout(&o).trim(), "8");
    let o = run(&addr, &["--session", "00", "incr", "hits"], None);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("permission_denied"),
        "forged session"
    );
    let o = run(
        &addr,
        &["--json", "--no-idempotency", "put", "k", "v"],
        None,
    );
    assert!(!stdout(&o).contains("idempotency_key"), "{}", stdout(&o));
    let o = run(&addr, &["put", "t", "text"], None);
    assert_eq!(o.status.code(), Some(0));
    let o = run(&addr, &["incr", "t"], None);
    assert_eq!(o.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&o.stderr).contains("not_an_integer"));
}

/// Pointed at something that is not a capkv server (here an HTTP server's answer, then an
/// SSH greeting), the client says the peer does not speak Cap'n Proto RPC, quoting what it
/// sent, as `unavailable` (exit 4) — not `internal`, which is for server bugs.
#[test]
fn a_peer_that_is_not_capnp_is_named_as_such() {
    for greeting in [
        &b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n"[..],
        &b"SSH-2.0-OpenSSH_9.2p1\r\n"[..],
    ] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let peer = std::thread::spawn(move || {
            // One connection: read what comes, answer with the greeting, and close only
            // once the client has (closing first would reset the connection and lose it).
            if let Ok((mut s, _)) = listener.accept() {
                use std::io::Read;
                let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(10)));
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let _ = s.write_all(greeting);
                while matches!(s.read(&mut buf), Ok(n) if n > 0) {}
            }
        });
        // One attempt: this peer answers one connection only.
        let o = run(&addr, &["--attempts", "1", "get", "k"], None);
        peer.join().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(4), "{err}");
        assert!(err.contains("unavailable"), "{err}");
        assert!(err.contains("does not speak Cap'n Proto RPC"), "{err}");
        let first_line = String::from_utf8_lossy(greeting);
        let first_line = first_line.lines().next().unwrap();
        assert!(err.contains(first_line), "{err}");
    }
}

/// `watch` prints one line per event from `--from` on, in order, in both forms.
#[test]
fn watch_prints_each_change_from_a_revision() {
    let s = server();
    let addr = s.addr().to_string();
    run(&addr, &["put", "app/a", "1"], None); // 1
    run(&addr, &["put", "other", "x"], None); // 2
    run(&addr, &["put", "app/b", "2"], None); // 3
    run(&addr, &["delete", "app/a"], None); // 4
    let o = run(
        &addr,
        &["watch", "--prefix", "app/", "--from", "1", "--count", "3"],
        None,
    );
    assert!(o.status.success(), "{o:?}");
    assert_eq!(
        stdout(&o),
        "put app/a 1 version=1 revision=1\nput app/b 2 version=1 revision=3\n\
         delete app/a revision=4\n"
    );
    let o = run(
        &addr,
        &["--json", "watch", "--from", "2", "--count", "1"],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (
            v["kind"].as_str(),
            v["key"].as_str(),
            v["mod_revision"].as_u64()
        ),
        (Some("put"), Some("other"), Some(2))
    );
}

/// `lease grant | ttl | keepalive --once | revoke`, and `put --lease` / `put --ttl`.
#[test]
fn leases_from_the_command_line() {
    let s = server();
    let addr = s.addr().to_string();
    let o = run(&addr, &["lease", "grant", "60s"], None);
    assert!(o.status.success(), "{o:?}");
    let id = stdout(&o).trim().to_string();
    assert!(u64::from_str_radix(&id, 16).is_ok(), "a hex id: {id}");
    let o = run(&addr, &["put", "member/a", "up", "--lease", &id], None);
    assert_eq!(stdout(&o), format!("OK version=1 revision=1 lease={id}\n"));
    let o = run(&addr, &["lease", "ttl", &id], None);
    let line = stdout(&o);
    assert!(line.starts_with(&format!("lease {id} alive: ")), "{line}");
    assert!(line.ends_with("ms left of 60000 ms, 1 keys\n"), "{line}");
    let o = run(&addr, &["lease", "keepalive", &id, "--once"], None);
    assert!(stdout(&o).contains("kept alive"), "{o:?}");
    let o = run(&addr, &["lease", "revoke", &id], None);
    assert_eq!(stdout(&o), "revoked: 1 keys deleted, revision=2\n");
    let o = run(&addr, &["get", "member/a"], None);
    assert_eq!(o.status.code(), Some(1), "gone with its lease");
    let o = run(&addr, &["--json", "lease", "ttl", &id], None);
    assert_eq!(o.status.code(), Some(4));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["error"]["code"], "lease_not_found");
    let o = run(
        &addr,
        &["--json", "put", "session", "x", "--ttl", "30s"],
        None,
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["lease"].as_str().is_some_and(|l| !l.is_empty()), "{v}");
    let o = run(&addr, &["lease", "ttl", "zz"], None);
    assert_eq!(o.status.code(), Some(2), "a usage error");
}
