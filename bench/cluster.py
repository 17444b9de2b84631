"""The group log on JetStream against the local group log, same groups, same run (docs/cluster.md).

One writer (``DurableLedger``, the writer's own code path) applies the same groups of top-ups
through each log in turn, one group at a time, rounds alternating: the local ``SegmentLog``
(one fdatasync per group) and ``JetStreamLog`` on 3 nats-server nodes on loopback (R3, file
storage, ``sync_interval: always``: acknowledged once a quorum has it fsynced). Per group: the
apply, the append, and (JetStream) the publish's round trip to the quorum's ack. On one 2-core
machine these are functional figures: three NATS nodes and the writer share two cores.

Then ``--failover-rounds``: 3 ``cardcore replica`` processes of one shard, one client submitting
top-ups one at a time (the submit round trip, p50/p99), kill -9 the leader: seconds until the
first top-up acknowledged after the kill (the lease's TTL, then the new leader's catch-up and
barrier).

    .venv/bin/python bench/cluster.py --groups 300 --ops 100 --rounds 3 --failover-rounds 3 \
        --out bench/cluster_results.json
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

from cardcore import cards as card_ids
from cardcore import layout as L
from cardcore.cards import random_number
from cardcore.durable import DurableLedger, log_folder
from cardcore.groups import encode_group
from cardcore.idempotency import PendingOp, request_key
from cardcore.jetlog import JetStreamLog, NatsThread, prepare_shard
from cardcore.ledger import Ledger
from cardcore.server.devcluster import NatsCluster, ReplicaProcess, cluster_available, leader_of

KEY = bytes(range(32))
CARDS = 200
GENESIS_US = 1_790_000_000_000_000


def make_groups(n_groups: int, n_ops: int, seed: int) -> list[bytes]:
    """Group 1 opens the cards; then ``n_groups`` groups of ``n_ops`` top-ups."""
    rng = random.Random(seed)
    ids = [card_ids.card_id(KEY, random_number(rng)) for _ in range(CARDS)]
    ts = GENESIS_US + 1_000_000
    k = 0

    def rkey() -> bytes:
        nonlocal k
        k += 1
        return request_key(L.CALLER_DEVELOPMENT, 0, f"b-{seed}-{k}".encode())

    groups = [encode_group([PendingOp.build(rkey(), L.OP_OPEN, c, profile=b"{}",
                                            client_time_us=ts) for c in ids], ts)]
    for _ in range(n_groups):
        ts += 1000
        groups.append(encode_group([PendingOp.build(rkey(), L.OP_TOP_UP, rng.choice(ids),
                                                    rng.randint(1, 10_000), client_time_us=ts)
                                    for _ in range(n_ops)], ts))
    return groups


def run(groups: list[bytes], folder: str, ops_per_group: int, group_log=None) -> dict:
    path = os.path.join(folder, "ledger")
    os.makedirs(path, exist_ok=True)

    def open_ledger() -> Ledger:
        return Ledger(path, initial_time_us=GENESIS_US)

    durable = DurableLedger(open_ledger, group_log,
                            log_folder=None if group_log else log_folder(path))
    took = []
    try:
        durable.apply(groups[0])
        start = time.perf_counter()
        for data in groups[1:]:
            t = time.perf_counter()
            outcomes, _ = durable.apply(data)
            took.append(time.perf_counter() - t)
            assert all(o.reason == L.R_OK for o in outcomes)
            if durable.due():
                durable.checkpoint()
        total = time.perf_counter() - start
    finally:
        durable.close()
    took.sort()
    return {"groups": len(took), "seconds": round(total, 3),
            "groups_per_s": round(len(took) / total, 1),
            "ops_per_s": round(len(took) * ops_per_group / total),
            "group_ms_p50": round(statistics.median(took) * 1000, 3),
            "group_ms_p99": round(took[int(len(took) * 0.99) - 1] * 1000, 3)}


def failover(tmp: str, rounds: int, lease_ms: int) -> dict:
    """3 replicas of a shard; one client submits top-ups one at a time; kill -9 the leader:
    seconds from the kill to the first top-up acknowledged after it (the new leader's), and
    the submit round trip before the kill (p50, p99 ms)."""
    from cardcore.server.replica import SubmitClient

    out = {"lease_ms": lease_ms, "failover_s": [], "submit_ms_p50": [], "submit_ms_p99": []}
    for r in range(rounds):
        folder = os.path.join(tmp, f"failover-{r}")
        nodes = NatsCluster(os.path.join(folder, "nats"))
        replicas = [ReplicaProcess(os.path.join(folder, f"r{k}"), 0, nodes.urls, "--lease-ms",
                                   str(lease_ms), "--idle-maintenance-ms", "0")
                    for k in range(3)]
        client = None
        try:
            for rep in replicas:
                rep.wait_role("following")
            deadline = time.monotonic() + 30
            while not any("leading" in rep.roles() for rep in replicas):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            client = SubmitClient(nodes.urls.split(","))
            cid = card_ids.card_id(KEY, random_number(random.Random(r)))
            k = [0]

            def topup() -> bool:
                k[0] += 1
                ts = time.time_ns() // 1000
                got = client.submit(0, [PendingOp.build(
                    request_key(L.CALLER_DEVELOPMENT, 0, f"f-{r}-{k[0]}".encode()),
                    L.OP_TOP_UP, cid, 100, client_time_us=ts)], timeout_s=1.0)
                return isinstance(got, list) and got[0].reason == L.R_OK

            ts = time.time_ns() // 1000
            assert isinstance(client.submit(0, [PendingOp.build(
                request_key(L.CALLER_DEVELOPMENT, 0, f"f-{r}-open".encode()), L.OP_OPEN, cid,
                profile=b"{}", client_time_us=ts)]), list)
            took = []
            for _ in range(300):
                t = time.perf_counter()
                assert topup()
                took.append(time.perf_counter() - t)
            took.sort()
            out["submit_ms_p50"].append(round(statistics.median(took) * 1000, 3))
            out["submit_ms_p99"].append(round(took[int(len(took) * 0.99) - 1] * 1000, 3))
            old = leader_of(replicas)
            killed = time.perf_counter()
            old.kill()
            while not topup():
                assert time.perf_counter() - killed < 60
                time.sleep(0.01)
            out["failover_s"].append(round(time.perf_counter() - killed, 3))
            print(f"failover round {r}: {out['failover_s'][-1]} s", file=sys.stderr)
        finally:
            if client is not None:
                client.close()
            for rep in replicas:
                if rep.proc.poll() is None:
                    rep.stop()
            nodes.stop()
    out["failover_s_p50"] = statistics.median(out["failover_s"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=300)
    ap.add_argument("--ops", type=int, default=100, help="top-ups per group")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--failover-rounds", type=int, default=3,
                    help="rounds of kill -9 of a shard's leader (0: none)")
    ap.add_argument("--lease-ms", type=int, default=3000, help="the replicas' lease TTL")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    why = cluster_available()
    if why:
        print(f"bench/cluster.py: {why}", file=sys.stderr)
        return 2
    results: dict = {"local": [], "jetstream": []}
    with tempfile.TemporaryDirectory() as tmp:
        nodes = NatsCluster(os.path.join(tmp, "nats"))
        nt = NatsThread(nodes.urls.split(","), "cardcore-bench")
        try:
            for r in range(args.rounds):
                groups = make_groups(args.groups, args.ops, seed=r)
                results["local"].append(run(groups, os.path.join(tmp, f"local-{r}"), args.ops))
                shard = r + 1  # a fresh stream each round
                prepare_shard(nt, shard, 3, 3000, None, GENESIS_US)
                jlog = JetStreamLog(nt, shard)
                jlog.epoch = 1
                results["jetstream"].append(run(groups, os.path.join(tmp, f"js-{r}"), args.ops, jlog))
                print(f"round {r}: local {results['local'][-1]}", file=sys.stderr)
                print(f"round {r}: jetstream {results['jetstream'][-1]}", file=sys.stderr)
        finally:
            nt.close()
            nodes.stop()
        fail = failover(tmp, args.failover_rounds, args.lease_ms) if args.failover_rounds else None
    summary = {
        "what": "groups of top-ups applied by DurableLedger, one group at a time: the local "
                "group log (fdatasync per group) vs JetStreamLog (3 nats-server nodes on "
                "loopback, R3, file storage, sync_interval: always), same groups, rounds "
                "alternating",
        "command": " ".join(["bench/cluster.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "ops_per_group": args.ops,
        "rounds": results,
        "ratio_groups_per_s_jetstream_to_local": round(
            statistics.median(x["groups_per_s"] for x in results["jetstream"])
            / statistics.median(x["groups_per_s"] for x in results["local"]), 3),
        "failover": fail,
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
