//! Every command README.md shows is exercised, so the README cannot drift from the code.
//!
//! - Each `sh` block is run line by line against its own real kv-server (port 0, a temp
//!   dir) and, for the Redis target, a real redis-server. Lines whose comment shows their
//!   output are checked against it. Rewrites are few and listed in each block's runner:
//!   `$B` is the test build's bin dir, placeholders (`...`, `ca16…`) become real values,
//!   load runs get a short duration and a small key space.
//! - Each inline command (a code span starting with a program) is either run here
//!   (`INLINE_HERE`) or named in `INLINE_ELSEWHERE` with the test file or CI step that
//!   runs it, and that file is checked to really contain it.
//! - Commands that build the workspace (`scripts/run.sh`, `bench/run.sh`,
//!   `scripts/test.sh`) cannot run inside `cargo test`, which holds cargo's build lock:
//!   they must appear in scripts/test.sh, which CI runs (checked here).
//!
//! A new block or inline command fails `every_readme_command_is_covered` until it is
//! covered here.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::{read_repo_file as read, repo};

fn bin_dir() -> PathBuf {
    PathBuf::from(common::KV_SERVER)
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf()
}

/// One command line of a block: the command and its trailing `# comment`, if any.
#[derive(Debug, Clone)]
struct Line {
    cmd: String,
    comment: String,
}

/// The `sh` blocks of README.md, in order.
fn blocks() -> Vec<Vec<Line>> {
    let text = read("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<Vec<Line>> = None;
    for raw in text.lines() {
        match (&mut current, raw.trim_end()) {
            (None, "```sh") => current = Some(Vec::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(lines), l) if !l.trim().is_empty() => {
                // A comment starts at whitespace + `# `; no command here contains that.
                let (cmd, comment) = match l.find(" # ") {
                    Some(i) => (&l[..i], l[i + 3..].trim()),
                    None => (l, ""),
                };
                lines.push(Line {
                    cmd: cmd.trim().to_string(),
                    comment: comment.to_string(),
                });
            }
            _ => {}
        }
    }
    assert!(current.is_none(), "README.md has an unclosed sh block");
    blocks
}

/// Code spans outside blocks that start with a program (or `VAR=value program`) and have
/// arguments, whitespace normalized: the README's inline commands. A lone name
/// (`kv-server`, `scripts/quickstart.sh`) names a program or file, it is not a command;
/// `.ci/run` is the exception.
fn inline_commands() -> Vec<String> {
    let text = read("README.md");
    let mut prose = String::new();
    let mut in_block = false;
    for l in text.lines() {
        if l.trim_start().starts_with("```") {
            in_block = !in_block;
        } else if !in_block {
            prose.push_str(l);
            prose.push('\n');
        }
    }
    const PROGRAMS: &[&str] = &[
        "kv-server",
        "kv-client",
        "kv-loadgen",
        "bash",
        "cargo",
        "git",
        "promtool",
        "redis-",
        "cd",
    ];
    let spans: Vec<&str> = prose.split('`').skip(1).step_by(2).collect();
    spans
        .into_iter()
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|s| {
            // `VAR=value cmd ...` counts; a lone `VAR=value` is a setting, not a command.
            let words: Vec<&str> = s.split(' ').collect();
            let first = words.iter().find(|w| !w.contains('=')).copied();
            let first = first.unwrap_or("");
            let program = PROGRAMS
                .iter()
                .any(|p| first == *p || p.ends_with('-') && first.starts_with(p));
            s == ".ci/run" || program && words.len() > 1
        })
        .collect()
}

/// Runs one README line with bash (bounded by `timeout`), in `cwd`, with `$B` and
/// `PATH` pointing at the test build and `envs` set; stdin is `stdin` or empty.
fn sh(cmd: &str, cwd: &Path, envs: &HashMap<String, String>, stdin: Option<&str>) -> Output {
    use std::io::Write;
    let path = format!(
        "{}:{}",
        bin_dir().display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut c = Command::new("timeout");
    c.args(["120", "bash", "-c", cmd])
        .current_dir(cwd)
        .env("B", bin_dir())
        .env("PATH", path)
        .env_remove("RUST_LOG")
        .env_remove("CAPKV_TOKEN")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("spawn bash");
    let mut input = child.stdin.take().expect("stdin");
    input
        .write_all(stdin.unwrap_or("").as_bytes())
        .expect("write stdin");
    drop(input);
    child.wait_with_output().expect("wait for bash")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs `cmd` and asserts it exits 0; returns stdout.
fn ok(cmd: &str, cwd: &Path, envs: &HashMap<String, String>) -> String {
    let out = sh(cmd, cwd, envs, None);
    assert!(
        out.status.success(),
        "README command failed: {cmd}\nstatus {:?}\nstdout: {}\nstderr: {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    text(&out.stdout)
}

/// A memory-engine (or RocksDB) kv-server on port 0 for one block.
fn server(args: &[&str], envs: &[(&str, &str)]) -> (common::Proc, String) {
    let mut all = vec![
        "--listen",
        "127.0.0.1:0",
        "--log-level",
        "warn,capkv_server=info",
    ];
    all.extend_from_slice(args);
    let (proc, addr, _logs) = common::spawn_kv_server(&all, envs);
    (proc, addr)
}

fn block_with(marker: &str) -> Vec<Line> {
    blocks()
        .into_iter()
        .find(|b| b.iter().any(|l| l.cmd.contains(marker)))
        .unwrap_or_else(|| panic!("README.md has no sh block with `{marker}`"))
}

/// The markers that identify each block this test knows; every block must have one.
const BLOCK_MARKERS: &[&str] = &[
    "bash scripts/run.sh",
    "kv-client health",
    "--idempotency-key",
    "kv-client watch",
    "lease grant",
    "admin faults set",
    "kv-loadgen run",
];

/// Inline commands not run by `inline_commands_run`, with the file that runs them and a
/// fragment that file must contain.
const INLINE_ELSEWHERE: &[(&str, &str, &str)] = &[
    (
        "CAPKV_ADDR=127.0.0.1:7070 bash scripts/smoke.sh /var/tmp/capkv-target/release",
        "scripts/test.sh",
        "CAPKV_ADDR=\"$addr\" bash scripts/smoke.sh",
    ),
    (
        "kv-client --otlp-endpoint URL",
        "server/tests/traces.rs",
        "\"--otlp-endpoint\"",
    ),
    (
        "kv-server --metrics-listen 127.0.0.1:9464",
        "server/tests/monitoring.rs",
        "spawn_kv_server_with_metrics(",
    ),
    (
        "promtool test rules",
        "scripts/test.sh",
        "promtool test rules",
    ),
    (".ci/run", ".ci/run", "scripts/test.sh"),
    (
        "kv-client watch",
        "client/tests/cli.rs",
        "&[\"watch\", \"--prefix\"",
    ),
    // bench/etcd.sh runs it; CI runs bench/etcd.sh (scripts/test.sh).
    (
        "kv-loadgen --target etcd",
        "bench/etcd.sh",
        "run --target etcd --addr",
    ),
    // bench/run.sh runs it; CI runs bench/run.sh (checked in `loadgen_block_runs`).
    ("kv-loadgen matrix", "bench/run.sh", "/kv-loadgen\" matrix"),
    // CI runs the benchmark once, in criterion's test mode.
    (
        "cargo bench -p capkv-store --bench memory",
        "scripts/test.sh",
        "cargo test --locked -p capkv-store --bench memory",
    ),
    // bench/run.sh runs bench/versus.sh (in CI with BENCH_QUICK=1).
    (
        "kv-loadgen versus",
        "bench/versus.sh",
        "/kv-loadgen\" versus",
    ),
    (
        "kv-loadgen rpc-floor",
        "bench/run.sh",
        "/kv-loadgen\" rpc-floor",
    ),
    (
        "kv-loadgen rpc-floor --engine capnp-rpc --listen 127.0.0.1:0",
        "bench/run.sh",
        "/kv-loadgen\" rpc-floor --engine capnp-rpc --listen 127.0.0.1:0",
    ),
];

/// Inline commands `inline_commands_run` runs.
const INLINE_HERE: &[&str] = &[
    "kv-server --help",
    "kv-server --print-config",
    "bash scripts/dev-ca.sh DIR",
    "kv-server --tls-cert DIR/server.pem --tls-key DIR/server.key --tls-client-ca DIR/ca.pem",
    "kv-client --tls-ca DIR/ca.pem --tls-cert DIR/client.pem --tls-key DIR/client.key ...",
    "kv-client admin --admin-token T reload",
    "kv-client incr KEY [DELTA]",
    "git config core.hooksPath .githooks",
];

#[test]
fn every_readme_command_is_covered() {
    for block in blocks() {
        assert!(
            BLOCK_MARKERS
                .iter()
                .any(|m| block.iter().any(|l| l.cmd.contains(m))),
            "a README sh block is not run by server/tests/readme.rs: {block:?}"
        );
    }
    let inline = inline_commands();
    assert!(inline.len() >= 10, "inline commands found: {inline:?}");
    for cmd in &inline {
        let here = INLINE_HERE.contains(&cmd.as_str());
        let elsewhere = INLINE_ELSEWHERE.iter().find(|(c, _, _)| c == cmd);
        assert!(
            here || elsewhere.is_some(),
            "README command `{cmd}` is not exercised: run it in server/tests/readme.rs \
             or name where it runs in INLINE_ELSEWHERE"
        );
        if let Some((_, file, fragment)) = elsewhere {
            assert!(
                read(file).contains(fragment),
                "`{cmd}` is said to run in {file}, which does not contain `{fragment}`"
            );
        }
    }
    // The lists hold nothing the README no longer has.
    for cmd in INLINE_HERE
        .iter()
        .chain(INLINE_ELSEWHERE.iter().map(|(c, _, _)| c))
    {
        assert!(
            inline.iter().any(|c| c == cmd),
            "`{cmd}` is no longer in README.md"
        );
    }
}

#[test]
fn setup_block_runs_in_ci() {
    let ci = read(".ci/run");
    let test_sh = read("scripts/test.sh");
    for line in block_with("bash scripts/run.sh") {
        match line.cmd.as_str() {
            "bash scripts/test.sh" => assert!(ci.contains("scripts/test.sh"), ".ci/run"),
            // Built in the debug profile there: CI never builds RocksDB twice.
            "bash scripts/run.sh" => assert!(
                test_sh.contains("CAPKV_PROFILE=debug bash scripts/run.sh"),
                "scripts/test.sh does not run scripts/run.sh"
            ),
            other => panic!("setup block line not covered: {other}"),
        }
    }
}

#[test]
fn calling_it_block_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = server(&["--engine", "memory"], &[]);
    std::fs::write(
        dir.path().join("photo.jpg"),
        b"\xff\xd8\xff\xe0 not really a jpeg",
    )
    .unwrap();
    let envs = HashMap::from([("CAPKV_ADDR".to_string(), addr)]);
    // Lines whose comment is their exact output.
    let outputs = [
        "$B/kv-client health",
        "$B/kv-client put greeting \"hello world\"",
        "$B/kv-client get greeting",
        "$B/kv-client --json get greeting",
    ];
    let mut ran = 0;
    for line in block_with("kv-client health") {
        if line.cmd.starts_with("B=") {
            continue; // $B is the test build's bin dir
        }
        let stdout = if line.cmd == "$B/kv-client" {
            // The interactive shell needs a terminal: give it one with script(1). It
            // flushes typed-ahead input when it reads a line, so it gets one line, then
            // end of input (client/tests has the full shell session, with rexpect).
            let out = sh(
                "script -qec \"$B/kv-client\" /dev/null",
                dir.path(),
                &envs,
                Some("help\n"),
            );
            assert!(out.status.success(), "shell: {out:?}");
            let stdout = text(&out.stdout);
            assert!(stdout.contains("capkv shell"), "shell banner: {stdout}");
            assert!(stdout.contains("scan"), "shell help: {stdout}");
            stdout
        } else {
            ok(&line.cmd, dir.path(), &envs)
        };
        if outputs.contains(&line.cmd.as_str()) {
            assert_eq!(stdout.trim_end(), line.comment, "{}", line.cmd);
        }
        ran += 1;
    }
    assert!(ran >= 14, "ran {ran} lines");
    // The line-mode example wrote `a`, the file example wrote the file's bytes.
    let a = ok("$B/kv-client get a", dir.path(), &envs);
    assert_eq!(a.trim_end(), "1");
    let k3 = ok("$B/kv-client get k3", dir.path(), &envs);
    assert!(k3.contains("not really a jpeg"), "{k3}");
}

/// The watch block: every line's comment is its exact output, on a fresh server.
#[test]
fn watch_block_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = server(&["--engine", "memory"], &[]);
    let envs = HashMap::from([("CAPKV_ADDR".to_string(), addr)]);
    let mut ran = 0;
    for line in block_with("kv-client watch") {
        if line.cmd.starts_with("B=") {
            continue;
        }
        let stdout = ok(&line.cmd, dir.path(), &envs);
        assert_eq!(stdout.trim_end(), line.comment, "{}", line.cmd);
        ran += 1;
    }
    assert_eq!(ran, 4);
}

/// The lease block, in order, with the granted id in `$ID` as the shell would have it.
#[test]
fn lease_block_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = server(&["--engine", "memory"], &[]);
    let mut envs = HashMap::from([("CAPKV_ADDR".to_string(), addr)]);
    let mut ran = 0;
    for line in block_with("lease grant") {
        if line.cmd.starts_with("B=") {
            continue;
        }
        if let Some(inner) = line.cmd.strip_prefix("ID=$(") {
            let id = ok(inner.trim_end_matches(')'), dir.path(), &envs);
            assert!(u64::from_str_radix(id.trim(), 16).is_ok(), "{id}");
            envs.insert("ID".to_string(), id.trim().to_string());
            ran += 1;
            continue;
        }
        let out = ok(&line.cmd, dir.path(), &envs);
        let id = &envs["ID"];
        let example = "694d7f2a1b3c4d5e";
        let shown = line.comment.replace(example, id);
        match line.cmd.split_whitespace().nth(1) {
            Some("put") if line.cmd.contains("--lease") => assert_eq!(out.trim_end(), shown),
            Some("put") => assert!(out.starts_with("OK version=1 revision=3 lease="), "{out}"),
            Some("lease") if line.cmd.contains(" ttl ") => {
                assert!(out.starts_with(&format!("lease {id} alive: ")), "{out}");
                assert!(out.trim_end().ends_with("of 10000 ms, 1 keys"), "{out}");
            }
            Some("lease") if line.cmd.contains(" revoke ") => {
                assert_eq!(out.trim_end(), shown)
            }
            _ => assert!(out.contains("kept alive"), "{out}"),
        }
        ran += 1;
    }
    assert_eq!(ran, 6);
}

#[test]
fn idempotency_block_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = server(&["--engine", "memory"], &[]);
    let envs = HashMap::from([("CAPKV_ADDR".to_string(), addr)]);
    let block = block_with("--idempotency-key");
    let mut session = String::new();
    let mut key = String::new();
    for line in &block {
        let cmd = line.cmd.replace("ca16…", &session).replace("dda5…", &key);
        let stdout = ok(&cmd, dir.path(), &envs);
        if line.cmd.contains("--json incr") {
            let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("JSON");
            assert_eq!(v["value"], 5, "{stdout}");
            session = v["session"].as_str().expect("session").to_string();
            key = v["idempotency_key"].as_str().expect("key").to_string();
            assert!(
                line.comment.starts_with("{\"value\":5,"),
                "{}",
                line.comment
            );
        } else if line.cmd.contains("--idempotency-key") {
            assert!(!session.is_empty() && !key.is_empty(), "replay before incr");
            assert_eq!(stdout.trim(), "5", "the replay wrote again");
        }
    }
    let hits = ok("kv-client get hits", dir.path(), &envs);
    assert_eq!(hits.trim(), "5", "one increment, however often replayed");
}

#[test]
fn admin_block_runs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let token = "readme-admin-token";
    let (_server, addr) = server(
        &["--engine", "rocksdb", "--data-dir", data],
        &[("CAPKV_ADMIN__TOKEN", token)],
    );
    let mut envs = HashMap::from([("CAPKV_ADDR".to_string(), addr)]);
    let backups = dir.path().join("srv");
    std::fs::create_dir(&backups).unwrap();
    let mut ran = Vec::new();
    for line in block_with("admin faults set") {
        if let Some(assign) = line.cmd.strip_prefix("export ") {
            let (name, value) = assign.split_once('=').expect("export NAME=value");
            assert_eq!(value, "...", "placeholder");
            envs.insert(name.to_string(), token.to_string());
            continue;
        }
        let cmd = line
            .cmd
            .replace("/srv/capkv/", &format!("{}/", backups.display()));
        let stdout = ok(&cmd, dir.path(), &envs);
        if cmd.contains("faults show") {
            assert!(stdout.contains("latency"), "armed rules: {stdout}");
        }
        ran.push(cmd);
    }
    assert_eq!(ran.len(), 6, "{ran:?}");
    assert!(
        backups.join("backup-1").join("CURRENT").exists(),
        "the checkpoint is a RocksDB directory"
    );
}

#[test]
fn loadgen_block_runs() {
    let dir = tempfile::tempdir().unwrap();
    let (server, addr) = server(&["--engine", "memory"], &[]);
    let (redis, redis_port) = common::spawn_on_free_port(
        |port| {
            let mut c = Command::new("redis-server");
            c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"]);
            c
        },
        "Ready to accept connections",
    );
    let envs = HashMap::new();
    let mut ran = 0;
    for line in block_with("kv-loadgen run") {
        if line.cmd.starts_with("B=") {
            continue;
        }
        if line.cmd == "bash bench/run.sh" {
            // It builds release binaries: CI runs it in a quick debug form.
            assert!(
                read("scripts/test.sh").contains("bash bench/run.sh"),
                "scripts/test.sh does not run bench/run.sh"
            );
            continue;
        }
        // Short runs on a small key space; the README's own duration is dropped.
        let mut words: Vec<&str> = line.cmd.split(' ').filter(|w| !w.is_empty()).collect();
        if let Some(i) = words.iter().position(|w| *w == "--duration") {
            words.drain(i..i + 2);
        }
        let mut cmd = words.join(" ").replace(
            "--addr 127.0.0.1:6379",
            &format!("--addr 127.0.0.1:{redis_port}"),
        );
        if !cmd.contains("--target redis") {
            cmd = format!("{cmd} --addr {addr}");
        }
        cmd.push_str(" --duration 300ms --warmup 0s --keys 1000");
        let stdout = ok(&cmd, dir.path(), &envs);
        assert!(stdout.contains("p99"), "{cmd}: a result table\n{stdout}");
        ran += 1;
    }
    assert_eq!(ran, 10);
    let csv = std::fs::read_to_string(dir.path().join("steps.csv")).expect("--csv file");
    assert!(csv.lines().count() >= 4, "{csv}");
    drop((server, redis));
}

#[test]
fn inline_commands_run() {
    let dir = tempfile::tempdir().unwrap();
    let envs = HashMap::new();
    let help = ok("kv-server --help", dir.path(), &envs);
    assert!(help.contains("--listen"), "{help}");
    let config = ok("kv-server --print-config", dir.path(), &envs);
    assert!(config.contains("listen"), "{config}");

    // Mutual TLS exactly as written, DIR being a temp dir and `...` a health call.
    let ca = dir.path().join("ca");
    let ca_dir = ca.to_str().unwrap();
    let dirify = |c: &str| c.replace("DIR", ca_dir);
    ok(&dirify(INLINE_HERE[2]), &repo(), &envs);
    let server_cmd = dirify(INLINE_HERE[3]);
    let args: Vec<&str> = server_cmd.split(' ').skip(1).collect();
    let mut all = vec!["--engine", "memory"];
    all.extend(args);
    let (_tls_server, addr) = server(&all, &[]);
    let client = dirify(INLINE_HERE[4]).replace("...", &format!("--addr {addr} health"));
    let health = ok(&client, dir.path(), &envs);
    assert!(health.contains("ready=true"), "{health}");

    // Admin reload and incr against a plain server.
    let (_server, addr) = server(
        &["--engine", "memory"],
        &[("CAPKV_ADMIN__TOKEN", "T"), ("CAPKV_ADDR", "")],
    );
    let envs = HashMap::from([("CAPKV_ADDR".to_string(), addr)]);
    ok(INLINE_HERE[5], dir.path(), &envs);
    let incr = INLINE_HERE[6].replace("KEY [DELTA]", "n 7");
    assert_eq!(ok(&incr, dir.path(), &envs).trim(), "7");
    let incr = INLINE_HERE[6].replace(" [DELTA]", "").replace("KEY", "n");
    assert_eq!(ok(&incr, dir.path(), &envs).trim(), "8");

    // The hooks path, set in a clone's worth of repository: the hook must be there.
    let clone = dir.path().join("clone");
    std::fs::create_dir(&clone).unwrap();
    ok("git init -q", &clone, &envs);
    ok(INLINE_HERE[7], &clone, &envs);
    let hook = repo().join(".githooks/pre-commit");
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&hook).unwrap().permissions());
    assert!(mode & 0o111 != 0, "{} is not executable", hook.display());
    let set = ok("git config core.hooksPath", &clone, &envs);
    assert_eq!(set.trim(), ".githooks");
}

/// The README's `python` blocks, each as its lines.
fn python_blocks() -> Vec<String> {
    let text = read("README.md");
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for raw in text.lines() {
        match (&mut current, raw.trim_end()) {
            (None, "```python") => current = Some(String::new()),
            (Some(_), "```") => blocks.extend(current.take()),
            (Some(body), l) => {
                body.push_str(l);
                body.push('\n');
            }
            _ => {}
        }
    }
    blocks
}

/// "Calling capkv from Python": the block runs with the pycapnp venv scripts/setup.sh
/// makes, from the repository's root, against a server with the token it names; each
/// `print(...)  # output` line's comment is the line it must print.
#[test]
fn python_block_runs() {
    let blocks = python_blocks();
    assert_eq!(blocks.len(), 1, "README.md has one python block");
    let block = &blocks[0];
    let expected: Vec<&str> = block
        .lines()
        .filter(|l| l.trim_start().starts_with("print("))
        .filter_map(|l| l.split_once("  # ").map(|(_, c)| c.trim()))
        .collect();
    assert!(
        expected.len() >= 3,
        "print lines show their output: {expected:?}"
    );
    let python = std::env::var("CAPKV_PYCAPNP_PYTHON")
        .unwrap_or_else(|_| "/var/tmp/capkv-tools/pycapnp-venv/bin/python".to_string());
    assert!(
        Path::new(&python).exists(),
        "{python} not found: run `source scripts/setup.sh` (it installs pycapnp)"
    );
    let (_server, addr) = server(&["--engine", "memory"], &[("CAPKV_AUTH__TOKEN", "s3cret")]);
    let port = addr.rsplit(':').next().expect("host:port");
    assert!(
        block.contains("port=7070"),
        "the example connects to port 7070"
    );
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("example.py");
    std::fs::write(&script, block.replace("port=7070", &format!("port={port}"))).unwrap();
    let out = Command::new("timeout")
        .args(["120", &python])
        .arg(&script)
        .current_dir(repo())
        .output()
        .expect("run python");
    assert!(
        out.status.success(),
        "the README's Python example failed:\n{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    let printed = text(&out.stdout);
    assert_eq!(printed.lines().collect::<Vec<_>>(), expected);
}
