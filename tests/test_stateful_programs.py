"""Random sequences of card-program operations against the live server and a plain model.

The sibling of ``test_stateful``, on a server running a program with top-up promotions (a
fixed bonus limited per card, a capped percentage, a first top-up's), a bonus bucket spent
first, points redemption capped at half the bill, a coupon bought with points or given by an
operator, a count package, and a tier reached by spend or by one top-up; and money that goes
back: refunds of sales (all, or part of what is left) and reversals of sales and top-ups by
request id, some of them before the request arrives. The model writes each rule out plainly
(``rules`` has the few formulas it shares); after every step the server's answer and every card
(balances, tier, lifetime paid, coupons, packages) must match it, and ``cardcore verify`` must
find the journal clean at the end of each run.
"""
from __future__ import annotations

import dataclasses
import uuid

import grpc
import pytest
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, precondition, rule

from cardcore import rules
from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import (Client, ServerProcess, bearer, failure_of, new_card_number, rid, run_machine,
                      sent_at)

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
    coupon_used_by: dict = dataclasses.field(default_factory=dict)  # serial -> the sale's seq


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


@dataclasses.dataclass
class Sale:
    """What the model keeps of an applied purchase or top-up, for refunds and reversals."""
    number: str
    request_id: str
    seq: int
    kind: int                 # OPERATION_TYPE_PURCHASE or _TOP_UP
    principal: int            # taken (purchase) or added (top-up)
    bonus: int
    redeemed_points: int = 0
    earned_points: int = 0
    paid: int = 0             # purchase: principal + bonus + the points' fen; top-up: amount
    refunded: int = 0
    reversed: bool = False
    coupon: int = 0           # the coupon serial it used
    tier: int = 0
    tier_after: int = 0
    promotion: int = 0


def pick(data, items: list):
    """One of ``items`` by its position: the list's order is the model's (deterministic), its
    values are the server's (serials, seqs, random card numbers), which differ between runs."""
    return items[data.draw(st.integers(0, len(items) - 1))]


def share(x: int, sale: Sale, before: int, after: int) -> int:
    return rules.undo_share(x, sale.paid, before, after) if sale.paid else (x if not before else 0)


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
        self.sales: list[Sale] = []
        self.replaced_by: dict[str, str] = {}  # a replaced card's number -> its new card's

    def live(self, number: str) -> str:
        """The number that holds what card ``number`` held (rule 16: replacements)."""
        while number in self.replaced_by:
            number = self.replaced_by[number]
        return number

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
        number = self.live(number)
        card = self.model[number]
        pid, bonus = bonus_for(card, amount)
        request_id = str(uuid.uuid4())
        reply = self.client.top_up(number, amount, request_id)
        assert (reply.promotion_id, reply.bonus_delta_minor) == (pid, bonus)
        card.principal += amount
        card.bonus += bonus
        card.top_ups += 1
        card.fixed_uses += pid == 1
        tier = card.tier
        if amount >= SILVER_TOP_UP:
            card.tier = 1
        assert (reply.tier, reply.tier_after) == (tier, card.tier)
        self.sales.append(Sale(number, request_id, reply.seq, cpb.OPERATION_TYPE_TOP_UP, amount,
                               bonus, paid=amount, tier=tier, tier_after=card.tier,
                               promotion=pid))

    @rule(number=cards, gross=st.one_of(st.integers(1, 20_000), amounts),
          redeem=st.sampled_from([0, 0, 50, 100, 250, 5000]),
          with_coupon=st.booleans())
    def purchase(self, number, gross, redeem, with_coupon):
        number = self.live(number)
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
        from_bonus = min(due, card.bonus)
        self.sales.append(Sale(number, request_id, reply.seq, cpb.OPERATION_TYPE_PURCHASE,
                               due - from_bonus, from_bonus, taken, earned, due + redeemed,
                               coupon=serial, tier=card.tier))
        card.points += earned - taken
        card.pay(due)
        if serial:
            card.coupons[serial] = True
            card.coupon_used_by[serial] = reply.seq
        assert reply.tier_after == card.tier
        self.sales[-1].tier_after = card.tier

    @rule(number=cards, with_points=st.booleans())
    def issue_coupon(self, number, with_points):
        number = self.live(number)
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
        number = self.live(number)
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
        number = pick(data, [n for n, c in self.model.items() if c.packages])
        card = self.model[number]
        serial = pick(data, list(card.packages))
        left = card.packages[serial]
        request_id = str(uuid.uuid4())
        reply = self.call(self.stub.UseEntitlement, pb.UseEntitlementRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), package_serial=serial, till=till()),
            R.REASON_OK if left else R.REASON_PACKAGE_USED_UP)
        if reply is not None:
            card.packages[serial] = left - 1

    # ---- money that goes back ------------------------------------------------------------

    def give_back(self, card: ModelCard, sale: Sale, after: int) -> tuple[int, int, int, int]:
        """Rule 12 from what was refunded to ``after``: (principal, bonus, points given back,
        points taken back), applied to the model card."""
        before = sale.refunded
        p, b = rules.undo_money(sale.principal, sale.bonus, sale.paid, before, after)
        back = share(sale.redeemed_points, sale, before, after)
        take = min(share(sale.earned_points, sale, before, after), card.points)
        card.principal += p
        card.bonus += b
        card.lifetime = max(card.lifetime - p - b, 0)
        card.points += back - take
        sale.refunded = after
        return p, b, back, take

    @staticmethod
    def coupon_back(card: ModelCard, sale: Sale) -> None:
        """The sale's coupon, issued again, if it is still the one this sale used (valid: the
        program's coupons last 30 days)."""
        if sale.coupon and card.coupon_used_by.get(sale.coupon) == sale.seq:
            card.coupons[sale.coupon] = False
            del card.coupon_used_by[sale.coupon]

    @precondition(lambda self: any(s.kind == cpb.OPERATION_TYPE_PURCHASE for s in self.sales))
    @rule(data=st.data(), part=st.sampled_from([0, 0, 1, 999, 5000]))
    def refund(self, data, part):
        sale = pick(data, [s for s in self.sales if s.kind == cpb.OPERATION_TYPE_PURCHASE])
        number = self.live(sale.number)  # a sale of a replaced card is refunded to its new one
        card = self.model[number]
        left = sale.paid - sale.refunded
        amount = part or left
        reason = (R.REASON_ALREADY_REVERSED if sale.reversed else
                  R.REASON_REFUND_EXCEEDS_ORIGINAL if not 0 < amount <= left else R.REASON_OK)
        request_id = rid()
        reply = self.call(self.stub.Refund, pb.RefundRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), original_seq=sale.seq, amount_minor=part,
            till=till()), reason, metadata=bearer(self.server.admin_token))
        if reply is None:
            return
        p, b, back, take = self.give_back(card, sale, sale.refunded + amount)
        complete = sale.refunded == sale.paid
        assert (reply.amount_minor, reply.principal_delta_minor, reply.bonus_delta_minor,
                reply.points_earned, reply.points_redeemed, reply.refund_complete) == (
            amount, p, b, back, take, complete)
        if complete:
            self.coupon_back(card, sale)

    @precondition(lambda self: self.sales)
    @rule(data=st.data())
    def reverse(self, data):
        """A reversal by request id, as the till that sent it (the development namespace)."""
        sale = pick(data, self.sales)
        card = self.model[self.live(sale.number)]  # rule 16: undone on the card that holds it
        reason = R.REASON_OK
        if (sale.kind == cpb.OPERATION_TYPE_TOP_UP and not sale.reversed
                and (card.principal < sale.principal or card.bonus < sale.bonus)):
            reason = R.REASON_INSUFFICIENT_FUNDS
        request_id = rid()
        reply = self.call(self.stub.Reverse, pb.ReverseRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=sale.number), original_request_id=sale.request_id,
            till=till()), reason)
        if reply is None:
            return
        if sale.reversed:  # reversed before: nothing moves
            assert (reply.amount_minor, reply.principal_delta_minor, reply.bonus_delta_minor) == (
                0, 0, 0)
            return
        if sale.kind == cpb.OPERATION_TYPE_PURCHASE:
            left = sale.paid - sale.refunded
            p, b, back, take = self.give_back(card, sale, sale.paid)
            want = (left, p, b, back, take)
            self.coupon_back(card, sale)
        else:
            card.principal -= sale.principal
            card.bonus -= sale.bonus
            card.top_ups = max(card.top_ups - 1, 0)
            if sale.promotion == 1:
                card.fixed_uses = max(card.fixed_uses - 1, 0)
            want = (sale.paid, -sale.principal, -sale.bonus, 0, 0)
        assert (reply.amount_minor, reply.principal_delta_minor, reply.bonus_delta_minor,
                reply.points_earned, reply.points_redeemed, reply.refund_complete) == (
            *want, True)
        if card.tier == sale.tier_after and sale.tier < card.tier:
            card.tier = sale.tier  # the upgrade it made, undone
        sale.reversed = True
        assert (reply.original_seq, reply.tier_after) == (sale.seq, card.tier)

    @rule(number=cards, gross=st.integers(1, 5000))
    def reversed_before_it_arrives(self, number, gross):
        """A till gives up on a purchase and reverses it before it reaches the server: the
        reversal moves nothing, and the purchase, arriving then, is refused."""
        number = self.live(number)
        late = rid()
        request_id = rid()
        reply = self.stub.Reverse(pb.ReverseRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), original_request_id=late, till=till()))
        assert (reply.reason, reply.original_seq, reply.amount_minor) == (R.REASON_OK, 0, 0)
        self.call(self.stub.Purchase, pb.PurchaseRequest(
            request_id=late, client_time_us=sent_at(late), card=cpb.CardRef(card_number=number),
            till=till(), gross_amount_minor=gross), R.REASON_REVERSED)

    @rule(number=cards)
    def replace_card(self, number):
        """Rule 16: a new number takes everything; the old one is refused from then on."""
        old = self.live(number)
        card = self.model[old]
        new = new_card_number()
        request_id = rid()
        reply = self.call(self.stub.ReplaceCard, pb.ReplaceCardRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=old), new_card=cpb.CardRef(card_number=new),
            till=till()), R.REASON_OK, metadata=bearer(self.server.admin_token))
        assert (reply.principal_delta_minor, reply.bonus_delta_minor, reply.tier_after) == (
            card.principal, card.bonus, card.tier)
        self.model[new] = self.model.pop(old)
        self.replaced_by[old] = new
        request_id = rid()
        self.call(self.stub.TopUp, pb.TopUpRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=old), amount_minor=100, till=till()),
            R.REASON_CARD_REPLACED)

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
    run_machine(Programs, 40, 40, live.data_dir)
