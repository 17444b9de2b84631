"""Through a cluster's front against the single node, same requests, same run (docs/cluster.md).

    .venv/bin/python bench/front.py [--cards 20000] [--seconds 4] [--rounds 3] \
        [--failover-rounds 3] [--card-shards N] [--out bench/front_results.json]

Two systems on one machine, each seeded with the same cards: the single node (``cardcore
serve``: its writer process and local group log) and a cluster (3 nats-server nodes on loopback,
R3 file storage with ``sync_interval: always``, 3 ``cardcore replica`` processes of one shard, and
one front, ``cardcore serve --cluster``, with its follower). Scenarios, rounds alternating between
the two: SubmitBatch (4 callers, 1,000 purchases a call) and SwipeStream (8 streams, 8 swipes in
flight each) on random cards; the ratio is the front's throughput over the single node's, and the
added p50/p99 a call. Then ``--failover-rounds``: one till topping up through the front one
request at a time while the shard's leader is killed -9: the seconds from the kill to the first
answer to a request sent after it (the front holds the requests in hand and sends them again).

``--card-shards N``: the cluster is an admin shard (0) and N card shards, 3 replicas each, and
the front is one over all of them (``--shard 0 --card-shards 1..N``; docs/cluster.md, "One front
over several card shards"): every SubmitBatch call spans the card shards, every swipe goes to
its card's; the failover kills the leader of the card shard the till's card is on.

On 2 shared cores the cluster's 3 NATS nodes, 3 replicas, the front and its follower and the
load all share the machine: these are functional figures, not what three hosts do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402

from cardcore.cards import card_id, random_number  # noqa: E402
from cardcore.keyring import Keyring  # noqa: E402
from cardcore.shards import slot_of, spread  # noqa: E402
from cardcore.server.devcluster import (NatsCluster, ReplicaProcess, cluster_available,  # noqa: E402
                                        leader_of)
from cardcore.terminal import now_us  # noqa: E402
from cardcore.v1 import card_service_pb2 as pb  # noqa: E402
from cardcore.v1 import card_service_pb2_grpc as pb_grpc  # noqa: E402
from cardcore.v1 import common_pb2 as cpb  # noqa: E402
from e2e import (Proc, Requests, measure, run_batches, run_streams, seed,  # noqa: E402
                 start_cardcore)

HERE = os.path.dirname(os.path.abspath(__file__))
LEASE_MS = 3000


def replica(tmp: str, nodes: NatsCluster, keyring: str, shard: int, k: int,
            card_shards: int) -> ReplicaProcess:
    admin = ("--admin-shard", "0") if card_shards else ()
    return ReplicaProcess(os.path.join(tmp, f"s{shard}-r{k}"), shard, nodes.urls, "--lease-ms",
                          str(LEASE_MS), "--idle-maintenance-ms", "0", "--keyring", keyring,
                          *admin)


def start_cluster(tmp: str, keyring: str,
                  card_shards: int = 0) -> tuple[NatsCluster, list[ReplicaProcess]]:
    """Shard 0's 3 replicas; with ``card_shards``, shard 0 the admin shard and 1..N's too."""
    nodes = NatsCluster(os.path.join(tmp, "nats"), shards=1 + card_shards,
                        admin_shard=0 if card_shards else None)
    replicas = []
    for shard in range(1 + card_shards):  # (the admin shard's first: a card shard's leader
        mine = [replica(tmp, nodes, keyring, shard, k, card_shards) for k in range(3)]
        deadline = time.monotonic() + 60  # takes its place beside it, reading its genesis)
        while not any(r.roles()[-1:] == ["leading"] for r in mine):
            assert time.monotonic() < deadline, f"no leader of shard {shard}"
            time.sleep(0.05)
        replicas += mine
    return nodes, replicas


def start_front(tmp: str, nodes: NatsCluster, keyring: str, name: str = "front",
                card_shards: int = 0) -> Proc:
    routed = (["--card-shards", ",".join(str(s) for s in range(1, 1 + card_shards))]
              if card_shards else [])
    return Proc([sys.executable, "-m", "cardcore.server.cli", "serve", "--insecure", "--cluster",
                 "--nats", nodes.urls, "--keyring", keyring, "--data-dir",
                 os.path.join(tmp, name), "--listen", "127.0.0.1:0", *routed],
                os.path.join(tmp, f"{name}.log"))


def one_round(proc: Proc, numbers: list[str], tag: str, seconds: float) -> dict:
    requests = Requests(numbers, tag)
    batches = requests.batches(max(8, int(seconds * 40)))
    swipes = requests.swipes(int(seconds * 20_000))
    return {"SubmitBatch": measure(proc, lambda: run_batches(proc.target, batches, seconds)),
            "SwipeStream": measure(proc, lambda: run_streams(proc.target, swipes, seconds))}


def failover(nodes: NatsCluster, replicas: list[ReplicaProcess], front: Proc, number: str,
             keyring: str, card_shards: int = 0) -> tuple[float, list[ReplicaProcess]]:
    """Seconds from the leader's kill (of the shard the card is on) to the first answer to a
    top-up sent after it; the replicas then running (the killed one restarted on its folder,
    following)."""
    shard = 0
    if card_shards:
        index_key = Keyring.load_or_create(keyring, os.path.dirname(keyring)).index_key
        shard = spread(list(range(1, 1 + card_shards)))[slot_of(card_id(index_key, number))]
    stop = threading.Event()
    answered: list[tuple[float, float]] = []  # (sent, answered) perf_counter
    failures: list[str] = []

    def till() -> None:
        with grpc.insecure_channel(front.target) as ch:
            stub = pb_grpc.CardServiceStub(ch)
            k = 0
            while not stop.is_set():
                k += 1
                sent = time.perf_counter()
                try:
                    stub.TopUp(pb.TopUpRequest(
                        request_id=f"f-{os.getpid()}-{sent}-{k}", client_time_us=now_us(),
                        card=cpb.CardRef(card_number=number), amount_minor=1), timeout=60)
                except grpc.RpcError as exc:
                    failures.append(str(exc.code()))
                    continue
                answered.append((sent, time.perf_counter()))

    t = threading.Thread(target=till)
    t.start()
    try:
        time.sleep(1.0)
        old = leader_of([r for r in replicas if r.shard == shard])
        killed = time.perf_counter()
        os.kill(old.pid, signal.SIGKILL)
        old.proc.wait(10)
        deadline = time.monotonic() + 60
        while not any(s > killed for s, _ in answered):
            assert time.monotonic() < deadline, "no answer after the kill"
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(70)
    first = min(a for s, a in answered if s > killed)
    assert not failures, failures
    restarted = ReplicaProcess(old.data_dir, shard, nodes.urls, "--lease-ms", str(LEASE_MS),
                               "--idle-maintenance-ms", "0", "--keyring", keyring,
                               *(("--admin-shard", "0") if card_shards else ()))
    restarted.wait_role("following", after=restarted.first_role)
    return first - killed, [r for r in replicas if r is not old] + [restarted]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--failover-rounds", type=int, default=3)
    ap.add_argument("--card-shards", type=int, default=0, choices=range(0, 5),
                    help="a front over an admin shard and this many card shards (0: one shard)")
    ap.add_argument("--out", default=None, help="default: bench/front_results.json, with "
                    "--card-shards bench/front_sharded_results.json")
    args = ap.parse_args()
    args.out = args.out or os.path.join(
        HERE, "front_sharded_results.json" if args.card_shards else "front_results.json")
    why = cluster_available()
    if why:
        print(f"bench/front.py: {why}", file=sys.stderr)
        return 2
    rng = random.Random(1313)
    numbers = [random_number(rng) for _ in range(args.cards)]
    tmp = tempfile.mkdtemp(prefix="cardcore-front-bench-")
    keyring = os.path.join(tmp, "keyring.json")
    Keyring.load_or_create(keyring, tmp)
    single = start_cardcore(os.path.join(tmp, "single"), os.path.join(tmp, "single.log"),
                            ("--keyring", keyring))
    nodes, replicas = start_cluster(tmp, keyring, args.card_shards)
    front = start_front(tmp, nodes, keyring, card_shards=args.card_shards)
    rows: dict[str, list] = {"single": [], "front": []}
    failovers: list[float] = []
    try:
        for proc in (single, front):
            seed(proc.target, numbers)
        for k in range(args.rounds):
            for name, proc in (("single", single), ("front", front)):
                got = one_round(proc, numbers, f"{name}-{k}", args.seconds)
                rows[name].append(got)
                print(name, k, json.dumps(got), flush=True)
        for _ in range(args.failover_rounds):
            took, replicas = failover(nodes, replicas, front, numbers[0], keyring,
                                      args.card_shards)
            failovers.append(round(took, 3))
            print("failover", failovers[-1], flush=True)
    finally:
        front_log = front.stop()
        single.stop()
        for r in replicas:
            r.stop()
        nodes.stop()

    def med(name: str, scenario: str, field: str) -> float:
        return statistics.median(r[scenario][field] for r in rows[name])

    out = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "cards": args.cards,
           "card_shards": args.card_shards,
           "seconds": args.seconds, "rounds": rows, "failover_s": failovers,
           "failover_p50_s": statistics.median(failovers) if failovers else None,
           "front_log_tail": [line for line in front_log.splitlines() if "sent again" in line]}
    for scenario in ("SubmitBatch", "SwipeStream"):
        out[scenario] = {
            "ratio": round(med("front", scenario, "tx_per_s") / med("single", scenario, "tx_per_s"), 2),
            "single_tx_per_s": med("single", scenario, "tx_per_s"),
            "front_tx_per_s": med("front", scenario, "tx_per_s"),
            "added_p50_ms": round(med("front", scenario, "p50_ms") - med("single", scenario, "p50_ms"), 2),
            "added_p99_ms": round(med("front", scenario, "p99_ms") - med("single", scenario, "p99_ms"), 2)}
        print(scenario, json.dumps(out[scenario]))
    print("failover (s):", failovers)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
