//! A group's effects as the log stores them: what changed, with every number it changed to,
//! so that a replay needs no clock and re-evaluates no condition.
//!
//! Each effect is a tag byte then its fields, integers little-endian, byte strings with a
//! u32 length before them:
//! - `PUT` key, value, version u64, mod revision u64
//! - `DELETE` key, revision u64
//! - `GRANT` lease id u64, TTL ms u64 (a lease's deadline is not logged: a replay gives
//!   every lease its full TTL from the time of the replay, as the RocksDB engine does)
//! - `REVOKE` lease id u64 (its keys' deletes are effects of their own)
//! - `ATTACH` key, lease id u64 (0: detached)
//! - `RECORD` record key, the idempotency record ([`crate::write::Record::encode`])
//!
//! Every effect sets an absolute state, so replaying one that a snapshot already holds
//! changes nothing (what lets a snapshot be taken while writes go on).

use crate::write::Record;

const PUT: u8 = 1;
const DELETE: u8 = 2;
const GRANT: u8 = 3;
const REVOKE: u8 = 4;
const ATTACH: u8 = 5;
const RECORD: u8 = 6;

/// One decoded effect, borrowing from the log's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect<'a> {
    Put {
        key: &'a [u8],
        value: &'a [u8],
        version: u64,
        mod_revision: u64,
    },
    Delete {
        key: &'a [u8],
        revision: u64,
    },
    Grant {
        id: u64,
        ttl_ms: u64,
    },
    Revoke {
        id: u64,
    },
    Attach {
        key: &'a [u8],
        lease: u64,
    },
    Record {
        key: &'a [u8],
        record: &'a [u8],
    },
}

fn bytes(b: &mut Vec<u8>, v: &[u8]) {
    // Keys and values are bounded far below 4 GiB by the server's limits; a longer one
    // would not decode, which the length check on replay reports as corruption.
    b.extend_from_slice(&(v.len() as u32).to_le_bytes());
    b.extend_from_slice(v);
}

fn word(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put(b: &mut Vec<u8>, key: &[u8], value: &[u8], version: u64, mod_revision: u64) {
    b.push(PUT);
    bytes(b, key);
    bytes(b, value);
    word(b, version);
    word(b, mod_revision);
}

pub(crate) fn delete(b: &mut Vec<u8>, key: &[u8], revision: u64) {
    b.push(DELETE);
    bytes(b, key);
    word(b, revision);
}

pub(crate) fn grant(b: &mut Vec<u8>, id: u64, ttl_ms: u64) {
    b.push(GRANT);
    word(b, id);
    word(b, ttl_ms);
}

pub(crate) fn revoke(b: &mut Vec<u8>, id: u64) {
    b.push(REVOKE);
    word(b, id);
}

pub(crate) fn attach(b: &mut Vec<u8>, key: &[u8], lease: u64) {
    b.push(ATTACH);
    bytes(b, key);
    word(b, lease);
}

pub(crate) fn record(b: &mut Vec<u8>, key: &[u8], record: &Record) {
    b.push(RECORD);
    bytes(b, key);
    bytes(b, &record.encode());
}

/// Reads effects off the front of a byte slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("an effect runs past its record ({n} bytes wanted)"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn word(&mut self) -> Result<u64, String> {
        let b = self.take(8)?;
        Ok(u64::from_le_bytes(b.try_into().map_err(|_| "short word")?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let b = self.take(4)?;
        let n = u32::from_le_bytes(b.try_into().map_err(|_| "short length")?);
        self.take(n as usize)
    }

    fn effect(&mut self) -> Result<Effect<'a>, String> {
        let tag = self.take(1)?[0];
        Ok(match tag {
            PUT => Effect::Put {
                key: self.bytes()?,
                value: self.bytes()?,
                version: self.word()?,
                mod_revision: self.word()?,
            },
            DELETE => Effect::Delete {
                key: self.bytes()?,
                revision: self.word()?,
            },
            GRANT => Effect::Grant {
                id: self.word()?,
                ttl_ms: self.word()?,
            },
            REVOKE => Effect::Revoke { id: self.word()? },
            ATTACH => Effect::Attach {
                key: self.bytes()?,
                lease: self.word()?,
            },
            RECORD => Effect::Record {
                key: self.bytes()?,
                record: self.bytes()?,
            },
            other => return Err(format!("unknown effect tag {other}")),
        })
    }
}

/// The effects in `b`, in order; an error for bytes that are not whole effects (the
/// record's checksum held, so this is a bug or a format this build does not know).
pub(crate) fn decode(b: &[u8]) -> impl Iterator<Item = Result<Effect<'_>, String>> {
    let mut r = Reader(b);
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || r.0.is_empty() {
            return None;
        }
        let e = r.effect();
        failed = e.is_err();
        Some(e)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{PutOutcome, WriteOutcome};

    #[test]
    fn every_effect_reads_back_as_written() {
        let rec = Record {
            expires_at_unix_ms: 7,
            fingerprint: [3; 16],
            outcome: Ok(WriteOutcome::Put(PutOutcome {
                version: 1,
                revision: 2,
                lease: 0,
            })),
        };
        let mut b = Vec::new();
        let mut ends = Vec::new();
        put(&mut b, b"k", b"value", 3, 9);
        ends.push(b.len());
        delete(&mut b, b"gone", 10);
        ends.push(b.len());
        grant(&mut b, 42, 5_000);
        ends.push(b.len());
        attach(&mut b, b"k", 42);
        ends.push(b.len());
        revoke(&mut b, 42);
        ends.push(b.len());
        record(&mut b, b"rk", &rec);
        let got: Vec<Effect<'_>> = decode(&b).collect::<Result<_, _>>().unwrap();
        let encoded = rec.encode();
        assert_eq!(
            got,
            vec![
                Effect::Put {
                    key: b"k",
                    value: b"value",
                    version: 3,
                    mod_revision: 9
                },
                Effect::Delete {
                    key: b"gone",
                    revision: 10
                },
                Effect::Grant {
                    id: 42,
                    ttl_ms: 5_000
                },
                Effect::Attach {
                    key: b"k",
                    lease: 42
                },
                Effect::Revoke { id: 42 },
                Effect::Record {
                    key: b"rk",
                    record: &encoded
                },
            ]
        );
        // A cut inside an effect is an error, never a shorter list taken as whole.
        for cut in 1..b.len() {
            let whole = decode(&b[..cut]).all(|e| e.is_ok());
            assert_eq!(whole, ends.contains(&cut), "cut at {cut}");
        }
    }
}
