"""Card programs as a chain's accountant checks them: worked examples on the example programs
(examples/programs), through the real ledger over LMDB in a temp folder. Each test's docstring
has the arithmetic; the figures asserted are the ones written there."""
from __future__ import annotations

import contextlib
import datetime
import os
import re

import pytest

from cardcore import layout as L
from cardcore import lots, rules
from cardcore.verify import verify
from cardcore.idempotency import PendingOp
from test_ledger import NOW, add_operator, cid, key, op, open_op

from cardcore.ledger import Ledger

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "examples", "programs")
CAFE_DRINKS, CAFE_FOOD, CAFE_MERCH = 1, 2, 3
FRESH, GROCERY, TOBACCO, GIFT_CARDS = 1, 2, 3, 4
SERVICES, PRODUCTS = 1, 2


def example(name: str) -> str:
    with open(os.path.join(EXAMPLES, f"{name}.toml"), encoding="utf-8") as f:
        return f.read()


def toml_time(us: int) -> str:
    """A TOML offset date-time for Unix microseconds ``us``."""
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
    return (epoch + datetime.timedelta(microseconds=us)).isoformat()


def line(code: int, amount: int, quantity: int = 1, sku: bytes = b"") -> bytes:
    return L.LINE.pack(code, 0, quantity, amount, 0, 0, 0, sku)


class Till:
    """One ledger with a program, cards opened by number, groups at increasing times."""

    def __init__(self, path: str, program: str) -> None:
        self.ledger = Ledger(path, initial_program=program)
        self.at = NOW
        self.n = 0
        # operator 1, a store manager: gives coupons away
        (added,) = self.apply(add_operator("op-1", "manager", 2, (3,), at=self.at + 1))
        assert added.reason == L.R_OK

    def apply(self, *ops, at: int | None = None):
        self.at = max(self.at + 1, at or 0)
        return self.ledger.apply_group(list(ops), self.at)

    def rid(self) -> str:
        self.n += 1
        return f"r{self.n}"

    def open(self, number: str, tier: int = 0):
        (outcome,) = self.apply(open_op(self.rid(), number, tier, at=self.at + 1))
        assert outcome.reason == L.R_OK

    def top_up(self, number: str, amount: int, at: int | None = None):
        when = max(self.at + 1, at or 0)
        return self.apply(op(self.rid(), L.OP_TOP_UP, number, amount, at=when), at=when)[0]

    def buy(self, number: str, *lines_, redeem: int = 0, amount: int | None = None,
            request_id: str | None = None, client_at: int | None = None, coupon: int = 0,
            at: int | None = None):
        return self.apply(self.purchase(number, *lines_, redeem=redeem, amount=amount,
                                        request_id=request_id, client_at=client_at or at,
                                        coupon=coupon), at=at)[0]

    def purchase(self, number: str, *lines_, redeem: int = 0, amount: int | None = None,
                 request_id: str | None = None, client_at: int | None = None, coupon: int = 0):
        packed = b"".join(lines_)
        gross = amount if amount is not None else sum(L.LINE.unpack(x)[3] for x in lines_)
        return op(request_id or self.rid(), L.OP_PURCHASE, number, gross,
                  at=client_at or self.at + 1, lines=packed, redeem_points=redeem, ref_id=coupon)

    def issue(self, number: str, coupon_id: int, points: int = 0, operator: int = 1):
        """A coupon given by operator 1, or bought with ``points``; the outcome (its serial:
        the entry's sequence)."""
        return self.apply(self.issue_op(number, coupon_id, points, operator))[0]

    def issue_op(self, number: str, coupon_id: int, points: int = 0, operator: int = 1):
        return PendingOp.build(
            key(self.rid()), L.OP_COUPON_ISSUE, cid(number), 0, store_id=3, ref_id=coupon_id,
            redeem_points=points, operator_id=0 if points else operator,
            pin_flags=L.PIN_OPTIONAL_UNSET | L.PIN_REQUIRED if points else 0,
            client_time_us=self.at + 1)

    def card(self, number: str) -> dict:
        rec = self.ledger.read_card(cid(number))[0]
        return dict(tier=rec[2], principal=rec[5], bonus=rec[6], points=rec[7], lifetime=rec[9])


def cafe_ledger(path: str):
    """A ledger on the example cafe program, verified clean when the test is done."""
    return example_ledger(path, "cafe")


@contextlib.contextmanager
def example_ledger(path: str, name: str, settings: str = ""):
    """A ledger on example program ``name`` (top-level ``settings`` TOML lines before it),
    verified clean when the test is done."""
    till = Till(path, settings + example(name))
    try:
        yield till
        report = verify(till.ledger)
        assert report["ok"], report["problems"]
    finally:
        till.ledger.close()


def figures(outcome) -> dict:
    """The journal entry's money figures by name (layout.JOURNAL)."""
    e = L.JOURNAL.unpack(outcome.entry)
    taken, redeemed, tier_after, line_count, promotion = L.JOURNAL_PROGRAM.unpack_from(
        outcome.entry, L.JOURNAL_OFF_PROGRAM)
    return dict(reason=e[4], amount=e[9], discount=e[10], principal=e[11], bonus=e[12],
                points=e[13], tier=e[2], tier_after=tier_after, taken=taken, redeemed=redeemed,
                lines=line_count, promotion=promotion)


def line_figures(outcome) -> list[tuple[int, int, int, int]]:
    """Each line's (category, discount, points, redeemed)."""
    return [(c, d, p, r) for c, _, _, _, d, p, r, _ in L.LINE.iter_unpack(outcome.lines)]


@pytest.fixture
def cafe(tmp_path):
    till = Till(str(tmp_path / "cafe"), example("cafe"))
    yield till
    till.ledger.close()


def test_lines_are_discounted_per_category_then_summed(cafe):
    """A silver card (95 %) buys drinks 32.00, food 28.50 and a mug (merch, not discountable)
    99.00, having topped up 200.00 (the welcome bonus: 20.00 bonus).

    drinks 3200 x 0.95 = 3040.0 -> paid 3040, discount 160
    food   2850 x 0.95 = 2707.5 -> paid 2708 (half up), discount 142
    merch  9900 at 100 %       -> paid 9900, discount 0
    paid 15648, discount 302; points (1 per 1.00, per line, floored): 30 + 27 + 99 = 156.
    Bonus first (the cafe's spend order): 2000 from bonus, 13648 from principal."""
    cafe.open("6225880000000001", tier=1)
    assert figures(cafe.top_up("6225880000000001", 20000))["bonus"] == 2000
    out = cafe.buy("6225880000000001", line(CAFE_DRINKS, 3200, 2, b"LATTE-L"),
                   line(CAFE_FOOD, 2850), line(CAFE_MERCH, 9900, 1, b"MUG-01"))
    f = figures(out)
    assert (f["reason"], f["amount"], f["discount"], f["points"], f["lines"]) == (
        L.R_OK, 15950, 302, 156, 3)
    assert (f["bonus"], f["principal"]) == (-2000, -13648)
    assert line_figures(out) == [(CAFE_DRINKS, 160, 30, 0), (CAFE_FOOD, 142, 27, 0),
                                 (CAFE_MERCH, 0, 99, 0)]
    assert L.LINE.unpack_from(out.lines)[7].rstrip(b"\0") == b"LATTE-L"
    assert cafe.card("6225880000000001") == dict(tier=1, principal=20000 - 13648, bonus=0,
                                                 points=156, lifetime=15648)


def test_points_pay_in_whole_blocks_up_to_the_cap(cafe):
    """Cafe redemption: 100 points = 1.00, at most 50 % of what is due.

    A standard card earns 600 points on a 600.00 purchase. Then a 10.00 coffee offering 250
    points: blocks = min(250 // 100, (1000 x 50 % = 500) // 100) = min(2, 5) = 2 -> 200 points
    pay 2.00; the balance pays 8.00 and earns 8 points (points never earn points).
    Then 6.00 (a 2.50 drink and 3.50 of food) offering 400 of its 408 points: min(4, (600 x
    50 % = 300) // 100) = 3 -> 300 points pay 3.00 (the cap). They pay the lines in order: the
    drink in full, 0.50 of the food; the food earns on 3.00: 3 points.
    Points: 600 - 200 + 8 - 300 + 3 = 111."""
    number = "6225880000000002"
    cafe.open(number)
    cafe.top_up(number, 80000)
    assert figures(cafe.buy(number, line(CAFE_FOOD, 60000)))["points"] == 600
    f = figures(cafe.buy(number, line(CAFE_DRINKS, 1000), redeem=250))
    assert (f["taken"], f["redeemed"], f["points"], f["principal"] + f["bonus"]) == (
        200, 200, 8 - 200, -800)
    out = cafe.buy(number, line(CAFE_DRINKS, 250), line(CAFE_FOOD, 350), redeem=400)
    f = figures(out)
    assert (f["taken"], f["redeemed"], f["points"], f["principal"] + f["bonus"]) == (
        300, 300, 3 - 300, -300)
    assert line_figures(out) == [(CAFE_DRINKS, 0, 0, 250), (CAFE_FOOD, 0, 3, 50)]
    assert cafe.card(number)["points"] == 600 - 200 + 8 - 300 + 3 == 111


def test_points_offered_beyond_the_card_or_without_a_program_are_refused(cafe, tmp_path):
    """Offering more points than the card holds changes nothing (REASON_INSUFFICIENT_POINTS);
    the salon has no redemption (REASON_REDEMPTION_NOT_OFFERED)."""
    number = "6225880000000003"
    cafe.open(number)
    cafe.top_up(number, 10000)
    before = cafe.card(number)
    assert figures(cafe.buy(number, line(CAFE_FOOD, 500), redeem=1))["reason"] == \
        L.R_INSUFFICIENT_POINTS
    assert cafe.card(number) == before
    salon = Till(str(tmp_path / "salon"), example("salon"))
    salon.open(number)
    salon.top_up(number, 10000)
    assert figures(salon.buy(number, line(SERVICES, 500), redeem=100))["reason"] == \
        L.R_REDEMPTION_NOT_OFFERED
    salon.ledger.close()


def test_the_best_top_up_promotion_applies_and_the_threshold_is_inclusive(cafe):
    """Cafe promotions: top up >= 500.00 get 50.00 (fixed); a first top-up >= 100.00 gets
    20.00. A first top-up of exactly 500.00 qualifies for both: the larger (50.00) wins, once.
    A second top-up of 499.99 gets nothing (below the threshold; no longer the first); one of
    exactly 500.00 gets 50.00 again (no per-card limit)."""
    number = "6225880000000004"
    cafe.open(number)
    f = figures(cafe.top_up(number, 50000))
    assert (f["principal"], f["bonus"], f["promotion"]) == (50000, 5000, 1)
    f = figures(cafe.top_up(number, 49999))
    assert (f["principal"], f["bonus"], f["promotion"]) == (49999, 0, 0)
    assert figures(cafe.top_up(number, 50000))["bonus"] == 5000
    assert cafe.card(number)["bonus"] == 10000


def test_a_first_top_up_bonus_is_given_once(cafe):
    """A first top-up of 100.00 gets the 20.00 welcome bonus; the second 100.00 gets nothing."""
    number = "6225880000000005"
    cafe.open(number)
    assert figures(cafe.top_up(number, 10000))["bonus"] == 2000
    assert figures(cafe.top_up(number, 10000))["bonus"] == 0


def test_a_dated_promotion_applies_from_its_start_to_just_before_its_end(tmp_path):
    """The cafe's Christmas promotion (+10 %, at most 100.00, twice per card) moved to a window
    [T1, T2) a few minutes from now. Top-ups of 300.00 (no other promotion applies: the card
    had its first top-up): at T1 - 1 µs nothing; at T1 30.00; a top-up of 2000.00 in the window
    gets the cap, 100.00 (10 % would be 200.00); the third in the window nothing (limit 2);
    at T2 nothing."""
    t1, t2 = NOW + 10 * 60_000_000, NOW + 20 * 60_000_000
    text = example("cafe")
    text = re.sub(r"starts = .*", f"starts = {toml_time(t1)}", text)
    text = re.sub(r"ends = .*", f"ends = {toml_time(t2)}", text)
    till = Till(str(tmp_path / "xmas"), text)
    number = "6225880000000006"
    till.open(number)
    till.top_up(number, 1000)  # the first top-up (below the welcome bonus's threshold)
    assert figures(till.top_up(number, 30000, at=t1 - 1))["bonus"] == 0
    f = figures(till.top_up(number, 30000, at=t1))
    assert (f["bonus"], f["promotion"]) == (3000, 3)
    f = figures(till.top_up(number, 200000, at=t1 + 1))  # (also gold at once: 1000.00 or more)
    assert (f["bonus"], f["promotion"]) == (10000, 3)
    # the window is still open but the card used it twice; 500.00 and over still gets promotion 1
    f = figures(till.top_up(number, 30000, at=t2 - 1))
    assert (f["bonus"], f["promotion"]) == (0, 0)
    assert figures(till.top_up(number, 30000, at=t2))["bonus"] == 0
    till.ledger.close()


def test_a_single_large_top_up_upgrades_in_the_same_entry(cafe):
    """Cafe gold is reached at once by one top-up of 1000.00 or more: the entry that adds the
    money says tier 0 -> 2, and the next purchase is computed at 90 % and earns 2 points per
    1.00: 100.00 -> pays 90.00, 180 points."""
    number = "6225880000000007"
    cafe.open(number)
    assert figures(cafe.top_up(number, 99999))["tier_after"] == 0
    f = figures(cafe.top_up(number, 100000))
    assert (f["tier"], f["tier_after"]) == (0, 2)
    f = figures(cafe.buy(number, line(CAFE_FOOD, 10000)))
    assert (f["tier"], f["discount"], f["points"]) == (2, 1000, 180)
    tiers = dict(cafe.ledger.dump()["meta"])[b"tier_cards"]  # cards per tier, 16 x u64
    assert int.from_bytes(tiers[16:24], "little") == 1  # one gold card
    assert int.from_bytes(tiers[0:8], "little") == 0


def test_cumulative_spend_upgrades_when_it_is_reached(cafe):
    """Cafe silver at 1000.00 paid from the card in total. Purchases of 600.00 then 399.99 leave
    lifetime paid at 999.99 (standard); the next 0.01 reaches 1000.00: that purchase is computed
    at the old tier (100 %) and reports tier_after = silver."""
    number = "6225880000000008"
    cafe.open(number)
    cafe.top_up(number, 90000)  # two top-ups below gold's 1000.00 at once
    cafe.top_up(number, 90000)
    cafe.buy(number, line(CAFE_FOOD, 60000))
    assert figures(cafe.buy(number, line(CAFE_FOOD, 39999)))["tier_after"] == 0
    f = figures(cafe.buy(number, line(CAFE_FOOD, 1)))
    assert (f["discount"], f["tier"], f["tier_after"]) == (0, 0, 1)
    assert cafe.card(number)["lifetime"] == 100000


def test_supermarket_tobacco_is_neither_discounted_nor_earns(tmp_path):
    """Supermarket gold: 95 %, fresh food 90 %, 2 points per 1.00; tobacco and gift cards at
    full price and earning nothing. Basket: fresh 55.55, grocery 20.00, tobacco 30.00, a
    gift card 100.00.
    fresh   5555 x 0.90 = 4999.5 -> 5000 (half up), discount 555, points 50 x 2 = 100
    grocery 2000 x 0.95 = 1900, discount 100, points 19 x 2 = 38
    tobacco 3000, discount 0, points 0; gift card 10000, discount 0, points 0
    paid 19900, discount 655, points 138.
    Offering 10000 points with a 20 % cap: 19900 x 20 % = 3980 -> 39 blocks = 3900 points pay
    39.00; they pay the fresh line first (39.00 of 50.00), which then earns on 11.00: 22 points;
    total 22 + 38 = 60."""
    till = Till(str(tmp_path / "market"), example("supermarket"))
    number = "6225880000000009"
    till.open(number, tier=2)
    till.top_up(number, 100000)
    basket = (line(FRESH, 5555), line(GROCERY, 2000), line(TOBACCO, 3000), line(GIFT_CARDS, 10000))
    f = figures(till.buy(number, *basket))
    assert (f["discount"], f["points"], f["principal"]) == (655, 138, -19900)
    out = till.buy(number, *basket, redeem=10000)
    assert figures(out)["reason"] == L.R_INSUFFICIENT_POINTS  # the card has 138
    # give the card points: 72 more baskets would take long; a second card with a bigger spend
    till.top_up(number, 10_000_000)
    till.buy(number, line(FRESH, 5_000_000))  # 4,500,000 paid -> 45,000 x 2 = 90,000 points
    out = till.buy(number, *basket, redeem=10000)
    f = figures(out)
    assert (f["taken"], f["redeemed"], f["principal"], f["points"]) == (3900, 3900, -16000,
                                                                         60 - 3900)
    assert line_figures(out) == [(FRESH, 555, 22, 3900), (GROCERY, 100, 38, 0),
                                 (TOBACCO, 0, 0, 0), (GIFT_CARDS, 0, 0, 0)]
    till.ledger.close()


def test_salon_proportional_spend_and_top_up_tiers(tmp_path):
    """Salon: top up 1000.00 -> silver at once (88 % on services, 95 % on products) and the
    200.00 bonus. A haircut of 150.00 at 88 % = 132.00, paid in proportion to the buckets:
    bonus share = 13200 x 20000 / 120000 = 2200 exactly; principal 11000. Products 33.33 at
    95 % = 3166.35 -> 3166; bonus share of 3166 with principal 89000 and bonus 17800:
    3166 x 17800 / 106800 = 527.67 -> 528 (half up); principal 2638."""
    till = Till(str(tmp_path / "salon"), example("salon"))
    number = "6225880000000010"
    till.open(number)
    f = figures(till.top_up(number, 100000))
    assert (f["bonus"], f["promotion"], f["tier_after"]) == (20000, 1, 1)
    f = figures(till.buy(number, line(SERVICES, 15000)))
    assert (f["discount"], f["principal"], f["bonus"]) == (1800, -11000, -2200)
    f = figures(till.buy(number, line(PRODUCTS, 3333)))
    assert (f["discount"], f["principal"], f["bonus"]) == (167, -2638, -528)
    till.ledger.close()


def test_a_purchase_with_an_unknown_category_or_wrong_total_changes_nothing(cafe):
    number = "6225880000000011"
    cafe.open(number)
    cafe.top_up(number, 10000)
    before = cafe.card(number)
    assert figures(cafe.buy(number, line(9, 100)))["reason"] == L.R_UNKNOWN_CATEGORY
    assert figures(cafe.buy(number, line(CAFE_FOOD, 100), amount=101))["reason"] == L.R_INVALID_AMOUNT
    assert cafe.card(number) == before


def test_a_retried_purchase_replays_its_lines_and_another_basket_is_a_mismatch(cafe):
    number = "6225880000000012"
    cafe.open(number)
    cafe.top_up(number, 10000)
    basket = (line(CAFE_FOOD, 1000), line(CAFE_DRINKS, 500))
    first = cafe.buy(number, *basket, request_id="same", client_at=NOW + 5)
    again = cafe.buy(number, *basket, request_id="same", client_at=NOW + 5)
    assert again.replayed and again.lines == first.lines
    assert again.entry[:L.JOURNAL_DIGEST_OFFSET] == first.entry[:L.JOURNAL_DIGEST_OFFSET]
    other = cafe.buy(number, line(CAFE_FOOD, 500), line(CAFE_DRINKS, 1000), request_id="same",
                     client_at=NOW + 5)
    assert other.reason == L.R_DUPLICATE_REQUEST_MISMATCH
    offered = cafe.buy(number, *basket, redeem=100, request_id="same", client_at=NOW + 5)
    assert offered.reason == L.R_DUPLICATE_REQUEST_MISMATCH
    seq = L.JOURNAL.unpack(first.entry)[7]
    assert cafe.ledger.read_lines(seq) == first.lines
    report = verify(cafe.ledger)
    assert report["ok"], report["problems"]


def test_a_ledger_made_before_card_programs_gets_its_top_ups_counted(tmp_path):
    """A ledger of the release before card programs has no program states: the first writer to
    open it creates them from the journal, so a "first top-up" promotion does not go to a card
    that was topped up before, and verify agrees with what it built."""
    path = str(tmp_path / "old")
    till = Till(path, example("cafe"))
    till.open("6225880000000013")
    till.open("6225880000000014")
    till.top_up("6225880000000013", 3000)   # below every threshold: no bonus
    till.top_up("6225880000000013", 4000)
    with till.ledger.env.begin(write=True) as txn:  # back to how the release before left it
        txn.drop(till.ledger.card_ext, delete=True)
        txn.drop(till.ledger.journal_lines, delete=True)
    till.ledger.close()
    reopened = Ledger(path)
    state = L.CARD_EXT.unpack(dict(reopened.dump()["card_ext"])[cid("6225880000000013")])
    assert state[:5] == (1, 0, bytes(2), 2, 7000)
    assert cid("6225880000000014") not in dict(reopened.dump()["card_ext"])
    till.ledger = reopened
    assert figures(till.top_up("6225880000000013", 10000))["bonus"] == 0  # not a first top-up
    assert figures(till.top_up("6225880000000014", 10000))["bonus"] == 2000  # a first one
    report = verify(reopened)
    assert report["ok"], report["problems"]
    reopened.close()


def test_verify_finds_a_stored_line_changed_behind_the_journal(cafe):
    """The journal entry carries a digest of its stored lines, so moving an amount from the mug
    (merch, full price) to the drinks line (discounted) in journal_lines, totals unchanged, is
    found even though the lines are not in the journal itself."""
    number = "6225880000000015"
    cafe.open(number, tier=1)  # silver: drinks 95 %, merch 100 %
    cafe.top_up(number, 20000)
    out = cafe.buy(number, line(CAFE_DRINKS, 1000), line(CAFE_MERCH, 1000))
    assert verify(cafe.ledger)["ok"]
    seq = L.JOURNAL.unpack(out.entry)[7]
    stored = bytearray(cafe.ledger.read_lines(seq))
    stored[0] = CAFE_MERCH  # the first line claims to be merch now
    with cafe.ledger.env.begin(write=True) as txn:
        txn.put(L.SEQ_KEY.pack(seq), bytes(stored), db=cafe.ledger.journal_lines)
    problems = verify(cafe.ledger)["problems"]
    assert any("stored lines are not the ones it carries" in p for p in problems), problems
    assert any("differ from its program's arithmetic" in p or "its program gives" in p
               for p in problems), problems


def serial_of(outcome) -> int:
    """The serial of the coupon an applied issue entry created: its sequence."""
    assert outcome.reason == L.R_OK, outcome.reason
    return L.JOURNAL.unpack(outcome.entry)[7]


@pytest.fixture
def market(tmp_path):
    till = Till(str(tmp_path / "market"), example("supermarket"))
    yield till
    till.ledger.close()


def test_fifty_off_five_hundred_counts_discountable_lines_and_is_used_once(market):
    """Supermarket coupon 1, "50 off 500": 50.00 off when the discountable lines (not tobacco,
    not gift cards) come to 500.00 after the tier's rate. A standard card (100 %) buys fresh
    300.00, groceries 250.00 and tobacco 100.00: eligible 550.00 >= 500.00, so 50.00 off, taken
    from the fresh line first: fresh pays 250.00. Paid 650.00 - 50.00 = 600.00; points 250 +
    250 + 0 (tobacco) = 500. The same coupon again: REASON_COUPON_USED, nothing changes."""
    number = "6225880000000101"
    market.open(number)
    market.top_up(number, 200000)
    coupon = serial_of(market.issue(number, 1))
    out = market.buy(number, line(FRESH, 30000), line(GROCERY, 25000), line(TOBACCO, 10000),
                     coupon=coupon)
    f = figures(out)
    assert (f["reason"], f["discount"], f["principal"], f["points"], f["promotion"]) == (
        L.R_OK, 5000, -60000, 500, 1)
    assert L.JOURNAL_COUPON_OFF.unpack_from(out.entry, L.JOURNAL_OFF_COUPON)[0] == 5000
    assert line_figures(out) == [(FRESH, 5000, 250, 0), (GROCERY, 0, 250, 0), (TOBACCO, 0, 0, 0)]
    before = market.card(number)
    again = market.buy(number, line(FRESH, 60000), coupon=coupon)
    assert figures(again)["reason"] == L.R_COUPON_USED and market.card(number) == before
    stored = market.ledger.read_coupons(cid(number))
    assert [(c[1], c[7], c[8]) for c in stored] == [(L.COUPON_USED, L.JOURNAL.unpack(out.entry)[7],
                                                     5000)]


def test_a_coupon_threshold_is_inclusive_and_tobacco_does_not_count(market):
    """Eligible exactly 500.00 qualifies; 499.99 of groceries plus 100.00 of tobacco does not
    (REASON_COUPON_NOT_APPLICABLE), and the coupon stays unused."""
    number = "6225880000000102"
    market.open(number)
    market.top_up(number, 200000)
    first, second = serial_of(market.issue(number, 1)), serial_of(market.issue(number, 1))
    assert figures(market.buy(number, line(GROCERY, 49999), line(TOBACCO, 10000),
                              coupon=first))["reason"] == L.R_COUPON_NOT_APPLICABLE
    assert figures(market.buy(number, line(GROCERY, 50000), coupon=first))["discount"] == 5000
    assert [c[1] for c in market.ledger.read_coupons(cid(number))] == [L.COUPON_USED, L.COUPON_ISSUED]
    assert second


def test_a_percent_coupon_bought_with_points_is_capped(market):
    """Coupon 2, "fresh 10 % off", at most 20.00, costs 500 points. A card with 100 + 300 points
    (the activation gift and a purchase) cannot buy it; with 500 it can (points 0 after). On
    fresh 150.00 it takes 15.00; on fresh 300.00 it would take 30.00 but the cap is 20.00 (a
    second coupon)."""
    number = "6225880000000103"
    market.open(number)  # 100 points: the supermarket's activation points
    market.top_up(number, 200000)
    market.buy(number, line(GROCERY, 30000))  # 400 points
    assert figures(market.issue(number, 2, points=500))["reason"] == L.R_INSUFFICIENT_POINTS
    market.buy(number, line(GROCERY, 10000))  # 500 points
    bought = market.issue(number, 2, points=500)
    assert (figures(bought)["points"], figures(bought)["taken"]) == (-500, 500)
    assert market.card(number)["points"] == 0
    assert figures(market.buy(number, line(FRESH, 15000), coupon=serial_of(bought)))["discount"] == 1500
    market.buy(number, line(GROCERY, 50000))
    second = serial_of(market.issue(number, 2, points=500))
    assert figures(market.buy(number, line(FRESH, 30000), coupon=second))["discount"] == 2000
    # the wrong price, or a coupon not for sale, is refused; a free one needs an operator
    assert figures(market.issue(number, 2, points=499))["reason"] == L.R_COUPON_NOT_FOR_SALE
    assert figures(market.issue(number, 1, points=500))["reason"] == L.R_COUPON_NOT_FOR_SALE
    assert figures(market.issue(number, 1, operator=0))["reason"] == L.R_OPERATOR_REQUIRED
    assert figures(market.issue(number, 77))["reason"] == L.R_COUPON_NOT_FOUND


def test_two_purchases_with_one_coupon_in_one_group_exactly_one_gets_it(market):
    """Both arrive in the same group (the writer's unit of work): the first in arrival order
    uses the coupon, the second is declined REASON_COUPON_USED and changes nothing."""
    number = "6225880000000104"
    market.open(number)
    market.top_up(number, 200000)
    coupon = serial_of(market.issue(number, 1))
    a = market.purchase(number, line(GROCERY, 60000), coupon=coupon)
    b = market.purchase(number, line(GROCERY, 70000), coupon=coupon)
    first, second = market.apply(a, b)
    assert (first.reason, second.reason) == (L.R_OK, L.R_COUPON_USED)
    assert market.card(number)["principal"] == 200000 - 55000


def test_a_coupon_is_valid_until_the_end_of_its_last_day(tmp_path):
    """A coupon valid for 1 day (the supermarket's coupon 1 with valid_days = 1): at issue +
    24 h - 1 µs it applies, at issue + 24 h it is REASON_COUPON_NOT_VALID_NOW. (The ledger's
    clock moves at most an hour a group, so the test steps through the day.)"""
    text = example("supermarket").replace("valid_days = 30", "valid_days = 1", 1)
    till = Till(str(tmp_path / "day"), text)
    number = "6225880000000105"
    till.open(number)
    till.top_up(number, 500000)
    issued, twin = till.apply(till.issue_op(number, 1), till.issue_op(number, 1))  # one group
    serial, issued_at = serial_of(issued), L.JOURNAL.unpack(issued.entry)[17]
    another = serial_of(twin)
    while till.at < issued_at + L.DAY_US - 3_600_000_000:
        till.top_up(number, 1, at=till.at + 3_000_000_000)
    last = issued_at + L.DAY_US - 1
    assert figures(till.buy(number, line(GROCERY, 50000), coupon=serial, at=last))["discount"] == 5000
    f = figures(till.buy(number, line(GROCERY, 50000), coupon=another, at=last + 1))
    assert f["reason"] == L.R_COUPON_NOT_VALID_NOW
    till.ledger.close()


def test_a_free_haircut_coupon_takes_one_service_off(tmp_path):
    """Salon coupon 1, "one free haircut": the first services line, at most 80.00. A member (100
    %) with a 120.00 colour and a 30.00 product: 80.00 off the colour (the cap); paid 70.00."""
    till = Till(str(tmp_path / "salon"), example("salon"))
    number = "6225880000000106"
    till.open(number)
    till.top_up(number, 50000)
    coupon = serial_of(till.issue(number, 1))
    f = figures(till.buy(number, line(SERVICES, 12000), line(PRODUCTS, 3000), coupon=coupon))
    assert (f["discount"], f["principal"] + f["bonus"]) == (8000, -7000)
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def test_verify_rebuilds_every_coupon_and_finds_one_changed(market):
    number = "6225880000000107"
    market.open(number)
    market.top_up(number, 200000)
    coupon = serial_of(market.issue(number, 1))
    serial_of(market.issue(number, 1))
    market.buy(number, line(GROCERY, 60000), coupon=coupon)
    report = verify(market.ledger)
    assert report["ok"], report["problems"]
    k = L.COUPON_KEY.pack(cid(number), coupon)
    with market.ledger.env.begin(write=True) as txn:  # used -> issued again, behind the journal
        raw = bytearray(txn.get(k, db=market.ledger.coupons))
        raw[1] = L.COUPON_ISSUED
        txn.put(k, bytes(raw), db=market.ledger.coupons)
    problems = verify(market.ledger)["problems"]
    assert any("not what the journal's entries for it make" in p for p in problems), problems


def sell(till: Till, number: str, package_id: int, price: int):
    return till.apply(op(till.rid(), L.OP_PACKAGE_SELL, number, price, at=till.at + 1,
                         ref_id=package_id))[0]


def use_op(till: Till, number: str, serial: int, staff: int = 31):
    return PendingOp.build(key(till.rid()), L.OP_PACKAGE_USE, cid(number), 0, store_id=3,
                           staff_id=staff, ref_id=serial,
                           pin_flags=L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET,
                           client_time_us=till.at + 1)


@pytest.fixture
def salon(tmp_path):
    till = Till(str(tmp_path / "salon"), example("salon"))
    yield till
    till.ledger.close()


def test_ten_haircuts_are_used_one_at_a_time_and_the_eleventh_is_refused(salon):
    """Salon package 1, "10 haircuts", 800.00 from the balance (proportional spend, no discount,
    no points). A member topped up 1000.00 (+200.00 bonus, silver at once): 800.00 is paid
    666.67 from principal and 133.33 from bonus (800 x 200/1200 = 133.33). Ten uses count down
    10 -> 0, each journaled with the stylist's staff id; the eleventh is
    REASON_PACKAGE_USED_UP and changes nothing."""
    number = "6225880000000201"
    salon.open(number)
    salon.top_up(number, 100000)
    sold = sell(salon, number, 1, 80000)
    f = figures(sold)
    assert (f["reason"], f["principal"], f["bonus"], f["points"], f["discount"]) == (
        L.R_OK, -66667, -13333, 0, 0)
    serial = L.JOURNAL.unpack(sold.entry)[7]
    for k in range(10):
        used = salon.apply(use_op(salon, number, serial, staff=30 + k))[0]
        entry = L.JOURNAL.unpack(used.entry)
        assert (used.reason, entry[20], entry[29]) == (L.R_OK, 30 + k, serial)  # staff, serial
        assert salon.ledger.read_packages(cid(number))[0][3] == 9 - k  # uses left
    assert salon.apply(use_op(salon, number, serial))[0].reason == L.R_PACKAGE_USED_UP
    assert salon.ledger.read_packages(cid(number))[0][8] == 10  # uses
    report = verify(salon.ledger)
    assert report["ok"], report["problems"]


def test_the_last_use_of_a_package_goes_to_exactly_one_of_two_in_a_group(salon):
    number = "6225880000000202"
    salon.open(number)
    salon.top_up(number, 100000)
    serial = L.JOURNAL.unpack(sell(salon, number, 1, 80000).entry)[7]
    for _ in range(9):
        salon.apply(use_op(salon, number, serial))
    first, second = salon.apply(use_op(salon, number, serial), use_op(salon, number, serial))
    assert (first.reason, second.reason) == (L.R_OK, L.R_PACKAGE_USED_UP)


def test_a_package_is_sold_at_the_program_price_and_belongs_to_its_card(salon):
    """Another price, an unknown package, too little money: refused, nothing changes. Another
    card cannot use the package: the serial is looked up under the card's own id."""
    number, other = "6225880000000203", "6225880000000204"
    salon.open(number)
    salon.open(other)
    salon.top_up(number, 50000)
    salon.top_up(other, 50000)
    before = salon.card(number)
    assert figures(sell(salon, number, 1, 79999))["reason"] == L.R_INVALID_AMOUNT
    assert figures(sell(salon, number, 9, 80000))["reason"] == L.R_PACKAGE_NOT_FOUND
    assert figures(sell(salon, number, 1, 80000))["reason"] == L.R_INSUFFICIENT_FUNDS
    assert salon.card(number) == before
    serial = L.JOURNAL.unpack(sell(salon, number, 2, 30000).entry)[7]  # a month of blow-dries
    assert salon.apply(use_op(salon, other, serial))[0].reason == L.R_PACKAGE_NOT_FOUND
    for _ in range(3):  # a time package: any number of uses while valid
        assert salon.apply(use_op(salon, number, serial))[0].reason == L.R_OK


def test_a_time_pass_is_valid_to_the_end_of_its_last_day(tmp_path):
    """The salon's month of blow-dries cut to 1 day: a visit at sale + 24 h - 1 µs is let in, one
    at sale + 24 h is REASON_PACKAGE_NOT_VALID_NOW."""
    text = example("salon").replace("days = 30", "days = 1", 1)
    till = Till(str(tmp_path / "pass"), text)
    number = "6225880000000205"
    till.open(number)
    till.top_up(number, 50000)
    sold = sell(till, number, 2, 30000)
    serial, sold_at = L.JOURNAL.unpack(sold.entry)[7], L.JOURNAL.unpack(sold.entry)[17]
    while till.at < sold_at + L.DAY_US - 3_600_000_000:
        till.top_up(number, 1, at=till.at + 3_000_000_000)
    assert till.apply(use_op(till, number, serial), at=sold_at + L.DAY_US - 1)[0].reason == L.R_OK
    assert till.apply(use_op(till, number, serial), at=sold_at + L.DAY_US)[0].reason == \
        L.R_PACKAGE_NOT_VALID_NOW
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def advance(till: Till, number: str, to_us: int) -> None:
    """Groups an hour apart (the most the ledger's clock moves in one) until just before ``to_us``:
    1-fen top-ups on ``number``, which move no points."""
    while till.at < to_us - 3_600_000_000:
        till.top_up(number, 1, at=till.at + 3_500_000_000)


def lots_of(till: Till, number: str) -> dict[int, tuple[int, int]]:
    card = cid(number)
    return {L.LOT_KEY.unpack(k)[1]: L.POINTS_LOT.unpack(v)
            for k, v in till.ledger.dump()["points_lots"] if k[:16] == card}


def test_points_sit_in_lots_by_day_and_are_spent_oldest_first(cafe):
    """Day A: 600.00 of food earns 600 points (lot A). Day B: 100.00 earns 100 (lot B). Then a
    10.00 coffee offers 500 points: 5.00 is the cap, so 500 points are taken, all from lot A
    (oldest first), leaving A 100 and B 100 + the 5 points earned today (lot B is today's)."""
    number = "6225880000000301"
    cafe.open(number)
    cafe.top_up(number, 90000)  # (two top-ups below gold's 1000.00 at once)
    cafe.top_up(number, 90000)
    earned_a = cafe.buy(number, line(CAFE_FOOD, 60000))
    day_a = lots.day_of(L.JOURNAL.unpack(earned_a.entry)[17])
    advance(cafe, number, (day_a + 1) * L.DAY_US)
    cafe.buy(number, line(CAFE_FOOD, 10000), at=(day_a + 1) * L.DAY_US)
    assert lots_of(cafe, number) == {day_a: (600, 600), day_a + 1: (100, 100)}
    f = figures(cafe.buy(number, line(CAFE_DRINKS, 1000), redeem=500))
    assert (f["taken"], f["points"]) == (500, 5 - 500)
    assert lots_of(cafe, number) == {day_a: (100, 600), day_a + 1: (105, 105)}
    assert sum(left for left, _ in lots_of(cafe, number).values()) == cafe.card(number)["points"]
    report = verify(cafe.ledger)
    assert report["ok"], report["problems"]


def test_a_purchase_that_redeems_from_todays_lot_and_earns_keeps_one_lot(cafe):
    """One day: 600.00 of food earns 600 points (today's lot: 600 left, 600 earned). A 10.00
    coffee offering 500 points takes 500 (the cap, 5.00) from that lot and earns 5 into it: 105
    left, 605 earned, one lot (the writer writes it once). Then in one group: 95.00 of food earns
    95 (200 left, 700 earned); a coffee offering 200 points takes all 200 (the lot is gone) and
    earns 8: a new lot of today, 8 left and 8 earned."""
    number = "6225880000000309"
    cafe.open(number)
    cafe.top_up(number, 90000)
    cafe.top_up(number, 90000)
    day = lots.day_of(L.JOURNAL.unpack(cafe.buy(number, line(CAFE_FOOD, 60000)).entry)[17])
    f = figures(cafe.buy(number, line(CAFE_DRINKS, 1000), redeem=500))
    assert (f["taken"], f["points"]) == (500, 5 - 500)
    assert lots_of(cafe, number) == {day: (105, 605)}
    first, second = cafe.apply(cafe.purchase(number, line(CAFE_FOOD, 9500)),
                               cafe.purchase(number, line(CAFE_DRINKS, 1000), redeem=200))
    assert [(figures(o)["taken"], figures(o)["points"]) for o in (first, second)] == [
        (0, 95), (200, 8 - 200)]
    assert lots_of(cafe, number) == {day: (8, 8)}
    assert cafe.card(number)["points"] == 8
    report = verify(cafe.ledger)  # the lots and their expiry index, rebuilt from the journal
    assert report["ok"], report["problems"]


def test_one_group_that_earns_and_spends_a_cards_points_moves_its_lots_in_order(cafe):
    """Day A: 600.00 of food earns 600 points (lot A). Day B, in one group: 95.00 of food earns
    95 (lot B); a 10.00 coffee offering 500 points takes 500 (the cap, 5.00), all from lot A,
    and earns 5 (B: 100); a second coffee offering 200 takes 200: the 100 left in A and all 100
    of B (both gone), then earns 8: a new lot B of 8 left, 8 earned. As if the three had come in
    three groups: each purchase's loss before its gain, the gains before it first."""
    number = "6225880000000305"
    cafe.open(number)
    cafe.top_up(number, 90000)
    cafe.top_up(number, 90000)
    day_a = lots.day_of(L.JOURNAL.unpack(cafe.buy(number, line(CAFE_FOOD, 60000)).entry)[17])
    advance(cafe, number, (day_a + 1) * L.DAY_US)
    day_b = (day_a + 1) * L.DAY_US
    cafe.at = day_b - 1
    earn, spend, again = cafe.apply(
        cafe.purchase(number, line(CAFE_FOOD, 9500), client_at=day_b),
        cafe.purchase(number, line(CAFE_DRINKS, 1000), redeem=500, client_at=day_b),
        cafe.purchase(number, line(CAFE_DRINKS, 1000), redeem=200, client_at=day_b), at=day_b)
    assert [(figures(o)["taken"], figures(o)["points"]) for o in (earn, spend, again)] == [
        (0, 95), (500, 5 - 500), (200, 8 - 200)]
    assert lots_of(cafe, number) == {day_a + 1: (8, 8)}
    assert cafe.card(number)["points"] == 8
    report = verify(cafe.ledger)  # the lots and their expiry index, rebuilt from the journal
    assert report["ok"], report["problems"]


def test_points_expire_at_the_start_of_the_day_their_horizon_ends(tmp_path):
    """The cafe program with points_expire_days = 1: 600 points earned on day A are still there at
    the last microsecond of day A; the first group of day A + 1 expires them in a journal entry
    of the system's (points -600, ref_id = day A), and verify explains it."""
    text = "points_expire_days = 1\n" + example("cafe")
    till = Till(str(tmp_path / "expiry"), text)
    number, other = "6225880000000302", "6225880000000303"
    till.open(number)
    till.open(other)
    till.top_up(number, 90000)
    earned = till.buy(number, line(CAFE_FOOD, 60000))
    day_a = lots.day_of(L.JOURNAL.unpack(earned.entry)[17])
    advance(till, other, (day_a + 1) * L.DAY_US)
    till.top_up(other, 1, at=(day_a + 1) * L.DAY_US - 1)
    assert till.card(number)["points"] == 600
    # the first group of day A + 1 sweeps before its operations: the points cannot be spent
    spend = till.buy(number, line(CAFE_DRINKS, 1000), redeem=500, at=(day_a + 1) * L.DAY_US)
    assert figures(spend)["reason"] == L.R_INSUFFICIENT_POINTS
    assert till.card(number)["points"] == 0 and lots_of(till, number) == {}
    expiry = [L.JOURNAL.unpack(v) for _, v in till.ledger.dump()["journal"]
              if v[1] == L.OP_POINTS_EXPIRED][-1]
    assert (expiry[1], expiry[8], expiry[13], expiry[29], expiry[24]) == (
        L.OP_POINTS_EXPIRED, cid(number), -600, day_a, L.CALLER_SYSTEM)
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def test_a_ledger_made_before_lots_gets_them_from_its_journal(cafe):
    number = "6225880000000304"
    cafe.open(number)
    cafe.top_up(number, 90000)
    cafe.buy(number, line(CAFE_FOOD, 30000))
    cafe.buy(number, line(CAFE_DRINKS, 1000), redeem=100)
    before = lots_of(cafe, number)
    with cafe.ledger.env.begin(write=True) as txn:  # as the release before lots left it
        txn.drop(cafe.ledger.points_lots, delete=True)
        txn.drop(cafe.ledger.lots_by_day, delete=True)
    path = cafe.ledger.path
    cafe.ledger.close()
    cafe.ledger = Ledger(path)
    assert lots_of(cafe, number) == before and sum(v[0] for v in before.values()) == 300 - 100 + 9
    report = verify(cafe.ledger)
    assert report["ok"], report["problems"]


def redeem_gift(till: Till, number: str, gift_id: int, request_id: str | None = None):
    return till.apply(PendingOp.build(
        key(request_id or till.rid()), L.OP_GIFT_REDEEM, cid(number), 0, store_id=3, ref_id=gift_id,
        pin_flags=L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET, client_time_us=till.at + 1))[0]


def exchange(till: Till, number: str, points: int):
    return till.apply(PendingOp.build(
        key(till.rid()), L.OP_POINTS_EXCHANGE, cid(number), 0, store_id=3, redeem_points=points,
        pin_flags=L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET, client_time_us=till.at + 1))[0]


def test_a_new_card_gets_its_activation_points_in_a_lot(market):
    """Supermarket: 100 points on opening, in the lot of the opening's day."""
    number = "6225880000000401"
    market.open(number)
    assert market.card(number)["points"] == 100
    assert [left for left, _ in lots_of(market, number).values()] == [100]


def test_points_become_bonus_money_in_whole_blocks(market):
    """Supermarket exchange: 1000 points = 5.00 of bonus. 100 + 2,500 points; offering 2,550
    takes 2,000 (two blocks) for 10.00; 600 points stay. Fewer than a block: refused."""
    number = "6225880000000402"
    market.open(number)
    market.top_up(number, 300000)
    market.buy(number, line(GROCERY, 250000))  # 2,500 points (+100 on opening)
    f = figures(exchange(market, number, 2550))
    assert (f["reason"], f["points"], f["taken"], f["bonus"], f["principal"]) == (
        L.R_OK, -2000, 2000, 1000, 0)
    assert market.card(number)["points"] == 600 and market.card(number)["bonus"] == 1000
    assert figures(exchange(market, number, 999))["reason"] == L.R_INVALID_ARGUMENT
    assert figures(exchange(market, number, 5000))["reason"] == L.R_INSUFFICIENT_POINTS


def test_a_gift_is_taken_from_its_stock_until_none_is_left(market):
    """The tote bag: 800 points, 2 in stock. Three members with enough points: the first two get
    one each (stock taken in the same write), the third REASON_GIFT_OUT_OF_STOCK; two
    redemptions of the last one in one group: exactly one."""
    members = ["6225880000000403", "6225880000000404", "6225880000000405"]
    for n in members:
        market.open(n)
        market.top_up(n, 100000)
        market.buy(n, line(GROCERY, 70000))  # 700 + 100 points
    first = redeem_gift(market, members[0], 1)
    assert (figures(first)["taken"], figures(first)["points"], figures(first)["promotion"]) == (
        800, -800, 1)
    a, b = market.apply(*(PendingOp.build(
        key(market.rid()), L.OP_GIFT_REDEEM, cid(n), 0, store_id=3, ref_id=1,
        pin_flags=L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET, client_time_us=market.at + 1)
        for n in members[1:]))
    assert (a.reason, b.reason) == (L.R_OK, L.R_GIFT_OUT_OF_STOCK)
    assert market.card(members[2])["points"] == 800
    assert figures(redeem_gift(market, members[2], 9))["reason"] == L.R_GIFT_NOT_FOUND
    report = verify(market.ledger)
    assert report["ok"], report["problems"]


def test_a_referral_pays_the_referrer_one_level_only(tmp_path):
    """The supermarket with referral_points = 500: A refers B, B refers C. B's opening pays A
    500 (a system entry linked to B's opening); C's pays B 500 and A nothing more: multi-level
    referral schemes are illegal in China, so the rule has no second level at all. A referral
    naming an unknown card pays no one; the new cards get their activation points."""
    till = Till(str(tmp_path / "refer"), "referral_points = 500\n" + example("supermarket"))
    a, b, c, d = (f"62258800000005{k:02d}" for k in range(1, 5))
    till.open(a)
    opened = []
    for number, referrer in ((b, a), (c, b), (d, "6225880000009999")):
        opened.append(till.apply(PendingOp.build(
            key(till.rid()), L.OP_OPEN, cid(number), profile=b"{}", client_time_us=till.at + 1,
            referrer_id=cid(referrer))))
    assert [o[0].reason for o in opened] == [L.R_OK] * 3
    assert [till.card(n)["points"] for n in (a, b, c, d)] == [100 + 500, 100 + 500, 100, 100]
    bonuses = [L.JOURNAL.unpack(v) for _, v in till.ledger.dump()["journal"]
               if v[1] == L.OP_REFERRAL_BONUS]
    assert [(e[8], e[13], e[28], e[24]) for e in bonuses] == [
        (cid(a), 500, L.JOURNAL.unpack(opened[0][0].entry)[7], L.CALLER_SYSTEM),
        (cid(b), 500, L.JOURNAL.unpack(opened[1][0].entry)[7], L.CALLER_SYSTEM)]
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def test_birthday_month_points_are_doubled_per_line_and_floored(tmp_path):
    """The supermarket with birthday_points_bp = 20000 and utc_offset_minutes = 480 (China): a
    member born this month (on the chain's clock) earns double points on each line, floored: on
    fresh 55.55 (1 point per 1.00 at standard) 55 x 2 = 110; tobacco still 0. A member born in
    another month earns 55."""
    text = "birthday_points_bp = 20000\nutc_offset_minutes = 480\n" + example("supermarket")
    till = Till(str(tmp_path / "birthday"), text)
    month = rules.month_of(till.at + 1_000_000, 480)
    other = month % 12 + 1
    for number, born in (("6225880000000601", month), ("6225880000000602", other)):
        (opened,) = till.apply(PendingOp.build(key(till.rid()), L.OP_OPEN, cid(number),
                                               profile=b"{}", client_time_us=till.at + 1,
                                               birth_month=born))
        assert opened.reason == L.R_OK
        till.top_up(number, 10000)
    assert figures(till.buy("6225880000000601", line(FRESH, 5555), line(TOBACCO, 1000)))[
        "points"] == 110
    assert figures(till.buy("6225880000000602", line(FRESH, 5555)))["points"] == 55
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def test_cards_opened_before_birth_months_get_theirs_from_their_profiles(tmp_path):
    path = str(tmp_path / "births")
    till = Till(path, example("supermarket"))
    number = "6225880000000603"
    (opened,) = till.apply(PendingOp.build(key(till.rid()), L.OP_OPEN, cid(number),
                                           profile=b'{"birthday": "1990-07-14"}',
                                           client_time_us=till.at + 1))
    assert till.ledger.read_card(cid(number))[0][13] == 0  # opened without it
    with till.ledger.env.begin(write=True) as txn:
        txn.delete(b"birth_months", db=till.ledger.meta)  # as the release before left it
    till.ledger.close()
    reopened = Ledger(path)
    assert reopened.read_card(cid(number))[0][13] == 7
    assert verify(reopened)["ok"]
    reopened.close()


def test_verify_reads_an_older_ledger_read_only_without_false_problems(cafe):
    """A ledger no writer of this release has opened lacks the card programs' sub-databases: a
    read-only verify (as ``cardcore verify`` runs) checks what is there and reports nothing
    missing as a problem."""
    number = "6225880000000701"
    cafe.open(number)
    cafe.top_up(number, 20000)
    cafe.buy(number, line(CAFE_FOOD, 1000))
    path = cafe.ledger.path
    with cafe.ledger.env.begin(write=True) as txn:
        for name in ("card_ext", "points_lots", "lots_by_day", "coupons", "packages",
                     "gift_stock"):
            txn.drop(getattr(cafe.ledger, name), delete=True)
    cafe.ledger.close()
    cafe.ledger = Ledger(path, readonly=True)
    report = verify(cafe.ledger)
    assert report["ok"], report["problems"]


def test_verify_finds_a_birth_month_changed_in_a_card_record(tmp_path):
    text = "birthday_points_bp = 20000\n" + example("supermarket")
    till = Till(str(tmp_path / "month"), text)
    number = "6225880000000702"
    till.apply(PendingOp.build(key(till.rid()), L.OP_OPEN, cid(number), profile=b"{}",
                               client_time_us=till.at + 1, birth_month=3))
    assert verify(till.ledger)["ok"]
    with till.ledger.env.begin(write=True) as txn:
        raw = bytearray(txn.get(cid(number), db=till.ledger.cards))
        raw[68] = 4
        txn.put(cid(number), bytes(raw), db=till.ledger.cards)
    assert not verify(till.ledger)["ok"]
    till.ledger.close()


def test_operations_after_a_referral_in_the_same_group_get_their_answers(tmp_path):
    """The referral bonus runs between the group's runs; what comes after it is answered as
    usual (a regression: its outcomes were once written to a list the group no longer held)."""
    till = Till(str(tmp_path / "after"), "referral_points = 500\n" + example("supermarket"))
    a, b = "6225880000000801", "6225880000000802"
    till.open(a)
    opened, topped, bought = till.apply(
        PendingOp.build(key(till.rid()), L.OP_OPEN, cid(b), profile=b"{}",
                        client_time_us=till.at + 1, referrer_id=cid(a)),
        op(till.rid(), L.OP_TOP_UP, a, 5000, at=till.at + 1),
        op(till.rid(), L.OP_PURCHASE, a, 1000, at=till.at + 1))
    assert (opened.reason, topped.reason, bought.reason) == (L.R_OK, L.R_OK, L.R_OK)
    assert till.card(a)["points"] == 100 + 500 + 10
    till.ledger.close()


REVIEWING_CAFE = "tier_review_days = 7\n" + example("cafe")  # a week, so a test can reach it


def reviews_of(till: Till, number: str) -> list[tuple]:
    """The card's review entries: (spend, tier, tier_after, new period's first day)."""
    return [(e[9], e[2], v[L.JOURNAL_OFF_PROGRAM + 16], e[29])
            for e, v in ((L.JOURNAL.unpack(v), v) for _, v in till.ledger.dump()["journal"])
            if e[1] == L.OP_TIER_REVIEWED and e[8] == cid(number)]


def silver_by_spend(till: Till, number: str, other: str) -> int:
    """Cards ``number`` and ``other`` opened; ``number`` topped up twice with 900.00 (no gold)
    and lifted to silver by spending 1000.00 at once. The day they were opened."""
    till.open(number)
    till.open(other)
    day = lots.day_of(till.at)
    till.top_up(number, 90000)
    till.top_up(number, 90000)
    assert figures(till.buy(number, line(CAFE_FOOD, 100000)))["tier_after"] == 1
    return day


def test_a_tier_is_kept_by_the_period_spend_and_lost_when_it_falls_short(tmp_path):
    """The cafe program reviewing tiers every 7 days (silver: 1000.00 spent in the period). Day
    D: the card spends 1000.00 (silver at once). Day D + 7: its first operation is preceded by
    a review: spend 1000.00 >= 1000.00, silver kept, the next period starts on D + 7; that
    purchase of 100.00 pays 95.00 at silver. Day D + 14: spend 95.00 < 1000.00, back to
    standard before the purchase, which pays 100 % (100.00). A Quote made on D + 14 before the
    purchase already computes at standard while the card record still says silver. Left unused
    to D + 30 (two whole periods and a bit), its next review counts nothing spent."""
    till = Till(str(tmp_path / "review"), REVIEWING_CAFE)
    number, other = "6225880000000401", "6225880000000402"
    day = silver_by_spend(till, number, other)
    advance(till, other, (day + 7) * L.DAY_US)
    f = figures(till.buy(number, line(CAFE_FOOD, 10000), at=(day + 7) * L.DAY_US))
    assert (f["tier"], f["amount"] - f["discount"]) == (1, 9500)
    assert reviews_of(till, number) == [(100000, 1, 1, day + 7)]
    advance(till, other, (day + 14) * L.DAY_US)
    till.top_up(other, 1, at=(day + 14) * L.DAY_US)
    entry, _, _ = till.ledger.quote(till.purchase(number, line(CAFE_FOOD, 10000)), till.at)
    assert (L.JOURNAL.unpack(entry)[2], L.JOURNAL.unpack(entry)[10]) == (0, 0)
    assert till.card(number)["tier"] == 1  # reads show the last review's tier
    f = figures(till.buy(number, line(CAFE_FOOD, 10000)))
    assert (f["tier"], f["discount"]) == (0, 0)
    assert reviews_of(till, number)[-1] == (9500, 1, 0, day + 14)
    tiers = dict(till.ledger.dump()["meta"])[b"tier_cards"]
    assert int.from_bytes(tiers[8:16], "little") == 0  # no silver card left
    advance(till, other, (day + 30) * L.DAY_US)
    till.top_up(number, 1, at=(day + 30) * L.DAY_US)
    assert reviews_of(till, number)[-1] == (0, 0, 0, day + 28)
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def test_gold_by_one_top_up_is_kept_by_such_a_top_up_in_the_period(tmp_path):
    """Gold is reached by one top-up of 1000.00. A period with such a top-up keeps gold even
    with 90.00 spent; the next one, with 90.00 spent and only a 500.00 top-up, reaches no tier:
    standard. A spend upgrade counts the period's spend only: silver needs another 1000.00
    spent after the review, whatever the card spent before."""
    till = Till(str(tmp_path / "review"), REVIEWING_CAFE)
    number, other = "6225880000000403", "6225880000000404"
    till.open(number)
    till.open(other)
    day = lots.day_of(till.at)
    assert figures(till.top_up(number, 100000))["tier_after"] == 2
    till.buy(number, line(CAFE_FOOD, 10000))  # pays 90.00 at gold
    advance(till, other, (day + 7) * L.DAY_US)
    till.top_up(number, 50000, at=(day + 7) * L.DAY_US)
    assert reviews_of(till, number) == [(9000, 2, 2, day + 7)]
    till.buy(number, line(CAFE_FOOD, 10000))
    advance(till, other, (day + 14) * L.DAY_US)
    till.top_up(number, 1, at=(day + 14) * L.DAY_US)
    assert reviews_of(till, number)[-1] == (9000, 2, 0, day + 14)
    assert figures(till.buy(number, line(CAFE_FOOD, 99999)))["tier_after"] == 0  # 999.99
    assert figures(till.buy(number, line(CAFE_FOOD, 1)))["tier_after"] == 1
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def test_cards_opened_before_reviews_start_their_period_without_losing_a_tier(tmp_path):
    """Under the plain cafe program a card reaches silver. Reviews every 7 days are loaded
    later: the card's next operation is preceded by a review that only starts its tracking
    (spend 0, silver kept, its period the one it is in: opened on day D, seen on D + 9, so
    from D + 7); the period's end (D + 14) finds nothing spent since: standard."""
    till = Till(str(tmp_path / "review"), example("cafe"))
    number, other = "6225880000000405", "6225880000000406"
    day = silver_by_spend(till, number, other)
    advance(till, other, (day + 9) * L.DAY_US)
    (loaded,) = till.apply(PendingOp.admin(key("load-reviews", (L.CALLER_SYSTEM, 0)),
                                           L.OP_PROGRAM_LOADED, bytes(16),
                                           REVIEWING_CAFE.encode(), 0,
                                           client_time_us=till.at + 1))
    assert loaded.reason == L.R_OK
    f = figures(till.buy(number, line(CAFE_FOOD, 10000)))
    assert (f["tier"], f["discount"]) == (1, 500)
    assert reviews_of(till, number) == [(0, 1, 1, day + 7)]
    advance(till, other, (day + 14) * L.DAY_US)
    till.top_up(number, 1, at=(day + 14) * L.DAY_US)
    assert reviews_of(till, number)[-1] == (9500, 1, 0, day + 14)
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()


def test_a_new_review_period_length_restarts_tracking_without_a_downgrade(tmp_path):
    """Reviews every 14 days; gold by one 1000.00 top-up on day D, another on D + 13. On D + 13
    a program reviewing every 7 days is loaded: the card's running period (of 14 days) is not
    read with the new length; its next operation (D + 14) restarts its tracking in the 7-day
    period it is in (from D + 14), gold kept, nothing counted as unspent."""
    till = Till(str(tmp_path / "review"), "tier_review_days = 14\n" + example("cafe"))
    number, other = "6225880000000407", "6225880000000408"
    till.open(number)
    till.open(other)
    day = lots.day_of(till.at)
    assert figures(till.top_up(number, 100000))["tier_after"] == 2
    advance(till, other, (day + 13) * L.DAY_US)
    till.top_up(number, 100000, at=(day + 13) * L.DAY_US)
    (loaded,) = till.apply(PendingOp.admin(key("load-7", (L.CALLER_SYSTEM, 0)),
                                           L.OP_PROGRAM_LOADED, bytes(16),
                                           REVIEWING_CAFE.encode(), 0,
                                           client_time_us=till.at + 1))
    assert loaded.reason == L.R_OK
    advance(till, other, (day + 14) * L.DAY_US)
    till.top_up(number, 1, at=(day + 14) * L.DAY_US)
    assert reviews_of(till, number)[-1] == (0, 2, 2, day + 14)
    assert till.card(number)["tier"] == 2
    report = verify(till.ledger)
    assert report["ok"], report["problems"]
    till.ledger.close()
