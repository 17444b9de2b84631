"""The member metrics' C loop (``Members.add_group``, ext/members.pyx) against the reference
(``Members.add_all``) on inputs test_members' hypothesis test does not reach: days at the ends of
the calendar, broken records, a split tender's later payment. Where the reference keeps a group,
so does the C loop (declining to the reference where it must); where it refuses, alike. (Found
by a review: each failed before.)"""
from __future__ import annotations

import pytest

from cardcore import layout as L
from cardcore import members as M
from cardcore import stores
from cardcore.ledger import Ledger

DAY_US = 86_400_000_000
HOUR_US = 3_600_000_000


def packed(k, op, card, ts_us, store=1, amount=0, discount=0, basket=0, version=0):
    card_id = bytes([card // 4]) * 15 + bytes([card])
    return L.JOURNAL.pack(
        L.JOURNAL_VERSION, op, 0, 1, 0, 0, 0, k + 1, card_id, amount, discount, -amount, 0, 0,
        0, 0, 0, ts_us, store, 0, 0, 0, bytes(8), 1, 0, bytes(3), 0, 0, 0, 0, basket, version,
        bytes(48), bytes(32))


@pytest.fixture
def ledger(tmp_path):
    ledger = Ledger(str(tmp_path / "ledger"), sync=False)
    with ledger.env.begin(write=True) as txn:
        # store 5: its own day 35 h behind UTC; store 6: 14 h ahead, cutoff 0
        txn.put(L.TERMINAL_KEY.pack(5), stores.store_record(5, "s5", 0, (-720, 23), 0, 0),
                db=ledger.chain_stores)
        txn.put(L.TERMINAL_KEY.pack(6), stores.store_record(6, "s6", 0, (840, 0), 0, 0),
                db=ledger.chain_stores)
    yield ledger
    ledger.close()


def outcome(ledger, history, last, native, tamper=None):
    """The last group's items (or the exception's type and text) through the reference
    (native False) or add_group (True), after ``history`` through the reference."""
    with ledger.env.begin(write=True) as txn:
        try:
            for g, entries in enumerate((*history, last)):
                m = M.Members(txn, ledger, {})
                if g == len(history) and native:
                    m.add_group(entries)
                else:
                    m.add_all(entries)
                made = m.items()
                m.write()
                if tamper is not None and g == len(history) - 1:
                    tamper(txn)
            return made
        except Exception as e:
            return type(e).__name__, str(e)
        finally:
            txn.abort()


def test_a_purchase_on_a_day_before_1970_is_kept_alike(ledger):
    """A member with three purchases on business day 0 (store 1, UTC+8 cutoff 4) buys at store
    5 (its own day, UTC-12 cutoff 23) at the same time: business day -1. The reference keeps it
    (not among the last three, counted in the month under way), and so does the C path (by
    declining to it: a day it cannot hold)."""
    ts = 1 * HOUR_US
    history = [[packed(0, L.OP_OPEN, 0, ts)]] + [[packed(0, L.OP_PURCHASE, 0, ts, 1, 100)]] * 3
    last = [packed(0, L.OP_PURCHASE, 0, ts, 5, 100)]
    reference = outcome(ledger, history, last, False)
    assert isinstance(reference, dict)  # the reference takes it
    assert outcome(ledger, history, last, True) == reference


def test_another_entrys_store_past_year_9999_changes_nothing(ledger):
    """A group: a purchase at store 1 (day 9999-12-31) and a top-up (no member metrics) at
    store 6 whose own clock is already in year 10000. Neither looks at the top-up's day."""
    import datetime as dt
    last_day = (dt.date(9999, 12, 31) - dt.date(1970, 1, 1)).days
    ts = last_day * DAY_US + 12 * HOUR_US  # store 1: day last_day; store 6: +14 h: next day
    history = [[packed(0, L.OP_OPEN, 0, ts - DAY_US)]]
    last = [packed(0, L.OP_PURCHASE, 0, ts, 1, 100), packed(1, L.OP_TOP_UP, 0, ts, 6, 50)]
    reference = outcome(ledger, history, last, False)
    assert isinstance(reference, dict)
    assert outcome(ledger, history, last, True) == reference


def test_a_stored_record_with_padding_set_is_written_as_the_reference_writes_it(ledger):
    """A member record whose padding bytes (2-3, 36-39) are not zero: the reference re-packs
    it (zeros); the C loop declines to it rather than write the stored bytes back."""
    ts = 10_000 * DAY_US + 8 * HOUR_US
    cid = bytes(15) + b"\x00"

    def tamper(txn):
        raw = bytearray(txn.get(cid, db=ledger.member_cards))
        raw[2:4] = b"\xaa\xbb"
        raw[36:40] = b"\x01\x02\x03\x04"
        txn.put(cid, bytes(raw), db=ledger.member_cards)

    history = [[packed(0, L.OP_OPEN, 0, ts)]]
    last = [packed(0, L.OP_PURCHASE, 0, ts, 1, 100)]
    reference = outcome(ledger, history, last, False, tamper)
    native = outcome(ledger, history, last, True, tamper)
    assert native["member_cards"] == reference["member_cards"]


def test_a_split_tenders_later_payment_of_a_broken_record_is_refused_either_way(ledger):
    """A basket paid by card 0 then card 1 (basket tag 9, one group): card 1's payment is a
    later payment, not counted. Card 1's stored record has an unknown version: the reference
    reads it (``_read_records``: every wanted entry's card) and refuses with InvariantError; the
    C path leaves a group with later payments to it."""
    ts = 10_000 * DAY_US + 8 * HOUR_US
    c1 = bytes(15) + b"\x01"

    def tamper(txn):
        raw = bytearray(txn.get(c1, db=ledger.member_cards))
        raw[0] = 9
        txn.put(c1, bytes(raw), db=ledger.member_cards)

    history = [[packed(0, L.OP_OPEN, 0, ts), packed(1, L.OP_OPEN, 1, ts)]]
    last = [packed(0, L.OP_PURCHASE, 0, ts, 1, 100, basket=9),
            packed(1, L.OP_PURCHASE, 1, ts, 1, 50, basket=9)]
    reference = outcome(ledger, history, last, False, tamper)
    assert reference[0] == "InvariantError"
    assert outcome(ledger, history, last, True, tamper) == reference


@pytest.mark.parametrize("order", [(1, 5, 1), (5, 1, 5), (5, 5, 1, 1), (1, 1, 5)])
def test_month_change_between_stores_in_one_group(ledger, order):
    """One group at 2026-02-01 10:00 UTC: store 1 (UTC+8, cutoff 4) is in February, store 5
    (UTC-12, cutoff 23) in January; members with 0, 1 and 3 purchases before, the same card
    several times: both ways equal."""
    import datetime as dt
    feb1 = (dt.date(2026, 2, 1) - dt.date(1970, 1, 1)).days
    ts = feb1 * DAY_US + 10 * HOUR_US
    history = [[packed(c, L.OP_OPEN if c != 2 else L.OP_IMPORT_CARD, c, ts - 40 * DAY_US)
                for c in range(3)],
               [packed(0, L.OP_PURCHASE, 1, ts - 35 * DAY_US, 1, 70)],
               [packed(0, L.OP_PURCHASE, 2, ts - 3 * DAY_US, 1, 70)] * 3]
    last = [packed(k, L.OP_PURCHASE, c, ts, s, 10 + k)
            for k, (c, s) in enumerate([(c, s) for c in range(3) for s in order])]
    reference = outcome(ledger, history, last, False)
    assert isinstance(reference, dict)
    assert outcome(ledger, history, last, True) == reference


def test_two_records_of_the_wrong_size_whose_sizes_add_up_are_refused_either_way(ledger):
    """Card 0's stored record is one byte short (63 B), card 1's one byte long (65 B: a byte
    before a good record), their sizes adding up to two records'. The reference refuses
    (struct.error: MEMBER.unpack of 63 bytes), and so does the C path (each record's size
    checked, not their sum)."""
    ts = 10_000 * DAY_US + 8 * HOUR_US
    c0, c1 = bytes(16), bytes(15) + b"\x01"

    def tamper(txn):
        a = txn.get(c0, db=ledger.member_cards)
        b = txn.get(c1, db=ledger.member_cards)
        txn.put(c0, a[:63], db=ledger.member_cards)
        txn.put(c1, b"\x01" + b, db=ledger.member_cards)

    history = [[packed(0, L.OP_OPEN, 0, ts), packed(1, L.OP_OPEN, 1, ts)]]
    last = [packed(0, L.OP_PURCHASE, 0, ts, 1, 100), packed(1, L.OP_PURCHASE, 1, ts, 1, 50)]
    reference = outcome(ledger, history, last, False, tamper)
    assert reference[0] == "error"  # struct.error
    assert outcome(ledger, history, last, True, tamper) == reference


def test_a_groups_purchases_are_numbered_by_their_cards_in_key_order():
    """``native.purchases`` (the keys the C loop reads in one go): the distinct card ids of the
    purchases (not the skipped, not other entries) in LMDB's key order, each purchase numbered
    by its card's place among them; groups past the sort's bucket pass (64+), ids alike in their
    first byte or in all but their last, a card bought twice."""
    from array import array
    import random

    from cardcore.ext import members as native

    rng = random.Random(7)
    for n in (1, 63, 64, 65, 1000):
        ids = [rng.randbytes(16) for _ in range(n // 2)] + [
            bytes([rng.choice((0, 255))]) + rng.randbytes(15) for _ in range(n // 4)]
        ids += [bytes(15) + bytes([k]) for k in range(n - len(ids))]
        cards = [rng.choice(ids) for _ in range(n)]
        ops = [rng.choice((L.OP_PURCHASE, L.OP_PURCHASE, L.OP_TOP_UP)) for _ in range(n)]
        skip = bytearray(rng.random() < 0.1 for _ in range(n))
        buf = b"".join(L.JOURNAL.pack(
            L.JOURNAL_VERSION, op, 0, 1, 0, 0, 0, k + 1, cid, 100, 0, -100, 0, 0, 0, 0, 0, 1, 1, 0,
            0, 0, bytes(8), 1, 0, bytes(3), 0, 0, 0, 0, 0, 0, bytes(48), bytes(32))
            for k, (op, cid) in enumerate(zip(ops, cards)))
        index, slot_of = array("I", bytes(4 * n)), array("I", bytes(4 * n))
        m, keys = native.purchases(buf, skip, index, slot_of)
        bought = [k for k in range(n) if ops[k] == L.OP_PURCHASE and not skip[k]]
        assert m == len(bought) and list(index[:m]) == bought
        assert keys == sorted({cards[k] for k in bought})
        assert [keys[s] for s in slot_of[:m]] == [cards[k] for k in bought]
