"""How long an admin change takes to reach a card shard (docs/cluster.md, "The admin shard").

Three nats-server nodes on loopback, the admin shard and one card shard (``--replicas`` each,
``--admin-shard``), a submitter: each round enrolls a new terminal on the admin shard (the submit
round trip, answered once the admin shard's quorum holds it), then sends top-ups at that
terminal to the card shard every ``--poll-ms`` until one is applied (refused as an unknown
terminal before): the time from the enrolment's answer to that top-up's is what a change takes
to be usable on a card shard (the card leader's look every 0.2 s, its relay group's append,
one poll at most). Functional figures on one shared 2-core machine.

    .venv/bin/python bench/admin_relay.py --rounds 30 --out bench/admin_relay_results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e  # noqa: E402  (its percentile)

from cardcore import layout as L  # noqa: E402
from cardcore.cards import card_id, random_number  # noqa: E402
from cardcore.idempotency import PendingOp, request_key  # noqa: E402
from cardcore.server.devcluster import NatsCluster, ReplicaProcess, cluster_available, leader_of  # noqa: E402
from cardcore.server.replica import SubmitClient  # noqa: E402

KEY = bytes(range(32))
ADMIN, CARD = 1, 0
SYSTEM = (L.CALLER_SYSTEM, 0)


def now_us() -> int:
    return time.time_ns() // 1000


def submit(client: SubmitClient, shard: int, ops: list[PendingOp]) -> list:
    deadline = time.monotonic() + 20
    while not isinstance(got := client.submit(shard, ops), list):
        if time.monotonic() > deadline:
            raise RuntimeError(f"shard {shard}: {got!r}")
        time.sleep(0.05)
    return got


def enroll(tid: int) -> PendingOp:
    subject = tid.to_bytes(4, "little") + (3).to_bytes(4, "little") + b"IKID" + tid.to_bytes(4, "big")
    return PendingOp.admin(request_key(*SYSTEM, f"enroll-{tid}".encode()),
                           L.OP_TERMINAL_ENROLLED, subject, b"", 0, client_time_us=now_us())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--replicas", type=int, default=1, help="replica processes per shard")
    ap.add_argument("--poll-ms", type=float, default=5.0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    why = cluster_available()
    if why:
        print(why, file=sys.stderr)
        return 2
    tmp = tempfile.mkdtemp(prefix="cardcore-relay-")
    nodes = NatsCluster(os.path.join(tmp, "nats"))
    replicas: list[ReplicaProcess] = []
    client = None
    try:
        for shard in (ADMIN, CARD):
            for k in range(args.replicas):
                replicas.append(ReplicaProcess(os.path.join(tmp, f"s{shard}-r{k}"), shard,
                                               nodes.urls, "--admin-shard", str(ADMIN),
                                               "--idle-maintenance-ms", "0"))
        for shard in (ADMIN, CARD):
            mine = [r for r in replicas if r.shard == shard]
            deadline = time.monotonic() + 60
            while not any(r.roles()[-1:] == ["leading"] for r in mine):
                if time.monotonic() > deadline or any(r.proc.poll() is not None for r in mine):
                    raise RuntimeError(f"shard {shard}: no leader: {mine[0].log()[-2000:]}")
                time.sleep(0.05)
            leader_of(mine)
        client = SubmitClient(nodes.urls.split(","))
        number = random_number(random.Random(1))
        cid = card_id(KEY, number)
        dev = (L.CALLER_DEVELOPMENT, 0)
        got = submit(client, CARD, [
            PendingOp.build(request_key(*dev, b"open"), L.OP_OPEN, cid, profile=b"{}",
                            client_time_us=now_us())])
        assert got[0].reason == L.R_OK, got
        enrol_ms, reach_ms, tries = [], [], []
        ksn = 0
        for r in range(args.rounds):
            tid = 100 + r
            t0 = time.perf_counter()
            got = submit(client, ADMIN, [enroll(tid)])
            t1 = time.perf_counter()
            assert got[0].reason == L.R_OK, got
            n = 0
            while True:
                n += 1
                ksn += 1
                top_up = PendingOp.build(
                    request_key(L.CALLER_TERMINAL, tid, f"t{ksn}".encode()), L.OP_TOP_UP, cid,
                    1, store_id=3, terminal_id=tid, ksn_counter=ksn, client_time_us=now_us())
                reason = submit(client, CARD, [top_up])[0].reason
                if reason == L.R_OK:
                    break
                assert reason == L.R_TERMINAL_UNKNOWN, reason
                time.sleep(args.poll_ms / 1000)
            t2 = time.perf_counter()
            enrol_ms.append((t1 - t0) * 1000)
            reach_ms.append((t2 - t1) * 1000)
            tries.append(n)

        def summary(xs: list[float]) -> dict:
            xs = sorted(xs)
            return {"p50": round(statistics.median(xs), 1),
                    "p95": round(e2e.percentile(xs, 0.95), 1),
                    "max": round(xs[-1], 1)}

        result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "rounds": args.rounds, "replicas_per_shard": args.replicas,
                  "enrol_answered_ms": summary(enrol_ms),
                  "usable_on_the_card_shard_after_ms": summary(reach_ms),
                  "top_ups_sent_until_one_applied_p50": statistics.median(tries)}
        print(json.dumps(result, indent=2))
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
                f.write("\n")
    finally:
        if client is not None:
            client.close()
        for r in replicas:
            if r.proc.poll() is None:
                r.stop()
        nodes.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
