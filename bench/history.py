"""A card's history: the first page of ListTransactions for a card with 100,000 entries against
one with 10, in one run on one server (the money-back issue asks for p50/p99; the index makes
the first page independent of the history's length):

    .venv/bin/python bench/history.py [--entries 100000] [--seconds 4] [--rounds 3]
                                      [--out bench/history_results.json]

Both cards are opened and funded, then the long one gets ``--entries`` purchases through
SubmitBatch. Each round asks the first page (10 entries: all the short card has) of each card, unary, 16 in flight,
alternating which goes first; p50 and p99 are the client's, per call.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402  (the servers and runners of the end-to-end benchmark)

from cardcore.cards import random_number  # noqa: E402
from cardcore.terminal import now_us  # noqa: E402
from cardcore.v1 import card_service_pb2 as pb  # noqa: E402
from cardcore.v1 import common_pb2 as cpb  # noqa: E402

IN_FLIGHT = 16


def fill(target: str, number: str, entries: int) -> None:
    """``entries`` purchases of 0.01 on card ``number``, 1,000 a batch."""
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.CardServiceStub(ch)
        for start in range(0, entries, e2e.BATCH_OPS):
            res = stub.SubmitBatch(pb.SubmitBatchRequest(operations=[pb.Operation(
                purchase=pb.PurchaseRequest(request_id=f"{number}-{start + i}",
                                            card=cpb.CardRef(card_number=number),
                                            gross_amount_minor=1, client_time_us=now_us()))
                for i in range(min(e2e.BATCH_OPS, entries - start))])).results
            assert all(r.reason == 0 for r in res), "filling the history failed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--entries", type=int, default=100_000)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "history_results.json"))
    args = ap.parse_args()
    rng = random.Random(13)
    long_card, short_card = random_number(rng), random_number(rng)
    with tempfile.TemporaryDirectory() as tmp:
        proc = e2e.start_cardcore(os.path.join(tmp, "data"), os.path.join(tmp, "server.log"))
        try:
            e2e.seed(proc.target, [long_card, short_card])
            fill(proc.target, long_card, args.entries)
            fill(proc.target, short_card, 8)  # + its opening and top-up: 10 entries
            asks = {name: pb.ListTransactionsRequest(card=cpb.CardRef(card_number=number),
                                                     page_size=10).SerializeToString()
                    for name, number in (("first_page_100k", long_card),
                                         ("first_page_10", short_card))}
            rows: dict[str, list] = {name: [] for name in asks}
            for k in range(args.rounds):
                for name, payload in list(asks.items())[::1 if k % 2 == 0 else -1]:
                    payloads = [payload] * int(args.seconds * 20_000)
                    rows[name].append(e2e.measure(proc, lambda p=payloads: e2e.run_unary(
                        proc.target, p, IN_FLIGHT, args.seconds, "ListTransactions")))
        finally:
            log = proc.stop()
    ratios = {"first_page_100k_vs_10": e2e.median_ratio(rows, "first_page_100k", "first_page_10")}
    e2e.report_rounds(args.out, rows, ratios, {"entries": args.entries, "seconds": args.seconds},
                      log)
    for name, runs in rows.items():
        print(f"{name}: p50 " + " / ".join(f"{r['p50_ms']} ms" for r in runs)
              + ", p99 " + " / ".join(f"{r['p99_ms']} ms" for r in runs))


if __name__ == "__main__":
    main()
