//! The wire work both [`LocalClient`](crate::LocalClient) and the get batcher share: a
//! call's `RequestContext` and deadline, single gets and `getMany` on the wire, decoding
//! result unions and entries. Its own module so that `local` and `batch` both build on it
//! instead of on each other.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};

use capkv::kv_capnp::{condition, kv_store};
use capkv::{ApiError, CallMeta, ErrorCode};
use capkv_rpc::client::DirectCap;
use futures::future::{LocalBoxFuture, Shared};
use tokio::time::Instant;

use crate::{Condition, Entry, FaultsInfo};

/// When a call must be done by, and which attempt of its logical call it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSpec {
    pub deadline: Instant,
    /// 1 for the first try, 2 for the first retry...
    pub attempt: u32,
    /// For writes: the idempotency key, the same on every attempt of one logical write.
    pub idempotency_key: Option<[u8; 16]>,
    /// The attempt span's trace context, sent as `traceparent` when traces are exported.
    pub traceparent: Option<capkv_telemetry::TraceParent>,
}

impl From<Instant> for CallSpec {
    fn from(deadline: Instant) -> Self {
        Self {
            deadline,
            attempt: 1,
            idempotency_key: None,
            traceparent: None,
        }
    }
}

pub(crate) type SharedOutcome = Shared<LocalBoxFuture<'static, Result<(), ApiError>>>;

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// Decodes a call's results (`capnp::Result` of its results reader): the result union's
/// success arm `$arm($v)` through `$ok`, the error arm into an [`ApiError`]. Every call of
/// the contract has this shape; only the union module and the success arm differ.
macro_rules! decode_results {
    ($results:expr, $module:ident, $arm:ident($v:pat) => $ok:expr) => {{
        use capkv::kv_capnp::$module::Which;
        match $results
            .and_then(|r| r.get_result())
            .map_err(capnp_err)?
            .which()
        {
            Ok(Which::$arm($v)) => $ok,
            Ok(Which::Error(e)) => Err(read_error(e)),
            Err(e) => Err(capnp_err(e.into())),
        }
    }};
}
pub(crate) use decode_results;

/// A call made directly on capkv's engine (a [`DirectCap`]): its params (the generated
/// builder `$params`) written by `$fill`, its results (the reader `$results`) decoded as
/// [`decode_results`] does.
macro_rules! direct_result {
    ($cap:expr, $interface:expr, $method:expr, $words:expr,
     $params:ty => $fill:expr, $results:ty, $module:ident, $arm:ident($v:pat) => $ok:expr) => {{
        let call = $cap.call($interface, $method, $words, |p| {
            ($fill)(p.init_as::<$params>());
            Ok(())
        });
        let reply = call.await.map_err(capnp_err)?;
        decode_results!(
            reply.results().and_then(|c| c.get_as::<$results>()),
            $module,
            $arm($v) => $ok
        )
    }};
}
pub(crate) use direct_result;

/// Awaits a response and decodes its result union (see [`decode_results`]).
macro_rules! decode_result {
    ($response:expr, $module:ident, $arm:ident($v:pat) => $ok:expr) => {{
        let resp = $response.await.map_err(capnp_err)?;
        decode_results!(resp.get(), $module, $arm($v) => $ok)
    }};
}
pub(crate) use decode_result;

/// The failure of the call that promised a capability (`origin`), if it failed: the real
/// reason a call on that capability failed. A call on such a capability is answered after
/// its origin (the server runs it only once the origin resolved), so this does not wait.
pub(crate) async fn origin_failure(origin: &SharedOutcome) -> Option<ApiError> {
    origin.clone().await.err()
}

/// The `RequestContext` of a call made now under `spec`: the budget is what is left when
/// the request leaves, not the caller's timeout. Fails if nothing is left.
pub(crate) fn call_meta(spec: &CallSpec) -> Result<CallMeta, ApiError> {
    Ok(CallMeta {
        budget_ms: Some(budget_ms(spec)?),
        request_id: request_id(REQUEST_SEQ.fetch_add(1, Ordering::Relaxed)),
        attempt: spec.attempt,
        traceparent: spec.traceparent.map(|t| t.to_string()).unwrap_or_default(),
        ..CallMeta::default()
    })
}

/// What is left of `spec`'s deadline, in ms: the budget a request carries.
pub(crate) fn budget_ms(spec: &CallSpec) -> Result<u32, ApiError> {
    let left = spec.deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(deadline_exceeded());
    }
    Ok(u32::try_from(left.as_millis()).unwrap_or(u32::MAX))
}

/// `c<seq>`, without `fmt` (per call; 21 bytes at most, inside the string's inline room).
fn request_id(seq: u64) -> compact_str::CompactString {
    let mut id = compact_str::CompactString::const_new("c");
    id.push_str(itoa::Buffer::new().format(seq));
    id
}

/// Runs one call under `spec`: builds its `RequestContext` and gives up at the deadline,
/// dropping (and so cancelling) the request.
pub(crate) async fn within<T, F, Fut>(spec: impl Into<CallSpec>, f: F) -> Result<T, ApiError>
where
    F: FnOnce(CallMeta) -> Fut,
    Fut: Future<Output = Result<T, ApiError>>,
{
    let spec = spec.into();
    let meta = call_meta(&spec)?;
    tokio::time::timeout_at(spec.deadline, f(meta))
        .await
        .unwrap_or_else(|_| Err(deadline_exceeded()))
}

/// One `get` on the wire, its failure explained by `opened`; a missing key is `None`.
pub(crate) async fn get_one(
    kv: &kv_store::Client,
    direct: Option<&DirectCap>,
    opened: &SharedOutcome,
    key: &[u8],
    meta: CallMeta,
) -> Result<Option<Entry>, ApiError> {
    let fill = |mut p: kv_store::get_params::Builder<'_>| {
        meta.write(p.reborrow().init_ctx());
        p.set_key(key);
    };
    let r = match direct {
        // capkv's engine: the call without capnp's hook objects.
        Some(kv) => {
            async {
                direct_result!(kv, KV_STORE_ID, KV_GET, call_words(key.len()),
                    kv_store::get_params::Builder => fill,
                    kv_store::get_results::Reader, get_result,
                    Ok(e) => Ok(Some(read_entry(e.map_err(capnp_err)?)?)))
            }
            .await
        }
        None => {
            let mut req = kv.get_request();
            fill(req.get());
            async {
                decode_result!(req.send().promise, get_result,
                    Ok(e) => Ok(Some(read_entry(e.map_err(capnp_err)?)?)))
            }
            .await
        }
    };
    match r {
        Err(e) if e.code == ErrorCode::NotFound => Ok(None),
        Err(e) => Err(origin_failure(opened).await.unwrap_or(e)),
        ok => ok,
    }
}

/// `KvStore`'s interface id, for calls made on capkv's engine directly.
pub(crate) const KV_STORE_ID: u64 = <kv_store::Client as capnp::traits::HasTypeId>::TYPE_ID;
/// `KvStore.get`'s and `getMany`'s method numbers (their ordinals in `schema/kv.capnp`).
pub(crate) const KV_GET: u16 = 0;
pub(crate) const KV_GET_MANY: u16 = 3;

/// `Gateway`'s interface id and `open`'s method number, for the direct `open`.
pub(crate) const GATEWAY_ID: u64 =
    <capkv::kv_capnp::gateway::Client as capnp::traits::HasTypeId>::TYPE_ID;
pub(crate) const GATEWAY_OPEN: u16 = 2;
/// Where `open`'s results hold the `KvStore`: `OpenResults.result` (pointer 0), then
/// `OpenResult.kvCap` (pointer 1, after the union's).
pub(crate) const OPEN_KV_CAP: [u16; 2] = [0, 1];

/// `KvStore.session` and `KvStore.resumeSession`.
pub(crate) const KV_SESSION: u16 = 2;
pub(crate) const KV_RESUME_SESSION: u16 = 4;
/// Where both answers hold the `WriteSession`: `SessionResults.result` (pointer 0), then
/// `SessionResult.sessionCap` (pointer 2: after the union's and the token).
pub(crate) const SESSION_CAP: [u16; 2] = [0, 2];
/// `WriteSession`'s interface id and `put`'s method number.
pub(crate) const WRITE_SESSION_ID: u64 =
    <capkv::kv_capnp::write_session::Client as capnp::traits::HasTypeId>::TYPE_ID;
pub(crate) const SESSION_PUT: u16 = 0;

/// Words for one segment holding a direct call of a few fields, a context and `bytes` of
/// keys and values: a message that fits one segment is read on the server's fast path.
pub(crate) fn call_words(bytes: usize) -> u32 {
    u32::try_from(bytes / 8)
        .unwrap_or(u32::MAX)
        .saturating_add(48)
}

/// One `getMany` on the wire: `None` for each missing key, in `keys` order.
pub(crate) async fn wire_get_many<K: AsRef<[u8]>>(
    kv: &kv_store::Client,
    direct: Option<&DirectCap>,
    keys: &[K],
    meta: &CallMeta,
) -> Result<Vec<Option<Entry>>, ApiError> {
    let n = u32::try_from(keys.len()).map_err(|_| too_many(keys.len()))?;
    let fill = |mut p: kv_store::get_many_params::Builder<'_>| {
        meta.write(p.reborrow().init_ctx());
        let mut list = p.init_keys(n);
        for (i, k) in keys.iter().enumerate() {
            list.set(i as u32, k.as_ref());
        }
    };
    let items = |ok: capkv::kv_capnp::get_many_result::ok::Reader<'_>| {
        use capkv::kv_capnp::get_item::Which as Item;
        let items = ok.get_items().map_err(capnp_err)?;
        items
            .iter()
            .map(|item| match item.which() {
                Ok(Item::Found(e)) => Ok(Some(read_entry(e.map_err(capnp_err)?)?)),
                Ok(Item::NotFound(())) => Ok(None),
                Err(e) => Err(capnp_err(e.into())),
            })
            .collect()
    };
    match direct {
        // capkv's engine: the call without capnp's hook objects.
        Some(kv) => {
            // Each key: its bytes and a list element pointer.
            let bytes: usize = keys.iter().map(|k| k.as_ref().len() + 16).sum();
            direct_result!(kv, KV_STORE_ID, KV_GET_MANY, call_words(bytes),
                kv_store::get_many_params::Builder => fill,
                kv_store::get_many_results::Reader, get_many_result, Ok(ok) => items(ok))
        }
        None => {
            let mut req = kv.get_many_request();
            fill(req.get());
            decode_result!(req.send().promise, get_many_result, Ok(ok) => items(ok))
        }
    }
}

pub(crate) fn capnp_err(e: capnp::Error) -> ApiError {
    ApiError::from_capnp(&e)
}

pub(crate) fn deadline_exceeded() -> ApiError {
    ApiError::new(ErrorCode::DeadlineExceeded, "client deadline exceeded")
}

/// The connection ended because the peer is not a Cap'n Proto server at all.
pub(crate) fn is_not_capnp(e: &ApiError) -> bool {
    e.message.starts_with(capkv_rpc::transport::NOT_CAPNP)
}

pub(crate) fn too_many(n: usize) -> ApiError {
    ApiError::new(ErrorCode::TooManyItems, format!("{n} items is too many"))
}

pub(crate) fn read_text(t: capnp::Result<capnp::text::Reader<'_>>) -> String {
    t.ok()
        .and_then(|t| t.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn read_error(e: capnp::Result<capkv::kv_capnp::error::Reader<'_>>) -> ApiError {
    match e {
        Ok(e) => ApiError::read(e),
        Err(e) => capnp_err(e),
    }
}

pub(crate) fn read_faults(ok: capkv::kv_capnp::faults_result::ok::Reader<'_>) -> FaultsInfo {
    FaultsInfo {
        plan: read_text(ok.get_plan()),
        rules: ok.get_rules(),
    }
}

pub(crate) fn read_entry(e: capkv::kv_capnp::entry::Reader<'_>) -> Result<Entry, ApiError> {
    Ok(Entry {
        key: e.get_key().map_err(capnp_err)?.to_vec(),
        value: e.get_value().map_err(capnp_err)?.to_vec(),
        version: e.get_version(),
        mod_revision: e.get_mod_revision(),
    })
}

pub(crate) fn write_condition(mut b: condition::Builder<'_>, c: Condition) {
    match c {
        Condition::None => b.set_none(()),
        Condition::IfVersion(v) => b.set_if_version(v),
        Condition::IfAbsent => b.set_if_absent(()),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn request_ids_are_c_and_the_sequence_number() {
        assert_eq!(super::request_id(0), "c0");
        assert_eq!(super::request_id(42), "c42");
        assert_eq!(super::request_id(u64::MAX), format!("c{}", u64::MAX));
    }
}
