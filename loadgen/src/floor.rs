//! The RPC floor (`kv-loadgen rpc-floor`): a bare server speaking capkv's schema whose
//! `get` and `getMany` answer fixed entries at once, on either RPC engine kv-server has
//! (`--engine capkv`, capkv's own, or `--engine capnp-rpc`, capnp-rpc's `RpcSystem`).
//!
//! Why: it has no store, no limits, no admission, no deadlines, no metrics, no logs and no
//! frame checks, only the RPC engine over capkv's transport (buffered reads; one write per
//! pass on capkv's engine, the coalescing writer under `RpcSystem`) on one current-thread
//! runtime, as a kv-server worker has. Driven by kv-loadgen, it measures what the engine
//! itself lets one core do per call on this machine: the ceiling of any server built on
//! it, and the anchor that tells capkv's own costs from the runtime's (bench/run.sh runs
//! both engines' floors beside the TCP floor).
//!
//! Only `Gateway.open` (any token), `KvStore.get` and `KvStore.getMany` are served;
//! everything else answers capnp-rpc's `unimplemented`. Not a server to deploy: it listens where it is told
//! (bench/run.sh: 127.0.0.1) and trusts every peer.

use std::rc::Rc;

use capkv::kv_capnp::{entry, gateway, kv_store};
use capnp_rpc::{rpc_twoparty_capnp, RpcSystem};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// The value every `get` answers.
struct FloorKv {
    value: Vec<u8>,
}

impl FloorKv {
    /// The entry every key has: the fixed value, at version and revision 1.
    fn answer(&self, mut entry: entry::Builder<'_>, key: &[u8]) {
        entry.set_key(key);
        entry.set_value(&self.value);
        entry.set_version(1);
        entry.set_mod_revision(1);
    }
}

impl kv_store::Server for FloorKv {
    async fn get(
        self: Rc<Self>,
        params: kv_store::GetParams,
        mut results: kv_store::GetResults,
    ) -> Result<(), capnp::Error> {
        let key = params.get()?.get_key()?;
        self.answer(results.get().init_result().init_ok(), key);
        Ok(())
    }

    async fn get_many(
        self: Rc<Self>,
        params: kv_store::GetManyParams,
        mut results: kv_store::GetManyResults,
    ) -> Result<(), capnp::Error> {
        let keys = params.get()?.get_keys()?;
        let mut ok = results.get().init_result().init_ok();
        ok.set_revision(1);
        let mut items = ok.init_items(keys.len());
        for (i, key) in keys.iter().enumerate() {
            self.answer(items.reborrow().get(i as u32).init_found(), key?);
        }
        Ok(())
    }
}

struct FloorGateway {
    kv: kv_store::Client,
}

impl gateway::Server for FloorGateway {
    async fn open(
        self: Rc<Self>,
        _params: gateway::OpenParams,
        mut results: gateway::OpenResults,
    ) -> Result<(), capnp::Error> {
        // Where capkv puts it: outside the union for pipelining (API v3), and in it.
        let mut out = results.get().init_result();
        out.set_kv(self.kv.clone());
        out.set_kv_cap(self.kv.clone());
        Ok(())
    }
}

/// The RPC engine a floor runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloorEngine {
    /// `capkv_rpc::engine`, kv-server's default.
    Capkv,
    /// capnp-rpc's `RpcSystem`, the reference.
    CapnpRpc,
}

impl std::str::FromStr for FloorEngine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "capkv" => Ok(FloorEngine::Capkv),
            "capnp-rpc" => Ok(FloorEngine::CapnpRpc),
            _ => Err(format!("engine must be capkv or capnp-rpc, not {s:?}")),
        }
    }
}

/// Serves `listener` until the process is stopped: one current-thread runtime, `engine`
/// on each connection, `get` answering `value_size` bytes. Calls `on_listening` with the
/// bound address once accepting.
pub fn serve(
    listener: std::net::TcpListener,
    engine: FloorEngine,
    value_size: usize,
    on_listening: impl FnOnce(std::net::SocketAddr),
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        on_listening(listener.local_addr()?);
        let limits = capkv::Limits::default();
        let options = limits.request_reader_options();
        let frame_limits = std::sync::Arc::new(capkv_rpc::frames::FrameLimits::for_requests(
            limits.max_request_bytes(),
            options,
            std::time::Duration::from_secs(10),
        ));
        let frame_budget = std::sync::Arc::new(capkv_rpc::frames::FrameBudget::new(64 << 20));
        // Each engine with the capabilities its users make: capnp-rpc's local clients for
        // `RpcSystem`, capkv's direct ones for capkv's engine.
        let floor_kv = FloorKv {
            value: vec![b'v'; value_size],
        };
        let kv: kv_store::Client = match engine {
            FloorEngine::CapnpRpc => capnp_rpc::new_client(floor_kv),
            FloorEngine::Capkv => capkv_rpc::local::new_client(floor_kv),
        };
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors and the like: say so, back off, keep accepting.
                    eprintln!("rpc-floor: accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                }
            };
            if let Err(e) = stream.set_nodelay(true) {
                eprintln!("rpc-floor: set_nodelay failed: {e}");
            }
            let floor_gateway = FloorGateway { kv: kv.clone() };
            let gateway: gateway::Client = match engine {
                FloorEngine::CapnpRpc => capnp_rpc::new_client(floor_gateway),
                FloorEngine::Capkv => capkv_rpc::local::new_client(floor_gateway),
            };
            match engine {
                FloorEngine::CapnpRpc => {
                    let network = capkv_rpc::transport::vat_network(
                        stream,
                        rpc_twoparty_capnp::Side::Server,
                        options,
                    );
                    let rpc = RpcSystem::new(Box::new(network), Some(gateway.client));
                    tokio::task::spawn_local(async move {
                        // A peer going away ends its connection; nothing to report.
                        let _ = rpc.await;
                    });
                }
                FloorEngine::Capkv => {
                    // The same frame layer as kv-server's (it is part of what a call costs).
                    let (reader, writer) = stream.into_split();
                    let reader = capkv_rpc::frames::GuardedReader::new(
                        reader.compat(),
                        std::sync::Arc::clone(&frame_limits),
                        std::sync::Arc::clone(&frame_budget),
                        capkv_rpc::frames::BreachCell::default(),
                    );
                    // The engine writes each pass's replies itself, as kv-server's does.
                    let writer = writer.compat_write();
                    let limits = capkv_rpc::engine::EngineLimits {
                        reader_options: options,
                        ..Default::default()
                    };
                    let serve = capkv_rpc::engine::serve(
                        reader,
                        writer,
                        gateway.client.hook,
                        limits,
                        capkv_rpc::engine::Closer::default(),
                    );
                    tokio::task::spawn_local(async move {
                        let _ = serve.await;
                    });
                }
            }
        }
    })
}
