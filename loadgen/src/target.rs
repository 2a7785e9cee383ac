//! The servers a run can drive, behind one small enum: capkv (through the client library's
//! [`LocalClient`], on the worker's own `LocalSet`), capkv without a client RPC runtime
//! ([`crate::raw`]), Redis (the `redis` crate) and Redis without a client library
//! ([`crate::raw_redis`], the raw capkv client's twin), and etcd (the `etcd-client` crate:
//! what capkv's etcd engine is measured against, gateway against etcd driven directly),
//! so all see the same schedule, keys and values.

use std::rc::Rc;
use std::str::FromStr;

use capkv_client::{CallSpec, ClientOptions, Condition, LocalClient};
use redis::AsyncCommands;
use tokio::time::Instant;

use crate::workload::OpKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetKind {
    Capkv,
    /// capkv's protocol hand-encoded, no RPC runtime (`crate::raw`).
    #[serde(rename = "capkv-raw")]
    CapkvRaw,
    Redis,
    /// Redis's protocol hand-encoded, no client library (`crate::raw_redis`).
    #[serde(rename = "redis-raw")]
    RedisRaw,
    /// etcd's KV API, the same calls capkv's etcd engine makes for a get and a put.
    Etcd,
}

impl FromStr for TargetKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "capkv" => Ok(TargetKind::Capkv),
            "capkv-raw" => Ok(TargetKind::CapkvRaw),
            "redis" => Ok(TargetKind::Redis),
            "redis-raw" => Ok(TargetKind::RedisRaw),
            "etcd" => Ok(TargetKind::Etcd),
            _ => Err(format!(
                "target must be capkv, capkv-raw, redis, redis-raw or etcd, not {s:?}"
            )),
        }
    }
}

impl TargetKind {
    pub fn name(self) -> &'static str {
        match self {
            TargetKind::Capkv => "capkv",
            TargetKind::CapkvRaw => "capkv-raw",
            TargetKind::Redis => "redis",
            TargetKind::RedisRaw => "redis-raw",
            TargetKind::Etcd => "etcd",
        }
    }

    /// The hand-encoded targets (one key per call; setup goes through the library twin).
    pub fn is_raw(self) -> bool {
        matches!(self, TargetKind::CapkvRaw | TargetKind::RedisRaw)
    }

    /// The library twin of a raw target (itself otherwise): what loads its keys.
    pub fn library(self) -> TargetKind {
        match self {
            TargetKind::CapkvRaw => TargetKind::Capkv,
            TargetKind::RedisRaw => TargetKind::Redis,
            other => other,
        }
    }
}

/// One connection to the target.
#[derive(Clone)]
pub enum Conn {
    /// With whether its writes carry idempotency keys (`RunConfig::idempotent`).
    Capkv(Rc<LocalClient>, bool),
    Raw(Rc<crate::raw::RawConn>),
    Redis(redis::aio::MultiplexedConnection),
    RedisRaw(Rc<crate::raw_redis::RawRedisConn>),
    Etcd(Box<etcd_client::KvClient>),
}

/// Why a call failed, as a stable short code (the capkv code names; `redis_error` and
/// `transport` for the rest).
pub type ErrorCode = &'static str;

impl Conn {
    /// Opens a connection (inside a `LocalSet`).
    pub async fn open(
        kind: TargetKind,
        addr: &str,
        options: &ClientOptions,
    ) -> anyhow::Result<Conn> {
        Ok(match kind {
            TargetKind::Capkv => Conn::Capkv(
                Rc::new(
                    LocalClient::connect(addr, options)
                        .await
                        .map_err(|e| anyhow::anyhow!("connect to capkv at {addr}: {e}"))?,
                ),
                options.idempotent_writes,
            ),
            TargetKind::CapkvRaw => Conn::Raw(
                crate::raw::RawConn::connect(addr, &options.token)
                    .await
                    .map_err(|e| anyhow::anyhow!("connect to capkv at {addr}: {e}"))?,
            ),
            TargetKind::Redis => {
                let client = redis::Client::open(format!("redis://{addr}/"))?;
                Conn::Redis(client.get_multiplexed_async_connection().await?)
            }
            TargetKind::RedisRaw => Conn::RedisRaw(
                crate::raw_redis::RawRedisConn::connect(addr)
                    .await
                    .map_err(|e| anyhow::anyhow!("connect to redis at {addr}: {e}"))?,
            ),
            TargetKind::Etcd => {
                let endpoints: Vec<&str> = addr.split(',').collect();
                let client = etcd_client::Client::connect(&endpoints, None)
                    .await
                    .map_err(|e| anyhow::anyhow!("connect to etcd at {addr}: {e}"))?;
                Conn::Etcd(Box::new(client.kv_client()))
            }
        })
    }

    /// One batch write of `items`, each key with its own value (putMany, MSET): the
    /// preload, whose data must vary from key to key as real data does (one value repeated
    /// under every key compresses away on disk, and a storage benchmark would measure
    /// nothing). The raw target has no batches: the caller loads it through the library.
    pub async fn put_many(
        &self,
        items: &[(Vec<u8>, &[u8])],
        deadline: Instant,
    ) -> Result<(), ErrorCode> {
        match self {
            Conn::Capkv(c, _) => {
                let items: Vec<_> = items
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_vec(), Condition::None))
                    .collect();
                c.put_many(&items, deadline)
                    .await
                    .map(drop)
                    .map_err(|e| capkv::code_name(e.code))
            }
            Conn::Raw(_) | Conn::RedisRaw(_) => Err("raw_mode_single_keys_only"),
            Conn::Etcd(c) => {
                let ops: Vec<etcd_client::TxnOp> = items
                    .iter()
                    .map(|(k, v)| etcd_client::TxnOp::put(k.clone(), v.to_vec(), None))
                    .collect();
                let txn = etcd_client::Txn::new().and_then(ops);
                c.clone().txn(txn).await.map(drop).map_err(etcd_error)
            }
            Conn::Redis(c) => {
                let pairs: Vec<(&[u8], &[u8])> =
                    items.iter().map(|(k, v)| (k.as_slice(), *v)).collect();
                c.clone().mset::<_, _, ()>(&pairs).await.map_err(|e| {
                    if e.is_io_error() {
                        "transport"
                    } else {
                        "redis_error"
                    }
                })
            }
        }
    }

    /// One call: a get or put of `keys` (a batch call when there is more than one).
    /// Reads of missing keys are successes, as in Redis.
    pub async fn call(
        &self,
        kind: OpKind,
        keys: &[Vec<u8>],
        value: &[u8],
        deadline: Instant,
    ) -> Result<(), ErrorCode> {
        self.call_timed(kind, keys, value, deadline).await.0
    }

    /// [`Conn::call`], with the call's wire latency where the target measures one (the
    /// raw client: from its write to the read of its reply, as redis-benchmark times).
    pub async fn call_timed(
        &self,
        kind: OpKind,
        keys: &[Vec<u8>],
        value: &[u8],
        deadline: Instant,
    ) -> (Result<(), ErrorCode>, Option<std::time::Duration>) {
        match self {
            Conn::Raw(c) => return c.call(kind, keys, value).await,
            Conn::RedisRaw(c) => return c.call(kind, keys, value).await,
            _ => {}
        }
        (self.call_untimed(kind, keys, value, deadline).await, None)
    }

    async fn call_untimed(
        &self,
        kind: OpKind,
        keys: &[Vec<u8>],
        value: &[u8],
        deadline: Instant,
    ) -> Result<(), ErrorCode> {
        match self {
            Conn::Capkv(c, keyed) => {
                // A fresh key per write, as `Client` makes one per logical write (made for
                // writes only: gets share the generator's core).
                let write = || CallSpec {
                    idempotency_key: keyed.then(rand::random),
                    ..CallSpec::from(deadline)
                };
                let r = match (kind, keys) {
                    (OpKind::Get, [k]) => c.get(k, deadline).await.map(drop),
                    (OpKind::Get, ks) => c.get_many(ks, deadline).await.map(drop),
                    (OpKind::Put, [k]) => c.put(k, value, Condition::None, write()).await.map(drop),
                    (OpKind::Put, ks) => {
                        let items: Vec<_> = ks
                            .iter()
                            .map(|k| (k.clone(), value.to_vec(), Condition::None))
                            .collect();
                        c.put_many(&items, write()).await.map(drop)
                    }
                };
                r.map_err(|e| capkv::code_name(e.code))
            }
            Conn::Raw(c) => c.call(kind, keys, value).await.0,
            Conn::RedisRaw(c) => c.call(kind, keys, value).await.0,
            Conn::Etcd(c) => {
                use etcd_client::{Txn, TxnOp};
                let mut c = c.clone();
                let r = match (kind, keys) {
                    (OpKind::Get, [k]) => c.get(k.clone(), None).await.map(drop),
                    (OpKind::Put, [k]) => c.put(k.clone(), value.to_vec(), None).await.map(drop),
                    (OpKind::Get, ks) => {
                        let ops: Vec<TxnOp> =
                            ks.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
                        c.txn(Txn::new().and_then(ops)).await.map(drop)
                    }
                    (OpKind::Put, ks) => {
                        let ops: Vec<TxnOp> = ks
                            .iter()
                            .map(|k| TxnOp::put(k.clone(), value.to_vec(), None))
                            .collect();
                        c.txn(Txn::new().and_then(ops)).await.map(drop)
                    }
                };
                r.map_err(etcd_error)
            }
            Conn::Redis(c) => {
                let mut c = c.clone();
                let r: redis::RedisResult<()> = match (kind, keys) {
                    (OpKind::Get, [k]) => c.get::<_, Option<Vec<u8>>>(k).await.map(drop),
                    (OpKind::Get, ks) => c.mget::<_, Vec<Option<Vec<u8>>>>(ks).await.map(drop),
                    (OpKind::Put, [k]) => c.set::<_, _, ()>(k, value).await,
                    (OpKind::Put, ks) => {
                        let pairs: Vec<(&[u8], &[u8])> =
                            ks.iter().map(|k| (k.as_slice(), value)).collect();
                        c.mset::<_, _, ()>(&pairs).await
                    }
                };
                r.map_err(|e| {
                    if e.is_io_error() {
                        "transport"
                    } else {
                        "redis_error"
                    }
                })
            }
        }
    }
}

/// An etcd failure as a short code: the connection's, or etcd's own answer.
fn etcd_error(e: etcd_client::Error) -> ErrorCode {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => "transport",
        _ => "etcd_error",
    }
}
