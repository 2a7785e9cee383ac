@0xcd35794f751403be;
# capkv wire contract, API version 4 (2 added Gateway.admin and Admin; 3 added the
# capability fields outside the result unions: OpenResult.kvCap, AdminResult.adminCap,
# SessionResult.sessionCap; 4 added KvStore.watch and Watcher, leases: WriteSession.grantLease
# and lease, Lease, put's lease and ttlMs).
#
# Compatibility rules: fields and methods are only ever added, never renumbered, renamed in
# meaning or removed. Enum values keep their numbers forever. A client built against an
# older copy of this file keeps working against a newer server.
#
# Every method takes a RequestContext and returns a result struct whose union is either
# the success payload or an Error. Transport failures (a broken connection) surface as
# Cap'n Proto exceptions, which clients map to `unavailable`.
#
# Pipelining: a call that returns a capability (`open`, `admin`, `session`,
# `resumeSession`, and any added later) also puts it in a field *outside* its result
# union, named `...Cap`, so that every Cap'n Proto implementation can pipeline on it
# through its generated Pipeline API (the C++ library, and so pycapnp, cannot pipeline on
# union members): `gateway.open(ctx, t).result.kvCap.get(ctx, k)` is one round trip.
# When the call fails, that field holds a stand-in capability whose every method answers
# with the same Error (code, message, retryAfterMs) in its own result union; a stand-in's
# methods that return a capability return another stand-in. A pipelining client therefore
# learns why its pipelined call failed from that call's own result, and reading the
# original call's result gives the same Error. Release a stand-in like any capability.
# API v2 clients pipelined on the union's member 0 (the capability shares pointer slot 0
# with `error`); the server still fills it, so they keep working.

struct RequestContext {
  # Per-call metadata that travels with every request.

  deadline :union {
    # How long the caller is still willing to wait, as a relative budget rather than an
    # absolute time, so that client and server clocks never need to agree.

    unset @0 :Void;
    # No budget given: the server applies its per-method default.

    budgetMs @1 :UInt32;
    # Remaining budget in milliseconds, measured when the request was sent. 0 means the
    # budget is already spent and the server rejects the call before doing any work. The
    # server caps it at its per-method maximum.
  }

  traceparent @2 :Text;
  # W3C trace context `traceparent` header value of the caller's span; empty if none.

  tracestate @3 :Text;
  # W3C trace context `tracestate` header value; empty if none.

  requestId @4 :Text;
  # Caller-chosen id for correlating logs; the server logs it and echoes nothing else.
  # At most 128 bytes.

  attempt @5 :UInt32;
  # 1 for the first try of a logical call, 2 for the first retry, and so on. 0 is read as 1.
}

enum ErrorCode {
  # Stable error codes. The numbers are part of the contract.

  internal @0;
  # A server bug or an unexpected storage failure. Not retried automatically.

  invalidArgument @1;
  # The request is malformed in a way no more specific code describes.

  notFound @2;
  # The key does not exist.

  conditionFailed @3;
  # A write's condition (ifVersion / ifAbsent) did not hold; nothing was written.

  unauthenticated @4;
  # `open` got a missing or wrong token.

  unavailable @5;
  # The server cannot take the call right now (shutting down, storage unavailable).
  # Safe to retry, after `retryAfterMs` when given.

  overloaded @6;
  # Admission control refused the call before any work. Safe to retry after `retryAfterMs`.

  deadlineExceeded @7;
  # The budget ran out before the call finished (or was already spent on arrival). For a
  # write, the outcome is unknown only if it was reported after the write started.

  emptyKey @8;
  # A key of zero bytes.

  keyTooLarge @9;
  # A key longer than the server's `limits.max_key_bytes` (default 1024).

  valueTooLarge @10;
  # A value longer than the server's `limits.max_value_bytes` (default 1 MiB).

  scanLimitTooLarge @11;
  # A scan `limit` above the server's `limits.max_scan_limit` (default 10000).

  requestTooLarge @12;
  # A request larger than the server's message limit. Usually the server cannot even decode
  # such a request and closes the connection instead; clients report that as this code.

  invalidRange @13;
  # A scan whose range, prefix or cursor is inconsistent (e.g. start after end, a cursor
  # outside the range, both a prefix and a start/end).

  permissionDenied @14;
  # The capability used does not allow this operation.

  tooManyItems @15;
  # A batch call (`getMany`, `putMany`) with more items than `limits.max_batch_items`
  # (default 1000), or with none.

  responseTooLarge @16;
  # The answer would carry more than `limits.max_scan_bytes` (default 4 MiB) of keys and
  # values (a `getMany` of many large values); ask for fewer keys.

  idempotencyKeyReused @17;
  # The write's idempotency key was already used in its session for a write with other
  # parameters. Not retried: choose a new key for a new write.

  notAnInteger @18;
  # An increment met a value that is not a decimal 64-bit integer, or would overflow it.

  tooManyCapabilities @19;
  # A call that returns a capability (`open`, `admin`, `session`, `resumeSession`) on a
  # connection that already holds `limits.max_capabilities_per_connection` (default 10000)
  # capabilities the server exported to it, stand-ins included. Release some (drop them)
  # and call again; the connection stays usable. Not retried automatically. At the limit,
  # the result's `...Cap` field is a shared stand-in whose calls answer with this code.

  storageFull @20;
  # The disk holding the data is (nearly) full: free space fell below the server's
  # `storage.min_free_bytes`, or storage is open read-only after a restart on a full disk.
  # The write was refused before it reached storage; nothing was written. Reads and
  # deletes still work. Not retried automatically: an operator has to free space; try
  # again after `retryAfterMs` at the earliest.

  compacted @21;
  # A watch asked for events from a revision the server's history no longer holds
  # (`storage.history_revisions`, `storage.memory_history_events`), or a watcher fell so
  # far behind that its next events are gone. The result's `oldestRevision` is the oldest
  # revision a watch can start from now; read the current state (scan) and watch from
  # there. Not retried automatically.

  leaseNotFound @22;
  # The lease named (a put's `lease`, `WriteSession.lease`, or a `Lease` capability's) does
  # not exist: never granted, revoked, or expired (its keys are gone with it). Nothing was
  # written. Not retried automatically: grant a new lease.
}

struct Error {
  # The failure half of every result union.

  code @0 :ErrorCode;
  # What went wrong, as a stable code. Clients branch on this, never on `message`.

  message @1 :Text;
  # Human-readable detail for logs and operators. Never contains server paths, stack
  # traces, tokens or stored values.

  retryAfterMs @2 :UInt32;
  # For retryable codes: how long the client should wait before retrying; 0 = no advice.
}

struct Entry {
  # One stored key.

  key @0 :Data;
  # The key's bytes (1 to `limits.max_key_bytes` long).

  value @1 :Data;
  # The value's bytes; empty in a `keysOnly` scan.

  version @2 :UInt64;
  # Number of writes to this key since it was (re)created: 1 after the first put. A delete
  # ends the key's life; a later put starts again at 1.

  modRevision @3 :UInt64;
  # The store revision of the write that produced this value.
}

struct Condition {
  # Optional precondition of a write. If it does not hold the write does nothing and
  # returns `conditionFailed`.

  union {
    none @0 :Void;
    # Unconditional.

    ifVersion @1 :UInt64;
    # The key's current version must equal this value (0: the key must not exist).

    ifAbsent @2 :Void;
    # The key must not exist.
  }
}

interface Gateway {
  # The bootstrap capability: what every connection gets first.

  health @0 (ctx :RequestContext) -> (result :HealthResult);
  # Liveness and readiness; needs no token.

  version @1 (ctx :RequestContext) -> (result :VersionResult);
  # Service and API version; needs no token.

  open @2 (ctx :RequestContext, token :Text) -> (result :OpenResult);
  # Exchanges a bearer token for the data capability. With no token configured on the
  # server any token (also the empty one) is accepted. Clients pipeline on `result.kvCap`
  # so that `open(t).kvCap.get(k)` costs one round trip.

  admin @3 (ctx :RequestContext, adminToken :Text) -> (result :AdminResult);
  # Exchanges the operator token (`admin.token`, distinct from the data token) for the
  # Admin capability. With no admin token configured, admin is refused with
  # `permissionDenied` unless the server runs with the explicit `--dev-admin` flag.
  # A wrong token gets `unauthenticated`. Nothing reachable from `KvStore` or
  # `WriteSession` ever yields an Admin.
}

struct AdminResult {
  union {
    admin @0 :Admin;
    # The Admin capability (also in `adminCap`).

    error @1 :Error;
    # `unauthenticated`, `permissionDenied`, or a chain rejection.
  }

  adminCap @2 :Admin;
  # The Admin capability, outside the union so that clients can pipeline on it; on error, a
  # stand-in that answers every call with `error` (see the pipelining note at the top).
}

interface Admin {
  # Operator actions on a running server. Admin calls are never subject to injected faults,
  # so a plan can always be cleared.

  setFaults @0 (ctx :RequestContext, plan :Text) -> (result :FaultsResult);
  # Arms a fault plan, replacing the armed one; an empty plan clears it. The plan's text
  # form: items separated by `;`, an optional `seed=N` and rules
  # `METHOD ACTION [p=P] [for=DURATION] [times=N]`, METHOD a method name or `*` (every data method),
  # ACTION one of `fail=CODE` (an ErrorCode name in snake_case, e.g. `unavailable`),
  # `latency=300ms[+-50ms]`, `stall`, `drop-reply` (do the work, then close the connection
  # instead of replying), `close` (close the connection first). Example:
  # `seed=7; get fail=unavailable p=0.3; * latency=5ms+-2ms for=1m`.
  # A plan that does not parse, or names an unknown method or code, gets `invalidArgument`.

  showFaults @1 (ctx :RequestContext) -> (result :FaultsResult);
  # The armed plan; each rule's `for=` is the time it has left.

  clearFaults @2 (ctx :RequestContext) -> (result :FaultsResult);
  # Disarms every rule.

  compact @3 (ctx :RequestContext) -> (result :AdminAck);
  # Compacts the storage engine now (also drops expired idempotency records). Returns when
  # done; give it a generous deadline.

  checkpoint @5 (ctx :RequestContext, dir :Text) -> (result :AdminAck);
  # Writes a consistent copy of the whole store (a RocksDB checkpoint: hard links on the
  # same filesystem) into `dir`, a path on the server's machine that must not exist yet;
  # a server started on that directory has every key. `invalidArgument` if the directory
  # exists or the engine keeps no files.

  reloadConfig @4 (ctx :RequestContext) -> (result :ReloadResult);
  # Reads the configuration again (as SIGHUP does) and puts in force what can change
  # without a restart: tokens (a replaced token stays valid for `auth.rotation_overlap_s`),
  # limits, deadlines and timeouts, rates, the log level. A config that does not load or
  # validate is refused with `invalidArgument` and the running one stays.
}

struct ReloadResult {
  union {
    ok @0 :Text;
    # What changed, e.g. "auth.token rotated; limits changed", or "nothing changed".
    error @1 :Error;
  }
}

struct FaultsResult {
  union {
    ok :group {
      plan @0 :Text;
      # The armed plan after the call, in the text form above (`seed=0` alone: none).

      rules @1 :UInt32;
      # Number of armed rules.
    }
    error @2 :Error;
  }
}

struct AdminAck {
  union {
    ok @0 :Void;
    error @1 :Error;
  }
}

struct HealthResult {
  # Result of `Gateway.health`.
  union {
    ok :group {
      live @0 :Bool;
      # The process is up and serving RPC.

      ready @1 :Bool;
      # The server accepts new work (false while starting or draining).

      status @2 :Text;
      # "serving", "draining", or why writes are refused (e.g. "disk space low: writes are
      # refused"), when `ready` is false.
    }
    error @3 :Error;
    # Why the call failed (see ErrorCode for the codes it may carry).
  }
}

struct VersionResult {
  # Result of `Gateway.version`.
  union {
    ok :group {
      service @0 :Text;
      # Server build version (semver of the kv-server crate).

      apiVersion @1 :UInt32;
      # Version of this wire contract; bumped when methods or fields are added.
    }
    error @2 :Error;
    # Why the call failed (see ErrorCode for the codes it may carry).
  }
}

struct OpenResult {
  union {
    kv @0 :KvStore;
    # The data capability: holding it is the permission to read and to open sessions.
    # Kept for API v2 clients, which pipeline on this union member; new clients use `kvCap`.

    error @1 :Error;
    # `unauthenticated`, or a chain rejection (`unavailable`, `overloaded`, ...).
  }

  kvCap @2 :KvStore;
  # The same data capability, outside the union so that every Cap'n Proto implementation
  # can pipeline on it. On error, a stand-in whose every call answers with `error` (see the
  # pipelining note at the top).
}

interface KvStore {
  # Read access to the keyspace, and the door to writes through sessions.

  get @0 (ctx :RequestContext, key :Data) -> (result :GetResult);
  # The current value and version of `key`, or `notFound`.

  scan @1 (ctx :RequestContext, range :ScanRange) -> (result :ScanResult);
  # Keys in ascending byte order. A page holds at most `limit` entries and at most the
  # server's `limits.max_scan_bytes`; `nextCursor` resumes after the page.

  session @2 (ctx :RequestContext) -> (result :SessionResult);
  # A new write session. Writes go through it. The result also carries the session's
  # token, with which `resumeSession` returns the same session after a reconnect (or a
  # server restart): idempotency keys are scoped to it.

  getMany @3 (ctx :RequestContext, keys :List(Data)) -> (result :GetManyResult);
  # Several gets in one call, read at one revision: the answer to Redis pipelining when
  # keys are small. 1 to `limits.max_batch_items` keys, each checked like `get`'s key;
  # one bad key fails the whole call. Items come back in the order of `keys`. If the found
  # keys and values add up to more than `limits.max_scan_bytes` (and more than one entry
  # at the size limits), the call fails with `responseTooLarge`.

  resumeSession @4 (ctx :RequestContext, token :Data) -> (result :SessionResult);
  # The session `token` names (from an earlier `session`), on any connection, also after a
  # server restart. A token this server did not issue gets `permissionDenied`.

  watch @5 (ctx :RequestContext, range :WatchRange, startRevision :UInt64)
      -> (result :WatchResult);
  # A watcher of the keys in `range`: its `next` returns every change to them, in revision
  # order, from `startRevision` on (0 = from the next write). A start older than the
  # server's history gets `compacted`. Pipeline on `result.watcherCap`:
  # `kv.watch(ctx, r, 0).result.watcherCap.next(ctx, 100, 10000)` is one round trip.
}

struct WatchRange {
  # The keys a watcher follows.
  union {
    range :group {
      # A key range [start, end).
      start @0 :Data;
      # Inclusive lower bound; empty = the first key.
      end @1 :Data;
      # Exclusive upper bound; empty = no upper bound.
    }
    prefix @2 :Data;
    # Every key that starts with these bytes (empty = every key).
  }
}

struct WatchResult {
  union {
    watcher @0 :Watcher;
    # The watcher (also in `watcherCap`).

    error @1 :Error;
    # `compacted` (see `oldestRevision`), `invalidRange`, or a chain rejection.
  }

  watcherCap @2 :Watcher;
  # The watcher, outside the union so that every Cap'n Proto implementation can pipeline
  # on it. On error, a stand-in whose every call answers with `error`.

  revision @3 :UInt64;
  # The store's revision when the watch started.

  oldestRevision @4 :UInt64;
  # With `compacted`: the oldest revision a watch can start from now.
}

interface Watcher {
  # Changes to a range of keys, pulled at the caller's pace. The server keeps the
  # watcher's position (the revision it has delivered through), so calls may be pipelined:
  # several `next` calls in flight return consecutive batches, in the order sent. Release
  # the capability to stop watching; a watcher costs the server nothing between calls.

  next @0 (ctx :RequestContext, maxEvents :UInt32, waitMs :UInt32) -> (result :WatchEvents);
  # The events after the last one returned (whole revisions: at most `maxEvents`, 0 =
  # 100, unless one revision alone has more; at most `limits.max_batch_items`), waiting up
  # to `waitMs` (at most 60000, and within the call's deadline) for one when there are
  # none. An empty batch after the wait is not an error: call again.
}

enum EventKind {
  put @0;
  # The key was written (put, increment, an item of a putMany): `entry` is its new value.
  delete @1;
  # The key was deleted: `entry` holds its key and, as `modRevision`, the delete's revision.
}

struct Event {
  kind @0 :EventKind;
  entry @1 :Entry;
}

struct WatchEvents {
  # Result of `Watcher.next`.
  union {
    ok :group {
      events @0 :List(Event);
      # In revision order (write order within one revision).

      revision @1 :UInt64;
      # The revision the watcher has read through: every change in its range up to it has
      # been returned. A reconnecting client watches again from `revision + 1`.
    }
    error @2 :Error;
    # `compacted` (see `oldestRevision`), `tooManyItems`, `invalidArgument`, or a chain
    # rejection.
  }

  oldestRevision @3 :UInt64;
  # With `compacted`: the oldest revision a watch can start from now.
}

struct GetManyResult {
  # Result of `KvStore.getMany`.
  union {
    ok :group {
      items @0 :List(GetItem);
      # One per requested key, in request order.

      revision @1 :UInt64;
      # The store revision the items were read at.
    }
    error @2 :Error;
    # Why the call failed (see ErrorCode for the codes it may carry).
  }
}

struct GetItem {
  # One key's outcome in a `getMany`.
  union {
    found @0 :Entry;
    # The key's current entry.

    notFound @1 :Void;
    # The key does not exist.
  }
}

struct ScanRange {
  # What a scan covers, and how much of it one page returns.
  union {
    range :group {
      # A key range [start, end).

      start @0 :Data;
      # Inclusive lower bound; empty = the first key.

      end @1 :Data;
      # Exclusive upper bound; empty = no upper bound.
    }
    prefix @2 :Data;
    # Every key that starts with these bytes (empty = every key).
  }

  limit @3 :UInt32;
  # Maximum entries in this page; 0 = the server's default (`limits.default_scan_limit`).
  # Above `limits.max_scan_limit` the call fails with `scanLimitTooLarge`.

  cursor @4 :Data;
  # Empty for the first page; otherwise the `nextCursor` of the previous page, sent with the
  # same range. Opaque to clients.

  keysOnly @5 :Bool;
  # Return keys and versions without values.
}

struct ScanResult {
  # Result of `KvStore.scan`.
  union {
    ok :group {
      entries @0 :List(Entry);
      # The page, in ascending key order.

      nextCursor @1 :Data;
      # Empty when the range is exhausted; otherwise pass it back as `cursor`.
      revision @2 :UInt64;
      # Store revision when the page was read.
    }
    error @3 :Error;
    # Why the call failed (see ErrorCode for the codes it may carry).
  }
}

struct GetResult {
  # Result of `KvStore.get`.
  union {
    ok @0 :Entry;
    # The key's current entry.

    error @1 :Error;
    # `notFound` when the key does not exist, or any other failure.
  }
}

struct SessionResult {
  union {
    session @0 :WriteSession;
    # The new session (also in `sessionCap`). Kept for API v2 clients.

    error @1 :Error;
    # A chain rejection (`unavailable`, `overloaded`, ...).
  }

  token @2 :Data;
  # The session's token (32 bytes, unguessable): keep it to resume the session. Empty on
  # error.

  sessionCap @3 :WriteSession;
  # The session, outside the union so that every Cap'n Proto implementation can pipeline
  # on it: `kv.session(ctx).result.sessionCap.put(...)`. On error, a stand-in whose every
  # call answers with `error` (see the pipelining note at the top).
}

interface WriteSession {
  # The per-session write capability. Holding it is the permission to write.

  # Idempotency: every write may carry an `idempotencyKey` (1 to 64 bytes; empty = none),
  # scoped to this session. The server records the write's outcome with the write itself
  # (same atomic batch) for `idempotency.ttl_s` (default 24 h): a replay with the same key
  # and the same parameters returns that outcome and writes nothing; with other parameters
  # it gets `idempotencyKeyReused`. A write with a key may therefore be retried safely,
  # even when its first attempt's outcome is unknown.

  put @0 (ctx :RequestContext, key :Data, value :Data, condition :Condition,
          idempotencyKey :Data, lease :UInt64, ttlMs :UInt64)
      -> (result :PutResult);
  # Stores `value` under `key` if `condition` holds. With `lease` (non-zero) the key lives
  # by that lease: it is deleted when the lease expires or is revoked. With `ttlMs` (non-zero)
  # it gets a lease of its own with that TTL, granted by the same write (Redis's `SET ... PX`;
  # the result names the lease). Without either, a key attached to a lease is detached (as
  # etcd's put). Not both.

  delete @1 (ctx :RequestContext, key :Data, condition :Condition, idempotencyKey :Data)
      -> (result :DeleteResult);
  # Removes `key` if `condition` holds. Deleting a missing key is not an error:
  # `existed` says whether anything was removed.

  putMany @2 (ctx :RequestContext, items :List(PutItem), idempotencyKey :Data)
      -> (result :PutManyResult);
  # Several puts applied atomically, as one write with one new revision: all of them or
  # none. If any item's condition fails, nothing is written and the error
  # (`conditionFailed`) names the first failing item's index. Keys must be distinct;
  # 1 to `limits.max_batch_items` items; the whole request must fit the server's message
  # limit (`requestTooLarge` otherwise).

  increment @3 (ctx :RequestContext, key :Data, delta :Int64, idempotencyKey :Data)
      -> (result :IncrementResult);
  # (An increment leaves the key's lease as it is, as Redis's INCR keeps a TTL.)

  grantLease @4 (ctx :RequestContext, ttlMs :UInt64, idempotencyKey :Data)
      -> (result :LeaseResult);
  # A lease of `ttlMs` (1 to 2592000000, 30 days): keys put with it are deleted, at one
  # revision, when it expires (not kept alive for its TTL) or is revoked. Leases survive a
  # server restart with their full TTL again (as etcd's). Pipeline on `result.leaseCap`.

  lease @5 (ctx :RequestContext, id :UInt64) -> (result :LeaseResult);
  # The capability of lease `id` (from a `grantLease` on any connection), to keep it alive,
  # read its time to live or revoke it; `leaseNotFound` when it does not exist.
  # Adds `delta` to the key's value read as a decimal 64-bit integer (absent = 0) and
  # stores the result as decimal text, like Redis INCRBY. A value that is not such an
  # integer, or an overflow, gets `notAnInteger`.
}

struct IncrementResult {
  union {
    ok :group {
      value @0 :Int64;
      # The value after the increment.
      version @1 :UInt64;
      revision @2 :UInt64;
    }
    error @3 :Error;
  }
}

struct PutItem {
  # One write of a `putMany`.

  key @0 :Data;
  value @1 :Data;
  condition @2 :Condition;
  # Checked against the state before the batch.
}

struct PutManyResult {
  # Result of `WriteSession.putMany`.
  union {
    ok :group {
      versions @0 :List(UInt64);
      # Each key's new version, in request order.

      revision @1 :UInt64;
      # The store revision of the batch (shared by all its items).
    }
    error @2 :Error;
    # Why the call failed (see ErrorCode for the codes it may carry).
  }
}

struct PutResult {
  # Result of `WriteSession.put`.
  union {
    ok :group {
      version @0 :UInt64;
      # The key's new version.
      revision @1 :UInt64;
      # The store revision of this write.
      lease @3 :UInt64;
      # The lease the key lives by now (0: none); with `ttlMs`, the lease granted for it.
    }
    error @2 :Error;
    # Why the call failed (see ErrorCode for the codes it may carry).
  }
}

struct DeleteResult {
  # Result of `WriteSession.delete`.
  union {
    ok :group {
      existed @0 :Bool;
      # Whether the key existed (and so was removed).
      revision @1 :UInt64;
      # The store revision after the call.
    }
    error @2 :Error;
    # Why the call failed (see ErrorCode for the codes it may carry).
  }
}

interface Lease {
  # One lease: keys attached to it live while it is kept alive.

  keepAlive @0 (ctx :RequestContext) -> (result :LeaseInfoResult);
  # Renews the lease to its full TTL. Call it well within the TTL (a third of it is usual).

  timeToLive @1 (ctx :RequestContext) -> (result :LeaseInfoResult);
  # The lease as it is now, without renewing it.

  revoke @2 (ctx :RequestContext, idempotencyKey :Data) -> (result :RevokeResult);
  # Ends the lease now: its keys are deleted at one new revision.
}

struct LeaseResult {
  # Result of `WriteSession.grantLease` and `WriteSession.lease`.
  union {
    lease @0 :Lease;
    # The lease (also in `leaseCap`).

    error @1 :Error;
    # `leaseNotFound`, `invalidArgument` (a TTL out of range), or a chain rejection.
  }

  leaseCap @2 :Lease;
  # The lease, outside the union so that every Cap'n Proto implementation can pipeline on
  # it. On error, a stand-in whose every call answers with `error`.

  id @3 :UInt64;
  # The lease's id (non-zero), what a put's `lease` names.

  ttlMs @4 :UInt64;
  # Its TTL.
}

struct LeaseInfoResult {
  # Result of `Lease.keepAlive` and `Lease.timeToLive`.
  union {
    ok :group {
      id @0 :UInt64;
      ttlMs @1 :UInt64;
      remainingMs @2 :UInt64;
      # Until it expires unless kept alive.
      keys @3 :UInt64;
      # Keys attached to it.
    }
    error @4 :Error;
    # `leaseNotFound` (expired or revoked), or a chain rejection.
  }
}

struct RevokeResult {
  # Result of `Lease.revoke`.
  union {
    ok :group {
      deleted @0 :UInt64;
      # Keys deleted with the lease.
      revision @1 :UInt64;
      # The store revision after it (the deletes' revision when there were any).
    }
    error @2 :Error;
  }
}
