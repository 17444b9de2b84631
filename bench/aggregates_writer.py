"""What the aggregates cost the writer alone, in-process (no server, no fsync), in CPU time:

    .venv/bin/python bench/aggregates_writer.py [--rounds 6] [--cards 20000] [--stores 199]
                                                [--new-days] [--base REV]

Four ledgers over the same seeded cards (opened and topped up): keeping every aggregate, none,
the day totals only, the member metrics only. Each round applies 5 transactions of 3 groups of
1,000 purchases at random stores 1..199 (``--stores``; a checkpoint's transaction spans groups
so), each transaction in every ledger in turn (the order alternating: a shared machine's load
falls on all alike; ``--new-days``: each transaction on the next business day, so a member's
first purchase in it moves its last-purchase index key, as most purchases of a chain's day do),
and takes the writer's CPU time per group
(``time.process_time``: other processes on a shared machine move it far less than wall time).
Prints each ledger's median and min of the rounds, and none / each: the writer's share of the
issue's ">= 0.9x" target, which ``bench/daytotals.py --all-aggregates`` measures through the
server (the gRPC side there adds the same CPU to both).

``--profile``: where the ledger keeping every aggregate spends a group (cProfile's clock), and
LMDB's reads and writes by the function that called them: the committed answer to "what do
the aggregates still cost, and where" (its 'all' times then include the profiler).

``--base REV``: a fifth ledger keeping every aggregate through core/daytotals.py and
core/members.py as they were at git revision REV, over that revision's C loops (ext/daytotals.pyx
and ext/members.pyx built into a cache in the temp folder on the first run), taking turns with
the others: an A/B in one process. At the end its aggregates' records must be byte for byte this
tree's (the same groups make the same records), or the run fails."""
from __future__ import annotations

import _lsprof  # cProfile's profiler (bench/profile.py shadows the stdlib's profile here)
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


def base_modules(rev: str) -> tuple:
    """(daytotals, members) of revision ``rev``, loaded beside this tree's over the revision's
    own C loops (built), the base's members module reading the base's day totals (its business
    days, later payments)."""
    from daytotals_stores import base_daytotals, base_extension, base_module  # (a revision's)
    days = base_daytotals(rev)
    kept = base_module(rev, "core/members.py")
    kept.native = base_extension(rev, "members")
    kept.daytotals = days
    return days, kept


class Clocked:
    """A module (or a DayTotals) as the writer sees it, with the CPU time of the writer's calls
    into the aggregates (``later_payments``, ``DayTotals`` and its ``add_all`` and ``write``,
    ``keep``) added to ``spent[0]``: the aggregates' own share of a group, apart from the rest
    of the writer (where a shared machine's noise is ~5x larger)."""
    CLOCKED = frozenset(("later_payments", "keep", "add_all", "write"))

    def __init__(self, target, spent: list[float]) -> None:
        self._target, self._spent = target, spent

    def __getattr__(self, name: str):
        value = getattr(self._target, name)
        if name not in self.CLOCKED and name != "DayTotals":
            return value

        def clocked(*args, **kwargs):
            t0 = time.process_time()
            try:
                made = value(*args, **kwargs)
            finally:
                self._spent[0] += time.process_time() - t0
            return Clocked(made, self._spent) if name == "DayTotals" else made

        return clocked


@contextlib.contextmanager
def aggregates(modules: tuple | None, spent: list[float] | None = None):
    """The writer's aggregates (core/ledger.py's ``daytotals`` and ``member_metrics``) made by
    ``modules`` (``base_modules``'; None: this tree's) inside; ``spent``: their calls'
    CPU time added to ``spent[0]`` (``Clocked``)."""
    chosen = modules if modules is not None else (daytotals, members)
    if spent is not None:
        chosen = tuple(Clocked(m, spent) for m in chosen)
    saved = ledger_module.daytotals, ledger_module.member_metrics
    ledger_module.daytotals, ledger_module.member_metrics = chosen
    try:
        yield
    finally:
        ledger_module.daytotals, ledger_module.member_metrics = saved


def aggregate_records(ledger: Ledger) -> dict[str, list]:
    """Every record of the aggregates' sub-databases (the A/B's check that both made the same)."""
    with ledger.env.begin() as txn:
        return {name: list(txn.cursor(db=getattr(ledger, name)))
                for name in (*daytotals.DB_NAMES, *members.DB_NAMES)}


def _label(code) -> str:
    """A profiled function's name: file:line(function), or a builtin's own text."""
    if isinstance(code, str):
        return code
    return f"{os.path.basename(code.co_filename)}:{code.co_firstlineno}({code.co_name})"


def print_profile(profiler, groups: int) -> None:
    """Where the ledger keeping every aggregate spent its groups (``--profile``): the writer's
    functions by their own time, then LMDB's reads and writes by the function that called
    them (which sub-databases' records cost what), in ms a group (cProfile's clock: every
    Python call inflated alike)."""
    entries = profiler.getstats()
    print(f"--profile: the 'all' ledger, {groups} groups; ms a group (own, total)")
    for e in sorted(entries, key=lambda e: -e.inlinetime)[:18]:
        print(f"  {e.inlinetime * 1e3 / groups:7.3f} {e.totaltime * 1e3 / groups:7.3f}  "
              f"{_label(e.code)}")
    lmdb_calls = []
    for e in entries:
        for sub in e.calls or ():
            name = _label(sub.code)
            if "getmulti" in name or "putmulti" in name:
                lmdb_calls.append((sub.inlinetime, name.split()[1], _label(e.code)))
    print("  LMDB's getmulti and putmulti by caller:")
    for seconds, what, caller in sorted(lmdb_calls, reverse=True):
        print(f"  {seconds * 1e3 / groups:7.3f} {what:10s} from {caller}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--stores", type=int, default=199, help="the purchases' stores: 1..STORES")
    ap.add_argument("--new-days", action="store_true",
                    help="each transaction a business day after the one before (a chain's days)")
    ap.add_argument("--base", help="a git revision whose core/daytotals.py and core/members.py "
                    "(and their C loops, built) keep a fifth ledger's aggregates (an A/B)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the writer's transactions of the ledger keeping every "
                    "aggregate and print where its time went: the aggregates' functions and "
                    "LMDB's calls by caller (the times are cProfile's, inflated alike)")
    args = ap.parse_args()
    profiler = _lsprof.Profiler() if args.profile else None
    rng, ids, key = cards_and_keys(args.cards)
    ts = time.time_ns() // 1000
    kept = dict(KEPT)
    modules: dict[str, tuple] = {}  # ledger name -> its aggregates' modules (none: this tree's)
    if args.base:  # next to all, in either order: each pair of transactions under one load
        base = f"all ({os.path.basename(args.base)})"
        kept = {"all": KEPT["all"], base: KEPT["all"], **KEPT}
        modules[base] = base_modules(args.base)
    pairs: list[float] = []  # base / all, transaction by transaction
    own: dict[str, list[float]] = {"all": [], "base": []}  # the aggregates' calls, a transaction
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
                txns = []  # every ledger applies the same purchases: (key, card, amount, store)
                for _ in range(TXNS_PER_ROUND):
                    if args.new_days:  # a business day later: each member's first purchase
                        ts += L.DAY_US  # moves its last-purchase index key
                    groups = []
                    for _ in range(GROUPS_PER_TXN):
                        ts += 1000
                        groups.append((ts, [(key("p"), rng.choice(ids), rng.randrange(100, 20_000),
                                             rng.randrange(1, args.stores + 1))
                                            for _ in range(GROUP_OPS)]))
                    txns.append(groups)
                spent = dict.fromkeys(ledgers, 0.0)
                for t, groups in enumerate(txns):  # each transaction in every ledger in turn
                    names = list(ledgers)
                    took: dict[str, float] = {}
                    for name in names if (r + t) % 2 == 0 else names[::-1]:
                        ledger = ledgers[name]
                        built = [(at, [PendingOp.build(k, L.OP_PURCHASE, cid, amount,
                                                       store_id=store, client_time_us=at)
                                       for k, cid, amount, store in ops]) for at, ops in groups]
                        calls = [0.0]
                        with aggregates(modules.get(name), calls):
                            profiled = profiler is not None and name == "all"
                            if profiled:
                                profiler.enable()
                            t0 = time.process_time()
                            with ledger.env.begin(write=True) as txn:
                                for at, ops in built:
                                    ledger.apply_in(txn, ops, at)
                            took[name] = time.process_time() - t0
                            if profiled:
                                profiler.disable()
                            spent[name] += took[name]
                        if name == "all" or (args.base and name == base):
                            own["all" if name == "all" else "base"].append(calls[0])
                    if args.base:
                        pairs.append(took[base] / took["all"])
                for name, took in spent.items():
                    times[name].append(took * 1e3 / (TXNS_PER_ROUND * GROUPS_PER_TXN))
            if args.base:  # the same groups: the same records, byte for byte
                same = aggregate_records(ledgers["all"]) == aggregate_records(ledgers[base])
                print(f"records of all and {base}: {'identical' if same else 'DIFFERENT'}")
                if not same:
                    return 1
        finally:
            for ledger in ledgers.values():
                ledger.close()
    none = times["none"]
    if profiler is not None:
        print_profile(profiler, args.rounds * TXNS_PER_ROUND * GROUPS_PER_TXN)
        print("(--profile: 'all' ran under the profiler, so its times and ratios below are not "
              "comparable with the others')")
    if args.base:  # this tree against the base, transaction by transaction (adjacent: one load)
        q = statistics.quantiles(pairs, n=4)
        print(f"{base} / all: {statistics.median(pairs):.3f}x (writer CPU, median of "
              f"{len(pairs)} transactions' ratios; quartiles {q[0]:.3f}, {q[2]:.3f}); "
              f"medians of the rounds: {statistics.median(times[base]) / statistics.median(times['all']):.3f}x")
        mine = [b / a for a, b in zip(own["all"], own["base"])]
        q = statistics.quantiles(mine, n=4)
        per_group = 1e3 / GROUPS_PER_TXN
        print(f"the aggregates' own calls: all {statistics.median(own['all']) * per_group:.2f} ms "
              f"a group, {base} {statistics.median(own['base']) * per_group:.2f} ms; "
              f"{base} / all {statistics.median(mine):.3f}x (median of the transactions' "
              f"ratios; quartiles {q[0]:.3f}, {q[2]:.3f})")
    for name, t in times.items():
        print(f"{name:22s} {statistics.median(t):6.2f} ms a {GROUP_OPS:,}-purchase group "
              f"(median of {args.rounds}; min {min(t):.2f}); none / {name}: "
              f"{statistics.median(none) / statistics.median(t):.2f}x "
              f"(min: {min(none) / min(t):.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
