//! Message sequences for the engine, decoded from arbitrary bytes: what the fuzz target
//! (`fuzz/fuzz_targets/engine.rs`) and a seeded test feed [`serve`](super::serve). Each
//! byte picks a message kind and its ids from small ranges, so that ids collide, answers
//! are pipelined on, finished and released in every order, and some messages are garbage.
//! Not part of the API.

use std::cell::Cell;
use std::rc::Rc;

use capnp::capability::Promise;
use capnp::message;
use capnp::private::capability::{ClientHook, ParamsHook, ResultsHook};
use capnp_rpc::rpc_capnp::message as rpc_message;

use super::{serve, Closer, EngineLimits};
use crate::local::{Direct, Now};

/// A capability whose methods answer with a new capability (0), an error (1), or a new
/// capability after yields (2, so that calls overlap and queue on answers that return
/// capabilities later); methods 3 to 6 it answers on the engine's
/// direct path ([`ScriptDirect`]) when called as an export, and as 0 to 2 when pipelined.
/// Its `get_ptr` is its id.
pub(crate) struct ScriptCap {
    id: usize,
    next_id: Rc<Cell<usize>>,
    /// Its direct object, registered under its id while a hook of it lives.
    direct: Rc<dyn Direct>,
}

impl ScriptCap {
    /// Capability `id`; those it makes are numbered from `id + 1`.
    pub(crate) fn new(id: usize) -> Self {
        Self::numbered(id, Rc::new(Cell::new(id + 1)))
    }

    fn numbered(id: usize, next_id: Rc<Cell<usize>>) -> Self {
        let direct: Rc<dyn Direct> = Rc::new(ScriptDirect::default());
        crate::local::register(id, &direct);
        Self {
            id,
            next_id,
            direct,
        }
    }
}

/// The direct path of a [`ScriptCap`]: answers at once (3), fails at once (4), defers to
/// a result after a yield (5), waits a yield and then answers or fails, by turns
/// (6: [`Now::Wait`]), and leaves every other method to the hook.
#[derive(Default)]
struct ScriptDirect {
    /// Waiting calls made so far (every other one fails).
    waits: Cell<usize>,
}

impl Direct for ScriptDirect {
    fn call_now(
        self: Rc<Self>,
        _interface_id: u64,
        method_id: u16,
        _params: capnp::any_pointer::Reader<'_>,
        _results: capnp::any_pointer::Builder<'_>,
    ) -> Now {
        match method_id {
            3 => Now::Done(Ok(())),
            4 => Now::Done(Err(capnp::Error::failed("scripted direct failure".into()))),
            5 => Now::Defer(Box::new(|_params, results| {
                Promise::from_future(async move {
                    tokio::task::yield_now().await;
                    drop(results);
                    Ok(())
                })
            })),
            6 => {
                let fail = self.waits.get() % 2 == 1;
                self.waits.set(self.waits.get() + 1);
                Now::Wait(Box::pin(Waits {
                    yielded: false,
                    fail,
                }))
            }
            _ => Now::Elsewhere,
        }
    }
}

/// A waiting direct call of [`ScriptDirect`]: ready after one yield.
struct Waits {
    yielded: bool,
    fail: bool,
}

impl crate::local::Waiting for Waits {
    fn poll_ready(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        if std::mem::replace(&mut self.yielded, true) {
            std::task::Poll::Ready(())
        } else {
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    }

    fn answer(
        self: std::pin::Pin<&mut Self>,
        _results: capnp::any_pointer::Builder<'_>,
    ) -> capnp::Result<()> {
        if self.fail {
            return Err(capnp::Error::failed("scripted waiting failure".into()));
        }
        Ok(())
    }
}

impl ClientHook for ScriptCap {
    fn add_ref(&self) -> Box<dyn ClientHook> {
        Box::new(ScriptCap {
            id: self.id,
            next_id: Rc::clone(&self.next_id),
            direct: Rc::clone(&self.direct),
        })
    }
    fn new_call(
        &self,
        _: u64,
        _: u16,
        _: Option<capnp::MessageSize>,
    ) -> capnp::capability::Request<capnp::any_pointer::Owned, capnp::any_pointer::Owned> {
        capnp::capability::Request::new(Box::new(NoRequest))
    }
    fn call(
        &self,
        _interface_id: u64,
        method_id: u16,
        params: Box<dyn ParamsHook>,
        mut results: Box<dyn ResultsHook>,
    ) -> Promise<(), capnp::Error> {
        let _ = params.get();
        let next_id = Rc::clone(&self.next_id);
        // The results: a new capability.
        let answer = move |results: &mut Box<dyn ResultsHook>| {
            let id = next_id.get();
            next_id.set(id + 1);
            let cap = Box::new(ScriptCap::numbered(id, Rc::clone(&next_id)));
            results
                .get()
                .map(|mut content| content.set_as_capability(cap))
        };
        match method_id % 3 {
            0 => Promise::from(answer(&mut results)),
            1 => Promise::err(capnp::Error::failed("scripted failure".into())),
            // A few yields: the connection handles a message between two, so the calls
            // that follow it arrive while it still runs.
            _ => Promise::from_future(async move {
                for _ in 0..4 {
                    bounce().await;
                }
                answer(&mut results)
            }),
        }
    }
    fn get_brand(&self) -> usize {
        0
    }
    fn get_ptr(&self) -> usize {
        self.id
    }
    fn get_resolved(&self) -> Option<Box<dyn ClientHook>> {
        None
    }
    fn when_more_resolved(&self) -> Option<Promise<Box<dyn ClientHook>, capnp::Error>> {
        None
    }
    fn when_resolved(&self) -> Promise<(), capnp::Error> {
        Promise::ok(())
    }
}

/// Pending once, waking itself at once: what a call that waits looks like to the
/// connection, which goes on with its other work before polling it again. (Not
/// `tokio::task::yield_now`, whose wake-up waits until the runtime is idle, so that a
/// connection with input always ready would never see it.)
async fn bounce() {
    let mut bounced = false;
    std::future::poll_fn(|cx| {
        if bounced {
            std::task::Poll::Ready(())
        } else {
            bounced = true;
            cx.waker().wake_by_ref();
            std::task::Poll::Pending
        }
    })
    .await
}

/// Never used: the engine makes no outgoing calls.
struct NoRequest;

impl capnp::private::capability::RequestHook for NoRequest {
    fn get(&mut self) -> capnp::any_pointer::Builder<'_> {
        unreachable!("the engine makes no outgoing calls")
    }
    fn get_brand(&self) -> usize {
        0
    }
    fn send(self: Box<Self>) -> capnp::capability::RemotePromise<capnp::any_pointer::Owned> {
        unreachable!("the engine makes no outgoing calls")
    }
    fn send_streaming(self: Box<Self>) -> Promise<(), capnp::Error> {
        Promise::err(capnp::Error::unimplemented("no outgoing calls".into()))
    }
    fn tail_send(
        self: Box<Self>,
    ) -> Option<(
        u32,
        Promise<(), capnp::Error>,
        Box<dyn capnp::private::capability::PipelineHook>,
    )> {
        None
    }
}

/// The messages `input` describes, each framed as on the wire.
pub fn messages(input: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bytes = input.iter().copied();
    let mut next = move || bytes.next();
    while let Some(kind) = next() {
        let a = u32::from(next().unwrap_or(0));
        let b = next().unwrap_or(0);
        let mut m = message::Builder::new_default();
        let root = m.init_root::<rpc_message::Builder>();
        match kind % 9 {
            0 => root.init_bootstrap().set_question_id(a % 8),
            1 | 2 => {
                let mut c = root.init_call();
                c.set_question_id(a % 8);
                c.set_interface_id(1);
                c.set_method_id(u16::from(b % 7));
                let t = c.reborrow().init_target();
                if kind % 9 == 1 {
                    t.init_promised_answer().set_question_id(u32::from(b) % 8);
                } else {
                    let mut t = t;
                    t.set_imported_cap(u32::from(b) % 4);
                }
                c.init_params();
            }
            3 => {
                let mut p = root.init_call();
                p.set_question_id(a % 8);
                let mut pa = p.reborrow().init_target().init_promised_answer();
                pa.set_question_id(u32::from(b) % 8);
                let mut ops = pa.init_transform(u32::from(b % 3));
                for i in 0..ops.len() {
                    ops.reborrow()
                        .get(i)
                        .set_get_pointer_field(u16::from(b % 2));
                }
                p.init_params();
            }
            4 => {
                let mut f = root.init_finish();
                f.set_question_id(a % 8);
                f.set_release_result_caps(b % 2 == 0);
            }
            5 => {
                let mut r = root.init_release();
                r.set_id(a % 4);
                r.set_reference_count(u32::from(b % 3));
            }
            6 => root.init_resolve().set_promise_id(a),
            7 => root.init_abort().set_reason("scripted"),
            _ => {
                // Garbage: a frame whose one segment is these bytes.
                let words = 1 + (a as usize % 4);
                out.extend_from_slice(&0u32.to_le_bytes());
                out.extend_from_slice(&(words as u32).to_le_bytes());
                for i in 0..words * 8 {
                    out.push(b.wrapping_mul(i as u8 + 1));
                }
                continue;
            }
        }
        let _ = capnp::serialize::write_message(&mut out, &m);
    }
    out
}

/// Serves the messages `input` describes to completion; panics only if the engine does
/// (its tables are checked after every step in debug builds).
pub fn run(input: &[u8]) {
    // Timers: the engine bounds its last write with one.
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    else {
        return;
    };
    let wire = messages(input);
    tokio::task::LocalSet::new().block_on(&rt, async move {
        let bootstrap = Box::new(ScriptCap::new(0));
        let limits = EngineLimits {
            max_answers: 16,
            ..EngineLimits::default()
        };
        let _ = serve(
            crate::frames::ByteFrames::new(Trickle::new(wire), 1 << 20),
            futures::io::sink(),
            bootstrap,
            limits,
            Closer::default(),
        )
        .await;
    });
}

/// The input as a peer on a slow link sends it: a few bytes a read, the connection's
/// loop yielding between reads, so that calls which wait end between messages (and calls
/// pipelined on them queue, or not) instead of the whole input arriving in one pass.
struct Trickle {
    input: std::io::Cursor<Vec<u8>>,
    turn: bool,
}

impl Trickle {
    /// Bytes a read gives at most: partial frames too.
    const CHUNK_BYTES: usize = 48;

    fn new(input: Vec<u8>) -> Self {
        Self {
            input: std::io::Cursor::new(input),
            turn: false,
        }
    }
}

impl futures::io::AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut [u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.turn = !self.turn;
        if self.turn {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let n = buf.len().min(Self::CHUNK_BYTES);
        std::task::Poll::Ready(std::io::Read::read(&mut self.input, &mut buf[..n]))
    }
}

#[cfg(test)]
mod tests {
    /// What CI runs of the fuzz target: seeded random sequences.
    #[test]
    fn ten_thousand_random_message_sequences_leave_the_engine_consistent() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let len = 8 + (state % 120) as usize;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            super::run(&input);
        }
    }
}
