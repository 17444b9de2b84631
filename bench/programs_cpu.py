"""bench/programs.py's SubmitBatch pair (a plain purchase against the 5-line basket with a coupon
and points offered) with the server's CPU a purchase split per process: the gRPC process and the
writer. On a shared machine a round's rate moves with the other sessions' load; the CPU a
purchase of each process moves much less, and says which side a change moved.

    .venv/bin/python bench/programs_cpu.py [--cards 20000] [--seconds 4] [--rounds 3]
                                           [--out bench/programs_cpu_results.json]

A/B against another tree: run this file with that tree's interpreter (the server is started with
``sys.executable``, so it runs that tree's code; the loads are this file's).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402  (the server, the seeding, the batch runner)
import programs  # noqa: E402  (the supermarket program's baskets and points)
from versus_release import cpu_split  # noqa: E402  (the gRPC process's CPU and its children's)

from cardcore.cards import random_number  # noqa: E402


def phase(proc: e2e.Proc, payloads: list[bytes], seconds: float) -> dict:
    """One timed run of ``payloads``: its rate and each process's CPU a purchase."""
    grpc0, writer0 = cpu_split(proc.proc.pid)
    ops, elapsed, _latencies, *errors = asyncio.run(
        e2e.run_batches(proc.target, payloads, seconds))
    grpc1, writer1 = cpu_split(proc.proc.pid)
    n = max(ops, 1)
    return {"tx_per_s": round(ops / elapsed), "declined": errors[0] if errors else 0,
            "grpc_cpu_us_per_op": round((grpc1 - grpc0) / n * 1e6, 1),
            "writer_cpu_us_per_op": round((writer1 - writer0) / n * 1e6, 1)}


def main() -> None:
    args = e2e.rounds_args(__doc__, "programs_cpu_results.json")
    rng = random.Random(11)
    numbers = list({random_number(rng) for _ in range(args.cards)})
    rows: dict[str, list] = {"batch_plain": [], "batch_5_lines_coupon_redeem": []}
    with tempfile.TemporaryDirectory() as tmp:
        proc = e2e.start_cardcore(os.path.join(tmp, "data"), os.path.join(tmp, "server.log"),
                                  ("--program", programs.PROGRAM))
        try:
            e2e.seed(proc.target, numbers)
            programs.earn_points(proc.target, numbers)
            for k in range(args.rounds):  # as bench/programs.py: the sides alternate
                gen = programs.Baskets(numbers, f"r{k}")
                for name in list(rows)[::1 if k % 2 == 0 else -1]:
                    full = name != "batch_plain"
                    payloads = (gen.batches(max(4, int(args.seconds * 30)), proc.target) if full
                                else gen.batches(max(4, int(args.seconds * 100))))
                    rows[name].append(phase(proc, payloads, args.seconds))
        finally:
            proc.stop()
    medians = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in rows.items()}
    basket, plain = medians["batch_5_lines_coupon_redeem"], medians["batch_plain"]
    ratios = {"tx_basket_vs_plain": round(basket["tx_per_s"] / plain["tx_per_s"], 2),
              "grpc_cpu_basket_minus_plain_us": round(
                  basket["grpc_cpu_us_per_op"] - plain["grpc_cpu_us_per_op"], 1),
              "writer_cpu_basket_minus_plain_us": round(
                  basket["writer_cpu_us_per_op"] - plain["writer_cpu_us_per_op"], 1)}
    with open(args.out, "w") as f:
        json.dump({"cards": len(numbers), "seconds": args.seconds, "rounds": rows,
                   "medians": medians, "ratios": ratios}, f, indent=2)
    for name, runs in rows.items():
        print(f"{name:29s} " + "  ".join(
            f"{r['tx_per_s']:>7,}/s gRPC {r['grpc_cpu_us_per_op']:>5} + writer "
            f"{r['writer_cpu_us_per_op']:>5} µs" for r in runs))
    print(", ".join(f"{k}: {v}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
