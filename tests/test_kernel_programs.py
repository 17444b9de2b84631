"""The kernel and the reference agree on card programs: lines and categories, redemption, spend
orders, top-up promotions, tier upgrades and reviews (rules 2-11 of cardcore.rules), on any
input."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cardcore import layout as L
from cardcore import reference, rules
from cardcore.ext import kernel
from test_kernel import PIN_A, card_bytes, op_bytes, records, run_full
from conftest import examples

INT64_MAX = L.INT64_MAX
T0 = 1_800_000_000_000_000  # the group times below are near this
# 2027-02-01 00:00 UTC: a birth month begins or ends with the clock (at offset 0; 480: earlier)
MONTH_EDGE = 1_801_440_000_000_000
DAY0 = T0 // L.DAY_US  # the day of T0 (20833): review days around it reach period ends
edge_money = st.one_of(st.integers(1, 100_000), st.integers(1, INT64_MAX),
                       st.sampled_from([1, INT64_MAX, INT64_MAX - 1, 1 << 62]))


def agree(program: bytes, batch: tuple, ts_us: int, first_seq: int) -> None:
    """The kernel and the reference give the same outputs on ``batch`` (ops, slots, records,
    program states, lines, item slots, items)."""
    ops, slots, recs, exts, lines, islots, items = batch
    assert run_full(kernel.apply_batch, program, ops, slots, recs, ts_us, first_seq, lines, exts,
                    islots, items) == \
        run_full(reference.apply_batch, program, ops, slots, recs, ts_us, first_seq, lines, exts,
                 islots, items)


@st.composite
def programs(draw):
    codes = draw(st.lists(st.sampled_from([1, 2, 5, 63]), max_size=4, unique=True))
    categories = tuple(rules.Category(c, f"c{c}", draw(st.booleans())) for c in codes)
    n_tiers = draw(st.integers(1, 4))
    rate = st.integers(1, 10000)
    per = st.one_of(st.integers(0, 5), st.sampled_from([INT64_MAX, 1 << 40]))
    tiers = []
    for t in range(n_tiers):
        first = t == 0
        tiers.append(rules.Tier(
            f"t{t}", draw(rate), draw(st.one_of(st.none(), per)),
            0 if first else draw(st.one_of(st.just(0), st.integers(1, 10**6), edge_money)),
            0 if first else draw(st.one_of(st.just(0), st.integers(1, 10**6))),
            tuple((c, draw(rate)) for c in codes if draw(st.booleans())),
            tuple((c, draw(per)) for c in codes if draw(st.booleans()))))
    promotions = []
    for pid in draw(st.lists(st.integers(1, 40), max_size=6, unique=True)):
        starts = draw(st.sampled_from([0, 0, T0 - 10, T0, T0 + 5]))
        promotions.append(rules.Promotion(
            pid, f"p{pid}", draw(st.sampled_from(list(rules.PROMOTION_KINDS.values()))),
            draw(st.one_of(st.integers(1, 10**4), edge_money)), draw(st.integers(0, 10**5)),
            draw(st.integers(0, 10000)), draw(st.sampled_from([0, 0, 1, 500])), starts,
            draw(st.sampled_from([starts + 1, T0 + 3, T0 + 10, INT64_MAX]).filter(lambda e: e > starts)),
            draw(st.sampled_from([0, 0, 1, 2, 255]))))
    coupons = []
    for cid_ in draw(st.lists(st.sampled_from([1, 1, 2, 3, 9]), max_size=4, unique=True)):
        kind = draw(st.sampled_from(list(rules.COUPON_KINDS.values())))
        coupons.append(rules.Coupon(
            cid_, f"c{cid_}", kind, draw(st.sampled_from([-1, -1, 0, *codes])),
            draw(st.sampled_from([0, 0, 0, 100, 5000, INT64_MAX])),
            draw(st.integers(1, 10_000)) if kind == L.COUPON_AMOUNT_OFF else 0,
            draw(st.integers(1, 10000)) if kind == L.COUPON_PERCENT_OFF else 0,
            0 if kind == L.COUPON_AMOUNT_OFF else draw(st.sampled_from([0, 1, 300])),
            draw(st.integers(1, 60)), draw(st.sampled_from([0, 0, 50, 1000]))))
    packages = []
    for pid in draw(st.lists(st.sampled_from([1, 1, 2, 5]), max_size=3, unique=True)):
        kind = draw(st.sampled_from(list(rules.PACKAGE_KINDS.values())))
        packages.append(rules.Package(
            pid, f"p{pid}", kind, draw(st.sampled_from([1, 500, 80_000, INT64_MAX])),
            draw(st.integers(1, 400)), draw(st.integers(1, 12)) if kind == L.PACKAGE_COUNT else 0,
            draw(st.sampled_from([-1, 0, *codes]))))
    exchange = draw(st.one_of(st.just((0, 0)), st.tuples(st.integers(1, 500), st.integers(1, 500)),
                              st.tuples(edge_money, edge_money)))
    redeem = draw(st.one_of(st.just((0, 0)), st.tuples(st.integers(1, 500), st.integers(1, 500)),
                            st.tuples(edge_money, edge_money)))
    return rules.Program(
        tiers=tuple(tiers), points_unit_minor=draw(st.one_of(st.integers(1, 1000), edge_money)),
        points_per_unit=draw(st.integers(0, 5)), pin_tries_max=draw(st.integers(1, 15)),
        categories=categories, promotions=tuple(promotions),
        spend_order=draw(st.sampled_from(list(rules.SPEND_ORDERS.values()))),
        redeem_points=redeem[0], redeem_value_minor=redeem[1], coupons=tuple(coupons),
        packages=tuple(packages),
        activation_points=draw(st.sampled_from([0, 0, 200, INT64_MAX])),
        birthday_points_bp=draw(st.sampled_from([0, 10000, 20000, 100_000])),
        utc_offset_minutes=draw(st.sampled_from([0, 480, -720, 840])),
        exchange_points=exchange[0], exchange_bonus_minor=exchange[1],
        gifts=tuple(rules.Gift(gid, f"g{gid}", draw(st.sampled_from([1, 100, 2000, INT64_MAX])),
                               draw(st.sampled_from([0, 1, 2, 100])))
                    for gid in draw(st.lists(st.sampled_from([1, 2, 7]), max_size=3, unique=True))),
        redeem_cap_bp=draw(st.sampled_from([0, 1, 2000, 5000, 10000])),
        tier_review_days=draw(st.sampled_from([0, 0, 7, 365, 3660])),
        refund_points_shortfall=draw(st.sampled_from(list(rules.SHORTFALLS.values())))).packed(
            draw(st.integers(1, 2**32 - 1)))


@st.composite
def cards(draw):
    """Mostly active cards of a valid tier with moderate balances, so most operations apply;
    sometimes the edges (no card, inactive, huge balances, a PIN)."""
    if draw(st.integers(0, 5)) == 0:
        return draw(records())
    small = st.integers(0, 2_000_000)
    principal = draw(st.one_of(small, st.just(INT64_MAX - 5)))
    bonus = draw(st.one_of(small, st.just(0))) if principal < INT64_MAX - 5 else 0
    return card_bytes(principal=principal, bonus=bonus,
                      points=draw(st.one_of(st.integers(0, 50_000), st.just(INT64_MAX - 3),
                                            st.sampled_from([-1, -700, -INT64_MAX]))),
                      tier=draw(st.integers(0, 3)), lifetime=draw(st.integers(0, 2_000_000)),
                      birth_month=draw(st.sampled_from([0, 1, 1, 2, 12])),
                      opened_us=draw(st.sampled_from([0, T0 - 400 * L.DAY_US, T0 - 365 * L.DAY_US,
                                                      T0 - 7 * L.DAY_US, T0 - 1, T0])))


@st.composite
def extras(draw):
    """A card program state: none yet, or one with counts, promotion uses and a review period
    (rule 11) that is running, just ended, or ended long ago."""
    if draw(st.booleans()):
        return bytes(L.CARD_EXT_SIZE)
    ids = draw(st.lists(st.sampled_from([0, 0, 1, 2, 3, 7, 40]), min_size=16, max_size=16))
    uses = draw(st.lists(st.integers(0, 300), min_size=16, max_size=16))
    return L.CARD_EXT.pack(1, draw(st.sampled_from([0, L.REVIEW_STARTED])), bytes(2),
                           draw(st.sampled_from([0, 1, 5, 0xFFFFFFFF])),
                           draw(st.one_of(st.integers(0, 10**9), st.just(INT64_MAX))), *ids, *uses,
                           draw(st.sampled_from([0, DAY0 - 7, DAY0 - 8, DAY0 - 365, DAY0 - 366,
                                                 DAY0 - 730, DAY0 - 3660, DAY0, DAY0 + 1])),
                           draw(st.sampled_from([7, 7, 365, 365, 3660, 0, 14])),
                           draw(st.sampled_from([0, 0, 1000, 1_999_999, INT64_MAX])),
                           draw(st.sampled_from([0, 0, 1, 50_000, 10**6])), bytes(24))


@st.composite
def coupon_records(draw):
    """A coupon as the ledger reads it: none (zeros), issued or used, valid around T0."""
    if draw(st.integers(0, 6)) == 0:
        return bytes(L.COUPON_SIZE)
    start = draw(st.sampled_from([0, 0, T0 - 5, T0, T0 + 4]))
    return L.COUPON.pack(1, draw(st.sampled_from([1, 1, 1, 2])),
                         draw(st.sampled_from([1, 1, 1, 2, 3, 9, 4])), 0, start,
                         draw(st.sampled_from([start + 1, T0 + 3, INT64_MAX, INT64_MAX])),
                         draw(st.integers(1, 100)), 0, 0, bytes(16))


@st.composite
def batches(draw):
    nslots = draw(st.integers(1, 4))
    recs = b"".join(draw(st.lists(cards(), min_size=nslots, max_size=nslots)))
    exts = b"".join(draw(st.lists(extras(), min_size=nslots, max_size=nslots)))
    ops, slots, lines = [], [], []
    coupon_recs = draw(st.lists(coupon_records(), max_size=3))
    cslots = []
    for i in range(draw(st.integers(1, 25))):
        slots.append(draw(st.integers(0, nslots - 1)))
        kind = draw(st.sampled_from([L.OP_TOP_UP, L.OP_TOP_UP, L.OP_PURCHASE, L.OP_PURCHASE,
                                     L.OP_PURCHASE, L.OP_OPEN, L.OP_BALANCE_INQUIRY,
                                     L.OP_COUPON_ISSUE, L.OP_POINTS_EXPIRED, L.OP_POINTS_EXCHANGE,
                                     L.OP_REFERRAL_BONUS, L.OP_TIER_REVIEWED,
                                     L.OP_TIER_REVIEWED]))
        ref_id, cslot = 0, L.SLOT_NONE
        if kind == L.OP_PURCHASE and coupon_recs and draw(st.booleans()):
            cslot = draw(st.integers(0, len(coupon_recs) - 1))  # two purchases may share one
            ref_id = cslot + 1
        elif kind == L.OP_COUPON_ISSUE:
            ref_id = draw(st.sampled_from([1, 2, 3, 9, 4, 70000]))
        cslots.append(cslot)
        my_lines = []
        if kind == L.OP_PURCHASE or draw(st.integers(0, 20)) == 0:  # lines on a top-up: refused
            for _ in range(draw(st.integers(0, 5))):
                my_lines.append(L.LINE.pack(
                    draw(st.sampled_from([0, 0, 1, 2, 5, 63, 3, 64, 9999])),
                    0, draw(st.integers(0, 10)),
                    draw(st.integers(-5, 0) if draw(st.integers(0, 15)) == 0 else
                         st.one_of(st.integers(1, 50_000), st.integers(1, 50_000), edge_money)),
                    0, 0, 0, b"sku"))
        amount = draw(st.one_of(st.integers(1, 300_000), edge_money, st.integers(-3, 0)))
        if kind == L.OP_TIER_REVIEWED and draw(st.integers(0, 5)):
            amount = 0  # as the writer sends it
        if my_lines and draw(st.integers(0, 5)):  # usually the sum of the lines, as the server sends
            amount = sum(L.LINE.unpack(b)[3] for b in my_lines)
            if not -(1 << 63) <= amount <= INT64_MAX:
                amount = 1
        redeem = -1 if draw(st.integers(0, 25)) == 0 else draw(st.one_of(
            st.just(0), st.integers(1, 2_000), st.integers(1, 2_000), edge_money))
        if kind == L.OP_COUPON_ISSUE:
            redeem = draw(st.sampled_from([0, 0, 50, 1000, 7]))
        elif kind != L.OP_PURCHASE and draw(st.integers(0, 10)):
            redeem = 0
        lines.extend(my_lines)
        ops.append(op_bytes(kind, amount, tier=draw(st.integers(0, 4)), card=bytes([slots[-1]]) * 16,
                            birth_month=draw(st.sampled_from([0, 1, 2, 12, 13])),
                            tag=i.to_bytes(8, "little"),
                            pin_flags=draw(st.sampled_from([0, 0, 0, L.PIN_PRESENTED,
                                                            L.PIN_OPTIONAL_UNSET])),
                            pin=PIN_A, line_count=len(my_lines), redeem=redeem, ref_id=ref_id,
                            op_flags=draw(st.sampled_from([0, 0, L.ALLOW_PARTIAL])),
                            operator=draw(st.sampled_from([0, 7]))))
    return b"".join(ops), slots, recs, exts, b"".join(lines), cslots, b"".join(coupon_recs)


@settings(max_examples=examples(1500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=batches(),
       ts_us=st.sampled_from([T0 - 10, T0, T0 + 3, T0 + 9, T0 + 10, MONTH_EDGE - 1, MONTH_EDGE,
                              MONTH_EDGE - 480 * 60_000_000, 0]),
       first_seq=st.integers(1, 2**40))
@example(program=rules.Program(tiers=(rules.Tier("t", 9000),), redeem_points=100,
                               redeem_value_minor=100, redeem_cap_bp=5000).packed(1),
         batch=(op_bytes(L.OP_PURCHASE, 1000, redeem=250), [0],
                card_bytes(principal=INT64_MAX, points=300), bytes(128), b"", [L.SLOT_NONE], b""),
         ts_us=T0, first_seq=1)
def test_kernel_equals_reference_on_card_programs(program, batch, ts_us, first_seq):
    agree(program, batch, ts_us, first_seq)


@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch], ids=["kernel", "reference"])
def test_an_unknown_program_state_version_stops_the_batch(impl):
    program = rules.DEFAULT_PROGRAM.packed(1)
    with pytest.raises(ValueError):
        run_full(impl, program, op_bytes(L.OP_TOP_UP, 5), [0], card_bytes(), extras=b"\x07" + bytes(127))


@st.composite
def coupon_batches(draw):
    """Purchases that reach the coupon rule: active funded cards, known categories, coupons
    mostly issued and valid now, often shared by two purchases (exactly one may use it)."""
    nslots = draw(st.integers(1, 3))
    recs = b"".join(card_bytes(principal=draw(st.integers(0, 300_000)),
                               bonus=draw(st.integers(0, 50_000)),
                               points=draw(st.integers(0, 5_000)), tier=0)
                    for _ in range(nslots))
    coupons = [L.COUPON.pack(1, draw(st.sampled_from([1, 1, 1, 2])), draw(st.sampled_from([1, 1, 2, 9])),
                             0, draw(st.sampled_from([0, 0, T0 + 1])),
                             draw(st.sampled_from([INT64_MAX, INT64_MAX, T0])), k + 1, 0, 0, bytes(16))
               for k in range(draw(st.integers(1, 3)))]
    ops, slots, lines, cslots = [], [], [], []
    for i in range(draw(st.integers(1, 8))):
        slots.append(draw(st.integers(0, nslots - 1)))
        mine = [L.LINE.pack(draw(st.sampled_from([0, 0, 0, 1, 2, 5])), 0, 1, draw(st.integers(1, 60_000)),
                            0, 0, 0, b"") for _ in range(draw(st.integers(1, 4)))]
        lines.extend(mine)
        cslot = draw(st.integers(0, len(coupons) - 1)) if draw(st.integers(0, 4)) else L.SLOT_NONE
        cslots.append(cslot)
        ops.append(op_bytes(L.OP_PURCHASE, sum(L.LINE.unpack(x)[3] for x in mine),
                            card=bytes([slots[-1]]) * 16, tag=i.to_bytes(8, "little"),
                            line_count=len(mine), ref_id=0 if cslot == L.SLOT_NONE else cslot + 1,
                            op_flags=draw(st.sampled_from([0, L.ALLOW_PARTIAL])),
                            redeem=draw(st.sampled_from([0, 0, 100, 1000]))))
    return b"".join(ops), slots, recs, bytes(len(recs)), b"".join(lines), cslots, b"".join(coupons)



@settings(max_examples=examples(700), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=coupon_batches(), ts_us=st.sampled_from([T0, T0 + 1]))
def test_kernel_equals_reference_on_coupons(program, batch, ts_us):
    agree(program, batch, ts_us, 1)


@st.composite
def package_batches(draw):
    """Package sales (at the program's price, sometimes not) and uses of package records that
    are there or not, count or time, used up or not, valid now or not; two uses may share one."""
    nslots = draw(st.integers(1, 3))
    recs = b"".join(card_bytes(principal=draw(st.integers(0, 200_000)),
                               bonus=draw(st.integers(0, 50_000)), tier=0,
                               lifetime=draw(st.sampled_from([0, 1_000, INT64_MAX - 10])))
                    for _ in range(nslots))
    packages = [L.PACKAGE.pack(draw(st.sampled_from([1, 1, 1, 0])), draw(st.sampled_from([1, 2])),
                               draw(st.sampled_from([1, 2, 5])), draw(st.sampled_from([0, 1, 1, 3])),
                               draw(st.sampled_from([0, 0, T0 + 1])),
                               draw(st.sampled_from([INT64_MAX, INT64_MAX, T0])), k + 1, 0,
                               draw(st.sampled_from([0, 2, 0xFFFFFFFF])), 0, bytes(16))
                for k in range(draw(st.integers(1, 3)))]
    ops, slots, islots = [], [], []
    for i in range(draw(st.integers(1, 8))):
        slots.append(draw(st.integers(0, nslots - 1)))
        if draw(st.booleans()):
            islot = draw(st.integers(0, len(packages) - 1))
            islots.append(islot)
            ops.append(op_bytes(L.OP_PACKAGE_USE, draw(st.sampled_from([0, 0, 0, 5])),
                                card=bytes([slots[-1]]) * 16, tag=i.to_bytes(8, "little"),
                                ref_id=islot + 1))
        else:
            islots.append(L.SLOT_NONE)
            ops.append(op_bytes(L.OP_PACKAGE_SELL,
                                draw(st.sampled_from([1, 500, 80_000, 80_001, INT64_MAX, 0])),
                                card=bytes([slots[-1]]) * 16, tag=i.to_bytes(8, "little"),
                                ref_id=draw(st.sampled_from([1, 2, 5, 9]))))
    return b"".join(ops), slots, recs, bytes(len(recs)), b"", islots, b"".join(packages)


@settings(max_examples=examples(700), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=package_batches(), ts_us=st.sampled_from([T0, T0 + 1]))
def test_kernel_equals_reference_on_packages(program, batch, ts_us):
    agree(program, batch, ts_us, 1)


@st.composite
def points_batches(draw):
    """Points into bonus money and gifts from a stock: offers above, below and between blocks;
    gift stock records there or not, used up or not, two redemptions sharing one."""
    nslots = draw(st.integers(1, 3))
    recs = b"".join(card_bytes(principal=draw(st.sampled_from([0, 5_000, INT64_MAX - 100])),
                               bonus=draw(st.sampled_from([0, 50])),
                               points=draw(st.sampled_from([0, 99, 100, 2_500, INT64_MAX])),
                               tier=0, status=draw(st.sampled_from([1, 1, 1, 2, 5])))
                    for _ in range(nslots))
    stock = [L.GIFT.pack(draw(st.sampled_from([0, 1])), gid, 0, draw(st.sampled_from([0, 1, 2, 99])),
                         bytes(48)) for gid in draw(st.lists(st.sampled_from([1, 2, 7, 9]),
                                                             min_size=1, max_size=3, unique=True))]
    ops, slots, islots = [], [], []
    for i in range(draw(st.integers(1, 8))):
        slots.append(draw(st.integers(0, nslots - 1)))
        if draw(st.booleans()):
            k = draw(st.integers(0, len(stock) - 1))
            islots.append(k)
            ops.append(op_bytes(L.OP_GIFT_REDEEM, draw(st.sampled_from([0, 0, 0, 3])),
                                card=bytes([slots[-1]]) * 16, tag=i.to_bytes(8, "little"),
                                ref_id=L.GIFT.unpack(stock[k])[1]))
        else:
            islots.append(L.SLOT_NONE)
            ops.append(op_bytes(L.OP_POINTS_EXCHANGE, draw(st.sampled_from([0, 0, 0, 1])),
                                card=bytes([slots[-1]]) * 16, tag=i.to_bytes(8, "little"),
                                redeem=draw(st.sampled_from([0, 1, 99, 100, 250, 2_500,
                                                             INT64_MAX]))))
    return b"".join(ops), slots, recs, bytes(len(recs)), b"", islots, b"".join(stock)


@settings(max_examples=examples(700), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=points_batches())
def test_kernel_equals_reference_on_exchanges_and_gifts(program, batch):
    agree(program, batch, T0, 1)


@st.composite
def undo_records(draw):
    """What a refund or reversal reads of its original (layout.UNDO): none, a purchase's or a
    top-up's figures (refunded in part, in full, or reversed), or another operation's."""
    if draw(st.integers(0, 6)) == 0:
        return bytes(L.UNDO.size)
    kind = draw(st.sampled_from([L.OP_PURCHASE, L.OP_PURCHASE, L.OP_TOP_UP, L.OP_OPEN,
                                 L.OP_REFUND, L.OP_PACKAGE_USE, L.OP_GIFT_REDEEM]))
    principal = draw(st.sampled_from([0, 1, 2_500, 99_999, INT64_MAX // 4]))
    bonus = draw(st.sampled_from([0, 1, 700, 33_333]))
    redeemed_fen = draw(st.sampled_from([0, 0, 3, 500])) if kind == L.OP_PURCHASE else 0
    paid = principal + bonus + redeemed_fen
    refunded = min(draw(st.sampled_from([0, 0, 1, paid // 3, paid])), paid)
    return L.UNDO.pack(1, draw(st.sampled_from([0, 0, 0, L.UNDO_REVERSED])), kind,
                       draw(st.integers(0, 3)), draw(st.integers(0, 3)),
                       draw(st.sampled_from([0, 1, 2, 7, 40])), refunded, paid, principal, bonus,
                       draw(st.sampled_from([0, 7, 500, INT64_MAX // 2])),
                       draw(st.sampled_from([0, 1, 120, 10**6])), 0)


@st.composite
def undo_batches(draw):
    """Refunds of any amount (0: all that is left) and reversals of undo records, two sharing
    one, on cards of every kind (short of points or money, inactive, a tier above the one the
    original reached), between purchases, top-ups and status changes (rule 14) of the same
    cards."""
    nslots = draw(st.integers(1, 3))
    recs = b"".join(draw(st.lists(cards(), min_size=nslots, max_size=nslots)))
    exts = b"".join(draw(st.lists(extras(), min_size=nslots, max_size=nslots)))
    undos = draw(st.lists(undo_records(), min_size=1, max_size=3))
    ops, slots, islots = [], [], []
    for i in range(draw(st.integers(1, 10))):
        slots.append(draw(st.integers(0, nslots - 1)))
        kind = draw(st.sampled_from([L.OP_REFUND, L.OP_REFUND, L.OP_REVERSAL, L.OP_REVERSAL,
                                     L.OP_PURCHASE, L.OP_TOP_UP, L.OP_CARD_STATUS,
                                     L.OP_CARD_STATUS]))
        islot = L.SLOT_NONE
        amount = draw(st.one_of(st.integers(1, 300_000), st.sampled_from([1, INT64_MAX])))
        tier = 0
        if kind == L.OP_CARD_STATUS:  # rule 14: a status wanted, from any status
            tier = draw(st.integers(0, 5))
            amount = 0 if draw(st.integers(0, 5)) else amount
        if kind in (L.OP_REFUND, L.OP_REVERSAL):
            islot = draw(st.integers(0, len(undos) - 1))
            amount = draw(st.sampled_from([0, 0, 0, 1, 100, 2_500, 10**6, -1]))
            if kind == L.OP_REVERSAL and draw(st.integers(0, 4)):
                amount = 0  # as the writer sends it
        islots.append(islot)
        ops.append(op_bytes(kind, amount, tier=tier, card=bytes([slots[-1]]) * 16,
                            tag=i.to_bytes(8, "little"), link_seq=draw(st.integers(0, 50)),
                            pin_flags=L.PIN_OPTIONAL_UNSET))
    return b"".join(ops), slots, recs, exts, b"", islots, b"".join(undos)


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=undo_batches(), ts_us=st.sampled_from([T0, T0 + 1]),
       first_seq=st.integers(1, 2**40))
def test_kernel_equals_reference_on_refunds_and_reversals(program, batch, ts_us, first_seq):
    agree(program, batch, ts_us, first_seq)


P7 = INT64_MAX // 7  # 1_317_624_576_693_539_401: 7 * P7 == INT64_MAX exactly
EARNED_PAST_INT64 = [
    # (tier 3's rate_bp, its points per unit, points unit, line amounts (none: one line of the
    #  amount), amount, reason, points delta, each line's points)
    # hypothesis's example: 210 at 82.81 % pays 174, 2 units of 87 at INT64_MAX points each:
    # 2**64 - 2 points, which the card's debt of INT64_MAX would bring to exactly INT64_MAX
    (8281, INT64_MAX, 87, (), 210, L.R_AMOUNT_OVERFLOW, 0, ()),
    # each line within int64 (3 and 5 units of P7), the purchase's 8 * P7 past it
    (10000, P7, 100, (300, 500), 800, L.R_AMOUNT_OVERFLOW, 0, (3 * P7, 5 * P7)),
    # 3 + 4 units: INT64_MAX points, the most a purchase earns: they pay the debt off to 0
    (10000, P7, 100, (300, 400), 700, L.R_OK, INT64_MAX, (3 * P7, 4 * P7)),
]


@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch], ids=["kernel", "reference"])
@pytest.mark.parametrize("rate_bp,per_unit,unit_minor,amounts,amount,reason,d_points,line_points",
                         EARNED_PAST_INT64, ids=["one line", "two lines", "two lines at the limit"])
def test_points_earned_past_int64_decline_the_purchase_even_when_a_debt_would_absorb_them(
        impl, rate_bp, per_unit, unit_minor, amounts, amount, reason, d_points, line_points):
    """Rule 5: a purchase's points earned are a journal figure (its points delta) and an undo
    record's, so past int64 they decline it (the reference used to raise struct.error packing
    the entry; the kernel applied two lines' 2**63 points as 0), however deep the card's debt
    (rule 12, ``owe``: down to -INT64_MAX, a record's floor)."""
    program = rules.Program(
        tiers=tuple(rules.Tier(f"t{k}", 10000) for k in range(3)) + (
            rules.Tier("t3", rate_bp, per_unit),),
        points_unit_minor=unit_minor, refund_points_shortfall=L.SHORTFALL_OWE).packed(1)
    before = card_bytes(principal=INT64_MAX - 5, points=-INT64_MAX, tier=3)
    lines = b"".join(L.LINE.pack(0, 0, 1, a, 0, 0, 0, b"") for a in amounts)
    nxt, rec, journal, dirty, lines_out, *_ = run_full(
        impl, program, op_bytes(L.OP_PURCHASE, amount, pin_flags=L.PIN_OPTIONAL_UNSET,
                                line_count=len(amounts)),
        [0], before, T0, 223, lines)
    entry, card = L.JOURNAL.unpack(journal), L.CARD.unpack(rec)
    assert (entry[4], entry[13]) == (reason, d_points)
    assert tuple(L.LINE.unpack_from(lines_out, k * L.LINE_SIZE)[5]
                 for k in range(len(amounts))) == line_points
    if reason == L.R_OK:
        assert (nxt, entry[7], dirty, card[7], card[5]) == (224, 223, b"\x01", 0,
                                                              INT64_MAX - 5 - amount)
    else:  # nothing changes
        assert (nxt, entry[7], dirty, rec) == (223, 0, b"\x00", before)


@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch], ids=["kernel", "reference"])
def test_an_undo_record_refunded_past_its_amount_stops_the_batch(impl):
    program = rules.DEFAULT_PROGRAM.packed(1)
    broken = L.UNDO.pack(1, 0, L.OP_PURCHASE, 0, 0, 0, 101, 100, 100, 0, 0, 0, 0)
    with pytest.raises(ValueError):
        run_full(impl, program, op_bytes(L.OP_REFUND, 1), [0], card_bytes(), coupon_slots=[0],
                 coupons=broken)


@st.composite
def hold_records(draw):
    """A hold (layout.HOLD) as the ledger passes it: none (zeros), or open or closed, of the
    till's store or another's, before or past its expiry."""
    if draw(st.integers(0, 6)) == 0:
        return bytes(L.HOLD.size)
    amount = draw(st.sampled_from([1, 500, 80_000, 10**6]))
    state = draw(st.sampled_from([L.HOLD_OPEN, L.HOLD_OPEN, L.HOLD_OPEN, L.HOLD_CAPTURED,
                                  L.HOLD_VOIDED, L.HOLD_EXPIRED, L.HOLD_REVERSED]))
    return L.HOLD.pack(1, state, 0, draw(st.sampled_from([1, 1, 9])), amount, T0 - 100,
                       draw(st.sampled_from([T0 - 1, T0, T0 + 1, INT64_MAX])), 5,
                       0 if state == L.HOLD_OPEN else 6,
                       amount if state == L.HOLD_CAPTURED else 0, bytes(8))


@st.composite
def hold_batches(draw):
    """Authorizations (any life in minutes, any amount), captures (a purchase with lines or
    without, paying more or less than its hold, with a coupon or partial payment: refused),
    voids, the server's releases, reversals of authorizations, and closings (rule 14) of cards
    that hold money, two operations sharing one hold (rule 15)."""
    holds = draw(st.lists(hold_records(), min_size=1, max_size=3))
    open_sum = sum(L.HOLD.unpack(h)[4] for h in holds if h[1] == L.HOLD_OPEN)
    nslots = draw(st.integers(1, 3))
    recs = b"".join(card_bytes(principal=draw(st.sampled_from([0, 700, 2_000_000, INT64_MAX // 4])),
                               bonus=draw(st.sampled_from([0, 300])),
                               held=open_sum + draw(st.sampled_from([0, 0, 5])),
                               status=draw(st.sampled_from([L.STATUS_ACTIVE] * 4 + [L.STATUS_FROZEN])),
                               tier=draw(st.integers(0, 2)))
                    for _ in range(nslots))
    exts = bytes(nslots * L.CARD_EXT_SIZE)
    undos = [L.UNDO.pack(1, draw(st.sampled_from([0, 0, L.UNDO_REVERSED])), L.OP_HOLD, 0, 0, 0, 0,
                         paid, 0, 0, 0, 0, 0)
             for paid in draw(st.lists(st.sampled_from([0, 1, 500, 10**6]), max_size=2))]
    items = holds + undos
    ops, slots, islots, lines = [], [], [], []
    for i in range(draw(st.integers(1, 10))):
        slots.append(draw(st.integers(0, nslots - 1)))
        kind = draw(st.sampled_from([L.OP_HOLD, L.OP_HOLD, L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED,
                                     L.OP_PURCHASE, L.OP_PURCHASE, L.OP_REVERSAL, L.OP_CARD_STATUS,
                                     L.OP_TOP_UP]))
        if kind == L.OP_REVERSAL and not undos:
            kind = L.OP_HOLD_VOID
        amount = draw(st.sampled_from([1, 400, 500, 80_000, 10**6, 3 * 10**6, 0, -1]))
        ref_id, islot, flags, tier, my_lines = 0, L.SLOT_NONE, 0, 0, []
        if kind == L.OP_HOLD:
            ref_id = draw(st.sampled_from([0, 1, 1440, 43200, 43201]))
        elif kind in (L.OP_HOLD_VOID, L.OP_HOLD_EXPIRED):
            islot = draw(st.integers(0, len(holds) - 1))
            amount = 0 if draw(st.integers(0, 5)) else amount
            ref_id = 0 if draw(st.integers(0, 5)) else 3
        elif kind == L.OP_REVERSAL:
            islot = len(holds) + draw(st.integers(0, len(undos) - 1))
            amount = 0
        elif kind == L.OP_CARD_STATUS:
            tier, amount = draw(st.sampled_from([L.STATUS_CLOSED, L.STATUS_FROZEN])), 0
        elif kind == L.OP_PURCHASE and draw(st.integers(0, 4)):
            islot = draw(st.integers(0, len(holds) - 1))
            flags = draw(st.sampled_from([L.CAPTURE] * 6 + [L.CAPTURE | L.ALLOW_PARTIAL]))
            ref_id = 0 if draw(st.integers(0, 6)) else 1
            if draw(st.booleans()):
                my_lines = [L.LINE.pack(0, 0, 1, a, 0, 0, 0, b"")
                            for a in draw(st.lists(st.sampled_from([100, 400, 99_999]),
                                                   min_size=1, max_size=3))]
                amount = sum(L.LINE.unpack(b)[3] for b in my_lines)
        islots.append(islot)
        lines.extend(my_lines)
        ops.append(op_bytes(kind, amount, tier=tier, card=bytes([slots[-1]]) * 16,
                            tag=i.to_bytes(8, "little"), link_seq=5, ref_id=ref_id,
                            store=draw(st.sampled_from([1, 1, 9])),
                            operator=draw(st.sampled_from([0, 0, 7])),
                            pin_flags=L.PIN_OPTIONAL_UNSET, op_flags=flags,
                            line_count=len(my_lines)))
    return b"".join(ops), slots, recs, exts, b"".join(lines), islots, b"".join(items)


@settings(max_examples=examples(800), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=hold_batches(),
       ts_us=st.sampled_from([T0 - 1, T0, T0 + 1, INT64_MAX - 60_000_000]),
       first_seq=st.integers(1, 2**40))
def test_kernel_equals_reference_on_holds(program, batch, ts_us, first_seq):
    # The holds and undo records here are drawn apart from the cards' held amounts, so a batch
    # may release more than a card holds: both must then refuse the whole batch alike.
    def run(impl):
        ops, slots, recs, exts, lines, islots, items = batch
        try:
            return run_full(impl, program, ops, slots, recs, ts_us, first_seq, lines, exts,
                            islots, items)
        except ValueError:
            return "refused"
    assert run(kernel.apply_batch) == run(reference.apply_batch)


@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch], ids=["kernel", "reference"])
def test_a_hold_captured_past_its_amount_stops_the_batch(impl):
    program = rules.DEFAULT_PROGRAM.packed(1)
    broken = L.HOLD.pack(1, L.HOLD_CAPTURED, 0, 1, 100, T0, T0 + 1, 5, 6, 101, bytes(8))
    with pytest.raises(ValueError):
        run_full(impl, program, op_bytes(L.OP_HOLD_VOID, 0, link_seq=5), [0], card_bytes(),
                 coupon_slots=[0], coupons=broken)


@pytest.mark.parametrize("order", sorted(rules.SPEND_ORDERS.values()))
@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch], ids=["kernel", "reference"])
def test_an_open_hold_past_what_its_card_holds_stops_the_batch(impl, order):
    # A broken ledger, never a refusal: a capture would otherwise spend money the card has not
    # got (and, spending in proportion from two empty buckets, divide by zero in the kernel).
    program = dataclasses.replace(rules.DEFAULT_PROGRAM, spend_order=order).packed(1)
    hold = L.HOLD.pack(1, L.HOLD_OPEN, 0, 1, 100, T0, T0 + 10**9, 5, 0, 0, bytes(8))
    # (a void of it is stopped too, but by the check after the operation: held below 0)
    with pytest.raises(ValueError):
        run_full(impl, program, op_bytes(L.OP_PURCHASE, 100, op_flags=L.CAPTURE), [0],
                 card_bytes(held=99), ts_us=T0 + 1, coupon_slots=[0], coupons=hold)
    # the same hold within what the card holds is captured
    nxt = run_full(impl, program, op_bytes(L.OP_PURCHASE, 100, op_flags=L.CAPTURE), [0],
                   card_bytes(principal=100, held=100), ts_us=T0 + 1, coupon_slots=[0],
                   coupons=hold)
    assert L.CARD.unpack(nxt[1])[5] == 0 and L.CARD.unpack(nxt[1])[8] == 0


@st.composite
def line_refund_batches(draw):
    """Refunds by line (rule 12) of one sale, its lines marked as the writer marks them (asked,
    given back before, both, neither; now and then a mark or figure no writer sends), its undo
    record paid in full by the card or in part (a till collected the rest), one after another
    on the same record, between refunds by amount."""
    recs = draw(cards())
    n = draw(st.integers(1, 5))
    gross = [draw(st.sampled_from([1, 2, 3, 999, 5_000, 10**6])) for _ in range(n)]
    off = [min(g, draw(st.sampled_from([0, 0, 1, 500, g]))) for g in gross]
    total = sum(g - o for g, o in zip(gross, off))
    paid = draw(st.sampled_from([total, total, total, total // 2, max(total - 1, 0), total + 1]))
    redeemed_fen = min(draw(st.sampled_from([0, 0, 3])), paid)
    bonus = min(draw(st.sampled_from([0, 0, 700])), paid - redeemed_fen)
    principal = paid - redeemed_fen - bonus
    refunded = min(draw(st.sampled_from([0, 0, 0, 1, paid // 3])), paid)
    undo = L.UNDO.pack(1, draw(st.sampled_from([0, 0, 0, 0, L.UNDO_REVERSED])), L.OP_PURCHASE, 0,
                       0, 0, refunded, paid, principal, bonus,
                       draw(st.sampled_from([0, 7, 500])), draw(st.sampled_from([0, 1, 120, 10**6])),
                       0)
    ops, lines = [], []
    for i in range(draw(st.integers(1, 4))):
        by_line = draw(st.integers(0, 4))
        count = n if by_line else 0
        for k in range(count):
            tag = draw(st.sampled_from([0, 0, 0, L.LINE_ASKED, L.LINE_ASKED, L.LINE_ASKED,
                                        L.LINE_REFUNDED, L.LINE_ASKED | L.LINE_REFUNDED]))
            tag = tag if draw(st.integers(0, 30)) else 4
            lines.append(L.LINE.pack(1, tag, 1, gross[k], off[k], 0, 0, b""))
        amount = draw(st.sampled_from([0, 0, 0, 0, 1, -1])) if by_line else draw(
            st.sampled_from([0, 1, 100]))
        ops.append(op_bytes(L.OP_REFUND, amount, tag=i.to_bytes(8, "little"), line_count=count,
                            link_seq=7))
    n_ops = len(ops)
    return (b"".join(ops), [0] * n_ops, recs, bytes(len(recs)), b"".join(lines), [0] * n_ops,
            undo)


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=line_refund_batches(), first_seq=st.integers(1, 2**40))
def test_kernel_equals_reference_on_refunds_by_line(program, batch, first_seq):
    agree(program, batch, T0, first_seq)


@pytest.mark.parametrize("impl", [kernel.apply_batch, reference.apply_batch], ids=["kernel", "reference"])
def test_a_sales_lines_refunded_one_by_one_give_back_what_a_full_refund_gives(impl):
    """Three lines paid 130.00, 380.00 and 50.00 (560.00: 555.00 by the card, 5.00 by points),
    1,020 points earned: refunded line 3, then 1, then 2, each refund's figures by the shares of
    what was refunded before and after (rule 12): 50.00 (91 points taken back), 130.00 (236),
    380.00 (693): 560.00 and 1,020 points in all, as one full refund gives; the last one leaves
    nothing (UNDO_COMPLETE)."""
    program = rules.DEFAULT_PROGRAM.packed(1)
    sale = [(1, 20000, 7000), (2, 40000, 2000), (3, 5000, 0)]
    undo = L.UNDO.pack(1, 0, L.OP_PURCHASE, 0, 0, 0, 0, 56000, 55500, 0, 500, 1020, 0)
    card = card_bytes(principal=0, points=5000, lifetime=55500)
    given_back, done = set(), []
    for number in (3, 1, 2):
        lines = b"".join(L.LINE.pack(code, (L.LINE_ASKED if k + 1 == number else 0)
                                     | (L.LINE_REFUNDED if k + 1 in given_back else 0), 1, g, d,
                                     0, 0, b"")
                         for k, (code, g, d) in enumerate(sale))
        _, card, journal, _, _, _, undo, _ = run_full(
            impl, program, op_bytes(L.OP_REFUND, 0, line_count=3), [0], card, lines=lines,
            coupon_slots=[0], coupons=undo)
        e = L.JOURNAL.unpack(journal)
        taken, fen_by_points, _, line_count, _ = L.JOURNAL_PROGRAM.unpack_from(
            journal, L.JOURNAL_OFF_PROGRAM)
        flags = L.JOURNAL_PURCHASE_FLAGS.unpack_from(journal, L.JOURNAL_OFF_PURCHASE_FLAGS)[0]
        done.append((e[4], e[9], e[11], fen_by_points, taken, line_count,
                     bool(flags & L.UNDO_COMPLETE)))
        given_back.add(number)
    assert done == [(L.R_OK, 5000, 4955, 45, 91, 1, False),
                    (L.R_OK, 13000, 12884, 116, 236, 1, False),
                    (L.R_OK, 38000, 37661, 339, 693, 1, True)]
    assert sum(x[1] for x in done) == 56000 and sum(x[2] for x in done) == 55500
    assert sum(x[4] for x in done) == 1020 and L.UNDO.unpack(undo)[6] == 56000


@st.composite
def import_batches(draw):
    """Rule 18: imports (principal in amount_minor, bonus in ref_id, points in redeem_points) at
    their edges, onto empty slots mostly, with top-ups, purchases and tier reviews after them (an
    import's program state) and the flags an import refuses (a PIN, issue-only, partial)."""
    nslots = draw(st.integers(1, 4))
    recs = b"".join(draw(st.lists(st.one_of(st.just(bytes(L.CARD_SIZE)), cards()),
                                  min_size=nslots, max_size=nslots)))
    exts = b"".join(draw(st.lists(extras(), min_size=nslots, max_size=nslots)))
    ops, slots = [], []
    for i in range(draw(st.integers(1, 12))):
        slots.append(draw(st.integers(0, nslots - 1)))
        kind = draw(st.sampled_from([L.OP_IMPORT_CARD, L.OP_IMPORT_CARD, L.OP_IMPORT_CARD,
                                     L.OP_TOP_UP, L.OP_PURCHASE, L.OP_TIER_REVIEWED, L.OP_OPEN]))
        principal = draw(st.one_of(st.integers(0, 10**9), edge_money, st.integers(-3, 0)))
        bonus = draw(st.one_of(st.just(0), st.integers(0, 10**9), edge_money,
                               st.sampled_from([INT64_MAX + 1, 2**64 - 1])))
        points = draw(st.one_of(st.just(0), st.integers(0, 10**6), edge_money, st.just(-1)))
        if kind != L.OP_IMPORT_CARD:
            bonus, points = 0, 0
            if kind == L.OP_TIER_REVIEWED:
                principal = 0
        ops.append(op_bytes(kind, principal, tier=draw(st.integers(0, 4)),
                            card=bytes([slots[-1]]) * 16, tag=i.to_bytes(8, "little"),
                            home_store=draw(st.sampled_from([0, 5, 2**32 - 1])),
                            birth_month=draw(st.sampled_from([0, 1, 12, 13])),
                            pin_flags=draw(st.sampled_from([0, 0, 0, 0, L.NEW_PIN,
                                                            L.PIN_OPTIONAL_UNSET])),
                            pin=PIN_A, new_pin=PIN_A, ref_id=bonus, redeem=points,
                            op_flags=draw(st.sampled_from([0, 0, 0, L.ISSUE_ONLY,
                                                           L.ALLOW_PARTIAL])),
                            operator=draw(st.sampled_from([0, 7])),
                            client_time_us=draw(st.integers(0, T0))))
    return b"".join(ops), slots, recs, exts, b"", [L.SLOT_NONE] * len(ops), b""


@settings(max_examples=examples(1000), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=import_batches(),
       ts_us=st.sampled_from([T0 - 10, T0, T0 + 10, MONTH_EDGE, 0]),
       first_seq=st.integers(1, 2**40))
@example(program=rules.DEFAULT_PROGRAM.packed(1),
         batch=(op_bytes(L.OP_IMPORT_CARD, INT64_MAX - 5, ref_id=5, redeem=INT64_MAX), [0],
                bytes(L.CARD_SIZE), bytes(L.CARD_EXT_SIZE), b"", [L.SLOT_NONE], b""),
         ts_us=T0, first_seq=1)
def test_kernel_equals_reference_on_imports(program, batch, ts_us, first_seq):
    agree(program, batch, ts_us, first_seq)
