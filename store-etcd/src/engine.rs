//! [`EtcdStore`]: the mapping of capkv's store onto etcd's.
//!
//! Revisions are etcd's, counted from the store's creation (the secret's create revision
//! is capkv's revision 0), so they increase with every write but are not dense: records
//! expiring with their lease, and other stores sharing the cluster, take revisions too.
//! Versions are etcd's per-key versions, which follow capkv's rule (1 after a key's first
//! put, reset by a delete).
//!
//! One write: read the keys it depends on (and its record) at one revision (first from
//! the nearest member, serializable); evaluate it here (condition, increment, versions);
//! commit one transaction whose compares say that nothing read has changed (`mod_revision`
//! equal, 0 for absent) and whose operations are the write and its record. A lost race (or
//! a stale read) is read through the leader and evaluated again, at most
//! [`WRITE_ATTEMPTS`] times. A put without a lease of its own needs no read: without a
//! record a plain put, or with a condition one transaction whose compare it is; with a
//! record and no condition one transaction whose compare is the record's absence
//! (`put_keyed`). A record's outcome is written without revisions, which are the record's
//! own `mod_revision` (it is written in the same transaction as the write); a keyed put's
//! also without its version, read back at that revision on replay.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use capkv_store::history::prefix_end;
use capkv_store::lease::LeaseInfo;
use capkv_store::ring::Ring;
use capkv_store::write::{self, now_unix_ms, recordable, Attach, Record};
use capkv_store::{
    BatchOutcome, Changes, Condition, DeleteOutcome, Entry, EventPage, IdempotencyKey, KeyRange,
    PageLimits, Pending, PutOutcome, ScanPage, ScanRequest, Store, StoreError, StoreStats, WriteOp,
    WriteOutcome,
};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, LeaseGrantOptions,
    LeaseTimeToLiveOptions, PutOptions, ResponseHeader, Txn, TxnOp, TxnOpResponse, TxnResponse,
};
use sha2::{Digest, Sha256};

use crate::{EtcdOptions, OpenError};

/// How a read sees etcd: through the leader (etcd's default: it sees every write
/// acknowledged before it), or as one member has applied so far (no round to the leader).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consistency {
    Linearizable,
    Serializable,
}

/// The version a put's record holds when the put wrote it in its own transaction, before
/// etcd told the version (see `put_keyed`): never a key's version, which starts at 1.
const VERSION_UNRECORDED: u64 = 0;

/// Times a write is read, evaluated and committed before it gives up as `busy` (each
/// retry means another writer changed a key it read in between).
const WRITE_ATTEMPTS: usize = 64;
/// Longest a record's lease lives, however far its expiry: etcd's leases are meant for
/// seconds to days. A record kept longer than this is forgotten early.
const MAX_RECORD_LEASE_S: u64 = 90 * 24 * 3600;

/// capkv's store on an etcd cluster. Cheap to share; dropping it stops its runtime.
pub struct EtcdStore {
    inner: Arc<Inner>,
    handle: tokio::runtime::Handle,
    runtime: Option<tokio::runtime::Runtime>,
}

pub(crate) struct Inner {
    client: Client,
    pub(crate) keys: Keys,
    /// The etcd revision that is capkv's revision 0.
    pub(crate) epoch: i64,
    secret: [u8; 32],
    pub(crate) history: Mutex<History>,
    pub(crate) changes: Changes,
    /// Writes waiting for the feed to apply their revision, by that revision (capkv's):
    /// each woken once, by the feed's pass that applies it (not every waiter at every
    /// revision, as [`Changes`] wakes its watchers: at 50 writes in flight that was most
    /// of the engine thread's time).
    pub(crate) waiters: Mutex<BTreeMap<u64, Vec<tokio::sync::oneshot::Sender<()>>>>,
    pub(crate) request_timeout: Duration,
    compact_keep_revisions: u64,
    record_lease_bucket_ms: u64,
    /// Record leases by the end of their bucket (Unix ms).
    record_leases: Mutex<BTreeMap<u64, i64>>,
    commits: AtomicU64,
    replays: AtomicU64,
}

/// The window of history a gateway keeps, and how far it has read etcd's.
pub(crate) struct History {
    pub(crate) ring: Ring,
    /// capkv revision the feed has applied through.
    pub(crate) applied: u64,
}

/// Where capkv's kinds of keys live in etcd's keyspace.
pub(crate) struct Keys {
    /// Everything of this store (the feed watches it whole).
    pub(crate) root: Vec<u8>,
    data: Vec<u8>,
    data_end: Vec<u8>,
    records: Vec<u8>,
    secret: Vec<u8>,
}

impl Keys {
    fn new(prefix: &[u8]) -> Self {
        let with = |s: &[u8]| [prefix, s].concat();
        let data = with(b"d/");
        Self {
            root: prefix.to_vec(),
            // `data` ends in '/': it has an end.
            data_end: prefix_end(&data).unwrap_or_default(),
            data,
            records: with(b"i/"),
            secret: with(b"m/secret"),
        }
    }

    fn data(&self, key: &[u8]) -> Vec<u8> {
        [&self.data, key].concat()
    }

    /// The user key of an etcd key, when it is one.
    pub(crate) fn user<'a>(&self, key: &'a [u8]) -> Option<&'a [u8]> {
        key.strip_prefix(self.data.as_slice())
    }

    fn record(&self, record_key: &[u8]) -> Vec<u8> {
        [&self.records, record_key].concat()
    }
}

impl EtcdStore {
    /// Connects, creates the store's secret if this is the store's first start, and
    /// starts the history feed; returns once the feed has caught up with etcd.
    pub fn open(opts: EtcdOptions) -> Result<Self, OpenError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-io")
            .enable_all()
            .build()
            .map_err(OpenError::Runtime)?;
        let handle = runtime.handle().clone();
        // Opened on the engine's runtime and waited for here: `open` may be called from
        // inside another runtime, where `block_on` would panic.
        let (tx, rx) = std::sync::mpsc::channel();
        handle.spawn(async move {
            let _ = tx.send(Inner::open(opts).await);
        });
        let inner = rx.recv().map_err(|_| OpenError::Etcd {
            endpoints: String::new(),
            detail: "the engine's runtime stopped while opening".into(),
        })??;
        Ok(Self {
            inner,
            handle,
            runtime: Some(runtime),
        })
    }

    /// Runs `f` on the engine's runtime; its outcome as a [`Pending`].
    fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce(Arc<Inner>) -> Fut<T> + Send + 'static,
    ) -> Pending<T> {
        let (done, pending) = Pending::channel();
        let inner = Arc::clone(&self.inner);
        self.handle
            .spawn(async move { done.complete(f(inner).await) });
        pending
    }
}

type Fut<T> = std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send>>;

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Without waiting: dropping a runtime inside another one (a server's) panics.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl Inner {
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }

    async fn open(opts: EtcdOptions) -> Result<Arc<Self>, OpenError> {
        let endpoints = opts.endpoints.join(",");
        let etcd = |detail: String| OpenError::Etcd {
            endpoints: endpoints.clone(),
            detail,
        };
        let mut connect = ConnectOptions::new()
            .with_connect_timeout(opts.connect_timeout)
            .with_timeout(opts.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some((user, password)) = &opts.user {
            connect = connect.with_user(user.clone(), password.clone());
        }
        if let Some(tls) = &opts.tls {
            let read = |path: &std::path::PathBuf| {
                std::fs::read(path).map_err(|source| OpenError::TlsFile {
                    path: path.clone(),
                    source,
                })
            };
            let mut config = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(read(&tls.ca)?));
            if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
                config = config.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            }
            connect = connect.with_tls(config);
        }
        let client = tokio::time::timeout(
            opts.connect_timeout,
            Client::connect(&opts.endpoints, Some(connect)),
        )
        .await
        .map_err(|_| OpenError::Connect {
            endpoints: endpoints.clone(),
            detail: format!("no answer within {:?}", opts.connect_timeout),
        })?
        .map_err(|e| OpenError::Connect {
            endpoints: endpoints.clone(),
            detail: e.to_string(),
        })?;
        let keys = Keys::new(&opts.prefix);

        // The secret, created by the store's first start; its create revision is the
        // store's revision 0, the same for every gateway.
        let fresh: [u8; 32] = rand::random();
        let txn = Txn::new()
            .when([Compare::create_revision(
                keys.secret.clone(),
                CompareOp::Equal,
                0,
            )])
            .and_then([TxnOp::put(keys.secret.clone(), fresh.to_vec(), None)])
            .or_else([TxnOp::get(keys.secret.clone(), None)]);
        let mut kv = client.kv_client();
        let resp = tokio::time::timeout(opts.request_timeout, kv.txn(txn))
            .await
            .map_err(|_| etcd("no answer to the store's first read".into()))?
            .map_err(|e| etcd(e.to_string()))?;
        let head = header_revision(resp.header()).map_err(|e| etcd(e.to_string()))?;
        let (epoch, secret) = if resp.succeeded() {
            (head, fresh)
        } else {
            let kv = single_get(&resp).map_err(|e| etcd(e.to_string()))?;
            let kv = kv.ok_or_else(|| etcd("the store's secret vanished while read".into()))?;
            let secret = <[u8; 32]>::try_from(kv.value())
                .map_err(|_| etcd("the store's secret is not 32 bytes".into()))?;
            (kv.create_revision(), secret)
        };

        // History from the store's start, or the last `history_events` revisions of it.
        let window = i64::try_from(opts.history_events).unwrap_or(i64::MAX);
        let next = (epoch + 1).max(head + 1 - window);
        let mut ring = Ring::new(opts.history_events, opts.history_bytes);
        let start = to_capkv(next - 1, epoch);
        ring.forget_through(start);
        let inner = Arc::new(Inner {
            client,
            keys,
            epoch,
            secret,
            history: Mutex::new(History {
                ring,
                applied: start,
            }),
            changes: Changes::new(start),
            waiters: Mutex::new(BTreeMap::new()),
            request_timeout: opts.request_timeout,
            compact_keep_revisions: opts.compact_keep_revisions,
            record_lease_bucket_ms: opts.record_lease_bucket_s.max(1) * 1000,
            record_leases: Mutex::new(BTreeMap::new()),
            commits: AtomicU64::new(0),
            replays: AtomicU64::new(0),
        });
        tokio::spawn(crate::feed::run(Arc::clone(&inner), next));
        let head = to_capkv(head, epoch);
        if head > start
            && tokio::time::timeout(opts.request_timeout, inner.changes.wait_past(head - 1))
                .await
                .is_err()
        {
            return Err(etcd(format!(
                "the history feed did not reach revision {head} within {:?}",
                opts.request_timeout
            )));
        }
        Ok(inner)
    }

    /// One request to etcd within the request timeout.
    async fn timed<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.request_timeout, f).await {
            Ok(r) => r.map_err(etcd_error),
            Err(_) => Err(self.unanswered(what)),
        }
    }

    /// `what` got no answer within the request timeout.
    fn unanswered(&self, what: &str) -> StoreError {
        StoreError::Unavailable(format!(
            "etcd did not answer {what} within {:?}",
            self.request_timeout
        ))
    }

    /// [`Inner::timed`], made again when it failed without reaching etcd (its connection
    /// could not be made: see [`not_sent`]), at most [`ATTEMPTS_NOT_SENT`] times in all and
    /// within the one request timeout: nothing was applied, so the request is safe to make
    /// again, and the channel meanwhile connects or turns to another member. Seen in a
    /// burst of 100 concurrent writes on a loaded machine: a fifth failed `unavailable`.
    async fn timed_again<T, F, R>(&self, what: &str, mut request: F) -> Result<T, StoreError>
    where
        F: FnMut() -> R,
        R: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut pause = NOT_SENT_FIRST_PAUSE;
        for attempt in 1..=ATTEMPTS_NOT_SENT {
            match tokio::time::timeout_at(deadline, request()).await {
                Ok(Err(e)) if attempt < ATTEMPTS_NOT_SENT && not_sent(&e) => {
                    tracing::debug!(error = %e, attempt, what, "etcd request not sent; again");
                    tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + pause))
                        .await;
                    pause *= 4;
                }
                Ok(r) => return r.map_err(etcd_error),
                Err(_) => break,
            }
        }
        Err(self.unanswered(what))
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.timed_again("a transaction", || {
            let (mut kv, txn) = (self.client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
    }

    fn entry(&self, kv: &KeyValue, keys_only: bool) -> Option<Entry> {
        Some(Entry {
            key: self.keys.user(kv.key())?.to_vec(),
            value: if keys_only {
                Vec::new()
            } else {
                kv.value().to_vec()
            },
            version: version_of(kv),
            mod_revision: to_capkv(kv.mod_revision(), self.epoch),
        })
    }

    // ---- reads ----

    async fn get(&self, key: Vec<u8>) -> Result<Option<Entry>, StoreError> {
        let key = self.keys.data(&key);
        let resp = self
            .timed_again("a get", || {
                let (mut kv, key) = (self.client.kv_client(), key.clone());
                async move { kv.get(key, None).await }
            })
            .await?;
        Ok(resp.kvs().first().and_then(|kv| self.entry(kv, false)))
    }

    async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| self.keys.data(k)).collect();
        let (revision, kvs) = self.read(&keys, Consistency::Linearizable).await?;
        let entries = kvs
            .iter()
            .map(|kv| kv.as_ref().and_then(|kv| self.entry(kv, false)))
            .collect();
        Ok((entries, to_capkv(revision, self.epoch)))
    }

    async fn scan(&self, req: ScanRequest) -> Result<ScanPage, StoreError> {
        let end = match &req.end {
            Some(end) => self.keys.data(end),
            None => self.keys.data_end.clone(),
        };
        let limit = i64::try_from(req.limit.max(1)).unwrap_or(i64::MAX);
        let mut opts = GetOptions::new().with_range(end).with_limit(limit);
        // A later page of a scan reads where its first page did.
        let pinned = req.revision;
        if let Some(r) = pinned {
            let at = self
                .epoch
                .saturating_add(i64::try_from(r).unwrap_or(i64::MAX));
            opts = opts.with_revision(at);
        }
        if req.keys_only {
            opts = opts.with_keys_only();
        }
        let start = self.keys.data(&req.start);
        let resp = self
            .timed_again("a scan", || {
                let (mut kv, start, opts) = (self.client.kv_client(), start.clone(), opts.clone());
                async move { kv.get(start, Some(opts)).await }
            })
            .await?;
        let revision = header_revision(resp.header())?;
        let mut page = ScanPage {
            entries: Vec::new(),
            more: resp.more(),
            revision: pinned.unwrap_or_else(|| to_capkv(revision, self.epoch)),
        };
        let mut bytes = 0usize;
        let kvs = resp.kvs();
        for (i, kv) in kvs.iter().enumerate() {
            let Some(e) = self.entry(kv, req.keys_only) else {
                continue;
            };
            bytes += e.key.len() + e.value.len();
            page.entries.push(e);
            if bytes >= req.max_bytes && i + 1 < kvs.len() {
                page.more = true;
                break;
            }
        }
        Ok(page)
    }

    /// `keys` (etcd keys) at one revision: the revision and each key's entry.
    async fn read(
        &self,
        keys: &[Vec<u8>],
        consistency: Consistency,
    ) -> Result<(i64, Vec<Option<KeyValue>>), StoreError> {
        let opts = match consistency {
            Consistency::Linearizable => None,
            Consistency::Serializable => Some(GetOptions::new().with_serializable()),
        };
        let ops: Vec<TxnOp> = keys
            .iter()
            .map(|k| TxnOp::get(k.clone(), opts.clone()))
            .collect();
        let resp = self.txn(Txn::new().and_then(ops)).await?;
        let revision = header_revision(resp.header())?;
        let kvs = resp
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(mut g) => Ok(g.take_kvs().into_iter().next()),
                _ => Err(StoreError::Internal(
                    "etcd answered a get with another kind of response".into(),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if kvs.len() != keys.len() {
            return Err(StoreError::Internal(
                "etcd answered a different number of gets".into(),
            ));
        }
        Ok((revision, kvs))
    }

    // ---- leases ----

    /// The lease's TTL, time left and keys (user keys), or `None` when it does not exist.
    async fn lease(&self, id: u64) -> Result<Option<(LeaseInfo, Vec<Vec<u8>>)>, StoreError> {
        let Ok(lease) = i64::try_from(id) else {
            return Ok(None);
        };
        let mut leases = self.client.lease_client();
        let resp = self
            .timed(
                "a lease lookup",
                leases.time_to_live(lease, Some(LeaseTimeToLiveOptions::new().with_keys())),
            )
            .await?;
        if resp.ttl() < 0 {
            return Ok(None);
        }
        let mut keys: Vec<Vec<u8>> = resp
            .keys()
            .iter()
            .filter(|k| self.keys.user(k).is_some())
            .cloned()
            .collect();
        // etcd lists them in no set order; a revoke deletes them in key order, as the
        // local engines do (its events within the revision follow it).
        keys.sort_unstable();
        let info = LeaseInfo {
            id,
            ttl_ms: secs_to_ms(resp.granted_ttl()),
            remaining_ms: secs_to_ms(resp.ttl()),
            keys: keys.len() as u64,
        };
        Ok(Some((info, keys)))
    }

    async fn lease_info(&self, id: u64) -> Result<LeaseInfo, StoreError> {
        self.lease(id)
            .await?
            .map(|(info, _)| info)
            .ok_or(StoreError::LeaseNotFound { id })
    }

    async fn lease_keep_alive(&self, id: u64) -> Result<LeaseInfo, StoreError> {
        let lease = i64::try_from(id).map_err(|_| StoreError::LeaseNotFound { id })?;
        let mut leases = self.client.lease_client();
        let (mut keeper, mut answers) =
            self.timed("a keep-alive", leases.keep_alive(lease)).await?;
        self.timed("a keep-alive", keeper.keep_alive()).await?;
        match self.timed("a keep-alive", answers.message()).await? {
            Some(a) if a.ttl() > 0 => self.lease_info(id).await,
            _ => Err(StoreError::LeaseNotFound { id }),
        }
    }

    /// Grants a lease of `ttl_ms` (whole seconds, at least etcd's minimum). `id`: the id
    /// to grant it under (a keyed write's, the same on every retry of it), or etcd's choice.
    async fn grant(&self, ttl_ms: u64, id: Option<i64>) -> Result<(i64, u64), StoreError> {
        let ttl_s = i64::try_from(ttl_ms.div_ceil(1000).max(1)).unwrap_or(i64::MAX);
        let mut leases = self.client.lease_client();
        let opts = id.map(|id| LeaseGrantOptions::new().with_id(id));
        match leases.grant(ttl_s, opts).await {
            Ok(g) => Ok((g.id(), secs_to_ms(g.ttl()))),
            // Granted before, by an earlier attempt of the same keyed write.
            Err(etcd_client::Error::GRpcStatus(s))
                if id.is_some() && s.message().contains("lease already exists") =>
            {
                let id = id.unwrap_or_default();
                Ok((id, secs_to_ms(ttl_s)))
            }
            Err(e) => Err(etcd_error(e)),
        }
    }

    /// The lease a record expiring at `expires_at_unix_ms` is attached to: one per bucket
    /// of expiries, granted when the bucket's first record is written, ending a little
    /// after the bucket (a record lives at least until its expiry).
    async fn record_lease(&self, expires_at_unix_ms: u64) -> Result<i64, StoreError> {
        let bucket = self.record_lease_bucket_ms;
        let end = (expires_at_unix_ms / bucket)
            .saturating_add(1)
            .saturating_mul(bucket);
        if let Some(&id) = lock(&self.record_leases).get(&end) {
            return Ok(id);
        }
        let now = now_unix_ms();
        let ttl_s = (end.saturating_sub(now).div_ceil(1000) + 1).min(MAX_RECORD_LEASE_S);
        let (id, _) = self.grant(ttl_s * 1000, None).await?;
        let mut leases = lock(&self.record_leases);
        // Buckets past are of no more use (their leases end by themselves).
        leases.retain(|&e, _| e > now);
        Ok(*leases.entry(end).or_insert(id))
    }

    fn forget_record_leases(&self) {
        lock(&self.record_leases).clear();
    }

    // ---- writes ----

    pub(crate) async fn write(
        &self,
        op: WriteOp,
        idem: Option<IdempotencyKey>,
    ) -> Result<WriteOutcome, StoreError> {
        if let WriteOp::ExpireLeases(_) = op {
            // etcd expires leases itself, on its leader's clock.
            return Ok(WriteOutcome::ExpireLeases(0));
        }
        if idem.is_none() {
            if let WriteOp::Put(p) = &op {
                if !matches!(p.attach, Attach::NewLease { .. }) {
                    return self.put_once(p).await;
                }
            }
        }
        let record = idem.map(|k| {
            let key = self.keys.record(&k.record_key());
            RecordPlan {
                lease_id: derived_lease_id(&key),
                key,
                expires_at_unix_ms: k.expires_at_unix_ms,
                fingerprint: op.fingerprint(),
            }
        });
        match (&record, &op) {
            (Some(r), WriteOp::Put(p)) => {
                if let Some(done) = self.put_keyed(p, r).await? {
                    return Ok(done);
                }
            }
            (Some(r), WriteOp::Delete(d)) => {
                if let Some(done) = self.delete_keyed(d, r).await? {
                    return Ok(done);
                }
            }
            _ => {}
        }
        let put_key = match &op {
            WriteOp::Put(p) => Some(p.key.as_slice()),
            _ => None,
        };
        let derived = record.as_ref().map(|r| r.lease_id);
        let mut granted = None;
        let mut missing_lease = false;
        // The first read is the member's own state, without asking the leader (etcd's
        // serializable read: no ReadIndex round): the transaction compares everything it
        // read, so a stale read can only lose the race, and the next attempt reads through
        // the leader. An answer given without a transaction needs a linearizable read.
        let mut consistency = Consistency::Serializable;
        for _ in 0..WRITE_ATTEMPTS {
            // What the write depends on: its keys (a revoke's are its lease's), its record.
            let mut revoke = None;
            let mut keys: Vec<Vec<u8>> = match &op {
                WriteOp::Put(p) => vec![self.keys.data(&p.key)],
                WriteOp::Delete(d) => vec![self.keys.data(&d.key)],
                WriteOp::Increment(i) => vec![self.keys.data(&i.key)],
                WriteOp::PutMany(m) => m.items.iter().map(|i| self.keys.data(&i.0)).collect(),
                WriteOp::RevokeLease(r) => match self.lease(r.id).await? {
                    Some((_, keys)) => {
                        revoke = Some(r.id);
                        keys
                    }
                    None => Vec::new(),
                },
                WriteOp::GrantLease(_) | WriteOp::ExpireLeases(_) => Vec::new(),
            };
            let n = keys.len();
            if let Some(r) = &record {
                keys.push(r.key.clone());
            }
            let (revision, kvs) = if keys.is_empty() {
                (0, Vec::new())
            } else {
                self.read(&keys, consistency).await?
            };
            if let (Some(r), Some(Some(kv))) = (&record, kvs.get(n)) {
                if let Some(replayed) = self.replay(r, kv, put_key).await? {
                    return replayed;
                }
            }
            let plan = self
                .plan(&op, &kvs[..n], revoke, derived, &mut granted, missing_lease)
                .await?;
            let recorded = record.as_ref().filter(|_| recordable(&plan.outcome));
            // The lease a revoke ends once its keys' deletes are committed.
            let revoked = revoke.and_then(|id| i64::try_from(id).ok());
            if plan.ops.is_empty() && recorded.is_none() && revoked.is_none() {
                if consistency == Consistency::Serializable && !keys.is_empty() {
                    consistency = Consistency::Linearizable;
                    continue;
                }
                let at = to_capkv(revision, self.epoch);
                return plan.outcome.map(|o| at_revision(o, at));
            }

            let mut compares: Vec<Compare> = keys
                .iter()
                .zip(&kvs)
                .map(|(k, kv)| {
                    let seen = kv.as_ref().map_or(0, KeyValue::mod_revision);
                    Compare::mod_revision(k.clone(), CompareOp::Equal, seen)
                })
                .collect();
            if let Some(id) = revoked {
                // Each key still attached to the lease being revoked.
                compares.extend(
                    keys[..n]
                        .iter()
                        .map(|k| Compare::lease(k.clone(), CompareOp::Equal, id)),
                );
            }
            let mut ops = plan.ops;
            let changes = !ops.is_empty() || recorded.is_some();
            if let Some(r) = recorded {
                let lease = self.record_lease(r.expires_at_unix_ms).await?;
                let rec = Record {
                    expires_at_unix_ms: r.expires_at_unix_ms,
                    fingerprint: r.fingerprint,
                    outcome: plan.outcome.clone(),
                };
                let opts = PutOptions::new().with_lease(lease);
                ops.push(TxnOp::put(r.key.clone(), rec.encode(), Some(opts)));
            }
            match self.txn(Txn::new().when(compares).and_then(ops)).await {
                Ok(resp) if resp.succeeded() => {
                    let revision = header_revision(resp.header())?;
                    if changes {
                        self.commits.fetch_add(1, Ordering::Relaxed);
                        self.seen(revision).await;
                    }
                    if let Some(id) = revoked {
                        // Its keys are gone with the transaction; this ends the lease.
                        let mut leases = self.client.lease_client();
                        if let Err(e) = self.timed("a revoke", leases.revoke(id)).await {
                            tracing::debug!(error = %e, lease = id, "revoking an emptied lease");
                        }
                    }
                    let at = to_capkv(revision, self.epoch);
                    return plan.outcome.map(|o| at_revision(o, at));
                }
                // Another write changed what this one read (or the read was stale): read
                // through the leader and evaluate again.
                Ok(_) => {
                    consistency = Consistency::Linearizable;
                    continue;
                }
                Err(StoreError::LeaseNotFound { .. }) => {
                    // The caller's lease, or a record's: which one is told apart here.
                    if let WriteOp::Put(write::Put {
                        attach: Attach::Lease(id),
                        ..
                    }) = &op
                    {
                        missing_lease = self.lease(*id).await?.is_none();
                    }
                    if !missing_lease {
                        self.forget_record_leases();
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Busy(format!(
            "a write lost {WRITE_ATTEMPTS} races in a row for the keys it reads"
        )))
    }

    /// A write answered from its record `kv`, when the record has not expired (`None`: it
    /// has, and the write is made again). A put recorded by [`Self::put_keyed`] gets its
    /// version here, read under `put_key` (the key of the write, when it is a put).
    async fn replay(
        &self,
        r: &RecordPlan,
        kv: &KeyValue,
        put_key: Option<&[u8]>,
    ) -> Result<Option<Result<WriteOutcome, StoreError>>, StoreError> {
        let rec = Record::decode(kv.value())?;
        if rec.expires_at_unix_ms <= now_unix_ms() {
            return Ok(None);
        }
        self.replays.fetch_add(1, Ordering::Relaxed);
        let at = to_capkv(kv.mod_revision(), self.epoch);
        let outcome = match rec.replay(&r.fingerprint) {
            Ok(WriteOutcome::Put(o)) if o.version == VERSION_UNRECORDED => {
                let Some(key) = put_key else {
                    return Err(StoreError::Internal(
                        "a put's record answers a write that is not a put".into(),
                    ));
                };
                let version = self.version_at(key, kv.mod_revision()).await?;
                Ok(WriteOutcome::Put(PutOutcome { version, ..o }))
            }
            other => other,
        };
        Ok(Some(outcome.map(|o| at_revision(o, at))))
    }

    /// The version `key` (a user key) had at etcd revision `at`, when it was put then:
    /// read in the past, or from its present if it has not changed since. 0 when neither
    /// can tell (etcd has compacted that revision and the key changed since): versions
    /// start at 1, so a client can tell it from a real one.
    async fn version_at(&self, key: &[u8], at: i64) -> Result<u64, StoreError> {
        let key = self.keys.data(key);
        let mut kv = self.client.kv_client();
        let past = GetOptions::new().with_revision(at);
        let resp = match self.timed("a read", kv.get(key.clone(), Some(past))).await {
            Err(StoreError::Compacted { .. }) => self.timed("a read", kv.get(key, None)).await?,
            other => other?,
        };
        Ok(resp
            .kvs()
            .first()
            .filter(|kv| kv.mod_revision() == at)
            .map_or(0, version_of))
    }

    /// An unconditional keyed put in one transaction, without reading first: if its record
    /// is absent, the put and the record; otherwise the record is read and replayed. The
    /// record cannot hold the put's version (etcd tells it only with the answer), so it
    /// says [`VERSION_UNRECORDED`] and a replay reads it ([`Self::version_at`]). `None`:
    /// the general path takes the write (a condition, a lease of its own, an expired
    /// record, a record lease gone).
    async fn put_keyed(
        &self,
        p: &write::Put,
        r: &RecordPlan,
    ) -> Result<Option<WriteOutcome>, StoreError> {
        if p.cond != Condition::None || matches!(p.attach, Attach::NewLease { .. }) {
            return Ok(None);
        }
        let (lease, opts) = put_options(p)?;
        let record_lease = self.record_lease(r.expires_at_unix_ms).await?;
        let rec = Record {
            expires_at_unix_ms: r.expires_at_unix_ms,
            fingerprint: r.fingerprint,
            outcome: Ok(WriteOutcome::Put(PutOutcome {
                version: VERSION_UNRECORDED,
                revision: 0,
                lease: lease as u64,
            })),
        };
        let ops = vec![
            TxnOp::put(self.keys.data(&p.key), p.value.clone(), Some(opts)),
            TxnOp::put(
                r.key.clone(),
                rec.encode(),
                Some(PutOptions::new().with_lease(record_lease)),
            ),
        ];
        let resp = match self.if_unrecorded(r, ops, Some(&p.key)).await? {
            Unrecorded::Committed(resp) => resp,
            Unrecorded::Answered(done) => return Ok(done),
        };
        let (revision, previous) = committed_put(&resp)?;
        Ok(Some(
            self.put_done(&p.key, &p.value, revision, previous, lease)
                .await,
        ))
    }

    /// A keyed write's one transaction: `ops` if `r`'s record is absent, else the record,
    /// read and replayed (`put_key`: the write's key, when it is a put).
    async fn if_unrecorded(
        &self,
        r: &RecordPlan,
        ops: Vec<TxnOp>,
        put_key: Option<&[u8]>,
    ) -> Result<Unrecorded, StoreError> {
        let txn = Txn::new()
            .when([Compare::create_revision(r.key.clone(), CompareOp::Equal, 0)])
            .and_then(ops)
            .or_else([TxnOp::get(r.key.clone(), None)]);
        let resp = match self.txn(txn).await {
            Ok(resp) => resp,
            // The caller's lease or the record's: the general path tells them apart.
            Err(StoreError::LeaseNotFound { .. }) => return Ok(Unrecorded::Answered(None)),
            Err(e) => return Err(e),
        };
        if resp.succeeded() {
            return Ok(Unrecorded::Committed(resp));
        }
        let Some(kv) = single_get(&resp)? else {
            // Gone since (expired): the general path writes it again.
            return Ok(Unrecorded::Answered(None));
        };
        Ok(Unrecorded::Answered(
            match self.replay(r, &kv, put_key).await? {
                Some(replayed) => Some(replayed?),
                None => None,
            },
        ))
    }

    /// An unconditional keyed delete in one transaction, without reading first: if its
    /// record is absent, a nested transaction deletes the key if it exists and records
    /// which it did (each branch puts the record its outcome needs); otherwise the record
    /// is read and replayed. `None`: the general path takes the write (a condition, an
    /// expired record, a record lease gone).
    async fn delete_keyed(
        &self,
        d: &write::Delete,
        r: &RecordPlan,
    ) -> Result<Option<WriteOutcome>, StoreError> {
        if d.cond != Condition::None {
            return Ok(None);
        }
        let record_lease = self.record_lease(r.expires_at_unix_ms).await?;
        let put_record = |existed| {
            let rec = Record {
                expires_at_unix_ms: r.expires_at_unix_ms,
                fingerprint: r.fingerprint,
                outcome: Ok(WriteOutcome::Delete(DeleteOutcome {
                    existed,
                    revision: 0,
                })),
            };
            TxnOp::put(
                r.key.clone(),
                rec.encode(),
                Some(PutOptions::new().with_lease(record_lease)),
            )
        };
        let key = self.keys.data(&d.key);
        // etcd takes the same key put in both branches of one transaction: they exclude
        // each other.
        let delete = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::delete(key, None), put_record(true)])
            .or_else([put_record(false)]);
        let resp = match self
            .if_unrecorded(r, vec![TxnOp::txn(delete)], None)
            .await?
        {
            Unrecorded::Committed(resp) => resp,
            Unrecorded::Answered(done) => return Ok(done),
        };
        let existed = match resp.op_responses().into_iter().next() {
            Some(TxnOpResponse::Txn(inner)) => inner.succeeded(),
            _ => {
                return Err(StoreError::Internal(
                    "etcd answered a nested transaction with another kind of response".into(),
                ))
            }
        };
        // The delete, or the record alone: a revision either way, in the history first.
        let revision = header_revision(resp.header())?;
        self.commits.fetch_add(1, Ordering::Relaxed);
        self.seen(revision).await;
        Ok(Some(WriteOutcome::Delete(DeleteOutcome {
            existed,
            revision: to_capkv(revision, self.epoch),
        })))
    }

    /// A put without a record or a lease of its own, in one round trip: its condition as
    /// the transaction's compare, its version from the previous entry etcd returns, the
    /// current version (for a failed condition) from the failure branch's read.
    async fn put_once(&self, p: &write::Put) -> Result<WriteOutcome, StoreError> {
        let key = self.keys.data(&p.key);
        let (lease, opts) = put_options(p)?;
        // etcd's version of an absent key is 0, as capkv's conditions read it.
        let expected = match p.cond {
            Condition::IfVersion(v) => i64::try_from(v).unwrap_or(i64::MAX),
            Condition::IfAbsent => 0,
            Condition::None => {
                // A plain put, not a transaction: etcd 3.4 serves half as many one-put
                // transactions as puts (50 writers, bench/etcd.sh's cluster, same minutes).
                let mut kv = self.client.kv_client();
                let put = kv.put(key, p.value.clone(), Some(opts));
                let resp = naming_lease(self.timed("a put", put).await, lease as u64)?;
                let revision = header_revision(resp.header())?;
                let previous = resp.prev_key().map(version_of);
                return Ok(self
                    .put_done(&p.key, &p.value, revision, previous, lease)
                    .await);
            }
        };
        let txn = Txn::new()
            .when([Compare::version(key.clone(), CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key.clone(), p.value.clone(), Some(opts))])
            .or_else([TxnOp::get(key, None)]);
        let resp = naming_lease(self.txn(txn).await, lease as u64)?;
        if !resp.succeeded() {
            let current = single_get(&resp)?.map(|kv| version_of(&kv));
            return Err(StoreError::ConditionFailed {
                index: 0,
                current_version: current,
            });
        }
        let (revision, previous) = committed_put(&resp)?;
        Ok(self
            .put_done(&p.key, &p.value, revision, previous, lease)
            .await)
    }

    /// A committed put's outcome, once the history has it: `previous` the version before
    /// it.
    async fn put_done(
        &self,
        key: &[u8],
        value: &[u8],
        revision: i64,
        previous: Option<u64>,
        lease: i64,
    ) -> WriteOutcome {
        self.commits.fetch_add(1, Ordering::Relaxed);
        let version = next_version(previous);
        let at = to_capkv(revision, self.epoch);
        // The revision is this put alone: when the history holds every one before it, the
        // put's event goes in now (the feed skips it when etcd's watch brings it), so the
        // answer does not wait for the watch. Otherwise the feed fills the gap first.
        let applied_now = {
            let mut h = lock(&self.history);
            if h.applied + 1 == at {
                h.ring.push(key, value, Some(version), at);
                h.ring.trim();
                h.applied = at;
                true
            } else {
                false
            }
        };
        if applied_now {
            self.applied_through(at);
        } else {
            self.seen(revision).await;
        }
        WriteOutcome::Put(PutOutcome {
            version,
            revision: at,
            lease: lease as u64,
        })
    }

    /// The history holds every revision through `at` now: watchers and the writes waiting
    /// for it are told.
    pub(crate) fn applied_through(&self, at: u64) {
        self.changes.publish(at);
        let done = {
            let mut waiters = lock(&self.waiters);
            let later = waiters.split_off(&(at + 1));
            std::mem::replace(&mut *waiters, later)
        };
        for tx in done.into_values().flatten() {
            let _ = tx.send(());
        }
    }

    /// Evaluates `op` against what was read: its operations and its outcome (revisions
    /// 0, set when the transaction commits).
    async fn plan(
        &self,
        op: &WriteOp,
        current: &[Option<KeyValue>],
        revoke: Option<u64>,
        derived: Option<i64>,
        granted: &mut Option<(i64, u64)>,
        missing_lease: bool,
    ) -> Result<Plan, StoreError> {
        let version = |i: usize| current.get(i).and_then(|kv| kv.as_ref()).map(version_of);
        let failed = |index, current_version| {
            Plan::outcome(Err(StoreError::ConditionFailed {
                index,
                current_version,
            }))
        };
        Ok(match op {
            WriteOp::Put(p) => {
                if !p.cond.holds(version(0)) {
                    return Ok(failed(0, version(0)));
                }
                let lease = match p.attach {
                    Attach::None => 0,
                    Attach::Lease(id) => match i64::try_from(id) {
                        Ok(lease) if !missing_lease => lease,
                        _ => return Ok(Plan::outcome(Err(StoreError::LeaseNotFound { id }))),
                    },
                    Attach::NewLease { ttl_ms } => {
                        if granted.is_none() {
                            *granted = Some(self.grant(ttl_ms, derived).await?);
                        }
                        granted.map_or(0, |g| g.0)
                    }
                };
                let mut opts = PutOptions::new();
                if lease != 0 {
                    opts = opts.with_lease(lease);
                }
                Plan {
                    ops: vec![TxnOp::put(
                        self.keys.data(&p.key),
                        p.value.clone(),
                        Some(opts),
                    )],
                    outcome: Ok(WriteOutcome::Put(PutOutcome {
                        version: next_version(version(0)),
                        revision: 0,
                        lease: lease as u64,
                    })),
                }
            }
            WriteOp::Delete(d) => {
                if !d.cond.holds(version(0)) {
                    return Ok(failed(0, version(0)));
                }
                let existed = version(0).is_some();
                Plan {
                    ops: if existed {
                        vec![TxnOp::delete(self.keys.data(&d.key), None)]
                    } else {
                        Vec::new()
                    },
                    outcome: Ok(WriteOutcome::Delete(DeleteOutcome {
                        existed,
                        revision: 0,
                    })),
                }
            }
            WriteOp::PutMany(m) => {
                if let Some(i) = m
                    .items
                    .iter()
                    .enumerate()
                    .position(|(i, item)| !item.2.holds(version(i)))
                {
                    return Ok(failed(i, version(i)));
                }
                Plan {
                    ops: m
                        .items
                        .iter()
                        .map(|(k, v, _)| TxnOp::put(self.keys.data(k), v.clone(), None))
                        .collect(),
                    outcome: Ok(WriteOutcome::PutMany(BatchOutcome {
                        versions: (0..m.items.len())
                            .map(|i| next_version(version(i)))
                            .collect(),
                        revision: 0,
                    })),
                }
            }
            WriteOp::Increment(inc) => {
                let cur = current.first().and_then(|kv| kv.as_ref());
                let value = match write::incremented(cur.map(KeyValue::value), inc.delta) {
                    Ok(v) => v,
                    Err(e) => return Ok(Plan::outcome(Err(e))),
                };
                // An increment leaves the key's lease where it is (etcd's `ignore_lease`,
                // which it refuses for a key that does not exist).
                let opts = cur.map(|_| PutOptions::new().with_ignore_lease());
                Plan {
                    ops: vec![TxnOp::put(
                        self.keys.data(&inc.key),
                        value.to_string().into_bytes(),
                        opts,
                    )],
                    outcome: Ok(WriteOutcome::Increment(write::IncrementOutcome {
                        value,
                        version: next_version(version(0)),
                        revision: 0,
                    })),
                }
            }
            WriteOp::GrantLease(g) => {
                if granted.is_none() {
                    *granted = Some(self.grant(g.ttl_ms, derived).await?);
                }
                let (id, ttl_ms) = granted.unwrap_or_default();
                Plan::outcome(Ok(WriteOutcome::GrantLease(write::LeaseGranted {
                    id: id as u64,
                    ttl_ms,
                })))
            }
            WriteOp::RevokeLease(r) => match revoke {
                None => Plan::outcome(Err(StoreError::LeaseNotFound { id: r.id })),
                Some(_) => Plan {
                    ops: current
                        .iter()
                        .flatten()
                        .map(|kv| TxnOp::delete(kv.key().to_vec(), None))
                        .collect(),
                    outcome: Ok(WriteOutcome::RevokeLease(write::RevokeOutcome {
                        deleted: current.iter().flatten().count() as u64,
                        revision: 0,
                    })),
                },
            },
            WriteOp::ExpireLeases(_) => Plan::outcome(Ok(WriteOutcome::ExpireLeases(0))),
        })
    }

    /// Waits (bounded) until the history feed has applied etcd revision `revision`, so
    /// that a write is in this gateway's history and revision once it is answered.
    async fn seen(&self, revision: i64) {
        let at = to_capkv(revision, self.epoch);
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut waiters = lock(&self.waiters);
            // Under the waiters' lock: the feed takes it after it has moved `applied`,
            // so either this sees the revision applied or the feed sees this waiter.
            if lock(&self.history).applied >= at {
                return;
            }
            waiters.entry(at).or_default().push(tx);
        }
        let waited = tokio::time::timeout(self.request_timeout, rx).await;
        if !matches!(waited, Ok(Ok(()))) {
            tracing::warn!(
                revision = at,
                "the etcd history feed has not seen a committed write yet"
            );
        }
    }

    // ---- maintenance ----

    async fn compact(&self) -> Result<(), StoreError> {
        let head = i64::try_from(lock(&self.history).applied).unwrap_or(i64::MAX) + self.epoch;
        let keep = i64::try_from(self.compact_keep_revisions).unwrap_or(i64::MAX);
        let at = head - keep;
        if at <= self.epoch {
            return Ok(());
        }
        let mut kv = self.client.kv_client();
        match self.timed("a compaction", kv.compact(at, None)).await {
            Ok(_) => Ok(()),
            // Compacted there already (by another gateway or etcd's own auto-compaction).
            Err(StoreError::Compacted { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn snapshot(&self, dir: std::path::PathBuf) -> Result<(), StoreError> {
        use std::io::Write;
        std::fs::create_dir(&dir)
            .map_err(|e| StoreError::Invalid(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("etcd.snapshot");
        let mut file = std::fs::File::create(&path)
            .map_err(|e| StoreError::Invalid(format!("cannot create {}: {e}", path.display())))?;
        let mut maintenance = self.client.maintenance_client();
        let mut stream = self.timed("a snapshot", maintenance.snapshot()).await?;
        // Bounded by the snapshot's size: etcd ends the stream after the last chunk.
        while let Some(chunk) = self.timed("a snapshot chunk", stream.message()).await? {
            file.write_all(chunk.blob())
                .map_err(|e| StoreError::Internal(format!("writing {}: {e}", path.display())))?;
        }
        file.sync_all()
            .map_err(|e| StoreError::Internal(format!("syncing {}: {e}", path.display())))
    }
}

/// A keyed write's record: where it goes, what it must match, its derived lease id.
struct RecordPlan {
    key: Vec<u8>,
    expires_at_unix_ms: u64,
    fingerprint: [u8; 16],
    /// The id a lease this write grants is granted under, so a retry grants no second one.
    lease_id: i64,
}

/// An evaluated write: etcd operations and the outcome they produce.
struct Plan {
    ops: Vec<TxnOp>,
    outcome: Result<WriteOutcome, StoreError>,
}

impl Plan {
    fn outcome(outcome: Result<WriteOutcome, StoreError>) -> Self {
        Self {
            ops: Vec::new(),
            outcome,
        }
    }
}

/// The outcome with its revision set to `at` (for the kinds that carry one).
fn at_revision(o: WriteOutcome, at: u64) -> WriteOutcome {
    match o {
        WriteOutcome::Put(p) => WriteOutcome::Put(PutOutcome { revision: at, ..p }),
        WriteOutcome::Delete(d) => WriteOutcome::Delete(DeleteOutcome { revision: at, ..d }),
        WriteOutcome::PutMany(b) => WriteOutcome::PutMany(BatchOutcome { revision: at, ..b }),
        WriteOutcome::Increment(i) => {
            WriteOutcome::Increment(write::IncrementOutcome { revision: at, ..i })
        }
        WriteOutcome::RevokeLease(r) => {
            WriteOutcome::RevokeLease(write::RevokeOutcome { revision: at, ..r })
        }
        other @ (WriteOutcome::GrantLease(_) | WriteOutcome::ExpireLeases(_)) => other,
    }
}

/// A lease id derived from a record's key: the same for every attempt and replay of one
/// keyed write, positive as etcd wants.
fn derived_lease_id(record_key: &[u8]) -> i64 {
    let digest = Sha256::new()
        .chain_update(b"capkv lease of ")
        .chain_update(record_key)
        .finalize();
    let mut b = [0u8; 8];
    b.copy_from_slice(&digest[..8]);
    (i64::from_be_bytes(b) & i64::MAX).max(1)
}

/// capkv's revision of etcd revision `revision` (0 at or before the store's creation).
pub(crate) fn to_capkv(revision: i64, epoch: i64) -> u64 {
    revision.saturating_sub(epoch).max(0) as u64
}

/// The store revision an answer of etcd's was given at.
fn header_revision(header: Option<&ResponseHeader>) -> Result<i64, StoreError> {
    header
        .map(ResponseHeader::revision)
        .ok_or_else(|| StoreError::Internal("etcd answered without a header".into()))
}

/// An entry's version, as capkv counts them (etcd's, never negative).
pub(crate) fn version_of(kv: &KeyValue) -> u64 {
    kv.version().max(0) as u64
}

/// etcd's lease seconds as capkv's milliseconds (never negative).
fn secs_to_ms(seconds: i64) -> u64 {
    (seconds.max(0) as u64).saturating_mul(1000)
}

/// The version a put gives a key whose version is `current` (`None`: absent).
fn next_version(current: Option<u64>) -> u64 {
    current.map_or(1, |v| v + 1)
}

/// The lease a put without a lease of its own leaves its key on (0: none; an existing
/// lease, `Attach::Lease`), and its options: that lease, and `prev_kv` for its version.
fn put_options(p: &write::Put) -> Result<(i64, PutOptions), StoreError> {
    let lease = match p.attach {
        Attach::Lease(id) => i64::try_from(id).map_err(|_| StoreError::LeaseNotFound { id })?,
        Attach::None | Attach::NewLease { .. } => 0,
    };
    let mut opts = PutOptions::new().with_prev_key();
    if lease != 0 {
        opts = opts.with_lease(lease);
    }
    Ok((lease, opts))
}

/// A failure naming the lease `id` where etcd said only that some lease was missing.
fn naming_lease<T>(r: Result<T, StoreError>, id: u64) -> Result<T, StoreError> {
    match r {
        Err(StoreError::LeaseNotFound { .. }) => Err(StoreError::LeaseNotFound { id }),
        r => r,
    }
}

/// What [`Inner::if_unrecorded`]'s transaction came to.
enum Unrecorded {
    /// The record was absent: the write's operations ran.
    Committed(TxnResponse),
    /// The record's replay, or `None`: the general path takes the write.
    Answered(Option<WriteOutcome>),
}

/// The revision of a committed transaction whose first operation was a put, and the
/// version the key had before it (`prev_kv`; `None`: absent).
fn committed_put(resp: &TxnResponse) -> Result<(i64, Option<u64>), StoreError> {
    let revision = header_revision(resp.header())?;
    match resp.op_responses().into_iter().next() {
        Some(TxnOpResponse::Put(put)) => Ok((revision, put.prev_key().map(version_of))),
        _ => Err(StoreError::Internal(
            "etcd answered a put with another kind of response".into(),
        )),
    }
}

/// The entry of a transaction whose only operation was one get.
fn single_get(resp: &TxnResponse) -> Result<Option<KeyValue>, StoreError> {
    match resp.op_responses().into_iter().next() {
        Some(TxnOpResponse::Get(mut g)) => Ok(g.take_kvs().into_iter().next()),
        _ => Err(StoreError::Internal(
            "etcd answered a get with another kind of response".into(),
        )),
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these leaves plain data (a map, the ring) whole.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Attempts of a request that fails without reaching etcd ([`Inner::timed_again`]).
const ATTEMPTS_NOT_SENT: u32 = 4;
/// The pause before the second attempt (then four times the one before: 10, 40, 160 ms).
const NOT_SENT_FIRST_PAUSE: Duration = Duration::from_millis(10);

/// The request failed before it reached etcd: its connection could not be made (refused,
/// or not made within the connect timeout). Anything else may have been applied.
fn not_sent(e: &etcd_client::Error) -> bool {
    const NOT_CONNECTED: [&str; 2] = ["tcp connect error", "error trying to connect"];
    let said = match e {
        etcd_client::Error::GRpcStatus(s) if s.code() == tonic::Code::Unavailable => {
            s.message().to_string()
        }
        etcd_client::Error::TransportError(t) => format!("{t:?}"),
        _ => return false,
    };
    NOT_CONNECTED.iter().any(|n| said.contains(n))
}

/// etcd's failures as the store's. Connection trouble and a leaderless cluster are
/// `Unavailable` (the caller retries, keyed); a full cluster (its space quota) is
/// `StorageFull`; a request over etcd's own limits is `Invalid`.
fn etcd_error(e: etcd_client::Error) -> StoreError {
    use tonic::Code;
    match &e {
        etcd_client::Error::GRpcStatus(s) => {
            let msg = s.message();
            match s.code() {
                Code::NotFound if msg.contains("lease not found") => {
                    StoreError::LeaseNotFound { id: 0 }
                }
                Code::OutOfRange if msg.contains("compacted") => {
                    StoreError::Compacted { oldest_revision: 0 }
                }
                Code::OutOfRange if msg.contains("future revision") => StoreError::Invalid(
                    "the scan's cursor names a revision the store has not reached".into(),
                ),
                Code::ResourceExhausted if msg.contains("space exceeded") => {
                    StoreError::StorageFull(msg.to_string())
                }
                Code::InvalidArgument
                    if msg.contains("too large") || msg.contains("too many operations") =>
                {
                    StoreError::Invalid(format!("etcd refused the request: {msg}"))
                }
                Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Unknown
                | Code::ResourceExhausted => StoreError::Unavailable(format!("etcd: {msg}")),
                _ => StoreError::Internal(format!("etcd: {e}")),
            }
        }
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => {
            StoreError::Unavailable(format!("etcd: {e}"))
        }
        _ => StoreError::Internal(format!("etcd: {e}")),
    }
}

impl Store for EtcdStore {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.get_async(key).wait()
    }
    fn get_async(&self, key: &[u8]) -> Pending<Option<Entry>> {
        let key = key.to_vec();
        self.spawn(move |i| Box::pin(async move { i.get(key).await }))
    }
    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        self.scan_async(req).wait()
    }
    fn scan_async(&self, req: &ScanRequest) -> Pending<ScanPage> {
        let req = req.clone();
        self.spawn(move |i| Box::pin(async move { i.scan(req).await }))
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        self.get_many_async(keys).wait()
    }
    fn get_many_async(&self, keys: &[&[u8]]) -> Pending<(Vec<Option<Entry>>, u64)> {
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| k.to_vec()).collect();
        self.spawn(move |i| Box::pin(async move { i.get_many(keys).await }))
    }
    fn reads_complete_at_once(&self) -> bool {
        false
    }
    /// etcd reads the past until it is compacted.
    fn scans_pin_revision(&self) -> bool {
        true
    }
    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        self.spawn(move |i| Box::pin(async move { i.write(op, idem).await }))
    }
    /// The revision the history feed has applied: every write this gateway acknowledged,
    /// and other gateways' as soon as etcd's watch brings them.
    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.inner.changes.revision())
    }
    fn lease_keep_alive(&self, id: u64) -> Result<LeaseInfo, StoreError> {
        self.lease_keep_alive_async(id).wait()
    }
    fn lease_keep_alive_async(&self, id: u64) -> Pending<LeaseInfo> {
        self.spawn(move |i| Box::pin(async move { i.lease_keep_alive(id).await }))
    }
    fn lease_info(&self, id: u64) -> Result<LeaseInfo, StoreError> {
        self.lease_info_async(id).wait()
    }
    fn lease_info_async(&self, id: u64) -> Pending<LeaseInfo> {
        self.spawn(move |i| Box::pin(async move { i.lease_info(id).await }))
    }
    /// etcd expires leases on its own clock: the server's reaper has nothing to do.
    fn lease_clock(&self) -> (usize, Option<std::time::Instant>) {
        (0, None)
    }
    fn events(
        &self,
        range: &KeyRange,
        after: u64,
        max: PageLimits,
    ) -> Result<EventPage, StoreError> {
        let h = lock(&self.inner.history);
        h.ring.page(range, after, max, h.applied)
    }
    fn changes(&self) -> &Changes {
        &self.inner.changes
    }
    fn engine_name(&self) -> &'static str {
        "etcd"
    }
    fn stats(&self) -> StoreStats {
        StoreStats {
            commits: self.inner.commits.load(Ordering::Relaxed),
            idempotent_replays: self.inner.replays.load(Ordering::Relaxed),
            ..StoreStats::default()
        }
    }
    fn instance_secret(&self) -> [u8; 32] {
        self.inner.secret
    }
    /// Compacts etcd's history but the last `compact_keep_revisions` revisions.
    fn compact(&self) -> Result<(), StoreError> {
        self.spawn(|i| Box::pin(async move { i.compact().await }))
            .wait()
    }
    /// An etcd snapshot (`etcd.snapshot`, restored with `etcdctl snapshot restore`).
    fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StoreError> {
        let dir = dir.to_path_buf();
        self.spawn(move |i| Box::pin(async move { i.snapshot(dir).await }))
            .wait()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Only a connection that could not be made counts as a request never sent: anything
    /// else (a timeout, a leader change) may have been applied and is not made again.
    #[test]
    fn a_request_is_made_again_only_when_it_never_left() {
        let status =
            |code, msg: &str| etcd_client::Error::GRpcStatus(tonic::Status::new(code, msg));
        assert!(not_sent(&status(
            tonic::Code::Unavailable,
            "tcp connect error"
        )));
        assert!(not_sent(&status(
            tonic::Code::Unavailable,
            "error trying to connect: Connection refused (os error 111)"
        )));
        assert!(!not_sent(&status(
            tonic::Code::Unavailable,
            "etcdserver: leader changed"
        )));
        assert!(!not_sent(&status(
            tonic::Code::DeadlineExceeded,
            "tcp connect error"
        )));
        assert!(!not_sent(&status(
            tonic::Code::Unknown,
            "transport is closing"
        )));
    }
}
