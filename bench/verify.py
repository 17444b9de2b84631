"""What ``cardcore verify`` costs (it recomputes every journal entry with the reference
arithmetic), so an operator can plan when to run it on a replica's or a server's folder:

    .venv/bin/python bench/verify.py [--ops 200000 1000000] [--cards 10000]

For each ``--ops``: a ledger of that many top-ups and purchases over ``--cards`` cards, 100
stores and a year (``bench/daytotals.py``'s builder, in-process, no fsync), then verify of it
in this process: its wall and CPU time, and per million journal entries."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import daytotals  # noqa: E402  (its ledger builder)

from cardcore.server.cmd_server import _verify_at  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=int, nargs="+", default=[200_000, 1_000_000])
    p.add_argument("--cards", type=int, default=10_000)
    args = p.parse_args()
    for ops in args.ops:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "ledger")
            built = daytotals.build(path, ops, 100, 365, args.cards)
            t0, c0 = time.perf_counter(), time.process_time()
            report = _verify_at(path)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        assert report["ok"], report["problems"]
        entries = built["journal_entries"]
        print(f"{entries:>9,} journal entries, {args.cards:,} cards: verify {wall:.1f} s "
              f"({cpu:.1f} s CPU), {cpu / entries * 1e6:.0f} s CPU per million entries")


if __name__ == "__main__":
    main()
