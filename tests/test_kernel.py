"""The Cython kernel against the pure-Python reference, and the rules at their edges."""
from __future__ import annotations

from array import array

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cardcore import cards
from cardcore import layout as L
from cardcore import reference, rules
from cardcore.ext import cardno, kernel
from cardcore.v1 import common_pb2 as cpb
from conftest import examples

INT64_MAX = L.INT64_MAX
IMPLS = [kernel.apply_batch, reference.apply_batch]


def op_bytes(op, amount=0, tier=0, card=b"c" * 16, tag=b"t" * 8, store=1, terminal=2, staff=3,
             home_store=0, pin_flags=0, pin=bytes(32), new_pin=bytes(32), operator=0, caller_kind=0,
             caller_id=0, client_time_us=0, link_seq=0, ref_id=0, basket_tag=0, line_count=0,
             redeem=0, birth_month=0, op_flags=0):
    return L.OP.pack(op, tier, pin_flags, caller_kind, home_store, amount, store, terminal, staff,
                     operator, tag, card, client_time_us, pin, new_pin, caller_id, birth_month,
                     link_seq, ref_id,
                     basket_tag, line_count, bytes([op_flags]) + bytes(5), redeem,
                     bytes(16))


def card_bytes(principal=0, bonus=0, points=0, tier=0, status=L.STATUS_ACTIVE, lifetime=0,
               last_seq=1, held=0, pin=None, tries=0, locked=False, birth_month=0, opened_us=0,
               expires_us=0):
    flags = (L.CARD_PIN_SET if pin else 0) | (L.CARD_PIN_LOCKED if locked else 0)
    return L.CARD.pack(L.CARD_VERSION, status, tier, tries, flags, principal, bonus, points, held,
                       lifetime, last_seq, opened_us, 0, birth_month, pin or bytes(32),
                       L.CARD_EXPIRES.pack(expires_us) + bytes(16))


def run_full(impl, program, ops, slots, records, ts_us=1_700_000_000_000_000, first_seq=10,
             lines=b"", extras=None, coupon_slots=None, coupons=b""):
    """Every output of one apply_batch: (next seq, records, journal, dirty, lines, extras,
    coupons, coupon dirty)."""
    records = bytearray(records)
    extras = bytearray(extras if extras is not None else len(records))
    lines, coupons = bytearray(lines), bytearray(coupons)
    n = len(ops) // L.OP_SIZE
    coupon_slots = array("I", coupon_slots if coupon_slots is not None else [L.SLOT_NONE] * n)
    journal = bytearray(n * L.JOURNAL_SIZE)
    dirty = bytearray(len(records) // L.CARD_SIZE)
    coupon_dirty = bytearray(len(coupons) // L.COUPON_SIZE)
    nxt = impl(program, ops, lines, array("I", slots), records, extras, coupon_slots, coupons,
               journal, dirty, coupon_dirty, ts_us, first_seq)
    return (nxt, bytes(records), bytes(journal), bytes(dirty), bytes(lines), bytes(extras),
            bytes(coupons), bytes(coupon_dirty))


def run(impl, program, ops, slots, records, ts_us=1_700_000_000_000_000, first_seq=10):
    return run_full(impl, program, ops, slots, records, ts_us, first_seq)[:4]


def one(program, op, record, impl=kernel.apply_batch):
    """Apply one operation to one record; return (reason, journal fields, record fields)."""
    _, rec, journal, _ = run(impl, program, op, [0], record)
    entry = L.JOURNAL.unpack(journal)
    return entry[4], entry, L.CARD.unpack(rec)


def test_reason_and_type_values_agree_with_the_proto():
    assert (L.R_OK, L.R_INVALID_AMOUNT, L.R_INVALID_TIER, L.R_CARD_NOT_FOUND, L.R_CARD_ALREADY_EXISTS,
            L.R_CARD_NOT_ACTIVE, L.R_INSUFFICIENT_FUNDS, L.R_AMOUNT_OVERFLOW,
            L.R_DUPLICATE_REQUEST_MISMATCH, L.R_STORAGE_UNAVAILABLE) == (
        cpb.REASON_OK, cpb.REASON_INVALID_AMOUNT, cpb.REASON_INVALID_TIER, cpb.REASON_CARD_NOT_FOUND,
        cpb.REASON_CARD_ALREADY_EXISTS, cpb.REASON_CARD_NOT_ACTIVE, cpb.REASON_INSUFFICIENT_FUNDS,
        cpb.REASON_AMOUNT_OVERFLOW, cpb.REASON_DUPLICATE_REQUEST_MISMATCH, cpb.REASON_STORAGE_UNAVAILABLE)
    assert L.R_INTERNAL == cpb.REASON_INTERNAL
    assert (L.R_INVALID_ARGUMENT, L.R_PIN_REQUIRED, L.R_PIN_WRONG, L.R_PIN_LOCKED, L.R_PIN_NOT_SET,
            L.R_PERMISSION_DENIED, L.R_OPERATOR_REQUIRED, L.R_KSN_REPLAYED, L.R_TERMINAL_UNKNOWN, L.R_TERMINAL_REVOKED,
            L.R_TERMINAL_EXISTS, L.R_TERMINAL_NOT_FOUND, L.R_OPERATOR_EXISTS, L.R_OPERATOR_NOT_FOUND) == (
        cpb.REASON_INVALID_ARGUMENT, cpb.REASON_PIN_REQUIRED, cpb.REASON_PIN_WRONG, cpb.REASON_PIN_LOCKED,
        cpb.REASON_PIN_NOT_SET, cpb.REASON_PERMISSION_DENIED, cpb.REASON_OPERATOR_REQUIRED,
        cpb.REASON_KSN_REPLAYED,
        cpb.REASON_TERMINAL_UNKNOWN, cpb.REASON_TERMINAL_REVOKED, cpb.REASON_TERMINAL_EXISTS,
        cpb.REASON_TERMINAL_NOT_FOUND, cpb.REASON_OPERATOR_EXISTS, cpb.REASON_OPERATOR_NOT_FOUND)
    assert (L.OP_OPEN, L.OP_TOP_UP, L.OP_PURCHASE, L.OP_SET_PIN, L.OP_RESET_PIN, L.OP_PIN_FAILED,
            L.OP_TERMINAL_ENROLLED, L.OP_TERMINAL_REVOKED, L.OP_OPERATOR_ADDED, L.OP_OPERATOR_REMOVED,
            L.OP_DATA_KEY_ROTATED) == (
        cpb.OPERATION_TYPE_OPEN_CARD, cpb.OPERATION_TYPE_TOP_UP, cpb.OPERATION_TYPE_PURCHASE,
        cpb.OPERATION_TYPE_SET_PIN, cpb.OPERATION_TYPE_RESET_PIN, cpb.OPERATION_TYPE_PIN_FAILED,
        cpb.OPERATION_TYPE_TERMINAL_ENROLLED, cpb.OPERATION_TYPE_TERMINAL_REVOKED,
        cpb.OPERATION_TYPE_OPERATOR_ADDED, cpb.OPERATION_TYPE_OPERATOR_REMOVED,
        cpb.OPERATION_TYPE_DATA_KEY_ROTATED)
    assert (L.STATUS_ACTIVE, L.STATUS_FROZEN, L.STATUS_LOST, L.STATUS_CLOSED,
            L.STATUS_REPLACED) == (
        cpb.CARD_STATUS_ACTIVE, cpb.CARD_STATUS_FROZEN, cpb.CARD_STATUS_LOST, cpb.CARD_STATUS_CLOSED,
        cpb.CARD_STATUS_REPLACED)
    assert (L.OP_CARD_REPLACED, L.OP_REPLACEMENT_OPENED) == (
        cpb.OPERATION_TYPE_CARD_REPLACED, cpb.OPERATION_TYPE_REPLACEMENT_OPENED)


# Rounding rule 3 at its edges: (gross, rate_bp) -> paid.
ROUNDING = [
    (1, 9500, 1),        # 0.95 -> 1
    (10, 9500, 10),      # 9.5 -> 10: half goes up
    (30, 9500, 29),      # 28.5 -> 29
    (29, 9500, 28),      # 27.55 -> 28
    (1, 4999, 0),        # 0.4999 -> 0
    (1, 5000, 1),        # 0.5 -> 1
    (3, 8500, 3),        # 2.55 -> 3
    (7, 8500, 6),        # 5.95 -> 6
    (10_000, 1, 1),      # 1 bp of 100.00 = 0.01
    (4_999, 1, 0),       # 0.4999 fen -> 0
    (5_000, 1, 1),       # 0.5 fen -> 1
    (INT64_MAX, 10000, INT64_MAX),
    (INT64_MAX, 9999, (INT64_MAX * 9999 + 5000) // 10000),  # needs 128-bit intermediates
]


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
@pytest.mark.parametrize("gross,rate_bp,paid", ROUNDING)
def test_paid_is_rounded_half_up_to_the_fen(impl, gross, rate_bp, paid):
    program = rules.Program(tiers=(rules.Tier("t", rate_bp),), points_unit_minor=100).packed(1)
    reason, entry, rec = one(program, op_bytes(L.OP_PURCHASE, gross), card_bytes(principal=INT64_MAX),
                             impl)
    assert reason == L.R_OK
    assert entry[10] == gross - paid          # discount_minor
    assert -entry[11] == paid                 # principal_delta_minor
    assert rec[5] == INT64_MAX - paid
    assert rules.paid_minor(gross, rate_bp) == paid


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_points_are_floored_per_unit(impl):
    program = rules.Program(tiers=(rules.Tier("t", 10000),), points_unit_minor=100,
                            points_per_unit=3).packed(1)
    for gross, points in ((99, 0), (100, 3), (199, 3), (200, 6)):
        _, entry, _ = one(program, op_bytes(L.OP_PURCHASE, gross), card_bytes(principal=1_000), impl)
        assert entry[13] == points


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_purchase_spends_principal_first_then_bonus(impl):
    program = rules.DEFAULT_PROGRAM.packed(1)
    reason, entry, rec = one(program, op_bytes(L.OP_PURCHASE, 1_000), card_bytes(principal=700, bonus=500),
                             impl)
    assert reason == L.R_OK and (entry[11], entry[12]) == (-700, -300) and (rec[5], rec[6]) == (0, 200)


OVERFLOW = [
    # (op, amount, record, reason)
    (L.OP_TOP_UP, 1, dict(principal=INT64_MAX), L.R_AMOUNT_OVERFLOW),
    (L.OP_TOP_UP, 1, dict(principal=INT64_MAX - 1), L.R_OK),
    (L.OP_TOP_UP, 1, dict(principal=INT64_MAX // 2, bonus=INT64_MAX - INT64_MAX // 2), L.R_AMOUNT_OVERFLOW),
    (L.OP_TOP_UP, INT64_MAX, dict(), L.R_OK),
    (L.OP_PURCHASE, 100, dict(principal=100, points=INT64_MAX), L.R_AMOUNT_OVERFLOW),
    (L.OP_PURCHASE, 100, dict(principal=100, points=INT64_MAX - 1), L.R_OK),
    (L.OP_PURCHASE, 99, dict(principal=100, points=INT64_MAX), L.R_OK),  # earns 0 points
    (L.OP_PURCHASE, 1, dict(principal=1, lifetime=INT64_MAX), L.R_AMOUNT_OVERFLOW),
    (L.OP_PURCHASE, 101, dict(principal=100), L.R_INSUFFICIENT_FUNDS),
    (L.OP_PURCHASE, 101, dict(principal=100, bonus=1), L.R_OK),
    (L.OP_PURCHASE, 100, dict(principal=100, held=1), L.R_INSUFFICIENT_FUNDS),
    (L.OP_PURCHASE, 0, dict(principal=100), L.R_INVALID_AMOUNT),
    (L.OP_PURCHASE, -1, dict(principal=100), L.R_INVALID_AMOUNT),
    (L.OP_TOP_UP, -(1 << 63), dict(), L.R_INVALID_AMOUNT),
    (L.OP_PURCHASE, 1, dict(status=L.STATUS_FROZEN, principal=100), L.R_CARD_NOT_ACTIVE),
    (L.OP_PURCHASE, 1, dict(status=L.STATUS_REPLACED, principal=100), L.R_CARD_REPLACED),
    (L.OP_TOP_UP, 1, dict(status=L.STATUS_REPLACED), L.R_CARD_REPLACED),
    (L.OP_RESET_PIN, 0, dict(status=L.STATUS_REPLACED), L.R_CARD_REPLACED),
    (L.OP_PURCHASE, 1, dict(tier=5, principal=100), L.R_INVALID_TIER),
]


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
@pytest.mark.parametrize("op,amount,record,reason", OVERFLOW)
def test_overflow_and_limits_are_declined_not_wrapped(impl, op, amount, record, reason):
    program = rules.DEFAULT_PROGRAM.packed(1)
    before = card_bytes(**record)
    nxt, rec, journal, dirty = run(impl, program, op_bytes(op, amount), [0], before)
    assert L.JOURNAL.unpack(journal)[4] == reason
    if reason == L.R_OK:
        # a top-up also counts itself in the card's program state (bit 1)
        assert nxt == 11 and dirty == (b"\x03" if op == L.OP_TOP_UP else b"\x01")
    else:
        assert nxt == 10 and dirty == b"\x00" and rec == before


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_open_creates_and_refuses_an_existing_card(impl):
    program = rules.DEFAULT_PROGRAM.packed(1)
    ops = op_bytes(L.OP_OPEN, tier=2, home_store=9) + op_bytes(L.OP_OPEN) + op_bytes(L.OP_TOP_UP, 5)
    nxt, rec, journal, dirty = run(impl, program, ops, [0, 0, 0], bytes(L.CARD_SIZE))
    reasons = [L.JOURNAL.unpack_from(journal, i * L.JOURNAL_SIZE)[4] for i in range(3)]
    assert reasons == [L.R_OK, L.R_CARD_ALREADY_EXISTS, L.R_OK] and nxt == 12
    card = L.CARD.unpack(rec)
    assert (card[0], card[1], card[2], card[5], card[10], card[12]) == (1, L.STATUS_ACTIVE, 2, 5, 11, 9)


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_a_broken_record_stops_the_batch(impl):
    bad = bytearray(card_bytes(principal=5))
    bad[8:16] = (-5).to_bytes(8, "little", signed=True)
    with pytest.raises(ValueError):
        run(impl, rules.DEFAULT_PROGRAM.packed(1), op_bytes(L.OP_TOP_UP, 1), [0], bytes(bad))


# ---- PINs: the rule in cardcore.layout, at its edges ---------------------------------------

PIN_A, PIN_B = b"A" * 32, b"B" * 32
PRESENTED_A = dict(pin_flags=L.PIN_PRESENTED | L.PIN_REQUIRED, pin=PIN_A)
PRESENTED_B = dict(pin_flags=L.PIN_PRESENTED | L.PIN_REQUIRED, pin=PIN_B)

PIN_CASES = [
    # (op, op kwargs, record kwargs, reason, journal op, pin_tries after, locked after)
    (L.OP_PURCHASE, PRESENTED_A, dict(pin=PIN_A, tries=2), L.R_OK, L.OP_PURCHASE, 0, False),
    (L.OP_PURCHASE, PRESENTED_B, dict(pin=PIN_A), L.R_PIN_WRONG, L.OP_PIN_FAILED, 1, False),
    (L.OP_PURCHASE, PRESENTED_B, dict(pin=PIN_A, tries=1), L.R_PIN_WRONG, L.OP_PIN_FAILED, 2, False),
    (L.OP_PURCHASE, PRESENTED_B, dict(pin=PIN_A, tries=2), L.R_PIN_WRONG, L.OP_PIN_FAILED, 3, True),
    (L.OP_PURCHASE, PRESENTED_A, dict(pin=PIN_A, tries=3, locked=True), L.R_PIN_LOCKED, None, 3, True),
    (L.OP_PURCHASE, dict(pin_flags=L.PIN_REQUIRED), dict(pin=PIN_A), L.R_PIN_REQUIRED, None, 0, False),
    (L.OP_PURCHASE, dict(pin_flags=L.PIN_REQUIRED), dict(), L.R_PIN_NOT_SET, None, 0, False),
    (L.OP_PURCHASE, dict(pin_flags=L.PIN_REQUIRED | L.PIN_OPTIONAL_UNSET), dict(), L.R_OK,
     L.OP_PURCHASE, 0, False),
    (L.OP_PURCHASE, PRESENTED_A, dict(), L.R_PIN_NOT_SET, None, 0, False),
    (L.OP_TOP_UP, dict(), dict(pin=PIN_A, tries=3, locked=True), L.R_OK, L.OP_TOP_UP, 3, True),
    (L.OP_PURCHASE, PRESENTED_B, dict(pin=PIN_A, status=L.STATUS_FROZEN), L.R_CARD_NOT_ACTIVE, None,
     0, False),
    (L.OP_PURCHASE, dict(PRESENTED_A, amount=10**9), dict(pin=PIN_A, tries=1), L.R_INSUFFICIENT_FUNDS,
     None, 1, False),  # a right PIN on a declined purchase changes nothing
    (L.OP_SET_PIN, dict(pin_flags=L.NEW_PIN, new_pin=PIN_B, operator=9), dict(), L.R_OK, L.OP_SET_PIN,
     0, False),
    (L.OP_SET_PIN, dict(pin_flags=L.NEW_PIN, new_pin=PIN_B), dict(), L.R_OPERATOR_REQUIRED, None, 0,
     False),
    (L.OP_SET_PIN, dict(pin_flags=L.NEW_PIN, new_pin=PIN_B), dict(pin=PIN_A), L.R_PIN_REQUIRED, None,
     0, False),
    (L.OP_SET_PIN, dict(pin_flags=L.NEW_PIN | L.PIN_PRESENTED, pin=PIN_B, new_pin=PIN_B),
     dict(pin=PIN_A, tries=2), L.R_PIN_WRONG, L.OP_PIN_FAILED, 3, True),
    (L.OP_SET_PIN, dict(pin_flags=L.NEW_PIN | L.PIN_PRESENTED, pin=PIN_A, new_pin=PIN_B),
     dict(pin=PIN_A, tries=2), L.R_OK, L.OP_SET_PIN, 0, False),
    (L.OP_SET_PIN, dict(pin_flags=L.PIN_PRESENTED, pin=PIN_A), dict(pin=PIN_A), L.R_INVALID_ARGUMENT,
     None, 0, False),
    (L.OP_RESET_PIN, dict(pin_flags=L.NEW_PIN, new_pin=PIN_B), dict(pin=PIN_A, tries=3, locked=True),
     L.R_OK, L.OP_RESET_PIN, 0, False),
    (L.OP_RESET_PIN, dict(), dict(pin=PIN_A, tries=3, locked=True, status=L.STATUS_FROZEN), L.R_OK,
     L.OP_RESET_PIN, 0, False),
]


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
@pytest.mark.parametrize("op,op_kw,rec_kw,reason,journal_op,tries,locked", PIN_CASES)
def test_pin_rule(impl, op, op_kw, rec_kw, reason, journal_op, tries, locked):
    program = rules.DEFAULT_PROGRAM.packed(1)  # pin_tries_max = 3
    op_kw = dict(op_kw)
    amount = op_kw.pop("amount", 100)
    before = card_bytes(principal=1_000, **rec_kw)
    nxt, rec, journal, dirty = run(impl, program, op_bytes(op, amount, **op_kw), [0], before)
    entry = L.JOURNAL.unpack(journal)
    card = L.CARD.unpack(rec)
    assert entry[4] == reason
    assert (card[3], bool(card[4] & L.CARD_PIN_LOCKED)) == (tries, locked)
    if journal_op is None:
        assert (nxt, entry[7], dirty, rec) == (10, 0, b"\x00", before)
    else:
        card_dirty = b"\x03" if journal_op == L.OP_TOP_UP else b"\x01"  # + program state
        assert (nxt, entry[7], entry[1], dirty, card[10]) == (11, 10, journal_op, card_dirty, 10)
        assert (entry[5], entry[6]) == (card[3], card[4])
    if journal_op in (L.OP_SET_PIN, L.OP_RESET_PIN):
        new = op_kw.get("new_pin")
        assert (card[14], bool(card[4] & L.CARD_PIN_SET)) == (new or bytes(32), new is not None)
    if journal_op == L.OP_PIN_FAILED:
        assert entry[9:14] == (0, 0, 0, 0, 0) and card[5] == 1_000  # no money moves


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_pin_tries_limit_comes_from_the_program(impl):
    program = rules.Program(tiers=rules.DEFAULT_PROGRAM.tiers, pin_tries_max=1).packed(1)
    _, rec, journal, _ = run(impl, program, op_bytes(L.OP_PURCHASE, 1, **PRESENTED_B), [0],
                             card_bytes(principal=5, pin=PIN_A))
    assert L.JOURNAL.unpack(journal)[4] == L.R_PIN_WRONG
    assert L.CARD.unpack(rec)[4] == L.CARD_PIN_SET | L.CARD_PIN_LOCKED


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_open_with_a_first_pin(impl):
    _, rec, _, _ = run(impl, rules.DEFAULT_PROGRAM.packed(1),
                       op_bytes(L.OP_OPEN, pin_flags=L.NEW_PIN, new_pin=PIN_A), [0], bytes(L.CARD_SIZE))
    card = L.CARD.unpack(rec)
    assert (card[4], card[14]) == (L.CARD_PIN_SET, PIN_A)


# ---- differential: kernel == reference on random records and operations ----------------

edge_int64 = st.sampled_from([0, 1, 99, 100, 101, 9_999, 10_000, INT64_MAX // 2, INT64_MAX - 1,
                              INT64_MAX])
money = st.one_of(st.integers(0, 10**12), edge_int64)
# Small amounts and common rates make exact halves (rounding ties) frequent.
amounts = st.one_of(st.integers(-10, 2_000), st.integers(-10, 10**10), edge_int64,
                    st.just(-(1 << 63)))
rates = st.one_of(st.sampled_from([10000, 9500, 9000, 8500, 8000, 5000, 9999, 1]),
                  st.integers(1, 10000))


# Rule 14's expiry edges: a batch's time is drawn near these (see test_kernel_equals_reference).
EXPIRY_US = 1_800_000_000_000_000
expiries = st.one_of(st.just(0), st.sampled_from([EXPIRY_US - 1, EXPIRY_US, EXPIRY_US + 1]),
                     st.integers(1, INT64_MAX))


@st.composite
def records(draw):
    if draw(st.integers(0, 9)) == 0:
        return bytes(L.CARD_SIZE)  # no such card
    principal = draw(money)
    bonus = draw(st.integers(0, INT64_MAX - principal))
    held = draw(st.one_of(st.just(0), st.integers(0, principal + bonus)))
    pin = draw(st.sampled_from([None, PIN_A, PIN_B]))
    return card_bytes(principal=principal, bonus=bonus, points=draw(money), tier=draw(st.integers(0, 4)),
                      status=draw(st.sampled_from([1, 1, 1, 2, 3, 4, 5, 6, 7])), lifetime=draw(money),
                      last_seq=draw(st.integers(1, 10**9)), held=held, pin=pin,
                      tries=draw(st.integers(0, 4)) if pin else 0,
                      locked=bool(pin) and draw(st.booleans()), expires_us=draw(expiries))


@st.composite
def programs(draw):
    tiers = draw(st.lists(rates, min_size=1, max_size=4))
    return rules.Program(tiers=tuple(rules.Tier(f"t{i}", r) for i, r in enumerate(tiers)),
                         points_unit_minor=draw(st.one_of(st.integers(1, 10_000), edge_int64.filter(bool))),
                         points_per_unit=draw(st.one_of(st.integers(0, 100), edge_int64)),
                         pin_tries_max=draw(st.integers(1, 15)),
                         activation_points=draw(st.one_of(st.just(0), edge_int64)),
                         utc_offset_minutes=draw(st.integers(-720, 840)),
                         card_valid_months=draw(st.one_of(st.just(0), st.integers(
                             0, L.CARD_VALID_MONTHS_MAX)))).packed(draw(st.integers(1, 2**32 - 1)))


@st.composite
def batches(draw):
    nslots = draw(st.integers(1, 6))
    recs = b"".join(draw(st.lists(records(), min_size=nslots, max_size=nslots)))
    n = draw(st.integers(1, 40))
    ops, slots = [], []
    for i in range(n):
        slots.append(draw(st.integers(0, nslots - 1)))
        kind = draw(st.sampled_from([L.OP_OPEN, L.OP_TOP_UP, L.OP_PURCHASE, L.OP_PURCHASE,
                                     L.OP_SET_PIN, L.OP_RESET_PIN, L.OP_BALANCE_INQUIRY,
                                     L.OP_CARD_STATUS]))
        # rule 14: any status wanted (amount 0 and ref_id 0 for a change to apply); an opening
        # issued or active (the flag on another operation: INVALID_ARGUMENT)
        status_change = kind == L.OP_CARD_STATUS and draw(st.integers(0, 3)) > 0
        ops.append(op_bytes(kind,
                            0 if status_change else draw(amounts),
                            tier=draw(st.integers(0, 8)) if kind == L.OP_CARD_STATUS
                            else draw(st.integers(0, 5)), card=bytes([slots[-1]]) * 16,
                            tag=i.to_bytes(8, "little"), store=draw(st.integers(0, 2**32 - 1)),
                            home_store=draw(st.integers(0, 2**32 - 1)),
                            pin_flags=draw(st.integers(0, 15)), pin=draw(st.sampled_from([PIN_A, PIN_B])),
                            new_pin=draw(st.sampled_from([PIN_A, PIN_B])),
                            operator=draw(st.integers(0, 2**32 - 1)),
                            caller_kind=draw(st.integers(0, 5)), caller_id=draw(st.integers(0, 2**32 - 1)),
                            client_time_us=draw(st.integers(-(1 << 63), INT64_MAX)),
                            link_seq=draw(st.integers(0, 2**64 - 1)),
                            # a purchase's ref_id names a coupon (test_kernel_programs)
                            ref_id=0 if kind == L.OP_PURCHASE or status_change
                            else draw(st.integers(0, 2**64 - 1)),
                            basket_tag=draw(st.integers(0, 2**64 - 1)),
                            op_flags=draw(st.sampled_from([0, 0, L.ISSUE_ONLY]))))
    return b"".join(ops), slots, recs


@settings(max_examples=examples(1500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(program=programs(), batch=batches(),
       ts_us=st.one_of(st.integers(0, INT64_MAX), st.integers(EXPIRY_US - 2, EXPIRY_US + 2)),
       first_seq=st.integers(1, 2**62))
@example(program=rules.DEFAULT_PROGRAM.packed(1),
         batch=(op_bytes(L.OP_PURCHASE, INT64_MAX), [0], card_bytes(principal=INT64_MAX)),
         ts_us=0, first_seq=1)
def test_kernel_equals_reference(program, batch, ts_us, first_seq):
    ops, slots, recs = batch
    assert run(kernel.apply_batch, program, ops, slots, recs, ts_us, first_seq) == \
        run(reference.apply_batch, program, ops, slots, recs, ts_us, first_seq)


def test_kernel_checks_buffer_sizes():
    program = rules.DEFAULT_PROGRAM.packed(1)
    with pytest.raises(ValueError):
        run_full(kernel.apply_batch, program, op_bytes(L.OP_OPEN), [1], bytes(128))  # slot 1 of 1
    with pytest.raises(ValueError):
        run_full(kernel.apply_batch, program[:-1], op_bytes(L.OP_OPEN), [0], bytes(128))
    with pytest.raises(ValueError):  # a PIN-failed entry is the kernel's output, never its input
        run_full(kernel.apply_batch, program, op_bytes(L.OP_PIN_FAILED), [0], bytes(128))
    with pytest.raises(ValueError):  # the lines do not match the operations' line counts
        run_full(kernel.apply_batch, program, op_bytes(L.OP_PURCHASE, 5, line_count=1), [0],
                 bytes(128))
    with pytest.raises(ValueError):  # a program state with an unknown version
        run_full(kernel.apply_batch, program, op_bytes(L.OP_TOP_UP, 5), [0], card_bytes(),
                 extras=b"\x07" + bytes(127))
    with pytest.raises(ValueError):  # a purchase naming a coupon without the coupon's record
        run_full(kernel.apply_batch, program, op_bytes(L.OP_PURCHASE, 5, ref_id=3), [0],
                 card_bytes())


@settings(max_examples=examples(3000), deadline=None)
@given(number=st.one_of(st.text(alphabet="0123456789", min_size=0, max_size=22),
                        st.text(min_size=0, max_size=22),
                        st.builds(lambda r: cards.random_number(r, length=r.randint(8, 19)), st.randoms())),
       require_luhn=st.booleans())
def test_fast_card_number_check_equals_reference(number, require_luhn):
    assert cardno.number_ok(number, require_luhn) == cards.number_ok(number, require_luhn)


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_a_balance_inquiry_checks_the_pin_and_changes_nothing_when_it_is_right(impl):
    program = rules.DEFAULT_PROGRAM.packed(1)
    record = card_bytes(principal=500, pin=PIN_A, tries=1)
    right = op_bytes(L.OP_BALANCE_INQUIRY, pin_flags=L.PIN_PRESENTED, pin=PIN_A)
    nxt, rec, journal, dirty = run(impl, program, right, [0], record)
    entry = L.JOURNAL.unpack(journal)
    assert (entry[4], entry[7], nxt, dirty, rec) == (L.R_OK, 0, 10, b"\x00", record)  # tries stay 1
    wrong = op_bytes(L.OP_BALANCE_INQUIRY, pin_flags=L.PIN_PRESENTED, pin=PIN_B)
    nxt, rec, journal, dirty = run(impl, program, wrong, [0], record)
    entry = L.JOURNAL.unpack(journal)
    assert (entry[1], entry[4], entry[7], nxt, dirty) == (L.OP_PIN_FAILED, L.R_PIN_WRONG, 10, 11, b"\x01")
    assert L.CARD.unpack(rec)[3] == 2 and entry[9:14] == (0, 0, 0, 0, 0)
    none = op_bytes(L.OP_BALANCE_INQUIRY)  # no PIN presented: an inquiry always needs it
    assert L.JOURNAL.unpack(run(impl, program, none, [0], record)[2])[4] == L.R_PIN_REQUIRED


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_the_journal_entry_carries_the_namespace_links_client_time_and_program_version(impl):
    program = rules.DEFAULT_PROGRAM.packed(7)
    o = op_bytes(L.OP_TOP_UP, 100, caller_kind=L.CALLER_TERMINAL, caller_id=42, client_time_us=123,
                 link_seq=5, ref_id=6, basket_tag=7)
    entry = L.JOURNAL.unpack(run(impl, program, o, [0], card_bytes())[2])
    assert entry[0] == 2 and entry[23:25] == (7, L.CALLER_TERMINAL) and entry[26] == 42
    assert entry[28:32] == (5, 6, 7, 123) and entry[-1] == bytes(32)  # the ledger chains it


@pytest.mark.parametrize("impl", IMPLS, ids=["kernel", "reference"])
def test_an_import_opens_the_card_with_its_balances_once(impl):
    """Rule 18: principal (amount), bonus (ref_id) and points (redeem) in one entry, the card
    active at the tier given, no PIN, no activation points; the same number again is refused,
    and so are a PIN, a tier past the program's and money past int64."""
    program = rules.Program(tiers=rules.DEFAULT_PROGRAM.tiers, activation_points=100).packed(1)
    ops = (op_bytes(L.OP_IMPORT_CARD, 12_345, tier=2, home_store=9, ref_id=500, redeem=77,
                    birth_month=3)
           + op_bytes(L.OP_IMPORT_CARD, 1, ref_id=0, redeem=0)
           + op_bytes(L.OP_TOP_UP, 5))
    nxt, rec, journal, dirty = run(impl, program, ops, [0, 0, 0], bytes(L.CARD_SIZE))
    entries = [L.JOURNAL.unpack_from(journal, i * L.JOURNAL_SIZE) for i in range(3)]
    assert [e[4] for e in entries] == [L.R_OK, L.R_CARD_ALREADY_EXISTS, L.R_OK] and nxt == 12
    e = entries[0]
    assert (e[1], e[2], e[3], e[9], e[10], e[11], e[12], e[13], e[14], e[15], e[16], e[29]) == \
        (L.OP_IMPORT_CARD, 2, L.STATUS_ACTIVE, 12_345, 0, 12_345, 500, 77, 12_345, 500, 77, 0)
    card = L.CARD.unpack(rec)
    assert card[1:8] == (L.STATUS_ACTIVE, 2, 0, 0, 12_350, 500, 77)
    assert (card[9], card[10], card[12], card[13], card[14]) == (0, 11, 9, 3, bytes(32))
    for op, reason in ((op_bytes(L.OP_IMPORT_CARD, 1, pin_flags=L.NEW_PIN, new_pin=PIN_A),
                        L.R_INVALID_ARGUMENT),
                       (op_bytes(L.OP_IMPORT_CARD, 1, tier=3), L.R_INVALID_TIER),
                       (op_bytes(L.OP_IMPORT_CARD, -1), L.R_INVALID_AMOUNT),
                       (op_bytes(L.OP_IMPORT_CARD, INT64_MAX, ref_id=1), L.R_INVALID_AMOUNT),
                       (op_bytes(L.OP_IMPORT_CARD, 1, redeem=-1), L.R_INVALID_ARGUMENT),
                       (op_bytes(L.OP_IMPORT_CARD, 1, op_flags=L.ISSUE_ONLY),
                        L.R_INVALID_ARGUMENT)):
        got, entry, _ = one(program, op, bytes(L.CARD_SIZE), impl)
        assert (got, entry[7]) == (reason, 0)
