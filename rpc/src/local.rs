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

use std::rc::Rc;

use capnp::capability::{FromClientHook, FromServer, Params, Promise, Results, Server};
use capnp::private::capability::{ClientHook, ParamsHook, ResultsHook};
use capnp::{any_pointer, MessageSize};

/// A client of `server`, as `capnp_rpc::new_client` makes one, called directly.
pub fn new_client<C, S>(server: S) -> C
where
    C: FromServer<S> + 'static,
    S: 'static,
{
    let server = Rc::new(server);
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
