//! The conformance suite against the memory engine.
capkv_store::conformance_tests!(capkv_store::MemoryStore::new());
