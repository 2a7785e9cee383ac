"""capkv called from pycapnp (the C++ Cap'n Proto library), with nothing but schema/kv.capnp.

Run by server/tests/pycapnp.rs against a real kv-server, directly and through a proxy that
delays each direction by half a round trip:

    python pipelining.py SCHEMA DIRECT_ADDR PROXY_ADDR RTT_MS TOKEN ADMIN_TOKEN

Every capability a call returns is reached through the generated Pipeline API (the `...Cap`
fields outside the result unions), so each chain below must cost one round trip through
the proxy; awaiting `open` before `get` costs two, which shows the count is real. Exits 1
with a message on the first check that fails (an exception from pycapnp counts as one).
"""

import asyncio
import sys
import time

import capnp

SCHEMA, DIRECT, PROXY, RTT_MS, TOKEN, ADMIN_TOKEN = sys.argv[1:7]
RTT_S = int(RTT_MS) / 1000.0
kv = capnp.load(SCHEMA)


def ctx():
    return {"deadline": {"budgetMs": 10000}}


def check(cond, what):
    if not cond:
        raise AssertionError(what)
    print("ok:", what)


class Conn:
    """One connection and its Gateway (the TwoPartyClient must outlive the calls)."""

    async def open(self, addr):
        host, port = addr.rsplit(":", 1)
        stream = await capnp.AsyncIoStream.create_connection(host=host, port=int(port))
        self.client = capnp.TwoPartyClient(stream)
        self.gateway = self.client.bootstrap().cast_as(kv.Gateway)
        return self


async def round_trips(chain):
    """Runs `chain(gateway)` on a fresh connection through the proxy (the bootstrap is
    pipelined too); returns its result and how many whole round trips it took."""
    conn = await Conn().open(PROXY)
    started = time.monotonic()
    result = await chain(conn.gateway)
    trips = int((time.monotonic() - started) // RTT_S)
    return result, trips


def code(result):
    return str(result.error.code) if result.which() == "error" else "ok"


async def main():
    # Seed and read back through the direct connection.
    direct = await Conn().open(DIRECT)
    version = await direct.gateway.version(ctx=ctx())
    check(version.result.ok.apiVersion >= 3, "version reports API v3 or later")

    # 1. open -> session -> put, with an idempotency key: one round trip.
    async def open_session_put(gw):
        store = gw.open(ctx=ctx(), token=TOKEN).result.kvCap
        session_call = store.session(ctx=ctx())
        put = session_call.result.sessionCap.put(
            ctx=ctx(), key=b"py-key", value=b"py-value", idempotencyKey=b"idem-1"
        )
        put, session = await asyncio.gather(put, session_call)
        return put.result, bytes(session.result.token)

    (put, token), trips = await round_trips(open_session_put)
    check(code(put) == "ok", "pipelined open -> session -> put succeeds")
    check(trips == 1, f"open -> session -> put is one round trip (took {trips})")
    check(len(token) == 32, "the session result carries its 32-byte token")
    first_version, first_revision = put.ok.version, put.ok.revision

    # 2. open -> get: one round trip.
    async def open_get(gw):
        store = gw.open(ctx=ctx(), token=TOKEN).result.kvCap
        return (await store.get(ctx=ctx(), key=b"py-key")).result

    got, trips = await round_trips(open_get)
    check(code(got) == "ok" and got.ok.value == b"py-value", "pipelined open -> get reads it")
    check(trips == 1, f"open -> get is one round trip (took {trips})")

    # The count is real: awaiting open before get is two.
    async def open_then_get(gw):
        opened = await gw.open(ctx=ctx(), token=TOKEN)
        return (await opened.result.kvCap.get(ctx=ctx(), key=b"py-key")).result

    got, trips = await round_trips(open_then_get)
    check(code(got) == "ok", "open, then get on the returned capability")
    check(trips == 2, f"awaiting open first is two round trips (took {trips})")

    # 3. resumeSession -> put replay on a new connection: the first outcome, no new write.
    async def resume_put(gw):
        store = gw.open(ctx=ctx(), token=TOKEN).result.kvCap
        session = store.resumeSession(ctx=ctx(), token=token).result.sessionCap
        put = session.put(ctx=ctx(), key=b"py-key", value=b"py-value", idempotencyKey=b"idem-1")
        return (await put).result

    replay, trips = await round_trips(resume_put)
    check(code(replay) == "ok", "pipelined open -> resumeSession -> put (replay) succeeds")
    check(
        (replay.ok.version, replay.ok.revision) == (first_version, first_revision),
        "the replay returns the first write's outcome",
    )
    check(trips == 1, f"open -> resumeSession -> put is one round trip (took {trips})")
    store = direct.gateway.open(ctx=ctx(), token=TOKEN).result.kvCap
    now = (await store.get(ctx=ctx(), key=b"py-key")).result
    check(now.ok.version == first_version, "the replay wrote nothing")

    # 4. admin -> showFaults with the operator token: one round trip.
    async def admin_show(gw):
        admin = gw.admin(ctx=ctx(), adminToken=ADMIN_TOKEN).result.adminCap
        return (await admin.showFaults(ctx=ctx())).result

    shown, trips = await round_trips(admin_show)
    check(code(shown) == "ok" and shown.ok.rules == 0, "pipelined admin -> showFaults")
    check(trips == 1, f"admin -> showFaults is one round trip (took {trips})")

    # 5. open -> watch -> next from revision 1: one round trip, and it returns the write
    # made above (a put event with its entry).
    async def open_watch_next(gw):
        store = gw.open(ctx=ctx(), token=TOKEN).result.kvCap
        watcher = store.watch(ctx=ctx(), range={"prefix": b"py-"}, startRevision=1)
        return (await watcher.result.watcherCap.next(ctx=ctx(), maxEvents=10, waitMs=0)).result

    page, trips = await round_trips(open_watch_next)
    check(code(page) == "ok", "pipelined open -> watch -> next succeeds")
    check(
        [(str(e.kind), e.entry.key, e.entry.value) for e in page.ok.events]
        == [("put", b"py-key", b"py-value")],
        "the watch replays the put from revision 1",
    )
    check(trips == 1, f"open -> watch -> next is one round trip (took {trips})")

    # 6. open -> session -> grantLease -> timeToLive: one round trip; a put with the lease.
    async def open_grant_ttl(gw):
        session_call = gw.open(ctx=ctx(), token=TOKEN).result.kvCap.session(ctx=ctx())
        session = session_call.result.sessionCap
        grant = session.grantLease(ctx=ctx(), ttlMs=60000)
        ttl = grant.result.leaseCap.timeToLive(ctx=ctx())
        granted, ttl = await asyncio.gather(grant, ttl)
        put = await session.put(ctx=ctx(), key=b"py-leased", value=b"v", lease=granted.result.id)
        return granted.result, ttl.result, put.result

    (granted, ttl, put), trips = await round_trips(open_grant_ttl)
    check(code(granted) == "ok" or granted.which() == "lease", "grantLease succeeds")
    check(ttl.which() == "ok" and ttl.ok.ttlMs == 60000, "timeToLive pipelined on leaseCap")
    check(trips <= 2, f"grant -> timeToLive, then a put: two round trips (took {trips})")
    check(code(put) == "ok" and put.ok.lease == granted.id, "a put attaches its key to the lease")

    # 7. Wrong tokens: the pipelined calls fail with the refusal's code; so does open.
    gw = direct.gateway
    bad_open = gw.open(ctx=ctx(), token="wrong-token")
    bad_get = bad_open.result.kvCap.get(ctx=ctx(), key=b"py-key")
    bad_put = (
        bad_open.result.kvCap.session(ctx=ctx())
        .result.sessionCap.put(ctx=ctx(), key=b"py-key", value=b"x")
    )
    opened, got, put = await asyncio.gather(bad_open, bad_get, bad_put)
    check(code(opened.result) == "unauthenticated", "open with a wrong token: unauthenticated")
    check(len(opened.result.error.message) > 0, "open's error has a message")
    check(code(got.result) == "unauthenticated", "get pipelined on it: unauthenticated")
    check(code(put.result) == "unauthenticated", "session -> put pipelined on it: unauthenticated")
    bad_admin = gw.admin(ctx=ctx(), adminToken="wrong-admin-token")
    shown = await bad_admin.result.adminCap.showFaults(ctx=ctx())
    check(code(shown.result) == "unauthenticated", "showFaults on a refused admin: unauthenticated")

    # The connection is still fine.
    got = (await store.get(ctx=ctx(), key=b"py-key")).result
    check(code(got) == "ok", "the connection still serves after the refusals")


if __name__ == "__main__":
    try:
        asyncio.run(capnp.run(main()))
    except Exception as e:  # noqa: BLE001 - any failure is the test's failure
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
