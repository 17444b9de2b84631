"""The writer's per-operation glue, C against its Python reference, in one process (A/B):

    .venv/bin/python bench/writer_glue.py [--rounds 7] [--cards 20000] [--aggregates]

One ledger (no day totals, no member metrics unless ``--aggregates``) over ``--cards`` seeded
cards (bench/aggregates_writer.py's). Each round applies, with ``ledger.GLUE_IN_C`` on and off
in turn (the order alternating), a write transaction of 3 groups of 1,000 plain purchases on
random cards and stores, each group as the writer process takes it: decoded from its bytes,
applied, its answer encoded (``durable._decode``, ``Ledger.apply_in``, the answer's encoding in
``writer_main``). Prints the CPU (``time.process_time``) per purchase of each part, medians of
the rounds, and C / Python.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import aggregates_writer  # noqa: E402  (the seeded cards and request keys)

from cardcore import layout as L  # noqa: E402
from cardcore import ledger as ledger_module  # noqa: E402
from cardcore.durable import _decode  # noqa: E402
from cardcore.ext import writerglue  # noqa: E402
from cardcore.groups import encode_group  # noqa: E402
from cardcore.idempotency import PendingOp  # noqa: E402
from cardcore.ledger import Ledger  # noqa: E402
from cardcore.server.writer_proc import encode_answer  # noqa: E402

GROUP_OPS, GROUPS_PER_TXN = aggregates_writer.GROUP_OPS, 3
PARTS = ("decode", "apply", "answer")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--aggregates", action="store_true", help="keep the day totals and members")
    args = ap.parse_args()
    rng, ids, key = aggregates_writer.cards_and_keys(args.cards)
    took: dict[tuple[bool, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ledger = Ledger(os.path.join(tmp, "ledger"), sync=False, day_totals=args.aggregates,
                        member_metrics_kept=args.aggregates)
        try:
            ts = aggregates_writer.seed([ledger], ids, key, time.time_ns() // 1000)
            for r in range(args.rounds + 1):  # the first warms up: not counted
                for glue in ((True, False) if r % 2 else (False, True)):
                    groups = []
                    for _ in range(GROUPS_PER_TXN):
                        ts += 1000
                        groups.append(encode_group([PendingOp.build(
                            key("p"), L.OP_PURCHASE, rng.choice(ids), rng.randrange(100, 20_000),
                            store_id=rng.randrange(1, 200), client_time_us=ts)
                            for _ in range(GROUP_OPS)], ts))
                    ledger_module.GLUE_IN_C = glue
                    spent = dict.fromkeys(PARTS, 0.0)
                    with ledger.env.begin(write=True) as txn:
                        for data in groups:
                            t0 = time.process_time()
                            ops, at = _decode(data)
                            t1 = time.process_time()
                            outcomes = ledger.apply_in(txn, ops, at)
                            t2 = time.process_time()
                            (writerglue.encode_answer if glue else encode_answer)(outcomes)
                            t3 = time.process_time()
                            assert all(o.reason == L.R_OK for o in outcomes)
                            for part, t in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2)):
                                spent[part] += t
                    if r:
                        n = GROUP_OPS * GROUPS_PER_TXN
                        for part, t in spent.items():
                            took.setdefault((glue, part), []).append(t * 1e6 / n)
        finally:
            ledger_module.GLUE_IN_C = True
            ledger.close()
    total = {glue: sum(statistics.median(took[glue, p]) for p in PARTS) for glue in (False, True)}
    for part in PARTS:
        py, c = (statistics.median(took[glue, part]) for glue in (False, True))
        print(f"{part:7s} Python {py:6.2f} µs  C {c:6.2f} µs a purchase (medians of "
              f"{args.rounds} rounds)")
    print(f"the writer's group, C / Python: {total[True]:.2f} / {total[False]:.2f} µs a purchase "
          f"= {total[True] / total[False]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
