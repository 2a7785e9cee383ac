//! Fuzzes the frame layer's parsing and checks (`capkv_rpc::frames`): any byte stream is split
//! into frames by their segment tables and each complete frame is checked, as the server
//! does before capnp-rpc sees it. Must never panic, loop or allocate by declared size.
#![no_main]

use libfuzzer_sys::fuzz_target;

/// About the server's default: the largest legal request (a put of a 1 KiB key and a 1 MiB
/// value, plus framing) and a segment table. The frame layer takes it as a parameter.
const MAX_FRAME_BYTES: usize = (1 << 20) + 64 * 1024 + 4096;

fuzz_target!(|data: &[u8]| {
    let mut options = capnp::message::ReaderOptions::new();
    options.traversal_limit_in_words(Some(MAX_FRAME_BYTES / 8));
    options.nesting_limit(16);
    let max_frame_bytes = MAX_FRAME_BYTES;
    let mut rest = data;
    // Each pass consumes a whole frame (at least 8 bytes), so this ends.
    while let Ok(Some(size)) = capkv_rpc::frames::frame_size(rest, max_frame_bytes) {
        if rest.len() < size {
            break;
        }
        let _ = capkv_rpc::frames::check_frame(&rest[..size], options);
        rest = &rest[size..];
    }
});
