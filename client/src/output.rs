//! Rendering results for people (default) and for programs (`--json`).
//!
//! JSON is one object per result. Keys and values are bytes: when they are valid UTF-8
//! they appear as strings under `key` / `value`; otherwise they appear base64-encoded
//! (standard alphabet, padded) under `key_base64` / `value_base64` instead. Cursors are
//! always hex (`next_cursor_hex`). Errors are `{"error": {"code", "message",
//! "retry_after_ms"}}` with the stable snake_case code names.
//!
//! Human output prints UTF-8 as is and escapes other bytes as `\xNN`.

use base64::Engine as _;
use serde_json::{json, Map, Value};

use crate::{
    ApiError, DeleteOutcome, Entry, EventKind, Health, PutOutcome, ScanPage, VersionInfo,
    WatchEvent,
};

/// Bytes for people: UTF-8 verbatim, anything else escaped.
pub fn human_bytes(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_string(),
        Err(_) => b.escape_ascii().to_string(),
    }
}

pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Puts `bytes` into `obj` as `name` (UTF-8) or `name_base64`.
fn put_bytes(obj: &mut Map<String, Value>, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(s) => obj.insert(name.to_string(), Value::from(s)),
        Err(_) => obj.insert(
            format!("{name}_base64"),
            Value::from(base64::engine::general_purpose::STANDARD.encode(bytes)),
        ),
    };
}

pub fn entry_json(e: &Entry, with_value: bool) -> Value {
    let mut obj = Map::new();
    put_bytes(&mut obj, "key", &e.key);
    if with_value {
        put_bytes(&mut obj, "value", &e.value);
    }
    obj.insert("version".into(), e.version.into());
    obj.insert("mod_revision".into(), e.mod_revision.into());
    Value::Object(obj)
}

pub fn error_json(e: &ApiError) -> Value {
    json!({"error": {
        "code": capkv::code_name(e.code),
        "message": e.message,
        "retry_after_ms": e.retry_after_ms,
    }})
}

pub fn put_json(o: &PutOutcome) -> Value {
    let mut v = json!({"version": o.version, "revision": o.revision});
    if o.lease != 0 {
        v["lease"] = Value::from(format!("{:x}", o.lease));
    }
    v
}

pub fn delete_json(o: &DeleteOutcome) -> Value {
    json!({"existed": o.existed, "revision": o.revision})
}

pub fn scan_json(p: &ScanPage, with_values: bool) -> Value {
    let entries: Vec<Value> = p
        .entries
        .iter()
        .map(|e| entry_json(e, with_values))
        .collect();
    let mut obj = json!({"entries": entries, "revision": p.revision});
    if let Some(c) = &p.next_cursor {
        obj["next_cursor_hex"] = Value::from(hex(c));
    }
    obj
}

pub fn health_json(h: &Health) -> Value {
    json!({"live": h.live, "ready": h.ready, "status": h.status})
}

pub fn version_json(v: &VersionInfo) -> Value {
    json!({"service": v.service, "api_version": v.api_version})
}

/// A watch event as one JSON object: `kind`, then the entry's fields (a delete has no
/// value and version 0; its `mod_revision` is the delete's revision).
pub fn event_json(e: &WatchEvent) -> Value {
    let mut v = entry_json(&e.entry, e.kind == EventKind::Put);
    v["kind"] = Value::from(match e.kind {
        EventKind::Put => "put",
        EventKind::Delete => "delete",
    });
    v
}

/// A watch event as one line: `put KEY VALUE version=V revision=R` or
/// `delete KEY revision=R`.
pub fn event_human(e: &WatchEvent) -> String {
    match e.kind {
        EventKind::Put => format!(
            "put {} {} version={} revision={}",
            human_bytes(&e.entry.key),
            human_bytes(&e.entry.value),
            e.entry.version,
            e.entry.mod_revision
        ),
        EventKind::Delete => format!(
            "delete {} revision={}",
            human_bytes(&e.entry.key),
            e.entry.mod_revision
        ),
    }
}

pub fn scan_human(p: &ScanPage, with_values: bool) -> String {
    let mut out = String::new();
    for e in &p.entries {
        out.push_str(&human_bytes(&e.key));
        if with_values {
            out.push('\t');
            out.push_str(&human_bytes(&e.value));
        }
        out.push('\n');
    }
    if let Some(c) = &p.next_cursor {
        out.push_str(&format!("(more: --cursor {})\n", hex(c)));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_safe_json() {
        let e = Entry {
            key: b"k".to_vec(),
            value: vec![0xff, 0x00],
            version: 1,
            mod_revision: 2,
        };
        let v = entry_json(&e, true);
        assert_eq!(v["key"], "k");
        assert_eq!(v["value_base64"], "/wA=");
        assert!(v.get("value").is_none());
    }

    #[test]
    fn hex_round_trip() {
        assert_eq!(from_hex(&hex(&[0, 1, 0xab])), Some(vec![0, 1, 0xab]));
        assert_eq!(from_hex("abc"), None);
        assert_eq!(from_hex("zz"), None);
    }
}
