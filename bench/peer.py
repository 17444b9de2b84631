"""The relational peer: the same purchase in PostgreSQL, behind the same gRPC contract, measured beside cardcore.

    .venv/bin/python bench/peer.py [--rounds 3] [--seconds 5] [--cards 100000] [--only unary|stream|batch ...]
                                   [--quick]                  (or: make bench-peer [ARGS=--quick])

Starts a throwaway PostgreSQL cluster on loopback (installing Debian's
postgresql if it is missing), with the durability cardcore has
(synchronous_commit = on, fsync = on). Its PL/pgSQL purchase() does what a
cardcore purchase does: keyed hash of the card number (pgcrypto HMAC-SHA256),
idempotency by request id (same id + same payload -> the original answer;
other payload -> refused), tier discount rounded half-up, balance check,
points, a journal row, all in one transaction; purchase_batch() does it for
an array of purchases in ONE transaction (cards locked in key order first, so
concurrent batches queue instead of deadlocking). Both return what a reply
shows (balances after, discount, points, the reason of a decline).

Three systems per row, in the same run, over the same 100,000 cards,
alternating (the order rotates each round, so each goes first once in three),
--rounds rounds (3):

cardcore  `cardcore serve` (its gRPC process and its writer process), driven
          by bench/e2e.py's client harness.
peer      bench/peer_grpc.py: a thin grpc.aio servicer of the same
          cardcore.v1 CardService (Purchase, SwipeStream, SubmitBatch) in its
          own process, over an asyncpg pool, one purchase() call per purchase
          and one purchase_batch() call per SubmitBatch. Driven by the very
          same harness with the very same request bytes as cardcore (each
          ledger has its own copy of the cards, so the same request ids are
          fresh on both). Before measuring, the same unary, batch and stream
          calls go to both (a discounted purchase, its replay, a reused id,
          insufficient funds, bad input): the answers must be equal but for
          seq, applied_at_us and program_version, or nothing is measured.
direct    a reference, not a peer: PostgreSQL driven on its own wire protocol
          from this process (asyncpg; streams in libpq pipeline mode through
          psycopg 3, one Sync and so one commit per purchase, or sequential
          calls without psycopg), as no till is.

Rows: Purchase unary at 1, 16 and 64 in flight; SwipeStream, 16 and 64
streams each with up to 8 purchases pipelined (direct: as many connections);
SubmitBatch of 1,000 purchases, 4 callers (p50/p99 per call of 1,000).

Server CPU per purchase from /proc utime+stime, read before and after each
row (from the client's first call to its last answer): cardcore's two
processes; the peer's servicer plus the PostgreSQL processes (postmaster,
backends, helpers); direct: the PostgreSQL processes. The services' start-up
(cardcore's, the peer's pool connecting and preparing) is not counted.

Prints two markdown tables: cardcore against the peer (each system's median
over the rounds, and each ratio cardcore / peer as median [min-max] of the
rounds' ratios: tx/s, p50, p99, CPU per purchase), and the direct reference;
writes every round and the summaries to --out, with the load average before
and after. --quick is a smoke run (5,000 cards, 1 s, 1 round).
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e  # noqa: E402  (the cardcore side of the same measurements)
from cardcore.cards import random_number  # noqa: E402
from cardcore.terminal import now_us  # noqa: E402
from cardcore.v1 import card_service_pb2 as pb  # noqa: E402
from cardcore.v1 import common_pb2 as cpb  # noqa: E402

PG_BIN = "/usr/lib/postgresql/15/bin"
INDEX_KEY = bytes(range(32))
SCHEMA = """
CREATE EXTENSION IF NOT EXISTS pgcrypto;
CREATE TABLE tiers (tier smallint PRIMARY KEY, rate_bp int NOT NULL);
INSERT INTO tiers VALUES (0, 10000), (1, 9500), (2, 9000);
CREATE TABLE cards (
    card_id bytea PRIMARY KEY, tier smallint NOT NULL, status smallint NOT NULL DEFAULT 1,
    principal_minor bigint NOT NULL DEFAULT 0 CHECK (principal_minor >= 0),
    bonus_minor bigint NOT NULL DEFAULT 0 CHECK (bonus_minor >= 0),
    points bigint NOT NULL DEFAULT 0, lifetime_paid_minor bigint NOT NULL DEFAULT 0,
    last_seq bigint NOT NULL DEFAULT 0);
CREATE TABLE journal (
    seq bigserial PRIMARY KEY, card_id bytea NOT NULL, op smallint NOT NULL,
    amount_minor bigint NOT NULL, discount_minor bigint NOT NULL,
    principal_delta_minor bigint NOT NULL, bonus_delta_minor bigint NOT NULL, points_delta bigint NOT NULL,
    principal_after_minor bigint NOT NULL, bonus_after_minor bigint NOT NULL, points_after bigint NOT NULL,
    ts timestamptz NOT NULL DEFAULT now(), store_id int NOT NULL, terminal_id int NOT NULL,
    staff_id int NOT NULL, request_id text NOT NULL);
CREATE TABLE requests (request_id text PRIMARY KEY, digest bytea NOT NULL, reason smallint NOT NULL,
                       seq bigint NOT NULL);
CREATE TABLE keys (name text PRIMARY KEY, key bytea NOT NULL);

-- One purchase, in its own transaction. The result columns are what a reply of cardcore's
-- OperationResult shows (bench/peer_grpc.py builds it from them): on a decline, reason and the
-- card's balances (insufficient funds says what is available); on a replay, the original answer.
CREATE FUNCTION purchase(p_request_id text, p_card_number text, p_gross bigint, p_store int,
                         p_terminal int, p_staff int)
RETURNS TABLE (reason int, replayed boolean, seq bigint, tier int, amount_minor bigint,
               discount_minor bigint, principal_delta_minor bigint, bonus_delta_minor bigint,
               points_earned bigint, principal_after bigint, bonus_after bigint, points_after bigint,
               applied_at_us bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_card_id bytea := substring(hmac(convert_to(p_card_number, 'UTF8'),
                                      (SELECT key FROM keys WHERE name = 'index'), 'sha256') FROM 1 FOR 16);
    v_digest bytea := digest(concat_ws('|', p_card_number, p_gross, p_store, p_terminal, p_staff), 'sha256');
    v_req requests%ROWTYPE;
    v_card cards%ROWTYPE;
    v_paid bigint; v_points bigint; v_from_principal bigint; v_seq bigint;
BEGIN
    reason := 0; replayed := false; seq := 0; tier := 0; amount_minor := p_gross; discount_minor := 0;
    principal_delta_minor := 0; bonus_delta_minor := 0; points_earned := 0; principal_after := 0;
    bonus_after := 0; points_after := 0; applied_at_us := 0;
    IF p_gross <= 0 THEN reason := 2; RETURN NEXT; RETURN; END IF;
    SELECT * INTO v_req FROM requests r WHERE r.request_id = p_request_id;
    IF FOUND THEN
        IF v_req.digest <> v_digest THEN reason := 13; RETURN NEXT; RETURN; END IF;
        reason := v_req.reason; replayed := true;
        IF v_req.seq <> 0 THEN
            SELECT j.seq, c.tier, j.discount_minor, j.principal_delta_minor, j.bonus_delta_minor,
                   j.points_delta, j.principal_after_minor, j.bonus_after_minor, j.points_after,
                   floor(extract(epoch FROM j.ts) * 1000000)::bigint
                INTO seq, tier, discount_minor, principal_delta_minor, bonus_delta_minor, points_earned,
                     principal_after, bonus_after, points_after, applied_at_us
                FROM journal j JOIN cards c ON c.card_id = j.card_id WHERE j.seq = v_req.seq;
        END IF;
        RETURN NEXT; RETURN;
    END IF;
    SELECT * INTO v_card FROM cards c WHERE c.card_id = v_card_id FOR UPDATE;
    IF NOT FOUND THEN reason := 8; RETURN NEXT; RETURN; END IF;
    tier := v_card.tier;
    v_paid := floor((p_gross::numeric * (SELECT t.rate_bp FROM tiers t WHERE t.tier = v_card.tier) + 5000) / 10000);
    IF v_paid > v_card.principal_minor + v_card.bonus_minor THEN
        INSERT INTO requests VALUES (p_request_id, v_digest, 11, 0);
        reason := 11; principal_after := v_card.principal_minor; bonus_after := v_card.bonus_minor;
        points_after := v_card.points;
        RETURN NEXT; RETURN;
    END IF;
    v_points := (v_paid / 100) * 1;
    v_from_principal := least(v_paid, v_card.principal_minor);
    UPDATE cards c SET principal_minor = c.principal_minor - v_from_principal,
                       bonus_minor = c.bonus_minor - (v_paid - v_from_principal),
                       points = c.points + v_points, lifetime_paid_minor = c.lifetime_paid_minor + v_paid
        WHERE c.card_id = v_card_id RETURNING * INTO v_card;
    INSERT INTO journal (card_id, op, amount_minor, discount_minor, principal_delta_minor, bonus_delta_minor,
                         points_delta, principal_after_minor, bonus_after_minor, points_after, store_id,
                         terminal_id, staff_id, request_id)
        VALUES (v_card_id, 3, p_gross, p_gross - v_paid, -v_from_principal, -(v_paid - v_from_principal),
                v_points, v_card.principal_minor, v_card.bonus_minor, v_card.points, p_store, p_terminal,
                p_staff, p_request_id)
        RETURNING journal.seq INTO v_seq;
    UPDATE cards c SET last_seq = v_seq WHERE c.card_id = v_card_id;
    INSERT INTO requests VALUES (p_request_id, v_digest, 0, v_seq);
    seq := v_seq; discount_minor := p_gross - v_paid; principal_delta_minor := -v_from_principal;
    bonus_delta_minor := -(v_paid - v_from_principal); points_earned := v_points;
    principal_after := v_card.principal_minor; bonus_after := v_card.bonus_minor; points_after := v_card.points;
    applied_at_us := floor(extract(epoch FROM now()) * 1000000)::bigint;  -- the journal row's ts
    RETURN NEXT;
END $$;

-- The batch: purchase() for each element, in order, in ONE transaction (one commit, one WAL flush),
-- with purchase()'s result columns and `ord`, the element's place (1-based).
-- The cards are locked in key order first, so that concurrent batches queue on the cards they share
-- instead of deadlocking; the key is read once per batch.
CREATE FUNCTION purchase_batch(p_request_ids text[], p_card_numbers text[], p_gross bigint[],
                               p_stores int[], p_terminals int[], p_staff int[])
RETURNS TABLE (ord int, reason int, replayed boolean, seq bigint, tier int, amount_minor bigint,
               discount_minor bigint, principal_delta_minor bigint, bonus_delta_minor bigint,
               points_earned bigint, principal_after bigint, bonus_after bigint, points_after bigint,
               applied_at_us bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_key bytea := (SELECT k.key FROM keys k WHERE k.name = 'index');
    v_now_us bigint := floor(extract(epoch FROM now()) * 1000000)::bigint;  -- every journal row's ts
    v_ids bytea[];
    v_card_id bytea; v_digest bytea;
    v_req requests%ROWTYPE;
    v_card cards%ROWTYPE;
    v_paid bigint; v_points bigint; v_from_principal bigint; v_seq bigint;
BEGIN
    SELECT array_agg(substring(hmac(convert_to(u.n, 'UTF8'), v_key, 'sha256') FROM 1 FOR 16) ORDER BY u.o)
        INTO v_ids FROM unnest(p_card_numbers) WITH ORDINALITY AS u(n, o);
    PERFORM 1 FROM cards c WHERE c.card_id = ANY (v_ids) ORDER BY c.card_id FOR UPDATE;
    FOR i IN 1 .. coalesce(array_length(p_request_ids, 1), 0) LOOP
        ord := i; reason := 0; replayed := false; seq := 0; tier := 0; amount_minor := p_gross[i];
        discount_minor := 0; principal_delta_minor := 0; bonus_delta_minor := 0; points_earned := 0;
        principal_after := 0; bonus_after := 0; points_after := 0; applied_at_us := 0;
        v_card_id := v_ids[i];
        v_digest := digest(concat_ws('|', p_card_numbers[i], p_gross[i], p_stores[i], p_terminals[i],
                                     p_staff[i]), 'sha256');
        IF p_gross[i] <= 0 THEN reason := 2; RETURN NEXT; CONTINUE; END IF;
        SELECT * INTO v_req FROM requests r WHERE r.request_id = p_request_ids[i];
        IF FOUND THEN
            IF v_req.digest <> v_digest THEN reason := 13; RETURN NEXT; CONTINUE; END IF;
            reason := v_req.reason; replayed := true;
            IF v_req.seq <> 0 THEN
                SELECT j.seq, c.tier, j.discount_minor, j.principal_delta_minor, j.bonus_delta_minor,
                       j.points_delta, j.principal_after_minor, j.bonus_after_minor, j.points_after,
                       floor(extract(epoch FROM j.ts) * 1000000)::bigint
                    INTO seq, tier, discount_minor, principal_delta_minor, bonus_delta_minor, points_earned,
                         principal_after, bonus_after, points_after, applied_at_us
                    FROM journal j JOIN cards c ON c.card_id = j.card_id WHERE j.seq = v_req.seq;
            END IF;
            RETURN NEXT; CONTINUE;
        END IF;
        SELECT * INTO v_card FROM cards c WHERE c.card_id = v_card_id;  -- locked above
        IF NOT FOUND THEN reason := 8; RETURN NEXT; CONTINUE; END IF;
        tier := v_card.tier;
        v_paid := floor((p_gross[i]::numeric * (SELECT t.rate_bp FROM tiers t WHERE t.tier = v_card.tier)
                         + 5000) / 10000);
        IF v_paid > v_card.principal_minor + v_card.bonus_minor THEN
            INSERT INTO requests VALUES (p_request_ids[i], v_digest, 11, 0);
            reason := 11; principal_after := v_card.principal_minor; bonus_after := v_card.bonus_minor;
            points_after := v_card.points;
            RETURN NEXT; CONTINUE;
        END IF;
        v_points := (v_paid / 100) * 1;
        v_from_principal := least(v_paid, v_card.principal_minor);
        UPDATE cards c SET principal_minor = c.principal_minor - v_from_principal,
                           bonus_minor = c.bonus_minor - (v_paid - v_from_principal),
                           points = c.points + v_points, lifetime_paid_minor = c.lifetime_paid_minor + v_paid
            WHERE c.card_id = v_card_id RETURNING * INTO v_card;
        INSERT INTO journal (card_id, op, amount_minor, discount_minor, principal_delta_minor,
                             bonus_delta_minor, points_delta, principal_after_minor, bonus_after_minor,
                             points_after, store_id, terminal_id, staff_id, request_id)
            VALUES (v_card_id, 3, p_gross[i], p_gross[i] - v_paid, -v_from_principal,
                    -(v_paid - v_from_principal), v_points, v_card.principal_minor, v_card.bonus_minor,
                    v_card.points, p_stores[i], p_terminals[i], p_staff[i], p_request_ids[i])
            RETURNING journal.seq INTO v_seq;
        UPDATE cards c SET last_seq = v_seq WHERE c.card_id = v_card_id;
        INSERT INTO requests VALUES (p_request_ids[i], v_digest, 0, v_seq);
        seq := v_seq; discount_minor := p_gross[i] - v_paid; principal_delta_minor := -v_from_principal;
        bonus_delta_minor := -(v_paid - v_from_principal); points_earned := v_points;
        principal_after := v_card.principal_minor; bonus_after := v_card.bonus_minor;
        points_after := v_card.points; applied_at_us := v_now_us;
        RETURN NEXT;
    END LOOP;
END $$;
"""


def ensure_postgres() -> None:
    if os.path.exists(os.path.join(PG_BIN, "postgres")):
        return
    print("installing Debian's postgresql (loopback only, removed cluster at the end) ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-q", "postgresql", "postgresql-contrib"], check=True, env=env)


class Cluster:
    """A throwaway cluster in a temp folder, run as the postgres user, on 127.0.0.1 only."""

    def __init__(self, port: int):
        self.dir = tempfile.mkdtemp(prefix="cardcore-peer-")
        os.chmod(self.dir, 0o755)
        self.data = os.path.join(self.dir, "data")
        self.port = port
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_pg([f"{PG_BIN}/initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync"])
        opts = (f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={self.dir} "
                "-c synchronous_commit=on -c fsync=on -c full_page_writes=on -c max_connections=200 "
                "-c shared_buffers=256MB")
        self._as_pg([f"{PG_BIN}/pg_ctl", "-D", self.data, "-o", opts, "-w", "-l",
                     os.path.join(self.dir, "log"), "start"])
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())

    @staticmethod
    def _as_pg(argv: list[str]) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *argv], check=True, stdout=subprocess.DEVNULL)

    def cpu_s(self) -> float:
        total = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(entry) == self.pid:  # with its reaped children: backends of closed connections
                total += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
            elif int(fields[1]) == self.pid:
                total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self._as_pg([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


async def seed_pg(dsn: str, numbers: list[str]) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    await conn.execute(SCHEMA)
    await conn.execute("INSERT INTO keys VALUES ('index', $1)", INDEX_KEY)
    rows = [(n, i % 3) for i, n in enumerate(numbers)]
    await conn.executemany(
        "INSERT INTO cards (card_id, tier, principal_minor) VALUES "
        "(substring(hmac(convert_to($1::text, 'UTF8'), (SELECT key FROM keys WHERE name = 'index'), "
        "'sha256') FROM 1 FOR 16), $2, 1000000000000)",
        rows)
    await conn.execute("VACUUM ANALYZE")
    await conn.close()


def pg_requests(numbers: list[str], n: int, tag: str) -> list[tuple]:
    rng = random.Random(hash(tag) & 0xFFFF)
    return [(f"{tag}-{i}", rng.choice(numbers), rng.randrange(100, 10_000), rng.randrange(1, 200),
             rng.randrange(1, 5000), 0) for i in range(n)]


async def run_pg(dsn: str, numbers: list[str], in_flight: int, seconds: float, tag: str, cpu):
    """`in_flight` connections, each calling purchase() and waiting for its answer."""
    import asyncpg

    conns = await asyncio.gather(*(asyncpg.connect(dsn) for _ in range(in_flight)))
    stmts = [await c.prepare("SELECT * FROM purchase($1, $2, $3, $4, $5, $6)") for c in conns]
    it = iter(pg_requests(numbers, int(12_000 * seconds), tag))
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(stmt):
        for args in it:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            row = await stmt.fetchrow(*args)
            assert row["reason"] == 0, row
            latencies.append(time.perf_counter() - t0)

    cpu0, t0 = cpu(), time.perf_counter()
    await asyncio.gather(*(worker(s) for s in stmts))
    elapsed, cpu_s = time.perf_counter() - t0, cpu() - cpu0
    for c in conns:
        await c.close()
    return len(latencies), elapsed, latencies, 0, cpu_s  # a decline fails the assertion above


async def run_pg_pipelined(dsn: str, numbers: list[str], conns: int, window: int, seconds: float, tag: str,
                           cpu):
    """`conns` connections in libpq pipeline mode, each with up to `window` purchases outstanding;
    a Sync after every purchase, so each is its own transaction, committed before the next starts."""
    from collections import deque

    from psycopg import pq

    ok, sync = pq.ExecStatus.TUPLES_OK, pq.ExecStatus.PIPELINE_SYNC
    pgconns = []
    for _ in range(conns):
        c = pq.PGconn.connect(dsn.encode())
        if c.status != pq.ConnStatus.OK:
            raise RuntimeError(c.get_error_message())
        res = c.prepare(b"purchase", b"SELECT reason FROM purchase($1, $2, $3, $4, $5, $6)",
                        [25, 25, 20, 23, 23, 23])  # text, text, int8, int4, int4, int4
        if res.status != pq.ExecStatus.COMMAND_OK:
            raise RuntimeError(res.get_error_message())
        c.enter_pipeline_mode()
        c.nonblocking = 1
        pgconns.append(c)
    it = iter([tuple(str(v).encode() for v in r)
               for r in pg_requests(numbers, int(30_000 * seconds), tag)])
    latencies: list[float] = []
    declines = 0
    loop = asyncio.get_running_loop()
    deadline = time.perf_counter() + seconds

    async def one(c):
        nonlocal declines
        readable = asyncio.Event()
        loop.add_reader(c.socket, readable.set)
        sent: deque[float] = deque()
        more = True
        try:
            while True:
                while more and len(sent) < window:
                    params = next(it, None) if time.perf_counter() <= deadline else None
                    if params is None:
                        more = False
                        break
                    c.send_query_prepared(b"purchase", params)
                    c.pipeline_sync()
                    sent.append(time.perf_counter())
                while c.flush():  # a few hundred bytes at most: the socket takes them at once
                    await asyncio.sleep(0)
                if not sent:
                    return
                c.consume_input()
                answered = False
                while sent and not c.is_busy():
                    res = c.get_result()
                    if res is None:  # the end of one statement's results
                        continue
                    if res.status == ok:
                        declines += res.get_value(0, 0) != b"0"
                    elif res.status == sync:  # committed
                        latencies.append(time.perf_counter() - sent.popleft())
                        answered = True
                    else:
                        raise RuntimeError(res.get_error_message())
                if not answered:
                    readable.clear()  # level-triggered: set again at once if bytes are still unread
                    await readable.wait()
        finally:
            loop.remove_reader(c.socket)

    cpu0, t0 = cpu(), time.perf_counter()
    await asyncio.gather(*(one(c) for c in pgconns))
    elapsed, cpu_s = time.perf_counter() - t0, cpu() - cpu0
    for c in pgconns:
        c.finish()
    return len(latencies), elapsed, latencies, declines, cpu_s


async def run_pg_batches(dsn: str, numbers: list[str], seconds: float, tag: str, cpu):
    """e2e.BATCH_CALLERS connections, each calling purchase_batch() with e2e.BATCH_OPS purchases."""
    import asyncpg

    reqs = pg_requests(numbers, int(60 * seconds) * e2e.BATCH_OPS, tag)
    it = iter([tuple(list(col) for col in zip(*reqs[k:k + e2e.BATCH_OPS]))
               for k in range(0, len(reqs), e2e.BATCH_OPS)])
    conns = [await asyncpg.connect(dsn) for _ in range(e2e.BATCH_CALLERS)]
    stmts = [await c.prepare("SELECT reason FROM purchase_batch($1, $2, $3, $4, $5, $6)") for c in conns]
    latencies: list[float] = []
    declines = 0
    deadline = time.perf_counter() + seconds

    async def worker(stmt):
        nonlocal declines
        for cols in it:
            if time.perf_counter() > deadline:
                return
            t0 = time.perf_counter()
            rows = await stmt.fetch(*cols)
            latencies.append(time.perf_counter() - t0)
            assert len(rows) == len(cols[0]), "one result per purchase"
            declines += sum(r["reason"] != 0 for r in rows)

    cpu0, t0 = cpu(), time.perf_counter()
    await asyncio.gather(*(worker(s) for s in stmts))
    elapsed, cpu_s = time.perf_counter() - t0, cpu() - cpu0
    for c in conns:
        await c.close()
    return len(latencies) * e2e.BATCH_OPS, elapsed, latencies, declines, cpu_s


def have_psycopg() -> bool:
    try:
        from psycopg import pq
    except ImportError:
        return False
    return pq.version() >= 140000  # pipeline mode needs libpq 14


@contextlib.contextmanager
def e2e_streams(n: int):
    """e2e.run_streams opens e2e.STREAMS streams: run it with another count (e2e.py left as it is)."""
    old, e2e.STREAMS = e2e.STREAMS, n
    try:
        yield
    finally:
        e2e.STREAMS = old


async def run_cc_streams(target: str, payloads: list[bytes], streams: int, seconds: float):
    with e2e_streams(streams):
        return await e2e.run_streams(target, payloads, seconds)


WINDOW = e2e.STREAM_WINDOW
SYSTEMS = ("cardcore", "peer", "direct")  # rotated each round, so each goes first once in three
SHAPE_IGNORED = ("seq", "applied_at_us", "program_version")  # each ledger's own numbering, clock, program


def label(name: str) -> str:
    kind, n = name.split("_")
    if kind == "unary":
        return f"Purchase, unary, {n} in flight"
    if kind == "stream":
        return f"SwipeStream, {n} streams x {WINDOW} pipelined"
    return f"SubmitBatch of {e2e.BATCH_OPS:,}, {e2e.BATCH_CALLERS} callers"


def direct_label(name: str, peer_stream: str) -> str:
    """What the direct-PostgreSQL reference does for a row: a client on PostgreSQL's own protocol."""
    kind, n = name.split("_")
    if kind == "unary":
        return f"{n} connections, purchase() each"
    if kind == "stream":
        return (f"{n} connections, libpq pipeline of {WINDOW}, a Sync (commit) each"
                if peer_stream == "pipeline" else f"{n} connections, purchase() back to back")
    return f"purchase_batch() of {e2e.BATCH_OPS:,}, {e2e.BATCH_CALLERS} connections"


def start_peer(dsn: str, log_path: str, pool_size: int) -> e2e.Proc:
    """bench/peer_grpc.py in its own process, its pool connected and warmed when this returns."""
    return e2e.Proc([sys.executable, os.path.join(HERE, "peer_grpc.py"), "--dsn", dsn,
                     "--listen", "127.0.0.1:0", "--pool-size", str(pool_size)], log_path)


# ---- the shape check: the same calls on both services, the same answers -------------------------

def shape_of(message) -> dict:
    """A message's set fields and values (nested messages too), but SHAPE_IGNORED."""
    out = {}
    for field, value in message.ListFields():
        if field.name in SHAPE_IGNORED:
            continue
        if field.type == field.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            value = dict(value)
        elif field.type == field.TYPE_MESSAGE and not field.is_repeated:
            value = shape_of(value)
        out[field.name] = value
    return out


def status_shape(exc: grpc.RpcError) -> dict:
    """A refusal as a client reads it: the code, the message and the machine-readable details."""
    from google.rpc import error_details_pb2, status_pb2

    out = {"code": exc.code().name, "details": exc.details()}
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin":
            for detail in status_pb2.Status.FromString(value).details:
                for cls in (error_details_pb2.ErrorInfo, cpb.Failure):
                    if detail.Is(cls.DESCRIPTOR):
                        msg = cls()
                        detail.Unpack(msg)
                        out[cls.DESCRIPTOR.name] = shape_of(msg)
    return out


def shape_check(target: str, numbers: list[str]) -> list:
    """Unary, batch and stream calls through the real stubs on a freshly seeded ledger (cards
    0-2 untouched): a purchase with a tier discount, its replay, its id with another amount,
    insufficient funds, a bad request id, a zero amount; a batch and a stream mixing a purchase,
    a decline and a replay. The answers' shapes, to compare between cardcore and the peer."""
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    t = now_us()
    short = 2 * 10**12  # more than a seeded card holds

    def purchase(request_id: str, k: int, gross: int) -> pb.PurchaseRequest:
        return pb.PurchaseRequest(request_id=request_id, card=cpb.CardRef(card_number=numbers[k]),
                                  gross_amount_minor=gross, client_time_us=t,
                                  till=cpb.Till(store_id=12, terminal_id=7, staff_id=3))

    answers: list = []
    with grpc.insecure_channel(target) as ch:
        stub = pb_grpc.CardServiceStub(ch)
        for req in (purchase("shape-1", 1, 12_345), purchase("shape-1", 1, 12_345),
                    purchase("shape-1", 1, 1), purchase("shape-2", 0, short),
                    purchase("shape 3", 2, 100), purchase("shape-4", 2, 0)):
            try:
                answers.append(shape_of(stub.Purchase(req, timeout=10)))
            except grpc.RpcError as exc:
                answers.append(status_shape(exc))
        ops = [pb.Operation(purchase=p) for p in (purchase("shape-b1", 2, 500),
                                                  purchase("shape-b2", 0, short),
                                                  purchase("shape-1", 1, 12_345))]
        answers.append([shape_of(r) for r in stub.SubmitBatch(
            pb.SubmitBatchRequest(operations=ops), timeout=10).results])
        ops = [pb.Operation(purchase=p) for p in (purchase("shape-s1", 2, 700),
                                                  purchase("shape-s2", 0, short))]
        answers.append([shape_of(r) for r in stub.SwipeStream(iter(ops), timeout=10)])
    return answers


# ---- measuring and reporting ---------------------------------------------------------------------

def measure(proc: e2e.Proc, cpu, run) -> dict:
    """One timed client run against a started service (``run(target)`` a coroutine), with the
    service's CPU (``cpu()``: seconds, every process of it) over it; declined or failed calls
    counted as errors."""
    cpu0 = cpu()
    n, elapsed, lat, errors = asyncio.run(run(proc.target))
    out = e2e.summary(n, elapsed, lat, cpu() - cpu0)
    out["errors"] = errors
    return out


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


METRICS = ("tx_per_s", "p50_ms", "p99_ms", "server_cpu_us_per_op")


def summarize(rounds: list[dict]) -> dict:
    """Medians over the rounds of each system's figures, and each ratio (cardcore over the peer,
    and over the direct reference) as median, min and max of the rounds' ratios."""
    out: dict = {system: {m: statistics.median(r[system][m] for r in rounds) for m in METRICS}
                 for system in SYSTEMS}
    for other in ("peer", "direct"):
        out[f"cardcore_over_{other}"] = {m: spread([r["cardcore"][m] / r[other][m] for r in rounds])
                                         for m in METRICS}
    out["peer_over_direct_tx"] = spread([r["peer"]["tx_per_s"] / r["direct"]["tx_per_s"] for r in rounds])
    return out


def ratio_text(s: dict) -> str:
    return f"{s['median']:.2f}x [{s['min']:.2f}-{s['max']:.2f}]"


def markdown_table(results: dict) -> str:
    """Two tables: cardcore against the gRPC peer, and the direct-PostgreSQL reference."""
    rows = ["| row | cardcore tx/s | peer tx/s | tx/s cardcore / peer | p50 ms cardcore, peer "
            "| p50 ratio | p99 ms cardcore, peer | p99 ratio | CPU µs/purchase cardcore, peer | CPU ratio |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["rows"].items():
        s = row["summary"]
        c, p, r = s["cardcore"], s["peer"], s["cardcore_over_peer"]
        rows.append(f"| {row['label']} | {c['tx_per_s']:,.0f} | {p['tx_per_s']:,.0f} | "
                    f"{ratio_text(r['tx_per_s'])} | {c['p50_ms']:.2f}, {p['p50_ms']:.2f} | "
                    f"{ratio_text(r['p50_ms'])} | {c['p99_ms']:.2f}, {p['p99_ms']:.2f} | "
                    f"{ratio_text(r['p99_ms'])} | {c['server_cpu_us_per_op']:.1f}, "
                    f"{p['server_cpu_us_per_op']:.1f} | {ratio_text(r['server_cpu_us_per_op'])} |")
    rows += ["", "Reference, not a peer: PostgreSQL driven directly on its own wire protocol (no gRPC, "
             "no servicer)", "",
             "| row | direct client | tx/s | p50 ms | p99 ms | CPU µs/purchase | cardcore / direct tx/s "
             "| peer / direct tx/s |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["rows"].items():
        s = row["summary"]
        d = s["direct"]
        rows.append(f"| {row['label']} | {row['direct_label']} | {d['tx_per_s']:,.0f} | {d['p50_ms']:.2f} | "
                    f"{d['p99_ms']:.2f} | {d['server_cpu_us_per_op']:.1f} | "
                    f"{ratio_text(s['cardcore_over_direct']['tx_per_s'])} | "
                    f"{ratio_text(s['peer_over_direct_tx'])} |")
    return "\n".join(rows)


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0, help="per row, system and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 5,000 cards, 1 s per row, 1 round (figures mean nothing)")
    parser.add_argument("--port", type=int, default=55432)
    parser.add_argument("--pool-size", type=int, default=64, help="the gRPC peer's PostgreSQL connections")
    parser.add_argument("--out", default=os.path.join(HERE, "peer_results.json"))
    parser.add_argument("--only", action="append", default=[], choices=["unary", "stream", "batch"],
                        help="run only these kinds of rows (repeat for more)")
    parser.add_argument("--peer-stream", choices=["pipeline", "sequential"], default=None,
                        help="the direct reference's stream rows (default: pipeline if psycopg 3 is installed)")
    args = parser.parse_args()
    if args.quick:
        args.cards, args.seconds, args.rounds = 5_000, 1.0, 1
    if not 1 <= args.rounds <= 20 or not 0 < args.seconds <= 600 or not 10 <= args.cards <= 1_000_000:
        parser.error("--rounds 1..20, --seconds up to 600, --cards 10..1,000,000")
    kinds = args.only or ["unary", "stream", "batch"]
    secs = args.seconds
    ensure_postgres()
    peer_stream = args.peer_stream or ("pipeline" if have_psycopg() else "sequential")
    if peer_stream == "pipeline" and not have_psycopg():
        parser.error("--peer-stream pipeline needs psycopg 3 (pip install 'psycopg[binary]')")
    rng = random.Random(1)
    numbers = list({random_number(rng): None for _ in range(args.cards)})  # in drawing order
    results: dict = {"cards": len(numbers), "seconds": secs, "rounds": args.rounds,
                     "stream_window": WINDOW, "batch_ops": e2e.BATCH_OPS, "batch_callers": e2e.BATCH_CALLERS,
                     "peer_pool_size": args.pool_size, "direct_stream": peer_stream,
                     "machine": {"cpus": os.cpu_count(), "load_average_before": load_average()},
                     "rows": {}}

    # (name, direct run (dsn, cpu) -> (ops, s, latencies, declines, server CPU s), payloads from
    #  e2e.Requests (the same bytes for cardcore and the peer), client run (target, payloads))
    plan = []
    if "unary" in kinds:
        plan += [(f"unary_{k}",
                  lambda dsn, cpu, tag, k=k: run_pg(dsn, numbers, k, secs, tag, cpu),
                  lambda r: r.unary(int(12_000 * secs)),
                  lambda t, p, k=k: e2e.run_unary(t, p, k, secs)) for k in (1, 16, 64)]
    if "stream" in kinds:
        plan += [(f"stream_{k}",
                  (lambda dsn, cpu, tag, k=k: run_pg_pipelined(dsn, numbers, k, WINDOW, secs, tag, cpu))
                  if peer_stream == "pipeline" else
                  (lambda dsn, cpu, tag, k=k: run_pg(dsn, numbers, k, secs, tag, cpu)),
                  lambda r: r.swipes(int(30_000 * secs)),
                  lambda t, p, k=k: run_cc_streams(t, p, k, secs)) for k in (16, 64)]
    if "batch" in kinds:
        plan.append(("batch_1000", lambda dsn, cpu, tag: run_pg_batches(dsn, numbers, secs, tag, cpu),
                     lambda r: r.batches(int(100 * secs)),
                     lambda t, p: e2e.run_batches(t, p, secs)))
    for name, *_ in plan:
        results["rows"][name] = {"label": label(name), "direct_label": direct_label(name, peer_stream),
                                 "rounds": []}

    work = tempfile.mkdtemp(prefix="cardcore-peer-bench-")
    started: list[e2e.Proc] = []  # stopped at the end if a failure left one running
    cluster = Cluster(args.port)
    try:
        dsn = f"postgresql://postgres@127.0.0.1:{args.port}/postgres"
        print(f"seeding {len(numbers):,} cards in PostgreSQL and in cardcore ...", flush=True)
        asyncio.run(seed_pg(dsn, numbers))
        data_dir = os.path.join(work, "data")
        srv = e2e.start_cardcore(data_dir, os.path.join(work, "seed.log"))
        started.append(srv)
        e2e.seed(srv.target, numbers)
        cardcore_shape = shape_check(srv.target, numbers)
        srv.stop()
        peer = start_peer(dsn, os.path.join(work, "peer-shape.log"), 2)
        started.append(peer)
        peer_shape = shape_check(peer.target, numbers)
        peer.stop()
        differences = [{"call": i, "cardcore": c, "peer": p}
                       for i, (c, p) in enumerate(zip(cardcore_shape, peer_shape)) if c != p]
        results["shape_check"] = {"calls": len(cardcore_shape), "ignored_fields": list(SHAPE_IGNORED),
                                  "differences": differences}
        if differences:
            print(json.dumps(differences, indent=1, default=str), file=sys.stderr)
            raise SystemExit("the peer answers differently from cardcore: not measured")
        print(f"shape check: {len(cardcore_shape)} calls answered alike by cardcore and the peer "
              f"(but {', '.join(SHAPE_IGNORED)})", flush=True)

        for r in range(args.rounds):
            order = SYSTEMS[r % 3:] + SYSTEMS[:r % 3]
            for name, direct_run, make, client_run in plan:
                payloads = make(e2e.Requests(numbers, f"{name}-r{r}"))
                run = lambda target: client_run(target, payloads)  # noqa: E731
                sample = {}
                for system in order:
                    log_path = os.path.join(work, f"{name}-r{r}-{system}.log")
                    if system == "cardcore":
                        proc = e2e.start_cardcore(data_dir, log_path)
                        started.append(proc)
                        sample[system] = measure(proc, proc.cpu_s, run)
                        groups, ops = e2e.writer_groups(proc.stop())
                        sample[system]["avg_group_ops"] = round(ops / groups, 1) if groups else 0
                    elif system == "peer":
                        proc = start_peer(dsn, log_path, args.pool_size)
                        started.append(proc)
                        sample[system] = measure(proc, lambda: proc.cpu_s() + cluster.cpu_s(), run)
                        proc.stop()
                    else:
                        # CPU from the first purchase to the last answer: connecting and preparing are
                        # not counted (nor are the services' start-ups)
                        n, elapsed, lat, declines, cpu_s = asyncio.run(
                            direct_run(dsn, cluster.cpu_s, f"pg-{name}-r{r}"))
                        sample[system] = e2e.summary(n, elapsed, lat, cpu_s) | {"errors": declines}
                    sample[system]["load_1m"] = round(os.getloadavg()[0], 2)  # the machine is shared
                results["rows"][name]["rounds"].append(sample)
                c, p, d = sample["cardcore"], sample["peer"], sample["direct"]
                bad = {s: v["errors"] for s, v in sample.items() if v["errors"]}
                print(f"round {r + 1} {name:10s} cardcore {c['tx_per_s']:>7,}/s {c['server_cpu_us_per_op']:>6} µs "
                      f"p50 {c['p50_ms']} p99 {c['p99_ms']} group {c['avg_group_ops']} | peer {p['tx_per_s']:>7,}/s "
                      f"{p['server_cpu_us_per_op']:>6} µs p50 {p['p50_ms']} p99 {p['p99_ms']} | direct "
                      f"{d['tx_per_s']:>7,}/s {d['server_cpu_us_per_op']:>6} µs"
                      + (f"  ERRORS {bad}" if bad else ""), flush=True)
        for row in results["rows"].values():
            row["summary"] = summarize(row["rounds"])
    finally:
        for proc in started:
            if proc.proc.poll() is None:
                proc.stop()
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["load_average_after"] = load_average()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out} (load average before {results['machine']['load_average_before']}, "
          f"after {results['machine']['load_average_after']})\n")
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
