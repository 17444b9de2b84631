"""Holds (rule 15 of cardcore.rules): authorize, capture, void, the server's release at expiry and
the reversal of an authorization, over gRPC against a real server and, where the group's time
must be chosen (expiry), through the ledger's own apply_group on a real LMDB."""
from __future__ import annotations

import datetime
import re
import threading

import grpc
import pytest

from cardcore import layout as L
from cardcore.ledger import Ledger
from cardcore.verify import verify as verify_ledger
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, bearer, failure_of, rid, sent_at, verify
from test_ledger import NOW, cid, op, open_op

R = cpb.Reason
MINUTE_US = 60_000_000


def authorize(number: str, amount: int, minutes: int = 0, request_id: str | None = None,
              store_id: int = 1) -> pb.AuthorizeRequest:
    request_id = request_id or rid()
    return pb.AuthorizeRequest(request_id=request_id, client_time_us=sent_at(request_id),
                               card=cpb.CardRef(card_number=number), amount_minor=amount,
                               hold_minutes=minutes, till=cpb.Till(store_id=store_id,
                                                                   terminal_id=1))


def capture(number: str, serial: int, gross: int, store_id: int = 1,
            request_id: str | None = None) -> pb.CaptureRequest:
    request_id = request_id or rid()
    return pb.CaptureRequest(request_id=request_id, client_time_us=sent_at(request_id),
                             card=cpb.CardRef(card_number=number), hold_serial=serial,
                             gross_amount_minor=gross,
                             till=cpb.Till(store_id=store_id, terminal_id=1))


def void(number: str, serial: int, store_id: int = 1) -> pb.VoidHoldRequest:
    request_id = rid()
    return pb.VoidHoldRequest(request_id=request_id, client_time_us=sent_at(request_id),
                              card=cpb.CardRef(card_number=number), hold_serial=serial,
                              till=cpb.Till(store_id=store_id, terminal_id=1))


def refused(call, *args, **kw) -> cpb.Failure:
    with pytest.raises(grpc.RpcError) as err:
        call(*args, **kw)
    return failure_of(err.value)


def test_a_hold_reserves_money_and_its_capture_pays_from_it(server):
    """100.00 on the card; a car wash holds 60.00 for 30 minutes: available 40.00 (held 60.00),
    so a purchase of 50.00 elsewhere is refused with 40.00 available. The wash costs 45.00:
    captured from the hold, the card pays 45.00 (the default program's standard tier: no
    discount; 45 points), the other 15.00 is free again. A second capture or a void of the
    same hold: HOLD_CLOSED."""
    client = Client(server.stub)
    number = client.funded_card(10000)
    held = server.stub.Authorize(authorize(number, 6000, minutes=30))
    assert (held.type, held.hold_serial, held.amount_minor, held.principal_delta_minor) == (
        cpb.OPERATION_TYPE_HOLD_AUTHORIZED, held.seq, 6000, 0)
    assert held.hold_expires_at_us == held.applied_at_us + 30 * MINUTE_US
    assert (held.balance_after.available_minor, held.balance_after.held_minor) == (4000, 6000)
    card = client.card(number)
    assert (card.balance.principal_minor, card.balance.available_minor,
            card.balance.held_minor) == (10000, 4000, 6000)
    assert [(h.serial, h.amount_minor, h.store_id) for h in card.holds] == [(held.seq, 6000, 1)]
    fail = refused(client.purchase, number, 5000)
    assert (fail.reason, fail.available_minor) == (R.REASON_INSUFFICIENT_FUNDS, 4000)
    sale = server.stub.Capture(capture(number, held.seq, 4500))
    assert (sale.type, sale.paid_minor, sale.points_earned, sale.hold_serial) == (
        cpb.OPERATION_TYPE_PURCHASE, 4500, 45, held.seq)
    assert (sale.balance_after.principal_minor, sale.balance_after.available_minor,
            sale.balance_after.held_minor) == (5500, 5500, 0)
    card = client.card(number)
    assert (card.balance.available_minor, card.balance.held_minor, list(card.holds)) == (
        5500, 0, [])
    assert refused(server.stub.Capture, capture(number, held.seq, 100)).reason == \
        R.REASON_HOLD_CLOSED
    assert refused(server.stub.VoidHold, void(number, held.seq)).reason == R.REASON_HOLD_CLOSED
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_holds_from_the_command_line(server):
    """`cardcore authorize` 60.00 for 30 minutes at store 1 and 15.00 for an hour at store 7:
    `card` shows available 25.00, held 75.00 and each hold by serial with its amount, store and
    expiry; `capture` of the first for 45.00 pays from it (the rest released), a second capture
    is refused in one line (HOLD_CLOSED); `void-hold` of the second releases 15.00; then no held
    row and no hold row."""
    from test_cli_errors import _clean_env, cli, user_error

    client = Client(server.stub)
    number = client.funded_card(10000)

    def run(*args: str) -> dict:
        out = cli(*args, "--target", server.target,
                  env=_clean_env(CARDCORE_DATA_DIR=server.data_dir))
        assert out.returncode == 0, out.stderr
        # a row: its name (indented under what it is part of), two spaces or more, its value
        return dict(re.split(r"\s{2,}", line.strip(), maxsplit=1)
                    for line in out.stdout.splitlines() if line.strip())

    first = run("authorize", number, "60", "--minutes", "30", "--store", "1")
    second = run("authorize", number, "15", "--minutes", "60", "--store", "7")
    assert (first["operation"], first["amount held"], second["amount held"]) == (
        "OPERATION_TYPE_HOLD_AUTHORIZED", "60.00", "15.00"), first
    assert first["hold serial"] == first["journal seq"] and second["held"] == "75.00", second
    hold = {h.serial: h for h in client.card(number).holds}[int(second["hold serial"])]
    until = datetime.datetime.fromtimestamp(hold.expires_at_us / 1e6, datetime.timezone.utc)
    assert second["until"] == f"{until.strftime('%Y-%m-%d %H:%M:%S')} UTC"
    shown = run("card", number)
    assert (shown["balance"], shown["held"]) == ("25.00", "75.00"), shown
    assert shown[f"hold {first['hold serial']}"].startswith("60.00 by store 1, until ")
    assert shown[f"hold {second['hold serial']}"] == f"15.00 by store 7, until {second['until']}"
    sale = run("capture", number, first["hold serial"], "45", "--store", "1")
    assert (sale["operation"], sale["paid"], sale["from hold"], sale["balance"]) == (
        "OPERATION_TYPE_PURCHASE", "45.00", first["hold serial"], "40.00"), sale
    again = cli("capture", number, first["hold serial"], "1", "--store", "1", "--target",
                server.target, env=_clean_env(CARDCORE_DATA_DIR=server.data_dir))
    user_error(again, 1, "REASON_HOLD_CLOSED", secrets=(number,))
    released = run("void-hold", number, second["hold serial"], "--store", "7")
    assert (released["operation"], released["released"], released["balance"]) == (
        "OPERATION_TYPE_HOLD_VOIDED", "15.00", "55.00"), released
    shown = run("card", number)
    assert shown["balance"] == "55.00" and "held" not in shown, shown
    assert not [k for k in shown if k.startswith("hold ")], shown


def test_what_a_capture_may_not_do_changes_nothing(server):
    """More than the hold holds (CAPTURE_EXCEEDS_HOLD), another store's terminal or another
    card (HOLD_NOT_FOUND), an authorization beyond what is available (INSUFFICIENT_FUNDS) or for
    longer than 30 days (INVALID_ARGUMENT): refused, the card as it was; then the void releases
    it all."""
    client = Client(server.stub)
    number, other = client.funded_card(10000), client.funded_card(10000)
    held = server.stub.Authorize(authorize(number, 3000))
    assert held.hold_expires_at_us == held.applied_at_us + L.HOLD_MINUTES_DEFAULT * MINUTE_US
    before = client.card(number)
    fail = refused(server.stub.Capture, capture(number, held.seq, 3001))
    assert (fail.reason, fail.available_minor) == (R.REASON_CAPTURE_EXCEEDS_HOLD, 3000)
    with_points = capture(number, held.seq, 100)
    with_points.redeem_points = 100  # no PIN on a capture: points are not offered
    fail = refused(server.stub.Capture, with_points)
    assert (fail.reason, fail.field) == (R.REASON_INVALID_ARGUMENT, "redeem_points")
    assert refused(server.stub.Capture, capture(number, held.seq, 100, store_id=2)).reason == \
        R.REASON_HOLD_NOT_FOUND
    assert refused(server.stub.Capture, capture(other, held.seq, 100)).reason == \
        R.REASON_HOLD_NOT_FOUND
    assert refused(server.stub.VoidHold, void(number, held.seq, store_id=2)).reason == \
        R.REASON_HOLD_NOT_FOUND
    fail = refused(server.stub.Authorize, authorize(number, 7001))
    assert (fail.reason, fail.available_minor) == (R.REASON_INSUFFICIENT_FUNDS, 7000)
    fail = refused(server.stub.Authorize, authorize(number, 100, minutes=L.HOLD_MINUTES_MAX + 1))
    assert (fail.reason, fail.field) == (R.REASON_INVALID_ARGUMENT, "hold_minutes")
    assert client.card(number) == before
    released = server.stub.VoidHold(void(number, held.seq))
    assert (released.type, released.amount_minor, released.hold_serial,
            released.balance_after.available_minor) == (
        cpb.OPERATION_TYPE_HOLD_VOIDED, 3000, held.seq, 10000)
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_a_reversed_authorization_releases_its_hold_and_a_captured_one_is_not_reversed(server):
    """A terminal that timed out on its authorization reverses it: the hold is released (the
    card as before), and a capture of it is refused. One captured first is not reversible (the
    capture is what to reverse); reversing the capture gives the money back and leaves the hold
    closed."""
    client = Client(server.stub)
    number = client.funded_card(10000)
    before = client.card(number).balance
    request = authorize(number, 2500)
    held = server.stub.Authorize(request)
    undo_id = rid()
    undone = server.stub.Reverse(pb.ReverseRequest(
        request_id=undo_id, client_time_us=sent_at(undo_id), card=cpb.CardRef(card_number=number),
        original_request_id=request.request_id, till=cpb.Till(store_id=1, terminal_id=1)))
    assert (undone.type, undone.original_seq, undone.amount_minor, undone.refund_complete) == (
        cpb.OPERATION_TYPE_REVERSAL, held.seq, 2500, True)
    assert client.card(number).balance == before
    assert refused(server.stub.Capture, capture(number, held.seq, 100)).reason == \
        R.REASON_HOLD_CLOSED

    request = authorize(number, 4000)
    held = server.stub.Authorize(request)
    sale_request = capture(number, held.seq, 4000)
    server.stub.Capture(sale_request)

    def reverse(original: str):
        undo_id = rid()
        return pb.ReverseRequest(request_id=undo_id, client_time_us=sent_at(undo_id),
                                 card=cpb.CardRef(card_number=number), original_request_id=original,
                                 till=cpb.Till(store_id=1, terminal_id=1))

    assert refused(server.stub.Reverse, reverse(request.request_id)).reason == \
        R.REASON_NOT_REVERSIBLE
    back = server.stub.Reverse(reverse(sale_request.request_id))
    assert (back.amount_minor, back.balance_after.available_minor) == (4000, 10000)
    assert refused(server.stub.VoidHold, void(number, held.seq)).reason == R.REASON_HOLD_CLOSED
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_a_card_holding_money_is_not_cancelled_until_its_holds_are_voided(server):
    client = Client(server.stub)
    number = client.funded_card(5000)
    held = server.stub.Authorize(authorize(number, 1000))

    def cancel():
        request_id = rid()
        return server.stub.SetCardStatus(pb.SetCardStatusRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), status=cpb.CARD_STATUS_CLOSED,
            till=cpb.Till(store_id=1)), metadata=bearer(server.admin_token))

    with pytest.raises(grpc.RpcError) as err:
        cancel()
    assert failure_of(err.value).reason == R.REASON_HOLDS_OPEN
    server.stub.VoidHold(void(number, held.seq))
    closed = cancel()
    assert (closed.status_after, closed.principal_delta_minor) == (cpb.CARD_STATUS_CLOSED, -5000)


def test_concurrent_captures_and_voids_of_one_hold_close_it_once(server):
    """Eight captures and eight voids of the same hold from sixteen threads at once: exactly one
    applies, the others are HOLD_CLOSED, and the card's money adds up."""
    client = Client(server.stub)
    number = client.funded_card(10000)
    held = server.stub.Authorize(authorize(number, 5000))
    outcomes: list = []
    start = threading.Barrier(16)

    def attempt(k: int) -> None:
        start.wait()
        try:
            if k % 2:
                outcomes.append(("capture", server.stub.Capture(capture(number, held.seq, 3000))))
            else:
                outcomes.append(("void", server.stub.VoidHold(void(number, held.seq))))
        except grpc.RpcError as exc:
            outcomes.append(("refused", failure_of(exc).reason))

    threads = [threading.Thread(target=attempt, args=(k,)) for k in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    applied = [(kind, res) for kind, res in outcomes if kind != "refused"]
    assert len(applied) == 1
    assert [res for kind, res in outcomes if kind == "refused"] == [R.REASON_HOLD_CLOSED] * 15
    card = client.card(number)
    paid = 3000 if applied[0][0] == "capture" else 0
    assert (card.balance.principal_minor, card.balance.held_minor) == (10000 - paid, 0)
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_holds_in_a_batch_with_the_purchases_they_make_room_for(server):
    """SubmitBatch: an authorization, a purchase the hold leaves no room for, the capture, the
    same purchase again (room now): each as its turn in the batch finds the card."""
    client = Client(server.stub)
    number = client.funded_card(10000)
    first = authorize(number, 8000)
    held = server.stub.SubmitBatch(pb.SubmitBatchRequest(operations=[pb.Operation(authorize=first)]))
    serial = held.results[0].hold_serial
    p1, p2 = (pb.PurchaseRequest(request_id=r, client_time_us=sent_at(r), gross_amount_minor=3000,
                                 card=cpb.CardRef(card_number=number),
                                 till=cpb.Till(store_id=1, terminal_id=1))
              for r in (rid(), rid()))
    answer = server.stub.SubmitBatch(pb.SubmitBatchRequest(operations=[
        pb.Operation(purchase=p1), pb.Operation(capture=capture(number, serial, 5000)),
        pb.Operation(purchase=p2)]))
    reasons = [r.reason for r in answer.results]
    assert reasons == [R.REASON_INSUFFICIENT_FUNDS, R.REASON_OK, R.REASON_OK]
    assert answer.results[0].failure.available_minor == 2000  # held 80.00 then, not after
    assert [r.balance_after.available_minor for r in answer.results[1:]] == [5000, 2000]
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


# The server's release at expiry, at times the test chooses: the ledger's apply_group.

def hold_op(request_id: str, number: str, amount: int, minutes: int, at: int):
    return op(request_id, L.OP_HOLD, number, amount, at, ref_id=minutes)


def capture_op(request_id: str, number: str, serial: int, amount: int, at: int):
    return op(request_id, L.OP_PURCHASE, number, amount, at, link_seq=serial, op_flags=L.CAPTURE)


@pytest.fixture
def hold_ledger(tmp_path):
    ledger = Ledger(str(tmp_path / "ledger"))
    ledger.apply_group([open_op("o", "4000000000000002"),
                        op("t", L.OP_TOP_UP, "4000000000000002", 10000)], NOW)
    yield ledger
    ledger.close()


def hold_of(outcomes) -> tuple[int, int]:
    """(serial, expiry) of the hold an applied authorization made: its entry's seq and ref_id (the
    group's time, which a new ledger starts at the real clock, plus its minutes)."""
    f = L.JOURNAL.unpack(outcomes[0].entry[:L.JOURNAL_SIZE].ljust(L.JOURNAL_SIZE, b"\0"))
    return f[7], f[29]


def held_of(ledger: Ledger, number: str) -> int:
    return ledger.read_card(cid(number))[0][8]


def test_a_hold_is_released_by_the_first_group_at_its_expiry(hold_ledger):
    """Held for 2 minutes at T: a group at T + 2 min - 1 µs leaves it; the next group at
    T + 2 min (an idle writer's maintenance tick is one) releases it first, journaled as the
    server's, and a capture in that same group finds it closed."""
    number = "4000000000000002"
    serial, expires = hold_of(hold_ledger.apply_group([hold_op("h", number, 4000, 2, NOW)], NOW))
    assert held_of(hold_ledger, number) == 4000
    hold_ledger.apply_group([op("t2", L.OP_TOP_UP, number, 1, expires - 1)], expires - 1)
    assert held_of(hold_ledger, number) == 4000
    late = hold_ledger.apply_group([capture_op("c", number, serial, 100, expires)], expires)
    assert late[0].reason == L.R_HOLD_CLOSED
    assert held_of(hold_ledger, number) == 0
    released = [e for _, e in hold_ledger.dump()["journal"] if e[1] == L.OP_HOLD_EXPIRED]
    assert len(released) == 1 and L.JOURNAL.unpack(released[0])[24] == L.CALLER_SYSTEM
    assert hold_ledger.read_holds(cid(number)) == []
    report = verify_ledger(hold_ledger)
    assert report["ok"], report["problems"]


def test_a_capture_just_before_the_expiry_wins_and_the_release_finds_nothing(hold_ledger):
    number = "4000000000000002"
    serial, expires = hold_of(hold_ledger.apply_group([hold_op("h", number, 4000, 1, NOW)], NOW))
    got = hold_ledger.apply_group([capture_op("c", number, serial, 4000, expires - 1)],
                                  expires - 1)
    assert got[0].reason == L.R_OK
    hold_ledger.apply_group([op("t2", L.OP_TOP_UP, number, 1, expires + 1)], expires + 1)
    entries = [e[1] for _, e in hold_ledger.dump()["journal"]]
    assert L.OP_HOLD_EXPIRED not in entries
    assert held_of(hold_ledger, number) == 0
    report = verify_ledger(hold_ledger)
    assert report["ok"], report["problems"]


def test_a_hold_that_expired_before_the_group_is_not_captured_even_unreleased(hold_ledger):
    """HOLD_RELEASES_MAX caps a group's releases; a capture of an expired hold the sweep did not
    reach yet is refused all the same (HOLD_EXPIRED), and a later group releases it."""
    number = "4000000000000002"
    ops = [hold_op(f"h{k}", number, 1, 1, NOW) for k in range(L.HOLD_RELEASES_MAX + 1)]
    outcomes = hold_ledger.apply_group(ops, NOW)
    last, late = hold_of(outcomes[-1:])
    got = hold_ledger.apply_group([capture_op("c", number, last, 1, late)], late)
    assert got[0].reason == L.R_HOLD_EXPIRED
    assert held_of(hold_ledger, number) == 1
    hold_ledger.apply_group([op("t2", L.OP_TOP_UP, number, 1, late + 1)], late + 1)
    assert held_of(hold_ledger, number) == 0
    report = verify_ledger(hold_ledger)
    assert report["ok"], report["problems"]


def test_a_retried_authorization_answers_the_held_amount_it_left(hold_ledger):
    """The request record keeps the card's held after an applied operation (the journal does
    not carry it): a retry's answer shows the same available money as the first."""
    number = "4000000000000002"
    first = hold_ledger.apply_group([hold_op("h", number, 2500, 5, NOW)], NOW)[0]
    again = hold_ledger.apply_group([hold_op("h", number, 2500, 5, NOW)], NOW + 1)[0]
    assert (first.held_minor, again.replayed, again.held_minor) == (2500, True, 2500)
