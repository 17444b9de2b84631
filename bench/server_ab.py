"""Two settings of one server side by side, in one run: the same tree started twice over copies
of the same seeded cards, one with ``--a`` arguments and one with ``--b``, each scenario's
rounds alternating which goes first; ratio b / a per round, the median reported:

    .venv/bin/python bench/server_ab.py --a=--event-loop=asyncio --b=--event-loop=uvloop \\
        [--scenario unary_16 --scenario stream --scenario batch_1000] [--rounds 3] [--seconds 4]
        [--cards 20000] [--out bench/server_ab_results.json]

The scenarios are bench/e2e.py's (sync on: durable); both servers stay up through the run (the
one not measured idles), so a round's figures are the throughput, the latencies and the
server's CPU per operation (both of its processes) of the same requests."""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402  (the servers, the requests and the runners)

from cardcore.cards import random_number  # noqa: E402

SCENARIOS = {  # name -> (requests for `seconds`, the runner)
    "unary_1": (lambda r, s: r.unary(int(3_000 * s)), lambda t, p, s: e2e.run_unary(t, p, 1, s)),
    "unary_16": (lambda r, s: r.unary(int(12_000 * s)), lambda t, p, s: e2e.run_unary(t, p, 16, s)),
    "unary_64": (lambda r, s: r.unary(int(12_000 * s)), lambda t, p, s: e2e.run_unary(t, p, 64, s)),
    "stream": (lambda r, s: r.swipes(int(30_000 * s)), lambda t, p, s: e2e.run_streams(t, p, s)),
    "batch_1000": (lambda r, s: r.batches(int(200 * s)), lambda t, p, s: e2e.run_batches(t, p, s)),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--a", action="append", default=[], help="argument of side a (repeat)")
    ap.add_argument("--b", action="append", default=[], help="argument of side b (repeat)")
    ap.add_argument("--scenario", action="append", choices=sorted(SCENARIOS), default=[])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--out", default=os.path.join(HERE, "server_ab_results.json"))
    args = ap.parse_args()
    scenarios = args.scenario or ["unary_16", "stream"]
    rng = random.Random(1)
    numbers = list({random_number(rng) for _ in range(args.cards)})
    rows: dict[str, list] = {f"{s}_{side}": [] for s in scenarios for side in "ab"}
    logs = {}
    with tempfile.TemporaryDirectory() as tmp:
        seeded = os.path.join(tmp, "seeded")
        proc = e2e.start_cardcore(seeded, os.path.join(tmp, "seed.log"))
        e2e.seed(proc.target, numbers)
        proc.stop()
        procs = {}
        try:
            for side, extra in (("a", args.a), ("b", args.b)):
                shutil.copytree(seeded, os.path.join(tmp, side))
                procs[side] = e2e.start_cardcore(os.path.join(tmp, side),
                                                 os.path.join(tmp, f"{side}.log"), tuple(extra))
            for name in scenarios:
                make, run = SCENARIOS[name]
                for k in range(args.rounds):
                    for side in ("ab" if k % 2 == 0 else "ba"):
                        proc = procs[side]
                        payloads = make(e2e.Requests(numbers, f"{name}-{side}-{k}"), args.seconds)
                        rows[f"{name}_{side}"].append(e2e.measure(
                            proc, lambda p=payloads, t=proc.target: run(t, p, args.seconds)))
        finally:
            logs = {side: proc.stop() for side, proc in procs.items()}
    for side, log in logs.items():
        if "Traceback" in log:
            print(f"side {side}'s server log:\n{log[-3000:]}", file=sys.stderr)
    ratios = {}
    for name in scenarios:
        a, b = rows[f"{name}_a"], rows[f"{name}_b"]
        ratios[f"{name}_b_vs_a"] = e2e.median_ratio(rows, f"{name}_b", f"{name}_a")
        ratios[f"{name}_cpu_a_vs_b"] = (statistics.median(r["server_cpu_us_per_op"] for r in a)
                                        / statistics.median(r["server_cpu_us_per_op"] for r in b))
    e2e.report_rounds(args.out, rows, ratios, {"a": args.a, "b": args.b, "cards": args.cards,
                                               "seconds": args.seconds}, "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
