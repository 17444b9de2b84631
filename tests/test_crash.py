"""Kill -9 the server under load, restart on the same folder: nothing acknowledged is lost."""
from __future__ import annotations

import random
import threading
import time

import grpc
import pytest

from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, failure_of, new_card_number, sent_at, stream_top_ups, verify

ROUNDS = 4
STREAMS = 3


def test_kill_9_at_random_moments_loses_nothing_acknowledged(start_server, tmp_path):
    rng = random.Random(20261123)
    data_dir = str(tmp_path / "crash")
    server = start_server(data_dir=data_dir)
    number = new_card_number()
    Client(server.stub).open(number, request_id="crash-open")
    acknowledged: set[str] = set()
    sent: list[str] = []
    lock = threading.Lock()

    for rnd in range(ROUNDS):
        stop = threading.Event()

        threads = [threading.Thread(target=stream_top_ups, args=(
            server.target, number, f"r{rnd}-s{s}", stop, lock, sent, acknowledged))
            for s in range(STREAMS)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.2))  # a random moment under load
        server.kill()
        stop.set()
        for t in threads:
            t.join(30)
        server = start_server(data_dir=data_dir)
        report = verify(data_dir)
        assert report["ok"], report["problems"]
        # Every acknowledged request is there: retried with its id, it is a replay, not a new entry.
        with lock:
            mine = sorted(i for i in acknowledged if i.startswith(f"r{rnd}-"))
        replies = retry(server, number, mine)
        assert all(r.reason == cpb.REASON_OK and r.replayed for r in replies), f"round {rnd} lost some"
        again = verify(data_dir)
        assert again["journal_entries"] == report["journal_entries"]
        # Exactly once: one fen per applied top-up, one journal entry each (after the opening).
        assert Client(server.stub).card(number).balance.principal_minor == report["card_entries"] - 1

    # Clients that retry every request they ever sent, with the same ids, converge: what was lost
    # in flight is applied now, nothing is applied twice, and the ledger still verifies.
    retried = retry(server, number, sent)
    assert all(r.reason == cpb.REASON_OK for r in retried)
    assert {r.request_id for r in retried if r.replayed} >= acknowledged
    report = verify(data_dir)
    assert report["ok"] and report["card_entries"] - 1 == len(set(sent))
    assert Client(server.stub).card(number).balance.principal_minor == len(set(sent))
    assert len(acknowledged) > 100  # the load was real


def retry(server, number: str, request_ids: list[str]) -> list:
    results = []
    for start in range(0, len(request_ids), 10_000):
        results += server.stub.SubmitBatch(pb.SubmitBatchRequest(operations=[
            pb.Operation(top_up=pb.TopUpRequest(client_time_us=sent_at(i), request_id=i, card=cpb.CardRef(card_number=number),
                                                amount_minor=1))
            for i in request_ids[start:start + 10_000]])).results
    return results


def pb_stub(channel):
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    return pb_grpc.CardServiceStub(channel)


def test_kill_9_under_pin_swipes_keeps_every_ksn_and_pin_try(start_server, tmp_path):
    """Terminals swiping with DUKPT and PINs, killed at random moments: every acknowledged
    purchase is there once, every acknowledged wrong PIN counted, no KSN can be used again,
    and a terminal that re-sends what it lost (same request_id, a fresh KSN) converges."""
    from conftest import Admin, journal_entries, rid

    from cardcore import layout as L

    rng = random.Random(7)
    data_dir = str(tmp_path / "crash-pin")
    server = start_server("--failures-per-minute", "1000000", data_dir=data_dir)
    admin = Admin(server.channel, server.admin_token)
    terminals = [admin.enroll(40 + i, 1) for i in range(2)]
    spend, guess = new_card_number(), new_card_number()
    server.stub.OpenCard(terminals[0].open_card(rid(), spend, "482916"))
    server.stub.TopUp(terminals[0].top_up(rid(), spend, 10**9))
    server.stub.OpenCard(terminals[0].open_card(rid(), guess, "482916"))
    acked: dict[str, pb.PurchaseRequest] = {}
    sent: dict[str, tuple[int, bool]] = {}  # request_id -> (the terminal that sent it, wrong PIN)
    wrong_acked = 0
    lock = threading.Lock()

    for rnd in range(3):
        stop = threading.Event()

        def load(k: int, target: str = server.target, stop: threading.Event = stop) -> None:
            nonlocal wrong_acked
            terminal = terminals[k]
            channel = grpc.insecure_channel(target)
            requests: dict[str, pb.PurchaseRequest] = {}

            def swipes():
                while not stop.is_set():
                    request_id = rid()
                    wrong = k == 1 and len(requests) % 50 == 0  # a few wrong PINs on the other card
                    req = terminal.purchase(request_id, guess if wrong else spend,
                                            "999183" if wrong else "482916", 1,
                                            client_time_us=sent_at(request_id))
                    with lock:
                        requests[request_id] = req
                        sent[request_id] = (k, wrong)
                    yield pb.Operation(purchase=req)

            try:
                for reply in pb_stub(channel).SwipeStream(swipes()):
                    with lock:
                        if reply.reason == cpb.REASON_OK:
                            acked[reply.request_id] = requests[reply.request_id]
                        elif reply.reason == cpb.REASON_PIN_WRONG:
                            wrong_acked += 1
            except grpc.RpcError:
                pass  # killed under us
            finally:
                channel.close()

        threads = [threading.Thread(target=load, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.3, 1.0))
        server.kill()
        stop.set()
        for t in threads:
            t.join(30)
        server = start_server("--failures-per-minute", "1000000", data_dir=data_dir)
        report = verify(data_dir)
        assert report["ok"], report["problems"]
        # No acknowledged KSN can be used again after the crash: not re-sent as it was, not
        # under a new request_id. The terminal's retry (same request_id, a fresh KSN) is
        # answered from the ledger.
        with lock:
            sample = rng.sample(sorted(acked), min(20, len(acked)))
        for request_id in sample:
            replay = pb.PurchaseRequest()
            replay.CopyFrom(acked[request_id])
            for new_id in (False, True):
                if new_id:
                    replay.request_id = rid()
                with pytest.raises(grpc.RpcError) as err:
                    server.stub.Purchase(replay)
                assert failure_of(err.value).reason == cpb.REASON_KSN_REPLAYED
            k = sent[request_id][0]
            assert server.stub.Purchase(terminals[k].purchase(
                request_id, spend, "482916", 1, client_time_us=sent_at(request_id))).replayed

    # Every purchase ever sent on the spending card, re-sent by its terminal with the same
    # request_id and a fresh KSN: applied now if it was lost, answered from the ledger if
    # not; exactly once either way.
    with lock:
        spent = [(i, k) for i, (k, wrong) in sent.items() if not wrong]
    for k, terminal in enumerate(terminals):  # one stream per terminal: its KSNs in order
        mine = [i for i, who in spent if who == k]
        replies = list(pb_stub(server.channel).SwipeStream(
            pb.Operation(purchase=terminal.purchase(i, spend, "482916", 1,
                                                    client_time_us=sent_at(i))) for i in mine))
        assert [r.request_id for r in replies] == mine
        assert all(r.reason == cpb.REASON_OK and (r.replayed or r.request_id not in acked)
                   for r in replies)
    entries = journal_entries(data_dir)
    purchases = [e for e in entries if e[1] == L.OP_PURCHASE]
    failed = [e for e in entries if e[1] == L.OP_PIN_FAILED]
    assert len(purchases) == len(spent) and len(failed) >= min(wrong_acked, 3)
    card = Client(server.stub).card(spend)
    assert card.balance.principal_minor == 10**9 - len(purchases)  # one fen per applied purchase
    assert Client(server.stub).card(guess).pin_tries == len(failed) <= 3
    assert len(acked) > 50  # the load was real
    assert verify(data_dir)["ok"]
