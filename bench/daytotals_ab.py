"""The day totals' own writer work, a revision's ``core/daytotals.py`` against this checkout's:

    .venv/bin/python bench/daytotals_ab.py --base 3ab9d35 [--rounds 100]

One ledger (20,000 cards opened and topped up, three groups of 1,000 purchases at random stores
1..199: the shape of ``bench/aggregates_writer.py``); its last group's entries added and written
(``DayTotals.add_all`` and ``write``) in a write transaction then aborted, by the base's module and
this one alternating in one process (the base over its own C loop, built from the revision), CPU
time (``time.process_time``). Both must write the same records (checked); on a shared machine the
ratio of the two is far steadier than the writer's."""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from cardcore import daytotals
from cardcore import layout as L
from cardcore.idempotency import PendingOp
from cardcore.ledger import Ledger

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aggregates_writer import cards_and_keys, seed  # noqa: E402  (the same cards, opened the same way)
from daytotals_stores import base_daytotals  # noqa: E402  (a revision's, over its C loop)

CARDS, GROUP_OPS = 20_000, 1000



def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the revision to compare with")
    ap.add_argument("--rounds", type=int, default=100)
    args = ap.parse_args()
    rng, ids, key = cards_and_keys(CARDS)
    ts = time.time_ns() // 1000
    with tempfile.TemporaryDirectory() as tmp:
        versions = {"base": base_daytotals(args.base), "this": daytotals}
        ledger = Ledger(os.path.join(tmp, "ledger"), sync=False, day_totals=True,
                        member_metrics_kept=False)
        try:
            ts = seed([ledger], ids, key, ts)
            for _ in range(3):
                ts += 1000
                ledger.apply_group([PendingOp.build(
                    key("p"), L.OP_PURCHASE, rng.choice(ids), rng.randrange(100, 20_000),
                    store_id=rng.randrange(1, 200), client_time_us=ts)
                    for _ in range(GROUP_OPS)], ts)
            with ledger.env.begin() as txn:
                entries = [e for _, e in txn.cursor(db=ledger.journal)][-GROUP_OPS:]
            times: dict[str, list[float]] = {name: [] for name in versions}
            written = {}
            for r in range(args.rounds):
                for name in (list(versions) if r % 2 == 0 else list(versions)[::-1]):
                    with ledger.env.begin(write=True) as txn:
                        t0 = time.process_time()
                        totals = versions[name].DayTotals(txn, ledger, ledger.day_settings)
                        totals.add_all(entries, later=[])
                        totals.write()
                        times[name].append(time.process_time() - t0)
                        if r == 0:
                            written[name] = {db: list(txn.cursor(db=getattr(ledger, db)))
                                             for db in daytotals.DB_NAMES}
                        txn.abort()
        finally:
            ledger.close()
    if written["base"] != written["this"]:
        print("the two write different records")
        return 1
    for name, t in times.items():
        print(f"{name}: {statistics.median(t) * 1e3:.3f} ms a {GROUP_OPS:,}-purchase group "
              f"(median of {args.rounds}; min {min(t) * 1e3:.3f})")
    print(f"this / base: {statistics.median(times['this']) / statistics.median(times['base']):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
