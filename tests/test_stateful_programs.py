"""Random sequences of card-program operations against the live server and a plain model.

The sibling of ``test_stateful``, on a server running a program with top-up promotions (a
fixed bonus limited per card, a capped percentage, a first top-up's), a bonus bucket spent
first, points redemption capped at half the bill, a coupon bought with points or given by an
operator, a count package, and a tier reached by spend or by one top-up. The model writes each
rule out plainly (``rules`` has the few formulas it shares); after every step the server's
answer and every card (balances, tier, lifetime paid, coupons, packages) must match it, and
``cardcore verify`` must find the journal clean at the end of each run.
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
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import Client, ServerProcess, bearer, failure_of, new_card_number, sent_at, verify

R = cpb.Reason
PROGRAM = """
points_unit_minor = 100
points_per_unit = 1
spend_order = "bonus_first"

[redemption]
points = 100
value_minor = 100
cap_bp = 5000

[[tiers]]
name = "standard"
rate_bp = 10000

[[tiers]]
name = "silver"
rate_bp = 9500
points_per_unit = 2
upgrade_spend_minor = 50000
upgrade_top_up_minor = 100000

[[promotions]]
id = 1
name = "top up 100 get 10, twice"
kind = "fixed"
min_top_up_minor = 10000
bonus_minor = 1000
per_card_limit = 2

[[promotions]]
id = 2
name = "10 % from 500, at most 30"
kind = "percent"
min_top_up_minor = 50000
bonus_bp = 1000
max_bonus_minor = 3000

[[promotions]]
id = 3
name = "welcome 5"
kind = "first_top_up"
min_top_up_minor = 1
bonus_minor = 500

[[coupons]]
id = 1
name = "10 off 50"
kind = "amount_off"
min_spend_minor = 5000
amount_off_minor = 1000
points_price = 200

[[packages]]
id = 1
name = "3 washes"
kind = "count"
price_minor = 3000
uses = 3
days = 30
"""
RATES = (10000, 9500)
PER_UNIT = (1, 2)
SILVER_SPEND, SILVER_TOP_UP = 50000, 100000
COUPON_PRICE, COUPON_MIN, COUPON_OFF = 200, 5000, 1000
PACKAGE_PRICE, PACKAGE_USES = 3000, 3


@dataclasses.dataclass
class ModelCard:
    tier: int = 0
    principal: int = 0
    bonus: int = 0
    points: int = 0
    lifetime: int = 0
    top_ups: int = 0
    fixed_uses: int = 0                                   # promotion 1's, limited to 2
    coupons: dict = dataclasses.field(default_factory=dict)   # serial -> used
    packages: dict = dataclasses.field(default_factory=dict)  # serial -> uses left

    def upgrade_by_spend(self) -> None:
        if self.tier == 0 and self.lifetime >= SILVER_SPEND:
            self.tier = 1

    def pay(self, due: int) -> None:
        """Bonus first, then principal; purchases and package sales count to lifetime paid."""
        from_bonus = min(due, self.bonus)
        self.bonus -= from_bonus
        self.principal -= due - from_bonus
        self.lifetime += due
        self.upgrade_by_spend()


def bonus_for(card: ModelCard, amount: int) -> tuple[int, int]:
    """(promotion id, bonus) of the best promotion for a top-up: the largest bonus, the first
    written on a tie, none when none applies."""
    offers = []
    if amount >= 10000 and card.fixed_uses < 2:
        offers.append((1, 1000))
    if amount >= 50000:
        offers.append((2, min(amount * 1000 // 10000, 3000)))
    if card.top_ups == 0:
        offers.append((3, 500))
    return max(offers, key=lambda o: (o[1], -o[0]), default=(0, 0))


amounts = st.one_of(st.integers(1, 60_000), st.sampled_from([1, 9999, 10000, 49999, 50000,
                                                             100000, 400000]))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("stateful-programs")
    path = folder / "program.toml"
    path.write_text(PROGRAM, encoding="utf-8")
    server = ServerProcess(str(folder / "data"), "--program", str(path))
    yield server
    server.stop()


def till() -> cpb.Till:
    return cpb.Till(store_id=1, terminal_id=1)


class Programs(RuleBasedStateMachine):
    server: ServerProcess  # set by the test below
    cards = Bundle("cards")

    @initialize()
    def setup(self):
        self.client = Client(self.server.stub)
        self.stub = self.server.stub
        self.model: dict[str, ModelCard] = {}

    def call(self, method, request, reason, metadata=None):
        """The reply of an applied request, or None after checking the refusal's reason."""
        if reason == R.REASON_OK:
            reply = method(request, metadata=metadata)
            assert reply.reason == R.REASON_OK
            return reply
        with pytest.raises(grpc.RpcError) as err:
            method(request, metadata=metadata)
        assert failure_of(err.value).reason == reason
        return None

    @rule(target=cards, funds=st.sampled_from([0, 20000, 60000, 200000]))
    def open_card(self, funds):
        number = new_card_number()
        self.client.open(number)
        self.model[number] = ModelCard()
        if funds:  # most purchases should be affordable, or coupons and points rarely apply
            self.top_up(number, funds)
        return number

    @rule(number=cards, amount=amounts)
    def top_up(self, number, amount):
        card = self.model[number]
        pid, bonus = bonus_for(card, amount)
        reply = self.client.top_up(number, amount, str(uuid.uuid4()))
        assert (reply.promotion_id, reply.bonus_delta_minor) == (pid, bonus)
        card.principal += amount
        card.bonus += bonus
        card.top_ups += 1
        card.fixed_uses += pid == 1
        tier = card.tier
        if amount >= SILVER_TOP_UP:
            card.tier = 1
        assert (reply.tier, reply.tier_after) == (tier, card.tier)

    @rule(number=cards, gross=st.one_of(st.integers(1, 20_000), amounts),
          redeem=st.sampled_from([0, 0, 50, 100, 250, 5000]),
          with_coupon=st.booleans())
    def purchase(self, number, gross, redeem, with_coupon):
        card = self.model[number]
        usable = [s for s, used in card.coupons.items() if not used]
        serial = usable[0] if with_coupon and usable else 0
        paid = rules.paid_minor(gross, RATES[card.tier])
        off = 0
        reason = R.REASON_OK
        if serial:
            if paid < COUPON_MIN:
                reason = R.REASON_COUPON_NOT_APPLICABLE
            off = min(COUPON_OFF, paid)
            paid -= off
        taken = redeemed = 0
        if reason == R.REASON_OK and redeem:
            if card.points < redeem:
                reason = R.REASON_INSUFFICIENT_POINTS
            else:  # whole blocks of 100 points = 1.00, at most half of what is paid
                blocks = min(redeem // 100, paid * 5000 // 10000 // 100)
                taken, redeemed = blocks * 100, blocks * 100
        due = paid - redeemed
        if reason == R.REASON_OK and due > card.principal + card.bonus:
            reason = R.REASON_INSUFFICIENT_FUNDS
        request_id = str(uuid.uuid4())
        reply = self.call(self.stub.Purchase, pb.PurchaseRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), till=till(), gross_amount_minor=gross,
            redeem_points=redeem, coupon_serial=serial), reason)
        if reply is None:
            return
        earned = (due // 100) * PER_UNIT[card.tier]
        assert (reply.paid_minor, reply.coupon_off_minor, reply.points_redeemed,
                reply.redeemed_minor, reply.points_earned, reply.tier) == (
            due, off, taken, redeemed, earned, card.tier)
        card.points += earned - taken
        card.pay(due)
        if serial:
            card.coupons[serial] = True
        assert reply.tier_after == card.tier

    @rule(number=cards, with_points=st.booleans())
    def issue_coupon(self, number, with_points):
        card = self.model[number]
        reason = (R.REASON_INSUFFICIENT_POINTS if with_points and card.points < COUPON_PRICE
                  else R.REASON_OK)
        request_id = str(uuid.uuid4())
        reply = self.call(self.stub.IssueCoupon, pb.IssueCouponRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), coupon_id=1, pay_with_points=with_points,
            till=till()), reason,
            metadata=None if with_points else bearer(self.server.admin_token))
        if reply is not None:
            card.points -= COUPON_PRICE if with_points else 0
            card.coupons[reply.coupon_serial] = False

    @rule(number=cards)
    def sell_package(self, number):
        card = self.model[number]
        reason = (R.REASON_INSUFFICIENT_FUNDS if card.principal + card.bonus < PACKAGE_PRICE
                  else R.REASON_OK)
        request_id = str(uuid.uuid4())
        reply = self.call(self.stub.SellPackage, pb.SellPackageRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), package_id=1, till=till()), reason)
        if reply is not None:
            card.pay(PACKAGE_PRICE)
            card.packages[reply.package_serial] = PACKAGE_USES
            assert reply.tier_after == card.tier

    @precondition(lambda self: any(card.packages for card in self.model.values()))
    @rule(data=st.data())
    def use_package(self, data):
        number = data.draw(st.sampled_from(sorted(n for n, c in self.model.items() if c.packages)))
        card = self.model[number]
        serial = data.draw(st.sampled_from(sorted(card.packages)))
        left = card.packages[serial]
        request_id = str(uuid.uuid4())
        reply = self.call(self.stub.UseEntitlement, pb.UseEntitlementRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), package_serial=serial, till=till()),
            R.REASON_OK if left else R.REASON_PACKAGE_USED_UP)
        if reply is not None:
            card.packages[serial] = left - 1

    @precondition(lambda self: self.model)
    @invariant()
    def cards_match_the_model(self):
        for number, card in self.model.items():
            got = self.client.card(number)
            assert (got.balance.principal_minor, got.balance.bonus_minor, got.balance.points,
                    got.lifetime_paid_minor, got.tier) == (card.principal, card.bonus, card.points,
                                                           card.lifetime, card.tier)
            assert {c.serial: c.state == pb.COUPON_STATE_USED for c in got.coupons} == card.coupons
            assert {p.serial: p.uses_left for p in got.packages} == card.packages
            assert sum(lot.points for lot in got.points_lots) == card.points


def test_random_program_operation_sequences_match_the_model(live):
    Programs.server = live
    machine = settings(max_examples=15, stateful_step_count=30, deadline=None,
                       suppress_health_check=[HealthCheck.too_slow])(Programs)
    machine.TestCase().runTest()
    report = verify(live.data_dir)
    assert report["ok"], report["problems"]
