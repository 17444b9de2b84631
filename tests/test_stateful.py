"""Random sequences of every operation against the live server and a simple model.

The model is the rules written plainly (rules.paid_minor / points_earned,
principal before bonus); after every step the server's answer and the card
must match it, including retries with old request ids and reused ids with
another payload. The journal is checked with `cardcore verify` at the end of
each run.
"""
from __future__ import annotations

import dataclasses
import uuid

import grpc
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from cardcore import rules
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, ServerProcess, failure_of, new_card_number, verify

R = cpb.Reason
INT64_MAX = (1 << 63) - 1
RATES = [t.rate_bp for t in rules.DEFAULT_PROGRAM.tiers]


@dataclasses.dataclass
class ModelCard:
    tier: int
    principal: int = 0
    points: int = 0
    lifetime: int = 0


amounts = st.one_of(st.integers(1, 50_000), st.sampled_from([1, 10, 30, 99, 100, 101, INT64_MAX]))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = ServerProcess(str(tmp_path_factory.mktemp("stateful")))
    yield server
    server.stop()


class Ledger(RuleBasedStateMachine):
    server: ServerProcess  # set by the test below
    cards = Bundle("cards")
    done = Bundle("done")  # (request_id, kind, number, amount, the original reply)

    @initialize()
    def setup(self):
        self.client = Client(self.server.stub)
        self.model: dict[str, ModelCard] = {}

    def expect_refusal(self, call, reason):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert failure_of(err.value).reason == reason
        return failure_of(err.value)

    @rule(target=cards, tier=st.integers(0, 2), funds=st.integers(0, 200_000))
    def open_card(self, tier, funds):
        number = new_card_number()
        reply = self.client.open(number, tier=tier)
        assert reply.reason == R.REASON_OK and reply.balance_after.available_minor == 0
        self.model[number] = ModelCard(tier)
        if funds:  # most purchases should be affordable, or the rates are rarely exercised
            self.client.top_up(number, funds)
            self.model[number].principal = funds
        return number

    @rule(number=cards)
    def open_twice(self, number):
        self.expect_refusal(lambda: self.client.open(number), R.REASON_CARD_ALREADY_EXISTS)

    @rule(target=done, number=cards, amount=amounts)
    def top_up(self, number, amount):
        card = self.model[number]
        request_id = str(uuid.uuid4())
        if card.principal + amount > INT64_MAX:
            self.expect_refusal(lambda: self.client.top_up(number, amount, request_id),
                                R.REASON_AMOUNT_OVERFLOW)
            return (request_id, "top_up", number, amount, None)
        reply = self.client.top_up(number, amount, request_id)
        card.principal += amount
        assert reply.balance_after.principal_minor == card.principal
        return (request_id, "top_up", number, amount, reply)

    @rule(target=done, number=cards, gross=amounts)
    def purchase(self, number, gross):
        card = self.model[number]
        request_id = str(uuid.uuid4())
        paid = rules.paid_minor(gross, RATES[card.tier])
        if paid > card.principal:
            fail = self.expect_refusal(lambda: self.client.purchase(number, gross, request_id),
                                       R.REASON_INSUFFICIENT_FUNDS)
            assert fail.available_minor == card.principal
            return (request_id, "purchase", number, gross, None)
        earned = rules.points_earned(paid, 100, 1)
        reply = self.client.purchase(number, gross, request_id)
        card.principal -= paid
        card.points += earned
        card.lifetime += paid
        assert (reply.paid_minor, reply.discount_minor, reply.points_earned) == (paid, gross - paid, earned)
        assert (reply.balance_after.principal_minor, reply.balance_after.points) == (card.principal, card.points)
        return (request_id, "purchase", number, gross, reply)

    @rule(previous=done)
    def retry_with_the_same_id(self, previous):
        request_id, kind, number, amount, reply = previous
        call = getattr(self.client, kind)
        if reply is None:  # it was declined: the retry gets the same decline and changes nothing
            with pytest.raises(grpc.RpcError):
                call(number, amount, request_id)
            return
        again = call(number, amount, request_id)
        assert again.replayed and again.seq == reply.seq and again.balance_after == reply.balance_after

    @rule(previous=done, other=amounts)
    def reuse_an_id_with_another_payload(self, previous, other):
        request_id, kind, number, amount, _ = previous
        if other == amount:
            return
        self.expect_refusal(lambda: getattr(self.client, kind)(number, other, request_id),
                            R.REASON_DUPLICATE_REQUEST_MISMATCH)

    @rule()
    def unknown_card(self):
        self.expect_refusal(lambda: self.client.purchase(new_card_number(), 100), R.REASON_CARD_NOT_FOUND)

    @precondition(lambda self: self.model)
    @invariant()
    def cards_match_the_model(self):
        for number, card in self.model.items():
            got = self.client.card(number)
            assert (got.balance.principal_minor, got.balance.bonus_minor, got.balance.points,
                    got.lifetime_paid_minor, got.tier) == (card.principal, 0, card.points,
                                                           card.lifetime, card.tier)


def test_random_operation_sequences_match_the_model(live):
    Ledger.server = live
    machine = settings(max_examples=25, stateful_step_count=30, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow])(Ledger)
    machine.TestCase().runTest()
    report = verify(live.data_dir)
    assert report["ok"], report["problems"]
