//! A full disk: writes are refused early with `storageFull`, nothing acknowledged is lost,
//! a restart on the full disk comes up and serves reads, and writes resume by themselves
//! once the filesystem has room again, with the reserve file restored.
//!
//! Runs kv-server (RocksDB) on a 24 MiB tmpfs the test mounts and fills it through
//! kv-client; mounting needs root (CI runs as root): elsewhere the test says so and passes
//! without checking anything.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use capkv::ErrorCode;
use capkv_client::{Client, ClientOptions, RetryPolicy};

const PATIENCE: Duration = Duration::from_secs(60);
const MIB: u64 = 1024 * 1024;
const VALUE_BYTES: usize = 200 * 1024;
const RESERVE_BYTES: u64 = 2 * MIB;

/// A tmpfs mounted on a temp dir, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (with the reason printed) where the test cannot mount one.
    fn mount(size_mib: u64) -> Option<Self> {
        let uid = Command::new("id").arg("-u").output().map(|o| o.stdout);
        if !uid.is_ok_and(|u| u.trim_ascii() == b"0") {
            eprintln!("SKIPPED: mounting a small tmpfs needs root (CI runs as root)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mib}m"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("SKIPPED: cannot mount a tmpfs here (a container without CAP_SYS_ADMIN?)");
            return None;
        }
        Some(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn grow(&self, size_mib: u64) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size_mib}m")])
            .arg(self.path())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remounting the tmpfs larger failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A kv-server on `data`; returns its process, RPC address, metrics address and logs.
fn start(
    data: &Path,
) -> (
    common::Proc,
    String,
    String,
    std::sync::mpsc::Receiver<String>,
) {
    let data = data.to_string_lossy();
    common::spawn_kv_server_with_metrics(
        &[
            "--engine",
            "rocksdb",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data,
            "--log-level",
            "warn,capkv_server=info,capkv_store=info",
        ],
        &[
            ("CAPKV_STORAGE__MIN_FREE_BYTES", &(4 * MIB).to_string()),
            ("CAPKV_STORAGE__RESERVE_BYTES", &RESERVE_BYTES.to_string()),
            ("CAPKV_STORAGE__SPACE_CHECK_INTERVAL_MS", "100"),
            ("CAPKV_STORAGE__STATS_INTERVAL_MS", "200"),
        ],
    )
}

async fn connect(addr: &str) -> Client {
    let options = ClientOptions {
        timeout: Duration::from_secs(10),
        retry: RetryPolicy::none(),
        ..ClientOptions::default()
    };
    Client::connect(addr, options).await.expect("connect")
}

/// The answer (status line, headers, body) to `GET path` on the metrics listener.
fn http_get(metrics: &str, path: &str) -> String {
    let Ok(mut s) = TcpStream::connect(metrics) else {
        return String::new();
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    r
}

fn readyz(metrics: &str) -> String {
    http_get(metrics, "/readyz")
}

/// Value `i`: incompressible bytes (a xorshift stream), so that RocksDB's compression
/// cannot give the space back on its own and the disk stays full across the restart.
fn value(i: u32) -> Vec<u8> {
    let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..VALUE_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn key(i: u32) -> Vec<u8> {
    format!("k{i:05}").into_bytes()
}

fn reserve(data: &Path) -> PathBuf {
    data.join(capkv_store_rocks::space::RESERVE_FILE)
}

#[test]
fn a_full_disk_refuses_writes_early_restarts_for_reads_and_recovers_by_itself() {
    let Some(fs) = Tmpfs::mount(24) else { return };
    let data = fs.path().join("data");
    let (mut server, addr, metrics, _logs) = start(&data);
    assert_eq!(
        std::fs::metadata(reserve(&data)).map(|m| m.len()).ok(),
        Some(RESERVE_BYTES),
        "the reserve is made at start"
    );

    // Fill the disk through kv-client until writes are refused. Bounded: 24 MiB holds
    // fewer than 120 values.
    let kv_client = common::kv_client_bin();
    // Off the small filesystem, so that it holds only what the server writes.
    let value_dir = tempfile::tempdir().unwrap();
    let value_file = value_dir.path().join("value.bin");
    let put = |i: u32| {
        std::fs::write(&value_file, value(i)).unwrap();
        let key = String::from_utf8(key(i)).unwrap();
        let out = Command::new(&kv_client)
            .args([
                "--addr",
                &addr,
                "--json",
                "--attempts",
                "1",
                "put",
                &key,
                "--file",
            ])
            .arg(&value_file)
            .output()
            .expect("run kv-client");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let mut acked = 0u32;
    let refused = loop {
        assert!(acked < 500, "the disk never filled");
        match put(acked) {
            (true, _) => acked += 1,
            (false, text) => break text,
        }
    };
    assert!(refused.contains("\"storage_full\""), "{refused}");
    assert!(refused.contains("retry_after_ms"), "{refused}");
    common::local_result(async {
        let c = connect(&addr).await;
        // Not applied; and every later write is refused alike, while reads and deletes go on.
        assert_eq!(c.get(&key(acked)).await.unwrap(), None);
        let again = c.put(b"other", b"small").await.unwrap_err();
        assert_eq!(again.code, ErrorCode::StorageFull);
        assert!(again.retry_after_ms > 0);
        assert!(c.get(&key(0)).await.unwrap().is_some());
        c.delete(b"absent").await.expect("deletes go on");
    });
    assert!(acked > 10, "only {acked} writes fit");
    assert!(
        !reserve(&data).exists(),
        "the reserve is released when space runs low"
    );
    assert!(
        readyz(&metrics).contains("503"),
        "readyz: {}",
        readyz(&metrics)
    );

    // SIGKILL, then a restart on the full disk: it comes up and serves every acknowledged
    // write; writes stay refused.
    server.kill().unwrap();
    server.wait().unwrap();
    drop(server);
    let (_server, addr, metrics, _logs) = start(&data);
    // Metrics say writes are refused for space (read-only when RocksDB could not recover).
    let until = Instant::now() + PATIENCE;
    let body = loop {
        let m = http_get(&metrics, "/metrics");
        if m.contains("capkv_store_space_low 1") {
            break m;
        }
        assert!(Instant::now() < until, "space_low never reported: {m}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let read_only = body.contains("capkv_store_read_only 1");
    eprintln!("restarted on the full disk; read-only: {read_only}");
    common::local_result(async {
        let c = connect(&addr).await;
        for i in 0..acked {
            let e = c.get(&key(i)).await.unwrap();
            assert_eq!(e.map(|e| e.value), Some(value(i)), "acknowledged write {i}");
        }
        let refused = c.put(b"more", b"x").await.unwrap_err();
        assert_eq!(refused.code, ErrorCode::StorageFull);
    });
    let ready = readyz(&metrics);
    assert!(
        ready.contains("503") && ready.contains("reads are served"),
        "{ready}"
    );

    // The filesystem grows: writes resume without a restart, and the reserve comes back.
    // By enough for RocksDB's next WAL file, which it preallocates (~1.1 x its 64 MiB
    // write buffer) when it reopens read-write.
    fs.grow(192);
    common::local_result(async {
        let c = connect(&addr).await;
        let until = Instant::now() + PATIENCE;
        loop {
            match c.put(b"after", b"growth").await {
                Ok(_) => break,
                Err(e) => {
                    assert_eq!(e.code, ErrorCode::StorageFull, "{e:?}");
                    assert!(Instant::now() < until, "writes never resumed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
        assert_eq!(c.get(b"after").await.unwrap().unwrap().value, b"growth");
        for i in 0..acked {
            assert!(c.get(&key(i)).await.unwrap().is_some(), "write {i} kept");
        }
    });
    assert_eq!(
        std::fs::metadata(reserve(&data)).map(|m| m.len()).ok(),
        Some(RESERVE_BYTES),
        "the reserve is restored"
    );
    assert!(
        readyz(&metrics).contains("200"),
        "readyz: {}",
        readyz(&metrics)
    );
}
