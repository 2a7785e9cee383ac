//! The memory engine's own cost per operation, without the network or the RPC engine:
//! `cargo bench -p capkv-store --bench memory`.
//!
//! 100,000 keys of 100-byte values (bench/run.sh's key space, kv-loadgen's key format),
//! the server's default history; keys drawn at random so that the lookups miss the cache
//! as a server's do. A put overwrites a key with a value of the same size (the in-place
//! path every benchmark put takes); `put, keyed` also records an idempotency outcome, as
//! `Client` writes by default.

use capkv_store::write::{Attach, Put, WriteOp};
use capkv_store::{Condition, IdempotencyKey, MemoryStore, Store};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use rand::{Rng, SeedableRng};

const KEYS: u64 = 100_000;
const VALUE: [u8; 100] = [b'v'; 100];

fn key(i: u64) -> Vec<u8> {
    format!("key:{i:012}").into_bytes()
}

fn loaded() -> MemoryStore {
    let store = MemoryStore::new();
    for i in 0..KEYS {
        let stored = store.put(&key(i), &VALUE, Condition::None).now();
        assert!(matches!(stored, Ok(Ok(_))), "the preload's put {i} failed");
    }
    store
}

fn put(key: Vec<u8>) -> WriteOp {
    WriteOp::Put(Put {
        key,
        value: VALUE.to_vec(),
        cond: Condition::None,
        attach: Attach::None,
    })
}

fn memory(c: &mut Criterion) {
    let store = loaded();
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut value = Vec::new();
    c.bench_function("get", |b| {
        b.iter_batched(
            || key(rng.random_range(0..KEYS)),
            |k| store.get_into(&k, &mut value).map(|f| f.is_some()),
            BatchSize::SmallInput,
        )
    });
    c.bench_function("put", |b| {
        b.iter_batched(
            || put(key(rng.random_range(0..KEYS))),
            |op| matches!(store.write(op, None).now(), Ok(Ok(_))),
            BatchSize::SmallInput,
        )
    });
    let mut n = 0u64;
    c.bench_function("put, keyed", |b| {
        b.iter_batched(
            || {
                n += 1;
                let idem = IdempotencyKey {
                    session: vec![7; 16],
                    key: n.to_le_bytes().to_vec(),
                    expires_at_unix_ms: u64::MAX,
                };
                (put(key(rng.random_range(0..KEYS))), idem)
            },
            |(op, idem)| matches!(store.write(op, Some(idem)).now(), Ok(Ok(_))),
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, memory);
criterion_main!(benches);
