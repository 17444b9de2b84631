"""What the aggregates cost the writer alone, in-process (no server, no fsync), in CPU time:

    .venv/bin/python bench/aggregates_writer.py [--rounds 6] [--cards 20000] [--base REV_OR_FILE]

Four ledgers over the same seeded cards (opened and topped up): keeping every aggregate, none,
the day totals only, the member metrics only. Each round applies, in each ledger in turn (the
order alternating), 5 transactions of 3 groups of 1,000 purchases at random stores 1..199 (a
checkpoint's transaction spans groups so), and takes the writer's CPU time per group
(``time.process_time``: other processes on a shared machine move it far less than wall time).
Prints each ledger's median and min of the rounds, and none / each: the writer's share of the
issue's ">= 0.9x" target, which ``bench/daytotals.py --all-aggregates`` measures through the
server (the gRPC side there adds the same CPU to both).

``--base REV``: a fifth ledger keeping every aggregate through core/daytotals.py and
core/members.py as they were at git revision REV (or files: ``--base-members`` names the second),
over this tree's C loops (``ext/``: a base's Python calls them as it did), taking turns with
the others: an A/B in one process. At the end its aggregates' records must be byte for byte this
tree's (the same groups make the same records), or the run fails."""
from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import sys
import tempfile
import time

from cardcore import cards as card_ids
from cardcore import daytotals, members
from cardcore import ledger as ledger_module
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


def seed(ledgers, ids: list, key, ts: int, within=None) -> int:
    """Every card of ``ids`` opened and topped up in each ledger of ``ledgers`` (each its own
    operations: a group uses them), GROUP_OPS a group from ``ts`` on; the last group's time.
    ``within(ledger)``: a context each ledger's groups are applied in (``aggregates``)."""
    for start in range(0, len(ids), GROUP_OPS // 2):
        ts += 1000
        seeds = [(key("o"), key("t"), cid) for cid in ids[start:start + GROUP_OPS // 2]]
        for ledger in ledgers:
            with within(ledger) if within else contextlib.nullcontext():
                ledger.apply_group([op for o, t, cid in seeds for op in (
                    PendingOp.build(o, L.OP_OPEN, cid, profile=b"{}", client_time_us=ts),
                    PendingOp.build(t, L.OP_TOP_UP, cid, 10**12, client_time_us=ts))], ts)
    return ts


def base_modules(rev: str, members_file: str | None = None) -> tuple:
    """(daytotals, members) of revision ``rev`` (or files), loaded beside this tree's, the base's
    members module reading the base's day totals (its business days, later payments)."""
    from daytotals_stores import base_module  # (a revision's module, loaded)
    days = base_module(rev, "core/daytotals.py")
    kept = base_module(members_file or rev, "core/members.py")
    kept.daytotals = days
    return days, kept


@contextlib.contextmanager
def aggregates(modules: tuple | None):
    """The writer's aggregates (core/ledger.py's ``daytotals`` and ``member_metrics``) made by
    ``modules`` (``base_modules``') inside; None: this tree's."""
    if modules is None:
        yield
        return
    saved = ledger_module.daytotals, ledger_module.member_metrics
    ledger_module.daytotals, ledger_module.member_metrics = modules
    try:
        yield
    finally:
        ledger_module.daytotals, ledger_module.member_metrics = saved


def aggregate_records(ledger: Ledger) -> dict[str, list]:
    """Every record of the aggregates' sub-databases (the A/B's check that both made the same)."""
    with ledger.env.begin() as txn:
        return {name: list(txn.cursor(db=getattr(ledger, name)))
                for name in (*daytotals.DB_NAMES, *members.DB_NAMES)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--base", help="a git revision (or a file) whose core/daytotals.py and "
                    "core/members.py keep a fifth ledger's aggregates (an A/B)")
    ap.add_argument("--base-members", help="with --base a file: the base's core/members.py")
    args = ap.parse_args()
    rng, ids, key = cards_and_keys(args.cards)
    ts = time.time_ns() // 1000
    kept = dict(KEPT)
    modules: dict[str, tuple] = {}  # ledger name -> its aggregates' modules (none: this tree's)
    if args.base:
        base = f"all ({os.path.basename(args.base)})"
        kept[base] = KEPT["all"]
        modules[base] = base_modules(args.base, args.base_members)
    times: dict[str, list[float]] = {name: [] for name in kept}
    with tempfile.TemporaryDirectory() as tmp:
        ledgers = {name: Ledger(os.path.join(tmp, f"ledger{k}"), sync=False,
                                day_totals=days, member_metrics_kept=members)
                   for k, (name, (days, members)) in enumerate(kept.items())}
        by_ledger = {id(ledgers[name]): m for name, m in modules.items()}
        try:
            ts = seed(ledgers.values(), ids, key, ts,
                      lambda ledger: aggregates(by_ledger.get(id(ledger))))
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
                    with aggregates(modules.get(name)):
                        t0 = time.process_time()
                        for groups in built:
                            with ledger.env.begin(write=True) as txn:
                                for at, ops in groups:
                                    ledger.apply_in(txn, ops, at)
                        times[name].append((time.process_time() - t0) * 1e3
                                           / (TXNS_PER_ROUND * GROUPS_PER_TXN))
            if args.base:  # the same groups: the same records, byte for byte
                same = aggregate_records(ledgers["all"]) == aggregate_records(ledgers[base])
                print(f"records of all and {base}: {'identical' if same else 'DIFFERENT'}")
                if not same:
                    return 1
        finally:
            for ledger in ledgers.values():
                ledger.close()
    none = times["none"]
    if args.base:  # this tree against the base, round by round (the same round's load)
        ratios = [b / a for a, b in zip(times["all"], times[base])]
        print(f"{base} / all: {statistics.median(ratios):.3f}x (median of the rounds' ratios; "
              f"{', '.join(f'{r:.3f}' for r in ratios)})")
    for name, t in times.items():
        print(f"{name:22s} {statistics.median(t):6.2f} ms a {GROUP_OPS:,}-purchase group "
              f"(median of {args.rounds}; min {min(t):.2f}); none / {name}: "
              f"{statistics.median(none) / statistics.median(t):.2f}x "
              f"(min: {min(none) / min(t):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
