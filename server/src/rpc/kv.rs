//! `KvStore`: reads, and the way to a write session; exists only behind a successful
//! `Gateway.open`.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;

use capkv::kv_capnp::{
    get_many_result, kv_store, scan_result, session_result, watch_result, watcher, write_session,
};
use capkv::{ApiError, ErrorCode};

use capkv_rpc::local::Now;

use super::{
    direct, handle, now, reply_of, store_error, waiting, write_entry, write_entry_parts,
    WatcherImpl, WriteSessionImpl,
};
use crate::chain::{CapSlot, Conn, Shared};
use crate::method::Method;
use crate::refused::Refused;
use crate::session::TOKEN_BYTES;
use crate::validate;
use capkv_store::Entry;

pub struct KvStoreImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    _slot: CapSlot,
}

/// A get's value buffer is kept for the next get only up to this capacity.
const VALUE_BUF_KEPT_BYTES: usize = 16 * 1024;

thread_local! {
    /// A get's value, between the store and the reply (see `get_now`): empty while a get
    /// holds it, so a second get at the same time (one deferred) takes a new one. One per
    /// worker thread, not per capability: with 1,000 connections taking turns, each
    /// capability's own buffer was cold at every get, written by the store and read back
    /// for the reply (cachegrind, 2 MiB last level: ~3 misses a get of 100 bytes).
    static VALUE_BUF: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// How far past the store's revision a watch may start (`watch`'s `startRevision`): far
/// enough for any real resume, near enough that the watchers' summed positions
/// (`chain::WatchStats`) cannot overflow.
const MAX_WATCH_AHEAD_REVISIONS: u64 = 1 << 32;

impl KvStoreImpl {
    pub(super) fn new(shared: Arc<Shared>, conn: Rc<Conn>, slot: CapSlot) -> Self {
        Self {
            shared,
            conn,
            _slot: slot,
        }
    }

    /// A `session` or `resumeSession` result: the write capability (outside the union too),
    /// or the error and a stand-in.
    fn write_session(
        &self,
        mut out: session_result::Builder<'_>,
        r: Result<([u8; TOKEN_BYTES], CapSlot), ApiError>,
    ) {
        match r {
            Ok((token, slot)) => {
                let session = WriteSessionImpl::new(
                    Arc::clone(&self.shared),
                    Rc::clone(&self.conn),
                    token,
                    slot,
                );
                // Its direct methods are all writes: answered at once on the memory
                // engine, else waiting in the engine for their commit (`Now::Wait`).
                let session: write_session::Client = capkv_rpc::local::new_direct_client(session);
                out.set_session(session.clone());
                out.set_session_cap(session);
                out.set_token(&token);
            }
            Err(e) => {
                e.write(out.reborrow().init_error());
                out.set_session_cap(Refused::client(&self.shared, &self.conn, e));
            }
        }
    }
}

impl KvStoreImpl {
    /// A `watch` result: the watcher (outside the union too) and the revision it started
    /// at, or the error and a stand-in.
    fn write_watcher(
        &self,
        mut out: watch_result::Builder<'_>,
        r: Result<(WatcherImpl, u64), ApiError>,
    ) {
        match r {
            Ok((w, revision)) => {
                let w: watcher::Client = capkv_rpc::local::new_client(w);
                out.set_watcher(w.clone());
                out.set_watcher_cap(w);
                out.set_revision(revision);
            }
            Err(e) => {
                out.set_oldest_revision(e.oldest_revision);
                e.write(out.reborrow().init_error());
                out.set_watcher_cap(Refused::client(&self.shared, &self.conn, e));
            }
        }
    }
}

impl kv_store::Server for KvStoreImpl {
    async fn watch(
        self: Rc<Self>,
        params: kv_store::WatchParams,
        mut results: kv_store::WatchResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Watch,
            |this, p, call| {
                let range = validate::watch_range(&call.tunables.limits, p.get_range())?;
                let store = &this.shared.store;
                let head = store.revision().map_err(store_error)?;
                // Start 0: from the next write. Otherwise the events from the start on; a
                // start far past the store's revision is a mistake (it would wait for
                // billions of writes), and its position would swamp the watchers' lag.
                let after = match p.get_start_revision() {
                    0 => head,
                    start if start - 1 > head.saturating_add(MAX_WATCH_AHEAD_REVISIONS) => {
                        return Err(ApiError::new(
                            ErrorCode::InvalidArgument,
                            format!(
                                "startRevision {start} is more than {MAX_WATCH_AHEAD_REVISIONS} \
                                 revisions past the store's revision {head}"
                            ),
                        ));
                    }
                    start => start - 1,
                };
                // A start the history no longer holds fails here, not at the first `next`.
                store
                    .events(&range, after, capkv_store::PageLimits::events(1))
                    .map_err(store_error)?;
                let max = call.tunables.max_capabilities_per_connection;
                let slot = this.conn.cap_slot(&this.shared, max)?;
                let w = WatcherImpl::new(
                    Arc::clone(&this.shared),
                    Rc::clone(&this.conn),
                    range,
                    after,
                    slot,
                );
                Ok((w, head))
            },
            with = |out, r| self.write_watcher(out, r)
        )
    }

    fn get(
        self: Rc<Self>,
        params: kv_store::GetParams,
        mut results: kv_store::GetResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        if !self.shared.store.reads_complete_at_once() {
            return waiting(self.get_waiting(params, results));
        }
        let now = self.get_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }

    fn scan(
        self: Rc<Self>,
        params: kv_store::ScanParams,
        mut results: kv_store::ScanResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        if !self.shared.store.reads_complete_at_once() {
            return waiting(self.scan_waiting(params, results));
        }
        let now = self.scan_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }

    async fn session(
        self: Rc<Self>,
        params: kv_store::SessionParams,
        mut results: kv_store::SessionResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Session,
            |this, p, call| {
                let max = call.tunables.max_capabilities_per_connection;
                let slot = this.conn.cap_slot(&this.shared, max)?;
                Ok((this.shared.sessions.issue(), slot))
            },
            with = |out, r| self.write_session(out, r)
        )
    }

    async fn resume_session(
        self: Rc<Self>,
        params: kv_store::ResumeSessionParams,
        mut results: kv_store::ResumeSessionResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::ResumeSession,
            |this, p, call| {
                let token = p.get_token().map_err(|e| {
                    ApiError::new(
                        ErrorCode::InvalidArgument,
                        format!("cannot read token: {e}"),
                    )
                })?;
                let owned = <[u8; TOKEN_BYTES]>::try_from(token)
                    .ok()
                    .filter(|_| this.shared.sessions.verify(token))
                    .ok_or_else(|| {
                        ApiError::new(ErrorCode::PermissionDenied, "unknown session token")
                    })?;
                let max = call.tunables.max_capabilities_per_connection;
                Ok((owned, this.conn.cap_slot(&this.shared, max)?))
            },
            with = |out, r| self.write_session(out, r)
        )
    }

    fn get_many(
        self: Rc<Self>,
        params: kv_store::GetManyParams,
        mut results: kv_store::GetManyResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        if !self.shared.store.reads_complete_at_once() {
            return waiting(self.get_many_waiting(params, results));
        }
        let now = self.get_many_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }
}

direct!(KvStoreImpl, kv_store::Client, { 0 => get_now, 1 => scan_now, 3 => get_many_now });

/// The cores of the methods served at once ([`now!`]), for both paths.
impl KvStoreImpl {
    fn get_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<kv_store::get_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<kv_store::get_results::Builder<'r>>,
    ) -> Now {
        now!(
            self,
            params,
            results,
            kv_store::get_params::Owned,
            kv_store::get_results::Owned,
            Method::Get,
            |this, p, call| {
                let key = validate::key(&call.tunables.limits, p.get_key())?;
                // The value is read into the thread's spare buffer, and the key answered
                // is the one asked for: no allocation per get.
                let mut value = VALUE_BUF.take();
                match this.shared.store.get_into(key, &mut value) {
                    Ok(Some(found)) => Ok((key, value, found)),
                    Ok(None) => Err(not_found()),
                    Err(e) => Err(store_error(e)),
                }
            },
            with = |out, r| {
                match r {
                    Ok((key, value, found)) => {
                        write_entry_parts(out.init_ok(), key, &value, found);
                        // Kept for the next get, unless a large value made it large.
                        if value.capacity() <= VALUE_BUF_KEPT_BYTES {
                            VALUE_BUF.set(value);
                        }
                    }
                    Err(e) => e.write(out.init_error()),
                }
            }
        )
    }

    fn scan_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<kv_store::scan_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<kv_store::scan_results::Builder<'r>>,
    ) -> Now {
        now!(
            self,
            params,
            results,
            kv_store::scan_params::Owned,
            kv_store::scan_results::Owned,
            Method::Scan,
            |this, p, call| {
                let req = validate::scan(
                    &call.tunables.limits,
                    p.get_range(),
                    this.shared.store.scans_pin_revision(),
                )?;
                this.shared.store.scan(&req).map_err(store_error)
            },
            ok = |ok, page| { write_scan_page(ok, &page, this.shared.store.scans_pin_revision())? }
        )
    }

    fn get_many_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<kv_store::get_many_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<kv_store::get_many_results::Builder<'r>>,
    ) -> Now {
        now!(
            self,
            params,
            results,
            kv_store::get_many_params::Owned,
            kv_store::get_many_results::Owned,
            Method::GetMany,
            |this, p, call| {
                let limits = &call.tunables.limits;
                let keys = get_many_keys(limits, &p)?;
                let max = limits.max_response_payload_bytes();
                match this
                    .shared
                    .store
                    .get_many_within(&keys, max)
                    .map_err(store_error)?
                {
                    // Counted by the store, within the bound already.
                    Some(read) => Ok(read),
                    None => Err(too_large_for_one_answer(max)),
                }
            },
            ok = |ok, (items, revision)| { write_get_many(ok, &items, revision) }
        )
    }
}

/// The cores of the reads on a store whose reads wait ([`waiting`]): the same work and
/// replies as the `now!` cores, awaiting the store's `_async` reads inside the chain.
impl KvStoreImpl {
    async fn get_waiting(
        self: Rc<Self>,
        params: kv_store::GetParams,
        mut results: kv_store::GetResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Get,
            |this, p, call| {
                let key = validate::key(&call.tunables.limits, p.get_key())?;
                let entry = this.shared.store.get_async(key).await;
                entry.map_err(store_error)?.ok_or_else(not_found)
            },
            ok = |ok, e| { write_entry(ok, &e) }
        )
    }

    async fn scan_waiting(
        self: Rc<Self>,
        params: kv_store::ScanParams,
        mut results: kv_store::ScanResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Scan,
            |this, p, call| {
                let req = validate::scan(
                    &call.tunables.limits,
                    p.get_range(),
                    this.shared.store.scans_pin_revision(),
                )?;
                this.shared
                    .store
                    .scan_async(&req)
                    .await
                    .map_err(store_error)
            },
            ok = |ok, page| { write_scan_page(ok, &page, this.shared.store.scans_pin_revision())? }
        )
    }

    async fn get_many_waiting(
        self: Rc<Self>,
        params: kv_store::GetManyParams,
        mut results: kv_store::GetManyResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::GetMany,
            |this, p, call| {
                let limits = &call.tunables.limits;
                let keys = get_many_keys(limits, &p)?;
                let read = this.shared.store.get_many_async(&keys).await;
                answer_fits(limits, read.map_err(store_error)?)
            },
            ok = |ok, (items, revision)| { write_get_many(ok, &items, revision) }
        )
    }
}

fn not_found() -> ApiError {
    ApiError::new(ErrorCode::NotFound, "key not found")
}

/// A `getMany`'s keys, each within the limits.
fn get_many_keys<'a>(
    limits: &capkv::Limits,
    p: &kv_store::get_many_params::Reader<'a>,
) -> Result<Vec<&'a [u8]>, ApiError> {
    let list = p
        .get_keys()
        .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, format!("cannot read keys: {e}")))?;
    validate::batch_len(limits, list.len())?;
    list.iter()
        .enumerate()
        .map(|(i, k)| validate::key(limits, k).map_err(validate::at_item(i)))
        .collect()
}

/// A `getMany`'s answer, when its keys and values fit one response.
fn answer_fits(
    limits: &capkv::Limits,
    (items, revision): (Vec<Option<Entry>>, u64),
) -> Result<(Vec<Option<Entry>>, u64), ApiError> {
    let payload = capkv_store::payload_bytes(&items);
    let max = limits.max_response_payload_bytes();
    if payload > max {
        return Err(ApiError::new(
            ErrorCode::ResponseTooLarge,
            format!("the answer holds {payload} bytes of keys and values; the limit is {max}"),
        ));
    }
    Ok((items, revision))
}

/// A `getMany` whose entries hold more than one answer may (counted by the store before
/// it copied them: [`capkv_store::Store::get_many_within`]).
fn too_large_for_one_answer(max: usize) -> ApiError {
    ApiError::new(
        ErrorCode::ResponseTooLarge,
        format!("the answer would hold more than {max} bytes of keys and values, the limit"),
    )
}

fn write_get_many(
    mut ok: get_many_result::ok::Builder<'_>,
    items: &[Option<Entry>],
    revision: u64,
) {
    ok.set_revision(revision);
    let mut list = ok.init_items(items.len() as u32);
    for (i, item) in items.iter().enumerate() {
        let mut b = list.reborrow().get(i as u32);
        match item {
            Some(e) => write_entry(b.init_found(), e),
            None => b.set_not_found(()),
        }
    }
}

/// A scan page's `ok` group; `pin`: its cursor pins the page's revision for the next.
fn write_scan_page(
    mut ok: scan_result::ok::Builder<'_>,
    page: &capkv_store::ScanPage,
    pin: bool,
) -> capnp::Result<()> {
    ok.set_revision(page.revision);
    if page.more {
        if let Some(last) = page.entries.last() {
            let revision = pin.then_some(page.revision);
            ok.set_next_cursor(&validate::next_cursor(&last.key, revision));
        }
    }
    let len = u32::try_from(page.entries.len())
        .map_err(|_| capnp::Error::failed("scan page too long".into()))?;
    let mut list = ok.init_entries(len);
    for (i, e) in page.entries.iter().enumerate() {
        write_entry(list.reborrow().get(i as u32), e);
    }
    Ok(())
}
