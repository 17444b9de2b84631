"""Card life (rule 14 of cardcore.rules): freeze, unfreeze, report lost, found and cancel, as
operators do them, through the real ledger and over gRPC: every legal and illegal transition,
what a card in each status allows, and what cancelling pays back and forfeits."""
from __future__ import annotations

import itertools

import grpc
import pytest

from cardcore import layout as L
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from cardcore.verify import verify as verify_ledger
from conftest import Client, bearer, failure_of, new_card_number, sent_at, verify
from test_card_programs import CAFE_FOOD, Till, cafe_ledger, example, figures, line, lots_of
from test_ledger import cid, op
from test_refunds import refund, reverse_op, seq_of

R = cpb.Reason
STATUSES = (L.STATUS_ACTIVE, L.STATUS_FROZEN, L.STATUS_LOST, L.STATUS_CLOSED)


@pytest.fixture
def till(tmp_path):
    with cafe_ledger(str(tmp_path / "cafe")) as t:
        yield t


def set_status(till: Till, number: str, status: int):
    return till.apply(op(till.rid(), L.OP_CARD_STATUS, number, 0, at=till.at + 1, tier=status,
                         operator_id=1))[0]


def status_of(till: Till, number: str) -> int:
    return till.ledger.read_card(cid(number))[0][1]


def reach(till: Till, number: str, status: int) -> None:
    """A card brought to ``status`` by legal steps from active."""
    if status != L.STATUS_ACTIVE:
        assert set_status(till, number, status).reason == L.R_OK


@pytest.mark.parametrize("start, wanted", list(itertools.product(STATUSES, STATUSES)))
def test_every_transition_is_allowed_or_refused_as_rule_14_says(tmp_path, start, wanted):
    """From each status to each: allowed ones apply (the entry names the status left and the
    status reached), the others are refused with ILLEGAL_TRANSITION and change nothing."""
    till = Till(str(tmp_path / "life"), example("cafe"))
    number = "6225880000000601"
    till.open(number)
    till.top_up(number, 10000)
    reach(till, number, start)
    outcome = set_status(till, number, wanted)
    if wanted in L.CARD_TRANSITIONS[start]:
        e = L.JOURNAL.unpack(outcome.entry)
        assert (outcome.reason, e[3], e[29]) == (L.R_OK, wanted, start)
        assert status_of(till, number) == wanted
    else:
        assert outcome.reason == L.R_ILLEGAL_TRANSITION
        assert L.JOURNAL.unpack(outcome.entry)[3] == start  # the status it has, for the answer
        assert status_of(till, number) == start
    report = verify_ledger(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def test_a_frozen_or_lost_card_moves_no_money_until_it_is_active_again(till):
    """Frozen: top-ups, purchases and refunds refused (CARD_NOT_ACTIVE), the money kept; a
    reversal of a sale made before still applies. Unfrozen: spent again. Lost and found: the
    same."""
    number = "6225880000000602"
    till.open(number)
    till.top_up(number, 30000)
    sale = till.buy(number, line(CAFE_FOOD, 1000), request_id="before")
    for status in (L.STATUS_FROZEN, L.STATUS_LOST):
        assert set_status(till, number, status).reason == L.R_OK
        assert till.top_up(number, 100).reason == L.R_CARD_NOT_ACTIVE
        assert till.buy(number, line(CAFE_FOOD, 100)).reason == L.R_CARD_NOT_ACTIVE
        assert refund(till, number, seq_of(sale), 100).reason == L.R_CARD_NOT_ACTIVE
        assert set_status(till, number, L.STATUS_ACTIVE).reason == L.R_OK
        assert till.buy(number, line(CAFE_FOOD, 100)).reason == L.R_OK
    assert set_status(till, number, L.STATUS_FROZEN).reason == L.R_OK
    (undone,) = till.apply(reverse_op(till, number, "before"))
    assert undone.reason == L.R_OK and figures(undone)["amount"] == 1000


def test_cancelling_pays_the_principal_back_and_forfeits_bonus_and_points(till):
    """300.00 topped up with the welcome bonus 20.00, 100.00 spent (bonus first: 20.00 bonus,
    80.00 principal; 100 points). Cancelled: the entry pays back the 220.00 principal (amount
    and principal delta), forfeits nothing more of bonus (0 left) and the 100 points; the card
    is empty, closed for ever, its lots gone."""
    number = "6225880000000603"
    till.open(number)
    till.top_up(number, 30000)
    till.buy(number, line(CAFE_FOOD, 10000))
    closed = set_status(till, number, L.STATUS_CLOSED)
    f = figures(closed)
    assert (closed.reason, f["amount"], f["principal"], f["bonus"], f["points"]) == (
        L.R_OK, 22000, -22000, 0, -100)
    assert till.card(number) == dict(tier=0, principal=0, bonus=0, points=0, lifetime=10000)
    assert lots_of(till, number) == {}
    assert set_status(till, number, L.STATUS_ACTIVE).reason == L.R_ILLEGAL_TRANSITION


def test_card_life_over_grpc_needs_an_operator_and_names_the_status(start_server):
    server = start_server()
    client = Client(server.stub)
    number = new_card_number()
    client.open(number)
    client.top_up(number, 5000)

    def change(status, token=server.admin_token, request_id=None):
        request_id = request_id or f"st-{status}-{number}"
        return server.stub.SetCardStatus(pb.SetCardStatusRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), status=status,
            till=cpb.Till(store_id=1, terminal_id=1)),
            metadata=bearer(token) if token else None)

    with pytest.raises(grpc.RpcError) as err:
        change(cpb.CARD_STATUS_FROZEN, token=None)
    assert failure_of(err.value).reason == R.REASON_OPERATOR_REQUIRED
    frozen = change(cpb.CARD_STATUS_FROZEN)
    assert (frozen.type, frozen.status_after) == (cpb.OPERATION_TYPE_CARD_STATUS_CHANGED,
                                                  cpb.CARD_STATUS_FROZEN)
    assert client.card(number).status == cpb.CARD_STATUS_FROZEN
    with pytest.raises(grpc.RpcError) as err:
        change(cpb.CARD_STATUS_FROZEN, request_id="again")
    fail = failure_of(err.value)
    assert (err.value.code(), fail.reason, fail.detail) == (
        grpc.StatusCode.FAILED_PRECONDITION, R.REASON_ILLEGAL_TRANSITION, "the card is frozen")
    closed = change(cpb.CARD_STATUS_CLOSED)
    assert (closed.status_after, closed.principal_delta_minor) == (cpb.CARD_STATUS_CLOSED, -5000)
    report = verify(server.data_dir)
    assert report["ok"], report["problems"]


def test_nothing_comes_back_to_a_cancelled_card(till):
    """A sale, then the card cancelled (its principal paid out): reversing the sale now is
    refused (CARD_NOT_ACTIVE), so no money lands on a card nothing can pay out."""
    number = "6225880000000604"
    till.open(number)
    till.top_up(number, 30000)
    till.buy(number, line(CAFE_FOOD, 10000), request_id="sale-1")
    assert set_status(till, number, L.STATUS_CLOSED).reason == L.R_OK
    (refused,) = till.apply(reverse_op(till, number, "sale-1"))
    assert refused.reason == L.R_CARD_NOT_ACTIVE
    assert till.card(number)["principal"] == 0 and till.card(number)["bonus"] == 0
