"""The journal feed (AdminService.WatchJournal, `cardcore watch`), against the real server on
loopback with real LMDB: every entry in order with its seq, a resume point that misses nothing
and repeats nothing (across a server restart too), live entries, chain admins only, bounded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest

from cardcore.server.app import SHUTDOWN_GRACE_S
from cardcore.server.feed import FEED_MESSAGE_ENTRIES_MAX, FEED_WATCHERS_MAX
from cardcore.terminal import now_us
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import admin_service_pb2_grpc as apb_grpc
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import (Client, bearer, failure_of, journal_entries, new_card_number, operator_cli,
                      rid, sent_at, tls_channel)

ROLE = cpb.OperatorRole
OT = cpb.OperationType
J_OP, J_SEQ, J_AMOUNT, J_TS = 1, 7, 9, 17  # layout.JOURNAL field order


def watch(server, from_seq: int = 1, stop: bool = True, token: str | None = None,
          channel: grpc.Channel | None = None):
    """A WatchJournal stream (default: as the bootstrap chain admin; token "" sends none)."""
    token = server.admin_token if token is None else token
    return apb_grpc.AdminServiceStub(channel or server.channel).WatchJournal(
        apb.WatchJournalRequest(from_seq=from_seq, stop_when_caught_up=stop),
        metadata=bearer(token) if token else None, timeout=60)


def drain(stream) -> tuple[list[apb.WatchJournalResponse], list[apb.JournalEntry], int]:
    """Every response of a stream that stops when caught up: (responses, entries, resume seq)."""
    answers = list(stream)
    return answers, [e for a in answers for e in a.entries], answers[-1].next_seq


def top_ups(stub, number: str, count: int, store_id: int = 2) -> None:
    """``count`` top-ups of 0.01 on one card in one SubmitBatch, every one applied."""
    ids = [rid() for _ in range(count)]
    results = stub.SubmitBatch(pb.SubmitBatchRequest(operations=[pb.Operation(
        top_up=pb.TopUpRequest(request_id=i, client_time_us=sent_at(i), amount_minor=1,
                               card=cpb.CardRef(card_number=number),
                               till=cpb.Till(store_id=store_id, terminal_id=5)))
        for i in ids])).results
    assert [r.reason for r in results] == [cpb.REASON_OK] * count


def test_every_entry_arrives_in_order_as_history_shows_it_with_no_card_number(server, client):
    number = new_card_number()
    client.open(number)
    client.top_up(number, 10_000)
    client.purchase(number, 1_234, store_id=3, terminal_id=7)
    answers, entries, resume = drain(watch(server))
    seqs = [e.result.seq for e in entries]
    assert seqs == list(range(1, len(entries) + 1)) and resume == len(entries) + 1
    assert [a.caught_up for a in answers] == [False] * (len(answers) - 1) + [True]
    journal = journal_entries(server.data_dir)
    assert [(e.result.seq, e.result.type, e.result.amount_minor, e.result.applied_at_us)
            for e in entries] == [(j[J_SEQ], j[J_OP], j[J_AMOUNT], j[J_TS]) for j in journal]
    opened, topped, bought = entries[-3:]
    assert [e.result.type for e in (opened, topped, bought)] == \
        [OT.OPERATION_TYPE_OPEN_CARD, OT.OPERATION_TYPE_TOP_UP, OT.OPERATION_TYPE_PURCHASE]
    r = bought.result
    assert (r.amount_minor, r.paid_minor, r.principal_delta_minor, r.points_earned,
            r.balance_after.principal_minor, r.till.store_id, r.till.terminal_id,
            r.reason) == (1_234, 1_234, -1_234, 12, 8_766, 3, 7, cpb.REASON_OK)
    assert topped.result.principal_delta_minor == 10_000
    # the card by its id, never its number; admin entries (program, first chain admin) name none
    assert len(bought.card_id) == 16 and opened.card_id == topped.card_id == bought.card_id
    assert [e.card_id for e in entries[:2]] == [b"", b""]
    card = server.stub.GetCard(pb.GetCardRequest(card=cpb.CardRef(card_id=bought.card_id)))
    assert card.masked_number.endswith(number[-4:])
    assert all(number.encode() not in a.SerializeToString() for a in answers)


def test_a_pin_failed_entry_carries_its_reason(server, admin):
    """A wrong PIN is journaled though declined: the feed says so (a fraud check's input)."""
    till = admin.enroll(21, 4)
    number = new_card_number()
    server.stub.OpenCard(till.open_card(rid(), number, "482916"))
    with pytest.raises(grpc.RpcError):
        server.stub.Purchase(till.purchase(rid(), number, "735102", 100))
    entries = drain(watch(server))[1]
    opened, failed = entries[-2:]
    assert (failed.result.type, failed.result.reason, failed.result.status_code) == \
        (OT.OPERATION_TYPE_PIN_FAILED, cpb.REASON_PIN_WRONG, grpc.StatusCode.PERMISSION_DENIED.value[0])
    assert (failed.card_id, failed.result.till.terminal_id) == (opened.card_id, 21)
    assert opened.result.reason == cpb.REASON_OK


def test_resume_from_a_seq_gives_the_rest_exactly(server, client):
    number = client.funded_card(100_000)
    for gross in (100, 200, 300):
        client.purchase(number, gross)
    _, everything, end = drain(watch(server))
    middle = everything[3].result.seq
    _, rest, again = drain(watch(server, from_seq=middle))
    assert [e.SerializeToString() for e in rest] == \
        [e.SerializeToString() for e in everything[3:]]
    assert again == end
    _, none, same = drain(watch(server, from_seq=end))  # caught up at once: only the mark
    assert (none, same) == ([], end)


def test_a_long_journal_comes_in_bounded_parts_in_order(server, client):
    """2,500 top-ups: pages of 1,000 read, parts of at most 100 sent, none missing."""
    number = client.funded_card(1)
    top_ups(server.stub, number, 2_500)
    answers, entries, resume = drain(watch(server))
    assert [e.result.seq for e in entries] == list(range(1, resume))
    assert len(entries) >= 2_500
    assert max(len(a.entries) for a in answers) == FEED_MESSAGE_ENTRIES_MAX
    assert [a.next_seq for a in answers] == [a.entries[-1].result.seq + 1 if a.entries
                                             else resume for a in answers]
    assert sum(a.caught_up for a in answers) == 1 and answers[-1].caught_up


def test_live_entries_arrive_while_watching_woken_by_the_writer(server, client):
    """Ten purchases, each read off the stream after its answer: woken by the writer's notice,
    not the 1 s re-read (which alone would make them wait 0.5 s on average, 5 s in all)."""
    number = client.funded_card(100_000)
    stream = watch(server, stop=False)
    waited_s = []
    try:
        for answer in stream:
            if answer.caught_up:
                break
        for k in range(10):
            client.purchase(number, 4_321 + k, store_id=9)
            started = time.monotonic()
            answer = next(stream)
            waited_s.append(time.monotonic() - started)
            (entry,) = answer.entries
            assert (entry.result.type, entry.result.amount_minor, entry.result.till.store_id) == \
                (OT.OPERATION_TYPE_PURCHASE, 4_321 + k, 9)
            assert answer.caught_up and answer.next_seq == entry.result.seq + 1
    finally:
        stream.cancel()
    assert sum(waited_s) < 2.5, waited_s


@pytest.mark.parametrize("how", ["stop", "kill -9"])
def test_resumed_across_a_server_restart_misses_nothing_and_repeats_nothing(start_server, how):
    """A live watcher while top-ups land, the server stopped (or killed) under it, then a new
    stream on the restarted server from the last resume point it got: every journal entry once,
    in order. A stop ends the stream at once, saying why."""
    first = start_server()
    number = Client(first.stub).funded_card(1)
    got: list[apb.JournalEntry] = []
    resume = [1]
    ended: list[grpc.RpcError] = []
    channel = grpc.insecure_channel(first.target)  # its own: stop() closes the server's
    stream = watch(first, stop=False, channel=channel)

    def follow() -> None:
        try:
            for answer in stream:
                got.extend(answer.entries)
                resume[0] = answer.next_seq
        except grpc.RpcError as err:
            ended.append(err)

    watcher = threading.Thread(target=follow)
    watcher.start()
    for _ in range(5):
        top_ups(first.stub, number, 300)
    started = time.monotonic()
    if how == "stop":
        assert first.stop() == 0
    else:
        first.kill()
    stop_s = time.monotonic() - started
    watcher.join(30)
    channel.close()
    assert ended and ended[0].code() == grpc.StatusCode.UNAVAILABLE
    if how == "stop":  # the server ended the live stream at once, saying why
        assert failure_of(ended[0]).reason == cpb.REASON_UNAVAILABLE
        assert stop_s < SHUTDOWN_GRACE_S

    second = start_server(data_dir=first.data_dir)
    top_ups(second.stub, number, 300)
    _, rest, end = drain(watch(second, from_seq=resume[0]))
    seqs = [e.result.seq for e in got + rest]
    journal = journal_entries(second.data_dir)
    assert seqs == [j[J_SEQ] for j in journal] == list(range(1, end))
    assert [(e.result.type, e.result.applied_at_us) for e in got + rest] == \
        [(j[J_OP], j[J_TS]) for j in journal]


def test_only_a_chain_admin_or_a_development_caller_may_watch(server, admin):
    cashier = admin.add_operator("feed.cashier", ROLE.OPERATOR_ROLE_CASHIER, [3])
    region = admin.add_operator("feed.region", ROLE.OPERATOR_ROLE_REGION_MANAGER, [3, 4])
    for token in (cashier, region):
        with pytest.raises(grpc.RpcError) as err:
            drain(watch(server, token=token))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert failure_of(err.value).reason == cpb.REASON_PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        drain(watch(server, token="cc_" + "x" * 43))
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert failure_of(err.value).reason == cpb.REASON_UNAUTHENTICATED
    chain = admin.add_operator("feed.chain", ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
    assert drain(watch(server, token=chain))[1]
    assert drain(watch(server, token=""))[1]  # development mode: the caller without a token


def test_over_tls_a_back_office_host_watches_with_a_chain_admin_token_and_a_till_never(
        tls_server):
    server, ca_dir = tls_server
    office = tls_channel(server, ca_dir, "backoffice:hq")
    assert drain(watch(server, channel=office))[1]  # the bootstrap chain admin's token
    till = tls_channel(server, ca_dir, "terminal:7")
    for channel, token, code in ((office, "", grpc.StatusCode.UNAUTHENTICATED),
                                 (till, server.admin_token, grpc.StatusCode.PERMISSION_DENIED)):
        with pytest.raises(grpc.RpcError) as err:
            drain(watch(server, token=token, channel=channel))
        assert err.value.code() == code


def test_a_watcher_removed_while_it_watches_is_cut_off(server, admin):
    token = admin.add_operator("feed.leaving", ROLE.OPERATOR_ROLE_CHAIN_ADMIN)
    stream = watch(server, stop=False, token=token)
    for answer in stream:
        if answer.caught_up:
            break
    admin.stub.RemoveOperator(apb.RemoveOperatorRequest(
        request_id=rid(), name="feed.leaving", client_time_us=now_us()), metadata=admin.metadata)
    with pytest.raises(grpc.RpcError) as err:
        for answer in stream:  # the removal's own entry may come first
            assert all(e.result.type == OT.OPERATION_TYPE_OPERATOR_REMOVED for e in answer.entries)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_watchers_are_bounded_and_a_seq_past_the_end_is_refused(server):
    streams = [watch(server, stop=False) for _ in range(FEED_WATCHERS_MAX)]
    try:
        for stream in streams:
            assert next(stream).caught_up  # each one is being served
        with pytest.raises(grpc.RpcError) as err:
            drain(watch(server))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert failure_of(err.value).reason == cpb.REASON_FEED_WATCHERS_LIMIT
        streams.pop().cancel()
        deadline = time.monotonic() + 10
        while True:  # the server sees the cancellation a moment later
            try:
                assert drain(watch(server))[1]
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        for stream in streams:
            stream.cancel()
    end = drain(watch(server))[2]
    with pytest.raises(grpc.RpcError) as err:
        drain(watch(server, from_seq=end + 1))
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    fail = failure_of(err.value)
    assert (fail.reason, fail.field) == (cpb.REASON_FEED_SEQ_AHEAD, "from_seq")
    assert fail.detail == f"the journal's next seq is {end}"
    # a single server's journal is shard 0's: naming it is the same, naming another refused
    stub = apb_grpc.AdminServiceStub(server.channel)
    named = list(stub.WatchJournal(apb.WatchJournalRequest(shard=0, stop_when_caught_up=True),
                                   metadata=bearer(server.admin_token), timeout=60))
    assert named[-1].next_seq == end and {a.shard for a in named} == {0}
    with pytest.raises(grpc.RpcError) as err:
        list(stub.WatchJournal(apb.WatchJournalRequest(shard=1, stop_when_caught_up=True),
                               metadata=bearer(server.admin_token), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (failure_of(err.value).reason, failure_of(err.value).field) == (
        cpb.REASON_INVALID_ARGUMENT, "shard")


def test_a_stalled_watcher_holds_its_stream_back_not_the_writer(start_server, monkeypatch):
    """A watcher that stops reading with 10,000 entries to go (its HTTP/2 window left at 64 KiB:
    no BDP probing to grow it): the server reads no further page than the window lets it send,
    the writer goes on at its pace, and when the watcher reads again it gets everything."""
    monkeypatch.setenv("CARDCORE_LOG_LEVEL", "DEBUG")  # a line per page the feed reads
    server = start_server()
    client = Client(server.stub)
    number = client.funded_card(1)
    for _ in range(10):
        top_ups(server.stub, number, 1_000)
    channel = grpc.insecure_channel(server.target, options=[("grpc.http2.bdp_probe", 0)])
    stream = watch(server, stop=False, channel=channel)
    first = next(stream)  # then it reads nothing for a while
    started = time.monotonic()
    top_ups(server.stub, number, 1_000)
    client.top_up(number, 1)
    assert time.monotonic() - started < 10
    time.sleep(1)
    pages = server.log().count("journal feed: ")
    assert 1 <= pages <= 3, pages  # of 12 to read: it waits for the client
    end = len(journal_entries(server.data_dir)) + 1
    seqs = [e.result.seq for e in first.entries]
    try:
        for answer in stream:
            seqs += [e.result.seq for e in answer.entries]
            if answer.caught_up and answer.next_seq == end:
                break
    finally:
        stream.cancel()
        channel.close()
    assert seqs == list(range(1, end)) and len(seqs) > 11_000
    assert server.log().count("journal feed: ") >= 12


def test_the_cli_prints_json_lines_and_the_resume_seq(server, client):
    number = new_card_number()
    client.open(number)
    client.top_up(number, 50_000)
    client.purchase(number, 2_000, store_id=6)
    code, out = operator_cli(server, "watch", "--no-follow")
    assert code == 0, out
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [x["seq"] for x in lines] == list(range(1, len(lines) + 1))
    assert out.splitlines()[-1] == f"resume: --from-seq {len(lines) + 1}"
    bought = lines[-1]
    assert {k: bought[k] for k in ("type", "store", "amount_minor", "paid_minor",
                                   "principal_delta_minor", "bonus_delta_minor", "points_delta",
                                   "principal_after_minor", "reason")} == \
        {"type": "purchase", "store": 6, "amount_minor": 2_000, "paid_minor": 2_000,
         "principal_delta_minor": -2_000, "bonus_delta_minor": 0, "points_delta": 20,
         "principal_after_minor": 48_000, "reason": "REASON_OK"}
    assert len(bought["card_id"]) == 32 and bought["time"].endswith("Z")
    assert number not in out
    code, out = operator_cli(server, "watch", "--no-follow", "--from-seq", str(len(lines)))
    assert code == 0 and [json.loads(x)["seq"] for x in out.splitlines() if x[0] == "{"] == \
        [len(lines)]
    code, out = operator_cli(server, "watch", "--from-seq", str(len(lines) + 5))
    assert code == 1 and "REASON_FEED_SEQ_AHEAD" in out
    assert out.splitlines()[-1] == f"resume: --from-seq {len(lines) + 5}"


def test_undecodable_bytes_are_refused_with_a_reason(server):
    """The server's own decoder on the streaming call too: INVALID_ARGUMENT, "(message)"."""
    call = server.channel.unary_stream("/cardcore.v1.AdminService/WatchJournal")(
        b"\x08\xff", metadata=bearer(server.admin_token), timeout=5)  # a truncated varint
    with pytest.raises(grpc.RpcError) as err:
        list(call)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fail = failure_of(err.value)
    assert (fail.reason, fail.field) == (cpb.REASON_INVALID_ARGUMENT, "(message)")


def test_the_cli_follows_live_and_on_ctrl_c_says_where_to_resume(server, client):
    number = client.funded_card(10_000)
    end = drain(watch(server))[2]
    env = dict(os.environ, CARDCORE_TOKEN=server.admin_token)
    proc = subprocess.Popen([sys.executable, "-m", "cardcore.server.cli", "watch", "--target",
                             server.target, "--from-seq", str(end - 1)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert json.loads(proc.stdout.readline())["seq"] == end - 1
        client.purchase(number, 777, store_id=8)  # live: printed as it lands
        live = json.loads(proc.stdout.readline())
        assert (live["seq"], live["type"], live["amount_minor"], live["store"]) == \
            (end, "purchase", 777, 8)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130
    assert f"resume: --from-seq {end + 1}" in err.splitlines()


def test_an_admin_entry_about_a_store_names_it(server, admin, client):
    """A close of day, a store's and a region's registry change: the feed says which store, day
    and region (an entry's own till is head office's), and `cardcore watch` prints them."""
    from test_chain_tree import put_region, put_store
    from test_daily_close import close

    put_region(admin, 7, "East")
    put_store(admin, 12, "Harbour", region_id=7)
    number = new_card_number()
    client.open(number)
    top_ups(server.stub, number, 1, store_id=12)
    closed = close(admin, 12, 20_000)
    entries = drain(watch(server))[1]
    by_type = {e.result.type: e for e in entries}
    region = by_type[OT.OPERATION_TYPE_REGION_PUT]
    store = by_type[OT.OPERATION_TYPE_STORE_PUT]
    day = by_type[OT.OPERATION_TYPE_DAY_CLOSED]
    assert (region.subject_region_id, region.subject_store_id) == (7, 0)
    assert (store.subject_store_id, store.subject_region_id) == (12, 7)
    assert (day.subject_store_id, day.business_day) == (12, closed.business_day)
    assert day.result.seq == closed.closed_seq
    purchase_like = [e for e in entries if e.card_id]
    assert purchase_like and all(not (e.subject_store_id or e.business_day or e.subject_region_id)
                                 for e in purchase_like)
    rc, out = operator_cli(server, "watch", "--no-follow", token=server.admin_token)
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    (printed,) = [x for x in lines if x["type"] == "day_closed"]
    assert (printed["subject_store"], printed["business_day"]) == (12, closed.business_day)
