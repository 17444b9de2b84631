"""The relational peer: the same purchase as a PL/pgSQL function in PostgreSQL, measured beside cardcore.

    .venv/bin/python bench/peer.py [--cards 100000] [--seconds 5]      (or: make bench-peer)

Starts a throwaway PostgreSQL cluster on loopback (installing Debian's
postgresql if it is missing), with the durability cardcore has
(synchronous_commit = on, fsync = on). The function does what a cardcore
purchase does: keyed hash of the card number (pgcrypto HMAC-SHA256),
idempotency by request id (same id + same payload -> the original answer;
other payload -> refused), tier discount rounded half-up, balance check,
points, a journal row, all in one transaction. Both systems are driven from
this process with pre-built requests at 1, 16 and 64 in flight over the same
number of cards; server CPU per purchase is read from /proc for the
PostgreSQL processes and for cardcore's two processes. The cluster is
removed at the end.
"""
from __future__ import annotations

import argparse
import asyncio
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


async def run_pg(dsn: str, numbers: list[str], in_flight: int, seconds: float, tag: str):
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=in_flight, max_size=in_flight)
    rng = random.Random(hash(tag) & 0xFFFF)
    requests = [(f"{tag}-{i}", rng.choice(numbers), rng.randrange(100, 10_000), rng.randrange(1, 200),
                 rng.randrange(1, 5000), 0) for i in range(int(12_000 * seconds))]
    it = iter(requests)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker():
        async with pool.acquire() as conn:
            stmt = await conn.prepare("SELECT * FROM purchase($1, $2, $3, $4, $5, $6)")
            for args in it:
                if time.perf_counter() > deadline:
                    return
                t0 = time.perf_counter()
                row = await stmt.fetchrow(*args)
                assert row["reason"] == 0, row
                latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - t0
    await pool.close()
    return len(latencies), elapsed, latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=55432)
    parser.add_argument("--out", default=os.path.join(HERE, "peer_results.json"))
    args = parser.parse_args()
    ensure_postgres()
    rng = random.Random(1)
    numbers = list({random_number(rng) for _ in range(args.cards)})
    results: dict = {"cards": len(numbers), "seconds": args.seconds, "rows": {}}
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
        for in_flight in (1, 16, 64):
            cpu0 = cluster.cpu_s()
            n, elapsed, lat = asyncio.run(run_pg(dsn, numbers, in_flight, args.seconds, f"pg{in_flight}"))
            pg = e2e.summary(n, elapsed, lat, cluster.cpu_s() - cpu0)
            proc = e2e.start_cardcore(data_dir, os.path.join(work, f"cc{in_flight}.log"))
            payloads = e2e.Requests(numbers, f"cc{in_flight}").unary(int(12_000 * args.seconds))
            cpu0 = proc.cpu_s()
            n, elapsed, lat, _ = asyncio.run(e2e.run_unary(proc.target, payloads, in_flight, args.seconds))
            cc = e2e.summary(n, elapsed, lat, proc.cpu_s() - cpu0)
            proc.stop()
            row = {"postgres": pg, "cardcore": cc,
                   "ratio": round(cc["tx_per_s"] / pg["tx_per_s"], 2),
                   "cpu_ratio": round(cc["server_cpu_us_per_op"] / pg["server_cpu_us_per_op"], 2)}
            results["rows"][f"unary_{in_flight}"] = row
            print(f"unary Purchase, {in_flight:>2} in flight: cardcore {cc['tx_per_s']:>7,}/s "
                  f"({cc['server_cpu_us_per_op']} µs CPU)  PostgreSQL {pg['tx_per_s']:>7,}/s "
                  f"({pg['server_cpu_us_per_op']} µs CPU)  ratio {row['ratio']:.2f}x, "
                  f"CPU {row['cpu_ratio']:.2f}x", flush=True)
    finally:
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
