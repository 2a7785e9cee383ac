//! Many connections racing put/get/delete on a few keys across all workers: no panic, no
//! error, and every value ever read is one that some write wrote; every final value is one
//! that an acknowledged write wrote.

mod common;

use std::collections::{HashMap, HashSet};

use common::*;

const CLIENTS: usize = 16;
const OPS_PER_CLIENT: usize = 300;
const KEYS: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_clients_only_see_written_values() {
    let mut config = test_config();
    config.workers = 4;
    let server = start(config);
    let addr = server.addr();
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        tasks.push(tokio::spawn(async move {
            let client = client(addr).await;
            let mut acked: Vec<(usize, String)> = Vec::new();
            let mut read: Vec<(usize, String, u64)> = Vec::new();
            for i in 0..OPS_PER_CLIENT {
                let k = (i * 7 + c) % KEYS;
                let key = format!("key{k}");
                match i % 5 {
                    0..=2 => {
                        let value = format!("c{c}-op{i}");
                        let out = client.put(key.as_bytes(), value.as_bytes()).await.unwrap();
                        assert!(out.version >= 1 && out.revision >= 1);
                        acked.push((k, value));
                    }
                    3 => {
                        if let Some(e) = client.get(key.as_bytes()).await.unwrap() {
                            read.push((k, String::from_utf8(e.value).unwrap(), e.version));
                        }
                    }
                    _ => {
                        client.delete(key.as_bytes()).await.unwrap();
                    }
                }
            }
            (acked, read)
        }));
    }
    let mut acked: HashMap<usize, HashSet<String>> = HashMap::new();
    let mut reads = Vec::new();
    for t in tasks {
        let (a, r) = t.await.expect("client task panicked");
        for (k, v) in a {
            acked.entry(k).or_default().insert(v);
        }
        reads.extend(r);
    }
    // Every write was acknowledged by the end, so every value read must be in the set.
    for (k, v, version) in &reads {
        assert!(acked[k].contains(v), "read {v} under key{k}, never written");
        assert!(*version >= 1);
    }
    let c = client(addr).await;
    for k in 0..KEYS {
        if let Some(e) = c.get(format!("key{k}").as_bytes()).await.unwrap() {
            let v = String::from_utf8(e.value).unwrap();
            assert!(
                acked[&k].contains(&v),
                "final value {v} of key{k} was never acknowledged"
            );
        }
    }
    let health = c.health().await.unwrap();
    assert!(health.live && health.ready);
}
