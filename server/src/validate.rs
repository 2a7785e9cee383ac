//! Input checks, run first in every handler's work, before the store is touched. Each
//! breach has its own stable code so clients can tell them apart.

use capkv::kv_capnp::{condition, scan_range};
use capkv::{prefix_end, ApiError, ErrorCode, Limits};
use capkv_store::{Condition, PutItem, ScanRequest};

fn bad(what: &str, e: capnp::Error) -> ApiError {
    ApiError::new(
        ErrorCode::InvalidArgument,
        format!("cannot read {what}: {e}"),
    )
}

/// Checks a batch's item count.
pub fn batch_len(limits: &Limits, len: u32) -> Result<(), ApiError> {
    if len == 0 || len > limits.max_batch_items {
        return Err(ApiError::new(
            ErrorCode::TooManyItems,
            format!(
                "a batch needs 1 to {} items; got {len}",
                limits.max_batch_items
            ),
        ));
    }
    Ok(())
}

/// Checks one item of a `putMany` like a single `put`.
pub fn put_item<'a>(
    limits: &Limits,
    item: capkv::kv_capnp::put_item::Reader<'a>,
) -> Result<PutItem<'a>, ApiError> {
    Ok(PutItem {
        key: key(limits, item.get_key())?,
        value: value(limits, item.get_value())?,
        cond: condition(item.get_condition())?,
    })
}

/// Checks that no key appears twice in a batch.
pub fn distinct_keys(keys: &[&[u8]]) -> Result<(), ApiError> {
    let mut seen = std::collections::HashSet::with_capacity(keys.len());
    match keys.iter().position(|k| !seen.insert(*k)) {
        None => Ok(()),
        Some(i) => Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("item {i} repeats an earlier key; batch keys must be distinct"),
        )),
    }
}

/// Prefixes an item's error message with its index, keeping its code.
pub fn at_item(i: usize) -> impl Fn(ApiError) -> ApiError {
    move |mut e| {
        e.message = format!("item {i}: {}", e.message);
        e
    }
}

pub fn key<'a>(
    limits: &Limits,
    key: capnp::Result<capnp::data::Reader<'a>>,
) -> Result<&'a [u8], ApiError> {
    let key = key.map_err(|e| bad("key", e))?;
    if key.is_empty() {
        return Err(ApiError::new(ErrorCode::EmptyKey, "key must not be empty"));
    }
    if key.len() > limits.max_key_bytes {
        return Err(ApiError::new(
            ErrorCode::KeyTooLarge,
            format!(
                "key is {} bytes; the limit is {}",
                key.len(),
                limits.max_key_bytes
            ),
        ));
    }
    Ok(key)
}

pub fn value<'a>(
    limits: &Limits,
    value: capnp::Result<capnp::data::Reader<'a>>,
) -> Result<&'a [u8], ApiError> {
    let value = value.map_err(|e| bad("value", e))?;
    if value.len() > limits.max_value_bytes {
        return Err(ApiError::new(
            ErrorCode::ValueTooLarge,
            format!(
                "value is {} bytes; the limit is {}",
                value.len(),
                limits.max_value_bytes
            ),
        ));
    }
    Ok(value)
}

pub fn condition(c: capnp::Result<condition::Reader<'_>>) -> Result<Condition, ApiError> {
    let c = c.map_err(|e| bad("condition", e))?;
    match c.which() {
        Ok(condition::Which::None(())) => Ok(Condition::None),
        Ok(condition::Which::IfVersion(v)) => Ok(Condition::IfVersion(v)),
        Ok(condition::Which::IfAbsent(())) => Ok(Condition::IfAbsent),
        Err(capnp::NotInSchema(n)) => Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("unknown condition kind {n}"),
        )),
    }
}

/// A range bound (`start`, `end`, a prefix or a cursor) of a `call` (`scan`, `watch`): at
/// most one byte longer than a key (a cursor is "last key + 0x00").
fn bound(
    limits: &Limits,
    call: &str,
    what: &str,
    b: capnp::Result<capnp::data::Reader<'_>>,
) -> Result<Vec<u8>, ApiError> {
    let b = b.map_err(|e| bad(what, e))?;
    let bound_max = limits.max_key_bytes + 1;
    if b.len() > bound_max {
        return Err(ApiError::new(
            ErrorCode::KeyTooLarge,
            format!(
                "{call} {what} is {} bytes; the limit is {bound_max}",
                b.len()
            ),
        ));
    }
    Ok(b.to_vec())
}

/// A checked scan: the store request and whether a cursor moved its start.
///
/// `pins_revision`: the engine's scans read at a revision
/// ([`capkv_store::Store::scans_pin_revision`]), so its cursors may carry one; on any other
/// engine a cursor is the key alone, whatever its bytes (a key may start like a pinned
/// cursor).
pub fn scan(
    limits: &Limits,
    r: capnp::Result<scan_range::Reader<'_>>,
    pins_revision: bool,
) -> Result<ScanRequest, ApiError> {
    let r = r.map_err(|e| bad("range", e))?;
    let bound = |what: &str, b| bound(limits, "scan", what, b);
    let (start, end) = match r.which() {
        Ok(scan_range::Which::Range(g)) => {
            let start = bound("start", g.get_start())?;
            let end = bound("end", g.get_end())?;
            let end = (!end.is_empty()).then_some(end);
            if let Some(end) = &end {
                if *end < start {
                    return Err(ApiError::new(
                        ErrorCode::InvalidRange,
                        "scan start is after end",
                    ));
                }
            }
            (start, end)
        }
        Ok(scan_range::Which::Prefix(p)) => {
            let p = bound("prefix", p)?;
            let end = prefix_end(&p);
            (p, end)
        }
        Err(capnp::NotInSchema(n)) => {
            return Err(ApiError::new(
                ErrorCode::InvalidArgument,
                format!("unknown range kind {n}"),
            ))
        }
    };
    let raw = r.get_cursor().map_err(|e| bad("cursor", e))?;
    let (revision, cursor) = if pins_revision {
        split_cursor(raw)
    } else {
        (None, raw)
    };
    let cursor = bound("cursor", Ok(cursor))?;
    let start = if cursor.is_empty() {
        start
    } else {
        let inside = cursor >= start && end.as_ref().is_none_or(|e| cursor < *e);
        if !inside {
            return Err(ApiError::new(
                ErrorCode::InvalidRange,
                "cursor is outside the scan range",
            ));
        }
        cursor
    };
    let limit = match r.get_limit() {
        0 => limits.default_scan_limit,
        n if n > limits.max_scan_limit => {
            return Err(ApiError::new(
                ErrorCode::ScanLimitTooLarge,
                format!(
                    "scan limit {n} is over the maximum {}",
                    limits.max_scan_limit
                ),
            ))
        }
        n => n,
    };
    Ok(ScanRequest {
        start,
        end,
        limit: limit as usize,
        max_bytes: limits.max_scan_bytes,
        keys_only: r.get_keys_only(),
        revision,
    })
}

/// What starts a cursor that also pins the scan's revision: then the revision (8 bytes,
/// big endian), then the key to resume at. Sent only by a server whose engine reads the
/// past ([`capkv_store::Store::scans_pin_revision`]); other cursors are the key alone.
const PINNED_CURSOR: &[u8] = b"\xffcapkv-revision\x00";

/// A cursor's pinned revision, if it has one, and the key it resumes at.
fn split_cursor(cursor: &[u8]) -> (Option<u64>, &[u8]) {
    match cursor.strip_prefix(PINNED_CURSOR) {
        Some(rest) if rest.len() >= 8 => {
            let (revision, key) = rest.split_at(8);
            let mut b = [0u8; 8];
            b.copy_from_slice(revision);
            (Some(u64::from_be_bytes(b)), key)
        }
        _ => (None, cursor),
    }
}

/// The cursor that resumes right after `last_key` (its immediate successor in byte
/// order), pinned to `revision` when given.
pub fn next_cursor(last_key: &[u8], revision: Option<u64>) -> Vec<u8> {
    let mut c = Vec::with_capacity(PINNED_CURSOR.len() + 8 + last_key.len() + 1);
    if let Some(revision) = revision {
        c.extend_from_slice(PINNED_CURSOR);
        c.extend_from_slice(&revision.to_be_bytes());
    }
    c.extend_from_slice(last_key);
    c.push(0);
    c
}

/// Longest idempotency key a write may carry.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 64;

/// A write's idempotency key: `None` when empty (the write is not idempotent).
pub fn idempotency_key(
    k: capnp::Result<capnp::data::Reader<'_>>,
) -> Result<Option<Vec<u8>>, ApiError> {
    let k = k.map_err(|e| bad("idempotencyKey", e))?;
    if k.len() > MAX_IDEMPOTENCY_KEY_BYTES {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!(
                "idempotency key of {} bytes is longer than {MAX_IDEMPOTENCY_KEY_BYTES}",
                k.len()
            ),
        ));
    }
    Ok((!k.is_empty()).then(|| k.to_vec()))
}

/// A checked watch range.
pub fn watch_range(
    limits: &Limits,
    r: capnp::Result<capkv::kv_capnp::watch_range::Reader<'_>>,
) -> Result<capkv_store::KeyRange, ApiError> {
    use capkv::kv_capnp::watch_range;
    let r = r.map_err(|e| bad("range", e))?;
    let bound = |what: &str, b| bound(limits, "watch", what, b);
    match r.which() {
        Ok(watch_range::Which::Range(g)) => {
            let start = bound("start", g.get_start())?;
            let end = bound("end", g.get_end())?;
            let end = (!end.is_empty()).then_some(end);
            if end.as_ref().is_some_and(|end| *end <= start) {
                return Err(ApiError::new(
                    ErrorCode::InvalidRange,
                    "watch start is not before end",
                ));
            }
            Ok(capkv_store::KeyRange { start, end })
        }
        Ok(watch_range::Which::Prefix(p)) => {
            Ok(capkv_store::KeyRange::prefix(&bound("prefix", p)?))
        }
        Err(capnp::NotInSchema(n)) => Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("unknown range kind {n}"),
        )),
    }
}

/// Events one `Watcher.next` may return: `0` = the default (100), at most
/// `max_batch_items`; and bytes, as a scan page's.
pub fn watch_page(limits: &Limits, max_events: u32) -> Result<capkv_store::PageLimits, ApiError> {
    const DEFAULT_EVENTS: u32 = 100;
    let events = match max_events {
        0 => DEFAULT_EVENTS.min(limits.max_batch_items),
        n if n > limits.max_batch_items => {
            return Err(ApiError::new(
                ErrorCode::TooManyItems,
                format!(
                    "maxEvents {n} is above the limit of {}",
                    limits.max_batch_items
                ),
            ))
        }
        n => n,
    };
    Ok(capkv_store::PageLimits {
        events: events as usize,
        bytes: limits.max_scan_bytes,
    })
}

/// A lease TTL: 1 ms to 30 days.
pub fn lease_ttl_ms(ttl_ms: u64) -> Result<u64, ApiError> {
    let max = capkv_store::lease::MAX_LEASE_TTL_MS;
    if ttl_ms == 0 || ttl_ms > max {
        return Err(ApiError::new(
            ErrorCode::InvalidArgument,
            format!("a lease TTL must be 1 to {max} ms, not {ttl_ms}"),
        ));
    }
    Ok(ttl_ms)
}

/// What a put's `lease` and `ttlMs` ask: a lease, a TTL of its own, or neither (not both).
pub fn attach(lease: u64, ttl_ms: u64) -> Result<capkv_store::write::Attach, ApiError> {
    use capkv_store::write::Attach;
    match (lease, ttl_ms) {
        (0, 0) => Ok(Attach::None),
        (id, 0) => Ok(Attach::Lease(id)),
        (0, ttl) => Ok(Attach::NewLease {
            ttl_ms: lease_ttl_ms(ttl)?,
        }),
        _ => Err(ApiError::new(
            ErrorCode::InvalidArgument,
            "a put takes a lease or a TTL, not both",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pinned cursor gives back its revision and key; a plain one is the key alone, even
    /// when the key is binary.
    #[test]
    fn cursors_round_trip() {
        let pinned = next_cursor(b"k\xff\x00", Some(42));
        assert_eq!(split_cursor(&pinned), (Some(42), &b"k\xff\x00\x00"[..]));
        let plain = next_cursor(b"\xffcapkv", None);
        assert_eq!(split_cursor(&plain), (None, &b"\xffcapkv\x00"[..]));
        // A magic too short to hold a revision is a key.
        assert_eq!(split_cursor(PINNED_CURSOR), (None, PINNED_CURSOR));
    }

    /// On an engine that does not pin scans, a cursor is the key it resumes at, even a key
    /// that starts like a pinned cursor (it was split as one: the scan resumed elsewhere).
    #[test]
    fn an_unpinned_cursor_is_its_key_whatever_its_bytes() {
        let key = b"\xffcapkv-revision\x00AAAAAAAAa";
        let cursor = next_cursor(key, None);
        let mut m = capnp::message::Builder::new_default();
        let mut r = m.init_root::<scan_range::Builder<'_>>();
        r.set_cursor(&cursor);
        r.set_prefix(b"\xff");
        let r = r.into_reader();
        let limits = Limits::default();
        let unpinned = scan(&limits, Ok(r), false).expect("a cursor within the range");
        assert_eq!((unpinned.start, unpinned.revision), (cursor.clone(), None));
        // Read as pinned, the same bytes are another place (what the fix avoids).
        let pinned = scan(&limits, Ok(r), true);
        assert!(pinned.is_err() || pinned.is_ok_and(|p| p.start != cursor));
    }
}
