//! The RPC handlers, one module per capability:
//! - [`gateway`]: `Gateway`, the bootstrap (health, version, `open`, `admin`);
//! - [`kv`]: `KvStore`, reads and the way to a write session;
//! - [`session`]: `WriteSession`, the writes (idempotent with a key);
//! - [`watch`]: `Watcher`, a range's changes in revision order;
//! - [`lease`]: `Lease`, keep-alive, time to live and revoke of one lease;
//! - [`admin`]: `Admin`, operator actions.
//!
//! Every handler has one shape, written once in `handle!` (and in `now!` for reads and
//! at-once writes, whose work never waits: see [`Shared::serve_now`](crate::chain::Shared::serve_now)):
//! read the params, run its work in the call chain
//! ([`Shared::serve`](crate::chain::Shared::serve): context, deadline, admission, faults,
//! metrics, trace), write the success or error arm of its result union, count the reply on
//! the connection's backlog. A handler that returns a capability also
//! puts it outside the union (`kvCap`, `adminCap`, `sessionCap`), or a
//! [`Refused`](crate::refused::Refused) stand-in when the call failed. Nothing
//! cross-cutting happens here. Handlers return `Err` to capnp-rpc only when the reply itself
//! cannot be built; every expected failure is an `Error` in the result.

pub mod admin;
pub mod gateway;
pub mod kv;
pub mod lease;
pub mod session;
pub mod watch;

use std::sync::Arc;

use capkv::kv_capnp::entry;
use capkv::{ApiError, ErrorCode};
use capkv_rpc::local::Now;
use capkv_store::{Entry, Found, Store, StoreError};
use capnp::capability::Promise;

pub use admin::AdminImpl;
pub use gateway::GatewayImpl;
pub use kv::KvStoreImpl;
pub use lease::LeaseImpl;
pub use session::WriteSessionImpl;
pub use watch::WatcherImpl;

/// The shape of every handler. `work` runs inside the chain with the method's params (`p`),
/// the handler (`this`) and the [`Call`](crate::chain::Call); its `Ok` is written by the
/// reply form:
/// - `ok = |builder, value| { ... }`: a struct in the union's `ok` arm;
/// - `set_ok = |value| expr`: a value (Void, Text) in the `ok` arm;
/// - `with = |builder, result| { ... }`: the whole union, for results that carry a
///   capability.
///
/// (The forms read as closures so that rustfmt formats them; they are not closures.)
macro_rules! handle {
    ($self:ident, $params:ident, $results:ident, $method:expr,
     |$this:ident, $p:ident, $call:pat_param| $work:expr,
     $($reply:tt)+) => {{
        let $p = $params.get()?;
        #[allow(unused_variables)]
        let $this = &$self;
        let r = $self
            .shared
            .serve(&$self.conn, $method, $p.get_ctx(), |$call| async move { $work })
            .await;
        #[allow(unused_mut)]
        let mut out = $results.get().init_result();
        crate::rpc::handle!(@reply out, r, $($reply)+);
        crate::reply::count_reply!($self.conn, $results);
        Ok(())
    }};
    (@reply $out:ident, $r:ident, ok = |$ok:ident, $v:pat_param| $body:block) => {
        match $r {
            Ok($v) => {
                #[allow(unused_mut)]
                let mut $ok = $out.init_ok();
                $body
            }
            Err(e) => e.write($out.init_error()),
        }
    };
    (@reply $out:ident, $r:ident, set_ok = |$v:pat_param| $value:expr) => {
        match $r {
            Ok($v) => $out.set_ok($value),
            Err(e) => e.write($out.init_error()),
        }
    };
    (@reply $out:ident, $r:ident, with = |$b:ident, $rr:ident| $body:expr) => {{
        #[allow(unused_mut)]
        let mut $b = $out;
        let $rr = $r;
        $body
    }};
}
pub(crate) use handle;

/// What a handler of a [`now!`] method returns to the hook path: the reply built at once,
/// or the rest of the call.
pub(crate) type Reply = futures::future::Either<
    std::future::Ready<Result<(), capnp::Error>>,
    Promise<(), capnp::Error>,
>;

/// The hook path's handler of a [`now!`] method: `now` is what the method's core did with
/// the params and results of `params` and `results`; a call that must wait goes on with
/// their hooks.
pub(crate) fn reply_of<P, R: capnp::traits::Owned>(
    now: Now,
    params: capnp::capability::Params<P>,
    results: capnp::capability::Results<R>,
) -> Reply {
    use futures::future::Either;
    match now {
        Now::Done(r) => Either::Left(std::future::ready(r)),
        Now::Defer(rest) => Either::Right(rest(params.hook, results.hook)),
        Now::Wait(mut waiting) => {
            let mut hook = results.hook;
            Either::Right(Promise::from_future(async move {
                std::future::poll_fn(|cx| waiting.as_mut().poll_ready(cx)).await;
                waiting.as_mut().answer(hook.get()?)
            }))
        }
        // A core never says it: every method it serves is its own.
        Now::Elsewhere => Either::Left(std::future::ready(Err(capnp::Error::failed(
            "method not served here".into(),
        )))),
    }
}

/// A write waiting for its outcome ([`WaitingWrite`]) as the engine's waiting direct call:
/// once the outcome is in, `reply` writes it into the call's results (the reply forms of
/// [`handle!`], on the connection the call came on).
pub(crate) fn waiting_reply<O, F>(
    write: crate::chain::WaitingWrite<O>,
    reply: F,
) -> std::pin::Pin<Box<dyn capkv_rpc::local::Waiting>>
where
    O: Unpin + 'static,
    F: FnOnce(
            capnp::any_pointer::Builder<'_>,
            Result<O, capkv::ApiError>,
            &crate::chain::Conn,
        ) -> capnp::Result<()>
        + Unpin
        + 'static,
{
    struct WaitingReply<O, F> {
        write: crate::chain::WaitingWrite<O>,
        reply: Option<F>,
    }
    impl<O, F> capkv_rpc::local::Waiting for WaitingReply<O, F>
    where
        O: Unpin,
        F: FnOnce(
                capnp::any_pointer::Builder<'_>,
                Result<O, capkv::ApiError>,
                &crate::chain::Conn,
            ) -> capnp::Result<()>
            + Unpin,
    {
        fn poll_ready(
            self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<()> {
            self.get_mut().write.poll_outcome(cx)
        }

        fn answer(
            self: std::pin::Pin<&mut Self>,
            results: capnp::any_pointer::Builder<'_>,
        ) -> capnp::Result<()> {
            let this = self.get_mut();
            let result = this.write.take();
            match this.reply.take() {
                Some(reply) => reply(results, result, this.write.conn()),
                None => Err(capnp::Error::failed("a waiting call answered twice".into())),
            }
        }
    }
    Box::pin(WaitingReply {
        write,
        reply: Some(reply),
    })
}

/// The hook path's handler of a read on a store whose reads wait (etcd:
/// [`Store::reads_complete_at_once`] is false): the call goes on in `rest`, which awaits
/// the store's `_async` read inside the chain ([`handle!`]), instead of the method's
/// [`now!`] core, which would block the worker on the network.
pub(crate) fn waiting(
    rest: impl std::future::Future<Output = Result<(), capnp::Error>> + 'static,
) -> Reply {
    futures::future::Either::Right(Promise::from_future(rest))
}

/// The core of a method whose work never waits (reads; writes to a store whose writes
/// complete at once): [`handle!`]'s shape, run by the chain at once
/// ([`Shared::serve_now`](crate::chain::Shared::serve_now)), the reply built before it
/// returns, with no future per call. It serves both paths into a handler: capkv's engine
/// calls it directly ([`Direct`]) with the params and results of the message itself, and
/// the hook path (`kv_store::Server` and the like, which capnp-rpc's `RpcSystem` calls too)
/// through [`reply_of`]. When a step must wait (a full admission queue, an armed fault
/// plan) the rest of the call is deferred: it goes on in a future, exactly as `handle!`'s,
/// with the hooks of the hook path.
///
/// `$params` is the params reader (a `capnp::Result`), `$results` a closure that gives the
/// results builder, `$P` and `$R` their `Owned` types. Evaluates to a [`Now`].
macro_rules! now {
    ($self:ident, $params:expr, $results:expr, $P:ty, $R:ty, $method:expr,
     |$this:ident, $p:ident, $call:pat_param| $work:expr,
     $($reply:tt)+) => {{
        match $params {
            Err(e) => capkv_rpc::local::Now::Done(Err(e)),
            Ok($p) => {
                #[allow(unused_variables)]
                let $this = $self;
                let served = $self
                    .shared
                    .serve_now(&$self.conn, $method, $p.get_ctx(), |$call| $work);
                match served {
                    crate::chain::Served::Now(r) => {
                        crate::rpc::now!(@reply $self, $results, r, $($reply)+)
                    }
                    crate::chain::Served::Later(opened) => crate::rpc::now!(@later
                        $self, $P, $R, $method, opened, |$this, $p, $call| $work, $($reply)+),
                }
            }
        }
    }};
    // The reply, built now into the results `$results` gives.
    (@reply $self:ident, $results:expr, $r:ident, $($reply:tt)+) => {{
        let results = $results;
        // A closure, so that the reply form's `?` ends the reply only.
        #[allow(clippy::redundant_closure_call)]
        let replied = (|| -> Result<(), capnp::Error> {
            let mut built = results()?;
            {
                #[allow(unused_mut)]
                let mut out = built.reborrow().init_result();
                crate::rpc::handle!(@reply out, $r, $($reply)+);
            }
            crate::reply::count_reply!(@built $self.conn, built);
            Ok(())
        })();
        capkv_rpc::local::Now::Done(replied)
    }};
    // The rest of a call a step of the chain left `Later`: a future on the hook path's
    // params and results, `$work` awaited in it.
    (@later $self:ident, $P:ty, $R:ty, $method:expr, $opened:ident,
     |$this:ident, $p:ident, $call:pat_param| $work:expr, $($reply:tt)+) => {{
        let owner = std::rc::Rc::clone($self);
        capkv_rpc::local::Now::Defer(Box::new(move |params, results| {
            let params = capnp::capability::Params::<$P>::new(params);
            let mut results = capnp::capability::Results::<$R>::new(results);
            capnp::capability::Promise::from_future(async move {
                let $p = params.get()?;
                #[allow(unused_variables)]
                let $this = &owner;
                let r = owner
                    .shared
                    .serve_opened(&owner.conn, $method, $opened, |$call| async move { $work })
                    .await;
                let mut built = results.get();
                {
                    #[allow(unused_mut)]
                    let mut out = built.reborrow().init_result();
                    crate::rpc::handle!(@reply out, r, $($reply)+);
                }
                crate::reply::count_reply!(@built owner.conn, built);
                Ok(())
            })
        }))
    }};
}
pub(crate) use now;

/// Serves methods of `$ty` (a capability of interface `$client`) on capkv's engine's
/// direct path ([`Direct`]): each schema ordinal (`get @0`) goes to its [`now!`] core, the
/// same the hook path's handler runs; every other method goes down the hook path.
macro_rules! direct {
    ($ty:ty, $client:ty, { $($ordinal:literal => $core:ident),* $(,)? }) => {
        impl capkv_rpc::local::Direct for $ty {
            fn call_now(
                self: std::rc::Rc<Self>,
                interface_id: u64,
                method_id: u16,
                params: capnp::any_pointer::Reader<'_>,
                results: capnp::any_pointer::Builder<'_>,
            ) -> capkv_rpc::local::Now {
                if interface_id != <$client as capnp::traits::HasTypeId>::TYPE_ID {
                    return capkv_rpc::local::Now::Elsewhere;
                }
                match method_id {
                    $($ordinal => self.$core(params.get_as(), move || results.get_as()),)*
                    _ => capkv_rpc::local::Now::Elsewhere,
                }
            }
        }
    };
}
pub(crate) use direct;

/// Keys shown to the store in one prefetch at most; more are sent in several.
const WARM_KEYS_MAX: usize = 64;

/// Keys handed to one `Store::prefetch` (see `Warm::flush`): 16 calls in flight take one.
const WARM_KEYS_PER_PREFETCH: usize = 16;

/// Longer keys are not prefetched (rare, and not worth copying).
const WARM_KEY_BYTES_MAX: usize = 256;

/// What the frame layer shows the calls of each read ([`capkv_rpc::frames::Warm`]): the keys of
/// `get`, `put` and `delete` are gathered, then prefetched from the store together, so
/// that the lookups of calls that arrived together overlap their cache misses instead of
/// taking them one by one (16 gets in flight, 100k keys: a sixth of the server's CPU
/// waited on them). Params that do not decode are left to the call itself to refuse.
pub(crate) struct Warm {
    store: Arc<dyn Store>,
    /// The gathered keys, end to end (copied: the frames they came in are not ours).
    keys: std::cell::RefCell<Vec<u8>>,
    /// Where each gathered key ends in `keys`.
    ends: std::cell::RefCell<Vec<usize>>,
}

impl Warm {
    pub(crate) fn new(store: Arc<dyn Store>) -> Self {
        Self {
            store,
            keys: Default::default(),
            ends: Default::default(),
        }
    }
}

impl capkv_rpc::frames::Warm for Warm {
    fn call(&self, interface: u64, method: u16, params: capnp::any_pointer::Reader<'_>) {
        use capkv::kv_capnp::{kv_store, write_session};
        use capnp::traits::HasTypeId;
        let key = match (interface, method) {
            (kv_store::Client::TYPE_ID, 0) => params
                .get_as::<kv_store::get_params::Reader>()
                .and_then(|p| p.get_key()),
            (write_session::Client::TYPE_ID, 0) => params
                .get_as::<write_session::put_params::Reader>()
                .and_then(|p| p.get_key()),
            (write_session::Client::TYPE_ID, 1) => params
                .get_as::<write_session::delete_params::Reader>()
                .and_then(|p| p.get_key()),
            _ => return,
        };
        let Ok(key) = key else { return };
        if key.len() > WARM_KEY_BYTES_MAX {
            return;
        }
        if self.ends.borrow().len() >= WARM_KEYS_MAX {
            capkv_rpc::frames::Warm::flush(self);
        }
        let mut keys = self.keys.borrow_mut();
        keys.extend_from_slice(key);
        self.ends.borrow_mut().push(keys.len());
    }

    fn flush(&self) {
        let mut keys = self.keys.borrow_mut();
        let mut ends = self.ends.borrow_mut();
        // A few keys at a time: their misses still overlap, and a read of one call (the
        // usual case with many connections) does not set up room for the most.
        let mut slices: [&[u8]; WARM_KEYS_PER_PREFETCH] = [&[]; WARM_KEYS_PER_PREFETCH];
        let mut start = 0;
        for chunk in ends.chunks(WARM_KEYS_PER_PREFETCH) {
            for (slot, &end) in slices.iter_mut().zip(chunk) {
                *slot = &keys[start..end];
                start = end;
            }
            self.store.prefetch(&slices[..chunk.len()]);
        }
        keys.clear();
        ends.clear();
        // A burst of long keys leaves no lasting buffer on the worker.
        if keys.capacity() > WARM_KEY_BYTES_MAX * 4 {
            *keys = Vec::new();
        }
    }
}

/// Runs a blocking store operation (compaction, checkpoint) on tokio's blocking pool, so
/// the worker keeps serving its connections meanwhile.
async fn off_worker<T: Send + 'static>(
    store: &Arc<dyn Store>,
    what: &'static str,
    op: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || op(store.as_ref()))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, task = what, "storage task failed");
            ApiError::new(ErrorCode::Internal, format!("{what} task failed"))
        })?
        .map_err(store_error)
}

/// Advice to a client whose write was refused for space: freeing it takes an operator.
const STORAGE_FULL_RETRY_AFTER_MS: u32 = 5_000;

/// Converts an engine failure into a contract error. Details go to the log here, where the
/// error is handled, and only here (the engine passes them up; the chain's per-call line
/// is at debug); the client gets a message without internals.
fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::ConditionFailed {
            index,
            current_version,
        } => ApiError::new(
            ErrorCode::ConditionFailed,
            match current_version {
                Some(v) => format!("condition failed at item {index}: current version is {v}"),
                None => format!("condition failed at item {index}: key does not exist"),
            },
        ),
        StoreError::IdempotencyKeyReused => ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "idempotency key already used in this session for a different write",
        ),
        StoreError::NotAnInteger => ApiError::new(
            ErrorCode::NotAnInteger,
            "value is not a decimal 64-bit integer, or the result would overflow",
        ),
        StoreError::Invalid(detail) => ApiError::new(ErrorCode::InvalidArgument, detail),
        StoreError::LeaseNotFound { id } => ApiError::new(
            ErrorCode::LeaseNotFound,
            format!("lease {id:x} not found (never granted, expired or revoked)"),
        ),
        StoreError::Compacted { oldest_revision } => ApiError {
            oldest_revision,
            ..ApiError::new(
                ErrorCode::Compacted,
                format!(
                    "the history no longer holds those revisions: the oldest a watch can \
                     start from is {oldest_revision}"
                ),
            )
        },
        StoreError::Busy(detail) => {
            tracing::warn!(error = %detail, "store busy");
            ApiError::new(ErrorCode::Overloaded, "storage write queue is full")
                .with_retry_after_ms(20)
        }
        StoreError::StorageFull(detail) => {
            tracing::warn!(error = %detail, "write refused: storage full");
            ApiError::new(
                ErrorCode::StorageFull,
                "the server's disk is full: writes are refused until space is freed",
            )
            .with_retry_after_ms(STORAGE_FULL_RETRY_AFTER_MS)
        }
        StoreError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "store unavailable");
            ApiError::new(ErrorCode::Unavailable, "storage is unavailable").with_retry_after_ms(100)
        }
        StoreError::Internal(detail) => {
            tracing::error!(error = %detail, "store failure");
            ApiError::new(ErrorCode::Internal, "internal storage error")
        }
    }
}

fn write_entry(b: entry::Builder<'_>, e: &Entry) {
    let found = Found {
        version: e.version,
        mod_revision: e.mod_revision,
    };
    write_entry_parts(b, &e.key, &e.value, found);
}

/// [`write_entry`] from its parts (a get's reply: the key asked for, the value read).
fn write_entry_parts(mut b: entry::Builder<'_>, key: &[u8], value: &[u8], found: Found) {
    b.set_key(key);
    b.set_value(value);
    b.set_version(found.version);
    b.set_mod_revision(found.mod_revision);
}
