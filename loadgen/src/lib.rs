//! kv-loadgen: load for capkv (and Redis, driven identically, for comparison).
//!
//! - [`workload`]: request mix, key distribution (uniform/zipfian), keys and values, all
//!   from a seed.
//! - [`run`]: worker threads with a `LocalSet` each; closed loop (fixed concurrency) and
//!   open loop (fixed arrival rate, latency from the intended send time); preload.
//! - [`target`]: the servers a run can drive: capkv through `LocalClient`, capkv raw
//!   ([`raw`]: the protocol hand-encoded, no client RPC runtime), Redis through the `redis`
//!   crate, Redis raw ([`raw_redis`]: RESP hand-encoded, the same client shape as capkv
//!   raw); both raw clients share `pipe` (outbox, writer, callers by id, wire stamps).
//! - [`stats`]: HdrHistogram latencies per operation, error counts by code, summaries.
//! - [`procstat`]: server CPU and RSS from /proc.
//! - [`report`]: table, CSV, JSON and markdown output.
//! - [`plot`]: SVG plots (`--plot DIR`): latency percentile spectra, latency against
//!   offered rate, durable puts.
//! - [`matrix`]: the standard comparison matrix and its results file.
//! - [`redis_bench`]: `redis-benchmark` runs interleaved with the matrix's cases.
//! - [`versus`]: `kv-loadgen versus`, capkv (raw client) against redis-benchmark in
//!   alternating rounds, judged by the median of each round's ratios.
//! - [`floor`]: `kv-loadgen rpc-floor`, a bare server answering `get` at once on either RPC
//!   engine: what the RPC runtime alone costs per call.
//! - [`churn`]: `kv-loadgen lease-churn`, leases granted, attached and left to expire.
//! - [`fanout`]: `kv-loadgen watch-fanout`, one writer and many watchers of its prefix:
//!   events delivered per second and the put-to-delivery latency.

pub mod churn;
pub mod fanout;
pub mod floor;
pub mod matrix;
mod pipe;
pub mod plot;
pub mod procstat;
pub mod raw;
pub mod raw_redis;
pub mod redis_bench;
pub mod report;
pub mod run;
pub mod stats;
pub mod target;
pub mod versus;
pub mod workload;
