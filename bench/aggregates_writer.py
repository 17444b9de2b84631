"""What the aggregates cost the writer alone, in-process (no server, no fsync), in CPU time:

    .venv/bin/python bench/aggregates_writer.py [--rounds 6] [--cards 20000]

Four ledgers over the same seeded cards (opened and topped up): keeping every aggregate, none,
the day totals only, the member metrics only. Each round applies, in each ledger in turn (the
order alternating), 5 transactions of 3 groups of 1,000 purchases at random stores 1..199 (a
checkpoint's transaction spans groups so), and takes the writer's CPU time per group
(``time.process_time``: other processes on a shared machine move it far less than wall time).
Prints each ledger's median and min of the rounds, and none / each: the writer's share of the
issue's ">= 0.9x" target, which ``bench/daytotals.py --all-aggregates`` measures through the
server (the gRPC side there adds the same CPU to both)."""
from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

from cardcore import cards as card_ids
from cardcore import layout as L
from cardcore.cards import random_number
from cardcore.idempotency import PendingOp, request_key
from cardcore.ledger import Ledger

KEY = bytes(32)  # the ledgers' card ids: their own key (nothing looks a number up)
GROUP_OPS, GROUPS_PER_TXN, TXNS_PER_ROUND = 1000, 3, 5
KEPT = {"all": (True, True), "none": (False, False), "day totals": (True, False),
        "member metrics": (False, True)}  # (day totals, member metrics)


def cards_and_keys(count: int):
    """(rng, ``count`` card ids under the ledgers' key, a request-key maker: a fresh key a call,
    its prefix naming the operation) of these benchmarks' runs."""
    rng = random.Random(5)
    caller = (L.CALLER_DEVELOPMENT, 0)
    ids = [card_ids.card_id(KEY, random_number(rng)) for _ in range(count)]
    made = 0

    def key(prefix: str) -> bytes:
        nonlocal made
        made += 1
        return request_key(*caller, f"{prefix}{made}".encode())

    return rng, ids, key


def seed(ledgers, ids: list, key, ts: int) -> int:
    """Every card of ``ids`` opened and topped up in each ledger of ``ledgers`` (each its own
    operations: a group uses them), GROUP_OPS a group from ``ts`` on; the last group's time."""
    for start in range(0, len(ids), GROUP_OPS // 2):
        ts += 1000
        seeds = [(key("o"), key("t"), cid) for cid in ids[start:start + GROUP_OPS // 2]]
        for ledger in ledgers:
            ledger.apply_group([op for o, t, cid in seeds for op in (
                PendingOp.build(o, L.OP_OPEN, cid, profile=b"{}", client_time_us=ts),
                PendingOp.build(t, L.OP_TOP_UP, cid, 10**12, client_time_us=ts))], ts)
    return ts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cards", type=int, default=20_000)
    args = ap.parse_args()
    rng, ids, key = cards_and_keys(args.cards)
    ts = time.time_ns() // 1000
    times: dict[str, list[float]] = {name: [] for name in KEPT}
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = {name: Ledger(os.path.join(tmp, name.replace(" ", "_")), sync=False,
                                day_totals=days, member_metrics_kept=members)
                   for name, (days, members) in KEPT.items()}
        try:
            ts = seed(ledgers.values(), ids, key, ts)
            for r in range(args.rounds):
                order = list(ledgers) if r % 2 == 0 else list(ledgers)[::-1]
                txns = []  # every ledger applies the same purchases: (key, card, amount, store)
                for _ in range(TXNS_PER_ROUND):
                    groups = []
                    for _ in range(GROUPS_PER_TXN):
                        ts += 1000
                        groups.append((ts, [(key("p"), rng.choice(ids), rng.randrange(100, 20_000),
                                             rng.randrange(1, 200)) for _ in range(GROUP_OPS)]))
                    txns.append(groups)
                for name in order:
                    ledger = ledgers[name]
                    built = [[(at, [PendingOp.build(k, L.OP_PURCHASE, cid, amount, store_id=store,
                                                    client_time_us=at)
                                    for k, cid, amount, store in ops]) for at, ops in groups]
                             for groups in txns]
                    t0 = time.process_time()
                    for groups in built:
                        with ledger.env.begin(write=True) as txn:
                            for at, ops in groups:
                                ledger.apply_in(txn, ops, at)
                    times[name].append((time.process_time() - t0) * 1e3
                                       / (TXNS_PER_ROUND * GROUPS_PER_TXN))
        finally:
            for ledger in ledgers.values():
                ledger.close()
    none = times["none"]
    for name, t in times.items():
        print(f"{name:15s} {statistics.median(t):6.2f} ms a {GROUP_OPS:,}-purchase group "
              f"(median of {args.rounds}; min {min(t):.2f}); none / {name}: "
              f"{statistics.median(none) / statistics.median(t):.2f}x "
              f"(min: {min(none) / min(t):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
