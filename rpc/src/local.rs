//! Capabilities this process serves, as the engine calls them.
//!
//! [`new_client`] is `capnp_rpc::new_client` without its local call queue: a call goes
//! straight into the generated dispatch, whose boxed future (the handler's own) is the only
//! allocation of the hook. capnp-rpc's local client also boxes an outer future per call and
//! borrows a `RefCell`, to serialise calls on `-> stream` methods and to defer a call made
//! from this process until its caller holds the promise; capkv's schemas have no streaming
//! method, and the engines (capkv's and the capnp-rpc reference) only call a capability
//! when a message asks them to. Calls made from this process (`new_call`, tests) go through
//! a capnp-rpc local client of the same object, which keeps that deferral.
//!
//! [`new_direct_client`] is the same client for an object that also answers its hottest
//! methods synchronously ([`Direct`]): capkv's engine calls those without the hook, its
//! boxed params, results and promise (see `engine`'s direct path), and falls back to the
//! hook for everything else. The engine finds an object's [`Direct`] by the address the
//! hook names (`get_ptr`) in a registry of this thread's direct objects, once, when it
//! exports the capability.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::{Rc, Weak};
use std::task::{Context, Poll};

use capnp::capability::{FromClientHook, FromServer, Params, Promise, Results, Server};
use capnp::private::capability::{ClientHook, ParamsHook, ResultsHook};
use capnp::{any_pointer, MessageSize};
use tokio::time::Instant;

/// The rest of a direct call that has to wait: given the call's params and results as the
/// hook path has them, the promise that finishes it (see [`Now::Defer`]).
pub type Deferred =
    Box<dyn FnOnce(Box<dyn ParamsHook>, Box<dyn ResultsHook>) -> Promise<(), capnp::Error>>;

/// What a [`Direct`] call did.
pub enum Now {
    /// Answered: the results are written (or the call failed with this error).
    Done(capnp::Result<()>),
    /// Started, and must wait (an admission queue, a fault plan): the engine goes on with
    /// the hook path's params and results. Nothing was written to the results.
    Defer(Deferred),
    /// Started, and waits for something outside the engine (a write's commit): the engine
    /// keeps it with the call's answer and has it write its results once it is ready.
    /// Nothing was written to the results.
    Wait(Pin<Box<dyn Waiting>>),
    /// Not a method this path serves: the engine calls the hook, as if asked nothing.
    Elsewhere,
}

/// The rest of a direct call that waits ([`Now::Wait`]): its only box. The engine polls it
/// with its connection and, once it is ready, has it write its results into a message of
/// the engine's as a direct call's are (no hook, no boxed params, results or promise, no
/// results message of its own while it waits). Dropped unanswered when its connection ends.
pub trait Waiting {
    /// Ready once [`answer`](Self::answer) can write the results.
    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()>;
    /// Writes the results (called once, after `poll_ready` was ready), or fails the call.
    fn answer(self: Pin<&mut Self>, results: any_pointer::Builder<'_>) -> capnp::Result<()>;
}

/// An object that answers some of its methods at once, without a boxed future per call.
///
/// The engine calls it only for calls with no capability in their params, and only for
/// methods whose results hold no capability: the results builder has no cap table.
pub trait Direct {
    fn call_now(
        self: Rc<Self>,
        interface_id: u64,
        method_id: u16,
        params: any_pointer::Reader<'_>,
        results: any_pointer::Builder<'_>,
    ) -> Now;
}

/// This thread's direct objects by address. Weak: an entry never keeps its object alive;
/// dead entries are swept when the registry has doubled since the last sweep, so it stays
/// within twice the live objects (plus a constant).
#[derive(Default)]
struct Registry {
    by_ptr: rustc_hash::FxHashMap<usize, Weak<dyn Direct>>,
    sweep_at_len: usize,
}

/// Entries a registry holds before its first sweep.
const REGISTRY_FIRST_SWEEP: usize = 64;

thread_local! {
    static DIRECT: RefCell<Registry> = RefCell::default();
    /// See [`arrived`].
    static ARRIVED: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// When the message of the call a [`Direct`] object is answering arrived (the read that
/// brought it off the socket), while the engine's direct path runs `call_now`; `None`
/// anywhere else. What a server takes as the call's start (its latency and its deadline's
/// base) instead of reading the clock again: the calls of one read share one clock read,
/// and the time they queued behind each other in the read counts in their latency.
pub fn arrived() -> Option<Instant> {
    ARRIVED.with(Cell::get)
}

/// Runs `f` with [`arrived`] giving `at` (and `None` again after).
pub(crate) fn with_arrival<T>(at: Option<Instant>, f: impl FnOnce() -> T) -> T {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            ARRIVED.with(|a| a.set(None));
        }
    }
    ARRIVED.with(|a| a.set(at));
    let _reset = Reset;
    f()
}

/// A client of `server`, as [`new_client`] makes one, whose [`Direct`] methods the engine
/// calls at once.
pub fn new_direct_client<C, S>(server: S) -> C
where
    C: FromServer<S> + 'static,
    S: Direct + 'static,
{
    let server = Rc::new(server);
    let direct: Rc<dyn Direct> = server.clone();
    register(Rc::as_ptr(&server) as *const () as usize, &direct);
    from_rc(server)
}

/// Registers `direct` as the object of hooks whose `get_ptr` is `ptr`, for as long as it
/// lives.
pub(crate) fn register(ptr: usize, direct: &Rc<dyn Direct>) {
    DIRECT.with(|r| {
        let mut r = r.borrow_mut();
        if r.by_ptr.len() >= r.sweep_at_len.max(REGISTRY_FIRST_SWEEP) {
            r.by_ptr.retain(|_, w| w.strong_count() > 0);
            r.sweep_at_len = r.by_ptr.len() * 2;
        }
        // An address reused after its object died replaces the dead entry.
        r.by_ptr.insert(ptr, Rc::downgrade(direct));
    });
}

/// The [`Direct`] behind `hook`, when it is a live direct object of this thread.
pub(crate) fn direct_of(hook: &dyn ClientHook) -> Option<Rc<dyn Direct>> {
    if hook.get_brand() != 0 {
        return None;
    }
    DIRECT.with(|r| {
        r.borrow()
            .by_ptr
            .get(&hook.get_ptr())
            .and_then(Weak::upgrade)
    })
}

/// Live entries of this thread's registry (tests).
#[doc(hidden)]
pub fn direct_registry_len() -> usize {
    DIRECT.with(|r| {
        r.borrow()
            .by_ptr
            .values()
            .filter(|w| w.strong_count() > 0)
            .count()
    })
}

/// A client of `server`, as `capnp_rpc::new_client` makes one, called directly.
pub fn new_client<C, S>(server: S) -> C
where
    C: FromServer<S> + 'static,
    S: 'static,
{
    from_rc(Rc::new(server))
}

fn from_rc<C, S>(server: Rc<S>) -> C
where
    C: FromServer<S> + 'static,
    S: 'static,
{
    FromClientHook::new(Box::new(Local::<C, S> {
        dispatch: C::from_server(Rc::clone(&server)),
        server,
    }))
}

struct Local<C: FromServer<S>, S> {
    dispatch: C::Dispatch,
    server: Rc<S>,
}

impl<C, S> ClientHook for Local<C, S>
where
    C: FromServer<S> + 'static,
    S: 'static,
{
    fn add_ref(&self) -> Box<dyn ClientHook> {
        Box::new(Local::<C, S> {
            dispatch: self.dispatch.clone(),
            server: Rc::clone(&self.server),
        })
    }

    fn new_call(
        &self,
        interface_id: u64,
        method_id: u16,
        size_hint: Option<MessageSize>,
    ) -> capnp::capability::Request<any_pointer::Owned, any_pointer::Owned> {
        let local: C = capnp_rpc::new_client_from_rc(Rc::clone(&self.server));
        local
            .as_client_hook()
            .new_call(interface_id, method_id, size_hint)
    }

    fn call(
        &self,
        interface_id: u64,
        method_id: u16,
        params: Box<dyn ParamsHook>,
        results: Box<dyn ResultsHook>,
    ) -> Promise<(), capnp::Error> {
        self.dispatch
            .clone()
            .dispatch_call(
                interface_id,
                method_id,
                Params::new(params),
                Results::new(results),
            )
            .promise
    }

    /// Not a capability of any RPC connection: engines export it as their own.
    fn get_brand(&self) -> usize {
        0
    }

    /// The served object: the same object behind two clients is one export.
    fn get_ptr(&self) -> usize {
        self.dispatch.as_ptr()
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

#[cfg(test)]
mod tests {
    /// The arrival is there for the call it is set around, and only for it.
    #[test]
    fn an_arrival_is_seen_only_inside_its_call() {
        let at = tokio::time::Instant::now();
        assert_eq!(super::arrived(), None);
        assert_eq!(super::with_arrival(Some(at), super::arrived), Some(at));
        assert_eq!(super::arrived(), None);
        let panicked = std::panic::catch_unwind(|| {
            super::with_arrival(Some(at), || panic!("a handler's bug"));
        });
        assert!(panicked.is_err());
        assert_eq!(super::arrived(), None, "reset on unwind too");
    }
}
