"""Card programs' cost, measured as ratios in one run on one server (the supermarket program):

    .venv/bin/python bench/programs.py [--cards 20000] [--seconds 4] [--rounds 3]
                                       [--out bench/programs_results.json] [--server-arg ARG]

- SubmitBatch of 1,000 purchases, 4 callers: a basket of 5 lines (3 categories, tobacco among
  them) with a coupon ("fresh 10 % off", bought with points before the round, one per
  purchase) offering points for redemption, against a plain purchase without lines (one line
  of the default category); the issue's target is >= 0.7x.
- Unary Quote of the same 5-line basket against unary GetCard (no PIN, development mode), 16
  in flight, on a tenth of the cards that never buy coupons (a card's used coupons grow its
  GetCard and the coupons a Quote tries; the baskets' cards gain six a round); target >= 0.9x.
Rounds alternate the two sides of each pair, so drift on a shared machine hits both; the
figure reported is the median over rounds of each round's ratio.
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

PROGRAM = os.path.join(os.path.dirname(HERE), "examples", "programs", "supermarket.toml")
FRESH, GROCERY, TOBACCO = 1, 2, 3
IN_FLIGHT = 16


class Baskets:
    """Serialized requests on random cards, unique request ids."""

    def __init__(self, numbers: list[str], tag: str):
        self.numbers, self.tag = numbers, tag
        self.rng = random.Random(tag)
        self.i = 0

    def lines(self) -> list[pb.PurchaseLine]:
        r = self.rng
        return [pb.PurchaseLine(category_code=c, amount_minor=r.randrange(100, 5_000), quantity=1,
                                sku=f"SKU-{r.randrange(10**6)}")
                for c in (FRESH, GROCERY, FRESH, GROCERY, TOBACCO)]

    def purchase(self, number: str, coupon: int = 0) -> pb.PurchaseRequest:
        """A plain purchase, or (``coupon``: its serial) the full basket."""
        self.i += 1
        card = cpb.CardRef(card_number=number)
        till = cpb.Till(store_id=self.rng.randrange(1, 200), terminal_id=self.rng.randrange(1, 5000))
        if coupon:
            return pb.PurchaseRequest(request_id=f"{self.tag}-{self.i}", card=card, till=till,
                                      lines=self.lines(), redeem_points=500,
                                      coupon_serial=coupon, client_time_us=now_us())
        return pb.PurchaseRequest(request_id=f"{self.tag}-{self.i}", card=card, till=till,
                                  gross_amount_minor=self.rng.randrange(500, 25_000),
                                  client_time_us=now_us())

    def batches(self, n: int, target: str | None = None) -> list[bytes]:
        """``n`` batches of plain purchases; of full baskets when ``target`` is given (each
        with its own coupon, bought there first)."""
        numbers = [self.rng.choice(self.numbers) for _ in range(n * e2e.BATCH_OPS)]
        serials = buy_coupons(target, numbers, self.tag) if target else [0] * len(numbers)
        ops = [pb.Operation(purchase=self.purchase(num, s)) for num, s in zip(numbers, serials)]
        return [pb.SubmitBatchRequest(operations=ops[k:k + e2e.BATCH_OPS]).SerializeToString()
                for k in range(0, len(ops), e2e.BATCH_OPS)]

    def quotes(self, n: int) -> list[bytes]:
        return [pb.QuoteRequest(card=cpb.CardRef(card_number=self.rng.choice(self.numbers)),
                                till=cpb.Till(store_id=1, terminal_id=1), lines=self.lines(),
                                redeem_points=500).SerializeToString() for _ in range(n)]

    def inquiries(self, n: int) -> list[bytes]:
        return [pb.GetCardRequest(card=cpb.CardRef(card_number=self.rng.choice(self.numbers)))
                .SerializeToString() for _ in range(n)]


def buy_coupons(target: str, numbers: list[str], tag: str) -> list[int]:
    """One "fresh 10 % off" coupon (id 2) for each of ``numbers``, bought with points: the
    serials, in order."""
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    serials = []
    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.CardServiceStub(ch)
        for start in range(0, len(numbers), e2e.SEED_BATCH):
            ops = [pb.Operation(issue_coupon=pb.IssueCouponRequest(
                request_id=f"{tag}-coupon-{start + i}", card=cpb.CardRef(card_number=n),
                coupon_id=2, pay_with_points=True, till=cpb.Till(store_id=1, terminal_id=1),
                client_time_us=now_us()))
                for i, n in enumerate(numbers[start:start + e2e.SEED_BATCH])]
            res = stub.SubmitBatch(pb.SubmitBatchRequest(operations=ops)).results
            assert all(r.reason == 0 for r in res), "buying coupons failed"
            serials.extend(r.coupon_serial for r in res)
    return serials


def earn_points(target: str, numbers: list[str]) -> None:
    """Every card earns points to redeem: one large purchase each."""
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.CardServiceStub(ch)
        for start in range(0, len(numbers), e2e.SEED_BATCH):
            ops = [pb.Operation(purchase=pb.PurchaseRequest(
                request_id=f"seed-p-{start + i}", card=cpb.CardRef(card_number=n),
                gross_amount_minor=10**9, client_time_us=now_us()))
                for i, n in enumerate(numbers[start:start + e2e.SEED_BATCH])]
            res = stub.SubmitBatch(pb.SubmitBatchRequest(operations=ops)).results
            assert all(r.reason == 0 for r in res), "earning points failed"


def main() -> None:
    args = e2e.rounds_args(__doc__, "programs_results.json", server_args=True)
    rng = random.Random(11)
    numbers = list({random_number(rng) for _ in range(args.cards)})
    with tempfile.TemporaryDirectory() as tmp:
        proc = e2e.start_cardcore(os.path.join(tmp, "data"), os.path.join(tmp, "server.log"),
                                  ("--program", PROGRAM, *args.server_arg))
        try:
            e2e.seed(proc.target, numbers)
            earn_points(proc.target, numbers)
            plain_batches = max(4, int(args.seconds * 100))  # more than a round can send
            # full baskets each need a coupon: as many as a round at 30,000/s could use (if it
            # runs out first, the rate is still the rate over what it sent)
            full_batches = max(4, int(args.seconds * 30))
            rows: dict[str, list] = {"batch_plain": [], "batch_5_lines_coupon_redeem": [],
                                     "get_card": [], "quote": []}
            for k in range(args.rounds):
                gen = Baskets(numbers[len(numbers) // 10:], f"r{k}")
                ask = Baskets(numbers[:len(numbers) // 10], f"q{k}")
                for name, full in (("batch_plain", False), ("batch_5_lines_coupon_redeem", True))[::1 if k % 2 == 0 else -1]:
                    payloads = (gen.batches(full_batches, proc.target) if full
                                else gen.batches(plain_batches))
                    rows[name].append(e2e.measure(proc, lambda p=payloads: e2e.run_batches(
                        proc.target, p, args.seconds)))
                for name, method, make in (("get_card", "GetCard", ask.inquiries),
                                           ("quote", "Quote", ask.quotes))[::1 if k % 2 == 0 else -1]:
                    payloads = make(int(args.seconds * 6000))
                    rows[name].append(e2e.measure(proc, lambda p=payloads, m=method: e2e.run_unary(
                        proc.target, p, IN_FLIGHT, args.seconds, m)))
        finally:
            log = proc.stop()
    ratios = {"batch_5_lines_coupon_redeem_vs_plain": e2e.median_ratio(
        rows, "batch_5_lines_coupon_redeem", "batch_plain"),
        "quote_vs_get_card": e2e.median_ratio(rows, "quote", "get_card")}
    e2e.report_rounds(args.out, rows, ratios, {"cards": len(numbers), "seconds": args.seconds,
                                               "server_args": args.server_arg}, log)


if __name__ == "__main__":
    main()
