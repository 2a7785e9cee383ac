//! Cache hints for a connection's scattered state.
//!
//! With thousands of connections taking turns on a worker, each connection's state is cold
//! when its turn comes, and its pieces (the loop's future, its tables, its reply counters,
//! its buffers) are separate allocations, each a cache miss. Loaded one after the other as
//! the code reaches them, those misses add up (measured at 3,000 connections: most of the
//! server's user time per call beyond Redis's); asked for together at the start of a turn,
//! they overlap.

/// Asks the CPU to load the cache line holding `p`. A hint: never faults, never waits.
#[inline(always)]
pub fn prefetch<T: ?Sized>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of every x86_64 target; a prefetch reads nothing into the
        // program and cannot fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// [`prefetch`] of every cache line of the `len` bytes at `p`.
#[inline(always)]
pub fn prefetch_bytes(p: *const u8, len: usize) {
    for offset in (0..len).step_by(64) {
        prefetch(p.wrapping_add(offset));
    }
}
