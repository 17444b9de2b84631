"""How long an operation on two cards of two card shards takes: a referral to pay its referrer
(docs/cluster.md, "Two cards on two card shards: the outbox"), a replacement to be answered
(docs/cluster.md, "A replacement by a card of another card shard: the number forwarded").

``make cluster ADMIN_SHARD=1``'s cluster (three nats-server nodes on loopback, shards 0, 1 and
2 with three replicas each, shard 1 the admin shard, one front over them, development mode) in
a folder of its own: a referral program is loaded, then each pair opens a referrer and then a
card on its referral, and reads the referrer through the front until its points have grown.
The time from the second opening's answer to that read is what a member waits to see the
bonus: the referrer on another card shard (the outbox: a delivery and a removal, started by
the front as soon as the opening is answered) against the referrer on the new card's shard
(paid in the opening's own group). Then each replacement opens and tops up a card on shard 0
and replaces it (the chain admin, at a store's desk) by a new number whose slot routes to shard
2 (its number forwarded first, then the replacement on shard 0) or to shard 0 (one group): the
time from the request to its answer, and to the first read of the new card through the front.
Then each split-tender basket, a 15.00 sale, is paid by two cards: one of shard 0 holding 10.00
pays first (partially), then a second card pays the rest, of shard 2 (its payment marked) or of
shard 0. The time of each payment to its answer (the first payment's includes the look at every
card shard's stream end). Functional figures on one shared 2-core machine.

    .venv/bin/python bench/outbox.py --pairs 20 --out bench/outbox_results.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from cardcore.cards import card_id, random_number
from cardcore.keyring import Keyring
from cardcore.program import DEFAULT_PROGRAM_TOML
from cardcore.shards import slot_of, spread
from cardcore.terminal import now_us
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import admin_service_pb2_grpc as apb_grpc
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import card_service_pb2_grpc as pb_grpc
from cardcore.v1 import common_pb2 as cpb

CARD_SHARDS = (0, 2)  # make cluster ADMIN_SHARD=1's (the front's table: spread over them)
POINTS = 100          # the program's referral_points here
TARGET = "127.0.0.1:50061"
WAIT_S = 30.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=20,
                    help="referrals, and replacements, of each kind (default 20)")
    ap.add_argument("--out", default=None, help="write the figures here as JSON")
    args = ap.parse_args()
    folder = tempfile.mkdtemp(prefix="cardcore-outbox-")
    proc = subprocess.Popen([sys.executable, "-m", "cardcore.server.devcluster", "--data-dir",
                             folder, "--shards", "3", "--admin-shard", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        for line in iter(proc.stdout.readline, b""):
            if line.startswith(b"try it"):
                break
        else:
            raise SystemExit(f"the cluster did not start: see {folder}")
        figures = measure(folder, args.pairs)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    result = {"bench": "outbox", "pairs": args.pairs, "machine": f"{os.cpu_count()} cores, "
              f"{platform.platform()}", "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              **figures}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def measure(folder: str, pairs: int) -> dict:
    with open(os.path.join(folder, "front", "admin.token")) as f:
        metadata = (("authorization", f"Bearer {f.read().strip()}"),)
    index_key = Keyring.load_or_create(os.path.join(folder, "keyring.json"), folder).index_key
    table = spread(list(CARD_SHARDS))
    channel = grpc.insecure_channel(TARGET)
    cards = pb_grpc.CardServiceStub(channel)
    admin = apb_grpc.AdminServiceStub(channel)
    admin.LoadProgram(apb.LoadProgramRequest(
        request_id=f"bench-{random.getrandbits(64)}", client_time_us=now_us(),
        document=f"referral_points = {POINTS}\n" + DEFAULT_PROGRAM_TOML), metadata=metadata)

    def number_on(shard: int) -> str:
        while True:
            number = random_number(random)
            if table[slot_of(card_id(index_key, number))] == shard:
                return number

    def open_card(number: str, referrer: str = "") -> None:
        request_id = f"bench-{random.getrandbits(64)}"
        answer = cards.OpenCard(pb.OpenCardRequest(
            request_id=request_id, client_time_us=now_us(), card=cpb.CardRef(card_number=number),
            referrer_card_number=referrer, till=cpb.Till(store_id=1, terminal_id=1)))
        assert answer.reason == cpb.REASON_OK, answer

    def points(number: str) -> int:
        return cards.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_number=number))).balance.points

    out = {}
    for kind, new_shard in (("referrer_on_another_card_shard", CARD_SHARDS[1]),
                            ("referrer_on_the_same_card_shard", CARD_SHARDS[0])):
        waits_ms = []
        for _ in range(pairs):
            referrer = number_on(CARD_SHARDS[0])
            open_card(referrer)
            before = points(referrer)
            open_card(number_on(new_shard), referrer)
            start = time.monotonic()
            while points(referrer) != before + POINTS:
                if time.monotonic() - start > WAIT_S:
                    raise SystemExit(f"{kind}: no bonus within {WAIT_S} s")
                time.sleep(0.002)
            waits_ms.append((time.monotonic() - start) * 1000)
        out[kind] = spread_of(waits_ms)

    def replaced_ms(old: str, new: str) -> tuple[float, float]:
        request_id = f"bench-{random.getrandbits(64)}"
        start = time.monotonic()
        answer = cards.ReplaceCard(pb.ReplaceCardRequest(
            request_id=request_id, client_time_us=now_us(), card=cpb.CardRef(card_number=old),
            new_card=cpb.CardRef(card_number=new), till=cpb.Till(store_id=1)),
            metadata=metadata)
        answered = time.monotonic()
        assert answer.reason == cpb.REASON_OK, answer
        read = cards.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_number=new)))
        assert read.balance.principal_minor == 1_000, read
        return (answered - start) * 1000, (time.monotonic() - start) * 1000

    for kind, new_shard in (("replacement_by_a_card_of_another_card_shard", CARD_SHARDS[1]),
                            ("replacement_by_a_card_of_the_same_card_shard", CARD_SHARDS[0])):
        answers_ms, reads_ms = [], []
        for _ in range(pairs):
            old = number_on(CARD_SHARDS[0])
            open_card(old)
            top_up = cards.TopUp(pb.TopUpRequest(
                request_id=f"bench-{random.getrandbits(64)}", client_time_us=now_us(),
                card=cpb.CardRef(card_number=old), amount_minor=1_000,
                till=cpb.Till(store_id=1, terminal_id=1)))
            assert top_up.reason == cpb.REASON_OK, top_up
            answer_ms, read_ms = replaced_ms(old, number_on(new_shard))
            answers_ms.append(answer_ms)
            reads_ms.append(read_ms)
        out[kind] = {"answered": spread_of(answers_ms), "new_card_read": spread_of(reads_ms)}

    def pay_ms(number: str, gross_minor: int, basket_id: str) -> float:
        request_id = f"bench-{random.getrandbits(64)}"
        start = time.monotonic()
        answer = cards.Purchase(pb.PurchaseRequest(
            request_id=request_id, client_time_us=now_us(), card=cpb.CardRef(card_number=number),
            gross_amount_minor=gross_minor, basket_id=basket_id, allow_partial=True,
            till=cpb.Till(store_id=1, terminal_id=1)))
        assert answer.reason == cpb.REASON_OK, answer
        return (time.monotonic() - start) * 1000

    for kind, second_shard in (("basket_paid_on_two_card_shards", CARD_SHARDS[1]),
                               ("basket_paid_on_one_card_shard", CARD_SHARDS[0])):
        firsts_ms, seconds_ms = [], []
        for _ in range(pairs):
            payers = [number_on(CARD_SHARDS[0]), number_on(second_shard)]
            for number in payers:
                open_card(number)
                assert cards.TopUp(pb.TopUpRequest(
                    request_id=f"bench-{random.getrandbits(64)}", client_time_us=now_us(),
                    card=cpb.CardRef(card_number=number), amount_minor=1_000,
                    till=cpb.Till(store_id=1, terminal_id=1))).reason == cpb.REASON_OK
            basket_id = f"bench-{random.getrandbits(64)}"
            firsts_ms.append(pay_ms(payers[0], 1_500, basket_id))
            seconds_ms.append(pay_ms(payers[1], 500, basket_id))
        out[kind] = {"first_payment": spread_of(firsts_ms), "second_payment": spread_of(seconds_ms)}
    channel.close()
    return out


def spread_of(times_ms: list[float]) -> dict:
    times_ms = sorted(times_ms)
    return {"p50_ms": round(statistics.median(times_ms), 1),
            "p90_ms": round(times_ms[max(0, int(0.9 * len(times_ms)) - 1)], 1),
            "max_ms": round(times_ms[-1], 1)}


if __name__ == "__main__":
    sys.exit(main())
