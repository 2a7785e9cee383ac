//! capkv's byte stream under Cap'n Proto RPC, for the server and the client.
//!
//! - [`transport`]: the two-party network over a TCP (or TLS) stream: buffered reads and a
//!   coalescing writer, for capnp-rpc's `RpcSystem` (which flushes after every message);
//!   capkv's engines write each pass's messages themselves.
//! - [`frames`]: the server's frame layer: what a peer sends is a whole, checked message
//!   (declared size, budget, timeout, kind, cap table) before the RPC system sees it. Its
//!   own crate, so the fuzz target builds without the storage engine or the server.
//! - [`backlog`]: reply backpressure: unsent reply bytes per connection and server-wide,
//!   which the frame layer and the writer consult.
//! - [`tls`]: mutual TLS configs (rustls) from PEM files, for both sides.
//! - [`engine`]: capkv's own Cap'n Proto RPC engine, server side (standard rpc.capnp on the
//!   wire, capnp-rpc's `RpcSystem` as its test reference).
//! - [`client`]: the same engine's client side, behind capnp's hook traits (generated
//!   clients and pipelines unchanged; capnp-rpc's `RpcSystem` is its test reference).
//! - [`local`]: capabilities this process serves, made for the engine to call directly, and
//!   the `Direct` trait through which the engine answers their hottest methods at once.
//! - `skeleton`: a Call's fixed fields read by hand (the frame layer's check of a plain
//!   Call, without capnp's checked reader), for exactly the messages capnp reads alike.
//! - [`signal`]: a stop flag for one thread's tasks, cheaper to poll than tokio's `Notify`.
//! - [`ready`]: a worker's own readiness loop: its connections' futures in a slab, polled
//!   from an epoll of its own, with no tokio task or readiness state per connection.
//! - [`hint`]: cache prefetches of a connection's scattered state at the start of its turn.
//!
//! It knows nothing of the kv schema.

pub mod backlog;
pub mod client;
pub mod engine;
pub mod frames;
pub mod hint;
pub mod local;
pub mod ready;
pub mod signal;
mod skeleton;
pub mod tls;
pub mod transport;
