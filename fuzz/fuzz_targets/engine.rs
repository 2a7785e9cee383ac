//! Fuzzes capkv's RPC engine (`capkv_rpc::engine`): the input is decoded into a sequence of
//! protocol messages (bootstraps, calls on exports and on answers with transforms,
//! finishes, releases, aborts, unknown kinds, garbage frames; ids from small ranges so they
//! collide) served to one connection whose capabilities answer with new capabilities,
//! errors, or after a yield, on the hook path or on the direct path (at once, failing, or
//! deferred). Must never panic; the engine checks its tables after every step (debug
//! assertions are on in fuzz builds).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    capkv_rpc::engine::script::run(data);
});
