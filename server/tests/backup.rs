//! Backups: `Admin.checkpoint` writes a checkpoint (RocksDB's; memory-log's snapshot and
//! log) that a fresh server opens with every key (values, versions and the revision), while
//! the source keeps serving; bad directories and engines without files are refused clearly.

mod common;

use capkv::ErrorCode;
use capkv_server::config::{Engine, Secret};
use capkv_server::Config;

const ADMIN: &str = "backup-admin";

fn engine_config(engine: Engine, dir: &std::path::Path) -> Config {
    let mut c = common::test_config();
    c.engine = engine;
    c.data_dir = dir.to_path_buf();
    c.admin.token = Some(Secret::new(ADMIN));
    c
}

#[test]
fn a_checkpoint_restores_into_a_fresh_data_dir_with_every_key() {
    checkpoint_restores(Engine::Rocksdb);
}

#[test]
fn a_memory_log_checkpoint_restores_into_a_fresh_data_dir_with_every_key() {
    checkpoint_restores(Engine::MemoryLog);
}

fn checkpoint_restores(engine: Engine) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let backup = tmp.path().join("backup");
    let server = common::start(engine_config(engine, &data));
    let addr = server.addr();
    let backup_dir = backup.to_string_lossy().to_string();
    let written = common::local_result(async {
        let c = common::client(addr).await;
        let mut written = Vec::new();
        for i in 0..2_000u32 {
            let (k, v) = (format!("key{i:05}"), format!("value-{i}-{}", i * 7));
            c.put(k.as_bytes(), v.as_bytes()).await.unwrap();
            written.push((k, v));
        }
        // Some keys written twice: versions must survive too.
        for (k, v) in written.iter_mut().take(100) {
            *v = format!("{v}-again");
            c.put(k.as_bytes(), v.as_bytes()).await.unwrap();
        }
        c.delete(b"key01999").await.unwrap();
        written.pop();
        c.checkpoint(ADMIN, &backup_dir).await.expect("checkpoint");
        // The directory exists now: a second checkpoint there is refused.
        let e = c.checkpoint(ADMIN, &backup_dir).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        assert!(e.message.contains("already exists"), "{e}");
        assert_eq!(
            c.checkpoint("wrong", "/tmp/x").await.unwrap_err().code,
            ErrorCode::Unauthenticated
        );
        // Writes after the checkpoint are not in it.
        c.put(b"after-backup", b"x").await.unwrap();
        written
    });
    server.stop().unwrap();

    let restored = common::start(engine_config(engine, &backup));
    common::local_result(async {
        let c = common::client(restored.addr()).await;
        for (i, (k, v)) in written.iter().enumerate() {
            let e = c
                .get(k.as_bytes())
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{k} missing"));
            assert_eq!(e.value, v.as_bytes(), "{k}");
            assert_eq!(e.version, if i < 100 { 2 } else { 1 }, "{k}");
        }
        assert!(
            c.get(b"key01999").await.unwrap().is_none(),
            "the delete is in it"
        );
        assert!(
            c.get(b"after-backup").await.unwrap().is_none(),
            "later writes are not"
        );
    });
    eprintln!("{} keys restored from the checkpoint", written.len());
}

#[test]
fn the_memory_engine_has_nothing_to_checkpoint() {
    let server = common::start(common::admin_config(ADMIN));
    common::local_result(async {
        let c = common::client(server.addr()).await;
        let e = c.checkpoint(ADMIN, "/tmp/never-written").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        assert!(e.message.contains("memory"), "{e}");
    });
}
