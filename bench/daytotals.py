"""The daily close's cost and speed (issue 11), in one run:

    .venv/bin/python bench/daytotals.py [--cards 20000] [--seconds 4] [--rounds 3]
                                        [--ops 200000] [--stores 100] [--days 365]
                                        [--out bench/daytotals_results.json]

1. SubmitBatch of 1,000 purchases (4 callers, random stores 1..199) on two servers over the same
   seeded cards, one keeping the day totals and one started with ``--no-day-totals``,
   alternating which goes first each round; the ratio is with / without (target >= 0.9x).
2. A ledger of ``--ops`` operations (top-ups and purchases on 10,000 cards, across ``--stores``
   stores, spread over ``--days`` business days: the writer's own groups, an hour apart, built
   in-process without fsync), then the server on it: CloseDay of one store's day, and the
   chain's report over the whole year by day and by month (the client's time per call, median
   of 5, over loopback).
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

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402  (the servers and runners of the end-to-end benchmark)

from cardcore import cards as card_ids  # noqa: E402
from cardcore import daytotals  # noqa: E402
from cardcore import layout as L  # noqa: E402
from cardcore.cards import random_number  # noqa: E402
from cardcore.idempotency import PendingOp, request_key  # noqa: E402
from cardcore.ledger import Ledger  # noqa: E402
from cardcore.v1 import admin_service_pb2 as apb  # noqa: E402
from cardcore.v1 import admin_service_pb2_grpc as apb_grpc  # noqa: E402

HOUR_US = 3_600_000_000
BUILD_CARDS = 10_000
CALLS = 5
# The built ledger's clock runs up to ``--days`` ahead of the real one: request records kept long
# enough that the server's own first requests (its chain admin) are not too old for it.
WINDOW_S = 100 * 365 * 24 * 3600
KEY = bytes(32)  # card ids of the built ledger: its own key (the server never looks them up)


def cost(args, flags: tuple[str, ...] = ("--no-day-totals",),
         what: str = "day_totals") -> tuple[dict, dict]:
    """Part 1: SubmitBatch with and without the day totals (or what the server's ``flags``
    leave out: the member metrics' benchmark's too, or both: ``--all-aggregates``), alternating
    rounds."""
    rng = random.Random(11)
    numbers = [random_number(rng) for _ in range(args.cards)]
    with_, without = f"with_{what}", f"without_{what}"
    rows: dict[str, list] = {with_: [], without: []}
    with tempfile.TemporaryDirectory() as tmp:
        procs = {}
        try:
            for name, extra in ((with_, ()), (without, flags)):
                procs[name] = e2e.start_cardcore(os.path.join(tmp, name),
                                                 os.path.join(tmp, f"{name}.log"), extra)
                e2e.seed(procs[name].target, numbers)
            for k in range(args.rounds):
                for name in list(rows)[::1 if k % 2 == 0 else -1]:
                    proc = procs[name]
                    payloads = e2e.Requests(numbers, f"{name}-{k}").batches(
                        int(args.seconds * 100) + 10)
                    rows[name].append(e2e.measure(proc, lambda p=payloads, t=proc.target:
                                                  e2e.run_batches(t, p, args.seconds)))
        finally:
            logs = {name: proc.stop() for name, proc in procs.items()}
    for log in logs.values():
        if "Traceback" in log:
            print(log[-3000:], file=sys.stderr)
    cpu = {name: statistics.median(r["server_cpu_us_per_op"] for r in runs)
           for name, runs in rows.items()}
    return rows, {"with_vs_without": e2e.median_ratio(rows, with_, without),
                  "cpu_without_vs_with": cpu[without] / cpu[with_]}


def build(path: str, ops: int, stores: int, days: int, cards: int = BUILD_CARDS) -> dict:
    """A ledger of ``ops`` top-ups and purchases on ``cards`` cards over ``days`` days, ``stores``
    stores: groups an hour apart (the most a group's time moves), applied in-process without
    fsync."""
    rng = random.Random(5)
    ledger = Ledger(path, sync=False, initial_request_window_s=WINDOW_S)
    caller = (L.CALLER_DEVELOPMENT, 0)
    ids = [card_ids.card_id(KEY, random_number(rng)) for _ in range(cards)]
    t0 = time.perf_counter()
    ts = first_ts = time.time_ns() // 1000
    n = 0
    for start in range(0, cards, 1000):
        ts += 1000
        group = []
        for k, cid in enumerate(ids[start:start + 1000]):
            n += 2
            key = request_key(*caller, f"o{start + k}".encode())
            group.append(PendingOp.build(key, L.OP_OPEN, cid, profile=b"{}", client_time_us=ts,
                                         home_store_id=rng.randrange(1, stores + 1)))
            key = request_key(*caller, f"t{start + k}".encode())
            group.append(PendingOp.build(key, L.OP_TOP_UP, cid, 10**10, client_time_us=ts,
                                         store_id=rng.randrange(1, stores + 1)))
        ledger.apply_group(group, ts)
    groups = days * 24
    per_group = max(1, (ops - 2 * cards) // groups)
    for g in range(groups):
        ts += HOUR_US
        group = []
        for _ in range(per_group):
            n += 1
            kind = L.OP_PURCHASE if rng.random() < 0.8 else L.OP_TOP_UP
            key = request_key(*caller, f"b{n}".encode())
            group.append(PendingOp.build(
                key, kind, rng.choice(ids), rng.randrange(100, 20_000),
                store_id=rng.randrange(1, stores + 1), staff_id=rng.randrange(0, 50),
                pin_flags=L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET if kind == L.OP_PURCHASE else 0,
                client_time_us=ts))
        declined = sum(o.reason != L.R_OK for o in ledger.apply_group(group, ts))
        assert not declined, "the built ledger's operations must apply"
    elapsed = time.perf_counter() - t0
    entries = ledger.next_seq - 1
    ledger.close()
    return {"operations": n, "journal_entries": entries, "build_s": round(elapsed, 1),
            "build_ops_per_s": round(n / elapsed), "first_ts_us": first_ts, "last_ts_us": ts}


def timed(fn) -> float:
    samples = []
    for _ in range(CALLS):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return round(statistics.median(samples) * 1000, 2)


def speed(args) -> dict:
    """Part 2: CloseDay and the one-year chain report over a large ledger."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        built = build(os.path.join(data, "ledger"), args.ops, args.stores, args.days)
        proc = e2e.start_cardcore(data, os.path.join(tmp, "server.log"),
                                  ("--request-window-hours", str(WINDOW_S // 3600)))
        try:
            with open(os.path.join(data, "admin.token")) as f:
                metadata = (("authorization", f"Bearer {f.read().strip()}"),)
            first, last = (daytotals.business_day(built[k], 480, 4)
                           for k in ("first_ts_us", "last_ts_us"))  # (the default program's)
            channel = grpc.insecure_channel(proc.target, options=[
                ("grpc.max_receive_message_length", 64 << 20)])
            stub = apb_grpc.AdminServiceStub(channel)
            day = first + args.days // 2
            closes = []

            def close_day():
                closes.append(stub.CloseDay(apb.CloseDayRequest(
                    request_id=f"close-{len(closes)}", client_time_us=time.time_ns() // 1000,
                    store_id=args.stores // 2, business_day=daytotals.date_of_day(day)),
                    metadata=metadata))

            def chain_report(by):
                return stub.GetReport(apb.GetReportRequest(
                    chain=True, from_day=daytotals.date_of_day(first),
                    to_day=daytotals.date_of_day(last), granularity=by), metadata=metadata)

            out = {**built, "close_day_ms": timed(close_day),
                   "chain_year_report_by_day_ms": timed(lambda: chain_report(1)),
                   "chain_year_report_by_month_ms": timed(lambda: chain_report(2))}
            total = chain_report(2).total
            out["report_entries"] = total.entries
            out["close_day_entries"] = closes[0].figures.entries
            assert all(c.figures == closes[0].figures for c in closes)
            assert total.entries == built["journal_entries"] + len(closes[:1]) + 1, \
                "the report covers every entry (and the close, and the server's chain admin)"
            channel.close()
        finally:
            log = proc.stop()
        if "Traceback" in log:
            print(log[-3000:], file=sys.stderr)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cards", type=int, default=20_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ops", type=int, default=200_000)
    ap.add_argument("--stores", type=int, default=100)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--skip-cost", action="store_true", help="part 2 only")
    ap.add_argument("--skip-speed", action="store_true", help="part 1 only")
    ap.add_argument("--all-aggregates", action="store_true",
                    help="part 1 with and without every aggregate the writer keeps (the day "
                         "totals and the member metrics together)")
    ap.add_argument("--out", default=os.path.join(HERE, "daytotals_results.json"))
    args = ap.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "args": vars(args)}
    if not args.skip_cost:
        rows, ratios = (cost(args, ("--no-day-totals", "--no-member-metrics"), "aggregates")
                        if args.all_aggregates else cost(args))
        results.update(rounds=rows, ratios=ratios)
        for name, runs in rows.items():
            print(f"{name:20s} " + "  ".join(f"{r['tx_per_s']:>8,}/s "
                                             f"{r['server_cpu_us_per_op']:>7} µs" for r in runs))
        what = "every aggregate" if args.all_aggregates else "day totals"
        print(f"with / without {what}: {ratios['with_vs_without']:.2f}x throughput, "
              f"{ratios['cpu_without_vs_with']:.2f}x server CPU per operation (without / with)")
    if args.skip_speed:
        _write(args.out, results)
        return
    results["large_ledger"] = big = speed(args)
    print(f"built {big['operations']:,} operations ({big['journal_entries']:,} entries) in "
          f"{big['build_s']} s ({big['build_ops_per_s']:,}/s, in-process, no fsync); "
          f"CloseDay {big['close_day_ms']} ms; one-year chain report: by day "
          f"{big['chain_year_report_by_day_ms']} ms, by month "
          f"{big['chain_year_report_by_month_ms']} ms ({big['report_entries']:,} entries)")
    _write(args.out, results)


def _write(path: str, results: dict) -> None:
    with open(path, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
