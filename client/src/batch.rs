//! Auto-batching: gets issued on one connection in the same scheduler tick leave as one
//! `getMany`, as ioredis' auto-pipelining or a DataLoader does (opt-in,
//! [`ClientOptions::auto_batch_keys`]).
//!
//! Why: every capnp-rpc call costs the server a Call, a Return and their bookkeeping, far
//! more than the lookup itself. Sixteen gets in flight on one connection cost sixteen of
//! those; one `getMany` of sixteen keys costs one (kv-loadgen, 50 connections x 16 in
//! flight: see bench/results.md).
//!
//! How:
//! - [`GetBatcher::enqueue`] adds a get to the connection's open batch. The first get of a
//!   batch spawns its flush task on the `LocalSet`; the task yields once, so every get
//!   issued by tasks already ready in this tick joins, then seals the batch and sends it.
//!   A lone get waits for nothing else: no timer, no Nagle-style delay.
//! - A batch holds at most `max_keys` gets; the next get opens a new batch.
//! - Keys are deduplicated: gets of one key share one item of the answer, which is read
//!   and sent once.
//! - One key's error fails a whole `getMany` (an empty or oversized key, an answer over the
//!   response limit, a server whose batch limit is lower): then each get of the batch is
//!   sent alone, so that every caller gets its own answer and no caller fails for another's
//!   key. Any other error (transport, overload, deadline) is every caller's.
//! - The batch's deadline is its earliest caller's, so callers need no timer of their own.
//!   If it runs out, the callers with time left are sent alone, each with its own
//!   deadline. Gets whose callers already gave up are dropped before sending.
//! - `getMany` reads all its keys at one revision: a batch is at least as consistent as
//!   the separate gets it replaces, and a get issued after a write was acknowledged still
//!   sees that write (the batch leaves after the get was issued).

use std::cell::{Cell, RefCell};
use std::rc::Rc;

use capkv::kv_capnp::kv_store;
use capkv::{ApiError, ErrorCode};
use capkv_rpc::client::DirectCap;
use futures::channel::oneshot;
use tokio::time::Instant;

use crate::wire::{get_one, origin_failure, wire_get_many, within, SharedOutcome};
use crate::{ClientOptions, Entry};

type Reply = Result<Option<Entry>, ApiError>;

/// One caller waiting in a batch.
struct Waiting {
    key: Vec<u8>,
    deadline: Instant,
    reply: oneshot::Sender<Reply>,
}

type Batch = Rc<RefCell<Vec<Waiting>>>;

/// The gets of one connection waiting to leave together.
pub(crate) struct GetBatcher {
    max_keys: usize,
    /// The batch still taking gets; its flush task is already spawned.
    open: RefCell<Option<Batch>>,
    stats: Cell<BatchStats>,
}

/// What a connection's auto-batching has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BatchStats {
    /// Gets that went through the batcher.
    pub gets: u64,
    /// `get` and `getMany` calls it sent for them: `gets / calls` keys per call.
    pub calls: u64,
}

impl GetBatcher {
    /// A batcher for `options`, or `None` when auto-batching is off (fewer than 2 keys).
    /// Batches never exceed the server's `max_batch_items` as the options know it.
    pub(crate) fn new(options: &ClientOptions) -> Option<Rc<GetBatcher>> {
        let limit = usize::try_from(options.limits.max_batch_items).unwrap_or(usize::MAX);
        let max_keys = options.auto_batch_keys.min(limit);
        (max_keys >= 2).then(|| {
            Rc::new(GetBatcher {
                max_keys,
                open: RefCell::new(None),
                stats: Cell::default(),
            })
        })
    }

    /// Adds a get of `key` to the open batch (opening one and spawning its flush task if
    /// there is none, or it is full); the answer arrives on the returned channel.
    pub(crate) fn enqueue(
        self: &Rc<Self>,
        key: Vec<u8>,
        deadline: Instant,
        kv: &kv_store::Client,
        direct: Option<&Rc<DirectCap>>,
        opened: &SharedOutcome,
    ) -> oneshot::Receiver<Reply> {
        self.count(1, 0);
        let (reply, answer) = oneshot::channel();
        let waiting = Waiting {
            key,
            deadline,
            reply,
        };
        let mut open = self.open.borrow_mut();
        match open.as_ref() {
            Some(batch) if batch.borrow().len() < self.max_keys => {
                batch.borrow_mut().push(waiting);
            }
            _ => {
                // Most batches are small: do not reserve a large maximum up front.
                let mut gets = Vec::with_capacity(self.max_keys.min(16));
                gets.push(waiting);
                let batch: Batch = Rc::new(RefCell::new(gets));
                *open = Some(Rc::clone(&batch));
                tokio::task::spawn_local(flush(
                    Rc::clone(self),
                    batch,
                    Kv {
                        client: kv.clone(),
                        direct: direct.cloned(),
                    },
                    opened.clone(),
                ));
            }
        }
        answer
    }

    pub(crate) fn stats(&self) -> BatchStats {
        self.stats.get()
    }

    fn count(&self, gets: u64, calls: u64) {
        let mut s = self.stats.get();
        s.gets += gets;
        s.calls += calls;
        self.stats.set(s);
    }
}

/// Whether a failed `getMany` may have failed for one key's sake (so that its gets, sent
/// alone, could each get a different answer).
fn failed_for_one_key(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::EmptyKey
            | ErrorCode::KeyTooLarge
            | ErrorCode::InvalidArgument
            | ErrorCode::TooManyItems
            | ErrorCode::ResponseTooLarge
            | ErrorCode::RequestTooLarge
    )
}

/// The flush task of `batch`: lets the tick's other gets join, seals the batch, sends it
/// and answers every caller.
/// The `KvStore` a flush calls: its generated client and, on capkv's engine, the same
/// capability for direct calls.
struct Kv {
    client: kv_store::Client,
    direct: Option<Rc<DirectCap>>,
}

async fn flush(batcher: Rc<GetBatcher>, batch: Batch, kv: Kv, opened: SharedOutcome) {
    tokio::task::yield_now().await;
    {
        let mut open = batcher.open.borrow_mut();
        if open.as_ref().is_some_and(|o| Rc::ptr_eq(o, &batch)) {
            *open = None;
        }
    }
    let mut gets = std::mem::take(&mut *batch.borrow_mut());
    gets.retain(|g| !g.reply.is_canceled());
    // The batch gives up at its earliest caller's deadline, so that no caller needs a
    // timer of its own; callers with time left are then served alone (below).
    let Some(deadline) = gets.iter().map(|g| g.deadline).min() else {
        return;
    };
    if gets.len() == 1 {
        send_alone(&batcher, gets, &kv, &opened).await;
        return;
    }
    let (keys, slots) = distinct_keys(&gets);
    batcher.count(0, 1);
    let (kv_ref, keys_ref) = (&kv, &keys);
    let result = within(deadline, |meta| async move {
        wire_get_many(&kv_ref.client, kv_ref.direct.as_deref(), keys_ref, &meta).await
    })
    .await;
    match result {
        Ok(mut items) if items.len() == keys.len() => {
            // Move each entry to its last caller; clone it for the others (repeated keys).
            let mut uses = vec![0usize; keys.len()];
            for &slot in &slots {
                uses[slot] += 1;
            }
            for (g, slot) in gets.into_iter().zip(slots) {
                uses[slot] -= 1;
                let item = if uses[slot] == 0 {
                    items[slot].take()
                } else {
                    items[slot].clone()
                };
                let _ = g.reply.send(Ok(item));
            }
        }
        Ok(items) => {
            let e = ApiError::new(
                ErrorCode::Internal,
                format!(
                    "getMany answered {} items for {} keys",
                    items.len(),
                    keys.len()
                ),
            );
            answer_all(gets, &e);
        }
        Err(e) if failed_for_one_key(e.code) => send_alone(&batcher, gets, &kv, &opened).await,
        Err(e) if e.code == ErrorCode::DeadlineExceeded => {
            // The batch ran under the earliest deadline, which ran out: its callers get
            // the error; callers with a later deadline try again alone.
            let (late, left): (Vec<_>, Vec<_>) =
                gets.into_iter().partition(|g| g.deadline <= deadline);
            answer_all(late, &e);
            send_alone(&batcher, left, &kv, &opened).await;
        }
        Err(e) => {
            let e = origin_failure(&opened).await.unwrap_or(e);
            answer_all(gets, &e);
        }
    }
}

/// The batch's distinct keys (sorted) and, for each get, the index of its key among them
/// (a hot key asked for by many callers is read and sent once). Sorting, not hashing:
/// batches are small, keys short. The keys are borrowed from `gets`, not copied.
fn distinct_keys(gets: &[Waiting]) -> (Vec<&[u8]>, Vec<usize>) {
    let mut order: Vec<usize> = (0..gets.len()).collect();
    order.sort_unstable_by(|&a, &b| gets[a].key.cmp(&gets[b].key));
    let mut keys: Vec<&[u8]> = Vec::with_capacity(gets.len());
    let mut slots = vec![0usize; gets.len()];
    for i in order {
        let key = gets[i].key.as_slice();
        if keys.last() != Some(&key) {
            keys.push(key);
        }
        slots[i] = keys.len() - 1;
    }
    (keys, slots)
}

fn answer_all(gets: Vec<Waiting>, e: &ApiError) {
    for g in gets {
        let _ = g.reply.send(Err(e.clone()));
    }
}

/// Sends each get as its own `get` call (concurrently) and answers its caller.
async fn send_alone(batcher: &GetBatcher, gets: Vec<Waiting>, kv: &Kv, opened: &SharedOutcome) {
    batcher.count(0, gets.len() as u64);
    futures::future::join_all(gets.into_iter().map(|g| async move {
        let r = within(g.deadline, |meta| {
            get_one(&kv.client, kv.direct.as_deref(), opened, &g.key, meta)
        })
        .await;
        let _ = g.reply.send(r);
    }))
    .await;
}
