"""Money that goes back (rules 12 and 13 of cardcore.rules): refunds and reversals as a chain's
accountant checks them, through the real ledger over LMDB on the example cafe program. Each
test's docstring has the arithmetic; the figures asserted are the ones written there."""
from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cardcore import layout as L
from cardcore import rules
from cardcore.verify import verify
from test_card_programs import (CAFE_DRINKS, CAFE_FOOD, FRESH, GROCERY, TOBACCO, Till, cafe_ledger,
                                example, example_ledger, figures, line, lots_of)
from test_ledger import cid, key, op

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def cafe(tmp_path):
    with cafe_ledger(str(tmp_path / "cafe")) as till:
        yield till


def seq_of(outcome) -> int:
    return L.JOURNAL.unpack(outcome.entry)[7]


def refund(till: Till, number: str, original_seq: int, amount: int = 0):
    return till.apply(refund_op(till, number, original_seq, amount))[0]


def refund_op(till: Till, number: str, original_seq: int, amount: int = 0):
    return op(till.rid(), L.OP_REFUND, number, amount, at=till.at + 1, link_seq=original_seq)


def reverse_op(till: Till, number: str, original_id: str, request_id: str | None = None):
    return op(request_id or till.rid(), L.OP_REVERSAL, number, 0, at=till.at + 1,
              original_key=key(original_id))


def undo_flags(outcome) -> int:
    return L.JOURNAL_PURCHASE_FLAGS.unpack_from(outcome.entry, L.JOURNAL_OFF_PURCHASE_FLAGS)[0]


def a_sale(till: Till, number: str):
    """A cafe card topped up with 300.00 (the welcome bonus: 20.00), then a sale of food 80.00
    and drinks 40.00 at standard (100 %): bonus first, so 20.00 bonus and 100.00 principal;
    120 points earned."""
    till.open(number)
    till.top_up(number, 30000)
    sale = till.buy(number, line(CAFE_FOOD, 8000), line(CAFE_DRINKS, 4000))
    f = figures(sale)
    assert (f["principal"], f["bonus"], f["points"]) == (-10000, -2000, 120)
    return sale


def test_a_sale_refunded_in_two_parts_gives_each_bucket_back_exactly(cafe):
    """Refund 30.00 of the 120.00 sale: a quarter of each figure, floored: principal 25.00,
    bonus 5.00, 30 of the 120 points taken back. Refund the rest (amount 0): principal 75.00,
    bonus 15.00, 90 points; the card is back at 300.00 + 20.00 and 0 points, lifetime paid 0.
    A third refund finds nothing left: REFUND_EXCEEDS_ORIGINAL, 0 available."""
    number = "6225880000000501"
    sale = a_sale(cafe, number)
    first = refund(cafe, number, seq_of(sale), 3000)
    f = figures(first)
    assert (first.reason, f["amount"], f["principal"], f["bonus"], f["points"], f["taken"]) == (
        L.R_OK, 3000, 2500, 500, -30, 30)
    assert not undo_flags(first) & L.UNDO_COMPLETE
    assert L.JOURNAL.unpack(first.entry)[28] == seq_of(sale)  # the link to the sale
    rest = refund(cafe, number, seq_of(sale))
    f = figures(rest)
    assert (f["amount"], f["principal"], f["bonus"], f["points"]) == (9000, 7500, 1500, -90)
    assert undo_flags(rest) & L.UNDO_COMPLETE
    assert cafe.card(number) == dict(tier=0, principal=30000, bonus=2000, points=0, lifetime=0)
    more = refund(cafe, number, seq_of(sale), 1)
    assert (more.reason, more.available_minor) == (L.R_REFUND_EXCEEDS_ORIGINAL, 0)


def test_points_a_sale_redeemed_come_back_and_points_it_earned_go(cafe):
    """600.00 of food earns 600 points. A 10.00 drink offering 500 points: the cap is half the
    bill, 5.00, so the 500 points pay 5.00 and the card 5.00, earning 5 points: 600 - 500 + 5 =
    105. Its full refund gives back the card's 5.00 and the 500 points and takes the 5: 600
    points again, in lots that still add up to them."""
    number = "6225880000000502"
    cafe.open(number)
    cafe.top_up(number, 90000)
    cafe.buy(number, line(CAFE_FOOD, 60000))
    sale = cafe.buy(number, line(CAFE_DRINKS, 1000), redeem=500)
    assert (figures(sale)["taken"], cafe.card(number)["points"]) == (500, 105)
    back = refund(cafe, number, seq_of(sale))
    f = figures(back)
    assert (f["amount"], f["principal"] + f["bonus"], f["taken"], f["redeemed"], f["points"]) == (
        1000, 500, 5, 500, 495)
    assert cafe.card(number)["points"] == 600
    assert sum(left for left, _ in lots_of(cafe, number).values()) == 600


def test_a_fully_refunded_sale_gives_its_coupon_back_a_partial_one_does_not(cafe):
    """A free-drink coupon (given by an operator) takes the 30.00 drink off a basket with 20.00
    of food: the sale costs 20.00. Refunding 10.00 leaves the coupon used; refunding the other
    10.00 gives it back, issued and usable again."""
    number = "6225880000000503"
    cafe.open(number)
    cafe.top_up(number, 90000)
    serial = seq_of(cafe.issue(number, 1))
    sale = cafe.buy(number, line(CAFE_FOOD, 2000), line(CAFE_DRINKS, 3000), coupon=serial)
    assert (figures(sale)["discount"], figures(sale)["principal"] + figures(sale)["bonus"]) == (
        3000, -2000)

    def state():
        return {c[6]: c[1] for c in cafe.ledger.read_coupons(cid(number))}[serial]

    refund(cafe, number, seq_of(sale), 1000)
    assert state() == L.COUPON_USED
    refund(cafe, number, seq_of(sale))
    assert state() == L.COUPON_ISSUED
    again = cafe.buy(number, line(CAFE_DRINKS, 3000), line(CAFE_FOOD, 100), coupon=serial)
    assert (again.reason, figures(again)["discount"]) == (L.R_OK, 3000)


def test_what_cannot_be_refunded_is_refused_and_changes_nothing(cafe):
    """A top-up, a refund, another card's sale, a sequence never written: each refused with its
    reason; 200.00 of a 120.00 sale: REFUND_EXCEEDS_ORIGINAL with 120.00 available."""
    number, other = "6225880000000504", "6225880000000505"
    sale = a_sale(cafe, number)
    cafe.open(other)
    top_up = cafe.top_up(other, 5000)
    before = (cafe.card(number), cafe.card(other))
    assert refund(cafe, other, seq_of(top_up)).reason == L.R_NOT_REFUNDABLE
    assert refund(cafe, other, seq_of(sale)).reason == L.R_ORIGINAL_NOT_FOUND
    assert refund(cafe, number, 10**9).reason == L.R_ORIGINAL_NOT_FOUND
    over = refund(cafe, number, seq_of(sale), 20000)
    assert (over.reason, over.available_minor) == (L.R_REFUND_EXCEEDS_ORIGINAL, 12000)
    assert (cafe.card(number), cafe.card(other)) == before
    part = refund(cafe, number, seq_of(sale), 100)
    assert refund(cafe, number, seq_of(part)).reason == L.R_NOT_REFUNDABLE


def test_two_refunds_of_one_sale_in_one_group_never_exceed_it(cafe):
    """Two refunds of 70.00 of the 120.00 sale in the same group: the first gives back 70.00,
    the second is refused with 50.00 left."""
    number = "6225880000000506"
    sale = a_sale(cafe, number)
    first, second = cafe.apply(refund_op(cafe, number, seq_of(sale), 7000),
                               refund_op(cafe, number, seq_of(sale), 7000))
    assert first.reason == L.R_OK
    assert (second.reason, second.available_minor) == (L.R_REFUND_EXCEEDS_ORIGINAL, 5000)


def test_a_refund_in_the_same_group_as_its_sale_sees_it(cafe):
    number = "6225880000000507"
    cafe.open(number)
    cafe.top_up(number, 30000)
    sale_op = cafe.purchase(number, line(CAFE_FOOD, 5000))
    sale_seq = cafe.ledger.next_seq
    sale, back = cafe.apply(sale_op, refund_op(cafe, number, sale_seq))
    assert (seq_of(sale), back.reason, figures(back)["amount"]) == (sale_seq, L.R_OK, 5000)


def test_a_reversal_undoes_a_sale_and_the_upgrade_it_made(cafe):
    """Cafe silver at 1000.00 spent. Two top-ups of 900.00 (no gold; each gets "top up 500 get
    50": 100.00 bonus in all), then a sale of 1000.00 lifts the card to silver; its reversal
    gives the 1000.00 back as it was taken (bonus first: 100.00 bonus, 900.00 principal), takes
    the 1000 points, and the card is standard again with lifetime paid 0. A second reversal of
    the same request (another id) moves nothing."""
    number = "6225880000000508"
    cafe.open(number)
    cafe.top_up(number, 90000)
    cafe.top_up(number, 90000)
    sale = cafe.buy(number, line(CAFE_FOOD, 100000), request_id="sale-1")
    assert figures(sale)["tier_after"] == 1
    before_sale = dict(tier=0, principal=180000, bonus=10000, points=0, lifetime=0)
    (undone,) = cafe.apply(reverse_op(cafe, number, "sale-1"))
    f = figures(undone)
    assert (undone.reason, f["amount"], f["principal"], f["bonus"], f["points"], f["tier"],
            f["tier_after"]) == (L.R_OK, 100000, 90000, 10000, -1000, 1, 0)
    assert undo_flags(undone) & L.UNDO_COMPLETE
    assert cafe.card(number) == before_sale
    (again,) = cafe.apply(reverse_op(cafe, number, "sale-1"))
    assert again.reason == L.R_OK and not any(figures(again)[k] for k in (
        "amount", "principal", "bonus", "points"))
    assert cafe.card(number) == before_sale
    assert refund(cafe, number, seq_of(sale)).reason == L.R_ALREADY_REVERSED


def test_a_reversed_top_up_takes_back_its_bonus_and_its_promotion(cafe):
    """The first top-up of 300.00 gets the welcome bonus 20.00; reversed, the card is empty
    again and has never been topped up, so the next top-up gets the welcome bonus again."""
    number = "6225880000000509"
    cafe.open(number)
    first = cafe.apply(op("first", L.OP_TOP_UP, number, 30000, at=cafe.at + 1))[0]
    assert figures(first)["bonus"] == 2000
    (undone,) = cafe.apply(reverse_op(cafe, number, "first"))
    assert (figures(undone)["principal"], figures(undone)["bonus"]) == (-30000, -2000)
    assert cafe.card(number) == dict(tier=0, principal=0, bonus=0, points=0, lifetime=0)
    assert figures(cafe.top_up(number, 30000))["bonus"] == 2000


def test_a_top_up_already_spent_cannot_be_reversed(cafe):
    number = "6225880000000510"
    cafe.open(number)
    cafe.apply(op("load", L.OP_TOP_UP, number, 30000, at=cafe.at + 1))
    cafe.buy(number, line(CAFE_FOOD, 25000))
    (refused,) = cafe.apply(reverse_op(cafe, number, "load"))
    assert refused.reason == L.R_INSUFFICIENT_FUNDS


def test_a_reversal_before_its_request_leaves_a_tombstone(cafe):
    """A terminal times out on request "late" and reverses it before the request reaches the
    writer: the reversal applies and moves nothing; the request, arriving then (and on every
    retry), is refused with REVERSED and changes nothing."""
    number = "6225880000000511"
    cafe.open(number)
    cafe.top_up(number, 30000)
    before = cafe.card(number)
    (tomb,) = cafe.apply(reverse_op(cafe, number, "late"))
    assert tomb.reason == L.R_OK and L.JOURNAL.unpack(tomb.entry)[28] == 0
    late = cafe.purchase(number, line(CAFE_FOOD, 5000), request_id="late")
    assert cafe.apply(late)[0].reason == L.R_REVERSED
    assert cafe.apply(late)[0].reason == L.R_REVERSED
    assert cafe.card(number) == before


def test_a_reversal_of_a_declined_request_moves_nothing(cafe):
    number = "6225880000000512"
    cafe.open(number)
    sale = cafe.purchase(number, line(CAFE_FOOD, 5000), request_id="short")
    assert cafe.apply(sale)[0].reason == L.R_INSUFFICIENT_FUNDS
    (undone,) = cafe.apply(reverse_op(cafe, number, "short"))
    assert undone.reason == L.R_OK and not figures(undone)["amount"]
    assert cafe.apply(sale)[0].reason == L.R_INSUFFICIENT_FUNDS  # its own answer, replayed


def test_a_reversal_after_the_window_is_refused(tmp_path):
    """reversal_window_minutes = 30: a sale reversed 31 minutes later is refused."""
    till = Till(str(tmp_path / "w"), "reversal_window_minutes = 30\n" + example("cafe"))
    number = "6225880000000513"
    till.open(number)
    till.top_up(number, 30000)
    sale = till.buy(number, line(CAFE_FOOD, 5000), request_id="old")
    at = L.JOURNAL.unpack(sale.entry)[17] + 31 * 60_000_000  # the sale's time, 31 minutes on
    (refused,) = till.apply(op(till.rid(), L.OP_REVERSAL, number, 0, at=at,
                               original_key=key("old")), at=at)
    assert refused.reason == L.R_REVERSAL_WINDOW_PASSED
    assert verify(till.ledger)["ok"]
    till.ledger.close()


@pytest.mark.parametrize("seed", range(40))
def test_a_sale_and_its_reversal_in_any_order_leave_the_card_as_it_was(tmp_path, seed):
    """A sale "s" and its reversal "r", each sent one to three times, in a random order, split
    into random groups: whatever the order, the card ends as it started, the sale's every
    answer is OK (it came before the reversal: then undone) or REVERSED (it came after), the
    reversal's every answer is OK, and verify is clean."""
    rng = random.Random(seed)
    till = Till(str(tmp_path / f"o{seed}"), example("cafe"))
    number = "6225880000000514"
    till.open(number)
    till.top_up(number, 30000)
    start = till.card(number)
    sale = till.purchase(number, line(CAFE_FOOD, 5000), request_id="s")
    reversal = reverse_op(till, number, "s", request_id="r")
    sends = [sale] * rng.randint(1, 3) + [reversal] * rng.randint(1, 3)
    rng.shuffle(sends)
    answers: dict[int, set[int]] = {L.OP_PURCHASE: set(), L.OP_REVERSAL: set()}
    while sends:
        take = rng.randint(1, len(sends))
        group, sends = sends[:take], sends[take:]
        for sent, outcome in zip(group, till.apply(*group)):
            answers[sent.packed[0]].add(outcome.reason)
    assert till.card(number) == start
    assert answers[L.OP_REVERSAL] == {L.R_OK}
    assert answers[L.OP_PURCHASE] in ({L.R_OK}, {L.R_REVERSED})
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


@given(x=st.integers(0, 10**12), paid=st.integers(1, 10**6), data=st.data())
def test_the_shares_of_all_of_a_sales_refunds_add_up_to_each_figure(x, paid, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, paid), max_size=8)))
    points = [0, *cuts, paid]
    parts = [rules.undo_share(x, paid, a, b) for a, b in zip(points, points[1:])]
    assert sum(parts) == x and min(parts) >= 0


def test_a_refund_takes_back_no_more_points_than_the_card_holds(cafe):
    """600.00 of food earns 600 points. A 600.00 drink redeeming them (600 points = 6.00) pays
    594.00 and earns 594 (and reaches silver). A 10.00 sale at silver (9.50) redeems 400 of
    them (the cap: 4.75, whole blocks of 1.00) and earns 5: the card holds 199. The drink's
    full refund gives back its 600 redeemed points and would take back its 594 earned: the
    card holds 199, so 199 go, and it ends with 199 + 600 - 199 = 600 points, in lots that add
    up to them (the rule takes the loss before the gain, so it never takes more than there)."""
    number = "6225880000000515"
    cafe.open(number)
    cafe.top_up(number, 90000)
    cafe.top_up(number, 90000)
    cafe.buy(number, line(CAFE_FOOD, 60000))
    drink = cafe.buy(number, line(CAFE_DRINKS, 60000), redeem=600)
    assert (figures(drink)["taken"], figures(drink)["points"]) == (600, 594 - 600)
    cafe.buy(number, line(CAFE_FOOD, 1000), redeem=500)
    assert cafe.card(number)["points"] == 199
    back = refund(cafe, number, seq_of(drink))
    f = figures(back)
    assert (back.reason, f["taken"], f["points"], f["principal"]) == (L.R_OK, 199, 401, 59400)
    assert cafe.card(number)["points"] == 600
    assert sum(left for left, _ in lots_of(cafe, number).values()) == 600


def test_a_part_refund_of_a_sale_paid_without_points_gives_back_exactly_what_is_asked(cafe):
    """The 120.00 sale (100.00 principal, 20.00 bonus): refunds of 0.01, 0.05 and 0.07 give back
    exactly 1, 5 and 7 fen (bonus by its share of the money given back, cumulatively: 0, 0, 1
    ... never a negative part), and the rest ends every bucket exact."""
    number = "6225880000000517"
    sale = a_sale(cafe, number)
    for fen in (1, 5, 7):
        f = figures(refund(cafe, number, seq_of(sale), fen))
        assert f["principal"] + f["bonus"] == fen and min(f["principal"], f["bonus"]) >= 0
        assert f["redeemed"] == 0
    refund(cafe, number, seq_of(sale))
    assert cafe.card(number) == dict(tier=0, principal=30000, bonus=2000, points=0, lifetime=0)


def test_a_reversal_naming_another_cards_request_is_refused(cafe):
    number, other = "6225880000000518", "6225880000000519"
    a_sale(cafe, number)
    cafe.open(other)
    sale = cafe.buy(number, line(CAFE_FOOD, 100), request_id="mine")
    (refused,) = cafe.apply(reverse_op(cafe, other, "mine"))
    assert refused.reason == L.R_ORIGINAL_NOT_FOUND
    assert sale.reason == L.R_OK


def test_a_declined_reversal_does_not_cost_a_later_one_its_tombstone(cafe):
    """Two reversals of the unknown request "y" in one group, the first on a card that does not
    exist (declined): the second applies and leaves the tombstone, so "y" is refused after."""
    number = "6225880000000520"
    cafe.open(number)
    cafe.top_up(number, 30000)
    first, second = cafe.apply(reverse_op(cafe, "6225880000000521", "y"),
                               reverse_op(cafe, number, "y"))
    assert (first.reason, second.reason) == (L.R_CARD_NOT_FOUND, L.R_OK)
    late = cafe.purchase(number, line(CAFE_FOOD, 100), request_id="y")
    assert cafe.apply(late)[0].reason == L.R_REVERSED


def test_a_request_after_a_declined_reversal_in_its_group_applies(cafe):
    """A reversal of unknown "z" that is declined (no such card), then "z" in the same group:
    no tombstone was left, so "z" applies."""
    number = "6225880000000522"
    cafe.open(number)
    cafe.top_up(number, 30000)
    late = cafe.purchase(number, line(CAFE_FOOD, 100), request_id="z")
    declined, applied = cafe.apply(reverse_op(cafe, "6225880000000523", "z"), late)
    assert (declined.reason, applied.reason) == (L.R_CARD_NOT_FOUND, L.R_OK)



# ---- refunds by line (rule 12) ------------------------------------------------------------------

@pytest.fixture
def market(tmp_path):
    """A ledger on the example supermarket program, verified clean when the test is done."""
    with example_ledger(str(tmp_path / "market"), "supermarket") as till:
        yield till


def refund_lines(till: Till, number: str, original_seq: int, *numbers: int, amount: int = 0):
    return till.apply(refund_lines_op(till, number, original_seq, *numbers, amount=amount))[0]


def refund_lines_op(till: Till, number: str, original_seq: int, *numbers: int, amount: int = 0):
    return op(till.rid(), L.OP_REFUND, number, amount, at=till.at + 1, link_seq=original_seq,
              refund_lines=bytes(numbers))


def given_back(outcome) -> list[tuple[int, int, int, int]]:
    """A refund by line's stored lines: (line number, category, gross, discount) each."""
    return [(number, code, gross, discount)
            for code, number, _, gross, discount, *_ in L.LINE.iter_unpack(outcome.lines)]


def a_basket(till: Till, number: str):
    """A gold card (fresh at 90 %, groceries at 95 %, tobacco never discounted and earning
    nothing, 2 points per 1.00) with 1,000.00 and the 100 activation points, a "50 off 500"
    coupon, and a sale: fresh 200.00 -> 180.00, groceries 400.00 -> 380.00, tobacco 50.00. The
    coupon's 50.00 comes off the first eligible line: line 1 paid 130.00 (discount 70.00), line 2
    380.00 (20.00), line 3 50.00: 560.00 from principal; 260 + 760 + 0 = 1,020 points."""
    till.open(number, 2)
    till.top_up(number, 100000)
    serial = seq_of(till.issue(number, 1))
    sale = till.buy(number, line(FRESH, 20000), line(GROCERY, 40000), line(TOBACCO, 5000),
                    coupon=serial)
    f = figures(sale)
    assert (f["amount"], f["discount"], f["principal"], f["points"]) == (65000, 9000, -56000, 1020)
    assert [(d, p) for _, _, _, _, d, p, _, _ in L.LINE.iter_unpack(sale.lines)] == [
        (7000, 260), (2000, 760), (0, 0)]
    return sale, serial


def test_a_sales_lines_refunded_one_by_one_give_back_what_a_full_refund_gives(market):
    """The basket's lines given back one by one, tobacco first: 50.00 (its share of the 1,020
    points: 1,020 * 5,000 // 56,000 = 91), then the fresh line 130.00 (1,020 * 18,000 // 56,000
    - 91 = 236), then the groceries 380.00 (1,020 - 327 = 693): 560.00 and 1,020 points, the
    last one complete, the coupon back. A twin card refunded in full in one go ends the same:
    1,000.00, the 100 activation points, lifetime paid 0."""
    number, twin = "6225880000000711", "6225880000000729"
    sale, serial = a_basket(market, number)
    twin_sale, _ = a_basket(market, twin)
    done = []
    for n in (3, 1, 2):
        back = refund_lines(market, number, seq_of(sale), n)
        f = figures(back)
        done.append((back.reason, f["amount"], f["principal"], f["taken"], f["lines"],
                     bool(undo_flags(back) & L.UNDO_COMPLETE), given_back(back)))
    assert done == [(L.R_OK, 5000, 5000, 91, 1, False, [(3, TOBACCO, 5000, 0)]),
                    (L.R_OK, 13000, 13000, 236, 1, False, [(1, FRESH, 20000, 7000)]),
                    (L.R_OK, 38000, 38000, 693, 1, True, [(2, GROCERY, 40000, 2000)])]
    whole = refund(market, twin, seq_of(twin_sale))
    assert (figures(whole)["amount"], figures(whole)["taken"]) == (56000, 1020)
    assert market.card(number) == market.card(twin) == dict(
        tier=2, principal=100000, bonus=0, points=100, lifetime=0)
    assert {c[6]: c[1] for c in market.ledger.read_coupons(cid(number))}[serial] == \
        L.COUPON_ISSUED


def test_a_line_is_given_back_once_and_a_line_the_sale_has_not_is_not_found(market):
    """Lines 1 and 3 together: 180.00 (130.00 + 50.00), two lines stored with their numbers.
    Line 3 again: LINE_ALREADY_REFUNDED; line 4 of a 3-line sale: LINE_NOT_FOUND; lines with an
    amount: INVALID_ARGUMENT. None of them moves anything; line 2 still gives back 380.00."""
    number = "6225880000000737"
    sale, _ = a_basket(market, number)
    both = refund_lines(market, number, seq_of(sale), 1, 3)
    assert (both.reason, figures(both)["amount"], [n for n, *_ in given_back(both)]) == (
        L.R_OK, 18000, [1, 3])
    card = market.card(number)
    assert refund_lines(market, number, seq_of(sale), 3).reason == L.R_LINE_ALREADY_REFUNDED
    assert refund_lines(market, number, seq_of(sale), 2, 3).reason == L.R_LINE_ALREADY_REFUNDED
    assert refund_lines(market, number, seq_of(sale), 4).reason == L.R_LINE_NOT_FOUND
    assert refund_lines(market, number, seq_of(sale), 2, amount=100).reason == \
        L.R_INVALID_ARGUMENT
    assert market.card(number) == card
    last = refund_lines(market, number, seq_of(sale), 2)
    assert (last.reason, figures(last)["amount"], bool(undo_flags(last) & L.UNDO_COMPLETE)) == (
        L.R_OK, 38000, True)


def test_lines_of_a_sale_without_lines_are_invalid_and_amounts_and_lines_share_what_is_left(
        market):
    """A sale of 100.00 sent without lines: a refund by line is INVALID_ARGUMENT. The basket
    refunded 500.00 by amount first: 60.00 is left, so line 3 (50.00) goes back, but line 1
    (130.00) exceeds what is left (REFUND_EXCEEDS_ORIGINAL, 10.00 available)."""
    number = "6225880000000745"
    sale, _ = a_basket(market, number)
    plain = market.buy(number, amount=10000)
    assert refund_lines(market, number, seq_of(plain), 1).reason == L.R_INVALID_ARGUMENT
    assert refund(market, number, seq_of(sale), 50000).reason == L.R_OK
    assert figures(refund_lines(market, number, seq_of(sale), 3))["amount"] == 5000
    over = refund_lines(market, number, seq_of(sale), 1)
    assert (over.reason, over.available_minor) == (L.R_REFUND_EXCEEDS_ORIGINAL, 1000)


def test_line_refunds_of_one_sale_in_one_group_are_judged_in_order(market):
    """One group: the sale (the entry after its coupon's), then line 2, line 2 again, and lines
    1 and 3, each judged after the one before it: 380.00, LINE_ALREADY_REFUNDED, then 180.00,
    complete."""
    number = "6225880000000752"
    market.open(number, 2)
    market.top_up(number, 100000)
    serial = seq_of(market.issue(number, 1))
    seq = serial + 1
    sale, two, again, rest = market.apply(
        market.purchase(number, line(FRESH, 20000), line(GROCERY, 40000), line(TOBACCO, 5000),
                        coupon=serial),
        refund_lines_op(market, number, seq, 2), refund_lines_op(market, number, seq, 2),
        refund_lines_op(market, number, seq, 1, 3))
    assert (sale.reason, seq_of(sale)) == (L.R_OK, seq)
    assert (two.reason, figures(two)["amount"]) == (L.R_OK, 38000)
    assert again.reason == L.R_LINE_ALREADY_REFUNDED
    assert (rest.reason, figures(rest)["amount"], bool(undo_flags(rest) & L.UNDO_COMPLETE)) == (
        L.R_OK, 18000, True)


# ---- points a refund takes back that the card no longer holds (rule 12) -------------------------

def owing_cafe(path: str, shortfall: str):
    """The example cafe program with ``refund_points_shortfall`` set, verified when done."""
    return example_ledger(path, "cafe", f'refund_points_shortfall = "{shortfall}"\n')


@pytest.mark.parametrize("shortfall, after_refund, after_c, after_d, lot", [
    ("forgive", 0, 50, 150, 150), ("owe", -91, -41, 59, 59)])
def test_a_refund_of_points_already_spent_is_forgiven_or_owed_as_the_program_says(
        tmp_path, shortfall, after_refund, after_c, after_d, lot):
    """Sale A: 120.00 of food, 120 points. Sale B: a 10.00 drink paid 1.00 by 100 points and
    9.00 by the card (9 points): 29 points. A's full refund takes back 120: "forgive" takes the
    29 the card holds (0); "owe" takes them all (-91, no lots). Sale C (50.00, 50 points): 50, or
    -41, the debt paid first (still no lots); a redemption while owing is INSUFFICIENT_POINTS.
    Sale D (100.00): 150, or 59, in today's lot alone. Verify is clean either way."""
    with owing_cafe(str(tmp_path / "cafe"), shortfall) as till:
        number = "6225880000000760"
        till.open(number)
        till.top_up(number, 30000)
        sale_a = till.buy(number, line(CAFE_FOOD, 12000))
        till.buy(number, line(CAFE_DRINKS, 1000), redeem=100)
        assert till.card(number)["points"] == 29
        back = refund(till, number, seq_of(sale_a))
        assert (back.reason, figures(back)["taken"]) == (
            L.R_OK, 120 if shortfall == "owe" else 29)
        assert till.card(number)["points"] == after_refund
        assert sum(left for left, _ in lots_of(till, number).values()) == max(after_refund, 0)
        report = verify(till.ledger)  # a card that owes points is a valid card
        assert report["ok"], report["problems"]
        till.buy(number, line(CAFE_FOOD, 5000))
        assert till.card(number)["points"] == after_c
        if after_c < 100:
            assert till.buy(number, line(CAFE_FOOD, 5000), redeem=100).reason == \
                L.R_INSUFFICIENT_POINTS
        till.buy(number, line(CAFE_FOOD, 10000))
        assert till.card(number)["points"] == after_d
        assert sum(left for left, _ in lots_of(till, number).values()) == lot
        report = verify(till.ledger)
        assert report["ok"], report["problems"]


def test_a_card_owing_points_is_cancelled_with_its_debt_forfeited(tmp_path):
    """Under "owe", the card at -91 points as above: a coupon bought with points is
    INSUFFICIENT_POINTS, one given by an operator is still given. Cancelling the card forfeits
    its points, the debt too: +91, 0 points, no lots, verify clean."""
    with owing_cafe(str(tmp_path / "cafe"), "owe") as till:
        number = "6225880000000778"
        till.open(number)
        till.top_up(number, 30000)
        sale = till.buy(number, line(CAFE_FOOD, 12000))
        till.buy(number, line(CAFE_DRINKS, 1000), redeem=100)
        refund(till, number, seq_of(sale))
        assert till.card(number)["points"] == -91
        assert till.issue(number, 1, points=1000).reason == L.R_INSUFFICIENT_POINTS
        assert till.issue(number, 1).reason == L.R_OK
        closed = till.apply(op(till.rid(), L.OP_CARD_STATUS, number, 0, at=till.at + 1,
                               tier=L.STATUS_CLOSED, operator_id=1))[0]
        assert (closed.reason, figures(closed)["points"], till.card(number)["points"]) == (
            L.R_OK, 91, 0)
        assert lots_of(till, number) == {}
        report = verify(till.ledger)
        assert report["ok"], report["problems"]


def test_the_points_shortfall_setting_is_forgive_or_owe():
    from cardcore.program import ProgramError, parse_program
    assert parse_program(example("cafe")).refund_points_shortfall == L.SHORTFALL_FORGIVE
    assert parse_program('refund_points_shortfall = "owe"\n' + example("cafe")) \
        .refund_points_shortfall == L.SHORTFALL_OWE
    with pytest.raises(ProgramError):
        parse_program('refund_points_shortfall = "maybe"\n' + example("cafe"))


# ---- reversals of package uses and gift redemptions (rule 13) ------------------------------------

def test_a_reversed_package_use_gives_the_use_back_and_a_reversed_gift_its_points_and_stock(
        tmp_path):
    """A salon member's third haircut timed out at the till: its reversal gives the use back
    (8 left again, 2 uses), moving no money; a second reversal of it moves nothing more. A
    supermarket member's tote bag (800 points, 2 in stock) reversed: the 800 points come back
    and the stock has the bag again, so two more members get one. Verify replays both."""
    from test_card_programs import GROCERY, redeem_gift, sell, use_op

    salon = Till(str(tmp_path / "salon"), example("salon"))
    number = "6225880000000911"
    salon.open(number)
    salon.top_up(number, 100000)
    serial = L.JOURNAL.unpack(sell(salon, number, 1, 80000).entry)[7]
    for _ in range(2):
        assert salon.apply(use_op(salon, number, serial))[0].reason == L.R_OK
    third = use_op(salon, number, serial)
    assert salon.apply(third)[0].reason == L.R_OK
    assert salon.ledger.read_packages(cid(number))[0][3] == 7
    original = third.request_key[L.REQUEST_KEY_HEAD.size:].decode()
    back = salon.apply(reverse_op(salon, number, original))[0]
    assert back.reason == L.R_OK and undo_flags(back) & L.UNDO_COMPLETE
    assert figures(back)["principal"] == figures(back)["points"] == 0
    package = salon.ledger.read_packages(cid(number))[0]
    assert (package[3], package[8]) == (8, 2)
    again = salon.apply(reverse_op(salon, number, original))[0]
    assert again.reason == L.R_OK and salon.ledger.read_packages(cid(number))[0][3] == 8
    report = verify(salon.ledger)
    salon.ledger.close()
    assert report["ok"], report["problems"]

    market = Till(str(tmp_path / "market"), example("supermarket"))
    members = ["6225880000000912", "6225880000000913", "6225880000000914"]
    for n in members:
        market.open(n)
        market.top_up(n, 100000)
        market.buy(n, line(GROCERY, 70000))
    first = redeem_gift(market, members[0], 1, request_id="gift-1")
    assert figures(first)["taken"] == 800
    assert figures(redeem_gift(market, members[1], 1))["reason"] == L.R_OK
    assert figures(redeem_gift(market, members[2], 1))["reason"] == L.R_GIFT_OUT_OF_STOCK
    points = market.card(members[0])["points"]
    back = market.apply(reverse_op(market, members[0], "gift-1"))[0]
    assert back.reason == L.R_OK and figures(back)["points"] == 800
    assert market.card(members[0])["points"] == points + 800
    assert figures(redeem_gift(market, members[2], 1))["reason"] == L.R_OK
    report = verify(market.ledger)
    market.ledger.close()
    assert report["ok"], report["problems"]


def test_under_owe_a_refund_that_takes_more_than_the_lots_hold_but_gives_more_back(tmp_path):
    """Rule 12 "owe": the points a refund takes back exceed what the card's lots hold, while the
    points it gives back keep the balance above zero: the lots pay what they hold, the rest of
    the take is paid from what comes back (the writer once stopped here: "points spent beyond
    the card's lots"). Food 1,000.00 (1,800 points); two drinks of 20.00 each redeeming 900 (18
    earned each); 10.00 of the food refunded (points 16); sale X refunded in full: 16 - 18 + 900
    = 898, in today's lot."""
    with owing_cafe(str(tmp_path / "cafe"), "owe") as till:
        number = "6225880000000770"
        till.open(number)
        till.top_up(number, 200000)
        food = till.buy(number, line(CAFE_FOOD, 100000))
        x = till.buy(number, line(CAFE_DRINKS, 2000), redeem=900)
        till.buy(number, line(CAFE_DRINKS, 2000), redeem=900)
        assert refund(till, number, seq_of(food), 1000).reason == L.R_OK
        assert till.card(number)["points"] == 16
        assert refund(till, number, seq_of(x)).reason == L.R_OK
        assert till.card(number)["points"] == 898
        assert sum(left for left, _ in lots_of(till, number).values()) == 898
        report = verify(till.ledger)
        assert report["ok"], report["problems"]


@pytest.mark.parametrize("undo", ["refund", "reversal"])
def test_a_coupon_given_back_then_used_again_in_one_group_as_in_two(tmp_path, undo):
    """A refund or reversal gives a sale's coupon back; a purchase with that coupon after it in
    the same group applies, as it does in a group of its own (the writer's grouping must not
    change an answer: the undo runs alone)."""
    results = []
    for together in (False, True):
        till = Till(str(tmp_path / f"{undo}{together}"), example("supermarket"))
        number = "6225880000000401"
        till.open(number)
        assert till.top_up(number, 500_000).reason == L.R_OK
        issued = till.issue(number, 1)
        serial = L.JOURNAL.unpack_from(issued.entry)[7]
        request_id = till.rid()
        sale = till.buy(number, line(FRESH, 60_000), coupon=serial, request_id=request_id)
        assert sale.reason == L.R_OK
        back = (refund_op(till, number, L.JOURNAL.unpack_from(sale.entry)[7]) if undo == "refund"
                else reverse_op(till, number, request_id))
        again = till.purchase(number, line(FRESH, 60_000), coupon=serial)
        outs = (till.apply(back, again) if together
                else [till.apply(back)[0], till.apply(again)[0]])
        results.append([o.reason for o in outs])
        till.ledger.close()
    assert results[0] == results[1] == [L.R_OK, L.R_OK], results
