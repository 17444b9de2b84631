"""The member metrics' cost and speed (issue 11), in one run, on the day totals' harness
(``bench/daytotals.py``):

    .venv/bin/python bench/members.py [--cards 20000] [--seconds 4] [--rounds 3]
                                      [--members 100000] [--ops 600000] [--days 365]
                                      [--out bench/members_results.json]

1. SubmitBatch of 1,000 purchases on two servers over the same seeded cards, one keeping the
   member metrics and one started with ``--no-member-metrics`` (both keep the day totals),
   alternating which goes first each round; the ratio is with / without (target >= 0.9x).
2. A ledger of ``--members`` cards and ``--ops`` operations (openings, top-ups, purchases over
   ``--days`` business days, built in-process without fsync), then the server on it:
   GetMemberReport of the last month, of the last twelve (with churn against the twelve before),
   and the dormant members as of the last day, every page of 10,000 (the client's time per call,
   median of 5, over loopback).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import daytotals as harness  # noqa: E402  (bench/daytotals.py: cost, build, timed)
import e2e  # noqa: E402

from cardcore import daytotals  # noqa: E402
from cardcore import members  # noqa: E402
from cardcore.ledger import Ledger  # noqa: E402
from cardcore.v1 import admin_service_pb2 as apb  # noqa: E402
from cardcore.v1 import admin_service_pb2_grpc as apb_grpc  # noqa: E402


def fill_and_check(path: str) -> dict:
    """The fill of a ledger made before the member metrics (its first open) and verify's check
    of them, timed on the built ledger (the fill writes what was there)."""
    ledger = Ledger(path, sync=False)
    try:
        with ledger.env.begin(write=True) as txn:
            t0 = time.perf_counter()
            members.fill(txn, ledger)
            t1 = time.perf_counter()
            problems = members.check(txn, ledger)
            t2 = time.perf_counter()
    finally:
        ledger.close()
    assert not problems, problems
    return {"fill_s": round(t1 - t0, 1), "check_s": round(t2 - t1, 1)}


def speed(args) -> dict:
    """Part 2: member reports and the dormant list over a large ledger."""
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        os.makedirs(data)
        built = harness.build(os.path.join(data, "ledger"), args.ops, 100, args.days,
                              cards=args.members)
        built.update(fill_and_check(os.path.join(data, "ledger")))
        proc = e2e.start_cardcore(data, os.path.join(tmp, "server.log"), (
            "--request-window-hours", str(harness.WINDOW_S // 3600)))
        try:
            with open(os.path.join(data, "admin.token")) as f:
                metadata = (("authorization", f"Bearer {f.read().strip()}"),)
            last = daytotals.business_day(built["last_ts_us"], 480, 4)  # the default program's
            month = members.month_of_day(last)
            channel = grpc.insecure_channel(proc.target, options=[
                ("grpc.max_receive_message_length", 64 << 20)])
            stub = apb_grpc.AdminServiceStub(channel)

            def report(months: int, limit: int = 0, token: bytes = b""):
                return stub.GetMemberReport(apb.GetMemberReportRequest(
                    from_month=members.month_text(month - months + 1),
                    to_month=members.month_text(month), as_of_day=daytotals.date_of_day(last),
                    dormant_limit=limit, page_token=token), metadata=metadata)

            def dormant_list() -> int:
                listed, token = 0, b""
                while True:
                    r = report(1, members.DORMANT_PAGE_MAX, token)
                    listed += len(r.dormant)
                    token = r.next_page_token
                    if not token:
                        return listed

            year = report(12)
            out = {**built, "members": year.members, "active_last_12_months": year.active_members,
                   "churned_last_12_months": year.churned_members,
                   "dormant_members": year.dormant_members,
                   "report_1_month_ms": harness.timed(lambda: report(1)),
                   "report_12_months_ms": harness.timed(lambda: report(12)),
                   "dormant_list_all_pages_ms": harness.timed(dormant_list)}
            assert dormant_list() == year.dormant_members
            assert year.members == args.members
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
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--ops", type=int, default=600_000)
    ap.add_argument("--days", type=int, default=365)
    ap.add_argument("--skip-cost", action="store_true", help="part 2 only")
    ap.add_argument("--skip-speed", action="store_true", help="part 1 only")
    ap.add_argument("--out", default=os.path.join(HERE, "members_results.json"))
    args = ap.parse_args()
    results: dict = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                     "args": vars(args)}
    if not args.skip_cost:
        rows, ratios = harness.cost(args, ("--no-member-metrics",), "member_metrics")
        results.update(rounds=rows, ratios=ratios)
        for name, runs in rows.items():
            print(f"{name:24s} " + "  ".join(f"{r['tx_per_s']:>8,}/s "
                                             f"{r['server_cpu_us_per_op']:>7} µs" for r in runs))
        print(f"with / without member metrics: {ratios['with_vs_without']:.2f}x throughput, "
              f"{ratios['cpu_without_vs_with']:.2f}x server CPU per operation (without / with)")
    if not args.skip_speed:
        t0 = time.perf_counter()
        results["large_ledger"] = big = speed(args)
        print(f"built {big['operations']:,} operations on {big['members']:,} members in "
              f"{big['build_s']} s; member report: 1 month {big['report_1_month_ms']} ms, "
              f"12 months {big['report_12_months_ms']} ms ({big['active_last_12_months']:,} "
              f"active); dormant list ({big['dormant_members']:,} members, pages of "
              f"{members.DORMANT_PAGE_MAX:,}) {big['dormant_list_all_pages_ms']} ms; fill "
              f"{big['fill_s']} s, verify's check {big['check_s']} s; "
              f"{time.perf_counter() - t0:.0f} s in all")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
