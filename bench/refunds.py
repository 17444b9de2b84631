"""Refunds and reversals through SubmitBatch against plain purchases, in one run on one server
(the money-back issue's target: >= 0.7x of the purchases' throughput):

    .venv/bin/python bench/refunds.py [--cards 20000] [--seconds 4] [--rounds 3]
                                      [--out bench/refunds_results.json]

Each round first makes the sales it will undo (plain purchases, 1,000 a batch, on random
cards; their seqs and request ids kept), then measures, the order alternating between rounds:
plain purchases; full refunds of half of those sales by seq (an operator's batches, with the
bootstrap admin's token); reversals of the other half by request id (the development
namespace the sales were made in). The figure is the median over rounds of each round's
ratio; declines are counted and shown (a ratio of declines would be no figure).
"""
from __future__ import annotations

import os
import random
import sys
import tempfile

import grpc

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import e2e  # noqa: E402  (the servers, seeding and batch runner of the end-to-end benchmark)

from cardcore.cards import random_number  # noqa: E402
from cardcore.terminal import now_us  # noqa: E402
from cardcore.v1 import card_service_pb2 as pb  # noqa: E402
from cardcore.v1 import common_pb2 as cpb  # noqa: E402

TILL = cpb.Till(store_id=1, terminal_id=1)


def sales(target: str, numbers: list[str], n: int, tag: str, rng: random.Random) -> list[tuple]:
    """``n`` plain purchases on random cards: (card number, request id, seq) of each."""
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    made = []
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.CardServiceStub(ch)
        for start in range(0, n, e2e.BATCH_OPS):
            ops = [(rng.choice(numbers), f"{tag}-sale-{start + i}")
                   for i in range(min(e2e.BATCH_OPS, n - start))]
            res = stub.SubmitBatch(pb.SubmitBatchRequest(operations=[pb.Operation(
                purchase=pb.PurchaseRequest(request_id=r, card=cpb.CardRef(card_number=num),
                                            gross_amount_minor=rng.randrange(500, 25_000),
                                            till=TILL, client_time_us=now_us()))
                for num, r in ops])).results
            assert all(x.reason == 0 for x in res), "making the sales failed"
            made.extend((num, r, x.seq) for (num, r), x in zip(ops, res))
    return made


def batches(ops: list[pb.Operation]) -> list[bytes]:
    return [pb.SubmitBatchRequest(operations=ops[k:k + e2e.BATCH_OPS]).SerializeToString()
            for k in range(0, len(ops), e2e.BATCH_OPS)]


def main() -> None:
    args = e2e.rounds_args(__doc__, "refunds_results.json")
    rng = random.Random(12)
    numbers = list({random_number(rng) for _ in range(args.cards)})
    # as many sales to undo as a round at 30,000/s could use (a round that runs out reports the
    # rate over what it sent)
    undo_each = max(2, int(args.seconds * 30)) * e2e.BATCH_OPS
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "data")
        proc = e2e.start_cardcore(data, os.path.join(tmp, "server.log"))
        try:
            e2e.seed(proc.target, numbers)
            with open(os.path.join(data, "admin.token")) as f:
                token = (("authorization", f"Bearer {f.read().strip()}"),)
            rows: dict[str, list] = {"batch_plain": [], "batch_refund": [], "batch_reversal": []}
            for k in range(args.rounds):
                made = sales(proc.target, numbers, 2 * undo_each, f"r{k}", rng)
                plain = batches([pb.Operation(purchase=pb.PurchaseRequest(
                    request_id=f"r{k}-p-{i}", card=cpb.CardRef(card_number=rng.choice(numbers)),
                    gross_amount_minor=rng.randrange(500, 25_000), till=TILL,
                    client_time_us=now_us())) for i in range(undo_each * 2)])
                refunds = batches([pb.Operation(refund=pb.RefundRequest(
                    request_id=f"r{k}-f-{i}", card=cpb.CardRef(card_number=num), original_seq=seq,
                    till=TILL, client_time_us=now_us()))
                    for i, (num, _, seq) in enumerate(made[:undo_each])])
                reversals = batches([pb.Operation(reverse=pb.ReverseRequest(
                    request_id=f"r{k}-v-{i}", card=cpb.CardRef(card_number=num),
                    original_request_id=request_id, till=TILL, client_time_us=now_us()))
                    for i, (num, request_id, _) in enumerate(made[undo_each:])])
                runs = [("batch_plain", plain, None), ("batch_refund", refunds, token),
                        ("batch_reversal", reversals, None)]
                for name, payloads, metadata in runs[::1 if k % 2 == 0 else -1]:
                    rows[name].append(e2e.measure(proc, lambda p=payloads, m=metadata: e2e.run_batches(
                        proc.target, p, args.seconds, m)))
        finally:
            log = proc.stop()
    ratios = {f"{name}_vs_plain": e2e.median_ratio(rows, name, "batch_plain")
              for name in ("batch_refund", "batch_reversal")}
    e2e.report_rounds(args.out, rows, ratios, {"cards": len(numbers), "seconds": args.seconds},
                      log)


if __name__ == "__main__":
    main()
