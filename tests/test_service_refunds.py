"""Refunds and reversals over gRPC against a real server on the example cafe program: the
answers' fields, who may refund, a reversal before its request, batches, and verify."""
from __future__ import annotations

import grpc
import pytest

from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, bearer, failure_of, new_card_number, rid, sent_at, verify
from test_program import EXAMPLES
from test_service_programs import DRINKS, FOOD, MERCH, issue, purchase

R = cpb.Reason


def refund(number: str, original_seq: int, amount: int = 0, request_id: str | None = None):
    request_id = request_id or rid()
    return pb.RefundRequest(request_id=request_id, client_time_us=sent_at(request_id),
                            card=cpb.CardRef(card_number=number), original_seq=original_seq,
                            amount_minor=amount, till=cpb.Till(store_id=1, terminal_id=1))


def reverse(number: str, original_request_id: str, request_id: str | None = None):
    request_id = request_id or rid()
    return pb.ReverseRequest(request_id=request_id, client_time_us=sent_at(request_id),
                             card=cpb.CardRef(card_number=number),
                             original_request_id=original_request_id,
                             till=cpb.Till(store_id=1, terminal_id=1))


def funded(client: Client) -> str:
    number = new_card_number()
    client.open(number)
    client.top_up(number, 30000)  # 300.00 and the welcome bonus 20.00
    return number


def test_a_refund_by_an_operator_answers_what_went_back_where(cafe):
    """Sale: 120.00 of food (bonus first: 20.00 bonus, 100.00 principal; 120 points). A refund
    of 30.00 by an operator: 25.00 principal and 5.00 bonus back, 30 points taken back; the
    rest, then: refund_complete. Without an operator's token: OPERATOR_REQUIRED."""
    client = Client(cafe.stub)
    number = funded(client)
    sale = cafe.stub.Purchase(purchase(number, (FOOD, 12000, 1, "")))
    with pytest.raises(grpc.RpcError) as err:
        cafe.stub.Refund(refund(number, sale.seq, 3000))
    assert failure_of(err.value).reason == R.REASON_OPERATOR_REQUIRED
    token = bearer(cafe.admin_token)
    part = cafe.stub.Refund(refund(number, sale.seq, 3000), metadata=token)
    assert (part.type, part.original_seq, part.amount_minor, part.principal_delta_minor,
            part.bonus_delta_minor, part.points_redeemed, part.refund_complete) == (
        cpb.OPERATION_TYPE_REFUND, sale.seq, 3000, 2500, 500, 30, False)
    rest = cafe.stub.Refund(refund(number, sale.seq), metadata=token)
    assert (rest.amount_minor, rest.refund_complete) == (9000, True)
    card = client.card(number)
    assert (card.balance.principal_minor, card.balance.bonus_minor, card.balance.points) == (
        30000, 2000, 0)
    with pytest.raises(grpc.RpcError) as err:
        cafe.stub.Refund(refund(number, sale.seq, 1), metadata=token)
    fail = failure_of(err.value)
    assert (err.value.code(), fail.reason, fail.available_minor) == (
        grpc.StatusCode.FAILED_PRECONDITION, R.REASON_REFUND_EXCEEDS_ORIGINAL, 0)
    report = verify(cafe.data_dir)
    assert report["ok"], report["problems"]


def test_a_terminal_reverses_a_purchase_it_timed_out_on(cafe):
    """The till sent purchase "p" and timed out; its reversal undoes it (the card as before,
    original_seq naming the purchase), a retry of the reversal replays that answer, and the
    purchase retried after it replays its own (applied, then reversed: the reversal says so)."""
    client = Client(cafe.stub)
    number = funded(client)
    before = client.card(number).balance
    sale_request = purchase(number, (FOOD, 5000, 1, ""), request_id=rid())
    sale = cafe.stub.Purchase(sale_request)
    request = reverse(number, sale_request.request_id)
    undone = cafe.stub.Reverse(request)
    assert (undone.type, undone.original_seq, undone.amount_minor, undone.refund_complete) == (
        cpb.OPERATION_TYPE_REVERSAL, sale.seq, 5000, True)
    assert client.card(number).balance == before
    again = cafe.stub.Reverse(request)
    assert again.replayed and again.seq == undone.seq
    assert cafe.stub.Purchase(sale_request).seq == sale.seq  # replayed: it was applied


def test_a_request_reversed_before_it_arrives_is_refused_then(cafe):
    """Reversal first (nothing applied: original_seq 0, nothing moves), then the request: it is
    refused with REASON_REVERSED (FAILED_PRECONDITION), in a batch too, and GetOperation says
    so; the card never moved."""
    client = Client(cafe.stub)
    number = funded(client)
    before = client.card(number).balance
    late = purchase(number, (FOOD, 5000, 1, ""), request_id=rid())
    tomb = cafe.stub.Reverse(reverse(number, late.request_id))
    assert (tomb.original_seq, tomb.amount_minor, tomb.principal_delta_minor) == (0, 0, 0)
    with pytest.raises(grpc.RpcError) as err:
        cafe.stub.Purchase(late)
    assert (err.value.code(), failure_of(err.value).reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, R.REASON_REVERSED)
    batch = cafe.stub.SubmitBatch(pb.SubmitBatchRequest(operations=[pb.Operation(purchase=late)]))
    assert batch.results[0].reason == R.REASON_REVERSED
    asked = cafe.stub.GetOperation(pb.GetOperationRequest(request_id=late.request_id))
    assert asked.result.reason == R.REASON_REVERSED
    assert client.card(number).balance == before


def test_refunds_and_reversals_in_a_batch(cafe):
    """An operator's batch: a refund, the reversal of a top-up the operator made (its own
    namespace: a reversal names its caller's own request), and a second reversal of it."""
    client = Client(cafe.stub)
    number = funded(client)
    sale = cafe.stub.Purchase(purchase(number, (FOOD, 4000, 1, "")))
    token = bearer(cafe.admin_token)
    request_id = "t-" + rid()
    topped = cafe.stub.TopUp(pb.TopUpRequest(
        request_id=request_id, client_time_us=sent_at(request_id), amount_minor=1000,
        card=cpb.CardRef(card_number=number), till=cpb.Till(store_id=1, terminal_id=1)),
        metadata=token)
    reply = cafe.stub.SubmitBatch(pb.SubmitBatchRequest(operations=[
        pb.Operation(refund=refund(number, sale.seq, 1000)),
        pb.Operation(reverse=reverse(number, topped.request_id)),
        pb.Operation(reverse=reverse(number, topped.request_id, request_id="r-" + rid()))]),
        metadata=token)
    first, second, third = reply.results
    assert (first.reason, first.amount_minor, first.original_seq) == (R.REASON_OK, 1000, sale.seq)
    assert (second.reason, second.principal_delta_minor, second.original_seq) == (
        R.REASON_OK, -1000, topped.seq)
    assert (third.reason, third.principal_delta_minor) == (R.REASON_OK, 0)  # reversed before
    report = verify(cafe.data_dir)
    assert report["ok"], report["problems"]


@pytest.mark.parametrize("field, value, reason", [
    ("original_seq", 0, R.REASON_ORIGINAL_NOT_FOUND),
    ("amount_minor", -1, R.REASON_INVALID_AMOUNT),
])
def test_a_malformed_refund_is_refused_before_the_writer(cafe, field, value, reason):
    client = Client(cafe.stub)
    number = funded(client)
    request = refund(number, 5, 100)
    setattr(request, field, value)
    with pytest.raises(grpc.RpcError) as err:
        cafe.stub.Refund(request, metadata=bearer(cafe.admin_token))
    assert (failure_of(err.value).reason, failure_of(err.value).field) == (reason, field)


def test_a_reversal_must_name_another_request(cafe):
    client = Client(cafe.stub)
    number = funded(client)
    request = reverse(number, "same-id", request_id="same-id")
    with pytest.raises(grpc.RpcError) as err:
        cafe.stub.Reverse(request)
    assert failure_of(err.value).field == "original_request_id"


def refund_lines(number: str, original_seq: int, *numbers: int, amount: int = 0):
    request = refund(number, original_seq, amount)
    request.line_numbers.extend(numbers)
    return request


def test_a_sale_refunded_by_line_over_grpc_answers_the_lines_it_gave_back(cafe):
    """Sale: food 80.00, a drink 30.00 made free by the free-drink coupon, merch 20.00: 100.00
    (bonus first: 20.00 bonus, 80.00 principal), 100 points. Line 1 back: 80.00, of which the
    bonus's share 16.00 and principal 64.00, 80 points taken back; the answer and the refund's
    receipt show line 1. Line 1 again: LINE_ALREADY_REFUNDED; line 4: LINE_NOT_FOUND; 0, a
    repeated number or an amount with lines: INVALID_ARGUMENT. Lines 2 and 3: 20.00, nothing
    left (refund_complete). The card is back where it was before the sale."""
    client = Client(cafe.stub)
    number = funded(client)
    before = client.card(number).balance
    token = bearer(cafe.admin_token)
    serial = issue(cafe, number, 1, cafe.admin_token).seq
    sale = cafe.stub.Purchase(purchase(number, (FOOD, 8000, 1, "F-1"), (DRINKS, 3000, 1, "D-1"),
                                       (MERCH, 2000, 1, "M-1"), coupon=serial))
    assert (sale.paid_minor, sale.points_earned, [x.paid_minor for x in sale.lines]) == (
        10000, 100, [8000, 0, 2000])
    first = cafe.stub.Refund(refund_lines(number, sale.seq, 1), metadata=token)
    assert (first.amount_minor, first.principal_delta_minor, first.bonus_delta_minor,
            first.points_redeemed, first.refund_complete) == (8000, 6400, 1600, 80, False)
    assert [(x.line_number, x.category_code, x.amount_minor, x.sku) for x in first.lines] == [
        (1, FOOD, 8000, "F-1")]
    receipt = cafe.stub.GetReceipt(pb.GetReceiptRequest(card=cpb.CardRef(card_number=number),
                                                        seq=first.seq))
    assert [x.line_number for x in receipt.result.lines] == [1]
    for numbers, amount, code, reason in (
            ((1,), 0, grpc.StatusCode.FAILED_PRECONDITION, R.REASON_LINE_ALREADY_REFUNDED),
            ((4,), 0, grpc.StatusCode.NOT_FOUND, R.REASON_LINE_NOT_FOUND),
            ((101,), 0, grpc.StatusCode.NOT_FOUND, R.REASON_LINE_NOT_FOUND),
            ((0,), 0, grpc.StatusCode.INVALID_ARGUMENT, R.REASON_INVALID_ARGUMENT),
            ((2, 2), 0, grpc.StatusCode.INVALID_ARGUMENT, R.REASON_INVALID_ARGUMENT),
            ((2,), 100, grpc.StatusCode.INVALID_ARGUMENT, R.REASON_INVALID_ARGUMENT)):
        with pytest.raises(grpc.RpcError) as err:
            cafe.stub.Refund(refund_lines(number, sale.seq, *numbers, amount=amount),
                             metadata=token)
        assert (err.value.code(), failure_of(err.value).reason) == (code, reason), numbers
    rest = cafe.stub.Refund(refund_lines(number, sale.seq, 3, 2), metadata=token)
    assert (rest.amount_minor, rest.refund_complete, [x.line_number for x in rest.lines]) == (
        2000, True, [2, 3])
    assert client.card(number).balance == before
    report = verify(cafe.data_dir)
    assert report["ok"], report["problems"]


def test_lines_of_a_sale_without_lines_are_invalid(cafe):
    """A sale sent as a gross amount has no lines to name: INVALID_ARGUMENT, nothing changes."""
    client = Client(cafe.stub)
    number = funded(client)
    sale = cafe.stub.Purchase(purchase(number, gross=5000))
    with pytest.raises(grpc.RpcError) as err:
        cafe.stub.Refund(refund_lines(number, sale.seq, 1), metadata=bearer(cafe.admin_token))
    assert (err.value.code(), failure_of(err.value).reason) == (
        grpc.StatusCode.INVALID_ARGUMENT, R.REASON_INVALID_ARGUMENT)


@pytest.fixture
def owing_cafe(start_server, tmp_path):
    """A server on the example cafe program whose refunds owe points (rule 12)."""
    path = tmp_path / "cafe-owe.toml"
    path.write_text('refund_points_shortfall = "owe"\n'
                    + (EXAMPLES / "cafe.toml").read_text(encoding="utf-8"))
    return start_server("--program", str(path))


def test_a_refund_under_owe_takes_points_the_card_spent_and_earning_pays_them(owing_cafe):
    """Sale A: 120.00 of food, 120 points; sale B: a 10.00 drink, 100 points paying 1.00, 9
    earned: 29. A's refund takes back all 120 (points_redeemed): the card owes 91 (-91), and a
    purchase offering 100 points is INSUFFICIENT_POINTS; 50.00 of food earns 50: -41."""
    server = owing_cafe
    client = Client(server.stub)
    number = funded(client)
    sale = server.stub.Purchase(purchase(number, (FOOD, 12000, 1, "")))
    server.stub.Purchase(purchase(number, (DRINKS, 1000, 1, ""), redeem=100))
    assert client.card(number).balance.points == 29
    back = server.stub.Refund(refund(number, sale.seq), metadata=bearer(server.admin_token))
    assert (back.points_redeemed, back.balance_after.points) == (120, -91)
    with pytest.raises(grpc.RpcError) as err:
        server.stub.Purchase(purchase(number, (FOOD, 5000, 1, ""), redeem=100))
    assert failure_of(err.value).reason == R.REASON_INSUFFICIENT_POINTS
    assert server.stub.Purchase(purchase(number, (FOOD, 5000, 1, ""))).balance_after.points == -41
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]
