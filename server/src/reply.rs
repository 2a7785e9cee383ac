//! Reply accounting: every handler (and stand-in) counts the reply it built on its
//! connection's backlog, which the writer uncounts as the bytes leave (see
//! `capkv_rpc::backlog`). One module both `rpc` and `refused` use.

/// Bytes a reply of `size` takes on the wire: its content plus the `Return` message and
/// segment table around it.
pub(crate) fn reply_bytes(size: capnp::MessageSize) -> usize {
    const RETURN_OVERHEAD_BYTES: usize = 64;
    usize::try_from(size.word_count)
        .unwrap_or(usize::MAX)
        .saturating_mul(8)
        .saturating_add(RETURN_OVERHEAD_BYTES)
}

/// Counts a handler's reply as unsent on its connection until the writer has sent it (see
/// `capkv_rpc::backlog`): its encoded size plus the Return header. Only on capnp-rpc's
/// `RpcSystem`: capkv's engine counts each message exactly as it queues it, which spares
/// every call a walk of its results.
macro_rules! count_reply {
    ($conn:expr, $results:ident) => {
        crate::reply::count_reply!(@built $conn, ($results.get()))
    };
    // A results builder already in hand.
    (@built $conn:expr, $built:expr) => {
        if !$conn.backlog.counted_at_send() {
            if let Ok(size) = $built.reborrow_as_reader().total_size() {
                $conn.backlog.queued(crate::reply::reply_bytes(size));
            }
        }
    };
}
pub(crate) use count_reply;
