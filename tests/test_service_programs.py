"""Card programs over gRPC: purchases with lines and points, the figures in every result shape
(unary, batch, GetOperation), Quote as a dry run of the same kernel, and a program change in the
middle of a day, against a real server running the example cafe program."""
from __future__ import annotations

import asyncio
import datetime
import os

import grpc
import pytest

from cardcore.v1 import card_service_pb2 as pb
from cardcore.v1 import common_pb2 as cpb
from conftest import (CAFE_ARGS, EXAMPLES, Admin, Client, bearer, failure_of, journal_entries,
                      new_card_number, rid, sent_at, verify)
from test_programs import load

R = cpb.Reason
DRINKS, FOOD, MERCH = 1, 2, 3


def example(name: str) -> str:
    with open(os.path.join(EXAMPLES, f"{name}.toml"), encoding="utf-8") as f:
        return f.read()


def purchase(number: str, *lines, redeem: int = 0, request_id: str | None = None,
             gross: int = 0, coupon: int = 0, partial: bool = False,
             basket: str = "") -> pb.PurchaseRequest:
    request_id = request_id or rid()
    return pb.PurchaseRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), till=cpb.Till(store_id=1, terminal_id=1, staff_id=9),
        lines=[pb.PurchaseLine(category_code=c, amount_minor=a, quantity=q, sku=s)
               for c, a, q, s in lines],
        redeem_points=redeem, gross_amount_minor=gross, coupon_serial=coupon,
        allow_partial=partial, basket_id=basket)


def quote(number: str, *lines, redeem: int = 0, gross: int = 0, coupon: int = 0) -> pb.QuoteRequest:
    return pb.QuoteRequest(card=cpb.CardRef(card_number=number),
                           till=cpb.Till(store_id=1, terminal_id=1),
                           lines=[pb.PurchaseLine(category_code=c, amount_minor=a, quantity=q, sku=s)
                                  for c, a, q, s in lines],
                           redeem_points=redeem, gross_amount_minor=gross, coupon_serial=coupon)


def silver_card(client: Client, amount: int = 20000) -> str:
    """A silver card (95 %) topped up with ``amount``: 200.00 gets the 20.00 welcome bonus."""
    number = new_card_number()
    client.open(number, tier=1)
    client.top_up(number, amount)
    return number


def test_a_purchase_with_lines_answers_each_line_and_the_buckets(cafe):
    """The worked example of test_card_programs over gRPC: drinks 32.00, food 28.50 and a mug
    99.00 on a silver card: paid 156.48 (discount 3.02), 156 points, 20.00 from bonus first."""
    client = Client(cafe.stub)
    number = silver_card(client)
    request = purchase(number, (DRINKS, 3200, 2, "LATTE-L"), (FOOD, 2850, 1, ""),
                       (MERCH, 9900, 1, "MUG-01"))
    result = cafe.stub.Purchase(request)
    assert (result.amount_minor, result.discount_minor, result.paid_minor, result.points_earned) == (
        15950, 302, 15648, 156)
    assert (result.bonus_delta_minor, result.principal_delta_minor) == (-2000, -13648)
    assert (result.tier, result.tier_after, result.program_version) == (1, 1, 1)
    assert [(x.category_code, x.discount_minor, x.paid_minor, x.points_earned, x.quantity, x.sku)
            for x in result.lines] == [(DRINKS, 160, 3040, 30, 2, "LATTE-L"),
                                       (FOOD, 142, 2708, 27, 1, ""), (MERCH, 0, 9900, 99, 1, "MUG-01")]
    again = cafe.stub.Purchase(request)  # a retry: the same answer, lines and all
    assert again.replayed and again.lines == result.lines and again.seq == result.seq
    asked = cafe.stub.GetOperation(pb.GetOperationRequest(request_id=request.request_id))
    assert asked.state == pb.OPERATION_STATE_APPLIED and asked.result.lines == result.lines
    assert verify(cafe.data_dir)["ok"]


def test_points_redeemed_over_a_batch_and_a_top_up_promotion_in_its_result(cafe):
    """SubmitBatch: a 700.00 top-up gets promotion 1 (50.00 bonus); a 600.00 purchase earns 600
    points; a 10.00 purchase offering 250 points takes 200 (2.00) and earns 8."""
    client = Client(cafe.stub)
    number = new_card_number()
    client.open(number)
    top_id = rid()
    top = pb.TopUpRequest(request_id=top_id, client_time_us=sent_at(top_id),
                          card=cpb.CardRef(card_number=number), amount_minor=70000,
                          till=cpb.Till(store_id=1, terminal_id=1))
    answer = cafe.stub.SubmitBatch(pb.SubmitBatchRequest(operations=[
        pb.Operation(top_up=top),
        pb.Operation(purchase=purchase(number, (FOOD, 30000, 1, ""), (DRINKS, 30000, 1, ""))),
        pb.Operation(purchase=purchase(number, (DRINKS, 1000, 1, ""), redeem=250))]))
    top_r, big, small = answer.results
    assert (top_r.reason, top_r.promotion_id, top_r.bonus_delta_minor) == (R.REASON_OK, 1, 5000)
    assert big.points_earned == 600 and not big.points_redeemed
    assert (small.points_redeemed, small.redeemed_minor, small.paid_minor, small.points_earned) == (
        200, 200, 800, 8)
    assert small.balance_after.points == 600 - 200 + 8
    assert [x.redeemed_minor for x in small.lines] == [200]


def test_quote_is_the_purchase_that_follows_and_writes_nothing(cafe):
    """A quote of a basket gives the figures the purchase then applies, and leaves the journal
    and the card as they were."""
    client = Client(cafe.stub)
    number = silver_card(client)
    basket = ((DRINKS, 3200, 2, "LATTE-L"), (FOOD, 2850, 1, ""), (MERCH, 999, 1, ""))
    before_entries = len(journal_entries(cafe.data_dir))
    before_card = client.card(number)
    q = cafe.stub.Quote(quote(number, *basket))
    assert len(journal_entries(cafe.data_dir)) == before_entries
    assert client.card(number) == before_card
    assert q.reason == R.REASON_OK and q.balance.principal_minor == 20000  # development mode
    done = cafe.stub.Purchase(purchase(number, *basket))
    assert (q.amount_minor, q.discount_minor, q.paid_minor, q.points_earned, q.tier,
            q.tier_after) == (done.amount_minor, done.discount_minor, done.paid_minor,
                              done.points_earned, done.tier, done.tier_after)
    assert (q.principal_paid_minor, q.bonus_paid_minor) == (-done.principal_delta_minor,
                                                            -done.bonus_delta_minor)
    assert list(q.lines) == list(done.lines)


def test_quote_says_why_a_purchase_would_be_declined_and_answers_per_line(cafe):
    client = Client(cafe.stub)
    number = silver_card(client, 10000)  # 100.00 + 20.00 bonus
    q = cafe.stub.Quote(quote(number, gross=20000))
    assert q.reason == R.REASON_INSUFFICIENT_FUNDS
    assert q.failure.available_minor == 12000 and not q.paid_minor
    assert [(x.category_code, x.amount_minor, x.discount_minor) for x in q.lines] == [(0, 20000, 1000)]
    assert cafe.stub.Quote(quote(number, gross=100, redeem=1)).reason == R.REASON_INSUFFICIENT_POINTS
    assert cafe.stub.Quote(quote(number, (9, 100, 1, ""))).reason == R.REASON_UNKNOWN_CATEGORY
    unknown = cafe.stub.Quote(quote(new_card_number(), gross=100))
    assert unknown.reason == R.REASON_CARD_NOT_FOUND


BAD_BASKETS = [
    ("a line without an amount", dict(lines=[(FOOD, 0, 1, "")]), R.REASON_INVALID_AMOUNT,
     "lines[0].amount_minor"),
    ("a category code past 63", dict(lines=[(FOOD, 100, 1, ""), (64, 100, 1, "")]),
     R.REASON_UNKNOWN_CATEGORY, "lines[1].category_code"),
    ("a long sku", dict(lines=[(FOOD, 100, 1, "X" * 25)]), R.REASON_FIELD_TOO_LONG, "lines[0].sku"),
    ("a sku that is not ASCII", dict(lines=[(FOOD, 100, 1, "咖啡")]), R.REASON_INVALID_ARGUMENT,
     "lines[0].sku"),
    ("a gross that is not the lines' sum", dict(lines=[(FOOD, 100, 1, "")], gross=101),
     R.REASON_INVALID_AMOUNT, "gross_amount_minor"),
    ("negative points", dict(lines=[(FOOD, 100, 1, "")], redeem=-1), R.REASON_INVALID_ARGUMENT,
     "redeem_points"),
    ("101 lines", dict(lines=[(FOOD, 1, 1, "")] * 101), R.REASON_INVALID_ARGUMENT, "lines"),
]


@pytest.mark.parametrize("case", BAD_BASKETS, ids=[c[0] for c in BAD_BASKETS])
def test_a_bad_basket_is_refused_with_its_field_and_changes_nothing(module_server, case):
    cafe = module_server(*CAFE_ARGS)  # (each case its own card)
    _, kw, reason, field = case
    client = Client(cafe.stub)
    number = silver_card(client)
    before = client.card(number)
    for call in (lambda: cafe.stub.Purchase(purchase(number, *kw["lines"], redeem=kw.get("redeem", 0),
                                                     gross=kw.get("gross", 0))),
                 lambda: cafe.stub.Quote(quote(number, *kw["lines"], redeem=kw.get("redeem", 0),
                                               gross=kw.get("gross", 0)))):
        with pytest.raises(grpc.RpcError) as err:
            call()
        fail = failure_of(err.value)
        assert (fail.reason, fail.field) == (reason, field)
    assert client.card(number) == before


def test_a_program_change_mid_day_leaves_earlier_receipts_explainable(cafe):
    """Morning under the cafe program (version 1); at noon the chain loads version 2 with drinks
    at 80 % for silver. The morning's receipt still answers with version 1's figures, the
    afternoon's with version 2's, and verify recomputes each under its own version."""
    client = Client(cafe.stub)
    number = silver_card(client)
    morning = cafe.stub.Purchase(purchase(number, (DRINKS, 1000, 1, "")))
    assert (morning.discount_minor, morning.program_version) == (50, 1)
    document = example("cafe").replace('upgrade_spend_minor = 100000',
                                       'upgrade_spend_minor = 100000\n'
                                       'category_rate_bp = { drinks = 8000 }', 1)
    admin = Admin(cafe.channel, cafe.admin_token)
    assert load(admin, document).version == 2
    afternoon = cafe.stub.Purchase(purchase(number, (DRINKS, 1000, 1, "")))
    assert (afternoon.discount_minor, afternoon.program_version) == (200, 2)
    receipt = cafe.stub.GetOperation(pb.GetOperationRequest(request_id=morning.request_id))
    assert (receipt.result.discount_minor, receipt.result.program_version) == (50, 1)
    assert receipt.result.lines == morning.lines
    report = verify(cafe.data_dir)
    assert report["ok"] and report["program_version"] == 2, report["problems"]


@pytest.fixture
def market(start_server):
    return start_server("--program", os.path.join(EXAMPLES, "supermarket.toml"))


FRESH, GROCERY, TOBACCO = 1, 2, 3


def issue(server, number: str, coupon_id: int, token: str | None = None, points: bool = False):
    request_id = rid()
    return server.stub.IssueCoupon(pb.IssueCouponRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), coupon_id=coupon_id, pay_with_points=points,
        till=cpb.Till(store_id=1, terminal_id=1)),
        metadata=bearer(token or server.admin_token) if token is not False else None)


def test_a_coupon_is_given_shown_quoted_used_once_and_shown_used(market):
    client = Client(market.stub)
    number = new_card_number()
    client.open(number)
    client.top_up(number, 200000)
    given = issue(market, number, 1)
    assert (given.type, given.coupon_id) == (cpb.OPERATION_TYPE_COUPON_ISSUED, 1)
    serial = given.coupon_serial
    assert serial == given.seq
    shown = client.card(number).coupons
    assert [(c.serial, c.name, c.state) for c in shown] == [(serial, "50 off 500",
                                                              pb.COUPON_STATE_ISSUED)]
    assert shown[0].valid_until_us - shown[0].valid_from_us == 30 * 86_400_000_000
    basket = ((FRESH, 30000, 1, ""), (GROCERY, 25000, 1, ""), (TOBACCO, 10000, 1, ""))
    q = market.stub.Quote(quote(number, *basket))
    assert [(o.serial, o.reason, o.off_minor) for o in q.coupons] == [(serial, R.REASON_OK, 5000)]
    assert q.best_coupon_serial == serial and q.discount_minor == 0  # quoted without it
    with_coupon = market.stub.Quote(quote(number, *basket, coupon=serial))
    assert (with_coupon.coupon_off_minor, with_coupon.paid_minor) == (5000, 60000)
    done = market.stub.Purchase(purchase(number, *basket, coupon=serial))
    assert (done.coupon_serial, done.coupon_id, done.coupon_off_minor, done.paid_minor) == (
        serial, 1, 5000, 60000)
    assert [(x.discount_minor, x.paid_minor) for x in done.lines] == [(5000, 25000), (0, 25000),
                                                                     (0, 10000)]
    used = client.card(number).coupons[0]
    assert (used.state, used.used_seq, used.off_minor) == (pb.COUPON_STATE_USED, done.seq, 5000)
    with pytest.raises(grpc.RpcError) as err:
        market.stub.Purchase(purchase(number, *basket, coupon=serial))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failure_of(err.value).reason == R.REASON_COUPON_USED
    assert not market.stub.Quote(quote(number, *basket)).coupons  # a used coupon is not offered
    assert verify(market.data_dir)["ok"]


def test_concurrent_purchases_with_one_coupon_exactly_one_gets_it(market):
    client = Client(market.stub)
    number = new_card_number()
    client.open(number)
    client.top_up(number, 10_000_000)
    serial = issue(market, number, 1).coupon_serial

    async def race():
        async with grpc.aio.insecure_channel(market.target) as ch:
            call = ch.unary_unary("/cardcore.v1.CardService/Purchase",
                                  request_serializer=pb.PurchaseRequest.SerializeToString,
                                  response_deserializer=pb.OperationResult.FromString)

            async def one():
                try:
                    return (await call(purchase(number, (GROCERY, 60000, 1, ""), coupon=serial))).reason
                except grpc.aio.AioRpcError as exc:
                    return failure_of(exc).reason

            return await asyncio.gather(*(one() for _ in range(16)))

    reasons = asyncio.run(race())
    assert sorted(reasons) == [R.REASON_OK] + [R.REASON_COUPON_USED] * 15
    assert client.card(number).balance.principal_minor == 10_000_000 - 55000


def test_a_campaign_gives_coupons_in_bulk_and_points_buy_one(market):
    """A campaign: one SubmitBatch of IssueCoupon operations, one per card. A member buys coupon
    2 (500 points) from the terminal; without an operator a free coupon is refused."""
    client = Client(market.stub)
    numbers = [new_card_number() for _ in range(5)]
    for n in numbers:
        client.open(n)
    ops = []
    for n in numbers:
        request_id = rid()
        ops.append(pb.Operation(issue_coupon=pb.IssueCouponRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=n), coupon_id=1, till=cpb.Till(store_id=1, terminal_id=1))))
    answer = market.stub.SubmitBatch(pb.SubmitBatchRequest(operations=ops),
                                     metadata=bearer(market.admin_token))
    assert [r.reason for r in answer.results] == [R.REASON_OK] * 5
    assert all(len(client.card(n).coupons) == 1 for n in numbers)
    buyer = numbers[0]
    client.top_up(buyer, 100000)
    market.stub.Purchase(purchase(buyer, (GROCERY, 40000, 1, "")))  # 100 on opening + 400
    bought = issue(market, buyer, 2, token=False, points=True)
    assert (bought.points_redeemed, bought.balance_after.points) == (500, 0)
    with pytest.raises(grpc.RpcError) as err:
        issue(market, buyer, 1, token=False)
    assert failure_of(err.value).reason == R.REASON_OPERATOR_REQUIRED
    with pytest.raises(grpc.RpcError) as err:
        issue(market, buyer, 77)
    assert (err.value.code(), failure_of(err.value).reason) == (grpc.StatusCode.NOT_FOUND,
                                                                R.REASON_COUPON_NOT_FOUND)


@pytest.fixture
def salon(start_server):
    return start_server("--program", os.path.join(EXAMPLES, "salon.toml"))


def test_a_count_card_is_sold_checked_at_the_chair_used_and_shown(salon):
    """SellPackage "10 haircuts" (800.00 from the balance); CheckEntitlement says entitled and
    which package, without a journal entry; UseEntitlement counts it down and records the
    stylist; GetCard shows the package with its uses left."""
    client = Client(salon.stub)
    number = new_card_number()
    client.open(number)
    client.top_up(number, 100000)
    request_id = rid()
    sold = salon.stub.SellPackage(pb.SellPackageRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), package_id=1,
        till=cpb.Till(store_id=1, terminal_id=1)))
    assert (sold.type, sold.package_id, sold.package_serial, sold.amount_minor) == (
        cpb.OPERATION_TYPE_PACKAGE_SOLD, 1, sold.seq, 80000)
    before = len(journal_entries(salon.data_dir))
    check = salon.stub.CheckEntitlement(pb.CheckEntitlementRequest(
        card=cpb.CardRef(card_number=number), category_code=1, has_category=True))
    assert (check.entitled, check.serial) == (True, sold.seq)
    assert [(p.name, p.kind, p.uses_left, p.usable) for p in check.packages] == [
        ("10 haircuts", pb.PACKAGE_KIND_COUNT, 10, True)]
    other_category = salon.stub.CheckEntitlement(pb.CheckEntitlementRequest(
        card=cpb.CardRef(card_number=number), category_code=2, has_category=True))
    assert not other_category.entitled
    assert len(journal_entries(salon.data_dir)) == before  # a read
    request_id = rid()
    used = salon.stub.UseEntitlement(pb.UseEntitlementRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), package_serial=check.serial,
        till=cpb.Till(store_id=1, terminal_id=1, staff_id=42)))
    assert (used.type, used.package_serial, used.package_id) == (
        cpb.OPERATION_TYPE_PACKAGE_USED, sold.seq, 1)
    assert journal_entries(salon.data_dir)[-1][20] == 42  # the stylist, for the staff reports
    shown = client.card(number).packages
    assert [(p.serial, p.uses_left, p.uses) for p in shown] == [(sold.seq, 9, 1)]
    with pytest.raises(grpc.RpcError) as err:
        request_id = rid()
        salon.stub.UseEntitlement(pb.UseEntitlementRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), package_serial=sold.seq + 1000,
            till=cpb.Till(store_id=1, terminal_id=1)))
    assert (err.value.code(), failure_of(err.value).reason) == (grpc.StatusCode.NOT_FOUND,
                                                                R.REASON_PACKAGE_NOT_FOUND)
    assert verify(salon.data_dir)["ok"]


def test_get_card_shows_where_the_points_are(start_server, tmp_path):
    """With points_expire_days = 365, GetCard lists today's lot and when it expires."""
    path = tmp_path / "cafe-expiring.toml"
    path.write_text("points_expire_days = 365\n" + example("cafe"))
    server = start_server("--program", str(path))
    client = Client(server.stub)
    number = new_card_number()
    client.open(number)
    client.top_up(number, 50000)
    done = server.stub.Purchase(purchase(number, (FOOD, 12345, 1, "")))
    (lot,) = client.card(number).points_lots
    day = done.applied_at_us // 86_400_000_000
    assert (lot.points, lot.expires_at_us) == (123, (day + 365) * 86_400_000_000)
    assert lot.earned_on == str(datetime.date(1970, 1, 1) + datetime.timedelta(days=day))


def test_points_are_exchanged_and_a_gift_redeemed_over_grpc(market):
    client = Client(market.stub)
    number = new_card_number()
    client.open(number)
    client.top_up(number, 300000)
    market.stub.Purchase(purchase(number, (GROCERY, 190000, 1, "")))  # 1,900 + 100 points
    request_id = rid()
    exchanged = market.stub.ExchangePoints(pb.ExchangePointsRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), points=1000, till=cpb.Till(store_id=1, terminal_id=1)))
    assert (exchanged.type, exchanged.points_redeemed, exchanged.bonus_delta_minor,
            exchanged.balance_after.points) == (cpb.OPERATION_TYPE_POINTS_EXCHANGED, 1000, 500, 1000)
    request_id = rid()
    gift = market.stub.RedeemGift(pb.RedeemGiftRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=number), gift_id=1, till=cpb.Till(store_id=1, terminal_id=1)))
    assert (gift.type, gift.gift_id, gift.points_redeemed, gift.balance_after.points) == (
        cpb.OPERATION_TYPE_GIFT_REDEEMED, 1, 800, 200)
    with pytest.raises(grpc.RpcError) as err:
        request_id = rid()
        market.stub.RedeemGift(pb.RedeemGiftRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=number), gift_id=1,
            till=cpb.Till(store_id=1, terminal_id=1)))
    assert failure_of(err.value).reason == R.REASON_INSUFFICIENT_POINTS
    assert verify(market.data_dir)["ok"]


def test_a_card_opened_on_a_referral_pays_its_referrer(start_server, tmp_path):
    path = tmp_path / "refer.toml"
    path.write_text("referral_points = 500\n" + example("supermarket"))
    server = start_server("--program", str(path))
    client = Client(server.stub)
    referrer, newcomer = new_card_number(), new_card_number()
    client.open(referrer)
    request_id = rid()
    server.stub.OpenCard(pb.OpenCardRequest(
        request_id=request_id, client_time_us=sent_at(request_id),
        card=cpb.CardRef(card_number=newcomer), referrer_card_number=referrer,
        till=cpb.Till(store_id=1, terminal_id=1)))
    assert client.card(referrer).balance.points == 100 + 500
    assert journal_entries(server.data_dir)[-1][1] == cpb.OPERATION_TYPE_REFERRAL_BONUS
    with pytest.raises(grpc.RpcError) as err:  # a card cannot refer itself
        request_id = rid()
        server.stub.OpenCard(pb.OpenCardRequest(
            request_id=request_id, client_time_us=sent_at(request_id),
            card=cpb.CardRef(card_number=referrer), referrer_card_number=referrer,
            till=cpb.Till(store_id=1, terminal_id=1)))
    assert failure_of(err.value).field == "referrer_card_number"
    assert verify(server.data_dir)["ok"]


def test_split_tender_takes_what_the_card_has_and_lists_the_basket(cafe):
    """A silver card (95 %) with 100.00 + 20.00 bonus buys food for 200.00 (pays 190.00) with
    allow_partial: the card pays the 120.00 it has (bonus first), earns points on that only (the
    lines in order: 120 points), and 70.00 remain for the till. A second card pays the rest
    under the same basket; GetBasket lists both payments and what is left due (0)."""
    client = Client(cafe.stub)
    first = silver_card(client, 10000)
    second = new_card_number()
    client.open(second)
    client.top_up(second, 10000)
    paid = cafe.stub.Purchase(purchase(first, (FOOD, 20000, 1, ""), partial=True, basket="B-1"))
    assert (paid.paid_minor, paid.remainder_due_minor, paid.points_earned,
            paid.bonus_delta_minor) == (12000, 7000, 120, -2000)
    assert client.card(first).balance.available_minor == 0
    rest = cafe.stub.Purchase(purchase(second, (FOOD, 7000, 1, ""), basket="B-1"))
    assert (rest.paid_minor, rest.remainder_due_minor) == (7000, 0)
    listed = cafe.stub.GetBasket(pb.GetBasketRequest(basket_id="B-1"))
    assert [(p.seq, p.paid_minor, p.remainder_due_minor) for p in listed.payments] == [
        (paid.seq, 12000, 7000), (rest.seq, 7000, 0)]
    assert listed.remainder_due_minor == 0
    with pytest.raises(grpc.RpcError) as err:  # without allow_partial a short balance declines
        cafe.stub.Purchase(purchase(first, (FOOD, 100, 1, "")))
    assert failure_of(err.value).reason == R.REASON_INSUFFICIENT_FUNDS
    assert verify(cafe.data_dir)["ok"]
