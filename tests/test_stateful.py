"""Random sequences of every operation against the live server and a simple model.

The model is the rules written plainly (rules.paid_minor / points_earned,
principal before bonus, the PIN rule of cardcore.layout); after every step the
server's answer and the card must match it, including retries with old request
ids and reused ids with another payload. PIN operations go through an enrolled
terminal (DUKPT, encrypted card data, PIN blocks) and resets through a store
manager's token. The journal is checked with `cardcore verify` at the end of
each run.
"""
from __future__ import annotations

import dataclasses
import uuid

import grpc
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from cardcore import rules
from cardcore.v1 import common_pb2 as cpb
from conftest import (Admin, Client, ServerProcess, bearer, failure_of, new_card_number, rid,
                      run_machine)

R = cpb.Reason
INT64_MAX = (1 << 63) - 1
RATES = [t.rate_bp for t in rules.DEFAULT_PROGRAM.tiers]


@dataclasses.dataclass
class ModelCard:
    tier: int
    principal: int = 0
    points: int = 0
    lifetime: int = 0
    pin: str | None = None
    tries: int = 0
    locked: bool = False


PINS = ["482916", "735102", "604813", "291735"]
TRIES_MAX = rules.DEFAULT_PROGRAM.pin_tries_max


amounts = st.one_of(st.integers(1, 50_000), st.sampled_from([1, 10, 30, 99, 100, 101, INT64_MAX]))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = ServerProcess(str(tmp_path_factory.mktemp("stateful")), "--failures-per-minute", "1000000")
    admin = Admin(server.channel, server.admin_token)
    server.terminal = admin.enroll(5, 1)
    server.manager = admin.add_operator("manager", cpb.OPERATOR_ROLE_STORE_MANAGER, [1])
    yield server
    server.stop()


class Ledger(RuleBasedStateMachine):
    server: ServerProcess  # set by the test below
    cards = Bundle("cards")
    done = Bundle("done")  # (request_id, kind, number, amount, the original reply)

    @initialize()
    def setup(self):
        self.client = Client(self.server.stub)
        self.terminal = self.server.terminal
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
        """A clear number without a PIN: development mode, cards without a PIN only."""
        card = self.model[number]
        request_id = str(uuid.uuid4())
        paid = rules.paid_minor(gross, RATES[card.tier])
        if card.pin is not None:
            self.expect_refusal(lambda: self.client.purchase(number, gross, request_id),
                                R.REASON_PIN_LOCKED if card.locked else R.REASON_PIN_REQUIRED)
            return (request_id, "purchase", number, gross, None)
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

    # ---- PINs, through the terminal ----------------------------------------------------

    def wrong_pin_counted(self, card: ModelCard, err: grpc.RpcError) -> None:
        card.tries += 1
        card.locked = card.tries >= TRIES_MAX
        fail = failure_of(err)
        assert (fail.reason, fail.pin_tries_left) == (R.REASON_PIN_WRONG, TRIES_MAX - card.tries)

    @rule(number=cards, pin=st.sampled_from(PINS), old_right=st.booleans())
    def set_pin(self, number, pin, old_right):
        card = self.model[number]
        old = None if card.pin is None else (card.pin if old_right else "999183")
        request = self.terminal.set_pin(rid(), number, pin, old)
        if card.locked:
            self.expect_refusal(lambda: self.server.stub.SetPin(request), R.REASON_PIN_LOCKED)
        elif card.pin is not None and not old_right:
            with pytest.raises(grpc.RpcError) as err:
                self.server.stub.SetPin(request)
            self.wrong_pin_counted(card, err.value)
        else:  # a first PIN needs an operator at the till (a change does not, but may have one)
            reply = self.server.stub.SetPin(request, metadata=bearer(self.server.manager))
            assert reply.type == cpb.OPERATION_TYPE_SET_PIN
            card.pin, card.tries = pin, 0

    @rule(number=cards, gross=amounts, right=st.booleans())
    def purchase_with_pin(self, number, gross, right):
        card = self.model[number]
        request = self.terminal.purchase(rid(), number, (card.pin or PINS[0]) if right else "999183",
                                         gross)
        paid = rules.paid_minor(gross, RATES[card.tier])
        if card.pin is None:
            self.expect_refusal(lambda: self.server.stub.Purchase(request), R.REASON_PIN_NOT_SET)
        elif card.locked:
            self.expect_refusal(lambda: self.server.stub.Purchase(request), R.REASON_PIN_LOCKED)
        elif not right:
            with pytest.raises(grpc.RpcError) as err:
                self.server.stub.Purchase(request)
            self.wrong_pin_counted(card, err.value)
        elif paid > card.principal:
            self.expect_refusal(lambda: self.server.stub.Purchase(request), R.REASON_INSUFFICIENT_FUNDS)
        else:
            reply = self.server.stub.Purchase(request)
            card.principal -= paid
            card.points += rules.points_earned(paid, 100, 1)
            card.lifetime += paid
            card.tries = 0
            assert reply.balance_after.principal_minor == card.principal

    @rule(number=cards, pin=st.one_of(st.none(), st.sampled_from(PINS)))
    def reset_pin(self, number, pin):
        card = self.model[number]
        reply = self.server.stub.ResetPin(self.terminal.reset_pin(rid(), number, pin),
                                          metadata=bearer(self.server.manager))
        assert reply.type == cpb.OPERATION_TYPE_RESET_PIN
        card.pin, card.tries, card.locked = pin, 0, False

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
            assert (got.pin_set, got.pin_tries, got.pin_locked) == (card.pin is not None, card.tries,
                                                                    card.locked)


def test_random_operation_sequences_match_the_model(live):
    Ledger.server = live
    run_machine(Ledger, 25, 30, live.data_dir)
