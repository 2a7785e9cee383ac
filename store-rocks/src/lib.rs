//! capkv's durable engine: RocksDB behind `capkv_store::Store`.
//!
//! - [`rocks::RocksStore`]: column families `data` / `meta` / `idempotency`, WAL synced
//!   before a write is acknowledged, group commit by one committer thread. The default.
//! - [`space`]: the free-space watermark below which writes are refused, and the reserve
//!   file released when the disk fills.
//! - [`open_or_read_only`]: read-write, or read-only until a full disk has room again.
//!
//! Kept out of `capkv-store` so that what needs only the trait (the memory engine, the
//! conformance suite, tools) never builds RocksDB's C++. More engines go beside it.

mod recovering;
pub mod rocks;
pub mod space;

pub use recovering::open_or_read_only;
pub use rocks::{OpenError, RocksOptions, RocksStore, MAX_WAL_RECYCLE_FILES, MIN_TOTAL_WAL_BYTES};
pub use space::{SpaceGuard, SpaceOptions};
