//! `WriteSession`: the writes; exists only behind `KvStore.session`/`resumeSession`. Its
//! token scopes the idempotency keys of the writes made through it.

use std::rc::Rc;
use std::sync::Arc;

use capkv::kv_capnp::write_session;
use capkv::ApiError;
use capkv_store::{write, IdempotencyKey, StoreError, Write};

use super::{handle, store_error};
use crate::chain::{CapSlot, Conn, Shared};
use crate::method::Method;
use crate::session::TOKEN_BYTES;
use crate::validate;

pub struct WriteSessionImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    token: [u8; TOKEN_BYTES],
    _slot: CapSlot,
}

impl WriteSessionImpl {
    pub(super) fn new(
        shared: Arc<Shared>,
        conn: Rc<Conn>,
        token: [u8; TOKEN_BYTES],
        slot: CapSlot,
    ) -> Self {
        Self {
            shared,
            conn,
            token,
            _slot: slot,
        }
    }

    /// Applies `w`, idempotently when the caller gave a key; answers with `w`'s own outcome.
    async fn write<W: Write>(
        &self,
        w: W,
        key: Option<Vec<u8>>,
        idempotency_ttl_ms: u64,
    ) -> Result<W::Outcome, ApiError> {
        let idem = key.map(|key| IdempotencyKey {
            session: self.token.to_vec(),
            key,
            expires_at_unix_ms: write::now_unix_ms().saturating_add(idempotency_ttl_ms),
        });
        let r = self.shared.store.apply(w, idem).await;
        if matches!(r, Err(StoreError::IdempotencyKeyReused)) {
            metrics::counter!(crate::metrics::IDEMPOTENCY_CONFLICTS_TOTAL).increment(1);
        }
        r.map_err(store_error)
    }
}

impl write_session::Server for WriteSessionImpl {
    async fn increment(
        self: Rc<Self>,
        params: write_session::IncrementParams,
        mut results: write_session::IncrementResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Increment,
            |this, p, call| {
                let key = validate::key(&call.tunables.limits, p.get_key())?;
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                let w = write::Increment {
                    key: key.to_vec(),
                    delta: p.get_delta(),
                };
                this.write(w, idem, call.tunables.idempotency_ttl_ms).await
            },
            ok = |ok, o| {
                ok.set_value(o.value);
                ok.set_version(o.version);
                ok.set_revision(o.revision);
            }
        )
    }

    async fn put(
        self: Rc<Self>,
        params: write_session::PutParams,
        mut results: write_session::PutResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Put,
            |this, p, call| {
                let limits = &call.tunables.limits;
                let w = write::Put {
                    key: validate::key(limits, p.get_key())?.to_vec(),
                    value: validate::value(limits, p.get_value())?.to_vec(),
                    cond: validate::condition(p.get_condition())?,
                };
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                this.write(w, idem, call.tunables.idempotency_ttl_ms).await
            },
            ok = |ok, o| {
                ok.set_version(o.version);
                ok.set_revision(o.revision);
            }
        )
    }

    async fn delete(
        self: Rc<Self>,
        params: write_session::DeleteParams,
        mut results: write_session::DeleteResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Delete,
            |this, p, call| {
                let w = write::Delete {
                    key: validate::key(&call.tunables.limits, p.get_key())?.to_vec(),
                    cond: validate::condition(p.get_condition())?,
                };
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                this.write(w, idem, call.tunables.idempotency_ttl_ms).await
            },
            ok = |ok, o| {
                ok.set_existed(o.existed);
                ok.set_revision(o.revision);
            }
        )
    }

    async fn put_many(
        self: Rc<Self>,
        params: write_session::PutManyParams,
        mut results: write_session::PutManyResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::PutMany,
            |this, p, call| {
                let list = p.get_items().map_err(|e| {
                    ApiError::new(
                        capkv::ErrorCode::InvalidArgument,
                        format!("cannot read items: {e}"),
                    )
                })?;
                let limits = &call.tunables.limits;
                validate::batch_len(limits, list.len())?;
                let items = list
                    .iter()
                    .enumerate()
                    .map(|(i, item)| validate::put_item(limits, item).map_err(validate::at_item(i)))
                    .collect::<Result<Vec<_>, ApiError>>()?;
                let keys: Vec<&[u8]> = items.iter().map(|i| i.key).collect();
                validate::distinct_keys(&keys)?;
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                let w = write::PutMany {
                    items: items
                        .iter()
                        .map(|i| (i.key.to_vec(), i.value.to_vec(), i.cond))
                        .collect(),
                };
                this.write(w, idem, call.tunables.idempotency_ttl_ms).await
            },
            ok = |ok, o| {
                ok.set_revision(o.revision);
                let mut versions = ok.init_versions(o.versions.len() as u32);
                for (i, v) in o.versions.iter().enumerate() {
                    versions.set(i as u32, *v);
                }
            }
        )
    }
}
