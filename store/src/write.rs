//! Writes as values: one type per kind ([`Put`], [`Delete`], [`PutMany`], [`Increment`]),
//! each with its outcome type ([`Write`]); [`WriteOp`] and [`WriteOutcome`], the same as
//! one enum each for engines' commit queues; and the
//! idempotency records that let a write be replayed without a second effect.
//!
//! A write may carry an [`IdempotencyKey`] (a session and the caller's key within it). The
//! engine then stores, atomically with the write, a record of its outcome under
//! (session, key), with the write's fingerprint (a SHA-256 of the operation) and an expiry.
//! A later write with the same (session, key):
//! - and the same fingerprint gets the recorded outcome, and writes nothing;
//! - and another fingerprint gets [`StoreError::IdempotencyKeyReused`].
//!
//! Only outcomes that would repeat are recorded (success, a failed condition, a value that
//! is not an integer); storage failures are not, so a retry may still succeed.
//!
//! Record layout (the engine stores it as a value; the first 8 bytes are what the RocksDB
//! compaction filter reads): `[expires_at_unix_ms u64 BE][fingerprint 16 B][outcome]`.

use sha2::{Digest, Sha256};

use crate::{BatchOutcome, Condition, DeleteOutcome, PutOutcome, StoreError};

pub use crate::lease::LeaseInfo;

/// Puts `value` under `key` when `cond` holds.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Put {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub cond: Condition,
    /// The lease the key lives by afterwards (see [`crate::lease`]).
    pub attach: Attach,
}

/// The lease a put leaves its key attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Attach {
    /// None: a key attached to a lease is detached (as etcd's put without a lease).
    #[default]
    None,
    /// This live lease ([`StoreError::LeaseNotFound`] otherwise).
    Lease(u64),
    /// A lease of its own with this TTL, granted by the same write (Redis's `SET ... PX`).
    NewLease { ttl_ms: u64 },
}

/// Grants a lease of `ttl_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GrantLease {
    pub ttl_ms: u64,
}

/// Revokes lease `id`: its keys are deleted at one new revision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokeLease {
    pub id: u64,
}

/// Revokes every lease past its deadline (the server's reaper sends it), each lease's keys
/// at a revision of their own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpireLeases;

/// Deletes `key` when `cond` holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delete {
    pub key: Vec<u8>,
    pub cond: Condition,
}

/// Atomic: all items or none, one revision. Keys must be distinct (callers check).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PutMany {
    pub items: Vec<(Vec<u8>, Vec<u8>, Condition)>,
}

/// Adds `delta` to the key's value read as a decimal i64 (absent = 0), like Redis INCR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Increment {
    pub key: Vec<u8>,
    pub delta: i64,
}

/// One write, as an engine receives it (its commit queue holds writes of every kind).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOp {
    Put(Put),
    Delete(Delete),
    PutMany(PutMany),
    Increment(Increment),
    GrantLease(GrantLease),
    RevokeLease(RevokeLease),
    ExpireLeases(ExpireLeases),
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGranted {
    pub id: u64,
    pub ttl_ms: u64,
}

/// What a revoke did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokeOutcome {
    /// Keys deleted.
    pub deleted: u64,
    /// The store revision after it (new when keys were deleted).
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncrementOutcome {
    /// The value after the increment.
    pub value: i64,
    pub version: u64,
    pub revision: u64,
}

/// What a write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    Put(PutOutcome),
    Delete(DeleteOutcome),
    PutMany(BatchOutcome),
    Increment(IncrementOutcome),
    GrantLease(LeaseGranted),
    RevokeLease(RevokeOutcome),
    /// How many leases expired.
    ExpireLeases(u64),
}

/// A write of one kind, and the outcome that kind has. Callers hand a `Put` to
/// [`Store::apply`](crate::Store) and get a [`PutOutcome`] back: engines answer every
/// [`WriteOp`] with the [`WriteOutcome`] of the same kind, and this is the one place that
/// relies on it (an engine that broke it would get [`StoreError::Internal`], never a
/// wrong answer).
pub trait Write: Into<WriteOp> + 'static {
    type Outcome: Send + 'static;
    /// `Self`'s outcome out of what the engine answered.
    fn outcome(o: WriteOutcome) -> Result<Self::Outcome, StoreError>;
}

macro_rules! write_kinds {
    ($($kind:ident => $outcome:ty),+ $(,)?) => {$(
        impl From<$kind> for WriteOp {
            fn from(w: $kind) -> Self {
                WriteOp::$kind(w)
            }
        }
        impl Write for $kind {
            type Outcome = $outcome;
            fn outcome(o: WriteOutcome) -> Result<$outcome, StoreError> {
                match o {
                    WriteOutcome::$kind(o) => Ok(o),
                    other => Err(StoreError::Internal(format!(
                        concat!("the engine answered a ", stringify!($kind), " with {:?}"),
                        other
                    ))),
                }
            }
        }
    )+};
}

write_kinds! {
    Put => PutOutcome,
    Delete => DeleteOutcome,
    PutMany => BatchOutcome,
    Increment => IncrementOutcome,
    GrantLease => LeaseGranted,
    RevokeLease => RevokeOutcome,
    ExpireLeases => u64,
}

/// Makes a write idempotent within a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    /// The session's id (opaque to the engine).
    pub session: Vec<u8>,
    /// The caller's key for this write, unique within the session.
    pub key: Vec<u8>,
    /// When the record may be forgotten.
    pub expires_at_unix_ms: u64,
}

impl IdempotencyKey {
    /// The record's key: length-prefixed session, then the key, so no two pairs collide.
    pub fn record_key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(2 + self.session.len() + self.key.len());
        k.extend_from_slice(&(self.session.len() as u16).to_be_bytes());
        k.extend_from_slice(&self.session);
        k.extend_from_slice(&self.key);
        k
    }
}

impl WriteOp {
    /// SHA-256 of the operation, truncated to 16 bytes: what a replay must match.
    pub fn fingerprint(&self) -> [u8; 16] {
        let mut h = Sha256::new();
        let bytes = |h: &mut Sha256, b: &[u8]| {
            h.update((b.len() as u64).to_be_bytes());
            h.update(b);
        };
        let cond = |h: &mut Sha256, c: &Condition| match c {
            Condition::None => h.update([0]),
            Condition::IfVersion(v) => {
                h.update([1]);
                h.update(v.to_be_bytes());
            }
            Condition::IfAbsent => h.update([2]),
        };
        match self {
            WriteOp::Put(Put {
                key,
                value,
                cond: c,
                attach,
            }) => {
                h.update(b"put");
                bytes(&mut h, key);
                bytes(&mut h, value);
                cond(&mut h, c);
                // Nothing for no lease: fingerprints recorded before leases still match.
                match attach {
                    Attach::None => {}
                    Attach::Lease(id) => {
                        h.update(b"lease");
                        h.update(id.to_be_bytes());
                    }
                    Attach::NewLease { ttl_ms } => {
                        h.update(b"ttl");
                        h.update(ttl_ms.to_be_bytes());
                    }
                }
            }
            WriteOp::Delete(Delete { key, cond: c }) => {
                h.update(b"delete");
                bytes(&mut h, key);
                cond(&mut h, c);
            }
            WriteOp::PutMany(PutMany { items }) => {
                h.update(b"put_many");
                h.update((items.len() as u64).to_be_bytes());
                for (k, v, c) in items {
                    bytes(&mut h, k);
                    bytes(&mut h, v);
                    cond(&mut h, c);
                }
            }
            WriteOp::Increment(Increment { key, delta }) => {
                h.update(b"increment");
                bytes(&mut h, key);
                h.update(delta.to_be_bytes());
            }
            WriteOp::GrantLease(GrantLease { ttl_ms }) => {
                h.update(b"grant_lease");
                h.update(ttl_ms.to_be_bytes());
            }
            WriteOp::RevokeLease(RevokeLease { id }) => {
                h.update(b"revoke_lease");
                h.update(id.to_be_bytes());
            }
            WriteOp::ExpireLeases(ExpireLeases) => h.update(b"expire_leases"),
        }
        let digest = h.finalize();
        let mut out = [0u8; 16];
        out.copy_from_slice(&digest[..16]);
        out
    }
}

/// Milliseconds since the Unix epoch: the clock idempotency expiries are written in and
/// compared with (0 if the clock is before the epoch).
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The new value of an increment of `current` (absent = 0) by `delta`.
pub fn incremented(current: Option<&[u8]>, delta: i64) -> Result<i64, StoreError> {
    let now = match current {
        None => 0,
        Some(v) => std::str::from_utf8(v)
            .ok()
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or(StoreError::NotAnInteger)?,
    };
    now.checked_add(delta).ok_or(StoreError::NotAnInteger)
}

/// Whether an outcome is the same on every replay, and so worth recording.
pub fn recordable(outcome: &Result<WriteOutcome, StoreError>) -> bool {
    matches!(
        outcome,
        Ok(_)
            | Err(StoreError::ConditionFailed { .. })
            | Err(StoreError::NotAnInteger)
            | Err(StoreError::LeaseNotFound { .. })
    )
}

/// A decoded idempotency record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub expires_at_unix_ms: u64,
    pub fingerprint: [u8; 16],
    pub outcome: Result<WriteOutcome, StoreError>,
}

impl Record {
    /// The answer to a write carrying this record's key and `fingerprint`.
    pub fn replay(&self, fingerprint: &[u8; 16]) -> Result<WriteOutcome, StoreError> {
        if &self.fingerprint != fingerprint {
            return Err(StoreError::IdempotencyKeyReused);
        }
        self.outcome.clone()
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(48);
        b.extend_from_slice(&self.expires_at_unix_ms.to_be_bytes());
        b.extend_from_slice(&self.fingerprint);
        let u64s = |b: &mut Vec<u8>, vs: &[u64]| {
            vs.iter()
                .for_each(|v| b.extend_from_slice(&v.to_be_bytes()))
        };
        match &self.outcome {
            // A put without a lease as before leases (tag 0), so old records still read.
            Ok(WriteOutcome::Put(o)) if o.lease == 0 => {
                b.push(0);
                u64s(&mut b, &[o.version, o.revision]);
            }
            Ok(WriteOutcome::Put(o)) => {
                b.push(4);
                u64s(&mut b, &[o.version, o.revision, o.lease]);
            }
            Ok(WriteOutcome::GrantLease(o)) => {
                b.push(5);
                u64s(&mut b, &[o.id, o.ttl_ms]);
            }
            Ok(WriteOutcome::RevokeLease(o)) => {
                b.push(6);
                u64s(&mut b, &[o.deleted, o.revision]);
            }
            Ok(WriteOutcome::ExpireLeases(n)) => {
                b.push(7);
                u64s(&mut b, &[*n]);
            }
            Err(StoreError::LeaseNotFound { id }) => {
                b.push(12);
                u64s(&mut b, &[*id]);
            }
            Ok(WriteOutcome::Delete(o)) => {
                b.push(1);
                u64s(&mut b, &[u64::from(o.existed), o.revision]);
            }
            Ok(WriteOutcome::PutMany(o)) => {
                b.push(2);
                u64s(&mut b, &[o.revision, o.versions.len() as u64]);
                u64s(&mut b, &o.versions);
            }
            Ok(WriteOutcome::Increment(o)) => {
                b.push(3);
                u64s(&mut b, &[o.value as u64, o.version, o.revision]);
            }
            Err(StoreError::ConditionFailed {
                index,
                current_version,
            }) => {
                b.push(10);
                u64s(
                    &mut b,
                    &[
                        *index as u64,
                        u64::from(current_version.is_some()),
                        current_version.unwrap_or(0),
                    ],
                );
            }
            // Only recordable outcomes are encoded; anything else reads back as this.
            Err(_) => b.push(11),
        }
        b
    }

    pub fn decode(b: &[u8]) -> Result<Record, StoreError> {
        let bad = || StoreError::Internal("malformed idempotency record".into());
        let word = |i: usize| -> Result<u64, StoreError> {
            let at = 25 + i * 8;
            b.get(at..at + 8)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map(u64::from_be_bytes)
                .ok_or_else(bad)
        };
        let expires_at_unix_ms = b
            .get(..8)
            .and_then(|s| <[u8; 8]>::try_from(s).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(bad)?;
        let fingerprint = b
            .get(8..24)
            .and_then(|s| <[u8; 16]>::try_from(s).ok())
            .ok_or_else(bad)?;
        let outcome = match b.get(24).ok_or_else(bad)? {
            0 => Ok(WriteOutcome::Put(PutOutcome {
                version: word(0)?,
                revision: word(1)?,
                lease: 0,
            })),
            4 => Ok(WriteOutcome::Put(PutOutcome {
                version: word(0)?,
                revision: word(1)?,
                lease: word(2)?,
            })),
            5 => Ok(WriteOutcome::GrantLease(LeaseGranted {
                id: word(0)?,
                ttl_ms: word(1)?,
            })),
            6 => Ok(WriteOutcome::RevokeLease(RevokeOutcome {
                deleted: word(0)?,
                revision: word(1)?,
            })),
            7 => Ok(WriteOutcome::ExpireLeases(word(0)?)),
            12 => Err(StoreError::LeaseNotFound { id: word(0)? }),
            1 => Ok(WriteOutcome::Delete(DeleteOutcome {
                existed: word(0)? != 0,
                revision: word(1)?,
            })),
            2 => {
                let n = word(1)? as usize;
                if n > (b.len().saturating_sub(41)) / 8 {
                    return Err(bad());
                }
                Ok(WriteOutcome::PutMany(BatchOutcome {
                    revision: word(0)?,
                    versions: (0..n).map(|i| word(2 + i)).collect::<Result<_, _>>()?,
                }))
            }
            3 => Ok(WriteOutcome::Increment(IncrementOutcome {
                value: word(0)? as i64,
                version: word(1)?,
                revision: word(2)?,
            })),
            10 => Err(StoreError::ConditionFailed {
                index: word(0)? as usize,
                current_version: (word(1)? != 0).then_some(word(2)?),
            }),
            11 => Err(StoreError::NotAnInteger),
            _ => return Err(bad()),
        };
        Ok(Record {
            expires_at_unix_ms,
            fingerprint,
            outcome,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn records_round_trip() {
        let outcomes = [
            Ok(WriteOutcome::Put(PutOutcome {
                version: 3,
                revision: 9,
                lease: 0,
            })),
            Ok(WriteOutcome::Put(PutOutcome {
                version: 3,
                revision: 9,
                lease: 77,
            })),
            Ok(WriteOutcome::GrantLease(LeaseGranted { id: 5, ttl_ms: 9 })),
            Ok(WriteOutcome::RevokeLease(RevokeOutcome {
                deleted: 2,
                revision: 11,
            })),
            Ok(WriteOutcome::ExpireLeases(3)),
            Err(StoreError::LeaseNotFound { id: 42 }),
            Ok(WriteOutcome::Delete(DeleteOutcome {
                existed: true,
                revision: 4,
            })),
            Ok(WriteOutcome::PutMany(BatchOutcome {
                versions: vec![1, 7, 2],
                revision: 5,
            })),
            Ok(WriteOutcome::Increment(IncrementOutcome {
                value: -12,
                version: 2,
                revision: 8,
            })),
            Err(StoreError::ConditionFailed {
                index: 2,
                current_version: Some(6),
            }),
            Err(StoreError::ConditionFailed {
                index: 0,
                current_version: None,
            }),
            Err(StoreError::NotAnInteger),
        ];
        for outcome in outcomes {
            let r = Record {
                expires_at_unix_ms: 123,
                fingerprint: [7; 16],
                outcome,
            };
            assert_eq!(Record::decode(&r.encode()).unwrap(), r);
        }
        assert!(Record::decode(&[1, 2, 3]).is_err());
    }

    #[test]
    fn fingerprints_tell_parameters_apart() {
        let put = |v: &[u8]| {
            WriteOp::from(Put {
                key: b"k".to_vec(),
                value: v.to_vec(),
                cond: Condition::None,
                attach: Attach::None,
            })
        };
        assert_eq!(put(b"a").fingerprint(), put(b"a").fingerprint());
        // A put without a lease hashes as it did before leases (records outlive upgrades).
        assert_eq!(
            hex(&put(b"a").fingerprint()),
            "246ea55eb5f7ea2a168dfd3bac6ec8c7",
            "the fingerprint of a put without a lease changed"
        );
        let leased = WriteOp::from(Put {
            key: b"k".to_vec(),
            value: b"a".to_vec(),
            cond: Condition::None,
            attach: Attach::Lease(1),
        });
        assert_ne!(leased.fingerprint(), put(b"a").fingerprint());
        assert_ne!(put(b"a").fingerprint(), put(b"b").fingerprint());
        let inc = |d| {
            WriteOp::from(Increment {
                key: b"k".to_vec(),
                delta: d,
            })
        };
        assert_ne!(inc(1).fingerprint(), inc(2).fingerprint());
        let k = IdempotencyKey {
            session: b"ab".to_vec(),
            key: b"c".to_vec(),
            expires_at_unix_ms: 0,
        };
        let k2 = IdempotencyKey {
            session: b"a".to_vec(),
            key: b"bc".to_vec(),
            expires_at_unix_ms: 0,
        };
        assert_ne!(k.record_key(), k2.record_key());
    }

    #[test]
    fn increments_parse_decimal_values() {
        assert_eq!(incremented(None, 5), Ok(5));
        assert_eq!(incremented(Some(b"-3"), 5), Ok(2));
        assert_eq!(incremented(Some(b"x"), 1), Err(StoreError::NotAnInteger));
        assert_eq!(
            incremented(Some(i64::MAX.to_string().as_bytes()), 1),
            Err(StoreError::NotAnInteger)
        );
    }
}
