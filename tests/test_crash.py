"""Kill -9 the server under load, restart on the same folder: nothing acknowledged is lost."""
from __future__ import annotations

import random
import threading
import time

import grpc

from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, new_card_number, verify

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

        def load(stream_no: int, target: str = server.target, rnd: int = rnd,
                 stop: threading.Event = stop) -> None:
            channel = grpc.insecure_channel(target)
            ids = (f"r{rnd}-s{stream_no}-{i}" for i in range(1_000_000))

            def swipes():
                for request_id in ids:
                    if stop.is_set():
                        return
                    with lock:
                        sent.append(request_id)
                    yield pb.Operation(top_up=pb.TopUpRequest(
                        request_id=request_id, card=cpb.CardRef(card_number=number), amount_minor=1))

            try:
                for reply in pb_stub(channel).SwipeStream(swipes()):
                    if reply.reason == cpb.REASON_OK:
                        with lock:
                            acknowledged.add(reply.request_id)
            except grpc.RpcError:
                pass  # the server died under us: expected
            finally:
                channel.close()

        threads = [threading.Thread(target=load, args=(s,)) for s in range(STREAMS)]
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
            pb.Operation(top_up=pb.TopUpRequest(request_id=i, card=cpb.CardRef(card_number=number),
                                                amount_minor=1))
            for i in request_ids[start:start + 10_000]])).results
    return results


def pb_stub(channel):
    from cardcore.v1 import card_service_pb2_grpc as pb_grpc

    return pb_grpc.CardServiceStub(channel)
