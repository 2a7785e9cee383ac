//! Fuzzes the frame layer's parsing and checks (`capkv::frames`): any byte stream is split
//! into frames by their segment tables and each complete frame is checked, as the server
//! does before capnp-rpc sees it. Must never panic, loop or allocate by declared size.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = capkv::Limits::default();
    let options = limits.request_reader_options();
    let max_frame_bytes = limits.max_request_bytes() + 4096;
    let mut rest = data;
    // Each pass consumes a whole frame (at least 8 bytes), so this ends.
    while let Ok(Some(size)) = capkv::frames::frame_size(rest, max_frame_bytes) {
        if rest.len() < size {
            break;
        }
        let _ = capkv::frames::check_frame(&rest[..size], options);
        rest = &rest[size..];
    }
});
