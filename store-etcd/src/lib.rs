//! capkv's replicated engine: an etcd cluster behind [`capkv_store::Store`], so that any
//! number of kv-servers run as stateless gateways over one copy of the data.
//!
//! - [`EtcdStore`] (`engine.rs`): the mapping (docs/design-notes.md, "Gateways over
//!   etcd"): user keys under `<prefix>d/`, idempotency records under `<prefix>i/` in the
//!   same transaction as the write they record, expiring through an etcd lease shared by
//!   the records of one expiry bucket, the session-token secret at `<prefix>m/secret`
//!   (created once; its create revision is revision 0 of the store). Every write is read,
//!   evaluated here, then committed by one transaction that compares what was read (etcd's
//!   software transactional memory pattern), retried when another writer got in between;
//!   unconditional puts, keyed or not, and unconditional keyed deletes skip the read (one
//!   request each). Reads are futures on the engine's own runtime
//!   ([`capkv_store::Store::reads_complete_at_once`] is false), so the server never blocks
//!   a worker on the network.
//! - `feed.rs`: one etcd watch over the whole prefix, from the store's start, feeding the
//!   window of history watchers read ([`capkv_store::ring::Ring`]) and the published
//!   revision; a write answers once the feed has seen it, so a gateway's watchers and its
//!   `revision` never miss a write it acknowledged.
//! - [`cluster`]: a loopback etcd cluster from Debian's package, for tests and scripts.

pub mod cluster;
mod engine;
mod feed;

use std::path::PathBuf;
use std::time::Duration;

pub use engine::EtcdStore;

/// Where the cluster is and how capkv uses it.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Client URLs of the members (`http://host:2379`, or `https://` with [`tls`](Self::tls)).
    pub endpoints: Vec<String>,
    /// Prefix of every key capkv writes: several stores can share one cluster.
    pub prefix: Vec<u8>,
    /// etcd's own authentication (user, password), when the cluster has it enabled.
    pub user: Option<(String, String)>,
    pub tls: Option<EtcdTls>,
    /// Longest one request to etcd may take before the call fails as `unavailable`.
    pub request_timeout: Duration,
    pub connect_timeout: Duration,
    /// Events and bytes of keys and values of the watch history each gateway keeps.
    pub history_events: usize,
    pub history_bytes: usize,
    /// Revisions `Store::compact` keeps in etcd's history (it compacts the rest).
    pub compact_keep_revisions: u64,
    /// Idempotency records that expire within the same this-many seconds share one lease.
    pub record_lease_bucket_s: u64,
    /// The cluster's `--max-txn-ops`: a batch of N items takes N + 1 operations.
    pub max_txn_ops: usize,
    /// The cluster's `--max-request-bytes`.
    pub max_request_bytes: usize,
}

/// Mutual TLS to etcd: PEM files.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

impl EtcdOptions {
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: b"capkv/".to_vec(),
            user: None,
            tls: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            history_events: 100_000,
            history_bytes: 64 << 20,
            compact_keep_revisions: 100_000,
            record_lease_bucket_s: 60,
            max_txn_ops: 128,
            max_request_bytes: 1536 * 1024,
        }
    }

    /// Whether capkv's limits fit the cluster's: the largest batch (items plus its record)
    /// within `--max-txn-ops`, the largest put (key, value and its record) within
    /// `--max-request-bytes`. `Err` says which settings to change.
    pub fn check_limits(
        &self,
        max_batch_items: usize,
        max_key_bytes: usize,
        max_value_bytes: usize,
    ) -> Result<(), String> {
        if max_batch_items + 1 > self.max_txn_ops {
            return Err(format!(
                "limits.max_batch_items ({max_batch_items}) must be at most the cluster's \
                 --max-txn-ops minus 1 (storage.etcd.max_txn_ops = {}): a batch is one \
                 transaction with its idempotency record",
                self.max_txn_ops
            ));
        }
        // A put's request: key and value, the record (key twice over plus ~100 bytes),
        // the compares and framing: 4 KiB covers what is not the value.
        let need = max_value_bytes + 3 * max_key_bytes + 4096;
        if need > self.max_request_bytes {
            return Err(format!(
                "limits.max_value_bytes ({max_value_bytes}) with keys of {max_key_bytes} \
                 bytes needs requests of {need} bytes; the cluster's --max-request-bytes \
                 (storage.etcd.max_request_bytes) is {}",
                self.max_request_bytes
            ));
        }
        Ok(())
    }
}

/// Why the engine did not open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot start the etcd engine's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot read the TLS file {path}: {source}")]
    TlsFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot reach etcd at {endpoints}: {detail}")]
    Connect { endpoints: String, detail: String },
    #[error("etcd at {endpoints}: {detail}")]
    Etcd { endpoints: String, detail: String },
}
