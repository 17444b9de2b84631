"""One front over a cluster's admin shard and two card shards (``cardcore serve --cluster
--shard A --card-shards 1,2``; docs/cluster.md, "One front over several card shards"): the real
gRPC services over real replicas on three real NATS nodes with mutual TLS and the roles' users,
through the generated stubs. Skipped, saying why,
without the cluster extra (``make cluster-deps``)."""
from __future__ import annotations

import os
import random
import signal
import threading
import time

import grpc
import pytest

from cardcore import layout as L
from cardcore.cards import card_id
from cardcore.keyring import Keyring
from cardcore.ledger import Ledger
from cardcore.program import DEFAULT_PROGRAM_TOML
from cardcore.terminal import now_us
from cardcore.shards import slot_of, spread
from cardcore.v1 import admin_service_pb2 as apb
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import (Admin, Client, ServerProcess, failure_of, new_card_number, operator_cli,
                      rid, sent_at)
from test_cluster import LEASE, converge_and_stop, identical
from test_security import PIN

R = cpb.Reason
ADMIN_SHARD, CARD_SHARDS = 0, (1, 2)
TABLE = spread(list(CARD_SHARDS))  # (the first front's table: what these tests' fronts make)


@pytest.fixture
def keyring(tmp_path) -> str:
    path = str(tmp_path / "keyring.json")
    Keyring.load_or_create(path, str(tmp_path))
    return path


@pytest.fixture
def sharded(start_server, keyring, tmp_path):
    """Three NATS nodes with mutual TLS and the roles' users (make cluster's setting), a
    replica of the admin shard and of each card shard with its shard's certificate (one each:
    the routing is what is tried here; three replicas a shard are test_cluster's), and a
    starter of fronts with the front role's certificate and each follower its shard's ({shard}
    in the path). Yields (replicas by shard, the starter, the cluster)."""
    from cardcore.server.devcluster import NatsCluster, ReplicaProcess, cluster_available

    why = cluster_available()
    if why:
        pytest.skip(why)
    cluster = NatsCluster(str(tmp_path / "nats"), tls=True, shards=1 + len(CARD_SHARDS),
                          admin_shard=ADMIN_SHARD)
    replicas: dict[int, ReplicaProcess] = {}
    mine, theirs = cluster.tls_for("front"), cluster.tls_for("follower-s{shard}")

    def front(name: str, *extra: str) -> ServerProcess:
        return start_server("--cluster", "--shard", str(ADMIN_SHARD), "--nats", cluster.urls,
                            "--keyring", keyring, "--nats-ca", mine.ca_file, "--nats-cert",
                            mine.cert_file, "--nats-key", mine.key_file, "--follower-cert",
                            theirs.cert_file, "--follower-key", theirs.key_file, *extra,
                            data_dir=str(tmp_path / name))

    try:
        for shard in (ADMIN_SHARD, *CARD_SHARDS):
            replicas[shard] = ReplicaProcess(
                str(tmp_path / f"s{shard}"), shard, cluster.urls, *LEASE, "--keyring", keyring,
                "--admin-shard", str(ADMIN_SHARD), *cluster.replica_args(shard))
        for replica in replicas.values():
            replica.wait_role("leading")
        yield replicas, front, cluster
    finally:
        for replica in replicas.values():
            if replica.proc.poll() is None:
                replica.stop()
        cluster.stop()


def shard_of(index_key: bytes, number: str) -> int:
    return TABLE[slot_of(card_id(index_key, number))]


def numbers_on(index_key: bytes, shard: int, n: int) -> list[str]:
    """``n`` new card numbers whose slots are routed to ``shard``."""
    out = []
    while len(out) < n:
        number = new_card_number()
        if shard_of(index_key, number) == shard:
            out.append(number)
    return out


def kill_front(front: ServerProcess) -> None:
    """kill -9 a front and its followers, as its unit's end does (systemd's KillMode
    control-group: docs/cluster.md): their command lines name the front's folder."""
    front.kill()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"--follow-only" in argv and any(a.startswith(front.data_dir.encode()) for a in argv):
            os.kill(int(pid), signal.SIGKILL)


def test_one_front_routes_each_card_to_its_slots_shard_and_merges_what_spans_them(
        sharded, keyring):
    """Through one front over two card shards: a terminal enrolled (on the admin shard) opens,
    tops up and pays with the PIN on cards of both shards; a batch spanning both is answered in
    its order; each card's reads, its history and GetOperation find it on its own shard, and
    each card is on that shard's replica alone; FindCards, the reports, the daily close and the
    member report add both shards up; each shard's journal is watched by naming it; a basket
    paid on two shards through two fronts counts its sale once (a second payment in the same
    batch, on the other shard, is refused: REASON_CROSS_SHARD); a key rotation
    re-seals both shards' cards; an opening on a referral by a card of the other shard pays its
    referrer once, through the opening shard's outbox, a front killed -9 after its answer or
    not; a replacement by a card of the other shard makes the new card on the old card's shard,
    its number forwarded there first, a try refused after the forward or not, and every front
    then finds it there; eight such replacements through a front killed -9 at a random moment,
    asked again through another, are each made once with their money; a second front with other card shards than the stored routing table's
    does not start."""
    replicas, front, cluster = sharded
    index_key = Keyring.load_or_create(keyring, os.path.dirname(keyring)).index_key
    f = front("f", "--card-shards", ",".join(map(str, CARD_SHARDS)))
    admin = Admin(f.channel, f.admin_token)
    till = admin.enroll(7, 3)
    on = {shard: numbers_on(index_key, shard, 2) for shard in CARD_SHARDS}

    paid_ids = {}
    for shard, numbers in on.items():  # (the enrolment answered once both card shards have it)
        for k, number in enumerate(numbers):
            assert f.stub.OpenCard(till.open_card(rid(), number, PIN)).reason == R.REASON_OK
            f.stub.TopUp(till.top_up(rid(), number, 10_000 + k))
            paid_ids[number] = rid()
            paid = f.stub.Purchase(till.purchase(paid_ids[number], number, PIN, 1_000))
            assert paid.reason == R.REASON_OK
            assert paid.balance_after.available_minor == 9_000 + k

    # one batch of top-ups over both shards (development caller), answered in the batch's
    # order; one to a card never opened, refused by its shard's ledger
    mixed = [on[1][0], on[2][0], on[1][1], on[2][1]]

    def top_up(number: str, amount_minor: int, request_id: str) -> pb.Operation:
        return pb.Operation(top_up=pb.TopUpRequest(
            client_time_us=sent_at(request_id), request_id=request_id,
            card=cpb.CardRef(card_number=number), amount_minor=amount_minor))

    ops = [top_up(n, 100 * (i + 1), f"m-{i}") for i, n in enumerate(mixed)]
    ops.insert(2, top_up(numbers_on(index_key, 2, 1)[0], 5, "m-x"))
    got = f.stub.SubmitBatch(pb.SubmitBatchRequest(operations=ops)).results
    assert [r.request_id for r in got] == ["m-0", "m-1", "m-x", "m-2", "m-3"]
    assert [r.reason for r in got] == [R.REASON_OK, R.REASON_OK, R.REASON_CARD_NOT_FOUND,
                                       R.REASON_OK, R.REASON_OK]
    expected = {n: 9_000 + k for numbers in on.values() for k, n in enumerate(numbers)}
    for i, n in enumerate(mixed):
        expected[n] += 100 * (i + 1)
        assert got[[0, 1, 3, 4][i]].balance_after.available_minor == expected[n]

    client = Client(f.stub)
    for number, balance in expected.items():  # each read from its card's shard's follower
        assert client.card(number).balance.available_minor == balance
        history = f.stub.ListTransactions(pb.ListTransactionsRequest(
            card=cpb.CardRef(card_number=number))).entries
        assert sorted(e.type for e in history) == [cpb.OPERATION_TYPE_OPEN_CARD,
                                                   cpb.OPERATION_TYPE_TOP_UP,
                                                   cpb.OPERATION_TYPE_TOP_UP,
                                                   cpb.OPERATION_TYPE_PURCHASE]
        found = f.stub.GetOperation(pb.GetOperationRequest(
            request_id=paid_ids[number], caller=cpb.Caller(kind=cpb.CALLER_KIND_TERMINAL, id=7)))
        assert found.found and found.result.balance_after.available_minor == 9_000 + (
            number in (on[1][1], on[2][1]))

    # FindCards over both shards: one phone, a card on each
    phone = "13800138000"
    both = [numbers_on(index_key, s, 1)[0] for s in CARD_SHARDS]
    for number in both:
        assert client.open(number, phone=phone).reason == R.REASON_OK
    listed = f.stub.FindCards(pb.FindCardsRequest(phone=phone, till=cpb.Till(store_id=1)))
    assert sorted(c.card_id for c in listed.cards) == sorted(card_id(index_key, n) for n in both)

    # the chain's report: both shards' top-ups and sales, added up
    report = admin.stub.GetReport(apb.GetReportRequest(chain=True, last_days=1),
                                  metadata=admin.metadata)
    top_ups = {o.operation_type: o for o in report.total.operations}[cpb.OPERATION_TYPE_TOP_UP]
    assert top_ups.count == 8 and top_ups.amount_minor == 4 * 10_000 + 2 + 1_000
    sales = {o.operation_type: o for o in report.total.operations}[cpb.OPERATION_TYPE_PURCHASE]
    assert sales.count == 4 and sales.amount_minor == 4 * 1_000
    month = report.to_day[:7]  # (YYYY-MM)
    members = admin.stub.GetMemberReport(apb.GetMemberReportRequest(
        from_month=month, to_month=month), metadata=admin.metadata)
    assert members.members == members.new_members == 6  # opened on both shards
    assert members.active_members == 4 and members.purchases == 4  # the PIN purchases'
    # the journal feed: each shard's own, named (none named: which one?)
    with pytest.raises(grpc.RpcError) as err:
        admin.stub.WatchJournal(apb.WatchJournalRequest(), metadata=admin.metadata).next()
    assert failure_of(err.value).reason == R.REASON_INVALID_ARGUMENT
    assert failure_of(err.value).field == "shard"
    journals = {}
    for shard in (ADMIN_SHARD, *CARD_SHARDS):
        answers = list(admin.stub.WatchJournal(apb.WatchJournalRequest(
            shard=shard, stop_when_caught_up=True), metadata=admin.metadata, timeout=30))
        journals[shard] = entries = [e for a in answers for e in a.entries]
        assert {a.shard for a in answers} == {shard}
        assert [e.result.seq for e in entries] == list(range(1, len(entries) + 1))
        cards = {e.card_id for e in entries if e.card_id}
        assert all(TABLE[slot_of(c)] == shard for c in cards)  # none of the admin shard's
        assert len(cards) == (0 if shard == ADMIN_SHARD else 3)  # (its 2 + 1 phone card)
        assert any(e.result.type == cpb.OPERATION_TYPE_TERMINAL_ENROLLED for e in entries)
    code, out = operator_cli(f, "watch", "--shard", str(CARD_SHARDS[0]), "--no-follow")
    entries = journals[CARD_SHARDS[0]]  # (a line each, then where to resume)
    assert code == 0 and len(out.splitlines()) == len(entries) + 1, out
    assert out.splitlines()[-1] == f"resume: --from-seq {len(entries) + 1} --shard {CARD_SHARDS[0]}"

    # the terminal's KSN high-water is its card shards' (the admin shard sees no swipe)
    listed = admin.stub.ListTerminals(apb.ListTerminalsRequest(), metadata=admin.metadata)
    assert [t.last_ksn_counter > 0 for t in listed.terminals] == [True]

    # split tender over both card shards: the first payment on shard 1 through f; the next on
    # shard 2 through h (which reads the first off its follower), marked so that shard 2 counts
    # no sale for it; the last on shard 1 again through f. The store's day counts the basket's
    # sale once (below).
    def basket_payment(number: str, gross_minor: int) -> pb.PurchaseRequest:
        request = till.purchase(rid(), number, PIN, gross_minor)
        request.basket_id, request.allow_partial = "B-1", True
        return request

    a, a2, b = on[1][0], on[1][1], on[2][0]
    basket_gross = expected[a] + 500
    paid = f.stub.Purchase(basket_payment(a, basket_gross))
    assert paid.reason == R.REASON_OK and paid.remainder_due_minor == 500
    h = front("h", "--card-shards", "2,1")  # (the same shards: the stored table's)
    assert h.stub.Purchase(basket_payment(b, 300)).reason == R.REASON_OK
    expected[b] -= 300
    assert Client(h.stub).card(b).balance.available_minor == expected[b]  # (h reads its own)
    rest = f.stub.Purchase(basket_payment(a2, 200))
    assert rest.reason == R.REASON_OK and rest.remainder_due_minor == 0
    # ... but within one batch: its second payment, on the other shard, refused before it is
    # sent, its first's outcome unknown then (a development caller's, declined: no PIN)
    batch = [pb.Operation(purchase=pb.PurchaseRequest(
        request_id=f"B-2-{k}", client_time_us=sent_at(f"B-2-{k}"),
        card=cpb.CardRef(card_number=n), gross_amount_minor=100, basket_id="B-2",
        till=cpb.Till(store_id=3))) for k, n in enumerate((a, b))]
    got = f.stub.SubmitBatch(pb.SubmitBatchRequest(operations=batch)).results
    assert [r.reason for r in got] == [R.REASON_PIN_REQUIRED, R.REASON_CROSS_SHARD]

    # the daily close of store 3 (never registered: its entries are on the card shards), its
    # figures both shards' as the store's report has them
    store_day = admin.stub.GetReport(apb.GetReportRequest(store_id=3, last_days=1),
                                     metadata=admin.metadata)
    request_id = rid()
    closed = admin.stub.CloseDay(apb.CloseDayRequest(
        request_id=request_id, client_time_us=sent_at(request_id), store_id=3,
        business_day=store_day.to_day), metadata=admin.metadata)
    assert closed.closed_seq and not closed.closed_before
    assert closed.figures == store_day.total
    assert store_day.total.sales_gross_minor == 4 * 1_000 + basket_gross  # (the basket's once)
    top_ups = {o.operation_type: o for o in closed.figures.operations}[cpb.OPERATION_TYPE_TOP_UP]
    assert top_ups.count == 4 and top_ups.amount_minor == 4 * 10_000 + 2  # the terminal's

    # a data key rotated: made on the admin shard, every card number on both card shards
    # re-sealed under it (a chunk of one shard at a time, each to its shard)
    request_id = rid()
    rotated = admin.stub.RotateDataKey(apb.RotateDataKeyRequest(
        client_time_us=sent_at(request_id), request_id=request_id), metadata=admin.metadata)
    assert (rotated.key_version, rotated.cards_resealed) == (2, 6)
    assert client.card(b).balance.available_minor == expected[b]

    # openings on a referral by a card of the other shard (referral points loaded, relayed):
    # each made on the new card's shard, whose outbox owes the referrer its bonus, delivered
    # by a front; the first through front k, killed -9 right after its answer (before or
    # after its outbox round: either way f delivers, or answers k's delivery again), the
    # second through f. The referrer gets both bonuses, each once.
    assert admin.stub.LoadProgram(apb.LoadProgramRequest(
        request_id=rid(), client_time_us=now_us(),
        document="referral_points = 300\n" + DEFAULT_PROGRAM_TOML),
        metadata=admin.metadata).version == 2
    referrer, referred = on[1][0], numbers_on(index_key, 2, 2)
    points = client.card(referrer).balance.points
    k = front("k", "--card-shards", "1,2")
    for through, number in ((k, referred[0]), (f, referred[1])):
        request_id = rid()
        assert through.stub.OpenCard(pb.OpenCardRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), referrer_card_number=referrer,
            till=cpb.Till(store_id=1, terminal_id=1))).reason == R.REASON_OK
        if through is k:
            kill_front(k)
    deadline = time.monotonic() + 20
    while (got := client.card(referrer).balance.points) != points + 600:  # (read once a turn)
        assert time.monotonic() < deadline and got < points + 600, got - points
        time.sleep(0.1)

    # a replacement by a card whose slot routes to the other shard (2 -> 1). First tried while
    # the old card is only issued: its number forwarded by shard 1 to shard 2, the replacement
    # then refused there (what a front killed between the two steps leaves: a forward with no
    # card). The card activated and topped up, replaced through h: made on shard 2, the new
    # card holding everything; asked again through f, answered as made (the forward found
    # made). The new card topped up at once through k2, started before the replacement (it
    # reads the forward at its next outbox round: until then shard 1 refuses it,
    # REASON_CARD_ELSEWHERE, nothing recorded, and it is asked again), then through f.
    old, new = numbers_on(index_key, 2, 1)[0], numbers_on(index_key, 1, 1)[0]

    def replace(through: ServerProcess, request_id: str):
        return through.stub.ReplaceCard(pb.ReplaceCardRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=old), new_card=cpb.CardRef(card_number=new),
            till=cpb.Till(store_id=3)), metadata=admin.metadata)

    def top_up_until_made(through: ServerProcess, number: str, amount_minor: int) -> None:
        request_id, deadline = rid(), time.monotonic() + 10
        while True:
            try:
                done = Client(through.stub).top_up(number, amount_minor, request_id)
                break
            except grpc.RpcError as exc:
                assert failure_of(exc).reason == R.REASON_CARD_ELSEWHERE, exc
                assert time.monotonic() < deadline
                time.sleep(0.1)
        assert done.reason == R.REASON_OK

    request_id = rid()
    assert f.stub.OpenCard(pb.OpenCardRequest(
        request_id=request_id, client_time_us=sent_at(request_id), issue_only=True,
        card=cpb.CardRef(card_number=old), till=cpb.Till(store_id=3)),
        metadata=admin.metadata).reason == R.REASON_OK
    with pytest.raises(grpc.RpcError) as err:
        replace(f, rid())
    assert failure_of(err.value).reason == R.REASON_ILLEGAL_TRANSITION
    with pytest.raises(grpc.RpcError) as err:
        client.card(new)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    request_id = rid()
    assert f.stub.SetCardStatus(pb.SetCardStatusRequest(
        request_id=request_id, client_time_us=sent_at(request_id), card=cpb.CardRef(
            card_number=old), status=cpb.CARD_STATUS_ACTIVE, till=cpb.Till(store_id=3)),
        metadata=admin.metadata).reason == R.REASON_OK
    assert client.top_up(old, 5_000).reason == R.REASON_OK
    held = client.card(old).balance
    k2 = front("k2", "--card-shards", "1,2")
    request_id = rid()
    made = replace(h, request_id)
    top_up_until_made(k2, new, 10)
    moved = Client(k2.stub).card(new).balance  # (k2 reads its own top-up)
    held.principal_minor += 10
    held.available_minor += 10
    assert moved == held
    again = replace(f, request_id)
    assert made.reason == again.reason == R.REASON_OK and again.replayed
    assert (again.seq, again.status_after) == (made.seq, made.status_after)
    for through in (f, h):
        assert Client(through.stub).card(new).status == cpb.CARD_STATUS_ACTIVE
        assert Client(through.stub).card(old).status == cpb.CARD_STATUS_REPLACED
    top_up_until_made(f, new, 100)
    assert client.card(new).balance.available_minor == held.available_minor + 100
    k2.stop()

    # replacements across the shards through front k3, killed -9 with its followers at a
    # random moment among them (before a look, a forward or a replacement, or after one),
    # then each asked again through f: every one made once, each new card holding exactly its
    # old card's money, none of the old cards' money lost or doubled
    olds, news = numbers_on(index_key, 2, 8), numbers_on(index_key, 1, 8)
    for k, number in enumerate(olds):
        assert client.open(number).reason == R.REASON_OK
        assert client.top_up(number, 1_000 + k).reason == R.REASON_OK
    ids = [rid() for _ in olds]

    def replace_pair(through: ServerProcess, k: int):
        return through.stub.ReplaceCard(pb.ReplaceCardRequest(
            request_id=ids[k], client_time_us=sent_at(ids[k]),
            card=cpb.CardRef(card_number=olds[k]), new_card=cpb.CardRef(card_number=news[k]),
            till=cpb.Till(store_id=3)), metadata=admin.metadata, timeout=10)

    k3 = front("k3", "--card-shards", "1,2")
    answered: list[int] = []

    def replace_all() -> None:
        for k in range(len(olds)):
            try:
                if replace_pair(k3, k).reason == R.REASON_OK:
                    answered.append(k)
            except grpc.RpcError:
                return  # (killed: the rest are asked through f)

    sender = threading.Thread(target=replace_all)
    sender.start()
    time.sleep(random.uniform(0.05, 0.6))
    kill_front(k3)
    sender.join(30)
    for k in range(len(olds)):
        again = replace_pair(f, k)
        assert again.reason == R.REASON_OK and (again.replayed or k not in answered), k
    for k, (old_number, new_number) in enumerate(zip(olds, news)):
        assert client.card(old_number).status == cpb.CARD_STATUS_REPLACED
        assert client.card(new_number).balance.principal_minor == 1_000 + k

    # a front with other card shards than the stored table's does not start
    with pytest.raises(RuntimeError, match="routing table routes cards to shards 1,2"):
        front("g", "--card-shards", "1")

    f.stop()
    h.stop()
    for shard in CARD_SHARDS:  # every card on its slot's shard's replica alone, verify clean
        converge_and_stop([replicas[shard]], cluster.urls, shard, cluster.tls_for("replica"))
        identical([replicas[shard]])
        ledger = Ledger(os.path.join(replicas[shard].data_dir, "ledger"), readonly=True)
        try:
            for number in [n for numbers in on.values() for n in numbers] + both:
                held = ledger.read_card(card_id(index_key, number)) is not None
                assert held == (shard_of(index_key, number) == shard), (number, shard)
            assert [Keyring.sealed_version(sealed) for _, sealed in ledger.read_sealed()] \
                == [2] * (3 + 20 * (shard == 2))  # (its three cards', re-sealed; 2 opened
            #                    since, and the replaced cards (9) and their replacements (9))
            assert ledger.read_outbox() == []  # (delivered, taken out)
            # the replacement: on the old card's shard; its number forwarded there by its slot's
            for number in (new, *news):
                assert (ledger.read_card(card_id(index_key, number)) is not None) == (shard == 2)
            assert [(c, s) for _, c, s in ledger.read_forwards()] == [
                (card_id(index_key, number), 2) for number in (new, *news)] * (shard == 1)
            bonuses = [e for _, e in ledger.dump()["journal"] if e[1] == L.OP_REFERRAL_BONUS]
            assert [L.JOURNAL.unpack(e)[29] for e in bonuses] == [3, 3] * (shard == 1)
        finally:
            ledger.close()
