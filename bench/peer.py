"""The relational peer: the same purchase as a PL/pgSQL function in PostgreSQL, measured beside cardcore.

    .venv/bin/python bench/peer.py [--cards 100000] [--seconds 5] [--only unary|stream|batch ...]
                                                                          (or: make bench-peer)

Starts a throwaway PostgreSQL cluster on loopback (installing Debian's
postgresql if it is missing), with the durability cardcore has
(synchronous_commit = on, fsync = on). The function does what a cardcore
purchase does: keyed hash of the card number (pgcrypto HMAC-SHA256),
idempotency by request id (same id + same payload -> the original answer;
other payload -> refused), tier discount rounded half-up, balance check,
points, a journal row, all in one transaction. Both systems are driven from
this process with pre-built requests over the same cards, in the same run,
at the same concurrency; server CPU per purchase is read from /proc for the
PostgreSQL processes (postmaster, its backends and helpers) and for
cardcore's two processes, from the first purchase to the last answer
(PostgreSQL's connecting and preparing, like cardcore's start-up, are left
out). The cluster is removed at the end.

Rows (``--only`` picks kinds; repeat it for more than one):

unary      Purchase at 1, 16 and 64 in flight; PostgreSQL: as many connections,
           each calling purchase() and waiting for the answer.
stream     cardcore: S SwipeStreams (S = 16, 64), each with up to 8 purchases
           pipelined (e2e.run_streams). PostgreSQL: one connection per
           terminal, S connections. With psycopg 3 installed (make bench-peer
           installs it), each connection runs libpq pipeline mode with the
           same window of 8: every purchase is Bind/Execute/Sync, so it is its
           own implicit transaction, committed (and flushed to WAL) at its
           Sync before the backend reads the next one; the pipeline only
           saves the client round trips. Without psycopg it falls back to
           asyncpg, which cannot pipeline separate transactions: S
           connections each calling purchase() back to back, which is what a
           relational member system does per till (--peer-stream sequential
           picks it). The JSON says which ("peer_stream").
batch      cardcore: SubmitBatch of 1,000 purchases, 4 concurrent callers
           (e2e.run_batches). PostgreSQL: purchase_batch(), a PL/pgSQL function
           taking the 1,000 purchases as arrays and applying them in ONE
           transaction with the same per-purchase semantics (keyed hash,
           idempotency, rounding, balance check, points, journal row, declines
           recorded, one result per purchase in order), called by 4
           concurrent connections. It locks the batch's cards in key order
           first, so concurrent batches queue on shared cards instead of
           deadlocking. p50/p99 of batch rows are per call of 1,000.

Prints one markdown table: peer and cardcore tx/s, their ratio, and server
CPU µs per purchase for both with their ratio; writes the rows (with p50/p99
and ops) to --out.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import e2e  # noqa: E402  (the cardcore side of the same measurements)
from cardcore.cards import random_number  # noqa: E402

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

CREATE FUNCTION purchase(p_request_id text, p_card_number text, p_gross bigint, p_store int,
                         p_terminal int, p_staff int)
RETURNS TABLE (reason int, seq bigint, paid_minor bigint, discount_minor bigint, points_earned bigint,
               principal_after bigint, points_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_card_id bytea := substring(hmac(convert_to(p_card_number, 'UTF8'),
                                      (SELECT key FROM keys WHERE name = 'index'), 'sha256') FROM 1 FOR 16);
    v_digest bytea := digest(concat_ws('|', p_card_number, p_gross, p_store, p_terminal, p_staff), 'sha256');
    v_req requests%ROWTYPE;
    v_card cards%ROWTYPE;
    v_paid bigint; v_points bigint; v_from_principal bigint; v_seq bigint;
BEGIN
    IF p_gross <= 0 THEN RETURN QUERY SELECT 2, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint; RETURN; END IF;
    SELECT * INTO v_req FROM requests r WHERE r.request_id = p_request_id;
    IF FOUND THEN
        IF v_req.digest <> v_digest THEN
            RETURN QUERY SELECT 13, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint; RETURN;
        END IF;
        RETURN QUERY SELECT v_req.reason::int, j.seq, -(j.principal_delta_minor + j.bonus_delta_minor),
                            j.discount_minor, j.points_delta, j.principal_after_minor, j.points_after
                     FROM journal j WHERE j.seq = v_req.seq;
        RETURN;
    END IF;
    SELECT * INTO v_card FROM cards c WHERE c.card_id = v_card_id FOR UPDATE;
    IF NOT FOUND THEN RETURN QUERY SELECT 8, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint, 0::bigint; RETURN; END IF;
    v_paid := floor((p_gross::numeric * (SELECT rate_bp FROM tiers t WHERE t.tier = v_card.tier) + 5000) / 10000);
    IF v_paid > v_card.principal_minor + v_card.bonus_minor THEN
        INSERT INTO requests VALUES (p_request_id, v_digest, 11, 0);
        RETURN QUERY SELECT 11, 0::bigint, 0::bigint, 0::bigint, 0::bigint, v_card.principal_minor, v_card.points;
        RETURN;
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
    RETURN QUERY SELECT 0, v_seq, v_paid, p_gross - v_paid, v_points, v_card.principal_minor, v_card.points;
END $$;

-- The batch: purchase() for each element, in order, in ONE transaction (one commit, one WAL flush).
-- The cards are locked in key order first, so that concurrent batches queue on the cards they share
-- instead of deadlocking; the key is read once per batch.
CREATE FUNCTION purchase_batch(p_request_ids text[], p_card_numbers text[], p_gross bigint[],
                               p_stores int[], p_terminals int[], p_staff int[])
RETURNS TABLE (ord int, reason int, seq bigint, paid_minor bigint, discount_minor bigint,
               points_earned bigint, principal_after bigint, points_after bigint)
LANGUAGE plpgsql AS $$
DECLARE
    v_key bytea := (SELECT k.key FROM keys k WHERE k.name = 'index');
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
        ord := i; reason := 0; seq := 0; paid_minor := 0; discount_minor := 0; points_earned := 0;
        principal_after := 0; points_after := 0;
        v_card_id := v_ids[i];
        v_digest := digest(concat_ws('|', p_card_numbers[i], p_gross[i], p_stores[i], p_terminals[i],
                                     p_staff[i]), 'sha256');
        IF p_gross[i] <= 0 THEN reason := 2; RETURN NEXT; CONTINUE; END IF;
        SELECT * INTO v_req FROM requests r WHERE r.request_id = p_request_ids[i];
        IF FOUND THEN
            IF v_req.digest <> v_digest THEN reason := 13; RETURN NEXT; CONTINUE; END IF;
            reason := v_req.reason;
            IF v_req.seq <> 0 THEN
                SELECT j.seq, -(j.principal_delta_minor + j.bonus_delta_minor), j.discount_minor,
                       j.points_delta, j.principal_after_minor, j.points_after
                    INTO seq, paid_minor, discount_minor, points_earned, principal_after, points_after
                    FROM journal j WHERE j.seq = v_req.seq;
            END IF;
            RETURN NEXT; CONTINUE;
        END IF;
        SELECT * INTO v_card FROM cards c WHERE c.card_id = v_card_id;  -- locked above
        IF NOT FOUND THEN reason := 8; RETURN NEXT; CONTINUE; END IF;
        v_paid := floor((p_gross[i]::numeric * (SELECT t.rate_bp FROM tiers t WHERE t.tier = v_card.tier)
                         + 5000) / 10000);
        IF v_paid > v_card.principal_minor + v_card.bonus_minor THEN
            INSERT INTO requests VALUES (p_request_ids[i], v_digest, 11, 0);
            reason := 11; principal_after := v_card.principal_minor; points_after := v_card.points;
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
        seq := v_seq; paid_minor := v_paid; discount_minor := p_gross[i] - v_paid; points_earned := v_points;
        principal_after := v_card.principal_minor; points_after := v_card.points;
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


def label(name: str, peer_stream: str) -> str:
    kind, n = name.split("_")
    if kind == "unary":
        return f"Purchase, unary, {n} in flight"
    if kind == "stream":
        peer = (f"{n} conns x {WINDOW} pipelined" if peer_stream == "pipeline"
                else f"{n} conns, sequential")
        return f"SwipeStream, {n} streams x {WINDOW} pipelined (peer: {peer})"
    return (f"SubmitBatch of {e2e.BATCH_OPS:,}, {e2e.BATCH_CALLERS} callers "
            f"(peer: purchase_batch of {e2e.BATCH_OPS:,}, {e2e.BATCH_CALLERS} conns)")


def markdown_table(results: dict) -> str:
    rows = [("| row | peer tx/s | cardcore tx/s | ratio | peer CPU µs/purchase | cardcore CPU µs/purchase "
             "| CPU ratio |"), "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in results["rows"].items():
        p, c = row["postgres"], row["cardcore"]
        rows.append(f"| {row.get('label', name)} | {p['tx_per_s']:,} | {c['tx_per_s']:,} | {row['ratio']:.2f}x | "
                    f"{p['server_cpu_us_per_op']} | {c['server_cpu_us_per_op']} | {row['cpu_ratio']:.2f}x |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=55432)
    parser.add_argument("--out", default=os.path.join(HERE, "peer_results.json"))
    parser.add_argument("--only", action="append", default=[], choices=["unary", "stream", "batch"],
                        help="run only these kinds of rows (repeat for more)")
    parser.add_argument("--peer-stream", choices=["pipeline", "sequential"], default=None,
                        help="PostgreSQL side of the stream rows (default: pipeline if psycopg 3 is installed)")
    args = parser.parse_args()
    kinds = args.only or ["unary", "stream", "batch"]
    secs = args.seconds
    ensure_postgres()
    peer_stream = args.peer_stream or ("pipeline" if have_psycopg() else "sequential")
    if peer_stream == "pipeline" and not have_psycopg():
        parser.error("--peer-stream pipeline needs psycopg 3 (pip install 'psycopg[binary]')")
    rng = random.Random(1)
    numbers = list({random_number(rng) for _ in range(args.cards)})
    results: dict = {"cards": len(numbers), "seconds": secs, "stream_window": WINDOW,
                     "batch_ops": e2e.BATCH_OPS, "batch_callers": e2e.BATCH_CALLERS, "rows": {}}
    if "stream" in kinds:
        results["peer_stream"] = peer_stream

    # (name, PostgreSQL run -> (ops, s, latencies, declines, server CPU s), cardcore payloads,
    #  cardcore run -> (ops, s, latencies, errors))
    plan = []
    if "unary" in kinds:
        plan += [(f"unary_{k}",
                  lambda dsn, cpu, k=k: run_pg(dsn, numbers, k, secs, f"pg-u{k}", cpu),
                  lambda r: r.unary(int(12_000 * secs)),
                  lambda t, p, k=k: e2e.run_unary(t, p, k, secs)) for k in (1, 16, 64)]
    if "stream" in kinds:
        plan += [(f"stream_{k}",
                  (lambda dsn, cpu, k=k: run_pg_pipelined(dsn, numbers, k, WINDOW, secs, f"pg-s{k}", cpu))
                  if peer_stream == "pipeline" else
                  (lambda dsn, cpu, k=k: run_pg(dsn, numbers, k, secs, f"pg-s{k}", cpu)),
                  lambda r: r.swipes(int(30_000 * secs)),
                  lambda t, p, k=k: run_cc_streams(t, p, k, secs)) for k in (16, 64)]
    if "batch" in kinds:
        plan.append(("batch_1000", lambda dsn, cpu: run_pg_batches(dsn, numbers, secs, "pg-b", cpu),
                     lambda r: r.batches(int(100 * secs)),
                     lambda t, p: e2e.run_batches(t, p, secs)))

    work = tempfile.mkdtemp(prefix="cardcore-peer-bench-")
    cluster = Cluster(args.port)
    try:
        dsn = f"postgresql://postgres@127.0.0.1:{args.port}/postgres"
        print(f"seeding {len(numbers):,} cards in PostgreSQL and in cardcore ...", flush=True)
        asyncio.run(seed_pg(dsn, numbers))
        data_dir = os.path.join(work, "data")
        srv = e2e.start_cardcore(data_dir, os.path.join(work, "seed.log"))
        e2e.seed(srv.target, numbers)
        srv.stop()
        for name, pg_run, make, cc_run in plan:
            # CPU from the first purchase to the last answer: connecting and preparing are not
            # counted (nor is cardcore's start-up)
            n, elapsed, lat, declines, cpu_s = asyncio.run(pg_run(dsn, cluster.cpu_s))
            pg = e2e.summary(n, elapsed, lat, cpu_s)
            if declines:
                pg["declines"] = declines
            payloads = make(e2e.Requests(numbers, f"cc-{name}"))
            proc = e2e.start_cardcore(data_dir, os.path.join(work, f"{name}.log"))
            cpu0 = proc.cpu_s()
            n, elapsed, lat, errors = asyncio.run(cc_run(proc.target, payloads))
            cc = e2e.summary(n, elapsed, lat, proc.cpu_s() - cpu0)
            groups, ops = e2e.writer_groups(proc.stop())
            cc["avg_group_ops"] = round(ops / groups, 1) if groups else 0
            if errors:
                cc["errors"] = errors
            row = {"label": label(name, peer_stream), "postgres": pg, "cardcore": cc,
                   "ratio": round(cc["tx_per_s"] / pg["tx_per_s"], 2),
                   "cpu_ratio": round(cc["server_cpu_us_per_op"] / pg["server_cpu_us_per_op"], 2)}
            results["rows"][name] = row
            print(f"{name:10s} cardcore {cc['tx_per_s']:>7,}/s ({cc['server_cpu_us_per_op']} µs CPU, "
                  f"p50 {cc['p50_ms']} p99 {cc['p99_ms']} ms)  PostgreSQL {pg['tx_per_s']:>7,}/s "
                  f"({pg['server_cpu_us_per_op']} µs CPU, p50 {pg['p50_ms']} p99 {pg['p99_ms']} ms)  "
                  f"ratio {row['ratio']:.2f}x, CPU {row['cpu_ratio']:.2f}x", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}\n")
    print(markdown_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
